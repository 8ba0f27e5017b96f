"""Writes are checked against the model they name (issue 15, part A), on both stores.

Through the API (POST item, PUT item, POST FeatureCollection) a code entry of an undeclared
model, of an undeclared version, or in another format than its model's declaration is a 400
naming the field, and nothing is stored. Behind the API's back (the store's own writes, as the
ingestion's StoreSink does, ``pypgstac load`` on pgstac, direct SQL on SQLite) such codes are
stored but left out of the model's hash index. Either way, no later search fails.
"""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pystac
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stac_rscbir.api.app import create_api
from stac_rscbir.extension.cbir import CBIRModel, Descriptor, HashCode
from stac_rscbir.ingest.sinks import StoreSink
from stac_rscbir.store.base import ItemStore
from stac_rscbir.store.items import InvalidItemError

from .api_builders import MODEL, _bits, _collection, _item
from .conftest import fresh_pgstac_db

VERSION = "1.0.0"  # the version and format _collection() declares for MODEL: 64 bits, big, base64
N = 12
FAR = [-170.0, -80.0, -169.0, -79.0]  # no item near
# the fields a code entry can get wrong, in the order the check reports them
FAULTS = ("model", "model_version", "bits", "bit_order", "encoding", "descriptor.dim")
EXAMPLES = settings(
    max_examples=25,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_ids = itertools.count()


class Api(NamedTuple):
    kind: str  # "sqlite" or "pgstac"
    store: ItemStore
    client: TestClient
    where: str  # the SQLite file or the pgstac DSN


@pytest.fixture(scope="module", params=["sqlite", "pgstac"])
def api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A server over a store holding ``scenes`` (declaring MODEL) and N coded items; one per
    module and store kind."""
    tmp = tmp_path_factory.mktemp(f"writes-{request.param}")
    with _store(request, tmp) as (store, where):
        store.create_collection(_collection())
        store.upsert_items([_item(i) for i in range(N)])
        with TestClient(create_api(store, tmp / "index").app) as client:
            yield Api(request.param, store, client, where)
        store.close()  # type: ignore[attr-defined]


@contextmanager
def _store(request: pytest.FixtureRequest, tmp: Path) -> Iterator[tuple[ItemStore, str]]:
    """The store of ``api`` and where it lives: a SQLite file, or a fresh pgstac database."""
    if request.param == "sqlite":
        from stac_rscbir.store.sqlite import SQLiteStore

        path = str(tmp / "stac.db")
        yield SQLiteStore(path), path
        return
    from stac_rscbir.store.pgstac import PgstacStore

    request.getfixturevalue("pgstac_template")  # the database copied below
    with fresh_pgstac_db(request.getfixturevalue("pgstac_dsn")) as dsn:
        yield PgstacStore(dsn), dsn


@st.composite
def entries(draw: st.DrawFn) -> tuple[dict[str, Any], str | None]:
    """A code entry of MODEL's declared format with some fields wrong, and the first wrong
    field (None: a valid entry)."""
    faults = draw(st.sets(st.sampled_from(FAULTS), max_size=2))
    bits = draw(st.sampled_from([32, 128])) if "bits" in faults else 64
    values = np.unpackbits(
        np.frombuffer(draw(st.binary(min_size=bits // 8, max_size=bits // 8)), np.uint8)
    )
    dim = 16 if "descriptor.dim" in faults else draw(st.sampled_from([None, 64]))
    desc = None if dim is None else Descriptor.create(np.linspace(-1, 1, dim, dtype=np.float32))
    code = HashCode.from_bits(
        "nobody-declares" if "model" in faults else MODEL,
        "0.9.0" if "model_version" in faults else VERSION,
        values,
        bit_order="little" if "bit_order" in faults else "big",
        encoding="hex" if "encoding" in faults else "base64",
        descriptor=desc,
    )
    return code.to_dict(), next((f for f in FAULTS if f in faults), None)


def _coded(entry: dict[str, Any], item_id: str | None = None) -> dict[str, Any]:
    item = _item(next(_ids) % N)
    item["id"] = item_id or f"w-{next(_ids)}"
    item["properties"]["cbir:codes"] = [entry]
    return item


def _search(client: TestClient, **body: Any) -> list[str]:
    """The ids a similarity search on MODEL ranks (asserting a 200)."""
    query = {"model": MODEL, "code": HashCode.from_bits(MODEL, VERSION, _bits(0)).code, "k": 500}
    r = client.post("/search", json={"similarity": query, "limit": 500, **body})
    assert r.status_code == 200, r.text
    return [f["id"] for f in r.json()["features"]]


def _searches_work(client: TestClient) -> list[str]:
    """Search far away (nothing) and over the whole store; the ranked ids of the latter."""
    assert _search(client, bbox=FAR) == []
    return _search(client)


def _refused(r: Any, item_id: str, fault: str) -> None:
    assert r.status_code == 400, r.text
    assert f"item {item_id!r}: properties.cbir:codes[0].{fault}:" in r.text


@given(case=entries(), path=st.sampled_from(["post", "put", "feature-collection"]))
@EXAMPLES
def test_api_writes_are_checked_against_the_model(
    api: Api, case: tuple[dict[str, Any], str | None], path: str
) -> None:
    entry, fault = case
    client, items = api.client, "/collections/scenes/items"
    item = _coded(entry)
    if path == "post":
        r = client.post(items, json=item)
    elif path == "put":
        before = _coded(HashCode.from_bits(MODEL, VERSION, _bits(3)).to_dict(), item["id"])
        assert client.post(items, json=before).status_code == 201
        r = client.put(f"{items}/{item['id']}", json=item)
    else:
        good = _coded(HashCode.from_bits(MODEL, VERSION, _bits(5)).to_dict())
        r = client.post(items, json={"type": "FeatureCollection", "features": [good, item]})
    ranked = _searches_work(client)
    stored = client.get(f"{items}/{item['id']}")
    if fault is None:
        assert r.status_code in (200, 201, 204), r.text
        assert stored.json()["properties"]["cbir:codes"] == [entry]
        assert item["id"] in ranked
        return
    _refused(r, item["id"], fault)
    if path == "put":  # the item is as it was
        assert stored.json()["properties"]["cbir:codes"] == before["properties"]["cbir:codes"]
    else:
        assert stored.status_code == 404
    if path == "feature-collection":  # all or nothing
        assert client.get(f"{items}/{good['id']}").status_code == 404


def _behind_the_back(api: Api, item: dict[str, Any]) -> None:
    """Write ``item`` without the API: ``pypgstac load`` on pgstac, direct SQL on SQLite."""
    if api.kind == "pgstac":
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader, Methods

        with PgstacDB(api.where) as db:
            Loader(db).load_items(iter([item]), insert_mode=Methods.upsert)
        return
    # what an older version of this program, or any SQLite client, may have written
    code = HashCode.from_dict(item["properties"]["cbir:codes"][0])
    with sqlite3.connect(api.where) as conn:
        (rowid,) = conn.execute(
            "INSERT INTO items (collection, id, dt, start_dt, end_dt, geom, content) "
            "SELECT collection, ?, dt, start_dt, end_dt, geom, ? FROM items WHERE id = 'item-000' "
            "RETURNING rowid",
            (item["id"], json.dumps(item)),
        ).fetchone()
        conn.execute(
            "INSERT INTO items_rtree SELECT ?, minx, maxx, miny, maxy FROM items_rtree "
            "WHERE id = (SELECT rowid FROM items WHERE id = 'item-000')",
            (rowid,),
        )
        desc = code.descriptor.array().astype("<f4").tobytes() if code.descriptor else None
        conn.execute(
            "INSERT INTO codes VALUES (?, ?, ?, ?, ?)",
            (rowid, code.model, code.model_version, code.packed().tobytes(), desc),
        )
        conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")


@given(case=entries(), path=st.sampled_from(["sink", "raw"]))
@EXAMPLES
def test_writes_behind_the_api_never_break_search(
    api: Api, case: tuple[dict[str, Any], str | None], path: str
) -> None:
    """The ingestion's StoreSink (the store's own writes) and raw loads take any well-formed
    code; the index serves only the declared version and bit length."""
    entry, fault = case
    item = _coded(entry)
    if path == "sink":
        StoreSink(api.store).write(pystac.Item.from_dict(item), [])
    else:
        _behind_the_back(api, item)
    ranked = _searches_work(api.client)
    assert (item["id"] in ranked) == (fault not in ("model", "model_version", "bits"))


def test_the_issue_case_a_32_bit_code_under_a_64_bit_model(api: Api) -> None:
    """The report: one 32-bit item made every search on the model a 400."""
    client = api.client
    item = _coded(HashCode.from_bits(MODEL, VERSION, np.zeros(32, np.uint8)).to_dict())
    r = client.post("/collections/scenes/items", json=item)
    _refused(r, item["id"], "bits")
    assert "32 differs from model test-64@1.0.0 (64)" in r.text
    api.store.upsert_items([item])  # as ingestion into the store, or an older server, would
    assert item["id"] not in _searches_work(client)
    query = {"model": MODEL, "item": {"collection": "scenes", "id": item["id"]}}
    r = client.post("/search", json={"similarity": query})
    assert r.status_code == 400 and "no code of model 'test-64' version '1.0.0' with 64" in r.text


def test_model_items_linked_with_rel_cbir_model_declare_models(api: Api) -> None:
    client = api.client
    model = CBIRModel.create("linked-32", "2", 32, ["red"])
    coll = {**_collection("plain"), "id": "plain"}
    del coll["cbir:models"]
    assert client.post("/collections", json=coll).status_code in (200, 201)
    models = {**_collection("models"), "id": "models"}
    assert client.post("/collections", json=models).status_code in (200, 201)
    holder = _item(0, collection="models")
    holder["id"] = "linked-32-description"
    holder["properties"] = {
        "datetime": holder["properties"]["datetime"],
        "cbir:models": [model.to_dict()],
    }
    assert client.post("/collections/models/items", json=holder).status_code == 201
    item = _item(1, collection="plain")
    item["properties"]["cbir:codes"] = [
        HashCode.from_bits("linked-32", "2", np.ones(32, np.uint8)).to_dict()
    ]
    r = client.post("/collections/plain/items", json=item)
    _refused(r, item["id"], "model")  # without the link, nothing declares linked-32 for it
    item["links"] = [{"rel": "cbir:model", "href": "/collections/elsewhere/items/x"}]
    r = client.post("/collections/plain/items", json=item)
    assert r.status_code == 400 and "links[0].href" in r.text
    href = "http://testserver/collections/models/items/linked-32-description"
    item["links"] = [{"rel": "cbir:model", "href": href, "cbir:model": "linked-32"}]
    assert client.post("/collections/plain/items", json=item).status_code == 201
    query = {"model": "linked-32", "item": {"collection": "plain", "id": item["id"]}}
    r = client.post("/search", json={"similarity": query})
    assert r.status_code == 200 and [f["id"] for f in r.json()["features"]] == [item["id"]]


def test_the_index_serves_the_version_listed_last(api: Api) -> None:
    """A collection declaring two versions takes codes of both; the index ranks the codes of
    the version it lists last (the current one), and follows a collection update."""
    client = api.client
    v1 = CBIRModel.create("versioned", "1", 16, ["red"])
    v2 = CBIRModel.create("versioned", "2", 16, ["red"])
    coll = {**_collection("versions"), "id": "versions", "cbir:models": [v1.to_dict()]}
    assert client.post("/collections", json=coll).status_code in (200, 201)
    written = {}
    for version in ("1", "2"):
        item = _item(2, collection="versions")
        item["id"] = f"v{version}"
        item["properties"]["cbir:codes"] = [
            HashCode.from_bits("versioned", version, np.ones(16, np.uint8)).to_dict()
        ]
        written[version] = item
    r = client.post("/collections/versions/items", json=written["2"])
    _refused(r, "v2", "model_version")
    assert client.post("/collections/versions/items", json=written["1"]).status_code == 201
    code = HashCode.from_bits("versioned", "1", np.ones(16, np.uint8)).code

    def ranked() -> list[str]:
        query = {"model": "versioned", "code": code, "k": 10}
        r = client.post("/search", json={"similarity": query})
        assert r.status_code == 200, r.text
        return [f["id"] for f in r.json()["features"]]

    assert ranked() == ["v1"]
    coll["cbir:models"] = [v1.to_dict(), v2.to_dict()]
    assert client.put("/collections/versions", json=coll).status_code == 200
    assert client.post("/collections/versions/items", json=written["2"]).status_code == 201
    assert ranked() == ["v2"]  # version 1 is stored, not ranked with version 2


def test_two_codes_of_one_model_and_version_are_refused(api: Api) -> None:
    """Which of two codes of one version would the index serve? The API (every write path) and
    the store refuse the item with a 400 naming the second; two versions of one model are
    fine (re-encoding), and the index serves the version the collection lists last."""
    client, items = api.client, "/collections/scenes/items"
    first, second = (HashCode.from_bits(MODEL, VERSION, _bits(i)).to_dict() for i in (1, 2))
    item = _coded(first)
    item["properties"]["cbir:codes"] = [first, second]

    def problem(item_id: str) -> str:
        return (
            f"item {item_id!r}: properties.cbir:codes[1]: a second code of model {MODEL!r} "
            f"version {VERSION!r} (first at [0])"
        )

    for r in (
        client.post(items, json=item),
        client.post(items, json={"type": "FeatureCollection", "features": [item]}),
    ):
        assert r.status_code == 400 and problem(item["id"]) in r.text, r.text
    assert client.get(f"{items}/{item['id']}").status_code == 404
    r = client.put(f"{items}/item-000", json={**item, "id": "item-000"})
    assert r.status_code == 400 and problem("item-000") in r.text, r.text
    with pytest.raises(InvalidItemError, match=re.escape(problem(item["id"]))):
        api.store.upsert_items([item])

    cid = f"reencoding-{api.kind}"
    models = [CBIRModel.create("reencoded", v, 64, ["red"]).to_dict() for v in ("1", "2")]
    coll = {**_collection(cid), "id": cid, "cbir:models": models}
    assert client.post("/collections", json=coll).status_code in (200, 201)
    old, new = np.zeros(64, np.uint8), np.ones(64, np.uint8)
    both = _item(0, collection=cid)
    both["properties"]["cbir:codes"] = [
        HashCode.from_bits("reencoded", "2", new).to_dict(),
        HashCode.from_bits("reencoded", "1", old).to_dict(),
    ]
    assert client.post(f"/collections/{cid}/items", json=both).status_code == 201
    query = {"model": "reencoded", "code": HashCode.from_bits("reencoded", "2", new).code}
    r = client.post("/search", json={"similarity": query})
    assert r.status_code == 200, r.text
    (hit,) = r.json()["features"]
    assert hit["id"] == both["id"] and hit["properties"]["cbir:distance"] == 0  # version 2's
