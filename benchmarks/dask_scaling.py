"""Bulk encoding on Dask: does a LocalCluster with 2 workers encode twice as fast as with 1?

The input is the real Landsat-8 clip of ``ingest_throughput.py`` repeated under distinct ids,
cut into 120 px chips (288 per scene; 35 scenes = 10 080 chips). Each configuration runs the
whole ``ingest_dask`` path (partitions of scenes shipped to worker processes, one model per
worker, a GeoParquet sink written by the workers, the driver merging reports) on a
``LocalCluster(n_workers=w, threads_per_worker=1, processes=True)`` with one torch thread per
worker, so w workers use w cores. The local path (``Ingestor.run``, one torch thread) is the
baseline. Chips/s and the speed-up over 1 worker are reported with the load average around
each run, since the 2 cores may be shared.

Writes benchmarks/results/ingest/dask_scaling_<backbone>_p<partition size>.json and .png,
prints a markdown table.

    .venv/bin/python benchmarks/dask_scaling.py                     # smallcnn, 35 scenes
    .venv/bin/python benchmarks/dask_scaling.py --backbone efficientnet-lite0 --scenes 12
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one torch thread per worker process

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from ingest_throughput import LANDSAT, OUT, encoder, landsat_items  # noqa: E402

from stac_rscbir.ingest.sinks import GeoParquetSink  # noqa: E402
from stac_rscbir.ingest.worker import IngestOptions, Ingestor  # noqa: E402


def _row(name: str, workers: int, report: Any) -> dict[str, Any]:
    chips = report.chips_encoded
    return {
        "name": name,
        "workers": workers,
        "scenes": report.items_encoded,
        "chips": chips,
        "wall_seconds": report.wall_seconds,
        "chips_per_second": round(chips / report.wall_seconds, 1),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def run_local(items: list, ckpt: Path, options: IngestOptions, tmp: Path) -> dict[str, Any]:
    """The in-process path, one torch thread: the baseline the workers are compared with."""
    torch.set_num_threads(1)
    report = Ingestor.from_checkpoint(ckpt, options).run(items, GeoParquetSink(tmp / "local"))
    return _row("local (Ingestor.run)", 1, report)


def run_dask(
    workers: int, items: list, ckpt: Path, options: IngestOptions, tmp: Path, partition: int
) -> dict[str, Any]:
    """``ingest_dask`` on a fresh LocalCluster of ``workers`` single-threaded processes."""
    from dask.distributed import Client, LocalCluster

    from stac_rscbir.ingest.distributed import ingest_dask

    with (
        LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(torch.set_num_threads, 1)
        sink = GeoParquetSink(tmp / f"dask{workers}")
        report = ingest_dask(client, items, ckpt, sink, options, partition_size=partition)
    return _row(f"dask LocalCluster, {workers} worker(s)", workers, report)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [r["name"] for r in rows]
    values = [r["chips_per_second"] for r in rows]
    ax.barh(labels, values, color=["#888"] + ["#3b7dd8"] * (len(rows) - 1))
    for y, r in enumerate(rows):
        ax.text(values[y], y, f"  {values[y]:.0f}/s ({r['wall_seconds']:.0f} s)", va="center")
    ax.set_xlim(0, max(values) * 1.4)
    ax.set_xlabel("chips encoded per second, end to end")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="smallcnn")
    parser.add_argument("--scenes", type=int, default=35)
    parser.add_argument("--partition-size", type=int, default=1)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if not LANDSAT.exists():
        parser.error(f"{LANDSAT} not found: this benchmark reads ../shared/datasets")
    args.out.mkdir(parents=True, exist_ok=True)
    options = IngestOptions(chip_size=120, batch_size=64, readers=1, progress=True)
    items = landsat_items(args.scenes)
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ckpt = encoder(args.backbone, ["red", "green", "blue"], tmp)
        rows.append(run_local(items, ckpt, options, tmp))
        print(json.dumps(rows[-1]), flush=True)
        for workers in args.workers:
            rows.append(run_dask(workers, items, ckpt, options, tmp, args.partition_size))
            print(json.dumps(rows[-1]), flush=True)
    one = next(r for r in rows if r["workers"] == 1 and r["name"].startswith("dask"))
    for r in rows:
        r["speedup_over_1_worker"] = round(r["chips_per_second"] / one["chips_per_second"], 2)
    report = {
        "backbone": args.backbone,
        "partition_size": args.partition_size,
        "rows": rows,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
    }
    stem = f"dask_scaling_{args.backbone}_p{args.partition_size}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(
        rows,
        args.out / f"{stem}.png",
        (
            f"Bulk encoding on Dask, {args.backbone}, 120 px chips, "
            f"{args.partition_size} scene(s) per task"
        ),
    )
    print("| run | scenes | chips | wall s | chips/s | speed-up over 1 worker | load after |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['scenes']} | {r['chips']} | {r['wall_seconds']:.1f} | "
            f"{r['chips_per_second']:.0f} | {r['speedup_over_1_worker']:.2f} | "
            f"{r['loadavg_after']} |"
        )
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
