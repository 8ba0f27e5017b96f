"""AID retrieval benchmark: every method x bit length under the 60/40 protocol, one table.

Writes benchmarks/results/aid/<method>-<bits>.json per run, aid_table.json with all rows,
aid_table.md (the RESULTS.md table), aid_table.png (mAP@20 per method and bit length) and
aid_pr_64.png (precision-recall of the 64-bit codes). Frozen EfficientNet-Lite0 features are
cached, so reruns only retrain.

    .venv/bin/python benchmarks/aid_retrieval.py --images ../shared/datasets/aid \
        --labels ../shared/datasets/aid/labels.csv
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from stac_rscbir.eval.metrics import hamming_distances, pr_curve, single_label_relevance
from stac_rscbir.eval.plots import save_pr_curve
from stac_rscbir.eval.retrieval_bench import BASELINES, BenchSetup, run_with_codes
from stac_rscbir.models.methods import METHODS

OUT = Path(__file__).resolve().parent / "results" / "aid"


def plot_table(rows: list[dict], path: Path) -> None:
    """Grouped bars: mAP@20 (variant A) per method, one bar per bit length."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(r["method"] for r in rows))
    bit_lengths = sorted({r["bits"] for r in rows if r["bits"]})
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(bit_lengths)
    for j, bits in enumerate(bit_lengths):
        values = [
            next(
                (r["map_at_20"] for r in rows if r["method"] == m and r["bits"] in (bits, None)),
                np.nan,
            )
            for m in methods
        ]
        ax.bar(np.arange(len(methods)) + j * width, values, width, label=f"{bits} bits")
    ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=30)
    ax.set_ylabel("mAP@20 (variant A)")
    ax.set_ylim(0, 1)
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.legend(ncols=len(bit_lengths))
    ax.set_title("AID, 60/40 split, frozen EfficientNet-Lite0 features")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown_table(rows: list[dict]) -> str:
    """The RESULTS.md table: one line per method and bit length."""
    lines = [
        "| method | bits | mAP@20 (A) | mAP@20 (trunc.) | P@10 | float same net mAP@20 (A) "
        "| random mAP@20 (A) | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        same = r.get("float_same_network", {}).get("map_at_20")
        lines.append(
            f"| {r['method']} | {r['bits'] or 'float'} | {r['map_at_20']:.3f} "
            f"| {r['map_at_20_truncated']:.3f} | {r['precision_at_10']:.3f} "
            f"| {'' if same is None else f'{same:.3f}'} | {r['random_map_at_20']:.3f} "
            f"| {r['train_seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--methods", nargs="+", default=[*METHODS, *BASELINES])
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/features"))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    setup = BenchSetup(
        args.images, args.labels, cache_dir=args.cache_dir, iterations=args.iterations
    )
    rows, curves = [], {}
    start = time.perf_counter()
    for method in args.methods:
        for bits in [None] if method == "float-knn" else args.bits:
            result, packed, labels = run_with_codes(setup, method, bits or 64)
            (args.out / f"{method}-{bits or 'float'}.json").write_text(
                json.dumps(result, indent=2) + "\n"
            )
            row = {k: v for k, v in result.items() if k != "metrics"}
            row["random_map_at_20"] = result["metrics"]["random_map_at_20"]
            rows.append(row)
            print(
                json.dumps(
                    {
                        k: row[k]
                        for k in (
                            "method",
                            "bits",
                            "map_at_20",
                            "map_at_20_truncated",
                            "precision_at_10",
                            "train_seconds",
                        )
                    }
                ),
                flush=True,
            )
            if bits == 64 and packed is not None:
                dist = hamming_distances(packed, packed)
                rel = single_label_relevance(labels, labels)
                curves[method] = pr_curve(dist, rel, 64, self_index=np.arange(len(labels)))
    table = {
        "rows": rows,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads",
        "date": time.strftime("%Y-%m-%d"),
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    (args.out / "aid_table.json").write_text(json.dumps(table, indent=2) + "\n")
    (args.out / "aid_table.md").write_text(markdown_table(rows))
    plot_table(rows, args.out / "aid_table.png")
    if curves:
        save_pr_curve(curves, args.out / "aid_pr_64.png", title="AID, 64-bit codes")
    print(f"done in {table['total_seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
