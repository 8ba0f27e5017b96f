"""Cross-modal BigEarthNet retrieval: one hash branch per sensor, one shared Hamming space.

A Sentinel-2 branch (12 bands -> SmallCNN -> hash head) and a Sentinel-1 branch (VV/VH ->
SmallCNN -> its own hash head) are trained together on co-registered S2/S1 pairs with the
``sidhcnn`` preset (source-invariant DHCNN, Li et al. TGRS 2018): intra-source pairwise
likelihood on both branches, the inter-source (cross) pairwise likelihood between S2 and S1
codes of the batch (label-based similarity; the paired patch itself counts as similar),
quantization and bit balance. Codes of both branches live in one 32-bit Hamming space, so a
query from one sensor can be ranked against an archive of the other.

The data are tiny (BENv1's 30 pairs + BENv2's 18 labelled pairs): this run proves the
cross-modal path end to end (paired reading, per-sensor normalisation, two-branch training,
cross-sensor ranking and multi-label metrics), not accuracy.

Protocol: the official split lists of both folders; ``train`` + ``val`` form the training set
and the archive, the ``test`` patches are the queries. Relevant = shares at least one of the 19
labels; graded metrics count shared labels. Four directions: S2->S2, S1->S1 (uni-modal),
S2->S1, S1->S2 (query codes from one branch, archive codes from the other). Per-band statistics
come from the training patches of each sensor. Also reported: the mean Hamming distance between
the S2 and S1 codes of the same test patch versus different patches, before and after training
(the untrained network is the same seeded initialisation). Writes
benchmarks/results/crossmodal/crossmodal.json and crossmodal.png beside it.

    .venv/bin/python benchmarks/crossmodal_retrieval.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
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
from stac_rscbir.models.backbones import build_backbone
from stac_rscbir.models.methods import METHODS, HashingNet
from stac_rscbir.models.training import TrainConfig, TrainResult, encode, train_hashing

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "bigearthnet"
OUT = ROOT / "benchmarks" / "results" / "crossmodal"
KS = (5, 10)
METHOD = "sidhcnn"
#: source index of each sensor in the two-branch network (0: ``backbone``/``head``)
SOURCE: dict[Sensor, int] = {"s2": 0, "s1": 1}
DIRECTIONS: tuple[tuple[Sensor, Sensor], ...] = (
    ("s2", "s2"),
    ("s1", "s1"),
    ("s2", "s1"),
    ("s1", "s2"),
)
# (column title, metric key, random-baseline key) of the printed table and the chart
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("mAP@10", "map_at_10", "random_map_at_10"),
    ("mAP@10 trunc", "map_at_10_truncated", "random_map_at_10_truncated"),
    ("NDCG@10", "ndcg_at_10", "random_ndcg_at_10"),
    ("P@10", "precision_at_10", "random_precision_at_10"),
)


def load_pairs(data: Path, sources: list[str]) -> tuple[BenPatches, BenPatches]:
    """The co-registered (S2, S1) patches of the chosen folders, row i of both the same patch."""
    s2, s1 = load_ben(data, "s2", sources), load_ben(data, "s1", sources)
    if s2.names != s1.names or s2.split != s1.split or not np.array_equal(s2.labels, s1.labels):
        raise ValueError("S2 and S1 patches are not paired row by row")
    return s2, s1


def train_crossmodal(
    s2: BenPatches, s1: BenPatches, bits: int, config: TrainConfig
) -> tuple[TrainResult, dict[Sensor, BandStats]]:
    """Train the two-branch ``sidhcnn`` network on paired training patches (S2 = source 0).

    ``config.iterations = 0`` returns the untrained network of the same seeded initialisation.
    """
    stats: dict[Sensor, BandStats] = {
        "s2": BandStats.fit(s2.images, s2.bands),
        "s1": BandStats.fit(s1.images, s1.bands),
    }
    torch.manual_seed(config.seed)  # both backbones' initialisation, before train_hashing's seed
    result = train_hashing(
        METHODS[METHOD],
        torch.from_numpy(stats["s2"].normalise(s2.images)),
        s2.labels,
        bits,
        config,
        second_source=torch.from_numpy(stats["s1"].normalise(s1.images)),
        backbone=build_backbone("smallcnn", len(s2.bands)),
        backbone2=build_backbone("smallcnn", len(s1.bands)),
    )
    return result, stats


def encode_pair(
    net: HashingNet, stats: dict[Sensor, BandStats], s2: BenPatches, s1: BenPatches
) -> dict[Sensor, npt.NDArray[np.uint8]]:
    """{0,1} codes (N, bits) of each sensor through its own branch."""
    return {
        sensor: encode(
            net, torch.from_numpy(stats[sensor].normalise(p.images)), 64, source=SOURCE[sensor]
        )[0]
        for sensor, p in (("s2", s2), ("s1", s1))
    }


def pair_distances(codes: dict[Sensor, npt.NDArray[np.uint8]]) -> dict[str, float]:
    """Mean Hamming distance between S2 and S1 codes of the same patch and of different ones."""
    d = (codes["s2"][:, None, :] != codes["s1"][None, :, :]).sum(-1).astype(np.float64)
    off = ~np.eye(len(d), dtype=bool)
    return {"paired": float(np.diag(d).mean()), "unpaired": float(d[off].mean())}


def evaluate_directions(
    query: dict[Sensor, npt.NDArray[np.uint8]],
    archive: dict[Sensor, npt.NDArray[np.uint8]],
    query_labels: npt.NDArray[np.uint8],
    archive_labels: npt.NDArray[np.uint8],
    random_draws: int,
    seed: int,
) -> dict[str, dict[str, float]]:
    """Metrics of the four query-sensor -> archive-sensor directions, keyed ``"s2->s1"`` etc."""
    out = {}
    for q, a in DIRECTIONS:
        out[f"{q}->{a}"] = evaluate_codes(
            pack_bits(query[q]),
            pack_bits(archive[a]),
            query_labels,
            archive_labels,
            multi_label=True,
            ks=KS,
            random_draws=random_draws,
            seed=seed,
        )
    return out


def print_table(directions: dict[str, dict[str, float]]) -> None:
    """A markdown table: one row per direction, each metric as ``value (random)``."""
    print("| query -> archive | " + " | ".join(c for c, _, _ in COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for name, m in directions.items():
        cells = " | ".join(f"{m[k]:.3f} ({m[b]:.3f})" for _, k, b in COLUMNS)
        print(f"| {name.replace('s2', 'S2').replace('s1', 'S1')} | {cells} |")
    print("(random ranking in parentheses)")


def plot(report: dict[str, Any], path: Path) -> None:
    """Grouped bars of the metrics per direction; black ticks mark random rankings."""
    save_metric_bars(
        {name.upper(): m for name, m in report["directions"].items()},
        COLUMNS,
        path,
        f"BigEarthNet S2/S1 cross-modal (tiny: {report['n_train']} train pairs, "
        f"{report['n_query']} queries), {report['bits']}-bit {METHOD}",
        figsize=(9, 4),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding BENv1/, BENv2/")
    parser.add_argument("--sources", nargs="+", choices=["v1", "v2"], default=["v1", "v2"])
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
    s2, s1 = load_pairs(args.data, args.sources)
    tr = [i for i, s in enumerate(s2.split) if s in ("train", "val")]
    te = [i for i, s in enumerate(s2.split) if s == "test"]
    s2_tr, s1_tr, s2_te, s1_te = s2.select(tr), s1.select(tr), s2.select(te), s1.select(te)

    def config(iterations: int) -> TrainConfig:
        return TrainConfig(
            iterations=iterations, batch_size=args.batch_size, seed=args.seed, progress=False
        )

    untrained, _ = train_crossmodal(s2_tr, s1_tr, args.bits, config(0))
    result, stats = train_crossmodal(s2_tr, s1_tr, args.bits, config(args.iterations))
    pairs = {}
    for name, net in (("untrained", untrained.net), ("trained", result.net)):
        pairs[name] = pair_distances(encode_pair(net, stats, s2_te, s1_te))
    archive = encode_pair(result.net, stats, s2_tr, s1_tr)
    query = encode_pair(result.net, stats, s2_te, s1_te)
    directions = evaluate_directions(
        query, archive, s2_te.labels, s2_tr.labels, args.random_draws, args.seed
    )
    relevant = float(multi_label_relevance(s2_te.labels, s2_tr.labels).mean())
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "note": "tiny data: proves the cross-modal S2/S1 path end to end, not accuracy",
        "data": [f"BEN{s}" for s in args.sources],
        "protocol": "official splits; train+val = training set and archive, test = queries; "
        "relevant = shares >= 1 of 19 labels; direction q->a: query codes from the q branch, "
        "archive codes from the a branch",
        "method": METHOD,
        "loss_weights": METHODS[METHOD].weights,
        "branches": {
            "s2": f"{list(s2.bands)} -> smallcnn (random init) -> linear hash head (source 0)",
            "s1": f"{list(s1.bands)} -> smallcnn (random init) -> linear hash head (source 1)",
        },
        "bits": args.bits,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "n_train": len(tr),
        "n_query": len(te),
        "relevant_fraction": relevant,
        "train_seconds": round(result.seconds, 1),
        "device": result.device,
        "final_loss": result.history[-1],
        "test_pair_hamming": pairs,
        "normalisation": {k: v.to_config() for k, v in stats.items()},
        "ks": list(KS),
        "directions": directions,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads",
        "date": time.strftime("%Y-%m-%d"),
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "crossmodal.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "crossmodal.png")
    print_table(directions)
    for name, p in pairs.items():
        print(
            f"test pairs, {name}: mean Hamming S2 vs S1 of the same patch {p['paired']:.2f}, "
            f"of different patches {p['unpaired']:.2f} (of {args.bits} bits)"
        )
    print(f"train {result.seconds:.1f} s on {result.device}; done in {report['total_seconds']} s")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
