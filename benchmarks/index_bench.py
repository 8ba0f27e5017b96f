"""Hash index performance (issue 5): exact scan vs memory bandwidth, IVF/HNSW, filtered search.

Codes: ``rand`` = uniform random bits (no structure: ANN indexes fail on them by design);
``clus`` = signs of random projections of a 64-component Gaussian mixture in 32-d (neighbours
meaningful). For each N x bits:

* exact scan: ``HashIndex.search`` (flat) and the raw ``IndexBinaryFlat.search`` per single query,
  with 1 and 2 FAISS threads, as a ratio to the **bandwidth scan**: ``np.add.reduce`` over the code
  array viewed as uint64 (every byte read once, one add per word, no XOR/popcount), timed in the
  same run, 1 thread (2 threads: two Python threads reducing one half each; numpy releases the
  GIL). ``np.bitwise_count(words ^ q)`` is reported as the numpy XOR+popcount scan.
* IVF (nlist ~ sqrt N, trained on 64 x nlist codes, 10 k-means iterations): build time, latency
  and tie-aware recall@10 per nprobe; HNSW (M 16) at 10^6 clustered 64-bit only (slow to build).
* filtered search with 0.1/1/10/50 % of the items allowed: time per query of each strategy
  (gather, overfetch, selector on the flat index; gather, overfetch and their recall on IVF), plus
  what ``auto`` picks. Candidate ids are resolved once per set (``ids_of``): that cost is reported
  separately (key -> id dict lookups).

Writes benchmarks/results/index/index_bench.json and index_bench.png; prints markdown tables.

    .venv/bin/python benchmarks/index_bench.py            # full: 10^6 and 10^7, ~10-15 min
    .venv/bin/python benchmarks/index_bench.py --quick    # 10^5 and 10^6, smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from stac_rscbir.index.hashindex import HashIndex, measure_recall

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "index"
SELECTIVITIES = (0.001, 0.01, 0.1, 0.5)


def make_codes(n: int, bits: int, pattern: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if pattern == "rand":
        return rng.integers(0, 256, (n, bits // 8), dtype=np.uint8)
    centers = rng.normal(size=(64, 32)).astype(np.float32)
    proj = rng.normal(size=(32, bits)).astype(np.float32)
    out = np.empty((n, bits // 8), dtype=np.uint8)
    step = 1_000_000
    for s in range(0, n, step):
        m = min(step, n - s)
        x = centers[rng.integers(0, 64, m)] + 0.35 * rng.normal(size=(m, 32)).astype(np.float32)
        out[s : s + m] = np.packbits(x @ proj > 0, axis=1)
    return out


def clock(fn, repeat: int) -> float:
    """Median wall time of ``fn()`` in ms (one warm-up call)."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def clock_queries(fn, queries: np.ndarray) -> float:
    """Median ms of ``fn(q)`` over the queries (first one also run as warm-up)."""
    fn(queries[0])
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bandwidth_scan(codes: np.ndarray, threads: int, repeat: int) -> float:
    words = codes.reshape(-1).view(np.uint64)
    if threads == 1:
        return clock(lambda: np.add.reduce(words), repeat)
    parts = np.array_split(words, threads)
    with ThreadPoolExecutor(threads) as pool:
        return clock(lambda: list(pool.map(np.add.reduce, parts)), repeat)


def run_config(n: int, bits: int, pattern: str, args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    codes = make_codes(n, bits, pattern, seed=bits + (pattern == "clus"))
    queries = make_codes(max(args.queries, 50), bits, pattern, seed=bits + (pattern == "clus"))
    # queries from the same distribution; for clus the same mixture (same seed -> same centers)
    keys = [("c", f"i{i:08d}") for i in range(n)]
    gen_s = time.perf_counter() - t0
    res: dict[str, Any] = {"n": n, "bits": bits, "pattern": pattern, "gen_s": gen_s}
    nq = args.queries if n <= 1_000_000 else max(5, args.queries // 3)
    qs = queries[:nq]

    # ---------------- exact flat
    t = time.perf_counter()
    flat = HashIndex("bench", kind="flat").build_arrays(keys, codes, generation=0)
    res["flat_build_s"] = time.perf_counter() - t
    raw = flat._index  # the IndexBinaryIDMap2(IndexBinaryFlat)
    words = codes.reshape(-1).view(np.uint64)
    q0 = queries[0].view(np.uint64)
    exact: dict[str, Any] = {}
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        exact[f"bandwidth_ms_{threads}t"] = bandwidth_scan(codes, threads, 5)
        exact[f"faiss_flat_ms_{threads}t"] = clock_queries(lambda q: raw.search(q[None], 10), qs)
        exact[f"hashindex_ms_{threads}t"] = clock_queries(lambda q: flat.search(q, 10), qs)
        batch = queries[:50]
        exact[f"faiss_batch50_ms_per_query_{threads}t"] = clock(
            lambda b=batch: raw.search(b, 10), 2
        ) / len(batch)
        exact[f"ratio_faiss_{threads}t"] = (
            exact[f"faiss_flat_ms_{threads}t"] / exact[f"bandwidth_ms_{threads}t"]
        )
        exact[f"ratio_hashindex_{threads}t"] = (
            exact[f"hashindex_ms_{threads}t"] / exact[f"bandwidth_ms_{threads}t"]
        )
    faiss.omp_set_num_threads(1)
    exact["numpy_xor_popcount_ms_1t"] = clock(
        lambda: np.bitwise_count(words.reshape(n, -1) ^ q0).sum(axis=1, dtype=np.uint16), 3
    )
    res["exact"] = exact

    # ---------------- filtered search on the flat index (1 thread)
    rng = np.random.default_rng(7)
    filtered: dict[str, Any] = {}
    do_filter = n <= 1_000_000 or (pattern == "clus" and bits == 64)
    if do_filter:
        for frac in SELECTIVITIES:
            m = max(1, int(frac * n))
            chosen = np.sort(rng.choice(n, m, replace=False))
            subset = [keys[i] for i in chosen[: min(m, 100_000)]]
            t = time.perf_counter()
            flat.ids_of(subset)
            lookup_us = (time.perf_counter() - t) / len(subset) * 1e6
            cids = flat.ids_of([keys[i] for i in chosen]) if m <= 100_000 else chosen
            row: dict[str, Any] = {"m": m, "key_lookup_us_per_key": lookup_us}
            fq = qs[: max(5, nq // 2)]
            for strat in ("gather", "overfetch", "selector"):
                row[f"{strat}_ms"] = clock_queries(
                    lambda q, s=strat, c=cids: flat.search(q, 10, candidate_ids=c, strategy=s), fq
                )
            flat.search(fq[0], 10, candidate_ids=cids)
            row["auto_picks"] = flat.last_strategy
            row["auto_ms"] = row[f"{row['auto_picks']}_ms"]
            filtered[f"{frac:g}"] = row
    res["filtered_flat"] = filtered
    flat = raw = None  # free the index before the next one
    gc.collect()

    # ---------------- IVF
    ivf_res: dict[str, Any] = {}
    do_ivf = n <= 1_000_000 or pattern == "clus"
    if do_ivf:
        faiss.omp_set_num_threads(2)
        t = time.perf_counter()
        ivf = HashIndex("bench", kind="ivf", nprobe=4).build_arrays(keys, codes, generation=0)
        ivf_res["build_s_2t"] = time.perf_counter() - t
        ivf_res["nlist"] = ivf.nlist
        faiss.omp_set_num_threads(1)
        rq = queries[: min(len(queries), 50 if n <= 1_000_000 else 20)]
        for nprobe in (1, 4, 16, 64):
            ivf.set_nprobe(nprobe)
            ivf_res[f"nprobe{nprobe}"] = {
                "ms": clock_queries(lambda q: ivf.search(q, 10), qs),
                "recall@10": measure_recall(ivf, rq, 10),
            }
        ivf.set_nprobe(16)
        if do_filter:
            ivf_filtered: dict[str, Any] = {}
            for frac in SELECTIVITIES:
                m = max(1, int(frac * n))
                cids = np.sort(rng.choice(n, m, replace=False))
                fq = qs[: max(5, nq // 2)]
                row = {"m": m}
                for strat in ("gather", "overfetch"):
                    row[f"{strat}_ms"] = clock_queries(
                        lambda q, s=strat, c=cids: ivf.search(q, 10, candidate_ids=c, strategy=s),
                        fq,
                    )
                ivf.search(fq[0], 10, candidate_ids=cids)
                row["auto_picks"] = ivf.last_strategy
                row["overfetch_recall@10"] = _filtered_recall(ivf, rq[:20], cids)
                ivf_filtered[f"{frac:g}"] = row
            ivf_res["filtered_nprobe16"] = ivf_filtered
        ivf = None
        gc.collect()
    res["ivf"] = ivf_res

    # ---------------- HNSW (10^6 clustered 64-bit only)
    if args.hnsw and n == 1_000_000 and pattern == "clus" and bits == 64:
        faiss.omp_set_num_threads(2)
        t = time.perf_counter()
        hnsw = HashIndex("bench", kind="hnsw", hnsw_m=16, ef_search=64)
        hnsw.build_arrays(keys, codes, generation=0)
        h: dict[str, Any] = {"build_s_2t": time.perf_counter() - t, "M": 16}
        faiss.omp_set_num_threads(1)
        for ef in (64, 256):
            hnsw.ef_search = ef
            h[f"ef{ef}"] = {
                "ms": clock_queries(lambda q: hnsw.search(q, 10), qs),
                "recall@10": measure_recall(hnsw, queries[:30], 10),
            }
        res["hnsw"] = h
        hnsw = None
        gc.collect()
    res["total_s"] = time.perf_counter() - t0
    print(f"  {pattern} {bits}-bit N={n:.0e}: {res['total_s']:.1f} s", flush=True)
    return res


def _filtered_recall(index: HashIndex, queries: np.ndarray, cids: np.ndarray) -> float:
    """Tie-aware recall@10 of IVF overfetch vs the exact answer on the same candidate ids."""
    total = 0.0
    for q in queries:
        truth = index.search(q, 10, candidate_ids=cids, exact=True, strategy="gather")
        approx = index.search(q, 10, candidate_ids=cids, exact=False, strategy="overfetch")
        if truth:
            bound = truth[-1].distance
            total += sum(1 for hit in approx if hit.distance <= bound) / len(truth)
        else:
            total += 1.0
    return total / len(queries)


def tables(results: list[dict[str, Any]]) -> str:
    lines = [
        "### Exact scan, 1 query, top-10 (ms; ratio to the bandwidth scan of the same bytes)",
        "",
        "| codes | N | bandwidth 1t | FAISS flat 1t | ratio | HashIndex 1t | ratio "
        "| bandwidth 2t | FAISS 2t | ratio 2t | batch of 50, 2t, per query | numpy XOR+popcount |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e = r["exact"]
        lines.append(
            f"| {r['pattern']} {r['bits']} | {r['n']:.0e} | {e['bandwidth_ms_1t']:.2f} "
            f"| {e['faiss_flat_ms_1t']:.2f} | {e['ratio_faiss_1t']:.2f}x "
            f"| {e['hashindex_ms_1t']:.2f} | {e['ratio_hashindex_1t']:.2f}x "
            f"| {e['bandwidth_ms_2t']:.2f} | {e['faiss_flat_ms_2t']:.2f} "
            f"| {e['ratio_faiss_2t']:.2f}x | {e['faiss_batch50_ms_per_query_2t']:.2f} "
            f"| {e['numpy_xor_popcount_ms_1t']:.1f} |"
        )
    lines += [
        "",
        "### IVF (nprobe sweep) and HNSW: ms per query (1 thread), tie-aware recall@10",
        "",
        "| codes | N | nlist | build (2t) | nprobe 1 | nprobe 4 | nprobe 16 | nprobe 64 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        v = r["ivf"]
        if not v:
            continue
        cells = [
            f"{v[f'nprobe{p}']['ms']:.3f} ms / {v[f'nprobe{p}']['recall@10']:.3f}"
            for p in (1, 4, 16, 64)
        ]
        lines.append(
            f"| {r['pattern']} {r['bits']} | {r['n']:.0e} | {v['nlist']} "
            f"| {v['build_s_2t']:.1f} s | " + " | ".join(cells) + " |"
        )
    for r in results:
        if "hnsw" in r:
            h = r["hnsw"]
            lines.append(
                f"\nHNSW M {h['M']} ({r['pattern']} {r['bits']}, N {r['n']:.0e}): build "
                f"{h['build_s_2t']:.1f} s (2t); efSearch 64: {h['ef64']['ms']:.3f} ms / "
                f"{h['ef64']['recall@10']:.3f}; efSearch 256: {h['ef256']['ms']:.3f} ms / "
                f"{h['ef256']['recall@10']:.3f}"
            )
    lines += [
        "",
        "### Filtered search, top-10, ms per query (1 thread); candidate ids resolved once",
        "",
        "| codes | N | allowed | m | flat gather | flat overfetch | flat selector | auto picks "
        "| IVF gather | IVF overfetch (recall) | IVF auto | key lookup us/key |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for frac, f in r["filtered_flat"].items():
            iv = r["ivf"].get("filtered_nprobe16", {}).get(frac)
            ivf_cells = (
                f"{iv['gather_ms']:.3f} | {iv['overfetch_ms']:.3f} "
                f"({iv['overfetch_recall@10']:.2f}) | {iv['auto_picks']}"
                if iv
                else "- | - | -"
            )
            lines.append(
                f"| {r['pattern']} {r['bits']} | {r['n']:.0e} | {float(frac) * 100:g} % "
                f"| {f['m']} | {f['gather_ms']:.3f} | {f['overfetch_ms']:.3f} "
                f"| {f['selector_ms']:.3f} | {f['auto_picks']} | {ivf_cells} "
                f"| {f['key_lookup_us_per_key']:.2f} |"
            )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    labels = [f"{r['pattern']}{r['bits']}\n{r['n']:.0e}" for r in results]
    x = np.arange(len(results))
    for off, key, name in (
        (-0.3, "bandwidth_ms_1t", "bandwidth scan 1t"),
        (-0.1, "faiss_flat_ms_1t", "FAISS flat 1t"),
        (0.1, "hashindex_ms_1t", "HashIndex 1t"),
        (0.3, "faiss_flat_ms_2t", "FAISS flat 2t"),
    ):
        ax.bar(x + off, [r["exact"][key] for r in results], 0.2, label=name)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per query")
    ax.set_title("Exact scan vs bandwidth scan")
    ax.legend(fontsize=7)

    ax = axes[1]
    for r in results:
        v = r["ivf"]
        if not v:
            continue
        pts = [(v[f"nprobe{p}"]["ms"], v[f"nprobe{p}"]["recall@10"]) for p in (1, 4, 16, 64)]
        ax.plot(*zip(*pts, strict=True), "o-", label=f"IVF {r['pattern']}{r['bits']} {r['n']:.0e}")
        if "hnsw" in r:
            h = r["hnsw"]
            ax.plot(
                [h["ef64"]["ms"], h["ef256"]["ms"]],
                [h["ef64"]["recall@10"], h["ef256"]["recall@10"]],
                "s--",
                label=f"HNSW {r['pattern']}{r['bits']} {r['n']:.0e}",
            )
    ax.set_xscale("log")
    ax.set_xlabel("ms per query (1 thread)")
    ax.set_ylabel("recall@10 (tie-aware)")
    ax.set_title("ANN: latency vs recall (nprobe 1/4/16/64)")
    ax.legend(fontsize=6)

    ax = axes[2]
    for r in results:
        if not r["filtered_flat"] or r["pattern"] != "clus":
            continue
        fr = sorted(r["filtered_flat"], key=float)
        for strat, style in (("gather", "o-"), ("overfetch", "s-"), ("selector", "^:")):
            ax.plot(
                [float(f) * 100 for f in fr],
                [r["filtered_flat"][f][f"{strat}_ms"] for f in fr],
                style,
                label=f"{strat} {r['bits']}b {r['n']:.0e}",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("allowed items (%)")
    ax.set_ylabel("ms per query (flat, 1 thread)")
    ax.set_title("Filtered exact search strategies")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10^5 and 10^6 only")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--no-hnsw", dest="hnsw", action="store_false")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    sizes = args.sizes or ([100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000])
    results = []
    t0 = time.perf_counter()
    for n in sizes:
        for pattern in ("rand", "clus"):
            for bits in (64, 128):
                results.append(run_config(n, bits, pattern, args))
                gc.collect()
    table = tables(results)
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "faiss": faiss.__version__,
            "numpy": np.__version__,
        },
        "bandwidth_scan": "np.add.reduce over the codes viewed as uint64 (1t); 2t: two threads "
        "reducing one half each",
        "total_s": time.perf_counter() - t0,
        "results": results,
    }
    (args.out / "index_bench.json").write_text(json.dumps(payload, indent=1))
    (args.out / "index_bench.md").write_text(table + "\n")
    plot(results, args.out / "index_bench.png")
    print(table)
    print(f"\ntotal {payload['total_s']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
