"""examples/index_public_stac.py against a local STAC API standing in for Earth Search.

The stand-in is our own API (uvicorn on a free port) over a ``sentinel-2-l2a`` collection whose
items look like Earth Search v1's: single-band 10 m COGs under the asset keys ``red``, ``green``,
``blue`` (uint16 with ``raster:bands`` scale 0.0001 / offset -0.1, nodata 0), a 3-band
``visual`` asset, a thumbnail, ``eo:cloud_cover``, ``file://`` hrefs. The example searches it
(bbox, datetime, CQL2 filter), copies the found items into its own store, fits the demo's
EfficientNet-Lite0 + ITQ model, encodes, serves its own API and queries it by example.
"""

from __future__ import annotations

import base64
import datetime as dt
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pystac
import pytest
from pystac.extensions.eo import Band
from pystac.extensions.raster import DataType, RasterBand
from rich.console import Console
from shapely.geometry import box, shape

from stac_rscbir.api.app import create_api
from stac_rscbir.api.server import BackgroundServer, free_port
from stac_rscbir.store.base import SearchQuery
from stac_rscbir.store.sqlite import SQLiteStore

from .stac_builders import make_item, write_cog_at

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "index_public_stac.py"
SIZE = 240  # px at 10 m: 2 x 2 chips of 120 px per scene
WAVELENGTH = {"red": 0.665, "green": 0.56, "blue": 0.49}
# id -> (x offset in km, date, cloud cover): three scenes in the area, one outside it (east),
# one cloudy (filtered out by the CQL2 filter), one out of the time range
SCENES = {
    "S2A_33TUN_20240605_0_L2A": (0, "2024-06-05", 3.0),
    "S2B_33TUN_20240615_0_L2A": (3, "2024-06-15", 5.0),
    "S2A_33TUN_20240625_0_L2A": (6, "2024-06-25", 8.0),
    "S2B_33TUN_20240610_0_L2A": (60, "2024-06-10", 1.0),
    "S2A_33TUN_20240620_0_L2A": (9, "2024-06-20", 85.0),
    "S2B_33TUN_20240901_0_L2A": (0, "2024-09-01", 2.0),
}
INSIDE = {"S2A_33TUN_20240605_0_L2A", "S2B_33TUN_20240615_0_L2A", "S2A_33TUN_20240625_0_L2A"}


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("index_public_stac", EXAMPLE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reflectance(seed: int) -> np.ndarray:
    """(3, SIZE, SIZE) L2A-like digital numbers: smooth fields and parcels plus noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    bands = []
    for b in range(3):
        field = 1500 + 600 * np.sin(2 * np.pi * (xx * (1 + seed % 3) + yy * (b + 1)))
        parcels = 400 * (((xx * 6 + seed).astype(int) + (yy * 4).astype(int)) % 3)
        bands.append(field + parcels + rng.normal(0, 60, xx.shape))
    return np.clip(np.stack(bands), 1, 10000).astype(np.uint16)


def _earth_search_item(folder: Path, item_id: str, seed: int) -> pystac.Item:
    x_km, date, cloud = SCENES[item_id]
    dn = _reflectance(seed)
    x0 = 500_000.0 + 1000 * x_km
    assets = {}
    for i, key in enumerate(("red", "green", "blue")):
        href = write_cog_at(folder / f"{item_id}_{key}.tif", dn[i], 10.0, nodata=0, x0=x0)
        assets[key] = {
            "href": href,
            "eo": [Band.create(name=key, common_name=key, center_wavelength=WAVELENGTH[key])],
            "raster": [
                RasterBand.create(
                    data_type=DataType.UINT16, nodata=0, scale=0.0001, offset=-0.1, unit="m"
                )
            ],
        }
    visual = (dn // 40).clip(1, 255).astype(np.uint8)
    assets["visual"] = {
        "href": write_cog_at(folder / f"{item_id}_TCI.tif", visual, 10.0, nodata=0, x0=x0),
        "eo": [Band.create(name=b, common_name=b) for b in ("red", "green", "blue")],
    }
    item = make_item(
        item_id,
        assets,
        properties={
            "platform": "sentinel-2a" if item_id.startswith("S2A") else "sentinel-2b",
            "constellation": "sentinel-2",
            "eo:cloud_cover": cloud,
            "mgrs:utm_zone": 33,
        },
    )
    item.datetime = dt.datetime.fromisoformat(f"{date}T10:05:00+00:00")
    item.collection_id = "sentinel-2-l2a"
    for asset in item.assets.values():  # an API's hrefs must not resolve against its URL
        asset.href = Path(asset.href).as_uri()
    thumb = folder / f"{item_id}_thumbnail.jpg"
    thumb.write_bytes(b"\xff\xd8\xff\xd9")
    item.add_asset(
        "thumbnail",
        pystac.Asset(thumb.as_uri(), media_type=pystac.MediaType.JPEG, roles=["thumbnail"]),
    )
    return item


@pytest.fixture(scope="module")
def earth_search(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[float]]]:
    """A local STAC API with Earth-Search-like sentinel-2-l2a items; (url, bbox of the area)."""
    tmp = tmp_path_factory.mktemp("remote")
    items = [_earth_search_item(tmp, iid, seed) for seed, iid in enumerate(SCENES)]
    store = SQLiteStore(tmp / "remote.db")
    collection = pystac.Collection(
        "sentinel-2-l2a",
        "Sentinel-2 L2A (a local stand-in for Earth Search v1)",
        pystac.Extent(
            pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
            pystac.TemporalExtent([[dt.datetime(2015, 6, 27, tzinfo=dt.UTC), None]]),
        ),
        license="proprietary",
    )
    store.create_collection(collection.to_dict(include_self_link=False))
    store.upsert_items([i.to_dict(include_self_link=False) for i in items])
    srv = BackgroundServer(create_api(store, tmp / "remote-index", asset_roots=[tmp]).app).start()
    boxes = [i.bbox for i in items if i.id in INSIDE]
    assert all(b is not None for b in boxes)
    area = [
        min(b[0] for b in boxes) - 0.001,  # type: ignore[index]
        min(b[1] for b in boxes) - 0.001,  # type: ignore[index]
        max(b[2] for b in boxes) + 0.001,  # type: ignore[index]
        max(b[3] for b in boxes) + 0.001,  # type: ignore[index]
    ]
    yield srv.url, area
    srv.stop()


def test_example_indexes_serves_and_queries_a_stac_api(
    earth_search: tuple[str, list[float]], tmp_path: Path
) -> None:
    remote, area = earth_search
    example = _load_example()
    port = free_port()
    bbox = ",".join(f"{v:.6f}" for v in area)
    results = example.main(
        [
            "--stac-url",
            remote,
            "--collection",
            "sentinel-2-l2a",
            "--bbox",
            bbox,
            "--datetime",
            "2024-06-01/2024-08-31",
            "--filter",
            "eo:cloud_cover < 20",
            "--max-items",
            "10",
            "--bands",
            "red,green,blue",
            "--fit-items",
            "3",
            "--max-fit-chips",
            "96",
            "--workdir",
            str(tmp_path / "work"),
            "--port",
            str(port),
            "--stop",
        ],
        console=Console(width=140, quiet=True),
    )
    # the search: bbox, datetime and the CQL2 filter reached the remote API
    assert set(results["items"]) == INSIDE
    report = results["report"]
    assert (report.items_encoded, report.chips_encoded, report.errors) == (3, 12, [])
    assert results["model"] == "sentinel-2-l2a-efficientnet-lite0-itq-64"
    assert (results["checkpoint"] / "config.json").is_file()

    # indexed into the example's own store, served by its own API
    assert results["url"] == f"http://127.0.0.1:{port}"
    assert results["url"] != remote
    local = SQLiteStore(tmp_path / "work" / "archive.db")
    for iid in INSIDE:
        codes = local.get_item("sentinel-2-l2a", iid)["properties"]["cbir:codes"]
        assert [c["model"] for c in codes] == [results["model"]]

    # the query-by-example: the first chip finds itself first, then ranked chips with distances
    hits = results["hits"]
    assert results["query"][0] == "sentinel-2-l2a-chips"
    assert len(hits) == 7  # -k defaults to 7, of the 12 chips
    assert hits[0][0] == results["query"][1] and hits[0][1] == 0
    dists = [d for _, d, _ in hits]
    assert dists == sorted(dists)
    assert all(d["collection"] == "sentinel-2-l2a-chips" for _, _, d in hits)
    assert all(iid.split("-chip-")[0] in INSIDE for iid, _, _ in hits)
    # the oracle: brute force over the stored chips in the search area, ties by id
    chips = local.search(SearchQuery(collections=["sentinel-2-l2a-chips"], limit=100)).items
    local.close()
    assert len(chips) == 12
    query_code = _packed_code(next(c for c in chips if c["id"] == results["query"][1]))
    ranking = sorted(
        (_hamming(query_code, _packed_code(c)), c["id"])
        for c in chips
        if shape(c["geometry"]).intersects(box(*area))
    )
    assert [(int(d), iid) for iid, d, _ in hits] == ranking[:7]
    assert results["contact_sheet"].stat().st_size > 10_000

    # again with that checkpoint (--model), no time range: the September scene comes too
    again = example.main(
        [
            *("--stac-url", remote, "--bbox", bbox, "--filter", "eo:cloud_cover < 20"),
            *("--model", str(results["checkpoint"]), "--workdir", str(tmp_path / "again")),
            *("--port", str(free_port()), "-k", "20", "--max-items", "10", "--stop"),
        ],
        console=Console(width=140, quiet=True),
    )
    assert set(again["items"]) == {*INSIDE, "S2B_33TUN_20240901_0_L2A"}
    assert (again["report"].items_encoded, again["report"].chips_encoded) == (4, 16)
    assert not (tmp_path / "again" / "models").exists()  # nothing fitted
    assert len(again["hits"]) == 16 and again["hits"][0][1] == 0


def _packed_code(item: dict[str, Any]) -> bytes:
    """The item's one code, decoded here (base64 or hex), not by the extension's codec."""
    (entry,) = item["properties"]["cbir:codes"]
    text = entry["code"]
    return bytes.fromhex(text) if entry["encoding"] == "hex" else base64.b64decode(text)


def _hamming(a: bytes, b: bytes) -> int:
    return sum((x ^ y).bit_count() for x, y in zip(a, b, strict=True))


def test_example_cli_parses_earth_search_and_planetary_computer_arguments() -> None:
    example = _load_example()
    args = example.build_parser().parse_args(
        ["--bbox", "13.3,52.45,13.45,52.55", "--query", "eo:cloud_cover<20", "--bands", "s2"]
    )
    assert args.stac_url == example.EARTH_SEARCH and args.collection == "sentinel-2-l2a"
    assert args.bbox == [13.3, 52.45, 13.45, 52.55] and len(args.bands) == 12
    assert args.stop is False and args.model is None
    search = example.search_parameters(
        "sentinel-2-l2a", args.bbox, "2024-06/2024-08", args.query, None
    )
    assert search["query"] == ["eo:cloud_cover<20"] and search["datetime"] == "2024-06/2024-08"
    cql2 = example.search_parameters(
        "sentinel-2-l2a", None, None, None, '{"op": "<", "args": [{"property": "x"}, 1]}'
    )
    assert cql2["filter_lang"] == "cql2-json" and cql2["filter"]["op"] == "<"
    text = example.search_parameters("sentinel-2-l2a", None, None, None, "eo:cloud_cover < 20")
    assert text["filter"] == {"op": "<", "args": [{"property": "eo:cloud_cover"}, 20.0]}
