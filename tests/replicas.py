"""Several API replicas over one catalog: N ``stac-rscbir serve`` OS processes (tests/serving.py)
over one pgstac database or one SQLite file, each with its own ``--index-dir`` (replicas on
different hosts share no disk) or all with one (replicas on one host); writes sent to any of
them, writes behind their backs (``pypgstac load``; a second store object on SQLite), and the
checks: what each replica's similarity search shows, its index counters (``GET /_mgmt/indexes``)
and its whole ranking against a brute-force Hamming ranking over the store's codes.

Shared by tests/test_replicas.py (small, in CI) and benchmarks/replica_bench.py (larger, with
the staleness distribution).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np

from stac_rscbir.extension.cbir import HashCode
from stac_rscbir.store.base import ItemKey, ItemStore

from .serving import ServeProcess, store_args

Hit = tuple[int, ItemKey]  # (Hamming distance, (collection, id))


@dataclass(frozen=True)
class Catalog:
    """The one store all replicas serve: ``kind`` "sqlite" (``target`` a file) or "pgstac"
    (``target`` a DSN)."""

    kind: str
    target: str

    def serve_args(self) -> list[str]:
        return store_args(self.kind, self.target)

    def open(self) -> ItemStore:
        """A store object of its own on the catalog (the caller closes it)."""
        if self.kind == "sqlite":
            from stac_rscbir.store.sqlite import SQLiteStore

            return SQLiteStore(self.target)
        from stac_rscbir.store.pgstac import PgstacStore

        return PgstacStore(self.target)

    def write_behind(
        self, collection: dict[str, Any], items: Sequence[dict[str, Any]], work: Path
    ) -> None:
        """A new collection and its items written behind every replica's back: ``pypgstac
        load`` (a new partition) on pgstac, a second store object on SQLite (another process
        writing the same file, as far as the replicas can tell)."""
        if self.kind == "pgstac":
            from .pgcluster import pypgstac_load

            name = collection["id"]
            cpath, ipath = work / f"{name}.collection.ndjson", work / f"{name}.items.ndjson"
            cpath.write_text(json.dumps(collection) + "\n")
            ipath.write_text("".join(json.dumps(item) + "\n" for item in items))
            pypgstac_load(self.target, "collections", cpath, "insert_ignore")
            pypgstac_load(self.target, "items", ipath, "insert")
            return
        store = self.open()
        try:
            store.create_collection(collection)
            store.upsert_items(items)
        finally:
            store.close()  # type: ignore[attr-defined]

    def codes(self, model: str) -> dict[ItemKey, bytes]:
        """Every stored code of ``model`` (packed bytes), read by a store object of its own."""
        store = self.open()
        try:
            return {c.key: c.code for c in store.iter_codes(model)}
        finally:
            store.close()  # type: ignore[attr-defined]


def query_body(model: str, code: HashCode, k: int, limit: int) -> dict[str, Any]:
    """A search by ``code`` whose features carry only what a ranking needs (fields extension)."""
    return {
        "similarity": {"model": model, "code": code.code, "k": k},
        "limit": limit,
        "fields": {"include": ["id", "collection", "properties.cbir:distance"]},
    }


def hits(page: dict[str, Any]) -> list[Hit]:
    """(distance, key) of the features of a search page."""
    return [
        (f["properties"]["cbir:distance"], (f["collection"], f["id"])) for f in page["features"]
    ]


def ranked(client: httpx.Client, model: str, code: HashCode, k: int, limit: int = 500) -> list[Hit]:
    """The whole ranked list (``k`` hits) of a query by ``code``, paged through its ``next``
    links."""
    body = query_body(model, code, k, limit)
    out: list[Hit] = []
    while True:
        r = client.post("/search", json=body)
        assert r.status_code == 200, r.text
        page = r.json()
        out += hits(page)
        nxt = [link for link in page.get("links", []) if link.get("rel") == "next"]
        if not nxt:
            return out
        body = {**body, **(nxt[0].get("body") or {})}
        if "token" not in body:  # a GET-style next link
            body["token"] = httpx.URL(nxt[0]["href"]).params["token"]


def brute_force(codes: dict[ItemKey, bytes], query: HashCode) -> list[Hit]:
    """(Hamming distance, key) of every code, nearest first (ties in key order)."""
    keys = list(codes)
    stacked = np.frombuffer(b"".join(codes[k] for k in keys), np.uint8).reshape(len(keys), -1)
    dist = np.unpackbits(stacked ^ query.packed()[None, :], axis=1).sum(axis=1)
    return sorted((int(d), k) for d, k in zip(dist, keys, strict=True))


def ranking_mismatch(got: list[Hit], want: list[Hit]) -> str | None:
    """Why ``got`` is not the head of the brute-force ranking ``want``, tie-aware (the same
    distances in order, the same set of keys at each distance; at the last distance of a list
    cut short of ``want``, a subset of its keys there); None when it is."""
    got_d, want_d = [d for d, _ in got], [d for d, _ in want[: len(got)]]
    if got_d != want_d or (not got and want):
        return f"{len(got_d)} distances {got_d[:20]}..., want {len(want_d)}: {want_d[:20]}..."
    cut = got_d[-1] if got and len(got) < len(want) else None
    for dist in sorted(set(got_d)):
        g = {k for d, k in got if d == dist}
        w = {k for d, k in want if d == dist}
        if g - w or (g != w and dist != cut):
            return f"at distance {dist}: extra {sorted(g - w)[:5]}, missing {sorted(w - g)[:5]}"
    return None


class Replicas:
    """``n`` ``stac-rscbir serve`` processes over ``catalog``, writes behind ``write_token``;
    each with an index folder of its own under ``work`` (``shared_index=False``: replicas on
    different hosts) or one shared folder (one host). A context manager: all start side by
    side and are stopped at exit; their logs are ``work/replica-<i>.log``."""

    def __init__(
        self,
        catalog: Catalog,
        n: int,
        work: Path,
        *,
        shared_index: bool,
        write_token: str = "replica-test-token",
        timeout: float = 60.0,
    ) -> None:
        self.catalog = catalog
        self.shared_index = shared_index
        self.auth = {"Authorization": f"Bearer {write_token}"}
        self.servers = [
            ServeProcess(
                catalog.serve_args(),
                work / ("index" if shared_index else f"index-{i}"),
                work / f"replica-{i}.log",
                write_token,
            )
            for i in range(n)
        ]
        self.clients: list[httpx.Client] = []
        self.timeout = timeout
        self._next = 0

    def __len__(self) -> int:
        return len(self.servers)

    def __enter__(self) -> Replicas:
        try:
            for server in self.servers:
                server.launch()
            for server in self.servers:
                server.wait()
        except BaseException:
            self.close()
            raise
        self.clients = [httpx.Client(base_url=s.url, timeout=self.timeout) for s in self.servers]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for server in self.servers:
            server.stop()

    def logs(self) -> str:
        """The tail of every replica's log (for a failure message)."""
        return "\n".join(
            f"--- replica {i}:\n{s.log.read_text(errors='replace')[-1500:]}"
            for i, s in enumerate(self.servers)
            if s.log.is_file()
        )

    # ------------------------------------------------------------------------------- writes
    def next_writer(self) -> int:
        """The replica the next write goes to (round-robin)."""
        i = self._next
        self._next = (i + 1) % len(self.servers)
        return i

    def _write(self, i: int, method: str, url: str, **kwargs: Any) -> httpx.Response:
        r = self.clients[i].request(method, url, headers=self.auth, **kwargs)
        assert r.is_success, f"{method} {url} on replica {i}: {r.status_code} {r.text[:500]}"
        return r

    def post_item(self, i: int, item: dict[str, Any]) -> httpx.Response:
        return self._write(i, "POST", f"/collections/{item['collection']}/items", json=item)

    def put_item(self, i: int, item: dict[str, Any]) -> httpx.Response:
        url = f"/collections/{item['collection']}/items/{item['id']}"
        return self._write(i, "PUT", url, json=item)

    def delete_item(self, i: int, key: ItemKey) -> httpx.Response:
        return self._write(i, "DELETE", f"/collections/{key[0]}/items/{key[1]}")

    # ------------------------------------------------------------------------------- reads
    def indexes(self, i: int) -> dict[str, Any]:
        """Replica ``i``'s ``GET /_mgmt/indexes``: the store's generation and, per loaded
        model, its index's generation, count, rebuilds, followed changes and loads."""
        r = self.clients[i].get("/_mgmt/indexes")
        assert r.status_code == 200, f"/_mgmt/indexes on replica {i}: {r.status_code} {r.text}"
        return r.json()

    def rebuilds(self, model: str) -> list[int]:
        """Full rebuilds of ``model``'s index since each replica started."""
        return [int(self.indexes(i)["models"][model]["rebuilds"]) for i in range(len(self))]

    def index_generation(self, i: int, model: str) -> int:
        """The store generation replica ``i``'s index of ``model`` reflects (no search asked:
        what the replica did by itself), -1 while it has not loaded it."""
        got = self.indexes(i)["models"].get(model)
        return -1 if got is None else int(got["generation"])

    def top(self, i: int, model: str, code: HashCode, k: int = 5) -> list[Hit]:
        """Replica ``i``'s first ``k`` hits of a search by ``code``."""
        r = self.clients[i].post("/search", json=query_body(model, code, k, k))
        assert r.status_code == 200, f"search on replica {i}: {r.status_code} {r.text[:500]}"
        return hits(r.json())

    def shows(self, i: int, model: str, code: HashCode, key: ItemKey) -> bool:
        """Replica ``i`` returns ``key`` first, at distance 0, for a search by its code."""
        got = self.top(i, model, code, 1)
        return bool(got) and got[0] == (0, key)

    def hides(self, i: int, model: str, code: HashCode, key: ItemKey) -> bool:
        """Replica ``i`` does not return ``key`` at distance 0 for a search by ``code`` (the
        item is gone, or its code changed)."""
        return (0, key) not in self.top(i, model, code, 5)

    def reflects(
        self, i: int, model: str, key: ItemKey, new: HashCode | None, old: HashCode | None
    ) -> bool:
        """Replica ``i``'s similarity search reflects a write of ``key``: it shows the item by
        its ``new`` code (None: deleted) and no longer by its ``old`` one (None: created)."""
        return (new is None or self.shows(i, model, new, key)) and (
            old is None or self.hides(i, model, old, key)
        )

    def ranked(self, i: int, model: str, code: HashCode, k: int) -> list[Hit]:
        return ranked(self.clients[i], model, code, k)

    # ------------------------------------------------------------------------------- waiting
    def wait_all(self, check: Callable[[int], bool], deadline_s: float) -> list[float]:
        """Poll every replica until ``check(i)`` holds, all replicas at once (a thread each,
        polling back to back): the seconds each took from the call (``math.inf`` for a replica
        not there within ``deadline_s``)."""

        def poll(i: int) -> float:
            start = time.perf_counter()
            end = start + deadline_s
            while True:
                if check(i):
                    return time.perf_counter() - start
                if time.perf_counter() > end:
                    return math.inf

        with ThreadPoolExecutor(len(self)) as pool:
            return list(pool.map(poll, range(len(self))))


def random_codes(model: str, rng: np.random.Generator, n: int, bits: int = 64) -> list[HashCode]:
    """``n`` uniformly random codes of ``model`` (version 1.0.0)."""
    return [HashCode.from_bits(model, "1.0.0", rng.integers(0, 2, bits)) for _ in range(n)]


def first_code(item: dict[str, Any]) -> HashCode:
    return HashCode.from_dict(item["properties"]["cbir:codes"][0])
