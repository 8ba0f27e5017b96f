"""In-process latency under concurrency, and embedded-store timings: the numbers the test suite
used to assert or print (tests/test_concurrency.py, tests/test_store_sqlite.py), which belong
here (a busy machine slows them down without any bug).

* ``readers_writer``: ``--readers`` threads run whole-list similarity searches (k = every
  item) through ``SimilarityClient.page`` (the ranking; no item fetch) over a SQLite store of
  ``--base`` items while one thread adds ``--writes`` items one transaction at a time
  (``--write-interval`` seconds apart): as ``hook after commit`` (the index hook called right
  after the store write, as the API's Transactions endpoints do) and as ``no hook`` (a writer
  the index is not told of, as another process: the searches follow the store's change log).
  Reports search latency (median / p95 / p99 / max), ms per write (store + index hook; saves
  run in the background), and full rebuilds of the index (``LiveIndexes.stats``; 0 expected:
  the index follows the change log).
* ``rebuild_other_model``: while a rebuild of another model is held, one search of the loaded
  model plus one item write and its hook (``--repeats`` times): the ms they take (they must
  not wait for the rebuild; the test asserts that they finish while it is held).
* ``sqlite_store``: ``--items`` items (the service benchmark's items with a cloud cover and a
  platform) upserted into ``SQLiteStore`` in one call, then bbox (1 % of the grid), bbox +
  CQL2, and one-month datetime searches (median of ``--repeats``).

Writes benchmarks/results/concurrency/concurrency_bench.json and prints markdown tables.

    .venv/bin/python benchmarks/concurrency_bench.py
    .venv/bin/python benchmarks/concurrency_bench.py --quick      # smoke test, a few seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from service_bench import COLLECTION, MODEL, items  # noqa: E402

from stac_rscbir.api.similarity import SimilarityClient, SimilarityQuery, StoreCandidates  # noqa: E402
from stac_rscbir.extension.cbir import HashCode  # noqa: E402
from stac_rscbir.store.base import SearchQuery  # noqa: E402
from stac_rscbir.store.sqlite import SQLiteStore  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "concurrency"
PLATFORMS = ("sentinel-2a", "sentinel-2b", "landsat-8")
OTHER_MODEL = "bench-other-64"


def ms(seconds: list[float]) -> dict[str, float]:
    """Median / p95 / p99 / max of durations in seconds, as ms."""
    a = np.asarray(seconds) * 1e3
    return {
        "n": len(a),
        "median_ms": round(float(np.median(a)), 2),
        "p95_ms": round(float(np.quantile(a, 0.95)), 2),
        "p99_ms": round(float(np.quantile(a, 0.99)), 2),
        "max_ms": round(float(a.max()), 2),
    }


def query_code(item: dict[str, Any]) -> str:
    """The item's code of MODEL (base64, big-endian bits), as the ``similarity.code`` of a query."""
    (entry,) = [c for c in item["properties"]["cbir:codes"] if c["model"] == MODEL]
    return entry["code"]


def readers_writer(
    tmp: Path, base: int, writes: int, n_readers: int, hooked: bool, interval: float
) -> dict[str, Any]:
    """Whole-list similarity searches by ``n_readers`` threads while one thread writes."""
    data = items(base + writes, seed=3)
    store = SQLiteStore(tmp / f"rw-{int(hooked)}.db")
    store.create_collection(COLLECTION)
    store.upsert_items(data[:base])
    service = SimilarityClient(store, tmp / f"rw-index-{int(hooked)}")
    code = query_code(data[0])
    k = base + writes
    sim = SimilarityQuery(model=MODEL, code=code, k=k)
    service.page(sim, StoreCandidates(store, SearchQuery()), 1)  # build the index once
    built = service.indexes.stats()[MODEL]["rebuilds"]
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                page = service.page(sim, StoreCandidates(store, SearchQuery()), k)
                latencies.append(time.perf_counter() - t0)
                assert len(page.hits) >= base
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(n_readers)]
    for t in threads:
        t.start()
    write_times = []
    try:
        for item in data[base:]:
            t0 = time.perf_counter()
            store.create_item(item)
            if hooked:
                service.indexes.on_item("bench", item, item["id"])
            write_times.append(time.perf_counter() - t0)
            time.sleep(interval)  # pacing: the reads run over the whole write phase
    finally:
        stop.set()
        for t in threads:
            t.join()
    rebuilds = service.indexes.stats()[MODEL]["rebuilds"] - built
    service.indexes.close()
    store.close()
    if errors:
        raise errors[0]
    return {
        "writes_as": "hook after commit" if hooked else "no hook",
        "base_items": base,
        "writes": writes,
        "write_interval_s": interval,
        "readers": n_readers,
        "k": k,
        "search": ms(latencies),
        "write": ms(write_times),
        "rebuilds": rebuilds,
    }


def rebuild_other_model(tmp: Path, base: int, repeats: int) -> dict[str, Any]:
    """A search of the loaded model, then a write and its hook, while another model rebuilds."""
    data = items(base + repeats, seed=4)
    rng = np.random.default_rng(5)
    for item in data:  # a code of a second model, the one being rebuilt
        code = HashCode.from_bits(OTHER_MODEL, "1.0.0", rng.integers(0, 2, 64, dtype=np.uint8))
        item["properties"]["cbir:codes"].append(code.to_dict())
    store = SQLiteStore(tmp / "rebuild.db")
    store.create_collection(COLLECTION)
    store.upsert_items(data[:base])
    service = SimilarityClient(store, tmp / "rebuild-index")
    sim = SimilarityQuery(model=MODEL, code=query_code(data[0]), k=10)
    service.page(sim, StoreCandidates(store, SearchQuery()), 10)
    original_open = service.indexes._open
    entered, release = threading.Event(), threading.Event()

    def slow_open(model: str):  # type: ignore[no-untyped-def]
        if model == OTHER_MODEL:
            entered.set()
            release.wait(600)
        return original_open(model)

    service.indexes._open = slow_open  # type: ignore[method-assign]
    times = []
    for item in data[base:]:
        entered.clear()
        release.clear()
        slow = threading.Thread(target=service.indexes.index, args=(OTHER_MODEL,))
        slow.start()
        try:
            if not entered.wait(60):
                raise RuntimeError("the rebuild did not start")
            t0 = time.perf_counter()
            service.page(sim, StoreCandidates(store, SearchQuery()), 10)
            store.create_item(item)
            service.indexes.on_item("bench", item, item["id"])
            times.append(time.perf_counter() - t0)
        finally:
            release.set()
            slow.join()
        with service.indexes._lock:  # rebuild it from the store again next time
            service.indexes._drop(OTHER_MODEL)
    service.indexes.close()
    store.close()
    return {"base_items": base, "search_and_write": ms(times)}


def store_items(n: int) -> list[dict[str, Any]]:
    """The service benchmark's items, with a cloud cover and a platform to filter on."""
    rng = np.random.default_rng(11)
    out = items(n, seed=11)
    for item in out:
        item["properties"]["eo:cloud_cover"] = round(float(rng.uniform(0, 100)), 2)
        item["properties"]["platform"] = PLATFORMS[int(rng.integers(0, 3))]
    return out


def clock(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median seconds of ``fn()`` over ``repeats`` calls (after one warm-up), and its result."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def sqlite_store(tmp: Path, n: int, repeats: int) -> dict[str, Any]:
    data = store_items(n)
    store = SQLiteStore(tmp / "store.db")
    store.create_collection(COLLECTION)
    t0 = time.perf_counter()
    store.upsert_items(data)
    upsert = time.perf_counter() - t0
    assert store.count() == n
    bbox = [10.0, 45.0, 10.3, 45.3]  # 1 % of the grid
    queries = {
        "bbox 1%": SearchQuery(bbox=bbox, limit=10),
        "bbox 1% + cql2": SearchQuery(
            bbox=bbox, filter="eo:cloud_cover < 10 AND platform = 'sentinel-2a'", limit=10
        ),
        "datetime 1 month": SearchQuery(
            datetime="2020-02-01T00:00:00Z/2020-03-01T00:00:00Z", limit=10
        ),
    }
    rows = []
    for name, q in queries.items():
        seconds, page = clock(lambda q=q: store.search(q), repeats)
        rows.append({"query": name, "median_ms": round(seconds * 1e3, 2), "matched": page.matched})
    store.close()
    return {"items": n, "upsert_one_call_s": round(upsert, 2), "searches": rows}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| writes | search median / p95 / p99 / max ms | searches | ms per write (median / max) "
        "| rebuilds |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in report["readers_writer"]:
        s, w = r["search"], r["write"]
        lines.append(
            f"| {r['writes_as']} | {s['median_ms']:.1f} / {s['p95_ms']:.1f} / {s['p99_ms']:.1f} "
            f"/ {s['max_ms']:.1f} | {s['n']} | {w['median_ms']:.1f} / {w['max_ms']:.1f} "
            f"| {r['rebuilds']} |"
        )
    rb = report["rebuild_other_model"]["search_and_write"]
    lines += [
        "",
        f"Search + write + hook while another model's rebuild is held: median "
        f"{rb['median_ms']:.1f} ms, max {rb['max_ms']:.1f} ms ({rb['n']} times).",
        "",
        "| SQLite store, {:,} items (upsert in one call: {:.2f} s) | median ms | matched |".format(
            report["sqlite_store"]["items"], report["sqlite_store"]["upsert_one_call_s"]
        ),
        "|---|---:|---:|",
    ]
    for r in report["sqlite_store"]["searches"]:
        lines.append(f"| {r['query']} | {r['median_ms']:.1f} | {r['matched']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=1000, help="items before the writes")
    parser.add_argument("--writes", type=int, default=500, help="items written during the reads")
    parser.add_argument("--write-interval", type=float, default=0.01, help="seconds between writes")
    parser.add_argument("--readers", type=int, default=3)
    parser.add_argument("--items", type=int, default=20_000, help="items of the store timings")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--faiss-threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.quick:
        args.base, args.writes, args.items, args.repeats = 200, 10, 2000, 3
    import faiss

    faiss.omp_set_num_threads(args.faiss_threads)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        rw = [
            readers_writer(tmp, args.base, args.writes, args.readers, hooked, args.write_interval)
            for hooked in (True, False)
        ]
        rebuild = rebuild_other_model(tmp, args.base, args.repeats)
        store = sqlite_store(tmp, args.items, args.repeats)
    report = {
        "readers_writer": rw,
        "rebuild_other_model": rebuild,
        "sqlite_store": store,
        "faiss_threads": args.faiss_threads,
        "elapsed_s": round(time.perf_counter() - start, 1),
        "machine": (
            f"{platform.node()} {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, 1-minute load average {load_before:.2f} before the run"
        ),
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
    }
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "concurrency_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
