"""HashIndex: exact and filtered search vs brute force, transactions, IVF recall, persistence."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest

from stac_rscbir.index.hashindex import (
    CODES_FILE,
    INDEX_FILE,
    META_FILE,
    HashIndex,
    Hit,
    IndexLoadError,
    SearchResult,
    measure_recall,
    open_or_rebuild,
)
from stac_rscbir.index.snapshots import POINTER_FILE, SnapshotDir
from stac_rscbir.store.base import ItemKey, StoredCode


def random_codes(n: int, bits: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, bits // 8), dtype=np.uint8)


def clustered_codes(n: int, bits: int, seed: int = 0, clusters: int = 40) -> np.ndarray:
    """Signs of random projections of a Gaussian mixture: neighbours are meaningful."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, 32))
    x = centers[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, 32))
    proj = rng.normal(size=(32, bits))
    return np.packbits(x @ proj > 0, axis=1)


def keys_for(n: int) -> list[ItemKey]:
    # two collections, ids not in insertion order, so key order != id order
    return [(f"col{i % 2}", f"item-{(i * 7919) % n:06d}") for i in range(n)]


def stored(codes: np.ndarray, keys: list[ItemKey], desc: np.ndarray | None = None):
    return [
        StoredCode(k, c.tobytes(), None if desc is None else desc[i].astype("<f4").tobytes())
        for i, (k, c) in enumerate(zip(keys, codes, strict=True))
    ]


def brute(q: np.ndarray, codes: np.ndarray, keys: list[ItemKey], k: int, max_distance=None):
    d = np.unpackbits(codes ^ q, axis=1).sum(axis=1)
    ranked = sorted((int(dist), key) for dist, key in zip(d, keys, strict=True))
    if max_distance is not None:
        ranked = [r for r in ranked if r[0] <= max_distance]
    return [Hit(key, dist) for dist, key in ranked[:k]]


@pytest.fixture(scope="module")
def flat64():
    codes = random_codes(3000, 64, seed=1)
    # duplicates and near-duplicates make ties at every distance
    codes[100:120] = codes[5]
    keys = keys_for(len(codes))
    index = HashIndex("m64").build(stored(codes, keys), generation=1)
    return index, codes, keys


@pytest.mark.parametrize("bits", [64, 128])
@pytest.mark.parametrize("k", [1, 10, 57])
def test_exact_search_equals_brute_force(bits, k):
    codes = random_codes(2000, bits, seed=bits)
    codes[10:30] = codes[3]
    keys = keys_for(len(codes))
    index = HashIndex("m").build(stored(codes, keys), generation=0)
    assert index.kind == "flat" and index.bits == bits
    for qi in (3, 0, 1999, 500):
        res = index.search(codes[qi].tobytes(), k)
        assert isinstance(res, SearchResult) and res.exact and index.last_exact
        assert res == brute(codes[qi], codes, keys, k)


def test_max_distance(flat64):
    index, codes, keys = flat64
    q = codes[7]
    for radius in (0, 18, 22):
        assert index.search(q, 10, max_distance=radius) == brute(q, codes, keys, 10, radius)
        everything = index.search(q, None, max_distance=radius)
        assert everything.strategy == "range"
        assert everything == brute(q, codes, keys, len(codes), radius)
    q = codes[5]
    assert index.search(q, 5, max_distance=0) == brute(q, codes, keys, 5, 0)
    with pytest.raises(ValueError):
        index.search(q, None)


@pytest.mark.parametrize("strategy", ["gather", "overfetch", "selector", "auto"])
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.5, 1.0])
def test_filtered_search_equals_brute_force_on_subset(flat64, strategy, fraction):
    index, codes, keys = flat64
    rng = np.random.default_rng(int(fraction * 1000))
    m = max(1, int(fraction * len(keys)))
    chosen = np.sort(rng.choice(len(keys), m, replace=False))
    subset = [keys[i] for i in chosen]
    unknown = [("col9", "nope")]
    for qi in (5, 11, int(chosen[0])):
        q = codes[qi]
        for k in (1, 10):
            res = index.search(q, k, candidates=subset + unknown, strategy=strategy)
            assert res.exact
            assert res == brute(q, codes[chosen], subset, k), (strategy, fraction, qi, k)
            if strategy != "auto":
                assert res.strategy == strategy
        res = index.search(q, 10, max_distance=20, candidates=subset, strategy=strategy)
        assert res == brute(q, codes[chosen], subset, 10, 20)


def test_auto_strategy_choice_follows_selectivity(flat64):
    index, _, _ = flat64
    n = 1_000_000  # the cost model at benchmark scale
    assert index.choose_strategy(n // 1000, 10, exact=True, n=n) == "gather"
    assert index.choose_strategy(n // 100, 10, exact=True, n=n) == "gather"
    assert index.choose_strategy(n // 2, 10, exact=True, n=n) == "overfetch"


def test_empty_candidates_and_empty_index():
    index = HashIndex("m")
    res = index.search(b"\x00" * 8, 10)
    assert res == [] and res.exact
    index.build([], generation=0)
    assert index.search(b"\x00" * 8, 10) == []
    codes = random_codes(50, 64)
    keys = keys_for(50)
    index.build(stored(codes, keys), generation=1)
    assert index.search(codes[0], 5, candidates=[]) == []
    assert index.search(codes[0], 5, candidates=[("x", "y")]) == []
    with pytest.raises(ValueError):
        index.search(b"\x00" * 16, 5)


def test_add_remove_update():
    codes = random_codes(400, 64, seed=3)
    keys = keys_for(400)
    index = HashIndex("m")
    for key, code in zip(keys[:300], codes[:300], strict=True):
        index.add(key, code.tobytes())
    assert index.count == 300 and index.bits == 64
    with pytest.raises(ValueError):
        index.add(keys[0], codes[0])
    index.build(stored(codes[:300], keys[:300]), generation=1)
    live_codes, live_keys = list(codes[:300]), list(keys[:300])
    for i in range(300, 400):
        index.add(keys[i], codes[i], generation=i)
        live_codes.append(codes[i])
        live_keys.append(keys[i])
    assert index.generation == 399
    for i in range(0, 400, 3):
        assert index.remove(keys[i])
    assert not index.remove(keys[0])
    removed = set(range(0, 400, 3))
    live = [i for i in range(400) if i not in removed]
    new = codes.copy()
    for i in live[::5]:
        new[i] = codes[(i + 1) % 400]
        index.update(keys[i], new[i].tobytes())
    index.update(("new", "one"), codes[0])  # update of an unknown key inserts it
    all_codes = np.concatenate([new[live], codes[:1]])
    all_keys = [keys[i] for i in live] + [("new", "one")]
    assert index.count == len(all_keys)
    assert ("new", "one") in index and keys[0] not in index
    assert index.code(keys[live[0]]) == new[live[0]].tobytes()
    for qi in (1, 2, 4, 100):
        assert index.search(new[qi], 10) == brute(new[qi], all_codes, all_keys, 10)
        sub = all_keys[::4]
        for strategy in ("gather", "overfetch", "selector"):
            got = index.search(new[qi], 7, candidates=[*sub, keys[0]], strategy=strategy)
            assert got == brute(new[qi], all_codes[::4], sub, 7)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_a_batch_of_writes_equals_a_build_of_the_result(kind):
    """apply(): updates, inserts and removals in one batch leave the index holding (and
    ranking) exactly what a build of the resulting codes holds."""
    rng = np.random.default_rng(11)
    codes, keys = clustered_codes(2000, 64, seed=4), keys_for(2000)
    desc = rng.normal(size=(2000, 8)).astype(np.float32)
    index = HashIndex("m", kind=kind).build(stored(codes, keys, desc), generation=1)
    state = {k: (c.tobytes(), d) for k, c, d in zip(keys, codes, desc, strict=True)}
    changes: dict[ItemKey, tuple[bytes, np.ndarray | None] | None] = {}
    for i in rng.choice(2000, 300, replace=False):  # updates and removals
        changes[keys[i]] = None if i % 3 == 0 else (codes[(i + 7) % 2000].tobytes(), desc[i])
    for j in range(50):  # inserts, one without a descriptor
        changes[("new", f"n{j}")] = (codes[j].tobytes(), None if j == 0 else desc[j])
    changes[("new", "never-indexed")] = None
    index.apply(changes, generation=2)
    for key, entry in changes.items():
        if entry is None:
            state.pop(key, None)
        else:
            state[key] = entry
    assert index.generation == 2 and index.count == len(state)
    assert {k: index.code(k) for k in state} == {k: v[0] for k, v in state.items()}
    final = np.array([np.frombuffer(v[0], np.uint8) for v in state.values()])
    want = brute(final[3], final, list(state), 25)
    if kind == "flat":
        assert index.search(final[3], 25) == want
    assert index.search(final[3], 25, exact=True) == want
    assert np.array_equal(index.descriptor(("new", "n1")), desc[1])
    assert index.descriptor(("new", "n0")) is None


@pytest.mark.parametrize("bits", [64, 128])
def test_ivf_recall_and_exact_flag(bits):
    codes = clustered_codes(6000, bits, seed=bits)
    keys = keys_for(len(codes))
    index = HashIndex("m", flat_max=1000, nprobe=16).build(stored(codes, keys), generation=0)
    assert index.kind == "ivf" and index.preferred_kind == "ivf"
    assert 40 <= index.nlist <= 120
    queries = clustered_codes(40, bits, seed=bits)  # same mixture, fresh samples
    res = index.search(queries[0], 10)
    assert not res.exact and not index.last_exact
    assert measure_recall(index, queries, 10) >= 0.95
    exact = index.search(queries[0], 10, exact=True)
    assert exact.exact and exact == brute(queries[0], codes, keys, 10)
    # filtered search on IVF: exact when requested, and with good recall when allowed approximate
    sub = keys[::3]
    for q in queries[:5]:
        got = index.search(q, 10, candidates=sub, exact=True)
        assert got.exact and got == brute(q, codes[::3], sub, 10)
    assert measure_recall(index, queries, 10, candidates=sub) >= 0.95
    tiny = keys[:20]
    got = index.search(queries[1], 5, candidates=tiny)
    assert got.exact and got.strategy == "gather"
    # transactions on IVF
    index.remove(keys[0])
    index.update(keys[1], codes[2])
    assert keys[0] not in index
    assert index.search(codes[2], 2, max_distance=0, exact=True) == sorted(
        [Hit(keys[1], 0), Hit(keys[2], 0)]
    )


def test_hnsw_tombstones():
    codes = clustered_codes(1500, 64, seed=5)
    keys = keys_for(len(codes))
    index = HashIndex("m", kind="hnsw", hnsw_m=16, ef_search=64).build(stored(codes, keys), 0)
    assert index.kind == "hnsw"
    index.remove(keys[0])
    res = index.search(codes[0], 10)
    assert not res.exact and keys[0] not in [h.key for h in res] and len(res) == 10
    assert index.search(codes[0], 10, exact=True) == brute(codes[0], codes[1:], keys[1:], 10)
    assert measure_recall(index, codes[1:30], 10) >= 0.9


def test_rerank_by_descriptors():
    codes = random_codes(100, 64, seed=9)
    keys = keys_for(100)
    desc = np.random.default_rng(9).normal(size=(100, 16)).astype(np.float32)
    index = HashIndex("m").build(stored(codes, keys, desc), generation=0)
    hits = index.search(codes[0], 30)
    ranked = index.rerank(desc[4] + 0.01, hits)
    dists = [r.descriptor_distance for r in ranked]
    assert dists == sorted(dists) and len(ranked) == 30
    want = {keys[i]: float(np.linalg.norm(desc[i] - (desc[4] + 0.01))) for i in range(100)}
    for r in ranked:
        assert r.descriptor_distance == pytest.approx(want[r.key], rel=1e-5)
    # explicit descriptors override; hits without one go last in Hamming order
    given = {hits[3].key: desc[4] + 0.01}
    again = index.rerank(desc[4] + 0.01, hits, given)
    assert again[0].key == hits[3].key and again[0].descriptor_distance == 0.0
    assert [r.key for r in again[1:]] == [h.key for h in hits if h.key != hits[3].key]
    assert np.allclose(index.descriptor(keys[7]), desc[7])


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_save_load_round_trip(tmp_path, kind):
    codes = clustered_codes(3000, 128, seed=2)
    keys = keys_for(3000)
    desc = np.random.default_rng(2).normal(size=(3000, 8)).astype(np.float32)
    index = HashIndex("m128", version="v2", kind=kind, nprobe=4)
    index.build(stored(codes, keys, desc), generation=42)
    index.remove(keys[10])
    index.add(("extra", "x"), codes[11], desc[11])
    index.save(tmp_path)
    saved = SnapshotDir(tmp_path).current()
    assert saved is not None and saved.parent == tmp_path
    for name in (INDEX_FILE, CODES_FILE, META_FILE):
        assert (saved / name).exists()
    assert not [p for p in tmp_path.glob(".*") if p.name != ".lock"]  # no temporaries left
    meta = json.loads((saved / META_FILE).read_text())
    assert meta["generation"] == 42 and meta["count"] == 3000 and meta["kind"] == kind
    loaded = HashIndex.load(tmp_path)
    assert (loaded.model, loaded.version, loaded.kind, loaded.bits) == ("m128", "v2", kind, 128)
    assert loaded.count == index.count and loaded.nprobe == 4
    for qi in (0, 11, 500):
        assert loaded.search(codes[qi], 10) == index.search(codes[qi], 10)
        sub = keys[::5]
        assert loaded.search(codes[qi], 5, candidates=sub) == index.search(
            codes[qi], 5, candidates=sub
        )
    assert np.array_equal(loaded.descriptor(("extra", "x")), desc[11])
    loaded.add(("more", "y"), codes[12])  # ids keep growing after a load
    assert loaded.search(codes[12], 3, max_distance=0, exact=True)[0].distance == 0


class FakeStore:
    """The two store verbs open_or_rebuild uses."""

    def __init__(self, codes: np.ndarray, keys: list[ItemKey]) -> None:
        self.codes = {k: c.tobytes() for k, c in zip(keys, codes, strict=True)}
        self.gen = 1
        self.reads = 0

    def generation(self) -> int:
        return self.gen

    def iter_codes(self, model: str, version: str | None = None) -> Iterator[StoredCode]:
        self.reads += 1
        assert model == "m64"
        for k, c in self.codes.items():
            yield StoredCode(k, c)


@pytest.fixture
def fake_store():
    codes = random_codes(500, 64, seed=4)
    return FakeStore(codes, keys_for(500)), codes


def test_open_or_rebuild_uses_current_index_and_rebuilds_stale(tmp_path, fake_store):
    store, codes = fake_store
    first = open_or_rebuild(tmp_path, store, "m64")
    assert store.reads == 1 and first.generation == 1 and first.count == 500
    again = open_or_rebuild(tmp_path, store, "m64")
    assert store.reads == 1 and again.count == 500  # loaded, not rebuilt
    # a write in the store: the saved index is stale
    store.codes[("new", "item")] = codes[0].tobytes()
    store.gen = 2
    fresh = open_or_rebuild(tmp_path, store, "m64")
    assert store.reads == 2 and fresh.generation == 2 and ("new", "item") in fresh
    assert HashIndex.read_meta(tmp_path)["generation"] == 2
    # another model version is not reused
    open_or_rebuild(tmp_path, store, "m64", version="v9")
    assert store.reads == 3
    # deleting the index files loses nothing
    shutil.rmtree(tmp_path)
    rebuilt = open_or_rebuild(tmp_path, store, "m64")
    assert store.reads == 4 and rebuilt.count == 501


def test_open_or_rebuild_catches_an_older_saved_index_up(tmp_path, fake_store):
    """With ``catch_up``, a saved index older than the store is handed to it and used when it
    says it caught up; rebuilt when it cannot (e.g. a change log that no longer reaches back)."""
    store, codes = fake_store
    open_or_rebuild(tmp_path, store, "m64")
    store.codes[("new", "item")] = codes[0].tobytes()
    store.gen = 2
    handed: list[int] = []

    def catch_up(index: HashIndex) -> bool:  # what a change log would say: one item added
        handed.append(index.generation)
        index.apply({("new", "item"): (codes[0].tobytes(), None)}, generation=2)
        return True

    caught = open_or_rebuild(tmp_path, store, "m64", catch_up=catch_up)
    assert handed == [1] and store.reads == 1  # loaded, not rebuilt
    assert caught.generation == 2 and caught.count == 501
    rebuilt = open_or_rebuild(tmp_path, store, "m64", catch_up=lambda index: False)
    assert store.reads == 2 and rebuilt.generation == 2 and rebuilt.count == 501


@pytest.mark.parametrize(
    "damage",
    [
        "meta_garbage",
        "meta_missing",
        "index_truncated",
        "codes_flipped",
        "keys_garbage",
        "pointer_garbage",
        "pointer_dangling",
    ],
)
def test_corrupt_files_trigger_rebuild_with_warning(tmp_path, fake_store, caplog, damage):
    store, codes = fake_store
    open_or_rebuild(tmp_path, store, "m64")
    saved = SnapshotDir(tmp_path).current()
    assert saved is not None
    if damage == "meta_garbage":
        (saved / META_FILE).write_text("{not json")
    elif damage == "meta_missing":
        (saved / META_FILE).unlink()
    elif damage == "index_truncated":
        raw = (saved / INDEX_FILE).read_bytes()
        (saved / INDEX_FILE).write_bytes(raw[: len(raw) // 2])
    elif damage == "codes_flipped":
        raw = bytearray((saved / CODES_FILE).read_bytes())
        raw[-1] ^= 0xFF
        (saved / CODES_FILE).write_bytes(bytes(raw))
    elif damage == "pointer_garbage":
        (tmp_path / POINTER_FILE).write_text("../elsewhere")
    elif damage == "pointer_dangling":
        shutil.rmtree(saved)
    else:
        (saved / "keys.json").write_text("[1, 2")
    with pytest.raises(IndexLoadError):
        HashIndex.load(tmp_path)
    with caplog.at_level(logging.WARNING, logger="stac_rscbir.index.hashindex"):
        index = open_or_rebuild(tmp_path, store, "m64")
    assert store.reads == 2 and index.count == 500
    assert any("rebuilding" in r.getMessage() for r in caplog.records)
    assert index.search(codes[0], 1)[0].distance == 0
    HashIndex.load(tmp_path)  # the rebuild saved a good set


def test_load_detects_inconsistent_meta(tmp_path, fake_store):
    store, _ = fake_store
    open_or_rebuild(tmp_path, store, "m64")
    saved = SnapshotDir(tmp_path).current()
    assert saved is not None
    meta = json.loads((saved / META_FILE).read_text())
    meta["files"] = {}  # skip checksums: the consistency checks must still catch this
    meta["count"] = 499
    (saved / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(IndexLoadError):
        HashIndex.load(tmp_path)


def _versions(path) -> list[str]:
    return sorted(p.name for p in path.glob("v-*"))


def test_saves_keep_the_current_and_previous_version_only(tmp_path, fake_store):
    store, _ = fake_store
    index = open_or_rebuild(tmp_path, store, "m64")
    names = [SnapshotDir(tmp_path).current().name]
    for gen in (2, 3, 4):
        index.advance(gen)
        index.save(tmp_path)
        names.append(SnapshotDir(tmp_path).current().name)
        assert HashIndex.read_meta(tmp_path)["generation"] == gen
    assert len(set(names)) == 4  # every save is a new version folder
    assert _versions(tmp_path) == sorted(names[-2:])  # the current one and the one before
    assert HashIndex.load(tmp_path).generation == 4


def test_discard_saved_makes_the_next_open_rebuild(tmp_path, fake_store, caplog):
    store, _ = fake_store
    open_or_rebuild(tmp_path, store, "m64")
    HashIndex.discard_saved(tmp_path)
    with pytest.raises(IndexLoadError, match="no saved version"):
        HashIndex.load(tmp_path)
    with caplog.at_level(logging.WARNING, logger="stac_rscbir.index.hashindex"):
        open_or_rebuild(tmp_path, store, "m64")
    assert store.reads == 2 and any("rebuilding" in r.getMessage() for r in caplog.records)
    HashIndex.discard_saved(tmp_path / "never-saved")  # nothing to discard: no error


def test_the_unversioned_layout_is_rebuilt_and_its_files_removed(tmp_path, fake_store):
    """A folder saved by the layout before snapshots (files and meta.json at the top)."""
    store, _ = fake_store
    for name in (INDEX_FILE, CODES_FILE, META_FILE, ".codes.npy.abc123"):
        (tmp_path / name).write_text("old")
    index = open_or_rebuild(tmp_path, store, "m64")
    assert store.reads == 1 and index.count == 500
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock",
        POINTER_FILE,
        *_versions(tmp_path),
    ]


def test_temporaries_of_dead_writers_are_removed_not_those_of_live_ones(tmp_path, fake_store):
    from stac_rscbir.fsutil import host_name

    store, _ = fake_store
    index = open_or_rebuild(tmp_path, store, "m64")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    host = host_name()
    abandoned = tmp_path / f".tmp-{host}-{int(dead.stdout)}-0123456789ab"
    live = tmp_path / f".tmp-{host}-{os.getpid()}-0123456789ab"  # a save under way here
    for folder in (abandoned, live):
        folder.mkdir()
        (folder / CODES_FILE).write_text("half")
    index.save(tmp_path)
    assert not abandoned.exists() and live.exists()


@pytest.mark.parametrize("bits", [None, 64])
def test_an_empty_index_round_trips(tmp_path, bits):
    """A model with no codes yet (bits unknown, or known): saved and loaded, not rebuilt."""
    index = HashIndex("m64", bits).build([], generation=3)
    index.save(tmp_path)
    loaded = HashIndex.load(tmp_path)
    assert (loaded.count, loaded.bits, loaded.generation) == (0, bits, 3)
    assert loaded.search(np.zeros(8, np.uint8), 5) == []
    loaded.add(("c", "first"), np.arange(8, dtype=np.uint8))  # and it grows from there
    assert loaded.bits == 64 and loaded.search(np.arange(8, dtype=np.uint8), 1)[0].distance == 0
