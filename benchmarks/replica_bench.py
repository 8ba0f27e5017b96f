"""Replicas over one catalog (issue 18): how stale each replica's similarity search is after a
write acknowledged by another, at 10^4-10^5 items, with a ``pypgstac load`` mid-run.

Per configuration (2 and 4 ``stac-rscbir serve`` processes over one pgstac database, each with
an index folder of its own, as on separate hosts; 2 over one SQLite file sharing one index
folder, as on one host), started by tests/replicas.py over ``--items`` preloaded items of
benchmarks/service_bench.py (pgstac: loaded once, each configuration on a copy of that
database):

1. every replica's first similarity search (loads or builds its index), then
   ``GET /_mgmt/indexes`` (rebuilds so far);
2. ``--writes`` writes through the API, one at a time, round-robin over the replicas: POST of a
   new item with a random 64-bit code (50 %), PUT of an existing item with a new code (30 %),
   DELETE (20 %). After each acknowledgement every replica is polled back to back (a thread
   each): the **staleness** of a replica is the time from the acknowledgement to the answer
   that shows the write (its resolution is one request), measured two ways, alternating:
   *search* (even writes): a similarity search by the code shows it (the item first at
   distance 0; after a PUT also no longer at its old code; after a DELETE gone); a search
   that finds the store ahead catches its replica up itself, so this is what a client sees;
   *follower* (odd writes): ``GET /_mgmt/indexes`` reports the replica's index at the store
   generation the writer reported after the write (or later), no search asked: what the
   follower thread does for a replica nobody queries (then checked by search, untimed);
3. halfway, on a thread of its own while the writes go on, ``--load`` items of a new collection
   are written behind every replica's back (``pypgstac load`` of a new partition; on SQLite a
   second store object in this process): the time from the load's end until sampled loaded
   items are visible on each replica;
4. at the end: rebuilds since step 1 (target 0), and each replica's top ``--k`` for a few query
   codes against the brute-force Hamming ranking over the store's codes (tie-aware).

Target: staleness <= 1 s. Client, servers (and PostgreSQL) share the machine's cores; the load
average before and after each configuration is recorded. Writes
benchmarks/results/replicas/replica_bench.json and .png, and prints a markdown table.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/replica_bench.py
    PYTHONPATH=. .venv/bin/python benchmarks/replica_bench.py --items 10000 --writes 60  # quick
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from service_bench import COLLECTION, MODEL, bench_item, items  # noqa: E402

from stac_rscbir.extension.cbir import HashCode  # noqa: E402
from stac_rscbir.store.base import ItemKey  # noqa: E402
from tests.replicas import (  # noqa: E402
    Catalog,
    Replicas,
    brute_force,
    first_code,
    random_codes,
    ranking_mismatch,
)

OUT = ROOT / "benchmarks" / "results" / "replicas"
CONFIGS = [("pgstac", 2, False), ("pgstac", 4, False), ("sqlite", 2, True)]
KINDS = {"post": 0.5, "put": 0.3, "delete": 0.2}
DEADLINE_S = 60.0  # a replica not showing a write by then counts as never (inf)
LOADED_SAMPLES = 5  # loaded items polled on every replica after the load


def new_item(item_id: str, collection: str, code: HashCode, rng: np.random.Generator) -> dict:
    """A benchmark item with ``code`` at a random place of the grid."""
    x, y = 10 + rng.random() * 2.99, 45 + rng.random() * 2.99
    bits = np.unpackbits(code.packed())[:64]
    item = bench_item(item_id, x, y, 0.01, "2024-01-01T00:00:00Z", bits)
    item["collection"] = collection
    return item


def preload_pgstac(dsn: str, n: int) -> float:
    """The preloaded items into ``dsn`` (batches of 10^4); seconds it took."""
    from stac_rscbir.store.pgstac import PgstacStore

    start = time.perf_counter()
    with PgstacStore(dsn) as store:
        store.create_collection(COLLECTION)
        data = items(n)
        for i in range(0, n, 10_000):
            store.upsert_items(data[i : i + 10_000])
    return time.perf_counter() - start


def preload_sqlite(path: Path, n: int) -> float:
    from stac_rscbir.store.sqlite import SQLiteStore

    start = time.perf_counter()
    with SQLiteStore(path) as store:
        store.create_collection(COLLECTION)
        store.upsert_items(items(n))
    return time.perf_counter() - start


def copy_database(cluster_dsn: str, template: str, name: str) -> str:
    """A copy of the database ``template`` of the cluster as ``name``; its DSN."""
    import psycopg

    with psycopg.connect(cluster_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY")
    return f"{cluster_dsn.rsplit('/', 1)[0]}/{name}"


PROBES = ("search", "follower")
PHASES = ("before", "loading", "catching up", "after")


def others(records: list[dict[str, Any]], **match: Any) -> list[float]:
    """The staleness on the replicas other than the writer, of the writes whose record has
    the values ``match`` (e.g. ``probe="search", kind="put"``)."""
    keep = [r for r in records if all(r[k] == v for k, v in match.items())]
    return [s for r in keep for i, s in enumerate(r["s"]) if i != r["writer"]]


def summary(seconds: list[float]) -> dict[str, Any]:
    """n, p50 / p95 / max ms, share within 1 s, count never seen (inf)."""
    finite = np.asarray([s for s in seconds if math.isfinite(s)]) * 1000
    out: dict[str, Any] = {"n": len(seconds), "never": len(seconds) - len(finite)}
    if len(finite):
        out.update(
            p50_ms=round(float(np.percentile(finite, 50)), 1),
            p95_ms=round(float(np.percentile(finite, 95)), 1),
            max_ms=round(float(finite.max()), 1),
            within_1s=round(float(np.mean(np.asarray(seconds) <= 1.0)), 4),
        )
    return out


class Run:
    """One configuration's writes, load and checks over running ``replicas``."""

    def __init__(self, replicas: Replicas, work: Path, args: argparse.Namespace) -> None:
        self.replicas = replicas
        self.work = work
        self.args = args
        self.rng = np.random.default_rng(args.seed)
        self.live: dict[ItemKey, HashCode] = {}  # items written by the run: their codes
        self.records: list[dict[str, Any]] = []
        self.load_report: dict[str, Any] = {}
        # of the mid-run load, when a write is acknowledged: "before", "loading" (the load
        # runs), "catching up" (it ended; not every replica shows it yet), "after"
        self.phase = "before"

    def one_write(self, n: int) -> None:
        """One write through the next replica, then its staleness on every replica: by
        similarity search (even writes: a search catches its replica up itself) or by the
        index generation of ``GET /_mgmt/indexes`` (odd writes: no search asked, what the
        follower thread did; then checked by search, untimed)."""
        r, rng = self.replicas, self.rng
        kind = rng.choice(list(KINDS), p=list(KINDS.values()))
        if kind != "post" and not self.live:
            kind = "post"
        writer = r.next_writer()
        code = random_codes(MODEL, rng, 1)[0]
        t0 = time.perf_counter()
        new: HashCode | None = code
        old: HashCode | None = None
        if kind == "post":
            item = new_item(f"w{n:06d}", "bench", code, rng)
            r.post_item(writer, item)
            key = ("bench", item["id"])
        else:
            keys = sorted(self.live)
            key = keys[int(rng.integers(len(keys)))]
            old = self.live.pop(key)
            if kind == "put":
                r.put_item(writer, new_item(key[1], key[0], code, rng))
            else:
                r.delete_item(writer, key)
                new = None
        write_s = time.perf_counter() - t0
        if new is not None:
            self.live[key] = new

        def visible(i: int) -> bool:
            return r.reflects(i, MODEL, key, new, old)

        record = {"n": n, "kind": str(kind), "writer": writer, "phase": self.phase}  # at the ack
        record["write_s"] = write_s
        if n % 2 == 0:
            record.update(probe="search", s=r.wait_all(visible, DEADLINE_S))
        else:
            generation = int(r.indexes(writer)["store_generation"])  # this write's, or later
            took = r.wait_all(lambda i: r.index_generation(i, MODEL) >= generation, DEADLINE_S)
            shown = r.wait_all(visible, DEADLINE_S)
            record.update(probe="follower", s=took, then_searched_never=shown.count(math.inf))
        self.records.append(record)

    def load_behind(self) -> None:
        """The mid-run load of a new collection, then its visibility on every replica."""
        cid = "bench-load"
        rng = np.random.default_rng(self.args.seed + 1)
        codes = random_codes(MODEL, rng, self.args.load)
        loaded = [new_item(f"l{j:07d}", cid, c, rng) for j, c in enumerate(codes)]
        collection = {**copy.deepcopy(COLLECTION), "id": cid}
        self.phase = "loading"
        t0 = time.perf_counter()
        self.replicas.catalog.write_behind(collection, loaded, self.work)
        self.phase = "catching up"
        load_s = time.perf_counter() - t0
        picks = np.linspace(0, len(loaded) - 1, LOADED_SAMPLES).astype(int)
        samples = [loaded[int(j)] for j in picks]
        r = self.replicas

        def all_visible(i: int) -> bool:
            return all(r.shows(i, MODEL, first_code(s), (cid, s["id"])) for s in samples)

        took = r.wait_all(all_visible, DEADLINE_S)
        self.phase = "after"
        self.load_report = {
            "items": len(loaded),
            "how": "pypgstac load" if r.catalog.kind == "pgstac" else "second SQLite store object",
            "load_s": round(load_s, 2),
            "visible_after_load_s": [round(t, 3) for t in took],
        }

    def go(self) -> None:
        loader = None
        for n in range(self.args.writes):
            if n == self.args.writes // 2 and self.args.load:
                loader = threading.Thread(target=self.load_behind)
                loader.start()
            self.one_write(n)
            if n % 50 == 0:
                print(
                    f"  write {n}: {self.records[-1]['kind']} {self.records[-1]['s']}", flush=True
                )
        if loader is not None:
            loader.join()

    def rankings(self) -> dict[str, Any]:
        """Top-k of a few queries on every replica against the brute-force ranking."""
        codes = self.replicas.catalog.codes(MODEL)
        queries = random_codes(MODEL, self.rng, 2) + list(self.live.values())[:2]
        bad = []
        for q, query in enumerate(queries):
            truth = brute_force(codes, query)
            for i in range(len(self.replicas)):
                got = self.replicas.ranked(i, MODEL, query, self.args.k)
                why = ranking_mismatch(got, truth) if len(got) == self.args.k else "short list"
                if why:
                    bad.append({"query": q, "replica": i, "why": why})
        return {"queries": len(queries), "k": self.args.k, "codes": len(codes), "mismatches": bad}


def run_config(
    kind: str, n: int, shared: bool, target: str, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """One configuration over the store ``target``."""
    load_before = os.getloadavg()
    catalog = Catalog(kind, target)
    probe = first_code(items(1)[0])  # the first preloaded item's code
    with Replicas(catalog, n, work, shared_index=shared, timeout=300) as replicas:
        first = []
        for i in range(n):
            t0 = time.perf_counter()
            top = replicas.top(i, MODEL, probe, 1)
            first.append(round(time.perf_counter() - t0, 2))
            assert top and top[0][0] == 0, top
        before = replicas.rebuilds(MODEL)
        run = Run(replicas, work, args)
        t0 = time.perf_counter()
        run.go()
        elapsed = time.perf_counter() - t0
        indexes = [replicas.indexes(i) for i in range(n)]
        after = [int(x["models"][MODEL]["rebuilds"]) for x in indexes]
        ranking = run.rankings()
    records = run.records
    return {
        "config": f"{kind}, {n} replicas",
        "store": kind,
        "replicas": n,
        "index_folders": "one shared" if shared else "one per replica",
        "first_search_s": first,
        "writes": len(records),
        "elapsed_s": round(elapsed, 1),
        "staleness": {p: summary(others(records, probe=p)) for p in PROBES},
        "staleness_by_kind": {
            p: {k: summary(others(records, probe=p, kind=k)) for k in KINDS} for p in PROBES
        },
        "staleness_by_load_phase": {
            p: {ph: summary(others(records, probe=p, phase=ph)) for ph in PHASES} for p in PROBES
        },
        "write_ack": {
            ph: summary([r["write_s"] for r in records if r["phase"] == ph]) for ph in PHASES
        },
        "read_your_writes_writer": summary(
            [r["s"][r["writer"]] for r in records if r["probe"] == "search"]
        ),
        "follower_then_search_never": sum(r.get("then_searched_never", 0) for r in records),
        "load": run.load_report,
        "rebuilds_before": before,
        "rebuilds_after": after,
        "rebuilds_after_start": [a - b for a, b in zip(after, before, strict=True)],
        "indexes_at_end": indexes,
        "ranking": ranking,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "samples_s": [  # per write: kind, probe, writer, seconds per replica (None: never)
            [
                r["kind"],
                r["probe"],
                r["writer"],
                [round(s, 4) if math.isfinite(s) else None for s in r["s"]],
            ]
            for r in records
        ],
    }


def markdown(report: dict[str, Any]) -> str:
    def cell(x: dict[str, Any], *keys: str) -> str:
        return " / ".join(str(x.get(k, "-")) for k in keys) if x["n"] else "-"

    lines = [
        f"{report['items']:,} items preloaded, {report['writes']} writes per configuration "
        f"(half probed by search, half by the follower), {report['load_items']:,} items loaded "
        f"mid-run; {report['machine']}",
        "",
        "| configuration | index folders | probe | staleness p50 / p95 / max ms | <= 1 s | never "
        "| while loading: p95 / max ms | while catching up: p95 / max ms "
        "| load s, then all replicas show it (s) | rebuilds after start | ranking |",
        "|---|---|---|---|---:|---:|---|---|---|---|---|",
    ]
    for c in report["configs"]:
        ld = c["load"]
        vis = max(ld.get("visible_after_load_s") or [math.nan])
        bad = len(c["ranking"]["mismatches"])
        rank = f"{bad} differ" if bad else f"equal (top {c['ranking']['k']})"
        for p in PROBES:
            s, phase = c["staleness"][p], c["staleness_by_load_phase"][p]
            lines.append(
                f"| {c['config']} | {c['index_folders']} | {p} "
                f"| {cell(s, 'p50_ms', 'p95_ms', 'max_ms')} | {s.get('within_1s', 0):.1%} "
                f"| {s['never']} | {cell(phase['loading'], 'p95_ms', 'max_ms')} "
                f"| {cell(phase['catching up'], 'p95_ms', 'max_ms')} "
                f"| {ld.get('load_s')}, then {vis:.2f} | {c['rebuilds_after_start']} | {rank} |"
            )
    lines += ["", "Write acknowledgement p50 / max ms (writes), by phase of the load:", ""]
    for c in report["configs"]:
        acks = [
            f"{ph} {cell(x, 'p50_ms', 'max_ms')} ({x['n']})" for ph, x in c["write_ack"].items()
        ]
        lines.append(f"- {c['config']}: " + "; ".join(acks))
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    """Empirical CDF of the staleness on the other replicas, per configuration (colour) and
    probe (solid: search, dashed: follower)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for j, c in enumerate(report["configs"]):
        for probe, style in zip(PROBES, ("-", "--"), strict=True):
            stale = sorted(
                s * 1000
                for _, p, writer, per in c["samples_s"]
                for i, s in enumerate(per)
                if p == probe and i != writer and s is not None
            )
            if stale:
                share = np.arange(1, len(stale) + 1) / len(stale)
                label = f"{c['config']}, {probe}"
                ax.step(stale, share, style, where="post", color=f"C{j}", label=label)
    ax.axvline(1000, color="black", ls=":", lw=1, label="target 1 s")
    ax.set_xscale("log")
    ax.set_xlabel("ms from a write's acknowledgement to its visibility on another replica")
    ax.set_ylabel("share of (write, replica) pairs")
    ax.set_title(f"replica staleness, {report['items']:,} items preloaded", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=50_000, help="items preloaded")
    parser.add_argument("--writes", type=int, default=300, help="writes per configuration")
    parser.add_argument("--load", type=int, default=10_000, help="items loaded mid-run")
    parser.add_argument("--k", type=int, default=100, help="ranking checked to this depth")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--configs", default="pgstac-2,pgstac-4,sqlite-2", help="comma-separated store-replicas"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    wanted = set(args.configs.split(","))
    configs = [c for c in CONFIGS if f"{c[0]}-{c[1]}" in wanted]
    work = Path(tempfile.mkdtemp(prefix="rscbir-replicas-"))
    report: dict[str, Any] = {
        "items": args.items,
        "writes": args.writes,
        "load_items": args.load,
        "write_mix": KINDS,
        "machine": f"{platform.node()}, {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f} at the start; client, servers and PostgreSQL share them",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "configs": [],
    }
    cluster = None
    try:
        if any(kind == "pgstac" for kind, _, _ in configs):
            from tests.pgcluster import start_cluster

            cluster = start_cluster()
            report["preload_pgstac_s"] = round(preload_pgstac(cluster.dsn, args.items), 1)
            print(f"pgstac preloaded in {report['preload_pgstac_s']} s", flush=True)
        for j, (kind, n, shared) in enumerate(configs):
            here = work / f"{kind}-{n}"
            here.mkdir()
            if kind == "pgstac":
                assert cluster is not None
                target = copy_database(cluster.dsn, "pgstac", f"replicas_{j}")
            else:
                target = str(here / "stac.db")
                report["preload_sqlite_s"] = round(preload_sqlite(Path(target), args.items), 1)
            print(f"{kind}, {n} replicas", flush=True)
            report["configs"].append(run_config(kind, n, shared, target, here, args))
            print(markdown({**report, "configs": report["configs"][-1:]}), flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    report["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replica_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "replica_bench.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
