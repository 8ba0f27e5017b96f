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

``--archive`` (issue 18): clustered 64-bit codes at 10^7 and 10^8 (``--sizes``), generated in
chunks. FAISS alone (an IndexBinaryIVF, nlist = sqrt(N) capped by ``--max-nlist``, trained on
64 x nlist codes; ids = row numbers): training and add time and throughput (``--build-threads``,
default 1: with 2 OpenMP threads on 2 shared, oversubscribed cores, add ran 10-30x slower than
with 1, OpenMP's spinning threads waiting for each other), memory
by RSS delta and from the structures, single-query top-10 latency of the exact scan
(``faiss.knn_hamming`` over the code array, HashIndex's exact path) and of IVF at nprobe
1/4/16 with 1 and 2 threads, tie-aware recall@10, write/read time of the index file. Up to
``--hashindex-max`` (10^7) the same for the real ``HashIndex`` including its Python keys and
key->id dict, with ``HashIndex.save`` / ``load``. Load average and RSS recorded at each phase.
Each size is merged into benchmarks/results/index/index_archive.json (.md, .png) as it ends.

    .venv/bin/python benchmarks/index_bench.py            # full: 10^6 and 10^7, ~10-15 min
    .venv/bin/python benchmarks/index_bench.py --quick    # 10^5 and 10^6, smoke test
    .venv/bin/python benchmarks/index_bench.py --archive  # 10^7 then 10^8, ~30 min, ~4 GB
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

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
    for s in tqdm(range(0, n, step), desc=f"codes {n:.0e}", unit="M", disable=n < 10 * step):
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


# ---------------------------------------------------------------------------- archive sizes

ARCHIVE_NPROBES = (1, 4, 16)
ARCHIVE_CHUNK = 1_000_000  # codes per add_with_ids call (progress, bounded temporaries)


def rss_mb(pid: int | str = "self") -> float:
    """Resident memory of process ``pid`` (default: this one) in MB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def phase(res: dict[str, Any], name: str, t0: float) -> None:
    """Record when phase ``name`` starts: seconds since ``t0``, load average (the machine is
    shared with other sessions) and resident memory."""
    res.setdefault("phases", {})[name] = {
        "at_s": round(time.perf_counter() - t0, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "rss_mb": round(rss_mb(), 1),
    }
    print(f"  [{name}] load {os.getloadavg()[0]:.2f}, RSS {rss_mb():.0f} MB", flush=True)


def tie_recall(exact_d: np.ndarray, approx_d: np.ndarray, approx_i: np.ndarray) -> float:
    """Mean tie-aware recall@k from the distance rows of an exact and an approximate search: a
    returned hit counts when within the k-th exact distance (the rule of measure_recall)."""
    hits = (approx_d <= exact_d[:, -1:]) & (approx_i >= 0)
    return float(hits.sum(axis=1).mean() / exact_d.shape[1])


def ivf_bytes(ntotal: int, nlist: int, code_size: int) -> int:
    """Bytes an IndexBinaryIVF holds: per code its bytes and an int64 id in the inverted
    lists, plus the nlist centroids of the flat quantizer."""
    return ntotal * (code_size + 8) + nlist * code_size


def build_raw_ivf(codes: np.ndarray, nlist: int) -> tuple[Any, dict[str, Any]]:
    """A FAISS IndexBinaryIVF over ``codes`` (ids = row numbers), trained on the sample
    HashIndex takes (64 x nlist codes, 10 k-means iterations); training and add timed apart,
    the add in chunks with a progress bar."""
    n, code_size = codes.shape
    size = min(n, max(64 * nlist, 10_000))
    sample = codes[np.sort(np.random.default_rng(0).choice(n, size, replace=False))]
    quantizer = faiss.IndexBinaryFlat(code_size * 8)
    ivf = faiss.IndexBinaryIVF(quantizer, code_size * 8, nlist)
    ivf.cp.niter = 10
    t = time.perf_counter()
    ivf.train(sample)
    out: dict[str, Any] = {"train_codes": size, "train_s": time.perf_counter() - t}
    t = time.perf_counter()
    for s in tqdm(range(0, n, ARCHIVE_CHUNK), desc=f"IVF add {n:.0e}", unit="M"):
        m = min(ARCHIVE_CHUNK, n - s)
        ivf.add_with_ids(codes[s : s + m], np.arange(s, s + m, dtype=np.int64))
    out["add_s"] = time.perf_counter() - t
    out["add_codes_per_s"] = n / out["add_s"]
    return ivf, out


def archive_raw(
    codes: np.ndarray, queries: np.ndarray, nlist: int, res: dict[str, Any], t0: float, tmp: Path
) -> None:
    """FAISS alone (what holds at 10^8): IVF train/add, exact (knn_hamming over the code
    array, HashIndex's exact path) and IVF latency at 1 and 2 threads, tie-aware recall@10 per
    nprobe, write/read time of the index file, memory by RSS delta and by structure."""
    n, code_size = codes.shape
    qs, rq = queries[: res["latency_queries"]], queries[: res["recall_queries"]]
    phase(res, "raw IVF build", t0)
    faiss.omp_set_num_threads(res["build_threads"])
    before = rss_mb()
    ivf, build = build_raw_ivf(codes, nlist)
    build["rss_delta_mb"] = rss_mb() - before
    build["struct_bytes"] = ivf_bytes(n, nlist, code_size)
    raw: dict[str, Any] = {"build": build}
    phase(res, "raw search", t0)
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        raw[f"exact_ms_{threads}t"] = clock_queries(
            lambda q: faiss.knn_hamming(q[None], codes, 10), qs
        )
        for p in ARCHIVE_NPROBES:
            ivf.nprobe = p
            raw[f"ivf_nprobe{p}_ms_{threads}t"] = clock_queries(
                lambda q: ivf.search(q[None], 10), qs
            )
    faiss.omp_set_num_threads(2)
    exact_d, _ = faiss.knn_hamming(rq, codes, 10)
    for p in ARCHIVE_NPROBES:
        ivf.nprobe = p
        d, i = ivf.search(rq, 10)
        raw[f"recall@10_nprobe{p}"] = tie_recall(exact_d, d, i)
    phase(res, "raw write/read", t0)
    path = tmp / "ivf.faissindex"
    t = time.perf_counter()
    faiss.write_index_binary(ivf, str(path))
    raw["write_s"] = time.perf_counter() - t
    raw["file_bytes"] = path.stat().st_size
    ivf = None
    gc.collect()
    t = time.perf_counter()
    back = faiss.read_index_binary(str(path))
    raw["read_s"] = time.perf_counter() - t  # the file is in the page cache: a warm read
    assert back.ntotal == n, (back.ntotal, n)
    back = None
    path.unlink()
    gc.collect()
    res["raw"] = raw


def key_bytes(keys: list[tuple[str, str]], sample: int = 100_000) -> int:
    """Bytes of the Python key objects (tuple + item id string; the collection string is
    shared), from a sample scaled to all keys."""
    step = max(1, len(keys) // sample)
    picked = keys[::step]
    per = sum(sys.getsizeof(k) + sys.getsizeof(k[1]) for k in picked) / len(picked)
    return int(per * len(keys))


def archive_hashindex(
    codes: np.ndarray, queries: np.ndarray, nlist: int, res: dict[str, Any], t0: float, tmp: Path
) -> None:
    """The real HashIndex (IVF, keys and ids held in Python): memory per code including the
    keys, build time, exact/IVF latency and recall, HashIndex.save / load."""
    n = len(codes)
    qs, rq = queries[: res["latency_queries"]], queries[: res["recall_queries"]]
    phase(res, "HashIndex keys", t0)
    before = rss_mb()
    t = time.perf_counter()
    keys = [("c", f"i{i:09d}") for i in range(n)]
    h: dict[str, Any] = {"keys_s": time.perf_counter() - t, "keys_rss_delta_mb": rss_mb() - before}
    phase(res, "HashIndex build", t0)
    faiss.omp_set_num_threads(res["build_threads"])
    t = time.perf_counter()
    idx = HashIndex("bench", 64, kind="ivf", nlist=nlist, nprobe=4).build_arrays(keys, codes, 0)
    h["build_s"] = time.perf_counter() - t
    struct = {
        "codes_mirror": idx._codes.nbytes + idx._alive.nbytes,
        "faiss_ivf": ivf_bytes(n, idx.nlist, idx.nbytes),
        "key_objects": key_bytes(keys),
        "key_list": sys.getsizeof(idx._keys),
        "key_to_id_dict": sys.getsizeof(idx._ids),
    }
    del keys  # the index holds its own list
    gc.collect()
    h["rss_delta_mb"] = rss_mb() - before
    h["rss_bytes_per_code"] = h["rss_delta_mb"] * 2**20 / n
    h["struct_bytes"] = struct
    h["struct_bytes_per_code"] = sum(struct.values()) / n
    phase(res, "HashIndex search", t0)
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        h[f"exact_ms_{threads}t"] = clock_queries(lambda q: idx.search(q, 10, exact=True), qs)
        for p in ARCHIVE_NPROBES:
            idx.set_nprobe(p)
            h[f"ivf_nprobe{p}_ms_{threads}t"] = clock_queries(lambda q: idx.search(q, 10), qs)
    faiss.omp_set_num_threads(2)
    for p in ARCHIVE_NPROBES:
        idx.set_nprobe(p)
        h[f"recall@10_nprobe{p}"] = measure_recall(idx, rq, 10)
    phase(res, "HashIndex save/load", t0)
    folder = tmp / "hashindex"
    t = time.perf_counter()
    idx.save(folder)
    h["save_s"] = time.perf_counter() - t
    h["saved_bytes"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    idx = None
    gc.collect()
    before = rss_mb()
    t = time.perf_counter()
    back = HashIndex.load(folder)
    h["load_s"] = time.perf_counter() - t  # files in the page cache: a warm read
    h["load_rss_delta_mb"] = rss_mb() - before
    assert back.count == n, (back.count, n)
    back = None
    shutil.rmtree(folder)
    gc.collect()
    res["hashindex"] = h


def archive_config(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """One archive size: clustered 64-bit codes, FAISS alone, then the real HashIndex when
    n <= --hashindex-max (its Python keys need ~150 bytes per code)."""
    t0 = time.perf_counter()
    nlist = max(1, min(round(n**0.5), args.max_nlist))
    res: dict[str, Any] = {
        "n": n,
        "bits": 64,
        "pattern": "clus",
        "nlist": nlist,
        "build_threads": args.build_threads,
        "latency_queries": 20 if n <= 10_000_000 else 10,
        "recall_queries": 50 if n <= 10_000_000 else 20,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    phase(res, "codes", t0)
    before = rss_mb()
    t = time.perf_counter()
    codes = make_codes(n, 64, "clus", seed=65)
    queries = make_codes(50, 64, "clus", seed=65)  # the same mixture (see run_config)
    res["gen_s"] = time.perf_counter() - t
    res["codes_rss_delta_mb"] = rss_mb() - before
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmpdir:
        archive_raw(codes, queries, nlist, res, t0, Path(tmpdir))
        if n <= args.hashindex_max:
            archive_hashindex(codes, queries, nlist, res, t0, Path(tmpdir))
    phase(res, "end", t0)
    res["total_s"] = time.perf_counter() - t0
    print(f"  archive N={n:.0e}: {res['total_s']:.0f} s", flush=True)
    return res


def archive_tables(results: list[dict[str, Any]]) -> str:
    """Markdown tables of the archive runs."""
    lines = [
        "### Memory, build and persistence (clustered 64-bit codes, IVF)",
        "",
        "| N | nlist | FAISS IVF B/code (struct / RSS) "
        "| HashIndex B/code incl. keys (struct / RSS) "
        "| train s | add s | add codes/s | HashIndex build s | save s | load s | file MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        raw, b, h = r["raw"], r["raw"]["build"], r.get("hashindex")
        hi = (
            (
                f"{h['struct_bytes_per_code']:.0f} / {h['rss_bytes_per_code']:.0f}",
                f"{h['build_s']:.1f}",
                f"{h['save_s']:.1f} (HashIndex)",
                f"{h['load_s']:.1f} (HashIndex)",
                f"{h['saved_bytes'] / 2**20:.0f}",
            )
            if h
            else (
                "-",
                "-",
                f"{raw['write_s']:.1f} (FAISS)",
                f"{raw['read_s']:.1f} (FAISS)",
                f"{raw['file_bytes'] / 2**20:.0f}",
            )
        )
        lines.append(
            f"| {r['n']:.0e} | {r['nlist']} | {b['struct_bytes'] / r['n']:.1f} / "
            f"{b['rss_delta_mb'] * 2**20 / r['n']:.1f} | {hi[0]} | {b['train_s']:.1f} "
            f"| {b['add_s']:.1f} | {b['add_codes_per_s']:,.0f} | {hi[1]} | {hi[2]} | {hi[3]} "
            f"| {hi[4]} |"
        )
    lines += [
        "",
        "### Single-query top-10 latency, ms (1 thread / 2 threads), tie-aware recall@10",
        "",
        "| N | index | exact | " + " | ".join(f"IVF nprobe {p}" for p in ARCHIVE_NPROBES) + " |",
        "|---|---|---:|" + "---:|" * len(ARCHIVE_NPROBES),
    ]
    for r in results:
        for name, v in (("FAISS", r["raw"]), ("HashIndex", r.get("hashindex"))):
            if not v:
                continue
            cells = [
                f"{v[f'ivf_nprobe{p}_ms_1t']:.3f} / {v[f'ivf_nprobe{p}_ms_2t']:.3f} "
                f"(R {v[f'recall@10_nprobe{p}']:.3f})"
                for p in ARCHIVE_NPROBES
            ]
            lines.append(
                f"| {r['n']:.0e} | {name} | {v['exact_ms_1t']:.1f} / {v['exact_ms_2t']:.1f} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def archive_plot(results: list[dict[str, Any]], path: Path) -> None:
    """Memory per code, latency vs recall, and build / persistence times per size."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.6))
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    labels = []
    parts_order = ("codes_mirror", "faiss_ivf", "key_objects", "key_list", "key_to_id_dict")
    colors = {k: f"C{i}" for i, k in enumerate(parts_order)}
    for j, r in enumerate(results):
        labels.append(f"{r['n']:.0e}")
        parts = (
            r["hashindex"]["struct_bytes"]
            if "hashindex" in r
            else {"codes_mirror": r["n"] * 9, "faiss_ivf": r["raw"]["build"]["struct_bytes"]}
        )
        bottom = 0.0
        for k, v in parts.items():
            seen = k in ax1.get_legend_handles_labels()[1]
            ax1.bar(j, v / r["n"], bottom=bottom, color=colors[k], label=None if seen else k)
            bottom += v / r["n"]
        if "hashindex" in r:
            ax1.scatter(j, r["hashindex"]["rss_bytes_per_code"], marker="_", s=400, color="k")
    ax1.set_xticks(range(len(results)), labels)
    ax1.set_ylabel("bytes per code (bars: structures; tick: RSS)")
    ax1.set_title("memory per code (codes mirror + IVF [+ keys at 1e7])")
    ax1.legend(fontsize=7)
    for r in results:
        for name, v in (("FAISS", r["raw"]), ("HashIndex", r.get("hashindex"))):
            if not v:
                continue
            pts = [(v[f"ivf_nprobe{p}_ms_1t"], v[f"recall@10_nprobe{p}"]) for p in ARCHIVE_NPROBES]
            ax2.plot(*zip(*pts, strict=True), "o-", label=f"{name} IVF {r['n']:.0e}")
            ax2.plot([v["exact_ms_1t"]], [1.0], "s", label=f"{name} exact {r['n']:.0e}")
    ax2.set_xscale("log")
    ax2.set_xlabel("ms per query (1 thread)")
    ax2.set_ylabel("recall@10 (tie-aware)")
    ax2.set_title(f"latency vs recall (nprobe {ARCHIVE_NPROBES})")
    ax2.legend(fontsize=6)
    x = np.arange(len(results))
    steps = [
        ("train", lambda r: r["raw"]["build"]["train_s"]),
        ("add", lambda r: r["raw"]["build"]["add_s"]),
        ("write", lambda r: r["raw"]["write_s"]),
        ("read", lambda r: r["raw"]["read_s"]),
        ("HashIndex save", lambda r: r.get("hashindex", {}).get("save_s", 0)),
        ("HashIndex load", lambda r: r.get("hashindex", {}).get("load_s", 0)),
    ]
    for j, (name, get) in enumerate(steps):
        ax3.bar(x + (j - 2.5) * 0.13, [get(r) for r in results], 0.13, label=name)
    ax3.set_xticks(x, labels)
    ax3.set_yscale("log")
    ax3.set_ylabel("seconds")
    ax3.set_title("IVF build and persistence")
    ax3.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def archive_main(args: argparse.Namespace) -> None:
    """Run the archive sizes one by one, merging each into index_archive.json as it ends."""
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "index_archive.json"
    payload = json.loads(path.read_text()) if path.exists() else {"results": []}
    payload["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "shared": "2 cores shared with other sessions: see each phase's loadavg",
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(default)"),
    }
    for n in args.sizes or [10_000_000, 100_000_000]:
        res = archive_config(n, args)
        payload["results"] = sorted(
            [r for r in payload["results"] if r["n"] != n] + [res], key=lambda r: r["n"]
        )
        path.write_text(json.dumps(payload, indent=1))
        table = archive_tables(payload["results"])
        (args.out / "index_archive.md").write_text(table + "\n")
        archive_plot(payload["results"], args.out / "index_archive.png")
        print(table, flush=True)
        gc.collect()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10^5 and 10^6 only")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--no-hnsw", dest="hnsw", action="store_false")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--archive", action="store_true", help="10^7 and 10^8 (see docstring)")
    parser.add_argument("--max-nlist", type=int, default=4096, help="archive: IVF lists cap")
    parser.add_argument("--hashindex-max", type=int, default=10_000_000, help="archive")
    parser.add_argument("--tmp", type=Path, default=None, help="archive: folder of saved files")
    parser.add_argument(
        "--build-threads", type=int, default=1, help="archive: FAISS threads of train + add"
    )
    args = parser.parse_args()
    if args.archive:
        archive_main(args)
        return
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
