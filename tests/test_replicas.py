"""Several API replicas over one catalog (issue 18): 2 and 4 ``stac-rscbir serve`` processes over
one pgstac database, 2 over one SQLite file (tests/replicas.py starts them). Writes through the
API go round-robin to the replicas (POST, PUT that changes the code, DELETE), interleaved with
writes behind their backs (``pypgstac load`` of a new collection on pgstac, a second store
object on SQLite). After each acknowledged write every replica shows it to similarity search
(polled, within a generous deadline: visibility, not speed, is tested here; the staleness
distribution is benchmarks/replica_bench.py's); after each write behind their backs every
replica's index reaches the store's generation with no search asked (its follower thread, read
from ``GET /_mgmt/indexes``); no replica rebuilds its index after start (the same counters); and
at the end every replica's whole ranking equals the brute-force Hamming ranking over the store's
codes."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stac_rscbir.extension.cbir import HashCode
from stac_rscbir.store.base import ItemKey

from .api_builders import MODEL, _collection, _item
from .replicas import Catalog, Replicas, brute_force, first_code, random_codes, ranking_mismatch

PRELOAD = 300  # items of the "scenes" collection before the replicas start
ROUNDS = 4  # of one POST, one PUT and one DELETE through the API
LOADED = 40  # items per collection written behind the replicas' backs (every other round)
DEADLINE_S = 30.0  # a write not visible on every replica by then is a failure

# (store, replicas, one index folder shared by all): pgstac replicas on separate hosts have
# folders of their own; SQLite replicas share a host, and so a disk, with the file
CASES = [("pgstac", 2, True), ("pgstac", 4, False), ("sqlite", 2, True)]


def _bits(code: HashCode) -> np.ndarray:
    return np.unpackbits(code.packed())[:64]


class Catalogue:
    """What the store should hold: item number and code per key; builds the items."""

    def __init__(self) -> None:
        self.items: dict[ItemKey, tuple[int, HashCode]] = {}
        self.next_number = 0

    def item(self, collection: str, code: HashCode, number: int | None = None) -> dict[str, Any]:
        if number is None:
            number, self.next_number = self.next_number, self.next_number + 1
        item = _item(number, collection, _bits(code))
        self.items[(collection, item["id"])] = (number, first_code(item))
        return item


@pytest.mark.parametrize(("kind", "n", "shared"), CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_every_replica_shows_every_write_without_rebuilding(
    kind: str, n: int, shared: bool, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    target = request.getfixturevalue("pgstac_db") if kind == "pgstac" else tmp_path / "stac.db"
    catalog = Catalog(kind, str(target))
    rng = np.random.default_rng(18 + n)
    want = Catalogue()
    preload = [want.item("scenes", c) for c in random_codes(MODEL, rng, PRELOAD)]
    store = catalog.open()
    store.create_collection(_collection())
    store.upsert_items(preload)
    store.close()  # type: ignore[attr-defined]

    with Replicas(catalog, n, tmp_path, shared_index=shared) as replicas:
        probe = first_code(preload[0])
        for i in range(n):  # each replica loads (or builds) the model's index once
            assert replicas.top(i, MODEL, probe, 1) == [(0, ("scenes", preload[0]["id"]))]
        before = replicas.rebuilds(MODEL)

        def on_all(check: Callable[[int], bool], what: object) -> None:
            took = replicas.wait_all(check, DEADLINE_S)
            late = [i for i, t in enumerate(took) if math.isinf(t)]
            assert not late, f"{what}: not on replicas {late} in {DEADLINE_S} s\n{replicas.logs()}"

        def everywhere(key: ItemKey, new: HashCode | None, old: HashCode | None) -> None:
            on_all(lambda i: replicas.reflects(i, MODEL, key, new, old), key)

        def followed(generation: int) -> None:
            """No search asked: each replica's follower thread catches its index up."""
            on_all(lambda i: replicas.index_generation(i, MODEL) >= generation, generation)

        for r in range(ROUNDS):
            # POST a new item with a random code
            item = want.item("scenes", random_codes(MODEL, rng, 1)[0])
            replicas.post_item(replicas.next_writer(), item)
            key = ("scenes", item["id"])
            everywhere(key, want.items[key][1], None)
            # PUT another item (any collection) with a new code
            key = sorted(want.items)[int(rng.integers(len(want.items)))]
            number, old = want.items[key]
            new = want.item(key[0], random_codes(MODEL, rng, 1)[0], number)
            replicas.put_item(replicas.next_writer(), new)
            everywhere(key, want.items[key][1], old)
            # DELETE one
            key = sorted(want.items)[int(rng.integers(len(want.items)))]
            _, gone = want.items.pop(key)
            replicas.delete_item(replicas.next_writer(), key)
            everywhere(key, None, gone)
            if r % 2 == 0:  # a new collection behind every replica's back
                cid = f"loaded-{r}"
                loaded = [want.item(cid, c) for c in random_codes(MODEL, rng, LOADED)]
                catalog.write_behind(_collection(cid), loaded, tmp_path)
                followed(replicas.indexes(0)["store_generation"])
                for item in (loaded[0], loaded[LOADED // 2], loaded[-1]):
                    everywhere((cid, item["id"]), first_code(item), None)

        after = replicas.rebuilds(MODEL)
        assert after == before, f"full rebuilds after start: before {before}, after {after}"

        codes = catalog.codes(MODEL)
        assert set(codes) == set(want.items)
        stored = sorted(codes)
        queries = [
            *random_codes(MODEL, rng, 1),
            *(want.items[k][1] for k in stored[:: len(stored) // 2]),
        ]
        for query in queries:
            truth = brute_force(codes, query)
            for i in range(n):
                got = replicas.ranked(i, MODEL, query, len(codes))
                assert ranking_mismatch(got, truth) is None, (i, ranking_mismatch(got, truth))
