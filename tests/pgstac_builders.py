"""pgstac test data: scene items over small COGs, written straight into pgstac, and checks of
what the ingestion wrote back (shared by the pgstac ingestion and deployment tests; needs the
pgstac extra)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pystac
from psycopg.types.json import Jsonb

from stac_rscbir.data.chips import chip_windows

from . import ingest_builders as base
from .stac_builders import raster_item

MODEL = base.MODEL
SHAPES = [(64, 64), (64, 32), (32, 32)]  # 4 chips, 2 chips, one patch (no chips)


def _collection(cid: str) -> dict[str, Any]:
    return pystac.Collection(
        id=cid,
        description="test scenes",
        extent=pystac.Extent(
            pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
            pystac.TemporalExtent([[datetime(2020, 1, 1, tzinfo=UTC), None]]),
        ),
        license="other",
    ).to_dict(include_self_link=False)


def _scenes(folder: Path, cid: str, seed: int, months: Sequence[int] = (6,)) -> list[pystac.Item]:
    """One item per shape and month, over COGs written in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for m, month in enumerate(months):
        for s, (h, w) in enumerate(SHAPES):
            name = f"{cid}-{month:02d}-{s}"
            item = raster_item(
                name, base._scene(folder, name, h, w, seed=seed + 10 * m + s), collection=cid
            )
            item.datetime = datetime(2020, month, 1, tzinfo=UTC)
            items.append(item)
    return items


def _chips_of(items: Sequence[pystac.Item]) -> int:
    n = 0
    for item in items:
        h, w = item.assets["image"].extra_fields["proj:shape"]
        n += 0 if (h, w) == (base.CHIP, base.CHIP) else len(chip_windows(h, w, base.CHIP))
    return n


def _insert(dsn: str, cid: str, items: Sequence[pystac.Item]) -> None:
    """Items (and their collection) written straight into pgstac with its SQL API."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pgstac.upsert_collection(%s)", (Jsonb(_collection(cid)),))
        dicts = [i.to_dict(include_self_link=False, transform_hrefs=False) for i in items]
        conn.execute("SELECT pgstac.upsert_items(%s)", (Jsonb(dicts),))


def _stored(dsn: str, cid: str) -> dict[str, dict[str, Any]]:
    """Hydrated items of collection ``cid`` by id."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET search_path TO pgstac, public")
        rows = conn.execute(
            "SELECT id, content_hydrate(i) FROM items i WHERE collection = %s", (cid,)
        ).fetchall()
    return dict(rows)


def _model_codes(item: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in item["properties"].get("cbir:codes", []) if c["model"] == MODEL]


def _assert_encoded_once(dsn: str, cid: str, items: Sequence[pystac.Item]) -> None:
    stored = _stored(dsn, cid)
    assert sorted(stored) == sorted(i.id for i in items)
    assert all(len(_model_codes(i)) == 1 for i in stored.values())
    chips = _stored(dsn, f"{cid}-chips")
    assert len(chips) == _chips_of(items)
    assert all(len(_model_codes(c)) == 1 and "cbir:chip" in c["properties"] for c in chips.values())
