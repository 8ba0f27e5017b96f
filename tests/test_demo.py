"""The main job's flow at small size: real scenes -> catalog -> model -> store -> API -> queries."""

from __future__ import annotations

import base64
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from shapely.geometry import box, shape

from stac_rscbir.api.server import free_port
from stac_rscbir.demo import run_demo
from stac_rscbir.store.base import SearchQuery
from stac_rscbir.store.sqlite import SQLiteStore

from .conftest import require

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "rasters"
LANDSAT = SHARED / "landsat8" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
RGBN = SHARED / "misc" / "rgbn.tif"


def run_small_demo(tmp_path: Path) -> dict[str, Any]:
    """The demo at small size on the shared rasters, stopped: what its queries found; its files
    (store, index, catalog) under ``tmp_path / "demo"``."""
    require(LANDSAT.exists() and RGBN.exists(), f"demo rasters not found under {SHARED}")
    rasters = tmp_path / "rasters"
    rasters.mkdir()
    (rasters / LANDSAT.name).symlink_to(LANDSAT)
    for date in ("20160101", "20160401"):  # the same real RGBN scene under two demo dates
        (rasters / f"rgbn_{date}.tif").symlink_to(RGBN)
    return run_demo(
        tmp_path / "demo",
        port=free_port(),
        stop=True,
        rasters=rasters,
        max_fit_chips=96,
        console=Console(width=140, quiet=True),
    )


@pytest.mark.shared
def test_demo_runs_end_to_end_on_real_scenes(tmp_path: Path) -> None:
    results = run_small_demo(tmp_path)
    store = SQLiteStore(tmp_path / "demo" / "archive.db")  # what the demo served, re-opened
    try:
        landsat = _chips(store, "landsat-8-chips")
        rgbn = _chips(store, "rgbn-5m-chips")
    finally:
        store.close()

    # the query chips, as the demo documents them: the chip a third into the Landsat chips by
    # id, queried everywhere and within 0.03 degrees (~3 km) of its bbox; the first RGBN chip
    query = sorted(landsat)[len(landsat) // 3]
    x0, y0, x1, y1 = landsat[query]["bbox"]
    area = box(x0 - 0.03, y0 - 0.03, x1 + 0.03, y1 + 0.03)
    inside = {i for i, chip in landsat.items() if shape(chip["geometry"]).intersects(area)}
    assert query in inside and len(inside) < len(landsat)

    everywhere, nearby = results["all chips"], results["within 3 km"]
    for hits in (everywhere, nearby):
        assert hits[0] == (query, 0)  # the query chip finds itself first
        assert [d for _, d in hits] == sorted(d for _, d in hits)  # ranked by distance
    assert all(i in inside for i, _ in nearby)  # the bbox filter
    assert everywhere == _brute_force(landsat, query, set(landsat))
    assert nearby == _brute_force(landsat, query, inside)
    assert nearby != everywhere  # some nearest chips lie outside the bbox: the filter filtered

    dated = results["2016-04 .. 2017-12"]
    first = sorted(rgbn)[0]
    assert first.startswith("rgbn_20160101")  # so the date range excludes the query itself
    lo, hi = (
        datetime.fromisoformat("2016-04-01T00:00:00Z"),
        datetime.fromisoformat("2018-01-01T00:00:00Z"),
    )
    in_range = {i for i, c in rgbn.items() if lo <= _when(c) < hi}
    assert 0 < len(in_range) < len(rgbn)
    assert all(i in in_range for i, _ in dated)  # the datetime filter
    assert dated == _brute_force(rgbn, first, in_range)
    assert results["contact_sheet"].stat().st_size > 50_000
    _catalog_truth(tmp_path / "demo")


def _catalog_truth(workdir: Path) -> None:
    """The demo's collections cover their items, and served again (the scenes' files under the
    shared folder their links resolve to) every link and asset href resolves, thumbnails are
    PNGs."""
    from fastapi.testclient import TestClient

    from stac_rscbir.api.app import create_api

    from .test_catalog_truth import PNG_MAGIC, all_items, assert_extent_covers, walk

    store = SQLiteStore(workdir / "archive.db")
    try:
        for collection in store.all_collections():
            assert_extent_covers(collection, all_items(store, collection["id"]))
        api = create_api(store, workdir / "index", asset_roots=[SHARED])
        pages = walk(TestClient(api.app), limit=250)
    finally:
        store.close()
    pngs = [v for v in pages.values() if isinstance(v, bytes) and v.startswith(PNG_MAGIC)]
    assert pngs, "no chip thumbnail was reached"


def _chips(store: SQLiteStore, collection: str) -> dict[str, dict[str, Any]]:
    """Every item of ``collection``, by id, paging through the store."""
    out: dict[str, dict[str, Any]] = {}
    token = None
    while True:
        page = store.search(SearchQuery(collections=[collection], limit=500, token=token))
        out.update((item["id"], item) for item in page.items)
        if not (token := page.next_token):
            return out


def _code(chip: dict[str, Any]) -> bytes:
    """The chip's one code, decoded here (base64 or hex), not by the extension's codec."""
    (entry,) = chip["properties"]["cbir:codes"]
    text = entry["code"]
    return bytes.fromhex(text) if entry["encoding"] == "hex" else base64.b64decode(text)


def _when(chip: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(chip["properties"]["datetime"])


def _brute_force(
    chips: dict[str, dict[str, Any]], query: str, keep: set[str], k: int = 7
) -> list[tuple[str, int]]:
    """The oracle: the k chips of ``keep`` nearest to ``query`` in Hamming distance, ties by id."""
    q = _code(chips[query])
    ranked = sorted(
        (sum((a ^ b).bit_count() for a, b in zip(q, _code(chips[i]), strict=True)), i) for i in keep
    )
    return [(i, d) for d, i in ranked[:k]]
