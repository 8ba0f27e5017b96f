"""The pgstac change log: a hash index follows writes made behind its back (pgstac's SQL API,
``pypgstac load``, another process) by reading what changed, not by a rebuild from every code;
a deleted collection's keys are taken out; it is rebuilt only when the log cannot say (pruned).
The oracle: the index holds exactly what a fresh build from the store holds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import Jsonb

from stac_rscbir.api.similarity import SimilarityClient, SimilarityQuery, StoreCandidates
from stac_rscbir.extension.cbir import HashCode
from stac_rscbir.index.hashindex import HashIndex
from stac_rscbir.store.base import SearchQuery
from stac_rscbir.store.pgstac import PgstacStore

from .api_builders import MODEL, _bits, _collection, _item
from .pgcluster import pypgstac_load


@pytest.fixture
def store(pgstac_db: str) -> Iterator[PgstacStore]:
    with PgstacStore(pgstac_db) as s:
        s.create_collection(_collection())
        s.upsert_items([_item(i) for i in range(40)])
        yield s


class Counted:
    """Counts full reads of the model's codes (a rebuild) on ``store``."""

    def __init__(self, store: PgstacStore) -> None:
        self.rebuilds = 0
        read = store.iter_codes

        def counting(model: str, version: str | None = None):  # type: ignore[no-untyped-def]
            self.rebuilds += 1
            return read(model, version)

        store.iter_codes = counting  # type: ignore[method-assign]


def _contents(idx: HashIndex) -> dict[tuple[str, str], bytes]:
    keys = idx.keys()
    return {key: idx.code(key) for key in keys}


def _fresh(dsn: str) -> dict[tuple[str, str], bytes]:
    """What a build from the store holds now (through a store object of its own)."""
    with PgstacStore(dsn) as store:
        return _contents(HashIndex(MODEL, 64).build(store.iter_codes(MODEL), store.generation()))


def _search(client: SimilarityClient, store: PgstacStore, bits_of: int) -> list[str]:
    code = HashCode.from_bits(MODEL, "1.0.0", _bits(bits_of)).code
    sim = SimilarityQuery(model=MODEL, code=code, k=100)
    page = client.page(sim, StoreCandidates(store, SearchQuery()), 100)
    return [hit.key[1] for hit in page.hits]


def _sql(dsn: str, statement: str, *args: object) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET search_path TO pgstac, public")  # as pgstac's functions expect
        conn.execute(statement, args)


def test_the_index_follows_writes_behind_its_back(
    store: PgstacStore, pgstac_db: str, tmp_path: Path
) -> None:
    client = SimilarityClient(store, tmp_path / "index")
    _search(client, store, 1)  # built once
    counted = Counted(store)
    moved = _item(3)
    moved["properties"]["cbir:codes"] = [HashCode.from_bits(MODEL, "1.0.0", _bits(90)).to_dict()]
    uncoded = _item(4)
    uncoded["properties"].pop("cbir:codes")
    writes = [
        lambda: _sql(pgstac_db, "SELECT pgstac.create_item(%s)", Jsonb(_item(50))),
        lambda: _sql(pgstac_db, "SELECT pgstac.update_item(%s)", Jsonb(moved)),
        lambda: _sql(pgstac_db, "SELECT pgstac.update_item(%s)", Jsonb(uncoded)),
        lambda: _sql(pgstac_db, "SELECT pgstac.delete_item('item-005', 'scenes')"),
        lambda: _sql(
            pgstac_db,
            "SELECT pgstac.upsert_items(%s)",
            Jsonb([_item(i) for i in range(60, 70)]),
        ),
    ]
    for write in writes:
        write()
        ranked = _search(client, store, 3)
        idx = client.indexes.index(MODEL)
        assert idx.generation == store.generation()
        assert _contents(idx) == _fresh(pgstac_db)
    assert "item-005" not in ranked and "item-004" not in ranked and "item-069" in ranked
    ndjson = tmp_path / "items.ndjson"
    ndjson.write_text("\n".join(json.dumps(_item(i)) for i in range(70, 75)) + "\n")
    pypgstac_load(pgstac_db, "items", ndjson, "insert")
    _search(client, store, 3)
    assert _contents(client.indexes.index(MODEL)) == _fresh(pgstac_db)
    assert counted.rebuilds == 0, "the index was rebuilt instead of following the log"


def test_the_index_is_rebuilt_when_the_log_cannot_say(
    store: PgstacStore, pgstac_db: str, tmp_path: Path
) -> None:
    client = SimilarityClient(store, tmp_path / "index")
    _search(client, store, 1)
    counted = Counted(store)
    loaded = client.indexes.index(MODEL).generation
    # the log was pruned past the index's generation
    _sql(pgstac_db, "SELECT pgstac.create_item(%s)", Jsonb(_item(50)))
    _sql(
        pgstac_db,
        "UPDATE rscbir.changes_horizon SET horizon = (SELECT value FROM rscbir.generation)",
    )
    assert store.changes_since(loaded) is None
    _search(client, store, 1)
    assert counted.rebuilds == 1
    assert _contents(client.indexes.index(MODEL)) == _fresh(pgstac_db)
    # a collection went (its items leave with their partition: no row trigger says which): its
    # keys are taken out of the index, no rebuild
    other = _collection("others")
    store.create_collection(other)
    store.upsert_items([_item(i, "others") for i in range(3)])
    _search(client, store, 1)
    assert {c for c, _ in _contents(client.indexes.index(MODEL))} == {"scenes", "others"}
    _sql(pgstac_db, "SELECT pgstac.delete_collection('others')")
    _search(client, store, 1)
    assert counted.rebuilds == 1
    assert _contents(client.indexes.index(MODEL)) == _fresh(pgstac_db)


def test_the_log_is_pruned_to_its_horizon(store: PgstacStore, pgstac_db: str) -> None:
    """Every 100th generation keeps the last CHANGES_KEPT generations of the log; a reader
    older than the horizon is told to rebuild."""
    from stac_rscbir.store import pgstac as module

    g0 = store.generation()
    with psycopg.connect(pgstac_db, autocommit=True) as conn:
        # jump the counter so that the next bump lands on a multiple of 100 far ahead
        target = (g0 // 100 + 1) * 100 + module.CHANGES_KEPT * 2
        conn.execute("UPDATE rscbir.generation SET value = %s", (target - 1,))
    _sql(pgstac_db, "SELECT pgstac.create_item(%s)", Jsonb(_item(50)))
    assert store.generation() == target
    with psycopg.connect(pgstac_db) as conn:
        (oldest,) = conn.execute("SELECT min(generation) FROM rscbir.changes").fetchone()
        (horizon,) = conn.execute("SELECT horizon FROM rscbir.changes_horizon").fetchone()
    assert horizon == target - module.CHANGES_KEPT and oldest == target
    assert store.changes_since(g0) is None
    assert store.changes_since(target - 1) == (target, [("scenes", "item-050")])
