"""Service latency: query-by-item with a bbox filter through HTTP, against the same bbox search
without similarity, at 10^5 items (p50 / p95 over sequential requests).

Builds the store (SQLite file, or pgstac with --dsn), starts the API with uvicorn in a separate
process on a free loopback port, warms up the hash index, then times requests from this
process with httpx. Writes benchmarks/results/service/service_<store>.json and .png.

    .venv/bin/python benchmarks/service_bench.py                   # SQLite, 10^5 items
    .venv/bin/python benchmarks/service_bench.py --dsn postgresql://...   # pgstac
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from stac_rscbir.extension.cbir import CBIRModel, HashCode  # noqa: E402
from tests.serving import ServeProcess, store_args  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "service"
MODEL = "bench-64"
T0 = datetime(2020, 1, 1, tzinfo=UTC)


def bench_item(
    item_id: str, x: float, y: float, dx: float, datetime: str, bits: np.ndarray
) -> dict[str, Any]:
    """An item of the benchmark collection: a dx-degree square at (x, y) with one 64-bit code."""
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": ["https://stac-extensions.github.io/cbir/v1.0.0/schema.json"],
        "id": item_id,
        "collection": "bench",
        "geometry": {
            "type": "Polygon",
            "coordinates": [[[x, y], [x + dx, y], [x + dx, y + dx], [x, y + dx], [x, y]]],
        },
        "bbox": [x, y, x + dx, y + dx],
        "properties": {
            "datetime": datetime,
            "cbir:codes": [HashCode.from_bits(MODEL, "1.0.0", bits).to_dict()],
        },
        "links": [],
        "assets": {},
    }


def iter_items(n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """n items on a 1 km grid over ~3x3 degrees, clustered 64-bit codes, a datetime each,
    made one at a time (item i is in column i % side, row i // side, side = ceil(sqrt(n)),
    covering 80 % of its grid cell)."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 2, size=(64, 64), dtype=np.uint8)
    side = int(np.ceil(np.sqrt(n)))
    for i in range(n):
        x, y = 10 + (i % side) * 3.0 / side, 45 + (i // side) * 3.0 / side
        bits = centres[i % 64].copy()
        bits[rng.choice(64, size=6, replace=False)] ^= 1
        when = (T0 + timedelta(hours=i)).isoformat().replace("+00:00", "Z")
        yield bench_item(f"i{i:07d}", x, y, 0.8 * 3.0 / side, when, bits)


def items(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The items of :func:`iter_items` as a list."""
    return list(iter_items(n, seed))


COLLECTION = {  # declares the model: API writes of its codes are checked against it
    "type": "Collection",
    "stac_version": "1.1.0",
    "stac_extensions": ["https://stac-extensions.github.io/cbir/v1.0.0/schema.json"],
    "cbir:models": [CBIRModel.create(MODEL, "1.0.0", 64, ["red", "green", "blue"]).to_dict()],
    "id": "bench",
    "description": "service benchmark",
    "license": "other",
    "extent": {
        "spatial": {"bbox": [[10, 45, 13, 48]]},
        "temporal": {"interval": [["2020-01-01T00:00:00Z", None]]},
    },
    "links": [],
}


def load(args: argparse.Namespace, tmp: Path) -> tuple[str, str]:
    """Fill the store; returns (kind, target) for the server process."""
    data = items(args.items)
    start = time.perf_counter()
    if args.dsn:
        from stac_rscbir.store.pgstac import PgstacStore

        store: Any = PgstacStore(args.dsn)
        kind, target = "pgstac", args.dsn
    else:
        from stac_rscbir.store.sqlite import SQLiteStore

        store = SQLiteStore(tmp / "bench.db")
        kind, target = "sqlite", str(tmp / "bench.db")
    store.create_collection(COLLECTION)
    for i in tqdm(range(0, len(data), 10_000), desc="load", unit="x10k items"):
        store.upsert_items(data[i : i + 10_000])
    print(f"loaded {len(data)} items in {time.perf_counter() - start:.1f} s", flush=True)
    return kind, target


def timed(client: httpx.Client, body: dict[str, Any], n: int) -> tuple[list[float], int]:
    """Latencies in ms of n POST /search with ``body`` (a different query item each time)."""
    rng = np.random.default_rng(1)
    out, returned = [], 0
    for _ in range(n):
        b = json.loads(json.dumps(body))
        if "similarity" in b:
            b["similarity"]["item"]["id"] = f"i{int(rng.integers(0, ITEMS)):07d}"
        t0 = time.perf_counter()
        r = client.post("/search", json=b)
        out.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
        returned += len(r.json()["features"])
    return out, returned


ITEMS = 0


def main() -> None:
    global ITEMS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--dsn", default=None, help="pgstac database (default: SQLite)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    ITEMS = args.items
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        kind, target = load(args, tmp)
        log = tmp / "server.log"
        server = ServeProcess(store_args(kind, target), tmp / "index", log).start()
        try:
            client = httpx.Client(base_url=server.url, timeout=300)
            bboxes = {  # ~0.1 %, 1 % and 10 % of the grid
                "bbox 0.1%": [10.0, 45.0, 10.095, 45.095],
                "bbox 1%": [10.0, 45.0, 10.3, 45.3],
                "bbox 10%": [10.0, 45.0, 10.95, 45.95],
            }
            sim = {"model": MODEL, "item": {"collection": "bench", "id": "i0000000"}, "k": 10}
            t0 = time.perf_counter()
            client.post("/search", json={"similarity": sim}).raise_for_status()
            warm = time.perf_counter() - t0  # loads or builds the index
            rows = []
            for name, bbox in bboxes.items():
                plain, n_plain = timed(client, {"bbox": bbox, "limit": 10}, args.requests)
                similar, n_sim = timed(
                    client, {"bbox": bbox, "limit": 10, "similarity": sim}, args.requests
                )
                row = {
                    "filter": name,
                    "plain_p50_ms": float(np.percentile(plain, 50)),
                    "plain_p95_ms": float(np.percentile(plain, 95)),
                    "similarity_p50_ms": float(np.percentile(similar, 50)),
                    "similarity_p95_ms": float(np.percentile(similar, 95)),
                    "returned_plain": n_plain / args.requests,
                    "returned_similarity": n_sim / args.requests,
                }
                row["ratio_p50"] = row["similarity_p50_ms"] / row["plain_p50_ms"]
                row["ratio_p95"] = row["similarity_p95_ms"] / row["plain_p95_ms"]
                rows.append(row)
                print(json.dumps(row), flush=True)
            nofilter, _ = timed(client, {"limit": 10, "similarity": sim}, args.requests)
        finally:
            server.stop()
    report = {
        "store": kind,
        "items": args.items,
        "requests_per_row": args.requests,
        "first_similarity_request_s": round(warm, 2),
        "similarity_without_filter_p50_ms": float(np.percentile(nofilter, 50)),
        "similarity_without_filter_p95_ms": float(np.percentile(nofilter, 95)),
        "rows": rows,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    (args.out / f"service_{kind}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / f"service_{kind}.png")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))


def plot(report: dict[str, Any], path: Path) -> None:
    """p50 / p95 latency per filter, plain bbox search vs with similarity."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = report["rows"]
    fig = Figure(figsize=(8, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    for j, (key, label) in enumerate(
        [("plain", "bbox search"), ("similarity", "bbox + similarity")]
    ):
        p50 = [r[f"{key}_p50_ms"] for r in rows]
        p95 = [r[f"{key}_p95_ms"] for r in rows]
        ax.bar(x + (j - 0.5) * 0.38, p50, 0.38, label=f"{label} p50")
        ax.scatter(x + (j - 0.5) * 0.38, p95, marker="_", s=300, color="black", zorder=3)
    ax.set_xticks(x, [r["filter"] for r in rows])
    ax.set_ylabel("ms per request (bar p50, tick p95)")
    ax.set_title(f"POST /search over HTTP, {report['items']:,} items, {report['store']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
