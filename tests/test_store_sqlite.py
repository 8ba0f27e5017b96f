"""The embedded SQLite store: CRUD, search semantics against brute force, paging, codes."""

from __future__ import annotations

import copy
import random
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cql2
import numpy as np
import pytest
import shapely
import shapely.geometry

from stac_rscbir.extension.cbir import CODES_PROP, Descriptor, HashCode
from stac_rscbir.store.base import (
    ConflictError,
    InvalidQueryError,
    NotFoundError,
    SearchQuery,
    StoreError,
)
from stac_rscbir.store.sqlite import SQLiteStore

N_ITEMS = 300
COLLECTIONS = ("alpha", "beta", "gamma")
PLATFORMS = ("sentinel-2a", "sentinel-2b", "landsat-8")
T0 = datetime(2020, 1, 1, tzinfo=UTC)


# ---------------------------------------------------------------------------------------------
# synthetic items


def _iso(t: datetime, offset_hours: int = 0) -> str:
    if offset_hours:
        from datetime import timezone

        return t.astimezone(timezone(timedelta(hours=offset_hours))).isoformat()
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _geometry(rng: random.Random, kind: int) -> dict[str, Any]:
    x, y = rng.uniform(-10, 10), rng.uniform(-10, 10)
    w, h = rng.uniform(0.2, 3), rng.uniform(0.2, 3)
    if kind == 0:
        return {"type": "Point", "coordinates": [x, y]}
    if kind == 1:
        return shapely.geometry.mapping(shapely.box(x, y, x + w, y + h))
    if kind == 2:  # a right triangle: the upper-right half of its bbox is empty
        return {
            "type": "Polygon",
            "coordinates": [[[x, y], [x + w, y], [x, y + h], [x, y]]],
        }
    if kind == 3:
        return {"type": "LineString", "coordinates": [[x, y], [x + w, y + h], [x + 2 * w, y]]}
    return shapely.geometry.mapping(
        shapely.MultiPolygon(
            [shapely.box(x, y, x + 0.3, y + 0.3), shapely.box(x + w, y, x + w + 0.3, y + 0.3)]
        )
    )


def make_code(model: str, version: str, seed: int, descriptor: bool = True) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    desc = Descriptor.create(rng.normal(size=8).astype("float32")) if descriptor else None
    return HashCode.from_bits(model, version, rng.integers(0, 2, 64), descriptor=desc).to_dict()


def make_item(i: int, rng: random.Random) -> dict[str, Any]:
    t = T0 + timedelta(days=rng.uniform(0, 730))
    props: dict[str, Any] = {"platform": rng.choice(PLATFORMS), "gsd": rng.choice([10, 20, 60])}
    mode = i % 8
    if mode in (0, 1):  # a range, datetime null
        props["datetime"] = None
        props["start_datetime"] = _iso(t)
        props["end_datetime"] = _iso(t + timedelta(days=rng.uniform(0, 90)))
    elif mode == 2:  # datetime and a range
        props["datetime"] = _iso(t)
        props["start_datetime"] = _iso(t - timedelta(days=5))
        props["end_datetime"] = _iso(t + timedelta(days=5))
    elif mode == 3:  # an instant with an offset
        props["datetime"] = _iso(t, offset_hours=2)
    else:
        props["datetime"] = _iso(t)
    if i % 10 != 0:
        props["eo:cloud_cover"] = round(rng.uniform(0, 100), 2)
    if i % 3 == 0:
        props[CODES_PROP] = [make_code("hashnet", "1", i)]
    item: dict[str, Any] = {
        "type": "Feature",
        "stac_version": "1.1.0",
        "id": f"item-{i:04d}",
        "collection": COLLECTIONS[i % 3],
        "geometry": _geometry(rng, i % 5),
        "properties": props,
        "assets": {},
        "links": [],
    }
    if i % 2 == 0:
        item["bbox"] = list(shapely.geometry.shape(item["geometry"]).bounds)
    # values of varying JSON types and a top-level field (what the SQL prefilter must keep)
    props["code"] = rng.choice(["x7", 7, None, ["x7"]])
    props["tier"] = rng.choice([1, 1.5, "1", True, 3])
    if i % 7 == 0:
        item["origin"] = "top"
    return item


def make_items(n: int = N_ITEMS, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [make_item(i, rng) for i in range(n)]


def collection(cid: str) -> dict[str, Any]:
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": cid,
        "description": f"test collection {cid}",
        "license": "proprietary",
        "extent": {
            "spatial": {"bbox": [[-180, -90, 180, 90]]},
            "temporal": {"interval": [["2020-01-01T00:00:00Z", None]]},
        },
        "links": [],
    }


def new_store(path: Path) -> SQLiteStore:
    store = SQLiteStore(path / "store.db")
    for cid in COLLECTIONS:
        store.create_collection(collection(cid))
    return store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = new_store(tmp_path)
    yield s
    s.close()


@pytest.fixture(scope="module")
def items() -> list[dict[str, Any]]:
    return make_items()


@pytest.fixture(scope="module")
def loaded(
    tmp_path_factory: pytest.TempPathFactory, items: list[dict[str, Any]]
) -> Iterator[SQLiteStore]:
    """A store holding ``items`` (read-only tests share it)."""
    s = new_store(tmp_path_factory.mktemp("loaded"))
    s.upsert_items(items)
    yield s
    s.close()


# ---------------------------------------------------------------------------------------------
# brute force


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def _range(item: dict[str, Any]) -> tuple[datetime, datetime]:
    p = item["properties"]
    start = p.get("start_datetime") or p["datetime"]
    end = p.get("end_datetime") or p["datetime"]
    return _t(start), _t(end)


def _sort_dt(item: dict[str, Any]) -> datetime:
    p = item["properties"]
    return _t(p.get("datetime") or p["start_datetime"])


def brute_force(items: list[dict[str, Any]], q: dict[str, Any]) -> list[tuple[str, str]]:
    """The keys ``q`` matches, in the default order (datetime desc, collection, id)."""
    out = []
    for item in items:
        if q.get("collections") and item["collection"] not in q["collections"]:
            continue
        if q.get("ids") and item["id"] not in q["ids"]:
            continue
        geom = shapely.geometry.shape(item["geometry"])
        if q.get("bbox"):
            b = q["bbox"]
            b2 = (b[0], b[1], b[3], b[4]) if len(b) == 6 else b
            if not shapely.box(*b2).intersects(geom):
                continue
        if q.get("intersects") and not shapely.geometry.shape(q["intersects"]).intersects(geom):
            continue
        if q.get("datetime"):
            start, end = _range(item)
            parts = q["datetime"].split("/")
            if len(parts) == 1:
                a = b_ = _t(parts[0])
            else:
                a = None if parts[0] in ("", "..") else _t(parts[0])
                b_ = None if parts[1] in ("", "..") else _t(parts[1])
            if (a is not None and end < a) or (b_ is not None and start > b_):
                continue
        if q.get("filter") is not None:
            try:
                if not cql2.Expr(q["filter"]).matches(item):
                    continue
            except Exception:
                continue
        out.append(item)
    out.sort(key=lambda it: (it["collection"], it["id"]))
    out.sort(key=_sort_dt, reverse=True)
    return [(it["collection"], it["id"]) for it in out]


def keys_of(page_items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(it["collection"], it["id"]) for it in page_items]


TRIANGLE = {"type": "Polygon", "coordinates": [[[-5, -5], [6, -4], [0, 7], [-5, -5]]]}
QUERIES: dict[str, dict[str, Any]] = {
    "everything": {},
    "bbox": {"bbox": [-2, -3, 2.5, 1]},
    "bbox-6": {"bbox": [-2, -3, -100, 2.5, 1, 100]},
    "bbox-thin": {"bbox": [0, -10, 0.5, 10]},
    "intersects-triangle": {"intersects": TRIANGLE},
    "intersects-line": {"intersects": {"type": "LineString", "coordinates": [[-9, -9], [9, 8]]}},
    "collections": {"collections": ["alpha", "gamma"]},
    "ids": {"ids": ["item-0001", "item-0002", "item-0100", "nope"]},
    "instant": {"datetime": "2020-06-01T00:00:00Z"},
    "interval": {"datetime": "2020-03-01T00:00:00Z/2020-06-01T00:00:00Z"},
    "open-start": {"datetime": "../2020-02-01T00:00:00Z"},
    "open-end": {"datetime": "2021-06-01T00:00:00Z/.."},
    "open-end-empty": {"datetime": "2021-06-01T02:00:00+02:00/"},
    "cql2-text": {"filter": "eo:cloud_cover < 10 AND platform = 'sentinel-2a'"},
    "cql2-json": {
        "filter": {
            "op": "and",
            "args": [
                {"op": "<", "args": [{"property": "eo:cloud_cover"}, 30]},
                {"op": "in", "args": [{"property": "platform"}, ["sentinel-2b", "landsat-8"]]},
            ],
        }
    },
    "cql2-s-intersects": {"filter": "S_INTERSECTS(geometry, POLYGON((-3 -3, 4 -3, 4 4, -3 -3)))"},
    "cql2-is-null": {"filter": "eo:cloud_cover IS NULL"},
    "cql2-not": {"filter": "NOT (eo:cloud_cover < 50)"},
    "cql2-datetime": {"filter": "datetime > TIMESTAMP('2021-01-01T00:00:00Z')"},
    "combined": {
        "collections": ["beta", "gamma"],
        "bbox": [-8, -8, 8, 8],
        "datetime": "2020-02-01T00:00:00Z/2021-02-01T00:00:00Z",
        "filter": "gsd <= 20 AND eo:cloud_cover > 20",
    },
    "intersects-and-filter": {"intersects": TRIANGLE, "filter": "platform = 'landsat-8'"},
    "cql2-in-numbers": {"filter": "gsd IN (10, 60) AND eo:cloud_cover >= 50"},
    "cql2-or": {"filter": "eo:cloud_cover < 5 OR platform = 'landsat-8'"},
    "cql2-id-collection": {"filter": "collection = 'beta' AND id > 'item-0150'"},
    "cql2-properties-prefix": {"filter": "properties.platform = 'sentinel-2b' AND gsd = 60"},
    "cql2-mixed-types": {"filter": "code = 'x7' AND tier < 2"},
    "cql2-top-level": {"filter": "origin = 'top' AND gsd = 20"},
}


# ---------------------------------------------------------------------------------------------
# collections and items


def test_collections_crud(store: SQLiteStore) -> None:
    assert [c["id"] for c in store.all_collections()] == list(COLLECTIONS)
    with pytest.raises(ConflictError, match="alpha"):
        store.create_collection(collection("alpha"))
    updated = collection("alpha") | {"title": "Alpha"}
    store.update_collection(updated)
    assert store.get_collection("alpha")["title"] == "Alpha"
    with pytest.raises(NotFoundError, match="delta"):
        store.update_collection(collection("delta"))
    with pytest.raises(NotFoundError, match="delta"):
        store.get_collection("delta")
    with pytest.raises(NotFoundError, match="delta"):
        store.delete_collection("delta")
    with pytest.raises(ValueError, match="id"):
        store.create_collection({"type": "Collection"})

    store.upsert_items(make_items(30))
    assert len(list(store.iter_codes("hashnet"))) == 10
    store.delete_collection("alpha")
    assert [c["id"] for c in store.all_collections()] == ["beta", "gamma"]
    assert store.count() == 20
    assert all(k[0] != "alpha" for k in store.filter_keys(SearchQuery()))
    assert all(c.key[0] != "alpha" for c in store.iter_codes("hashnet"))
    # the R*Tree rows went too
    rtree_rows = sqlite3.connect(store.path).execute("SELECT count(*) FROM items_rtree").fetchone()
    assert rtree_rows[0] == 20


def test_item_crud(store: SQLiteStore) -> None:
    item = make_items(1)[0]
    store.create_item(item)
    got = store.get_item("alpha", "item-0000")
    assert got["properties"] == item["properties"] and got["geometry"] == item["geometry"]
    with pytest.raises(ConflictError, match="item-0000"):
        store.create_item(item)
    changed = copy.deepcopy(item)
    changed["properties"]["gsd"] = 999
    store.update_item(changed)
    assert store.get_item("alpha", "item-0000")["properties"]["gsd"] == 999
    missing = copy.deepcopy(item) | {"id": "other"}
    with pytest.raises(NotFoundError, match="other"):
        store.update_item(missing)
    with pytest.raises(NotFoundError, match="delta"):
        store.create_item(copy.deepcopy(item) | {"collection": "delta"})
    with pytest.raises(NotFoundError, match="delta"):
        store.get_item("delta", "item-0000")
    with pytest.raises(NotFoundError, match="nope"):
        store.get_item("alpha", "nope")
    store.delete_item("alpha", "item-0000")
    with pytest.raises(NotFoundError):
        store.get_item("alpha", "item-0000")
    with pytest.raises(NotFoundError):
        store.delete_item("alpha", "item-0000")


def test_bbox_computed_from_geometry(store: SQLiteStore) -> None:
    item = make_items(2)[1]
    assert "bbox" not in item
    store.create_item(item)
    expected = list(shapely.geometry.shape(item["geometry"]).bounds)
    assert store.get_item(item["collection"], item["id"])["bbox"] == pytest.approx(expected)


def _broken(field: str) -> dict[str, Any]:
    item = make_items(5)[4]
    props = item["properties"]
    if field == "id":
        del item["id"]
    elif field == "collection":
        del item["collection"]
    elif field == "geometry":
        item["geometry"] = None
    elif field == "geometry-bad":
        item["geometry"] = {"type": "Polygon", "coordinates": [[1, 2]]}
    elif field == "bbox":
        item["bbox"] = [1, 2, 3]
    elif field == "properties":
        del item["properties"]
    elif field == "datetime":
        del props["datetime"]
    elif field == "datetime-format":
        props["datetime"] = "yesterday"
    elif field == "range":
        props.update(datetime=None, start_datetime="2020-02-01T00:00:00Z")
    return item


@pytest.mark.parametrize(
    ("case", "field"),
    [
        ("id", "id"),
        ("collection", "collection"),
        ("geometry", "geometry"),
        ("geometry-bad", "geometry"),
        ("bbox", "bbox"),
        ("properties", "properties"),
        ("datetime", "properties.datetime"),
        ("datetime-format", "properties.datetime"),
        ("range", "properties.datetime"),
    ],
)
def test_invalid_items_name_the_field(store: SQLiteStore, case: str, field: str) -> None:
    gen = store.generation()
    with pytest.raises(ValueError, match=f"{field}:"):
        store.create_item(_broken(case))
    with pytest.raises(ValueError, match=f"{field}:"):
        store.upsert_items([make_items(1)[0], _broken(case)])
    assert store.count() == 0 and store.generation() == gen


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda c: c.update(code="!!!"), r"cbir:codes\[0\]\.code"),
        (lambda c: c.update(bits=65), r"cbir:codes\[0\]\.bits"),
        (lambda c: c.pop("model"), r"cbir:codes\[0\]"),
        (lambda c: c["descriptor"].update(dim=9), r"cbir:codes\[0\]\.descriptor"),
    ],
)
def test_invalid_codes_are_rejected(store: SQLiteStore, mutate: Any, field: str) -> None:
    item = make_items(1)[0]
    mutate(item["properties"][CODES_PROP][0])
    with pytest.raises(ValueError, match=f"properties.{field}"):
        store.create_item(item)
    assert store.count() == 0
    assert list(store.iter_codes("hashnet")) == []


def test_one_transaction_per_write(store: SQLiteStore) -> None:
    gen = store.generation()
    store.upsert_items(make_items(50))
    assert store.generation() == gen + 1 and store.count() == 50
    # a missing collection anywhere in the batch: nothing written
    batch = [*make_items(60)[50:], make_items(1)[0] | {"collection": "delta"}]
    with pytest.raises(NotFoundError, match="delta"):
        store.upsert_items(batch)
    assert store.generation() == gen + 1 and store.count() == 50


def test_generation_grows_with_every_write(store: SQLiteStore) -> None:
    seen = [store.generation()]
    item = make_items(1)[0]
    for write in (
        lambda: store.create_item(item),
        lambda: store.update_item(item),
        lambda: store.upsert_items([item]),
        lambda: store.delete_item("alpha", item["id"]),
        lambda: store.update_collection(collection("beta")),
        lambda: store.delete_collection("beta"),
    ):
        write()
        seen.append(store.generation())
    assert seen == sorted(set(seen))
    with pytest.raises(NotFoundError):
        store.delete_item("alpha", item["id"])
    assert store.generation() == seen[-1]


def test_persistence_across_reopen(tmp_path: Path) -> None:
    items = make_items(40)
    with new_store(tmp_path) as s:
        s.upsert_items(items)
        gen = s.generation()
        before = s.search(SearchQuery(bbox=[-5, -5, 5, 5], limit=100))
        codes = list(s.iter_codes("hashnet"))
    with SQLiteStore(tmp_path / "store.db") as s:
        assert s.generation() == gen
        assert s.count() == 40
        assert s.get_item("beta", "item-0001")["properties"] == items[1]["properties"]
        assert s.search(SearchQuery(bbox=[-5, -5, 5, 5], limit=100)) == before
        assert list(s.iter_codes("hashnet")) == codes
        # the reopened connection enforces foreign keys: a collection's items and codes go
        # with it (ON DELETE CASCADE, no explicit item delete in the store)
        victim = codes[0].key[0]
        assert codes and all(c.key[0] == victim for c in codes)  # make_item: one coded collection
        s.delete_collection(victim)
        assert s.count() == sum(it["collection"] != victim for it in items)
        assert list(s.iter_codes("hashnet")) == []
    with sqlite3.connect(tmp_path / "store.db") as conn:  # WAL is a property of the file
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_closed_store_raises_store_error(tmp_path: Path) -> None:
    s = new_store(tmp_path)
    s.close()
    with pytest.raises(StoreError):
        s.all_collections()


# ---------------------------------------------------------------------------------------------
# codes


def test_codes_follow_updates_and_deletes(store: SQLiteStore) -> None:
    items = make_items(12)
    store.upsert_items(items)
    codes = list(store.iter_codes("hashnet"))
    with_codes = [it for it in items if CODES_PROP in it["properties"]]
    assert [c.key for c in codes] == [(it["collection"], it["id"]) for it in with_codes]
    first = HashCode.from_dict(with_codes[0]["properties"][CODES_PROP][0])
    assert codes[0].code == first.packed().tobytes() and len(codes[0].code) == 8
    assert first.descriptor is not None
    assert np.array_equal(
        np.frombuffer(codes[0].descriptor or b"", "<f4"), first.descriptor.array()
    )
    assert list(store.iter_codes("hashnet", "1")) == codes
    assert list(store.iter_codes("hashnet", "2")) == []
    assert list(store.iter_codes("other")) == []

    # a second model and a new version; an item loses its code
    a, b, c = (copy.deepcopy(it) for it in with_codes[:3])
    a["properties"][CODES_PROP] = [
        make_code("hashnet", "2", 100),
        make_code("dsh", "1", 101, False),
    ]
    del b["properties"][CODES_PROP]
    store.upsert_items([a, b])
    assert [x.key for x in store.iter_codes("hashnet", "1")] == [
        k
        for k in (x.key for x in codes)
        if k not in {(a["collection"], a["id"]), (b["collection"], b["id"])}
    ]
    (v2,) = store.iter_codes("hashnet", "2")
    assert v2.key == (a["collection"], a["id"])
    assert v2.code == HashCode.from_dict(a["properties"][CODES_PROP][0]).packed().tobytes()
    (dsh,) = store.iter_codes("dsh")
    assert dsh.descriptor is None
    # an item keeps its rowid (and place in the code order) when updated
    assert next(x.key for x in store.iter_codes("hashnet")) == v2.key
    store.delete_item(c["collection"], c["id"])
    assert (c["collection"], c["id"]) not in {x.key for x in store.iter_codes("hashnet")}


def test_iter_codes_pages_through_many(store: SQLiteStore, monkeypatch: pytest.MonkeyPatch) -> None:
    import stac_rscbir.store.sqlite as mod

    monkeypatch.setattr(mod, "_CODES_CHUNK", 3)
    items = make_items(30)
    store.upsert_items(items)
    keys = [c.key for c in store.iter_codes("hashnet")]
    assert keys == [(it["collection"], it["id"]) for it in items if CODES_PROP in it["properties"]]


# ---------------------------------------------------------------------------------------------
# search


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_search_matches_brute_force(
    loaded: SQLiteStore, items: list[dict[str, Any]], name: str
) -> None:
    q = QUERIES[name]
    expected = brute_force(items, q)
    page = loaded.search(SearchQuery(**q, limit=1000))
    assert keys_of(page.items) == expected
    assert page.matched == len(expected) and page.next_token is None
    assert set(loaded.filter_keys(SearchQuery(**q))) == set(expected)
    if name != "everything":
        assert 0 < len(expected) < len(items), "the query should select something, not all"


def test_bbox_and_intersects_are_exact(store: SQLiteStore) -> None:
    triangle = make_items(1)[0] | {
        "id": "triangle",
        "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [10, 0], [0, 10], [0, 0]]]},
    }
    triangle.pop("bbox", None)
    store.create_item(triangle)
    corner = [8, 8, 9, 9]  # inside the triangle's bbox, outside the triangle
    assert store.search(SearchQuery(bbox=corner)).items == []
    assert store.search(SearchQuery(bbox=[4, 4, 9, 9])).matched == 1
    polygon = shapely.geometry.mapping(shapely.box(*corner))
    assert store.search(SearchQuery(intersects=polygon)).matched == 0
    assert store.filter_keys(SearchQuery(bbox=corner)) == []
    point = {"type": "Point", "coordinates": [1, 1]}
    assert store.search(SearchQuery(intersects=point)).matched == 1


def test_items_with_ranges_match_by_overlap(store: SQLiteStore) -> None:
    base = make_items(1)[0]
    ranged = copy.deepcopy(base) | {"id": "ranged"}
    ranged["properties"].update(
        datetime=None, start_datetime="2020-03-01T00:00:00Z", end_datetime="2020-03-31T00:00:00Z"
    )
    store.create_item(ranged)

    def hit(dt: str) -> bool:
        return store.search(SearchQuery(datetime=dt)).matched == 1

    assert hit("2020-03-15T12:00:00Z")
    assert hit("2020-03-01T00:00:00Z") and hit("2020-03-31T00:00:00Z")
    assert not hit("2020-04-01T00:00:00Z")
    assert hit("2020-02-01T00:00:00Z/2020-03-02T00:00:00Z")
    assert hit("2020-03-30T00:00:00Z/..") and not hit("2020-04-30T00:00:00Z/..")
    assert hit("../2020-03-01T00:00:00Z") and not hit("../2020-02-28T00:00:00Z")
    assert not hit("2020-03-01T01:00:00+02:00")  # 2020-02-29T23:00Z: before the start
    assert hit("2020-03-01T03:00:00+02:00")
    assert not hit("2020-03-01T01:00:00+02:00/2020-03-01T01:59:00+02:00")


@pytest.mark.parametrize(
    ("sortby", "key", "reverse"),
    [
        ([{"field": "id", "direction": "asc"}], lambda it: it["id"], False),
        ([{"field": "id", "direction": "desc"}], lambda it: it["id"], True),
        ([{"field": "datetime", "direction": "asc"}], _sort_dt, False),
        ([{"field": "properties.datetime", "direction": "asc"}], _sort_dt, False),
        (
            [{"field": "properties.gsd", "direction": "desc"}],
            lambda it: it["properties"]["gsd"],
            True,
        ),
        ([{"field": "gsd", "direction": "asc"}], lambda it: it["properties"]["gsd"], False),
    ],
)
def test_sortby(
    loaded: SQLiteStore, items: list[dict[str, Any]], sortby: Any, key: Any, reverse: bool
) -> None:
    page = loaded.search(SearchQuery(sortby=sortby, limit=1000))
    expected = sorted(items, key=lambda it: (it["collection"], it["id"]))
    expected.sort(key=key, reverse=reverse)
    assert keys_of(page.items) == keys_of(expected)


def test_sortby_cloud_cover_puts_missing_last(
    loaded: SQLiteStore, items: list[dict[str, Any]]
) -> None:
    for direction in ("asc", "desc"):
        q = SearchQuery(
            sortby=[{"field": "properties.eo:cloud_cover", "direction": direction}], limit=1000
        )
        got = loaded.search(q).items
        values = [it["properties"].get("eo:cloud_cover") for it in got]
        present = [v for v in values if v is not None]
        assert values == present + [None] * (len(values) - len(present))
        assert present == sorted(present, reverse=direction == "desc")
        assert len(present) == sum("eo:cloud_cover" in it["properties"] for it in items)


def test_sortby_collection_then_datetime(loaded: SQLiteStore, items: list[dict[str, Any]]) -> None:
    q = SearchQuery(
        sortby=[
            {"field": "collection", "direction": "desc"},
            {"field": "datetime", "direction": "desc"},
        ],
        bbox=[-5, -5, 5, 5],
        limit=1000,
    )
    expected_keys = set(brute_force(items, {"bbox": [-5, -5, 5, 5]}))
    expected = sorted(
        (it for it in items if (it["collection"], it["id"]) in expected_keys),
        key=lambda it: it["id"],
    )
    expected.sort(key=_sort_dt, reverse=True)
    expected.sort(key=lambda it: it["collection"], reverse=True)
    assert keys_of(loaded.search(q).items) == keys_of(expected)


@pytest.mark.parametrize("name", ["everything", "bbox", "cql2-text", "combined", "open-end"])
def test_paging_covers_every_match_once(
    loaded: SQLiteStore, items: list[dict[str, Any]], name: str
) -> None:
    q = QUERIES[name]
    expected = brute_force(items, q)
    seen: list[tuple[str, str]] = []
    token = None
    pages = 0
    while True:
        page = loaded.search(SearchQuery(**q, limit=7, token=token))
        assert page.matched == len(expected)
        assert len(page.items) <= 7
        seen.extend(keys_of(page.items))
        pages += 1
        token = page.next_token
        if token is None:
            break
        assert pages < 100
    assert seen == expected
    assert pages == max(1, -(-len(expected) // 7))


def test_tokens_are_tied_to_their_query(loaded: SQLiteStore) -> None:
    first = loaded.search(SearchQuery(bbox=[-5, -5, 5, 5], limit=3))
    assert first.next_token
    # the same query with another limit may go on
    loaded.search(SearchQuery(bbox=[-5, -5, 5, 5], limit=10, token=first.next_token))
    for other in (
        SearchQuery(bbox=[-5, -5, 5, 6], limit=3, token=first.next_token),
        SearchQuery(limit=3, token=first.next_token),
        SearchQuery(
            bbox=[-5, -5, 5, 5],
            sortby=[{"field": "id", "direction": "asc"}],
            token=first.next_token,
        ),
    ):
        with pytest.raises(InvalidQueryError, match="another query"):
            loaded.search(other)
    for garbage in ("!!!", "e30", "bm90IGpzb24"):
        with pytest.raises(InvalidQueryError, match="token"):
            loaded.search(SearchQuery(token=garbage))


@pytest.mark.parametrize("name", ["bbox", "cql2-json", "combined", "ids", "interval"])
def test_filter_keys(loaded: SQLiteStore, items: list[dict[str, Any]], name: str) -> None:
    q = QUERIES[name]
    expected = set(brute_force(items, q))
    every = loaded.filter_keys(SearchQuery(**q, limit=1, sortby=[{"field": "id"}]))
    assert set(every) == expected and len(every) == len(expected)
    rng = random.Random(3)
    candidates = [(it["collection"], it["id"]) for it in items]
    rng.shuffle(candidates)
    candidates = [*candidates[:150], ("alpha", "missing"), ("nowhere", "item-0001")]
    subset = loaded.filter_keys(SearchQuery(**q), candidates)
    assert subset == [k for k in candidates if k in expected]
    assert loaded.filter_keys(SearchQuery(**q), []) == []


def test_get_items_in_key_order(loaded: SQLiteStore) -> None:
    keys = [
        ("gamma", "item-0002"),
        ("alpha", "missing"),
        ("alpha", "item-0000"),
        ("beta", "item-0004"),
    ]
    got = loaded.get_items(keys)
    assert keys_of(got) == [("gamma", "item-0002"), ("alpha", "item-0000"), ("beta", "item-0004")]
    assert loaded.get_items([]) == []


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (SearchQuery(bbox=[1, 2, 3]), "bbox: expected 4 or 6 numbers"),
        (SearchQuery(bbox=[0, 5, 1, 4]), "south 5 > north 4"),
        (SearchQuery(bbox=[5, 0, 4, 1]), "west 5 > east 4"),
        (SearchQuery(bbox=[0, 0, "a", 1]), "not a finite number"),  # type: ignore[list-item]
        (SearchQuery(intersects={"type": "Polygon"}), "intersects"),
        (SearchQuery(datetime="2020-13-01T00:00:00Z"), "not an RFC 3339"),
        (SearchQuery(datetime="yesterday"), "not an RFC 3339"),
        (SearchQuery(datetime="2020-01-01"), "not an RFC 3339"),
        (SearchQuery(datetime="2021-01-01T00:00:00Z/2020-01-01T00:00:00Z"), "starts after"),
        (SearchQuery(datetime="a/b/c"), "datetime"),
        (SearchQuery(sortby=[{"field": "geometry"}]), "unknown sortby field 'geometry'"),
        (SearchQuery(sortby=[{"field": "id", "direction": "up"}]), "direction"),
        (SearchQuery(filter="eo:cloud_cover <"), "invalid CQL2"),
        (SearchQuery(filter={"op": "=", "args": [{"property": "id"}]}), "invalid CQL2"),
        (SearchQuery(limit=-1), "limit"),
    ],
)
def test_invalid_queries(loaded: SQLiteStore, query: SearchQuery, message: str) -> None:
    with pytest.raises(InvalidQueryError, match=message):
        loaded.search(query)


def test_cql2_parse_error_carries_the_parser_message(loaded: SQLiteStore) -> None:
    with pytest.raises(InvalidQueryError) as info:
        loaded.search(SearchQuery(filter="platform = = 'x'"))
    message = str(info.value)  # cql2's own: the line:column of the fault, what it expected
    assert "1:12" in message and "expected" in message, message


def test_limit_zero_counts_only(loaded: SQLiteStore) -> None:
    page = loaded.search(SearchQuery(limit=0, filter="gsd = 10"))
    assert page.items == [] and page.next_token is None and page.matched and page.matched > 0


# ---------------------------------------------------------------------------------------------
# threads


def test_concurrent_readers_and_a_writer(tmp_path: Path) -> None:
    """Four reader threads search while two writer threads upsert the same batches of new
    items, in the same order, so the store always holds a prefix of ``items``: no errors; every
    answer is exactly the brute-force answer over some prefix (a transaction is seen whole or
    not at all); a reader's successive answers, and the generations it reads, never go back; a
    search begun after the last write sees every item. Before each write the writer waits until
    every reader has finished a search begun after its previous write, so the readers see every
    state between writes under any scheduling. (Store timings: benchmarks/concurrency_bench.py.)
    """
    s = new_store(tmp_path)
    items = make_items(120)
    s.upsert_items(items[:60])
    g0 = s.generation()
    where: dict[str, Any] = {"bbox": [-6, -6, 6, 6], "filter": "eo:cloud_cover < 70"}
    q = SearchQuery(**where, limit=1000)
    starts = range(60, 120, 5)  # the batches items[i : i + 5]
    answers = [tuple(brute_force(items[:end], where)) for end in [60, *(i + 5 for i in starts)]]
    assert len(set(answers)) > len(answers) // 2  # most writes change the answer
    # an answer -> its prefix (the last of equal ones: answers only grow, so ranks keep order)
    rank = {answer: j for j, answer in enumerate(answers)}
    n_readers = 4
    ranks: list[list[int]] = [[] for _ in range(n_readers)]
    generations: list[list[int]] = [[] for _ in range(n_readers)]
    reads = [0] * n_readers  # searches finished, per reader
    progress = threading.Condition()
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(r: int) -> None:
        try:
            while True:
                last = stop.is_set()  # set after every write: this search must see them all
                page = s.search(q)
                keys = keys_of(page.items)
                assert page.matched == len(keys)
                assert tuple(keys) in rank, "an answer over no prefix of the writes"
                ranks[r].append(rank[tuple(keys)])
                assert keys_of(s.get_items(keys)) == keys  # nothing is ever removed
                generations[r].append(s.generation())
                with progress:
                    reads[r] += 1
                    progress.notify_all()
                if last:
                    return
        except BaseException as exc:
            errors.append(exc)
            with progress:
                progress.notify_all()

    def readers_catch_up() -> None:
        """Until every reader has finished a search begun after this call."""
        with progress:
            # the search under way now may have begun before; the one after it begins after
            target = [n + 2 for n in reads]
            ok = progress.wait_for(
                lambda: errors or all(n >= t for n, t in zip(reads, target, strict=True)), 120
            )
        assert ok, "the readers stopped reading"

    def writer() -> None:
        try:
            for i in starts:
                readers_catch_up()  # every reader sees the state before this write
                s.upsert_items(items[i : i + 5])
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader, args=(r,)) for r in range(n_readers)]
    writers = [threading.Thread(target=writer), threading.Thread(target=writer)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors
    final = len(answers) - 1
    for r in range(n_readers):
        assert ranks[r] == sorted(ranks[r]), f"reader {r} went back: {ranks[r]}"
        assert generations[r] == sorted(generations[r]), f"reader {r}: {generations[r]}"
        assert ranks[r][-1] == final  # its last search began after every write
    assert set().union(*map(set, ranks)) == set(rank.values())  # every state between writes seen
    assert keys_of(s.search(q).items) == list(answers[-1]) == brute_force(items, where)
    assert s.generation() == g0 + len(writers) * len(starts)  # one transaction per upsert
    s.close()


def test_filter_prefilter_translates_simple_conjunctions() -> None:
    from stac_rscbir.store.sqlite import _filter_prefilter

    simple = cql2.Expr("eo:cloud_cover < 10 AND platform = 'sentinel-2a' AND gsd IN (10, 20)")
    assert len(_filter_prefilter(simple)) == 3
    assert _filter_prefilter(cql2.Expr("eo:cloud_cover < 10 OR platform = 'x'")) == []
    assert _filter_prefilter(cql2.Expr("NOT (gsd = 10)")) == []


def test_duplicates_in_one_upsert_last_wins(store: SQLiteStore) -> None:
    first, second = make_items(1)[0], make_items(1)[0]
    second["properties"]["gsd"] = 12345
    second["properties"][CODES_PROP] = [make_code("hashnet", "1", 999)]
    store.upsert_items([first, second])
    assert store.count() == 1
    assert store.get_item("alpha", "item-0000")["properties"]["gsd"] == 12345
    (code,) = store.iter_codes("hashnet")
    expected = HashCode.from_dict(second["properties"][CODES_PROP][0]).packed().tobytes()
    assert code.code == expected


def test_a_recreated_store_never_repeats_an_old_generation(tmp_path: Path) -> None:
    """An index saved for a deleted store must not look current to a new one at the same path."""
    path = tmp_path / "again.db"
    first = SQLiteStore(path)
    old = first.generation()
    first.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    second = SQLiteStore(path)
    assert second.generation() > old
    second.close()
