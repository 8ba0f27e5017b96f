"""BigEarthNet retrieval benchmark: S2 (12 bands) and S1 (VV, VH) hash codes trained end to end.

The data are tiny (BENv1's 30 patches + BENv2's 18 labelled ones): this run proves that the
multispectral and SAR paths work end to end (reading, normalisation, band-aware augmentation,
fine-tuning a SmallCNN with multi-label mining, multi-label retrieval metrics), not accuracy.

Protocol: the official split lists of both folders. ``train`` + ``val`` form the training set
and the retrieval archive (nothing is tuned, so val is not held out); the ``test`` patches are
the queries. Relevant = shares at least one of the 19 labels; graded metrics count shared labels.
Per-band statistics come from the training patches only. Writes
benchmarks/results/bigearthnet/bigearthnet.json (one row per sensor x method) and
bigearthnet.png beside it.

    .venv/bin/python benchmarks/bigearthnet_retrieval.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stac_rscbir.data.bigearthnet import (
    BandStats,
    BenPatches,
    Sensor,
    load_ben,
)
from stac_rscbir.eval.metrics import evaluate_codes, multi_label_relevance
from stac_rscbir.eval.plots import save_metric_bars
from stac_rscbir.extension.codec import pack_bits
from stac_rscbir.models.augment import Augment
from stac_rscbir.models.backbones import build_backbone
from stac_rscbir.models.methods import METHODS
from stac_rscbir.models.training import TrainConfig, encode, train_hashing

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "bigearthnet"
OUT = ROOT / "benchmarks" / "results" / "bigearthnet"
KS = (5, 10)
# (column title, metric key, random-baseline key) of the printed table and the chart
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("mAP@10", "map_at_10", "random_map_at_10"),
    ("mAP@10 trunc", "map_at_10_truncated", "random_map_at_10_truncated"),
    ("NDCG@10", "ndcg_at_10", "random_ndcg_at_10"),
    ("ACG@10", "acg_at_10", "random_acg_at_10"),
    ("wMAP@10", "wmap_at_10", "random_wmap_at_10"),
    ("P@5", "precision_at_5", "random_precision_at_5"),
    ("P@10", "precision_at_10", "random_precision_at_10"),
    ("P@r<=2", "precision_within_radius_2", "relevant_fraction"),
)


def augmentation(
    sensor: Sensor, stats: BandStats, seed: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Band-aware augmentation applied in physical units (DN or dB) to z-scored batches.

    Optical: flips, 90-degree rotations and per-band gain/contrast jitter on reflectances.
    SAR: flips, rotations and mild extra log-domain speckle (L = 20 looks, about +-1 dB),
    never colour jitter; the speckle model is defined on dB values before any z-scoring.
    """
    aug = (
        Augment("optical", brightness=0.1, contrast=0.1, seed=seed)
        if sensor == "s2"
        else Augment("sar", speckle_looks=20.0, sar_scale="db", seed=seed)
    )
    mean = torch.tensor(stats.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(stats.std, dtype=torch.float32).view(1, -1, 1, 1)

    def apply(x: torch.Tensor) -> torch.Tensor:
        m, s = mean.to(x), std.to(x)
        return (aug(x * s + m) - m) / s

    return apply


def run(
    sensor: Sensor, method: str, train: BenPatches, test: BenPatches, args: argparse.Namespace
) -> dict[str, Any]:
    """Train one preset on ``train``, encode both sets, score test queries against the archive."""
    stats = BandStats.fit(train.images, train.bands)
    x_train = torch.from_numpy(stats.normalise(train.images))
    x_test = torch.from_numpy(stats.normalise(test.images))
    result = train_hashing(
        METHODS[method],
        x_train,
        train.labels,
        args.bits,
        TrainConfig(
            iterations=args.iterations, batch_size=args.batch_size, seed=args.seed, progress=False
        ),
        backbone=build_backbone("smallcnn", len(train.bands), pretrained=False),
        augment=augmentation(sensor, stats, args.seed),
    )
    db_bits, _ = encode(result.net, x_train, batch_size=64)
    query_bits, _ = encode(result.net, x_test, batch_size=64)
    metrics = evaluate_codes(
        pack_bits(query_bits),
        pack_bits(db_bits),
        test.labels,
        train.labels,
        multi_label=True,
        ks=KS,
        random_draws=args.random_draws,
        seed=args.seed,
    )
    # chance level of precision within a Hamming ball: the share of relevant archive items
    metrics["relevant_fraction"] = float(multi_label_relevance(test.labels, train.labels).mean())
    return {
        "sensor": sensor,
        "bands": list(train.bands),
        "method": method,
        "bits": args.bits,
        "backbone": "smallcnn (random init, fine-tuned end to end)",
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "n_train": len(train),
        "n_query": len(test),
        "train_seconds": round(result.seconds, 1),
        "device": result.device,
        "final_loss": result.history[-1]["loss"],
        "normalisation": stats.to_config(),
        "metrics": metrics,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per run: each metric as ``value (random)``."""
    head = f"{'sensor':6} {'method':8} {'bits':>4} " + " ".join(f"{c:>15}" for c, _, _ in COLUMNS)
    print(head + f" {'train s':>8}")
    for r in rows:
        m = r["metrics"]
        cells = " ".join(f"{m[k]:>6.3f} ({m[b]:.3f})" for _, k, b in COLUMNS)
        print(f"{r['sensor']:6} {r['method']:8} {r['bits']:>4} {cells} {r['train_seconds']:>8}")
    print("(random ranking in parentheses; for P@r<=2: the share of relevant archive items)")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars of the [0, 1] metrics per sensor x method; black ticks mark random rankings."""
    save_metric_bars(
        {f"{r['sensor']} {r['method']}": r["metrics"] for r in rows},
        [c for c in COLUMNS if not c[1].startswith("acg")],  # ACG is not bounded by 1
        path,
        f"BigEarthNet (tiny: {rows[0]['n_train']} train, {rows[0]['n_query']} queries), "
        f"{rows[0]['bits']}-bit codes, SmallCNN fine-tuned",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding BENv1/, BENv2/")
    parser.add_argument("--sources", nargs="+", choices=["v1", "v2"], default=["v1", "v2"])
    parser.add_argument("--sensors", nargs="+", choices=["s2", "s1"], default=["s2", "s1"])
    parser.add_argument(
        "--methods", nargs="+", choices=sorted(METHODS), default=["milan", "triplet"]
    )
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--random-draws", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    missing = [f"BEN{s}" for s in args.sources if not (args.data / f"BEN{s}").is_dir()]
    if missing:
        parser.error(f"{', '.join(missing)} not found under {args.data} (see --data)")
    start = time.perf_counter()
    rows = []
    for sensor in args.sensors:
        patches = load_ben(args.data, sensor, args.sources)
        train, test = patches.in_split("train", "val"), patches.in_split("test")
        for method in args.methods:
            rows.append(run(sensor, method, train, test, args))
            print(f"{sensor} {method}: {rows[-1]['train_seconds']} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "note": "tiny data: proves the multispectral/SAR path end to end, not accuracy",
        "data": [f"BEN{s}" for s in args.sources],
        "protocol": "official splits; train+val = training set and archive, test = queries; "
        "relevant = shares >= 1 of 19 labels",
        "ks": list(KS),
        "rows": rows,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads",
        "date": time.strftime("%Y-%m-%d"),
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "bigearthnet.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.out / "bigearthnet.png")
    print_table(rows)
    print(f"done in {report['total_seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
