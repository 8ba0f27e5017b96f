"""Bounded load test over loopback: N concurrent clients mixing similarity searches with writes.

Preloads a store (SQLite file; pgstac with --dsn, or a throwaway cluster with --pgstac-cluster)
with the items of service_bench.py, starts the API with uvicorn in a separate process on a free
loopback port, warms the hash index, then runs ``--workers`` asyncio workers (one shared
httpx.AsyncClient) for ``--duration`` seconds. Each worker draws its next request:

* ``post`` (``--post-frac``, 10 %): POST a new item with a random 64-bit code; once
  acknowledged, the same worker at once GETs it (``get_after_post``, must be 200) and, for
  ``--ryw-search-frac`` of them, runs a similarity search by it (``search_after_post``) that
  must return it first at distance 0 (read-your-writes);
* ``put`` (``--put-frac``, 5 %): PUT an update of a preloaded item (a new property, one code
  bit flipped);
* otherwise a similarity search by a random item (``search``), with a random bbox of ~1 % of
  the grid for ``--bbox-frac`` of them (``search_bbox``).

Reports per request type: count, throughput, p50 / p95 / p99 latency, errors (non-2xx or
exceptions, with samples), and the read-your-writes failures (a failed search is asked again,
untimed, 1 s later: transient or not). When ``create_api`` takes a ``write_token`` the server
gets a random one and writes send it as ``Authorization: Bearer``; a last POST without it
records the status. Writes benchmarks/results/load/load_<store>.json (``_<items>`` appended
when not 10^4) and .png, load.png (all stores side by side), and prints a markdown table.
Client and server share the machine's cores.

    .venv/bin/python benchmarks/load_bench.py                      # SQLite, 10^4 items
    .venv/bin/python benchmarks/load_bench.py --pgstac-cluster     # throwaway pgstac cluster
    .venv/bin/python benchmarks/load_bench.py --dsn postgresql://...
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from service_bench import MODEL, bench_item, items, load  # noqa: E402

from stac_rscbir.extension.cbir import HashCode  # noqa: E402
from tests.serving import ServeProcess, store_args  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "load"
TYPES = ["search", "search_bbox", "post", "put", "get_after_post", "search_after_post"]


class Stats:
    """Latencies, errors and read-your-writes failures, per request type."""

    def __init__(self) -> None:
        self.lat: dict[str, list[float]] = {t: [] for t in TYPES}
        self.errors: dict[str, int] = dict.fromkeys(TYPES, 0)
        self.samples: list[dict[str, Any]] = []
        self.ryw = {
            "posts_acknowledged": 0,
            "get_checked": 0,
            "get_failed": 0,
            "search_checked": 0,
            "search_failed": 0,
            "search_failed_ok_1s_later": 0,
        }
        self.ryw_samples: list[dict[str, Any]] = []
        self.done_at: list[float] = []  # completion time of every request, s since start

    def error(self, kind: str, detail: dict[str, Any]) -> None:
        self.errors[kind] += 1
        if sum(1 for s in self.samples if s["type"] == kind) < 5:
            self.samples.append({"type": kind, **detail})


async def request(
    client: httpx.AsyncClient,
    stats: Stats,
    t_start: float,
    kind: str,
    method: str,
    url: str,
    **kwargs: Any,
) -> httpx.Response | None:
    """One timed request; None (and an error counted) on a non-2xx answer or an exception."""
    t0 = time.perf_counter()
    try:
        r = await client.request(method, url, **kwargs)
    except Exception as exc:
        stats.lat[kind].append((time.perf_counter() - t0) * 1000)
        stats.done_at.append(time.perf_counter() - t_start)
        stats.error(kind, {"url": url, "exception": f"{type(exc).__name__}: {exc}"[:300]})
        return None
    t1 = time.perf_counter()
    stats.lat[kind].append((t1 - t0) * 1000)
    stats.done_at.append(t1 - t_start)
    if not r.is_success:
        stats.error(kind, {"url": url, "status": r.status_code, "body": r.text[:300]})
        return None
    return r


def new_item(worker: int, n: int, rng: random.Random, side: float = 3.0) -> dict[str, Any]:
    """A new item with a uniformly random 64-bit code (unlike the clustered preloaded ones)."""
    x, y = 10 + rng.random() * (side - 0.01), 45 + rng.random() * (side - 0.01)
    bits = np.array([rng.getrandbits(1) for _ in range(64)], dtype=np.uint8)
    return bench_item(f"load-w{worker:02d}-{n:06d}", x, y, 0.01, "2024-01-01T00:00:00Z", bits)


def updated(item: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A copy of a preloaded item with a new property and one bit of its code flipped."""
    out = copy.deepcopy(item)
    code = HashCode.from_dict(out["properties"]["cbir:codes"][0])
    bits = np.unpackbits(code.packed())[:64]
    bits[rng.randrange(64)] ^= 1
    out["properties"]["cbir:codes"] = [HashCode.from_bits(MODEL, "1.0.0", bits).to_dict()]
    out["properties"]["load:updated"] = time.time()
    return out


async def worker(
    w: int,
    client: httpx.AsyncClient,
    stats: Stats,
    data: list[dict[str, Any]],
    args: argparse.Namespace,
    headers: dict[str, str],
    t_start: float,
    deadline: float,
) -> None:
    rng = random.Random(args.seed * 1000 + w)
    n_created = 0
    while time.perf_counter() < deadline:
        u = rng.random()
        if u < args.post_frac:
            item = new_item(w, n_created, rng)
            n_created += 1
            r = await request(
                client,
                stats,
                t_start,
                "post",
                "POST",
                "/collections/bench/items",
                json=item,
                headers=headers,
            )
            if r is None:
                continue
            stats.ryw["posts_acknowledged"] += 1
            url = f"/collections/bench/items/{item['id']}"
            t0 = time.perf_counter()
            try:
                g = await client.get(url)
                status, body = g.status_code, g.text[:300]
            except Exception as exc:
                status, body = None, f"{type(exc).__name__}: {exc}"[:300]
            stats.lat["get_after_post"].append((time.perf_counter() - t0) * 1000)
            stats.done_at.append(time.perf_counter() - t_start)
            stats.ryw["get_checked"] += 1
            if status != 200:
                stats.ryw["get_failed"] += 1
                stats.error("get_after_post", {"url": url, "status": status, "body": body})
            if rng.random() < args.ryw_search_frac:
                sim = {"model": MODEL, "item": {"collection": "bench", "id": item["id"]}, "k": 10}
                s = await request(
                    client,
                    stats,
                    t_start,
                    "search_after_post",
                    "POST",
                    "/search",
                    json={"limit": 10, "similarity": sim},
                )
                stats.ryw["search_checked"] += 1
                feats = s.json()["features"] if s is not None else []
                first = feats[0] if feats else None
                ok = (
                    first is not None
                    and first["id"] == item["id"]
                    and first["properties"].get("cbir:distance") == 0
                )
                if not ok:
                    stats.ryw["search_failed"] += 1
                    # diagnosis, untimed: does the item show up a second later (transient) or not?
                    await asyncio.sleep(1.0)
                    again = await client.post(
                        "/search", json={"limit": 1, "similarity": sim}, timeout=120
                    )
                    top = again.json()["features"][:1] if again.is_success else []
                    later = bool(top) and top[0]["id"] == item["id"]
                    stats.ryw["search_failed_ok_1s_later"] += int(later)
                    if len(stats.ryw_samples) < 5:
                        stats.ryw_samples.append(
                            {
                                "item": item["id"],
                                "status": None if s is None else s.status_code,
                                "top": [
                                    (f["id"], f["properties"].get("cbir:distance"))
                                    for f in feats[:3]
                                ],
                                "ok_1s_later": later,
                            }
                        )
        elif u < args.post_frac + args.put_frac:
            base = data[rng.randrange(len(data))]
            await request(
                client,
                stats,
                t_start,
                "put",
                "PUT",
                f"/collections/bench/items/{base['id']}",
                json=updated(base, rng),
                headers=headers,
            )
        else:
            qid = data[rng.randrange(len(data))]["id"]
            body: dict[str, Any] = {
                "limit": 10,
                "similarity": {"model": MODEL, "item": {"collection": "bench", "id": qid}, "k": 10},
            }
            kind = "search"
            if rng.random() < args.bbox_frac:
                x, y = 10 + rng.random() * 2.7, 45 + rng.random() * 2.7  # ~1 % of the grid
                body["bbox"] = [x, y, x + 0.3, y + 0.3]
                kind = "search_bbox"
            await request(client, stats, t_start, kind, "POST", "/search", json=body)


async def run_load(
    base_url: str, data: list[dict[str, Any]], args: argparse.Namespace, token: str
) -> tuple[Stats, float]:
    stats = Stats()
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=args.workers, max_keepalive_connections=args.workers)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:
        t_start = time.perf_counter()
        deadline = t_start + args.duration
        await asyncio.gather(
            *(
                worker(w, client, stats, data, args, headers, t_start, deadline)
                for w in range(args.workers)
            )
        )
        elapsed = time.perf_counter() - t_start
    return stats, elapsed


def summarise(stats: Stats, elapsed: float) -> list[dict[str, Any]]:
    rows = []
    everything = [x for t in TYPES for x in stats.lat[t]]
    for name, lat in [*((t, stats.lat[t]) for t in TYPES), ("all", everything)]:
        errors = sum(stats.errors.values()) if name == "all" else stats.errors[name]
        row: dict[str, Any] = {
            "type": name,
            "count": len(lat),
            "req_per_s": round(len(lat) / elapsed, 2),
            "errors": errors,
        }
        for q in (50, 95, 99):
            row[f"p{q}_ms"] = round(float(np.percentile(lat, q)), 1) if lat else None
        row["max_ms"] = round(max(lat), 1) if lat else None
        rows.append(row)
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"**{report['store']}**, {report['items']:,} items preloaded, {report['workers']} workers, "
        f"{report['elapsed_s']:.1f} s",
        "",
        "| request | count | req/s | p50 ms | p95 ms | p99 ms | max ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['type']} | {r['count']} | {r['req_per_s']} | {r['p50_ms']} | {r['p95_ms']} "
            f"| {r['p99_ms']} | {r['max_ms']} | {r['errors']} |"
        )
    ryw = report["read_your_writes"]
    lines += [
        "",
        f"read-your-writes: {ryw['posts_acknowledged']} POSTs acknowledged; GET after POST "
        f"{ryw['get_failed']} failed of {ryw['get_checked']}; similarity search by the new item "
        f"(must be first at distance 0) {ryw['search_failed']} failed of {ryw['search_checked']} "
        f"({ryw['search_failed_ok_1s_later']} of those found it when asked again 1 s later)",
    ]
    return "\n".join(lines)


def plot(reports: list[dict[str, Any]], path: Path) -> None:
    """p50 bars with p95 / p99 ticks per request type; one panel per store."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5 * len(reports), 4.2))
    FigureCanvasAgg(fig)
    first = None
    for j, report in enumerate(reports):
        ax = fig.add_subplot(1, len(reports), j + 1, sharey=first)
        first = first or ax
        rows = [r for r in report["rows"] if r["count"]]
        x = np.arange(len(rows))
        ax.bar(x, [r["p50_ms"] for r in rows], 0.6, label="p50", color="tab:blue")
        ax.scatter(x, [r["p95_ms"] for r in rows], marker="_", s=300, color="tab:orange")
        ax.scatter(x, [r["p99_ms"] for r in rows], marker="_", s=300, color="black")
        ax.scatter([], [], marker="_", color="tab:orange", label="p95")
        ax.scatter([], [], marker="_", color="black", label="p99")
        ax.set_yscale("log")
        ax.set_xticks(x, [r["type"].replace("_", "\n") for r in rows], fontsize=8)
        ax.set_ylabel("latency, ms (log)")
        ax.set_title(
            f"{report['store']}: {report['items']:,} items, {report['workers']} workers, "
            f"{report['rows'][-1]['req_per_s']} req/s",
            fontsize=10,
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000, help="items preloaded")
    parser.add_argument("--workers", type=int, default=16, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--post-frac", type=float, default=0.10)
    parser.add_argument("--put-frac", type=float, default=0.05)
    parser.add_argument("--bbox-frac", type=float, default=0.3, help="searches with a bbox")
    parser.add_argument(
        "--ryw-search-frac",
        type=float,
        default=0.5,
        help="acknowledged POSTs followed by a similarity search by the new item",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dsn", default=None, help="pgstac database (default: SQLite)")
    parser.add_argument(
        "--pgstac-cluster",
        action="store_true",
        help="start a throwaway migrated pgstac cluster (tests/pgcluster.py) and use it",
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]  # other work on the machine, for the record
    args.out.mkdir(parents=True, exist_ok=True)
    cluster = None
    if args.pgstac_cluster:
        from tests.pgcluster import start_cluster

        cluster = start_cluster()
        args.dsn = cluster.dsn
        print(f"pgstac cluster on port {cluster.port}", flush=True)
    token = os.urandom(16).hex()
    try:
        with tempfile.TemporaryDirectory() as tmpdir:
            tmp = Path(tmpdir)
            kind, target = load(args, tmp)
            data = items(args.items)
            log = tmp / "server.log"
            server = ServeProcess(store_args(kind, target), tmp / "index", log, token).start()
            base_url = server.url
            try:
                sim = {"model": MODEL, "item": {"collection": "bench", "id": data[0]["id"]}}
                t0 = time.perf_counter()
                r = httpx.post(
                    f"{base_url}/search", json={"limit": 10, "similarity": sim}, timeout=600
                )
                if not r.is_success:
                    raise RuntimeError(f"warm-up search: {r.status_code} {r.text[:500]}")
                warm = time.perf_counter() - t0
                print(f"index warm-up {warm:.1f} s; load for {args.duration:.0f} s", flush=True)
                stats, elapsed = asyncio.run(run_load(base_url, data, args, token))
                # a write without the token: refused (401/403) when the server has one
                unauth = httpx.post(
                    f"{base_url}/collections/bench/items",
                    json=new_item(99, 0, random.Random(1)),
                    timeout=120,
                ).status_code
                alive = server.returncode is None
            finally:
                server.stop()
    finally:
        if cluster is not None:
            cluster.stop()
    report = {
        "store": kind,
        "items": args.items,
        "workers": args.workers,
        "duration_s": args.duration,
        "elapsed_s": round(elapsed, 2),
        "mix": {
            "post": args.post_frac,
            "put": args.put_frac,
            "search": round(1 - args.post_frac - args.put_frac, 3),
            "search_with_bbox_share": args.bbox_frac,
            "ryw_search_share_of_posts": args.ryw_search_frac,
        },
        "first_similarity_request_s": round(warm, 2),
        "server_alive_after": alive,
        "write_token_used": True,
        "post_without_token_status": unauth,
        "rows": summarise(stats, elapsed),
        "read_your_writes": stats.ryw,
        "read_your_writes_failures_sample": stats.ryw_samples,
        "error_samples": stats.samples,
        "throughput_per_s": np.bincount(
            np.asarray(stats.done_at, dtype=int), minlength=int(elapsed) + 1
        ).tolist(),
        "machine": (
            f"{platform.node()} {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores, 1-minute load average {load_before:.2f} before the run; "
            "client, server (and PostgreSQL) on the same cores, over loopback"
        ),
        "command": " ".join([".venv/bin/python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
    }
    name = f"load_{kind}" + ("" if args.items == 10_000 else f"_{args.items}")
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot([report], args.out / f"{name}.png")
    reports = [
        json.loads(p.read_text())
        for p in sorted(args.out.glob("load_*.json"), key=lambda p: (len(p.name), p.name))
    ]
    plot(reports, args.out / "load.png")
    print(markdown(report))


if __name__ == "__main__":
    main()
