"""The change feed (issue 18): both stores log every write (SQLite: triggers on its tables, so
writes of any process on the file are logged), and the live hash indexes follow the log instead
of being rebuilt: writes of another process, a collection deleted (its keys taken out), a saved
index older than the store (loaded, then caught up). Rebuilt only when the log no longer reaches
back or the model's declaration changes. The oracle: a brute-force Hamming ranking over the
store's codes (``iter_codes``), through a store object of its own."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from stac_rscbir.extension.cbir import CBIRModel, HashCode
from stac_rscbir.index import live
from stac_rscbir.index.hashindex import HashIndex
from stac_rscbir.index.live import LiveIndexes
from stac_rscbir.store.base import CHANGES_KEPT, PRUNE_EVERY, ItemStore
from stac_rscbir.store.sqlite import SQLiteStore

from .api_builders import MODEL, Deployment, StoreFactory, _bits, _collection, _item

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread_faiss() -> None:
    import faiss

    faiss.omp_set_num_threads(1)


# ----------------------------------------------------------------------------- helpers


def _codes(store: ItemStore, version: str | None = None) -> dict[tuple[str, str], bytes]:
    return {sc.key: sc.code for sc in store.iter_codes(MODEL, version)}


def _held(idx: HashIndex) -> dict[tuple[str, str], bytes]:
    keys = idx.keys()
    return {key: idx.code(key) for key in keys}


def _contents(indexes: LiveIndexes) -> dict[tuple[str, str], bytes]:
    return _held(indexes.index(MODEL))


def _brute_force(codes: dict[tuple[str, str], bytes], query: np.ndarray) -> list[tuple[int, str]]:
    packed = np.packbits(query)
    return sorted(
        (int(np.unpackbits(np.frombuffer(c, np.uint8) ^ packed).sum()), f"{k[0]}/{k[1]}")
        for k, c in codes.items()
    )


def _assert_equals_the_store(indexes: LiveIndexes, oracle: ItemStore) -> None:
    """The index holds exactly the store's codes and ranks as a brute-force scan of them."""
    codes = _codes(oracle)
    assert _contents(indexes) == codes
    query = _bits(5)
    hits = indexes.index(MODEL).search(np.packbits(query), k=len(codes) + 1, exact=True)
    got = [(h.distance, f"{h.key[0]}/{h.key[1]}") for h in hits]
    assert got == _brute_force(codes, query)


def _coded(i: int, version: str = "1.0.0", collection: str = "scenes") -> dict[str, Any]:
    item = _item(i, collection)
    code = HashCode.from_bits(MODEL, version, _bits(i + 500))
    item["properties"]["cbir:codes"] = [code.to_dict()]
    return item


def _prune_log_to_present(store: ItemStore) -> None:
    """Move the log's horizon to the store's present generation (as pruning would)."""
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as conn:
            conn.execute(
                "UPDATE meta SET value = (SELECT value FROM meta WHERE key = 'generation') "
                "WHERE key = 'changes_horizon'"
            )
        return
    import psycopg

    with psycopg.connect(store.dsn, autocommit=True) as conn:  # type: ignore[attr-defined]
        conn.execute(
            "UPDATE rscbir.changes_horizon SET horizon = (SELECT value FROM rscbir.generation)"
        )


def _counts(indexes: LiveIndexes) -> dict[str, int]:
    stats = indexes.stats()[MODEL]
    return {k: stats[k] for k in ("rebuilds", "loads")}


def _until(condition: Callable[[], bool], what: str, deadline_s: float = 60.0) -> None:
    """Poll ``condition`` (a background thread's work) with a generous deadline."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline_s} s: {what}")
        time.sleep(0.01)


@pytest.fixture
def filled(store_factory: StoreFactory) -> Iterator[tuple[ItemStore, ItemStore]]:
    """(the store the indexes read, another store object on the same database: another
    process's writes), holding the ``scenes`` collection and 40 coded items."""
    store, other = store_factory(), store_factory()
    store.create_collection(_collection())
    store.upsert_items([_item(i) for i in range(40)])
    yield store, other


# ----------------------------------------------------------------------------- the SQLite log


def test_sqlite_changes_since_logs_every_writer(tmp_path: Path) -> None:
    """(present generation, the keys written since, each once, sorted), whoever wrote: this
    store object, another one (another connection), another OS process."""
    path = tmp_path / "stac.db"
    store, other = SQLiteStore(path), SQLiteStore(path)
    g0 = store.generation()
    assert store.changes_since(g0) == (g0, [])
    store.create_collection(_collection())
    store.upsert_items([_item(i) for i in range(3)])
    g1 = store.generation()
    keys = [("scenes", ""), *[("scenes", f"item-{i:03d}") for i in range(3)]]
    assert store.changes_since(g0) == (g1, keys)
    other.update_item(_item(1))
    other.update_item(_item(1))
    other.delete_item("scenes", "item-002")
    g2 = store.generation()
    assert g2 == g1 + 3
    assert store.changes_since(g1) == (g2, [("scenes", "item-001"), ("scenes", "item-002")])
    script = (
        "import sys; sys.path.insert(0, sys.argv[2]); "
        "from stac_rscbir.store.sqlite import SQLiteStore; "
        "from tests.api_builders import _item; "
        "SQLiteStore(sys.argv[1]).create_item(_item(7))"
    )
    subprocess.run([sys.executable, "-c", script, str(path), str(ROOT)], check=True, cwd=ROOT)
    g3 = store.generation()
    assert store.changes_since(g2) == (g3, [("scenes", "item-007")])
    with sqlite3.connect(path) as conn:  # SQL behind the store's back, the counter not bumped:
        conn.execute("UPDATE items SET content = content WHERE id = 'item-000'")
    assert store.changes_since(g3) == (g3, [])
    other.delete_item("scenes", "item-007")  # ...is seen with the next write that bumps it
    assert store.changes_since(g3) == (g3 + 1, [("scenes", "item-000"), ("scenes", "item-007")])
    g3 += 1
    other.create_collection(_collection("others"))
    other.upsert_items([_item(i, "others") for i in range(3)])
    g4 = store.generation()
    other.delete_collection("others")  # its items go with it: one "*" row, not one per item
    assert store.changes_since(g4) == (g4 + 1, [("others", "*")])
    assert store.changes_since(g4 + 1) == (g4 + 1, [])
    store.close()
    other.close()


def test_sqlite_log_is_pruned_to_its_horizon(tmp_path: Path) -> None:
    """Every PRUNE_EVERY-th generation keeps the last CHANGES_KEPT generations of the log; a
    reader older than the horizon is told to rebuild (None)."""
    path = tmp_path / "stac.db"
    store = SQLiteStore(path)
    store.create_collection(_collection())
    g0 = store.generation()
    target = (g0 // PRUNE_EVERY + 1) * PRUNE_EVERY + CHANGES_KEPT * 2
    with sqlite3.connect(path) as conn:  # jump the counter: the next write lands on target
        conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (target - 1,))
    store.create_item(_item(50))
    assert store.generation() == target
    with sqlite3.connect(path) as conn:
        (oldest,) = conn.execute("SELECT min(generation) FROM changes").fetchone()
        (horizon,) = conn.execute("SELECT value FROM meta WHERE key = 'changes_horizon'").fetchone()
    assert horizon == target - CHANGES_KEPT and oldest == target
    assert store.changes_since(g0) is None
    assert store.changes_since(horizon) == (target, [("scenes", "item-050")])
    assert store.changes_since(target - 1) == (target, [("scenes", "item-050")])
    store.close()


def test_a_version_1_sqlite_file_gets_the_log_on_open(tmp_path: Path) -> None:
    """A file of schema version 1 (no log) is migrated in place: the log starts at the
    generation of the migration (older readers rebuild), and logs every later write."""
    path = tmp_path / "stac.db"
    with SQLiteStore(path) as store:
        store.create_collection(_collection())
        store.upsert_items([_item(i) for i in range(5)])
    with sqlite3.connect(path) as conn:  # back to what version 1 wrote
        triggers = [
            r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")
        ]
        for name in triggers:
            conn.execute(f"DROP TRIGGER {name}")
        conn.execute("DROP TABLE changes")
        conn.execute("DELETE FROM meta WHERE key = 'changes_horizon'")
        conn.execute("UPDATE meta SET value = 1 WHERE key = 'schema_version'")
    with SQLiteStore(path) as store:
        g = store.generation()
        assert store.changes_since(g) == (g, [])
        assert store.changes_since(g - 1) is None
        store.delete_item("scenes", "item-003")
        assert store.changes_since(g) == (g + 1, [("scenes", "item-003")])
        assert store.count() == 4
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            2,
        )


# ----------------------------------------------------------------------------- the live indexes


def test_writes_of_another_process_are_followed_without_rebuild(
    filled: tuple[ItemStore, ItemStore], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inserts, code changes, codes removed, deletes and a large batch (applied in chunks)
    written through another store object: the index follows the log (the follower's step,
    ``follow``), equals the store after each, and is never rebuilt after its first build."""
    monkeypatch.setattr(live, "FOLLOW_CHUNK", 4)  # the batch below takes several chunks
    store, other = filled
    indexes = LiveIndexes(store, tmp_path / "index")
    indexes.index(MODEL)
    uncoded = _item(4)
    uncoded["properties"].pop("cbir:codes")
    writes: list[Callable[[], None]] = [
        lambda: other.create_item(_item(50)),
        lambda: other.update_item(_coded(3)),
        lambda: other.update_item(uncoded),
        lambda: other.delete_item("scenes", "item-005"),
        lambda: other.upsert_items([_coded(i) for i in range(60, 75)] + [_coded(7)]),
    ]
    for write in writes:
        write()
        indexes.follow()
        assert indexes.index(MODEL).generation == store.generation()
        _assert_equals_the_store(indexes, other)
    stats = indexes.stats()[MODEL]
    assert stats["rebuilds"] == 1 and stats["loads"] == 0
    assert stats["followed_changes"] == 1 + 1 + 1 + 1 + 16
    assert stats["count"] == len(_codes(other)) and stats["generation"] == store.generation()
    indexes.close()


def test_a_search_follows_the_log_itself(
    filled: tuple[ItemStore, ItemStore], tmp_path: Path
) -> None:
    """Without the follower or a hook, the next index use reads the log first: a search sees
    every write committed before it began, by any process."""
    store, other = filled
    indexes = LiveIndexes(store, tmp_path / "index")
    indexes.index(MODEL)
    other.upsert_items([_coded(i) for i in range(100, 110)])
    _assert_equals_the_store(indexes, other)
    assert _counts(indexes) == {"rebuilds": 1, "loads": 0}
    indexes.close()


def test_a_collection_delete_takes_its_keys_out_without_rebuild(
    filled: tuple[ItemStore, ItemStore], tmp_path: Path
) -> None:
    store, other = filled
    other.create_collection(_collection("others"))
    other.upsert_items([_item(i, "others") for i in range(8)])
    indexes = LiveIndexes(store, tmp_path / "index")
    assert {c for c, _ in _contents(indexes)} == {"scenes", "others"}
    other.delete_collection("others")
    indexes.follow()
    _assert_equals_the_store(indexes, other)
    assert {c for c, _ in _contents(indexes)} == {"scenes"}
    # recreated with other items in one catch-up: the new ones are in, the old ones stay out
    other.create_collection(_collection("others"))
    other.upsert_items([_item(i, "others") for i in range(6, 10)])
    other.delete_collection("others")
    other.create_collection(_collection("others"))
    other.upsert_items([_item(i, "others") for i in range(9, 12)])
    indexes.follow()
    _assert_equals_the_store(indexes, other)
    assert _counts(indexes) == {"rebuilds": 1, "loads": 0}
    indexes.close()


def test_a_saved_index_older_than_the_store_is_loaded_and_caught_up(
    filled: tuple[ItemStore, ItemStore], tmp_path: Path
) -> None:
    """A restart after writes the saved index missed (another replica's, or this one's after
    its last save): the saved copy is loaded and caught up from the log, not rebuilt."""
    store, other = filled
    first = LiveIndexes(store, tmp_path / "index")
    first.index(MODEL)
    first.close()  # saves
    other.upsert_items([_coded(i) for i in range(60, 70)])
    other.delete_item("scenes", "item-001")
    other.create_collection(_collection("others"))
    other.upsert_items([_item(i, "others") for i in range(3)])
    restarted = LiveIndexes(store, tmp_path / "index")
    _assert_equals_the_store(restarted, other)
    assert _counts(restarted) == {"rebuilds": 0, "loads": 1}
    assert restarted.stats()[MODEL]["followed_changes"] == 10 + 1 + 3
    restarted.close()  # saves the caught-up copy: the next start has nothing to catch up
    again = LiveIndexes(store, tmp_path / "index")
    _assert_equals_the_store(again, other)
    stats = again.stats()[MODEL]
    assert (stats["rebuilds"], stats["loads"], stats["followed_changes"]) == (0, 1, 0)
    assert stats["generation"] == store.generation()
    again.close()


def test_an_index_the_log_no_longer_reaches_is_rebuilt(
    filled: tuple[ItemStore, ItemStore], tmp_path: Path
) -> None:
    store, other = filled
    indexes = LiveIndexes(store, tmp_path / "index")
    indexes.index(MODEL)
    other.create_item(_item(50))
    _prune_log_to_present(other)
    indexes.follow()  # loaded, the index cannot follow: rebuilt
    _assert_equals_the_store(indexes, other)
    assert _counts(indexes) == {"rebuilds": 2, "loads": 0}
    indexes.close()  # saves the rebuilt copy
    other.create_item(_item(51))
    _prune_log_to_present(other)
    restarted = LiveIndexes(store, tmp_path / "index")  # the saved copy is older than the log
    _assert_equals_the_store(restarted, other)
    assert _counts(restarted) == {"rebuilds": 1, "loads": 0}
    restarted.close()


def test_a_change_of_the_model_declaration_rebuilds(
    filled: tuple[ItemStore, ItemStore], tmp_path: Path
) -> None:
    """The collections' cbir:models decide the version the index serves: a collection write
    that changes it cannot be followed item by item: rebuilt (and then followed again)."""
    store, other = filled
    indexes = LiveIndexes(store, tmp_path / "index")
    indexes.index(MODEL)
    other.update_collection({**_collection(), "description": "renamed"})  # same declaration
    indexes.follow()
    assert _counts(indexes) == {"rebuilds": 1, "loads": 0}
    declared = _collection()
    declared["cbir:models"] = [
        CBIRModel.create(MODEL, "2.0.0", 64, ["red"], descriptor_dim=64).to_dict()
    ]
    other.update_collection(declared)
    other.upsert_items([_coded(i, "2.0.0") for i in range(3)])
    indexes.follow()
    idx = indexes.index(MODEL)
    assert idx.version == "2.0.0"
    assert _held(idx) == _codes(other, "2.0.0")
    assert len(idx.keys()) == 3
    assert _counts(indexes) == {"rebuilds": 2, "loads": 0}
    other.upsert_items([_coded(i, "2.0.0") for i in range(3, 5)])
    indexes.follow()
    assert _held(idx) == _codes(other, "2.0.0")
    assert _counts(indexes) == {"rebuilds": 2, "loads": 0}
    indexes.close()


def test_the_follower_thread_catches_up_an_idle_index(
    filled: tuple[ItemStore, ItemStore], tmp_path: Path
) -> None:
    """Started by open() (the app's startup), stopped by close(): with no search and no hook,
    a write of another process reaches the loaded index; after a restart, the saved index is
    opened before any search."""
    store, other = filled
    indexes = LiveIndexes(store, tmp_path / "index", follow_interval=0.05)
    indexes.index(MODEL)
    indexes.open()
    other.upsert_items([_coded(i) for i in range(60, 64)])
    target = other.generation()
    _until(lambda: indexes.stats()[MODEL]["generation"] >= target, "the follower caught up")
    assert indexes.stats()[MODEL]["followed_changes"] == 4
    indexes.close()  # saves
    assert indexes._follower is None
    _assert_equals_the_store(indexes, other)
    assert _counts(indexes) == {"rebuilds": 1, "loads": 0}
    # a restart: the follower first opens the saved index (loaded, caught up), before a search
    other.upsert_items([_coded(i) for i in range(64, 66)])
    restarted = LiveIndexes(store, tmp_path / "index", follow_interval=0.05)
    assert restarted.saved_models() == [MODEL] and restarted.stats() == {}
    restarted.open()
    target = other.generation()
    _until(
        lambda: restarted.stats().get(MODEL, {}).get("generation", 0) >= target,
        "the follower loaded the saved index",
    )
    restarted.close()
    _assert_equals_the_store(restarted, other)
    assert _counts(restarted) == {"rebuilds": 0, "loads": 1}


# ----------------------------------------------------------------------------- GET /_mgmt/indexes


def test_mgmt_indexes(deployment: Deployment) -> None:
    """``{"store_generation", "models": stats}`` on each deployment: empty before a search,
    the loaded model after it, and a write of another process followed without a rebuild."""
    store = deployment()
    store.create_collection(_collection())
    store.upsert_items([_item(i) for i in range(20)])
    with TestClient(deployment.app()) as client:
        body = client.get("/_mgmt/indexes").json()
        assert body == {"store_generation": store.generation(), "models": {}}
        code = HashCode.from_bits(MODEL, "1.0.0", _bits(1)).code
        search = {"similarity": {"model": MODEL, "code": code, "k": 5}, "limit": 5}
        assert client.post("/search", json=search).status_code == 200
        body = client.get("/_mgmt/indexes").json()
        assert body["models"][MODEL] == {
            "generation": body["store_generation"],
            "count": 20,
            "rebuilds": 1,
            "loads": 0,
            "followed_changes": 0,
        }
        deployment().upsert_items([_item(i) for i in range(20, 25)])  # another process

        def followed() -> bool:
            got = client.get("/_mgmt/indexes").json()
            return got["models"][MODEL]["generation"] == got["store_generation"]

        _until(followed, "the follower caught up")
        stats = client.get("/_mgmt/indexes").json()["models"][MODEL]
        assert stats["count"] == 25 and stats["rebuilds"] == 1
        assert stats["followed_changes"] == 5
        assert json.loads(client.get("/_mgmt/indexes").content)["store_generation"] == (
            store.generation()
        )
