"""The pgstac store on a real PostgreSQL 15 + PostGIS cluster (a fresh database per test):
errors, searches against the SQLite store and shapely on the same items, paging, the keys of
the similarity layer, codes, and the generation counter under API writes and bulk loads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from shapely.geometry import box, mapping, shape

from stac_rscbir.api.app import create_api
from stac_rscbir.extension.cbir import HashCode
from stac_rscbir.store.base import (
    ConflictError,
    InvalidQueryError,
    NotFoundError,
    SearchQuery,
)
from stac_rscbir.store.pgstac import PgstacStore
from stac_rscbir.store.sqlite import SQLiteStore

from .api_builders import MODEL, _bits, _collection
from .pgcluster import pypgstac_load

T0 = datetime(2021, 1, 1, tzinfo=UTC)
N = 100


def _iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def _item(i: int, collection: str = "scenes", version: str = "1.0.0") -> dict[str, Any]:
    """Items spread over a 2x2 degree square and a year; every 7th one has a time range."""
    rng = np.random.default_rng(i)
    x, y = 10 + rng.uniform(0, 2), 45 + rng.uniform(0, 2)
    w, h = rng.uniform(0.01, 0.3, size=2)
    t = T0 + timedelta(hours=int(rng.integers(0, 365 * 24)))
    props: dict[str, Any] = {
        "datetime": _iso(t),
        "platform": ["sentinel-2a", "sentinel-2b", "sentinel-1a"][i % 3],
        "eo:cloud_cover": float(rng.integers(0, 100)),
        "cbir:codes": [HashCode.from_bits(MODEL, version, _bits(i)).to_dict()],
    }
    if i % 7 == 0:
        props.update(
            datetime=None, start_datetime=_iso(t), end_datetime=_iso(t + timedelta(days=20))
        )
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "id": f"item-{i:03d}",
        "collection": collection,
        "geometry": mapping(box(x, y, x + w, y + h)),
        "bbox": [x, y, x + w, y + h],
        "properties": props,
        "links": [],
        "assets": {},
    }


@pytest.fixture
def store(pgstac_db: str) -> Iterator[PgstacStore]:
    with PgstacStore(pgstac_db) as s:
        yield s


@pytest.fixture
def loaded(store: PgstacStore, tmp_path: Path) -> tuple[PgstacStore, SQLiteStore]:
    """The pgstac store and a SQLite store holding the same N items (the oracle)."""
    oracle = SQLiteStore(tmp_path / "oracle.db")
    items = [_item(i) for i in range(N)]
    for s in (store, oracle):
        s.create_collection(_collection())
        s.upsert_items(items)
    return store, oracle


def test_crud_and_errors(store: PgstacStore) -> None:
    with pytest.raises(NotFoundError, match="collection 'scenes' not found"):
        store.get_collection("scenes")
    with pytest.raises(NotFoundError, match="collection 'scenes'"):
        store.create_item(_item(1))
    store.create_collection(_collection())
    with pytest.raises(ConflictError, match="already exists"):
        store.create_collection(_collection())
    store.create_item(_item(1))
    with pytest.raises(ConflictError, match="item 'item-001' already exists"):
        store.create_item(_item(1))
    assert store.get_item("scenes", "item-001")["properties"]["platform"] == "sentinel-2b"
    with pytest.raises(NotFoundError, match="item 'item-002' not found"):
        store.get_item("scenes", "item-002")
    with pytest.raises(NotFoundError, match="collection 'other' not found"):
        store.get_item("other", "item-001")
    with pytest.raises(NotFoundError):
        store.update_item(_item(2))
    with pytest.raises(NotFoundError):
        store.delete_item("scenes", "item-002")
    changed = _item(1)
    changed["properties"]["platform"] = "landsat-8"
    store.update_item(changed)
    assert store.get_item("scenes", "item-001")["properties"]["platform"] == "landsat-8"
    # invalid codes: refused with the field named, nothing written
    bad = _item(3)
    bad["properties"]["cbir:codes"][0]["code"] = "not base64!"
    generation = store.generation()
    with pytest.raises(ValueError, match=r"item 'item-003'.*cbir:codes\[0\]"):
        store.upsert_items([_item(4), bad])
    assert store.generation() == generation and store.count() == 1
    # the last of two copies wins
    first, last = _item(5), _item(5)
    last["properties"]["platform"] = "last"
    store.upsert_items([first, last])
    assert store.get_item("scenes", "item-005")["properties"]["platform"] == "last"
    coll = {**_collection(), "description": "changed"}
    store.update_collection(coll)
    assert store.get_collection("scenes")["description"] == "changed"
    assert [c["id"] for c in store.all_collections()] == ["scenes"]
    with pytest.raises(NotFoundError):
        store.update_collection({**_collection("nope")})
    store.delete_item("scenes", "item-001")
    store.delete_collection("scenes")
    assert store.count() == 0 and store.all_collections() == []
    with pytest.raises(NotFoundError):
        store.delete_collection("scenes")


def _queries() -> list[SearchQuery]:
    rng = np.random.default_rng(0)
    out = [
        SearchQuery(),
        SearchQuery(ids=["item-003", "item-010", "nope"]),
        SearchQuery(collections=["scenes"], datetime="2021-03-01T00:00:00Z/.."),
        SearchQuery(datetime="../2021-02-01T00:00:00Z"),
        SearchQuery(datetime="2021-05-10T12:00:00Z"),
        SearchQuery(filter="platform = 'sentinel-1a' AND \"eo:cloud_cover\" < 50"),
        SearchQuery(
            filter={
                "op": "or",
                "args": [
                    {"op": "=", "args": [{"property": "platform"}, "sentinel-2a"]},
                    {"op": ">=", "args": [{"property": "eo:cloud_cover"}, 90]},
                ],
            }
        ),
        SearchQuery(
            intersects=mapping(box(10.5, 45.5, 11.0, 46.5)),
            filter={"op": "in", "args": [{"property": "platform"}, ["sentinel-2b"]]},
        ),
    ]
    for _ in range(12):
        x, y = rng.uniform(10, 11.5), rng.uniform(45, 46.5)
        start = T0 + timedelta(days=int(rng.integers(0, 300)))
        end = start + timedelta(days=int(rng.integers(1, 120)))
        out.append(
            SearchQuery(
                bbox=[x, y, x + rng.uniform(0.1, 1), y + rng.uniform(0.1, 1)],
                datetime=f"{_iso(start)}/{_iso(end)}",
                filter=f'"eo:cloud_cover" <= {int(rng.integers(10, 100))}',
            )
        )
    return out


def test_search_and_filter_keys_match_the_sqlite_store(
    loaded: tuple[PgstacStore, SQLiteStore],
) -> None:
    store, oracle = loaded
    for query in _queries():
        expected = set(oracle.filter_keys(query))
        assert set(store.filter_keys(query)) == expected, query
        page = store.search(SearchQuery(**{**query.__dict__, "limit": 1000}))
        assert {(i["collection"], i["id"]) for i in page.items} == expected, query
        assert page.matched == len(expected) and page.next_token is None
    # and against shapely for the boxes
    bbox = [10.2, 45.3, 10.9, 46.1]
    truth = {
        ("scenes", it["id"])
        for it in (_item(i) for i in range(N))
        if shape(it["geometry"]).intersects(box(*bbox))
    }
    assert truth and set(store.filter_keys(SearchQuery(bbox=bbox))) == truth


def test_paging_and_sorting(loaded: tuple[PgstacStore, SQLiteStore], pgstac_db: str) -> None:
    store, oracle = loaded
    # pgstac sorts a property it has no queryable for as text: register it as a number
    with psycopg.connect(pgstac_db) as conn:
        conn.execute("SET search_path TO pgstac, public")
        conn.execute(
            "INSERT INTO pgstac.queryables (name, definition, property_wrapper) "
            """VALUES ('eo:cloud_cover', '{"type": "number"}', 'to_float')"""
        )
    query = SearchQuery(
        filter='"eo:cloud_cover" < 70',
        sortby=[{"field": "properties.eo:cloud_cover", "direction": "asc"}],
        limit=7,
    )
    seen: list[dict[str, Any]] = []
    page = store.search(query)
    while True:
        seen += page.items
        assert page.matched == len(oracle.filter_keys(query))
        if page.next_token is None:
            break
        page = store.search(SearchQuery(**{**query.__dict__, "token": page.next_token}))
    ids = [i["id"] for i in seen]
    assert len(ids) == len(set(ids)) == page.matched
    assert {("scenes", i) for i in ids} == set(oracle.filter_keys(query))  # the right items
    clouds = [i["properties"]["eo:cloud_cover"] for i in seen]
    assert clouds == sorted(clouds)
    assert store.search(SearchQuery(limit=0)).items == []
    for bad in (
        SearchQuery(token="next:zz:zz"),
        SearchQuery(filter="eo:cloud_cover <<< 3"),
        SearchQuery(bbox=[11, 45, 10, 46]),
        SearchQuery(datetime="yesterday"),
        SearchQuery(limit=-1),
    ):
        with pytest.raises(InvalidQueryError):
            store.search(bad)


def test_filter_keys_restricted_and_no_search_cache_growth(
    loaded: tuple[PgstacStore, SQLiteStore], pgstac_db: str
) -> None:
    store, _ = loaded
    keys = [("scenes", "item-009"), ("scenes", "item-001"), ("other", "x"), ("scenes", "item-009")]
    assert store.filter_keys(SearchQuery(), keys) == [keys[0], keys[1], keys[3]]
    s2a = SearchQuery(filter={"op": "=", "args": [{"property": "platform"}, "sentinel-2a"]})
    assert store.filter_keys(s2a, keys) == [keys[0], keys[3]]  # 9 % 3 == 0, 1 % 3 != 0
    assert store.filter_keys(s2a, []) == []
    assert store.get_items([keys[1], ("other", "x"), keys[0]])[0]["id"] == "item-001"
    with psycopg.connect(pgstac_db) as conn:
        before = conn.execute(
            "SELECT (SELECT count(*) FROM pgstac.searches), "
            "(SELECT count(*) FROM pgstac.search_wheres)"
        ).fetchone()
    for i in range(5):
        store.filter_keys(SearchQuery(ids=[f"item-{i:03d}"]), keys)
        store.search(SearchQuery(ids=[f"item-{i:03d}", "item-050"]))
    with psycopg.connect(pgstac_db) as conn:
        after = conn.execute(
            "SELECT (SELECT count(*) FROM pgstac.searches), "
            "(SELECT count(*) FROM pgstac.search_wheres)"
        ).fetchone()
    assert after == before


def test_iter_codes(store: PgstacStore) -> None:
    store.create_collection(_collection())
    items = [_item(i) for i in range(10)]
    items[3]["properties"]["cbir:codes"].append(
        HashCode.from_bits(MODEL, "2.0.0", 1 - _bits(3)).to_dict()
    )
    del items[4]["properties"]["cbir:codes"]
    store.upsert_items(items)
    codes = list(store.iter_codes(MODEL))  # one per item: of two versions, the one listed last
    assert [c.key[1] for c in codes] == [f"item-{i:03d}" for i in (0, 1, 2, 3, 5, 6, 7, 8, 9)]
    assert codes[0].code == np.packbits(_bits(0)).tobytes() and codes[0].descriptor is None
    assert codes[3].code == np.packbits(1 - _bits(3)).tobytes()
    v2 = list(store.iter_codes(MODEL, "2.0.0"))
    assert [c.key for c in v2] == [("scenes", "item-003")]
    assert v2[0].code == np.packbits(1 - _bits(3)).tobytes()
    assert list(store.iter_codes("other-model")) == []


def test_generation_grows_with_api_writes_and_bulk_loads(
    store: PgstacStore, pgstac_db: str, tmp_path: Path
) -> None:
    g = store.generation()
    api = create_api(PgstacStore(pgstac_db), tmp_path / "index", {})
    with TestClient(api.app) as client:
        assert client.post("/collections", json=_collection()).status_code in (200, 201)
        assert store.generation() == g + 1
        steps = [
            lambda: client.post("/collections/scenes/items", json=_item(1)),
            lambda: client.put("/collections/scenes/items/item-001", json=_item(1)),
            lambda: client.post(
                "/collections/scenes/items",
                json={"type": "FeatureCollection", "features": [_item(2), _item(3)]},
            ),
            lambda: client.delete("/collections/scenes/items/item-002"),
        ]
        for step in steps:
            before = store.generation()
            assert step().status_code in (200, 201, 204)
            assert store.generation() == before + 1  # one transaction, one step
        search = {"similarity": {"model": MODEL, "code": _code(7), "k": 1}}
        assert client.post("/search", json=search).json()["features"][0]["id"] != "item-007"
        # behind the API's back: pypgstac load writes straight into the partitions
        before = store.generation()
        ndjson = tmp_path / "items.ndjson"
        ndjson.write_text("\n".join(json.dumps(_item(i)) for i in range(5, 9)) + "\n")
        pypgstac_load(pgstac_db, "items", ndjson, "insert")
        assert store.generation() > before and store.count() == 6  # items 1, 3, 5-8
        page = client.post("/search", json=search).json()  # the index was rebuilt
        assert page["features"][0]["id"] == "item-007"
        assert page["features"][0]["properties"]["cbir:distance"] == 0
        before = store.generation()
        moved = _item(7)
        moved["properties"]["cbir:codes"] = [
            HashCode.from_bits(MODEL, "1.0.0", _bits(70)).to_dict()
        ]
        ndjson.write_text(json.dumps(moved) + "\n")
        pypgstac_load(pgstac_db, "items", ndjson, "upsert")
        assert store.generation() > before
        page = client.post("/search", json=search).json()
        assert page["features"][0]["id"] != "item-007"
        before = store.generation()
        with psycopg.connect(pgstac_db) as conn:
            conn.execute("SELECT pgstac.delete_collection('scenes')")
        assert store.generation() > before and store.count() == 0


def _code(i: int) -> str:
    return HashCode.from_bits(MODEL, "1.0.0", _bits(i)).code


def test_serve_takes_exactly_one_store(
    pgstac_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn
    from typer.testing import CliRunner

    from stac_rscbir.cli import app

    served: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda api, **kw: served.append(api))
    runner = CliRunner()
    db = str(tmp_path / "s.db")
    for args in ([], ["--db", db, "--dsn", pgstac_db], ["--dsn", pgstac_db]):
        result = runner.invoke(app, ["serve", *args])
        assert result.exit_code == 2 and not served, result.output
    bad = "postgresql://postgres@127.0.0.1:1/nope"
    result = runner.invoke(app, ["serve", "--dsn", bad, "--index-dir", str(tmp_path)])
    assert result.exit_code == 1 and "cannot connect" in result.output
    index = str(tmp_path / "index")
    result = runner.invoke(app, ["serve", "--dsn", pgstac_db, "--index-dir", index])
    assert result.exit_code == 0, result.output
    with TestClient(served[0]) as client:
        assert client.get("/collections").json()["collections"] == []


def test_an_item_of_a_datetime_range_keeps_its_null_datetime(store: PgstacStore) -> None:
    """pgstac strips JSON nulls on write; STAC requires ``datetime`` (null for a range)."""
    store.create_collection(_collection())
    item = _item(1)
    props = item["properties"]
    props["start_datetime"], props["end_datetime"] = props["datetime"], props["datetime"]
    props["datetime"] = None
    store.create_item(item)
    assert store.get_item("scenes", item["id"])["properties"]["datetime"] is None
    assert store.get_items([("scenes", item["id"])])[0]["properties"]["datetime"] is None
    (found,) = store.search(SearchQuery(ids=[item["id"]])).items
    assert found["properties"]["datetime"] is None
