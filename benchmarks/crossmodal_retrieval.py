"""Cross-modal BigEarthNet retrieval: one hash branch per sensor, one shared Hamming space.

A Sentinel-2 branch (12 bands -> SmallCNN -> hash head) and a Sentinel-1 branch (VV/VH ->
SmallCNN -> its own hash head) are trained together on co-registered S2/S1 pairs
(``stac_rscbir.models.recipes.train_crossmodal``), once per two-branch preset:

* ``duch``: DUCH-style (Mikriukov et al. 2022; RSiM's DA4DTE S1/S2 heads): NT-Xent between the
  S2 and S1 codes of each pair (no labels), quantization of both branches toward the joint code
  sign((h_S2 + h_S1) / 2), per-code bit balance on both branches;
* ``sidhcnn``: source-invariant DHCNN (Li et al. 2018): label-based pairwise likelihood within
  each sensor and across sensors, quantization, per-bit balance on both branches.

Both with sensor-aware augmentation in physical units (flips/rot90 for both sensors, band
gain/contrast jitter on S2 reflectances, Gamma speckle of 10 looks added to S1 in dB).
Codes of both branches live in one 32-bit Hamming space, so a query from one sensor is ranked
against an archive of the other.

The data are tiny (BENv1's 30 pairs + BENv2's 18 labelled pairs): 32 training pairs, 16
queries. The numbers show the path works and which loss aligns the sensors, not the accuracy
of a model trained on the 590k pairs.

Protocol: the official split lists of both folders; ``train`` + ``val`` form the training set
and the archive, the ``test`` patches are the queries. Relevant = shares at least one of the 19
labels; graded metrics count shared labels. Four directions: S2->S2, S1->S1 (uni-modal),
S2->S1, S1->S2 (query codes from one branch, archive codes from the other). Per-band statistics
come from the training patches of each sensor. Also reported: the mean Hamming distance between
the S2 and S1 codes of the same test patch versus different patches, before and after training
(the untrained network is the same seeded initialisation). Writes
benchmarks/results/crossmodal/crossmodal.json and crossmodal.png beside it; ``--save-model DIR``
also saves the first method's checkpoint (both branches) for ``stac-rscbir ingest``.

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
from tqdm.auto import tqdm

from stac_rscbir.data.bigearthnet import BenPatches, Sensor, load_ben
from stac_rscbir.eval.metrics import evaluate_codes, multi_label_relevance
from stac_rscbir.eval.plots import save_metric_bars
from stac_rscbir.extension.codec import pack_bits
from stac_rscbir.models.encoder import HashEncoder
from stac_rscbir.models.methods import METHODS
from stac_rscbir.models.recipes import train_crossmodal
from stac_rscbir.models.training import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "bigearthnet"
OUT = ROOT / "benchmarks" / "results" / "crossmodal"
KS = (5, 10)
TWO_BRANCH = sorted(n for n, s in METHODS.items() if s.two_sources)
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


def encode_pair(
    encoder: HashEncoder, s2: BenPatches, s1: BenPatches
) -> dict[Sensor, npt.NDArray[np.uint8]]:
    """{0,1} codes (N, bits) of raw patches of each sensor through its own branch."""
    return {
        sensor: encoder.encode_numpy(p.images, source=SOURCE[sensor])[0]
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


def print_table(runs: dict[str, dict[str, Any]]) -> None:
    """A markdown table: one row per method and direction, each metric as ``mean ± std over
    seeds (random)``."""
    print("| method | query -> archive | " + " | ".join(c for c, _, _ in COLUMNS) + " |")
    print("|---|---|" + "---:|" * len(COLUMNS))
    for method, run in runs.items():
        for name, m in run["directions"].items():
            sd = run["directions_std"][name]
            cells = " | ".join(f"{m[k]:.3f} ± {sd[k]:.3f} ({m[b]:.3f})" for _, k, b in COLUMNS)
            print(f"| {method} | {name.replace('s2', 'S2').replace('s1', 'S1')} | {cells} |")
    print("(mean ± std over the seeds; random ranking in parentheses)")


def plot(report: dict[str, Any], path: Path) -> None:
    """Grouped bars of the metrics per method and direction; black ticks mark random rankings."""
    save_metric_bars(
        {
            f"{method}\n{name.upper()}": m
            for method, run in report["runs"].items()
            for name, m in run["directions"].items()
        },
        COLUMNS,
        path,
        f"BigEarthNet S2/S1 cross-modal (tiny: {report['n_train']} train pairs, "
        f"{report['n_query']} queries), {report['bits']} bits, mean of "
        f"{len(report['seeds'])} seeds",
        figsize=(4 + 1.6 * len(report["runs"]) * len(DIRECTIONS), 4),
    )


def run_method(
    method: str,
    train: tuple[BenPatches, BenPatches],
    test: tuple[BenPatches, BenPatches],
    args: argparse.Namespace,
    seed: int,
) -> tuple[dict[str, Any], HashEncoder]:
    """Train one two-branch preset with one seed and measure it in the four directions."""

    def fit(iterations: int) -> tuple[HashEncoder, Any]:
        config = TrainConfig(
            iterations=iterations, batch_size=args.batch_size, seed=seed, progress=False
        )
        return train_crossmodal(
            *train,
            method=method,
            bits=args.bits,
            config=config,
            augment=not args.no_augment,
            speckle_looks=None if args.no_speckle else args.speckle_looks,
        )

    untrained, _ = fit(0)
    encoder, result = fit(args.iterations)
    pairs = {
        name: pair_distances(encode_pair(enc, *test))
        for name, enc in (("untrained", untrained), ("trained", encoder))
    }
    directions = evaluate_directions(
        encode_pair(encoder, *test),
        encode_pair(encoder, *train),
        test[0].labels,
        train[0].labels,
        args.random_draws,
        seed,
    )
    run = {
        "train_seconds": round(result.seconds, 1),
        "device": result.device,
        "final_loss": result.history[-1],
        "test_pair_hamming": pairs,
        "directions": directions,
    }
    return run, encoder


def aggregate(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of every direction's metrics, and the mean pair
    distances."""
    runs = list(per_seed.values())
    directions, spread = {}, {}
    for name in runs[0]["directions"]:
        keys = runs[0]["directions"][name]
        values = {k: np.array([r["directions"][name][k] for r in runs]) for k in keys}
        directions[name] = {k: float(v.mean()) for k, v in values.items()}
        spread[name] = {k: float(v.std()) for k, v in values.items()}
    pairs = {
        state: {
            side: float(np.mean([r["test_pair_hamming"][state][side] for r in runs]))
            for side in ("paired", "unpaired")
        }
        for state in ("untrained", "trained")
    }
    return {"directions": directions, "directions_std": spread, "test_pair_hamming": pairs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="folder holding BENv1/, BENv2/")
    parser.add_argument("--sources", nargs="+", choices=["v1", "v2"], default=["v1", "v2"])
    parser.add_argument("--methods", nargs="+", choices=TWO_BRANCH, default=["duch", "sidhcnn"])
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--no-augment", action="store_true", help="train without augmentation")
    parser.add_argument(
        "--speckle-looks", type=float, default=10.0, help="S1 speckle augmentation (looks)"
    )
    parser.add_argument("--no-speckle", action="store_true", help="no S1 speckle augmentation")
    parser.add_argument("--random-draws", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--save-model", type=Path, help="save the first method's checkpoint here")
    args = parser.parse_args()
    missing = [f"BEN{s}" for s in args.sources if not (args.data / f"BEN{s}").is_dir()]
    if missing:
        parser.error(f"{', '.join(missing)} not found under {args.data} (see --data)")
    start = time.perf_counter()
    s2, s1 = load_pairs(args.data, args.sources)
    tr = [i for i, s in enumerate(s2.split) if s in ("train", "val")]
    te = [i for i, s in enumerate(s2.split) if s == "test"]
    train, test = (s2.select(tr), s1.select(tr)), (s2.select(te), s1.select(te))
    runs = {}
    for method in tqdm(args.methods, desc="methods"):
        per_seed = {}
        for seed in args.seeds:
            per_seed[seed], encoder = run_method(method, train, test, args, seed)
            if args.save_model and method == args.methods[0] and seed == args.seeds[0]:
                encoder.save(args.save_model)
        runs[method] = {
            "summary": METHODS[method].summary,
            "loss_weights": METHODS[method].weights,
            **aggregate(per_seed),
            "seeds": per_seed,
        }
    relevant = float(multi_label_relevance(test[0].labels, train[0].labels).mean())
    args.out.mkdir(parents=True, exist_ok=True)
    report = {
        "note": "tiny data: shows the cross-modal S2/S1 path and which loss aligns the sensors",
        "data": [f"BEN{s}" for s in args.sources],
        "protocol": "official splits; train+val = training set and archive, test = queries; "
        "relevant = shares >= 1 of 19 labels; direction q->a: query codes from the q branch, "
        "archive codes from the a branch",
        "branches": {
            "s2": f"{list(s2.bands)} -> smallcnn (random init) -> hash head (source 0)",
            "s1": f"{list(s1.bands)} -> smallcnn (random init) -> hash head (source 1)",
        },
        "augment": not args.no_augment,
        "speckle_looks": None if args.no_speckle else args.speckle_looks,
        "bits": args.bits,
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "seeds": args.seeds,
        "n_train": len(tr),
        "n_query": len(te),
        "relevant_fraction": relevant,
        "ks": list(KS),
        "runs": runs,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads",
        "date": time.strftime("%Y-%m-%d"),
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "crossmodal.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out / "crossmodal.png")
    print_table(runs)
    for method, run in runs.items():
        for name, p in run["test_pair_hamming"].items():
            print(
                f"{method}, test pairs, {name}: mean Hamming S2 vs S1 of the same patch "
                f"{p['paired']:.2f}, of different patches {p['unpaired']:.2f} (of {args.bits}; "
                "mean over seeds)"
            )
    print(f"done in {report['total_seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
