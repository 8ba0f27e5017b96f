"""Concurrency: SQLite (WAL) with reader threads and one writer through the similarity service
(the hash index follows every write under its lock while readers search it), and pgstac with
several writer threads in one collection."""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import numpy as np
import pytest

from stac_rscbir.api.similarity import SimilarityClient, SimilarityQuery, StoreCandidates
from stac_rscbir.store.base import SearchQuery
from stac_rscbir.store.sqlite import SQLiteStore

from .api_builders import MODEL, _bits, _collection, _item


def _hamming(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.count_nonzero(a != b))


def test_sqlite_readers_and_one_writer_through_the_index(tmp_path: Path) -> None:
    """Readers run similarity and plain searches while a writer adds items one transaction at
    a time (store write, then the index hook): no errors; every similarity answer is exactly the
    brute-force ranking of a prefix of the writes, at least as long as the writes finished
    before the read began (each reader's last search, begun after the last write, sees them
    all); the index is never rebuilt. (Reader latency under this load: benchmarks/
    concurrency_bench.py.)"""
    n0, n_new, k = 1000, 60, 2000
    store = SQLiteStore(tmp_path / "stac.db")
    store.create_collection(_collection())
    store.upsert_items([_item(i) for i in range(n0)])
    service = SimilarityClient(store, tmp_path / "index")
    query_bits = _bits(2)
    code = base64.b64encode(np.packbits(query_bits).tobytes()).decode()
    sim = SimilarityQuery(model=MODEL, code=code, k=k)
    all_bits = np.array([_bits(i) for i in range(n0 + n_new)])
    dist = (all_bits != query_bits).sum(axis=1)
    names = [f"item-{i:03d}" for i in range(n0 + n_new)]
    service.page(
        sim, StoreCandidates(store, SearchQuery()), 1
    )  # load the index (built and saved once)
    loaded = service.indexes.index(MODEL)  # followed in place by every hook, never replaced
    opened = []  # a rebuild reads every code from the store again
    read_codes = store.iter_codes
    store.iter_codes = lambda model, version=None: (
        opened.append(model) or read_codes(model, version)
    )  # type: ignore[method-assign]

    done = [0]  # writes finished (store + index), in order
    stop = threading.Event()
    errors: list[BaseException] = []
    last_seen: list[int] = []  # each reader's last answer, begun after the last write

    def reader() -> None:
        try:
            while True:
                last = stop.is_set()  # set after the last write: this search must see them all
                before = done[0]
                page = service.page(sim, StoreCandidates(store, SearchQuery()), k)
                got = [(h.distance, h.key[1]) for h in page.hits]
                m = len(got) - n0
                assert before <= m <= n_new, (before, m)
                want = sorted(zip(dist[: n0 + m].tolist(), names[: n0 + m], strict=True))
                assert got == want
                plain = store.search(SearchQuery(limit=10, ids=[f"item-{n0 + before - 1:03d}"]))
                assert before == 0 or len(plain.items) == 1
                if last:
                    last_seen.append(m)
                    return
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(3)]
    for t in readers:
        t.start()
    try:
        for i in range(n0, n0 + n_new):
            item = _item(i)
            store.create_item(item)
            service.indexes.on_item("scenes", item, item["id"])
            done[0] += 1
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not errors, errors[0]
    assert last_seen == [n_new] * len(readers)
    assert opened == [], f"{len(opened)} rebuilds for {n_new} writes"
    assert service.indexes.index(MODEL) is loaded, "the index was dropped and opened again"
    # saves run in the background; closing the service (the app's shutdown) saves what is
    # pending, and the saved index is then the last state
    from stac_rscbir.index.hashindex import HashIndex

    service.indexes.close()
    saved = HashIndex.load(service.indexes.index_path(MODEL))
    assert saved.generation == store.generation() and saved.count == n0 + n_new
    store.close()


def test_a_rebuild_does_not_block_readers_of_other_models_or_writers(tmp_path: Path) -> None:
    """A rebuild runs outside the service lock: while one model's index is being rebuilt,
    the other model's current index answers at once and transactions go through."""
    store = SQLiteStore(tmp_path / "stac.db")
    store.create_collection(_collection())
    store.upsert_items([_item(i) for i in range(200)])
    service = SimilarityClient(store, tmp_path / "index")
    code = base64.b64encode(np.packbits(_bits(1)).tobytes()).decode()
    sim = SimilarityQuery(model=MODEL, code=code, k=10)
    service.page(sim, StoreCandidates(store, SearchQuery()), 10)
    entered, release = threading.Event(), threading.Event()
    read_codes = store.iter_codes

    def slow_read(model: str, version: str | None = None):  # a rebuild reads the store's codes
        if model == "slow-model":
            entered.set()
            release.wait(600)  # held until the other work is done (or the test gave up)
        return read_codes(model, version)

    results: dict[str, object] = {}

    def other_work() -> None:  # a search of the other model, then a transaction and its hook
        try:
            results["found"] = len(
                service.page(sim, StoreCandidates(store, SearchQuery()), 10).hits
            )
            item = _item(200)
            store.create_item(item)
            service.indexes.on_item("scenes", item, item["id"])
            results["count"] = service.indexes.index(MODEL).count
        except BaseException as exc:
            results["error"] = exc

    store.iter_codes = slow_read  # type: ignore[method-assign]
    slow = threading.Thread(target=service.indexes.index, args=("slow-model",))
    worker = threading.Thread(target=other_work)
    slow.start()
    try:
        assert entered.wait(60)
        worker.start()
        # the rebuild is held (release unset) for as long as this waits: work that needed it
        # could not finish in any amount of time
        worker.join(timeout=120)
        finished_during_rebuild = not worker.is_alive()
    finally:
        release.set()
        slow.join()
        worker.join()
    assert finished_during_rebuild, "the search or the write waited for the other model's rebuild"
    assert results == {"found": 10, "count": 201}
    store.close()


def test_pgstac_concurrent_writers_in_one_collection(pgstac_db: str) -> None:
    from stac_rscbir.store.pgstac import PgstacStore

    store = PgstacStore(pgstac_db, pool_size=6)
    store.create_collection(_collection())
    g0 = store.generation()
    threads, batches, size = 4, 8, 5
    errors: list[BaseException] = []

    def writer(w: int) -> None:
        try:
            for b in range(batches):
                start = 1000 + (w * batches + b) * size
                store.upsert_items([_item(i) for i in range(start, start + size)])
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=writer, args=(w,)) for w in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors[0]
    expected = {f"item-{1000 + j}" for j in range(threads * batches * size)}
    keys = store.filter_keys(SearchQuery(collections=["scenes"]))
    assert {iid for _, iid in keys} == expected
    assert store.generation() - g0 == threads * batches  # one bump per transaction
    store.close()


@pytest.fixture(autouse=True)
def _one_thread_faiss() -> None:
    import faiss

    faiss.omp_set_num_threads(1)


def test_concurrent_api_writes_are_followed_by_the_index_without_rebuilds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writers POST items in parallel (and a FeatureCollection, and a collection PUT) while
    readers search over real HTTP: every write's hook follows it in order, so the index is
    never dropped and rebuilt from the store, and every acknowledged item is then found."""
    import httpx

    from stac_rscbir.api.app import create_api
    from stac_rscbir.api.server import BackgroundServer
    from stac_rscbir.index.hashindex import HashIndex

    builds: list[int] = []
    real_build = HashIndex.build

    def counting_build(self: HashIndex, codes, generation: int) -> HashIndex:  # type: ignore[no-untyped-def]
        builds.append(generation)
        return real_build(self, codes, generation)

    monkeypatch.setattr(HashIndex, "build", counting_build)
    store = SQLiteStore(tmp_path / "stac.db")
    store.create_collection(_collection())
    store.upsert_items([_item(i) for i in range(200)])
    code = base64.b64encode(np.packbits(_bits(3)).tobytes()).decode()
    search = {"similarity": {"model": MODEL, "code": code, "k": 5}, "limit": 5}
    errors: list[BaseException] = []
    stop = threading.Event()
    api = create_api(store, tmp_path / "index", {})
    with BackgroundServer(api.app) as server:
        url = server.url
        assert httpx.post(f"{url}/search", json=search).status_code == 200
        assert len(builds) == 1  # built once from the store

        def writer(w: int) -> None:
            try:
                with httpx.Client(base_url=url, timeout=30) as c:
                    for j in range(10):
                        r = c.post("/collections/scenes/items", json=_item(1000 + 10 * w + j))
                        assert r.status_code in (200, 201), r.text
            except BaseException as exc:
                errors.append(exc)

        def reader() -> None:
            try:
                with httpx.Client(base_url=url, timeout=30) as c:
                    while not stop.is_set():
                        assert c.post("/search", json=search).status_code == 200
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
        readers = [threading.Thread(target=reader) for _ in range(2)]
        for t in [*threads, *readers]:
            t.start()
        for t in threads:
            t.join()
        batch = {"type": "FeatureCollection", "features": [_item(i) for i in range(1100, 1106)]}
        assert httpx.post(f"{url}/collections/scenes/items", json=batch).status_code in (201, 204)
        described = {**_collection(), "description": "renamed"}
        assert httpx.put(f"{url}/collections/scenes", json=described).status_code == 200
        stop.set()
        for t in readers:
            t.join()
        assert not errors, errors[0]
        everything = {**search, "similarity": {**search["similarity"], "k": 300}, "limit": 300}
        found = httpx.post(f"{url}/search", json=everything).json()
    written = [*range(200), *range(1000, 1040), *range(1100, 1106)]
    assert {f["id"] for f in found["features"]} == {_item(i)["id"] for i in written}
    got = [(f["properties"]["cbir:distance"], f["id"]) for f in found["features"]]
    assert got == sorted(got) and found["cbir:similarity"]["exact"] is True
    assert builds == builds[:1], f"{len(builds) - 1} rebuilds"
    store.close()
