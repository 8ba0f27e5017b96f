"""AID retrieval grid of issue 14: fine-tuning (whole / last N blocks), hash-centre losses,
test-time augmentation, the unsupervised `fit` preset and transfer to other splits, each row
with its training time on this machine.

Every row is ``stac-rscbir bench retrieval`` with the settings in its name (same protocol: 60/40
split per class, each held-out image queries the other held-out images). A row whose JSON
exists is read back, not rerun, so the grid resumes after a kill and grows row by row.

    .venv/bin/python benchmarks/aid_finetune.py --images ../shared/datasets/aid \
        --labels ../shared/datasets/aid/labels.csv [--rows NAME ...]

Writes benchmarks/results/aid_finetune/<row>.json, grid.json, grid.md and grid.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from stac_rscbir.eval.retrieval_bench import BenchSetup, run

OUT = Path(__file__).resolve().parent / "results" / "aid_finetune"


@dataclass(frozen=True)
class Row:
    """One configuration of the grid."""

    name: str
    method: str
    bits: int = 64
    finetune: str | None = None
    epochs: float = 3.0
    tta: bool = False
    seed: int = 0
    input_size: int = 150
    lr: float | None = None
    backbone_lr: float | None = None
    probe: bool = True  # fine-tuning starts from a head trained on frozen features
    freeze_bn: bool = True  # fine-tuning keeps the ImageNet BatchNorm statistics


ROWS: list[Row] = [
    Row("adversarial-64-frozen", "adversarial"),
    Row("adversarial-64-ft2-e3", "adversarial", finetune="2"),
    Row("csq-64-frozen", "csq"),
    Row("orthohash-64-frozen", "orthohash"),
    Row("adversarial-64-ft5-e3-tta", "adversarial", finetune="5", tta=True),
    Row("adversarial-64-frozen-tta", "adversarial", tta=True),
    Row("csq-64-ft5-e3-tta", "csq", finetune="5", tta=True),
    Row("contrastive-64-ft2-e3", "contrastive", finetune="2"),
    Row("adversarial-64-ft5-e6-tta", "adversarial", finetune="5", epochs=6, tta=True),
    Row("itq-64", "itq"),
    Row("lsh-64", "lsh"),
    Row("adversarial-64-ft2-e3-bnupdate", "adversarial", finetune="2", freeze_bn=False),
    Row("csq-32-frozen", "csq", bits=32),
    Row("csq-16-frozen", "csq", bits=16),
    Row("adversarial-64-ft5-e10-tta", "adversarial", finetune="5", epochs=10, tta=True),
    # transfer: the settings chosen on seed 0's split, trained and evaluated on other splits
    Row("adversarial-64-ft5-e10-seed1", "adversarial", finetune="5", epochs=10, seed=1),
    Row("adversarial-64-ft5-e10-seed2", "adversarial", finetune="5", epochs=10, seed=2),
    Row("adversarial-64-ft5-e3-seed1", "adversarial", finetune="5", seed=1),
    Row("adversarial-64-all-120px-e1", "adversarial", finetune="all", epochs=1, input_size=120),
    Row("contrastive-64-ft5-e6", "contrastive", finetune="5", epochs=6),
]


def run_row(row: Row, images: Path, labels: Path, out: Path) -> dict:
    """The row's result, from its JSON when it exists, else measured and written."""
    path = out / f"{row.name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    setup = BenchSetup(
        images,
        labels,
        input_size=row.input_size,
        seed=row.seed,
        finetune=row.finetune,
        epochs=row.epochs,
        lr=row.lr,
        backbone_lr=row.backbone_lr,
        tta=row.tta,
        probe=row.probe,
        freeze_bn=row.freeze_bn,
    )
    start = time.perf_counter()
    result = run(setup, row.method, row.bits)
    result.update(
        row=row.name,
        probe=row.probe,
        freeze_bn=row.freeze_bn,
        map_augment="dihedral" if row.finetune not in (None, "all") else None,
        wall_seconds=round(time.perf_counter() - start, 1),
    )
    result["machine"] = f"{platform.machine()}, {platform.processor() or 'cpu'}"
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(rows: list[dict]) -> str:
    """The RESULTS.md table of the measured rows."""
    lines = [
        "| row | fine-tune | px | steps | TTA | seed | mAP@20 (A) | trunc. | P@10 "
        "| float same net | without TTA | train s | encode s |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        same = r.get("float_same_network", {}).get("map_at_20")
        same = f"{same:.3f}" if same is not None else ""
        its = f"{r['iterations']} it" if "iterations" in r else ""
        tuned = r.get("finetune", "frozen") + ("" if r.get("probe", True) else ", no probe")
        plain = f"{r['without_tta']['map_at_20']:.3f}" if "without_tta" in r else ""
        lines.append(
            f"| {r['row']} | {tuned} | {r['input_size']} | "
            f"{its} | {'yes' if r.get('tta') else 'no'} | {r['seed']} | "
            f"{r['map_at_20']:.3f} | {r['map_at_20_truncated']:.3f} | "
            f"{r['precision_at_10']:.3f} | {same} | {plain} | "
            f"{r.get('train_only_seconds', 0) + r.get('probe_seconds', 0):.0f} | "
            f"{r.get('encode_seconds', 0):.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """mAP@20 (A) of every row against its training seconds (probe + fine-tuning)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in rows:
        seconds = max(1.0, r.get("train_only_seconds", 1.0) + r.get("probe_seconds", 0.0))
        ax.scatter(seconds, r["map_at_20"], s=30)
        ax.annotate(
            r["row"],
            (seconds, r["map_at_20"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xscale("log")
    ax.set_xlabel("training seconds on this machine (log)")
    ax.set_ylabel("AID mAP@20 (A)")
    ax.set_title("AID 60/40: fine-tuning, hash-centre losses, TTA (EfficientNet-Lite0)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--rows", nargs="*", help="Row names to run (default: all).")
    args = parser.parse_args()
    by_name = {r.name: r for r in ROWS}
    todo = [by_name[n] for n in args.rows] if args.rows else list(ROWS)
    results = []
    for row in todo:
        result = run_row(row, args.images, args.labels, args.out)
        print(f"{row.name}: mAP@20 {result['map_at_20']:.4f}", flush=True)
        results.append(result)
    done = sorted(
        (json.loads(p.read_text()) for p in args.out.glob("*.json") if p.stem != "grid"),
        key=lambda r: r["row"],
    )
    (args.out / "grid.json").write_text(json.dumps(done, indent=2) + "\n")
    (args.out / "grid.md").write_text(table(done))
    plot(done, args.out / "grid.png")
    print(table(done))


if __name__ == "__main__":
    main()
