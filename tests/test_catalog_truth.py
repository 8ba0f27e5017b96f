"""Catalog metadata clients can rely on (issue 15, part C): collection extents cover every item
after ingestion and after API writes; every link the API serves resolves and every asset href
is a URL it answers (chip thumbnails are PNGs); no file outside the asset roots is served;
``/queryables`` lists the fields a filter can test, and a filter on each of them works."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pystac
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from shapely.geometry import box, mapping, shape

from stac_rscbir.api.app import create_api
from stac_rscbir.ingest.sinks import StoreSink
from stac_rscbir.ingest.worker import Ingestor
from stac_rscbir.store.base import ItemStore, SearchQuery

from .api_builders import StoreFactory, _collection, _item
from .conftest import ROOT
from .ingest_builders import OPTIONS, _scene
from .stac_builders import raster_item

HOST = "http://testserver/"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------ helpers


def _time(text: str | None) -> dt.datetime | None:
    return None if text is None else pystac.utils.str_to_datetime(text)


def assert_extent_covers(collection: dict[str, Any], items: list[dict[str, Any]]) -> None:
    """The collection's overall bbox and interval contain every item's geometry and times."""
    assert items, "no items to check the extent against"
    x0, y0, x1, y1 = collection["extent"]["spatial"]["bbox"][0][:4]
    start, end = (_time(t) for t in collection["extent"]["temporal"]["interval"][0])
    for item in items:
        bx0, by0, bx1, by1 = shape(item["geometry"]).bounds
        assert x0 <= bx0 and y0 <= by0 and bx1 <= x1 and by1 <= y1, (item["id"], (x0, y0, x1, y1))
        props = item["properties"]
        lo = _time(props.get("start_datetime") or props["datetime"])
        hi = _time(props.get("end_datetime") or props["datetime"])
        assert start is None or start <= lo, (item["id"], start, lo)
        assert end is None or hi <= end, (item["id"], end, hi)


def all_items(store: ItemStore, collection_id: str) -> list[dict[str, Any]]:
    return store.search(SearchQuery(collections=[collection_id], limit=10_000)).items


def walk(client: TestClient, start: str = HOST, limit: int = 400) -> dict[str, Any]:
    """GET every link and asset href on the API's host reachable from ``start`` (breadth first,
    following ``next`` links as their method says), asserting each answers 200; returns the
    responses' JSON (or bytes) by URL."""
    seen: dict[str, Any] = {}
    todo: deque[tuple[str, str, Any, str]] = deque([(start, "GET", None, "start")])
    while todo and len(seen) < limit:
        url, method, body, came_from = todo.popleft()
        key = url if body is None else f"{url} {json.dumps(body, sort_keys=True)}"
        if key in seen:
            continue
        response = client.request(method, url, json=body)
        assert response.status_code == 200, (url, came_from, response.text[:300])
        kind = response.headers["content-type"]
        if "json" not in kind:
            seen[key] = response.content
            continue
        doc = seen[key] = response.json()
        objects = [doc, *doc.get("features", []), *doc.get("collections", [])]
        for obj in objects:
            for link in obj.get("links", []):
                href = link["href"]
                assert href.startswith(("http://", "https://")), (url, link)
                if href.startswith(HOST) and not link["rel"].startswith("service-"):
                    todo.append((href, link.get("method", "GET"), link.get("body"), url))
            for name, asset in (obj.get("assets") or {}).items():
                href = asset["href"]
                assert href.startswith(("http://", "https://")), (url, name, asset)
                if href.startswith(HOST):
                    todo.append((href, "GET", None, f"{url} asset {name}"))
    return seen


# ------------------------------------------------------------------------------ extents


def _narrow_collection(cid: str = "scenes") -> dict[str, Any]:
    """A collection whose extent is one small box and one day: the items written go beyond."""
    coll = _collection(cid)
    coll["extent"] = {
        "spatial": {"bbox": [[10.0, 45.0, 10.1, 45.1]]},
        "temporal": {"interval": [["2021-01-01T00:00:00Z", "2021-01-02T00:00:00Z"]]},
    }
    return coll


def test_extents_cover_every_item_after_api_writes(store_factory: StoreFactory) -> None:
    store = store_factory()
    client = TestClient(create_api(store, store_factory.index_dir).app)
    assert client.post("/collections", json=_narrow_collection()).status_code == 201

    def served() -> dict[str, Any]:
        return client.get("/collections/scenes").json()

    far = _item(3)
    far["geometry"] = mapping(box(-70.0, -33.0, -69.9, -32.9))
    far["bbox"] = [-70.0, -33.0, -69.9, -32.9]
    far["properties"]["datetime"] = "2019-06-01T10:00:00Z"
    assert client.post("/collections/scenes/items", json=far).status_code == 201
    assert_extent_covers(served(), all_items(store, "scenes"))

    batch = {"type": "FeatureCollection", "features": [_item(i) for i in range(40, 60)]}
    assert client.post("/collections/scenes/items", json=batch).status_code in (201, 204)
    assert_extent_covers(served(), all_items(store, "scenes"))

    moved = _item(41)
    moved["geometry"] = mapping(box(150.0, 60.0, 150.2, 60.1))
    moved["bbox"] = [150.0, 60.0, 150.2, 60.1]
    moved["properties"]["datetime"] = "2030-01-01T00:00:00Z"
    assert client.put("/collections/scenes/items/item-041", json=moved).status_code == 200
    assert_extent_covers(served(), all_items(store, "scenes"))

    # a PUT of the collection with its old, narrow extent is widened again
    assert client.put("/collections/scenes", json=_narrow_collection()).status_code == 200
    assert_extent_covers(served(), all_items(store, "scenes"))

    # deleting items may leave the extent wider, never narrower than the items left
    before = served()["extent"]
    assert client.delete("/collections/scenes/items/item-041").status_code in (200, 204)
    assert_extent_covers(served(), all_items(store, "scenes"))
    assert served()["extent"] == before


def test_an_open_interval_and_extra_boxes_are_kept(store_factory: StoreFactory) -> None:
    store = store_factory()
    coll = _narrow_collection()
    coll["extent"]["spatial"]["bbox"].append([10.0, 45.0, 10.05, 45.05])  # a sub-box
    coll["extent"]["temporal"]["interval"] = [["2021-01-01T00:00:00Z", None]]
    store.create_collection(coll)
    store.upsert_items([_item(i) for i in range(30)])
    extent = store.get_collection("scenes")["extent"]
    assert extent["temporal"]["interval"] == [["2021-01-01T00:00:00Z", None]]
    assert extent["spatial"]["bbox"][1] == [10.0, 45.0, 10.05, 45.05]
    assert_extent_covers(store.get_collection("scenes"), all_items(store, "scenes"))


def test_a_collection_without_an_extent_gets_one(store_factory: StoreFactory) -> None:
    store = store_factory()
    coll = _collection()
    del coll["extent"]
    store.create_collection(coll)
    store.create_item(_item(7))
    extent = store.get_collection("scenes")["extent"]
    assert extent["temporal"]["interval"] == [["2021-01-08T00:00:00Z", "2021-01-08T00:00:00Z"]]
    assert_extent_covers(store.get_collection("scenes"), all_items(store, "scenes"))


@pytest.fixture
def ingested(
    store_factory: StoreFactory, checkpoint: Path, tmp_path: Path
) -> Iterator[tuple[ItemStore, Path]]:
    """Two scenes a year and ~30 km apart, cut into 32 px chips and encoded into a store
    whose ``scenes`` collection was described from the first scene only (as the demo did)."""
    data = tmp_path / "rasters"
    data.mkdir()
    first = raster_item("scene-a", _scene(data, "a", 64, 64, seed=1))
    second = raster_item("scene-b", _scene(data, "b", 64, 96, seed=30))
    second.datetime = dt.datetime(2021, 7, 1, tzinfo=dt.UTC)
    store = store_factory()
    coll = pystac.Collection(
        "scenes",
        "two scenes",
        pystac.Extent(
            pystac.SpatialExtent([list(first.bbox or [])]),
            pystac.TemporalExtent([[first.datetime, first.datetime]]),
        ),
        license="other",
    )
    store.create_collection(coll.to_dict(include_self_link=False))
    scenes = [first, second]
    store.upsert_items([s.to_dict(include_self_link=False) for s in scenes])
    stored = [pystac.Item.from_dict(store.get_item("scenes", s.id)) for s in scenes]
    report = Ingestor.from_checkpoint(checkpoint, OPTIONS).run(stored, StoreSink(store))
    assert report.chips_encoded == 4 + 6
    yield store, data


def test_extents_cover_every_item_after_ingestion(ingested: tuple[ItemStore, Path]) -> None:
    store, _ = ingested
    for cid in ("scenes", "scenes-chips"):
        items = all_items(store, cid)
        assert items
        assert_extent_covers(store.get_collection(cid), items)


# ------------------------------------------------------------------------ links and assets


def test_every_served_link_resolves_and_thumbnails_are_pngs(
    ingested: tuple[ItemStore, Path], store_factory: StoreFactory
) -> None:
    store, data = ingested
    client = TestClient(create_api(store, store_factory.index_dir, asset_roots=[data]).app)
    pages = walk(client)

    chips = client.get("/collections/scenes-chips/items?limit=100").json()["features"]
    assert len(chips) == 10
    for chip in chips:
        (derived,) = [link for link in chip["links"] if link["rel"] == "derived_from"]
        scene = chip["id"].split("-chip-")[0]
        assert derived["href"] == f"{HOST}collections/scenes/items/{scene}"
        thumb = chip["assets"]["thumbnail"]
        assert thumb["type"] == "image/png" and "thumbnail" in thumb["roles"]
        png = pages[thumb["href"]]
        assert png.startswith(PNG_MAGIC)
        assert Image.open(io.BytesIO(png)).size == (32, 32)  # the chip, not its scene
    assert len({pages[c["assets"]["thumbnail"]["href"]] for c in chips}) == len(chips)
    # the scenes' files are served from the asset root: the bytes of the file itself
    scene = client.get("/collections/scenes/items/scene-a").json()
    href = scene["assets"]["image"]["href"]
    assert href == f"{HOST}collections/scenes/items/scene-a/assets/image"
    assert pages[href] == (data / "a.tif").read_bytes()


def test_without_asset_roots_no_local_file_is_offered(ingested: tuple[ItemStore, Path]) -> None:
    store, data = ingested
    client = TestClient(create_api(store, data.parent / "index").app)
    walk(client)  # still every link resolves
    scene = client.get("/collections/scenes/items/scene-a").json()
    assert scene["assets"] == {}
    assert client.get("/collections/scenes/items/scene-a/assets/image").status_code == 404


def _secret_item(store: ItemStore, root: Path, outside: Path) -> None:
    """An item whose assets try every way out of ``root``."""
    (root / "ok.txt").write_text("served")
    (root / "link.txt").symlink_to(outside)
    store.create_collection(_collection())
    item = _item(0)
    item["links"] = [
        {"rel": "alternate", "href": "../../etc/passwd"},
        {"rel": "license", "href": "https://example.com/license"},
        {"rel": "via", "href": f"file://{outside}"},
    ]
    item["assets"] = {
        "ok": {"href": str(root / "ok.txt"), "type": "text/plain"},
        "absolute": {"href": str(outside)},
        "dotdot": {"href": f"{root}/../{outside.parent.name}/{outside.name}"},
        "symlink": {"href": str(root / "link.txt")},
        "file_url": {"href": f"file://{outside}"},
        "relative": {"href": "../secret.txt"},
        "etc": {"href": "/etc/passwd"},
        "remote": {"href": "https://example.com/scene.tif"},
    }
    store.create_item(item)


def test_no_file_outside_the_asset_roots_is_served(
    store_factory: StoreFactory, tmp_path: Path
) -> None:
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    outside = elsewhere / "secret.txt"
    outside.write_text("secret")
    store = store_factory()
    _secret_item(store, root, outside)
    client = TestClient(create_api(store, store_factory.index_dir, asset_roots=[root]).app)
    item = client.get("/collections/scenes/items/item-000").json()
    assert set(item["assets"]) == {"ok", "remote"}
    assert item["assets"]["remote"]["href"] == "https://example.com/scene.tif"
    assert {link["rel"] for link in item["links"]} >= {"license"}
    assert not {"alternate", "via"} & {link["rel"] for link in item["links"]}
    served = client.get(item["assets"]["ok"]["href"])
    assert served.status_code == 200 and served.text == "served"
    base = "/collections/scenes/items/item-000/assets"
    for key in ("absolute", "dotdot", "symlink", "file_url", "relative", "etc", "remote", "none"):
        response = client.get(f"{base}/{key}")
        assert response.status_code == 404, key
        assert "secret" not in response.text
    for path in (f"{base}/..%2F..%2Fsecret.txt", f"{base}/%2Fetc%2Fpasswd"):
        assert client.get(path).status_code == 404
    assert client.get("/collections/scenes/items/item-000/thumbnail").status_code == 404
    walk(client)


# ------------------------------------------------------------------------------ queryables


def _filter_on(name: str, schema: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    """A CQL2 JSON filter that ``item`` matches, on the queryable ``name``."""
    prop = {"property": name}
    if name == "geometry":
        return {"op": "s_intersects", "args": [prop, item["geometry"]]}
    value = item[name] if name in ("id", "collection") else item["properties"][name]
    if schema.get("format") == "date-time":
        return {"op": "<=", "args": [prop, {"timestamp": value}]}
    if schema.get("type") in ("number", "integer"):
        return {"op": ">=", "args": [prop, value]}
    return {"op": "=", "args": [prop, value]}


def test_queryables_list_real_fields_and_each_filters(store_factory: StoreFactory) -> None:
    store = store_factory()
    store.create_collection(_collection())
    store.create_collection(_collection("other"))
    items = [_item(i) for i in range(12)]
    items[5]["properties"]["sat:relative_orbit"] = 22
    items[5]["properties"]["processed"] = True
    store.upsert_items(items)
    client = TestClient(create_api(store, store_factory.index_dir).app)

    doc = client.get("/queryables").json()
    assert doc["$id"] == f"{HOST}queryables"
    assert "Example" not in doc["title"]
    props = doc["properties"]
    assert {"id", "collection", "geometry", "datetime", "platform", "eo:cloud_cover"} <= set(props)
    assert props["eo:cloud_cover"]["type"] == "number"
    assert props["sat:relative_orbit"]["type"] == "integer"
    assert props["processed"]["type"] == "boolean"
    assert props["datetime"]["format"] == "date-time"
    assert "cbir:codes" not in props  # an array of objects: nothing a filter compares

    coll = client.get("/collections/scenes/queryables").json()
    assert coll["$id"] == f"{HOST}collections/scenes/queryables"
    assert set(coll["properties"]) == set(props)
    other = client.get("/collections/other/queryables").json()["properties"]
    assert "platform" not in other  # no items: only the core fields
    assert client.get("/collections/nope/queryables").status_code == 404

    item = items[5]
    for name, schema in props.items():
        body = {"filter": _filter_on(name, schema, item), "filter-lang": "cql2-json", "limit": 50}
        response = client.post("/search", json=body)
        assert response.status_code == 200, (name, response.text)
        assert item["id"] in {f["id"] for f in response.json()["features"]}, name


def test_queryables_follow_writes(store_factory: StoreFactory) -> None:
    store = store_factory()
    store.create_collection(_collection())
    client = TestClient(create_api(store, store_factory.index_dir).app)
    assert "platform" not in client.get("/queryables").json()["properties"]
    assert client.post("/collections/scenes/items", json=_item(1)).status_code == 201
    assert "platform" in client.get("/queryables").json()["properties"]


# ------------------------------------------------------------------------------ landing page


def test_the_landing_page_names_the_service_and_start_up_does_not_warn(tmp_path: Path) -> None:
    from stac_rscbir.api.app import create_app

    landing = TestClient(create_app(tmp_path / "stac.db")).get("/").json()
    assert (landing["id"], landing["title"]) == ("stac-rscbir", "stac-rscbir")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = subprocess.run(
        [sys.executable, "-c", "import stac_rscbir.api.app"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert "Using default values" not in started.stderr, started.stderr
