"""Archive scale over HTTP (issue 18): 10^6 items on SQLite and on pgstac.

The items of benchmarks/service_bench.py (clustered 64-bit codes, one per item, footprints on a
grid of side ceil(sqrt(N)) over 3x3 degrees), made one at a time and written by the fastest
supported path: SQLite ``SQLiteStore.upsert_items`` in batches of 10^4; pgstac ``pypgstac``'s
``Loader.load_items`` (what ``pypgstac load`` runs: COPY into the partition, insert mode) on a
throwaway cluster (tests/pgcluster.py) or ``--dsn``. Measured, with ``stac-rscbir serve`` in its
own process (tests/serving.py ``serve_command``):

1. bulk-load time and items/s; store size on disk (SQLite: the database file with its -wal;
   pgstac: ``pg_database_size``);
2. cold start to the first similarity answer (benchmarks/light_server.py ``first_answer``) with
   the saved index deleted (built from the store, saved at shutdown) and then present (loaded),
   alternated ``--runs`` times;
3. with one server up and its index loaded: ``--requests`` rounds, each a random query item, of
   plain bbox search and bbox + similarity at bboxes covering exactly 0.1 / 1 / 10 % of the
   items (whole grid cells in the lower-left corner, checked against ``numberMatched``) and of
   similarity without a filter, in random order; p50 / p95 per kind, the ratio similarity /
   plain per bbox (target < 2 at p50 and p95); the server's RSS after the warm-up and after
   the requests.

The load average is recorded at each phase (the machine is shared). Writes
benchmarks/results/archive/archive_<store>_<N>.json and .png and prints a markdown table.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/archive_bench.py --store sqlite
    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/archive_bench.py --store pgstac
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from index_bench import rss_mb  # noqa: E402
from light_server import first_answer  # noqa: E402
from pgstac_plugin_bench import running_command, search_ms, similarity  # noqa: E402
from service_bench import COLLECTION, iter_items  # noqa: E402

from stac_rscbir.api.server import free_port  # noqa: E402
from tests.serving import serve_command, store_args  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "archive"
FRACTIONS = (0.001, 0.01, 0.1)
BATCH = 10_000


def phase(report: dict[str, Any], name: str) -> None:
    """Record the load average when phase ``name`` starts (the machine is shared)."""
    load = [round(x, 2) for x in os.getloadavg()]
    report.setdefault("loadavg", {})[name] = load
    print(f"[{time.strftime('%H:%M:%S')}] {name}: load {load}", flush=True)


def grid_bbox(n: int, fraction: float) -> tuple[list[float], int]:
    """A bbox over whole grid cells in the lower-left corner holding exactly ``fraction`` of
    the n items of ``iter_items`` (kx columns x ky full rows, kx * ky = fraction * n, as square
    as the divisors allow); the bbox and the number of items it holds."""
    side = math.ceil(math.sqrt(n))
    rows = n // side  # full rows
    m = round(fraction * n)
    kx = next(k for k in range(math.isqrt(m), 0, -1) if m % k == 0 and k <= side and m // k <= rows)
    ky = m // kx
    cell = 3.0 / side  # a footprint covers [c * cell, (c + 0.8) * cell]: stop mid-gap
    return [10.0, 45.0, 10.0 + (kx - 0.5) * cell, 45.0 + (ky - 0.5) * cell], m


def bulk_load(store: str, target: str, n: int) -> float:
    """Write the n items by the store's fastest path; seconds it took."""
    bar = tqdm(iter_items(n), total=n, desc=f"load {store}", unit="item", mininterval=5)
    items = iter(bar)  # one iterator: islice must not restart the bar's
    start = time.perf_counter()
    if store == "sqlite":
        from stac_rscbir.store.sqlite import SQLiteStore

        db = SQLiteStore(target)
        db.create_collection(COLLECTION)
        while batch := list(itertools.islice(items, BATCH)):
            db.upsert_items(batch)
        db.close()
    else:
        from pypgstac.db import PgstacDB
        from pypgstac.load import Loader, Methods

        from stac_rscbir.store.pgstac import PgstacStore

        with PgstacStore(target) as db:  # installs the generation triggers, as serve does
            db.create_collection(COLLECTION)
        with PgstacDB(dsn=target) as pg:
            Loader(db=pg).load_items(items, insert_mode=Methods.insert, chunksize=BATCH)
    return time.perf_counter() - start


def store_bytes(store: str, target: str) -> int:
    """Size of the store on disk."""
    if store == "sqlite":
        return sum(
            Path(target + suffix).stat().st_size
            for suffix in ("", "-wal", "-shm")
            if Path(target + suffix).exists()
        )
    import psycopg

    with psycopg.connect(target) as conn:
        row = conn.execute("SELECT pg_database_size(current_database())").fetchone()
    assert row is not None
    return int(row[0])


def server_env() -> dict[str, str]:
    """The server's environment: this venv's, one OpenMP thread, this checkout first."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def cold_starts(store: str, target: str, index: Path, n: int, runs: int) -> dict[str, Any]:
    """Cold start to the first similarity answer, saved index deleted vs present, alternated."""
    out: dict[str, Any] = {"index deleted": [], "index present": []}
    query_id = f"i{n // 2:07d}"
    for _ in range(runs):
        for case in out:
            if case == "index deleted":
                shutil.rmtree(index, ignore_errors=True)
            else:
                assert index.is_dir() and any(index.iterdir()), "no saved index to start from"
            port = free_port()
            got = first_answer(
                serve_command(store_args(store, target), index, port), server_env(), port, query_id
            )
            out[case].append(got)
            print("cold start", case, got, flush=True)
    return {
        case: {
            "runs": got,
            "median_ready_s": float(np.median([r["ready_s"] for r in got])),
            "min_ready_s": min(r["ready_s"] for r in got),
            "rss_mb": [r["rss_mb"] for r in got],
        }
        for case, got in out.items()
    }


def latency(
    store: str, target: str, index: Path, n: int, requests: int, log: Path, report: dict[str, Any]
) -> dict[str, Any]:
    """p50 / p95 per kind of search, one server, requests in random order."""
    port = free_port()
    cmd = serve_command(store_args(store, target), index, port)
    boxes = {f"{f * 100:g} %": grid_bbox(n, f) for f in FRACTIONS}
    kinds: dict[str, Any] = {"similarity, no filter": lambda q: similarity(q)}
    for name, (bbox, _) in boxes.items():
        kinds[f"bbox {name}"] = lambda q, b=bbox: {"bbox": b, "limit": 10}
        kinds[f"bbox {name} + similarity"] = lambda q, b=bbox: similarity(q, bbox=b)
    with running_command(cmd, server_env(), port, log, store) as (client, proc):
        t0 = time.perf_counter()
        search_ms(client, similarity("i0000000"))
        report["warm_up_s"] = round(time.perf_counter() - t0, 2)  # loads the saved index
        for name, (bbox, m) in boxes.items():  # the bboxes hold exactly m items
            _, page = search_ms(client, {"bbox": bbox, "limit": 1})
            matched = page.get("numberMatched")
            assert matched in (None, m), (name, matched, m)
            report.setdefault("bbox", {})[name] = {"bbox": bbox, "items": m, "matched": matched}
        report["server_rss_mb_after_warm_up"] = round(rss_mb(proc.pid), 1)
        rng = np.random.default_rng(3)
        got: dict[str, list[float]] = {k: [] for k in kinds}
        returned = dict.fromkeys(kinds, 0)
        names = list(kinds)
        for _ in tqdm(range(requests), desc="latency rounds", mininterval=10):
            query = f"i{int(rng.integers(0, n)):07d}"
            for j in rng.permutation(len(names)):
                ms, page = search_ms(client, kinds[names[j]](query))
                got[names[j]].append(ms)
                returned[names[j]] += len(page["features"])
        report["server_rss_mb_after_requests"] = round(rss_mb(proc.pid), 1)
    rows = {
        k: {
            "p50_ms": round(float(np.percentile(v, 50)), 1),
            "p95_ms": round(float(np.percentile(v, 95)), 1),
            "mean_returned": returned[k] / requests,
        }
        for k, v in got.items()
    }
    for name in boxes:
        plain, sim = rows[f"bbox {name}"], rows[f"bbox {name} + similarity"]
        sim["ratio_p50"] = round(sim["p50_ms"] / plain["p50_ms"], 2)
        sim["ratio_p95"] = round(sim["p95_ms"] / plain["p95_ms"], 2)
    return rows


def markdown(r: dict[str, Any]) -> str:
    """The report's tables."""
    cold = r.get("cold_start", {})
    lines = [
        f"### {r['store']}, {r['items']:,} items",
        "",
        "| bulk load s | items/s | store size MB | cold start, index deleted (rebuild) s "
        "| cold start, index present s | server RSS MB after warm-up / after requests |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {r['load_s']:.0f} | {r['items_per_s']:,.0f} | {r['store_mb']:,.0f} "
        + "".join(
            f"| {cold[c]['median_ready_s']:.1f} (min {cold[c]['min_ready_s']:.1f}) "
            if c in cold
            else "| - "
            for c in ("index deleted", "index present")
        )
        + f"| {r['server_rss_mb_after_warm_up']:.0f} / {r['server_rss_mb_after_requests']:.0f} |",
        "",
        "| filter (share of items) | bbox search p50 / p95 ms | bbox + similarity p50 / p95 ms "
        "| ratio p50 / p95 |",
        "|---|---:|---:|---:|",
    ]
    lat = r["latency"]
    for f in FRACTIONS:
        name = f"{f * 100:g} %"
        plain, sim = lat[f"bbox {name}"], lat[f"bbox {name} + similarity"]
        ok = "" if sim["ratio_p50"] < 2 and sim["ratio_p95"] < 2 else " (misses < 2x)"
        lines.append(
            f"| {name} ({r['bbox'][name]['items']:,} items) | {plain['p50_ms']:.1f} / "
            f"{plain['p95_ms']:.1f} | {sim['p50_ms']:.1f} / {sim['p95_ms']:.1f} "
            f"| {sim['ratio_p50']:.2f} / {sim['ratio_p95']:.2f}{ok} |"
        )
    s = lat["similarity, no filter"]
    lines.append(f"| none, similarity only | - | {s['p50_ms']:.1f} / {s['p95_ms']:.1f} | - |")
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    """Latency per bbox share (plain vs similarity) and cold starts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.2))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 1.3]})
    names = [f"{f * 100:g} %" for f in FRACTIONS]
    x = np.arange(len(names))
    for j, (suffix, label) in enumerate([("", "bbox search"), (" + similarity", "bbox + sim")]):
        rows = [r["latency"][f"bbox {n}{suffix}"] for n in names]
        ax1.bar(x + (j - 0.5) * 0.38, [v["p50_ms"] for v in rows], 0.38, label=f"{label} p50")
        ax1.scatter(x + (j - 0.5) * 0.38, [v["p95_ms"] for v in rows], marker="_", s=300, color="k")
    s = r["latency"]["similarity, no filter"]
    ax1.axhline(s["p50_ms"], color="grey", ls=":", label="similarity, no filter p50")
    ax1.set_xticks(x, [f"bbox {n}" for n in names])
    ax1.set_yscale("log")
    ax1.set_ylabel("ms per request (bar p50, tick p95)")
    ax1.set_title(f"POST /search, {r['items']:,} items, {r['store']}")
    ax1.legend(fontsize=8)
    cold = r.get("cold_start", {})
    cases = list(cold)
    ax2.bar(cases, [cold[c]["median_ready_s"] for c in cases], color=["tab:red", "tab:green"])
    ax2.set_ylabel("s to the first similarity answer (median)")
    ax2.set_title("cold start")
    ax2.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Load, cold starts and latency for ``args.store`` under ``work``."""
    report: dict[str, Any] = {
        "store": args.store,
        "items": args.items,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "requests_per_kind": args.requests,
    }
    if args.store == "sqlite":
        target = str(work / "archive.db")
    else:
        target = args.dsn
        import psycopg

        with psycopg.connect(target) as conn:
            row = conn.execute("SELECT version(), pgstac.get_version()").fetchone()
        assert row is not None
        report["postgres"], report["pgstac"] = row[0].split(" on ")[0], row[1]
    phase(report, "load")
    report["load_s"] = round(bulk_load(args.store, target, args.items), 1)
    report["items_per_s"] = round(args.items / report["load_s"])
    report["store_mb"] = round(store_bytes(args.store, target) / 2**20, 1)
    print(f"loaded in {report['load_s']} s, {report['store_mb']} MB", flush=True)
    index = work / "index"
    if args.runs:
        phase(report, "cold starts")
        report["cold_start"] = cold_starts(args.store, target, index, args.items, args.runs)
    phase(report, "latency")
    report["latency"] = latency(
        args.store, target, index, args.items, args.requests, work / "server.log", report
    )
    phase(report, "end")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("sqlite", "pgstac"), default="sqlite")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dsn", help="pgstac: a migrated database (default: a throwaway cluster)")
    parser.add_argument("--runs", type=int, default=2, help="cold starts per case")
    parser.add_argument("--requests", type=int, default=100, help="rounds (one of each kind)")
    parser.add_argument("--tmp", type=Path, default=None, help="folder of the store and index")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    cluster = None
    if args.store == "pgstac" and args.dsn is None:
        from tests.pgcluster import start_cluster

        cluster = start_cluster()
        args.dsn = cluster.dsn
    work = Path(tempfile.mkdtemp(prefix="rscbir-archive-", dir=args.tmp))
    try:
        report = run(args, work)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"archive_{args.store}_{args.items:.0e}".replace("+", "")
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / f"{name}.md").write_text(table + "\n")
    plot(report, args.out / f"{name}.png")
    print(table)


if __name__ == "__main__":
    main()
