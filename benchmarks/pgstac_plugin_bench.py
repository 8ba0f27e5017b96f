"""The stac-fastapi-pgstac plugin at 10^5 items (issue 16): cold start, index upkeep by the
change log, and search latency, against our app on the same pgstac database.

On a throwaway PostgreSQL 15 + pgstac cluster (tests/pgcluster.py; or ``--dsn`` of a database
to reuse) holding ``--items`` coded items (benchmarks/service_bench.py's items, written with
``PgstacStore.upsert_items`` in batches of 10^4), two servers are compared:

- **plugin**: ``uvicorn stac_rscbir.api.pgstac_plugin:create_app --factory`` (stock
  stac-fastapi-pgstac + similarity), configured by PG* variables and RSCBIR_INDEX_DIR;
- **app**: ``stac-rscbir serve --dsn ...`` (our own app over ``PgstacStore``).

1. Cold start: wall time from starting the server until ``POST /search`` with a similarity
   query by item answers 200 (polled every 20 ms), with the saved index absent (rebuilt from
   the database) and present (saved by the previous run's shutdown); interleaved runs.
2. Index upkeep: with both servers up and their indexes loaded, 1, 10, 100, 1000 items get new
   codes written behind the API (``SELECT pgstac.upsert_items(...)``, as stac-fastapi-pgstac's
   Transactions do); the next similarity search of each server follows the change log
   (``rscbir.changes``) and is timed, against a similarity search after no write and a full
   rebuild (``HashIndex.build`` over ``PgstacStore.iter_codes``, in this process). Each
   result is checked: a query by a rewritten item finds itself first with its new code.
3. Latency: p50 / p95 of plain bbox, bbox + similarity and similarity searches through both
   servers (requests interleaved across servers and kinds, a random query item each).

Writes benchmarks/results/plugin/pgstac_plugin.json and .png.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pgstac_plugin_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from light_server import first_answer  # noqa: E402
from service_bench import COLLECTION, MODEL, items  # noqa: E402

from stac_rscbir.api.server import free_port  # noqa: E402
from stac_rscbir.extension.cbir import HashCode  # noqa: E402
from tests.serving import wait_until_up  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "plugin"
SERVERS = ("plugin", "app")
CASES = ("index absent", "index present")
WRITES = (1, 10, 100, 1000)
BBOX = [10.0, 45.0, 10.3, 45.3]  # ~1 % of the grid


def server_command(name: str, dsn: str, index: Path, port: int) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of server ``name`` over ``dsn``."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    bindir = Path(sys.executable).parent
    listen = ["--host", "127.0.0.1", "--port", str(port)]
    if name == "app":
        cli = [str(bindir / "stac-rscbir"), "serve", "--dsn", dsn, "--index-dir", str(index)]
        return [*cli, *listen, "--allow-anonymous-writes"], env
    url = urlparse(dsn)
    env.update(
        PGHOST=url.hostname or "127.0.0.1",
        PGPORT=str(url.port or 5432),
        PGUSER=url.username or "postgres",
        PGPASSWORD=url.password or "unused",  # trust authentication
        PGDATABASE=url.path.lstrip("/"),
        RSCBIR_INDEX_DIR=str(index),
    )
    app = "stac_rscbir.api.pgstac_plugin:create_app"
    return [str(bindir / "uvicorn"), app, "--factory", "--no-access-log", *listen], env


@contextmanager
def running(name: str, dsn: str, index: Path, log: Path) -> Iterator[httpx.Client]:
    """Server ``name`` up (its output in ``log``), a client on it; stopped on exit."""
    port = free_port()
    cmd, env = server_command(name, dsn, index, port)
    with running_command(cmd, env, port, log, name) as (client, _):
        yield client


@contextmanager
def running_command(
    cmd: list[str], env: dict[str, str], port: int, log: Path, name: str = "server"
) -> Iterator[tuple[httpx.Client, subprocess.Popen[bytes]]]:
    """The server ``cmd`` (listening on ``port``) up, its output in ``log``: a client on it
    and the process; stopped on exit (SIGTERM)."""
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
    try:
        wait_until_up(str(client.base_url), proc, 300, log)
        yield client, proc
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=120)


def similarity(query_id: str, **extra: Any) -> dict[str, Any]:
    body = {"model": MODEL, "item": {"collection": "bench", "id": query_id}, "k": 10}
    return {"limit": 10, "similarity": body, **extra}


def search_ms(client: httpx.Client, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """One POST /search: ms and the response (raises unless 200)."""
    t0 = time.perf_counter()
    r = client.post("/search", json=body)
    ms = (time.perf_counter() - t0) * 1000
    r.raise_for_status()
    return ms, r.json()


def load(dsn: str, n: int) -> float | None:
    """Fill the database with n items (skipped when it holds them); seconds it took."""
    from stac_rscbir.store.pgstac import PgstacStore

    with PgstacStore(dsn) as store:
        if store.count() == n:
            return None
        start = time.perf_counter()
        store.create_collection(COLLECTION)
        data = items(n)
        for i in range(0, n, 10_000):
            store.upsert_items(data[i : i + 10_000])
            print(f"loaded {min(i + 10_000, n)} items", flush=True)
        return time.perf_counter() - start


def cold_starts(dsn: str, work: Path, n: int, runs: int) -> dict[str, Any]:
    """Per server and case, ``runs`` interleaved cold starts to the first similarity answer."""
    out: dict[str, Any] = {f"{s}, {c}": {"runs": []} for s in SERVERS for c in CASES}
    query_id = f"i{n // 2:07d}"
    for _ in range(runs):
        for case in CASES:
            for name in SERVERS:
                index = work / f"cold-{name}.index"
                if case == "index absent":
                    shutil.rmtree(index, ignore_errors=True)
                else:
                    assert index.is_dir() and any(index.iterdir()), "no saved index to start from"
                port = free_port()
                cmd, env = server_command(name, dsn, index, port)
                got = first_answer(cmd, env, port, query_id)
                out[f"{name}, {case}"]["runs"].append(got)
                print("cold start", name, case, got, flush=True)
    for row in out.values():
        ready = sorted(r["ready_s"] for r in row["runs"])
        row.update(median_ready_s=ready[len(ready) // 2], min_ready_s=ready[0])
    return out


def read_items(conn: psycopg.Connection[Any], ids: list[str]) -> list[dict[str, Any]]:
    """The items ``ids`` of the bench collection as pgstac returns them (hydrated)."""
    got = conn.execute(
        "SELECT pgstac.search(%s::jsonb)",
        [json.dumps({"collections": ["bench"], "ids": ids, "limit": len(ids)})],
    ).fetchone()
    assert got is not None
    return list(got[0]["features"])


def write_codes(
    conn: psycopg.Connection[Any], ids: list[str], rng: np.random.Generator
) -> tuple[float, dict[str, bytes]]:
    """New random codes for the items ``ids``, written with ``pgstac.upsert_items`` (behind the
    API, as stac-fastapi-pgstac's Transactions write); ms it took and the new packed codes."""
    features = read_items(conn, ids)
    assert len(features) == len(ids), (len(features), len(ids))
    new = {}
    for item in features:
        code = HashCode.from_bits(MODEL, "1.0.0", rng.integers(0, 2, 64, dtype=np.uint8))
        item["properties"]["cbir:codes"] = [code.to_dict()]
        new[item["id"]] = code.packed().tobytes()
    before = generation(conn)
    t0 = time.perf_counter()
    conn.execute("SELECT pgstac.upsert_items(%s::jsonb)", [json.dumps(features)])
    took = (time.perf_counter() - t0) * 1000
    assert generation(conn) > before, "the write changed nothing (the same codes again?)"
    return took, new


def generation(conn: psycopg.Connection[Any]) -> int:
    """The store's generation counter (bumped by every transaction that writes items)."""
    row = conn.execute("SELECT value FROM rscbir.generation").fetchone()
    assert row is not None
    return int(row[0])


def rebuild_s(dsn: str) -> float:
    """Seconds of a full rebuild of the model's index from the store (read the codes + build)."""
    from stac_rscbir.index.hashindex import HashIndex
    from stac_rscbir.store.pgstac import PgstacStore

    with PgstacStore(dsn) as store:
        t0 = time.perf_counter()
        generation = store.generation()
        index = HashIndex(MODEL, 64).build(store.iter_codes(MODEL), generation=generation)
        took = time.perf_counter() - t0
        assert index.count >= 1, "empty rebuild"
    return took


def upkeep(dsn: str, clients: dict[str, httpx.Client], n: int, repeats: int) -> dict[str, Any]:
    """Per number of items written behind the API, the next similarity search of each server
    (it follows the change log), against a search after no write and a full rebuild."""
    rows: dict[str, Any] = {"0 (no write)": {s: [] for s in SERVERS}}
    rows.update({str(w): {s: [] for s in SERVERS} | {"write_ms": []} for w in WRITES})
    with psycopg.connect(dsn, autocommit=True, options="-c search_path=pgstac,public") as conn:
        # seeded by the store's generation: new codes on every run over a reused database
        rng = np.random.default_rng(generation(conn))
        for rep in range(repeats):
            order = SERVERS if rep % 2 == 0 else SERVERS[::-1]
            for w in (0, *WRITES):
                ids = [f"i{int(i):07d}" for i in rng.choice(n, size=max(w, 1), replace=False)]
                row = rows[str(w) if w else "0 (no write)"]
                if w:
                    write_ms, _ = write_codes(conn, ids, rng)
                    row["write_ms"].append(write_ms)
                for name in order:
                    ms, page = search_ms(clients[name], similarity(ids[0]))
                    first = page["features"][0]
                    assert first["id"] == ids[0], (name, w, first["id"])
                    assert first["properties"]["cbir:distance"] == 0, (name, w, first)
                    row[name].append(ms)
                print("upkeep", rep, w, {k: v[-1] for k, v in row.items()}, flush=True)
                time.sleep(1.5)  # the servers' coalesced background saves run off the clock
    rebuilds = [rebuild_s(dsn) for _ in range(repeats)]
    out: dict[str, Any] = {}
    for key, row in rows.items():
        out[key] = {f"{k}_median_ms": round(float(np.median(v)), 1) for k, v in row.items()}
        out[key]["runs_ms"] = {k: [round(x, 1) for x in v] for k, v in row.items()}
    out["full rebuild"] = {
        "median_ms": round(float(np.median(rebuilds)) * 1000, 1),
        "runs_ms": [round(x * 1000, 1) for x in rebuilds],
    }
    return out


def latency(clients: dict[str, httpx.Client], n: int, requests: int) -> dict[str, Any]:
    """p50 / p95 ms per server and kind of search, requests interleaved."""
    rng = np.random.default_rng(3)
    kinds = {
        "bbox": lambda q: {"bbox": BBOX, "limit": 10},
        "bbox + similarity": lambda q: similarity(q, bbox=BBOX),
        "similarity": lambda q: similarity(q),
    }
    got: dict[tuple[str, str], list[float]] = {(s, k): [] for s in SERVERS for k in kinds}
    returned: dict[tuple[str, str], int] = dict.fromkeys(got, 0)
    cells = list(got)
    for _ in range(requests):
        query = f"i{int(rng.integers(0, n)):07d}"
        for j in rng.permutation(len(cells)):
            name, kind = cells[j]
            ms, page = search_ms(clients[name], kinds[kind](query))
            got[(name, kind)].append(ms)
            returned[(name, kind)] += len(page["features"])
    return {
        f"{name}, {kind}": {
            "p50_ms": round(float(np.percentile(v, 50)), 1),
            "p95_ms": round(float(np.percentile(v, 95)), 1),
            "mean_returned": returned[(name, kind)] / requests,
        }
        for (name, kind), v in got.items()
    }


def plot(report: dict[str, Any], path: Path) -> None:
    """Cold start, upkeep and latency, plugin vs app."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 4.2))
    FigureCanvasAgg(fig)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    x = np.arange(len(CASES))
    for j, name in enumerate(SERVERS if "cold_start" in report else ()):
        ready = [report["cold_start"][f"{name}, {c}"]["median_ready_s"] for c in CASES]
        ax1.bar(x + (j - 0.5) * 0.38, ready, 0.38, label=name)
    ax1.set_xticks(x, CASES)
    ax1.set_ylabel("s to the first similarity answer (median)")
    ax1.set_title("cold start")
    ax1.legend()
    up = report["upkeep"]
    for name in SERVERS:
        ax2.plot(WRITES, [up[str(w)][f"{name}_median_ms"] for w in WRITES], "o-", label=name)
    ax2.axhline(up["full rebuild"]["median_ms"], color="black", ls="--", label="full rebuild")
    ax2.axhline(up["0 (no write)"]["plugin_median_ms"], color="grey", ls=":", label="no write")
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("items written behind the API")
    ax2.set_ylabel("ms of the next similarity search (median)")
    ax2.set_title("index upkeep by the change log")
    ax2.legend()
    kinds = ("bbox", "bbox + similarity", "similarity")
    x = np.arange(len(kinds))
    for j, name in enumerate(SERVERS):
        lat = [report["latency"][f"{name}, {k}"] for k in kinds]
        ax3.bar(x + (j - 0.5) * 0.38, [r["p50_ms"] for r in lat], 0.38, label=f"{name} p50")
        ax3.scatter(
            x + (j - 0.5) * 0.38, [r["p95_ms"] for r in lat], marker="_", s=300, color="black"
        )
    ax3.set_xticks(x, kinds)
    ax3.set_ylabel("ms per request (bar p50, tick p95)")
    ax3.set_title("POST /search latency")
    ax3.legend()
    fig.suptitle(f"stac-fastapi-pgstac + plugin vs our app, pgstac, {report['items']:,} items")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--dsn", help="a pgstac database to use (default: a throwaway cluster)")
    parser.add_argument("--runs", type=int, default=3, help="cold starts per server and case")
    parser.add_argument("--repeats", type=int, default=3, help="upkeep repeats per write size")
    parser.add_argument("--requests", type=int, default=200, help="per server and kind")
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold starts")
    parser.add_argument("--name", default="pgstac_plugin", help="of the JSON and PNG files")
    args = parser.parse_args()
    cluster = None
    if args.dsn is None:
        from tests.pgcluster import start_cluster

        cluster = start_cluster()
        args.dsn = cluster.dsn
    work = Path(tempfile.mkdtemp(prefix="rscbir-plugin-bench-"))
    try:
        report = run(args, work)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, OUT / f"{args.name}.png")
    print(json.dumps(report, indent=2))


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The three measurements over ``args.dsn`` (loaded first), files under ``work``."""
    with psycopg.connect(args.dsn) as conn:
        versions = conn.execute("SELECT version(), pgstac.get_version()").fetchone()
    loaded = load(args.dsn, args.items)
    report: dict[str, Any] = {
        "items": args.items,
        "load_s": None if loaded is None else round(loaded, 1),
        "machine": f"{platform.node()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "postgres": versions[0].split(" on ")[0] if versions else None,
        "pgstac": versions[1] if versions else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_before": os.getloadavg(),
    }
    if not args.skip_cold:
        report["cold_start"] = cold_starts(args.dsn, work, args.items, args.runs)
        report["load_average_after_cold"] = os.getloadavg()
    log = work / "servers.log"
    with (
        running("plugin", args.dsn, work / "plugin.index", log) as plugin,
        running("app", args.dsn, work / "app.index", log) as app,
    ):
        clients = {"plugin": plugin, "app": app}
        for name, client in clients.items():  # load (build) each index before timing
            ms, _ = search_ms(client, similarity("i0000000"))
            report[f"{name}_first_search_ms"] = round(ms, 1)
        report["upkeep"] = upkeep(args.dsn, clients, args.items, args.repeats)
        report["load_average_after_upkeep"] = os.getloadavg()
        report["latency"] = latency(clients, args.items, args.requests)
    report["load_average_after"] = os.getloadavg()
    report["requests_per_cell"] = args.requests
    return report


if __name__ == "__main__":
    main()
