"""AID retrieval benchmark: every method x bit length under the 60/40 protocol, one table.

Writes benchmarks/results/aid/<method>-<bits>.json per run, aid_table.json with all rows,
aid_table.md (the RESULTS.md table), aid_table.png (mAP@20 per method and bit length) and
aid_pr_64.png (precision-recall of the 64-bit codes). Frozen EfficientNet-Lite0 features are
cached, so reruns only retrain.

    .venv/bin/python benchmarks/aid_retrieval.py --images ../shared/datasets/aid \
        --labels ../shared/datasets/aid/labels.csv

``--survey`` runs the survey's table instead (:func:`survey_methods`: every descriptor method
as a float row, +itq 32/64 and +lsh 64, +plsh 32/64 on the histograms, the feature hashers
klsh/kslh/prh at 32/64, the baselines and the deep hashing presets that cite a survey system at
32/64) and writes survey_table.{json,md,png}. With ``--reuse`` each row whose JSON is already in
``--out`` is read instead of run; without ``--images`` it only assembles the table from the
JSONs, listing the missing ones (as it lists a row that cannot run, e.g. ITQ with more bits
than a descriptor has dimensions):

    .venv/bin/python benchmarks/aid_retrieval.py --survey --reuse
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from stac_rscbir.descriptors.registry import DESCRIPTORS
from stac_rscbir.eval.metrics import hamming_distances, pr_curve, single_label_relevance
from stac_rscbir.eval.plots import save_pr_curve
from stac_rscbir.eval.retrieval_bench import (
    BASELINES,
    BenchSetup,
    descriptor_hashers,
    method_names,
    method_reference,
    run_with_codes,
)
from stac_rscbir.models.methods import METHODS

OUT = Path(__file__).resolve().parent / "results" / "aid"


def plot_table(rows: list[dict], path: Path) -> None:
    """Grouped bars: mAP@20 (variant A) per method, one bar per bit length (float rows: one
    "float" bar)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    methods = list(dict.fromkeys(r["method"] for r in rows))
    groups = sorted({r["bits"] for r in rows}, key=lambda b: (b is not None, b or 0))
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(groups)
    for j, bits in enumerate(groups):
        values = [
            next((r["map_at_20"] for r in rows if r["method"] == m and r["bits"] == bits), np.nan)
            for m in methods
        ]
        label = "float" if bits is None else f"{bits} bits"
        ax.bar(np.arange(len(methods)) + j * width, values, width, label=label)
    ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2, methods, rotation=30, ha="right")
    ax.set_ylabel("mAP@20 (variant A)")
    ax.set_ylim(0, 1)
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.legend(ncols=len(groups))
    ax.set_title("AID, 60/40 split, frozen EfficientNet-Lite0 features")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_survey(rows: list[dict], path: Path) -> None:
    """One horizontal bar per row of the survey table (mAP@20, variant A), top to bottom in the
    table's order, coloured by code length."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 1.0 + 0.22 * len(rows)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = {None: "tab:grey", 16: "tab:olive", 32: "tab:blue", 64: "tab:orange"}
    y = np.arange(len(rows))[::-1]
    ax.barh(y, [r["map_at_20"] for r in rows], color=[colours.get(r["bits"], "k") for r in rows])
    labels = [f"{r.get('ref') or '-'} {r['method']} {r['bits'] or 'float'}" for r in rows]
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("mAP@20 (variant A)")
    ax.set_title("AID, 60/40 split: the survey's systems (grey float, blue 32, orange 64 bits)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table_row(result: dict) -> dict:
    """A result JSON as a table row: without the full metrics, with the random baseline, the
    survey reference, the describing seconds per image and the row's total seconds."""
    row = {k: v for k, v in result.items() if k != "metrics"}
    row["random_map_at_20"] = result.get("metrics", {}).get("random_map_at_20")
    row["ref"] = method_reference(result["method"])
    describe = result.get("describe_seconds", result.get("feature_seconds")) or 0.0
    images = result.get("n_train", 0) + result.get("n_queries", 0)
    row["seconds_per_image"] = describe / images if describe and images else None
    row["total_seconds"] = describe + (result.get("train_seconds") or 0.0)
    return row


def share_describe_times(rows: list[dict]) -> None:
    """A hashed row ``NAME+HASHER`` read its descriptors from the cache: its s/img is its float
    row's (what describing costs per image); its total stays what the row itself spent, so the
    describing is counted once in the table's sum."""
    floats = {r["method"]: r for r in rows if r["bits"] is None}
    for r in rows:
        base = floats.get(r["method"].split("+")[0])
        if r["seconds_per_image"] is None and base is not None:
            r["seconds_per_image"] = base["seconds_per_image"]


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def markdown_table(rows: list[dict]) -> str:
    """The RESULTS.md table: one line per method and bit length."""
    lines = [
        "| ref | method | bits | mAP@20 (A) | mAP@20 (trunc.) | P@10 | float same net mAP@20 (A) "
        "| random mAP@20 (A) | s/img | train s | total s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        same = r.get("float_same_network", {}).get("map_at_20")
        lines.append(
            f"| {r.get('ref', '')} | {r['method']} | {r['bits'] or 'float'} | {r['map_at_20']:.3f} "
            f"| {_cell(r.get('map_at_20_truncated'), '.3f')} "
            f"| {_cell(r.get('precision_at_10'), '.3f')} | {_cell(same, '.3f')} "
            f"| {_cell(r.get('random_map_at_20'), '.3f')} "
            f"| {_cell(r.get('seconds_per_image'), '.4f')} "
            f"| {_cell(r.get('train_seconds'), '.1f')} | {_cell(r.get('total_seconds'), '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def survey_methods() -> list[tuple[str, int | None]]:
    """The survey table's (method, bits) rows, bits None for a float row."""
    rows: list[tuple[str, int | None]] = []
    for name in DESCRIPTORS:
        hashers = descriptor_hashers(name)
        rows.append((name, None))
        rows += [(f"{name}+{h}", b) for h in ("itq", "plsh") if h in hashers for b in (32, 64)]
        rows += [(f"{name}+lsh", 64)] if "lsh" in hashers else []
    rows += [("float-knn", None), ("lsh", 64), ("itq", 32), ("itq", 64)]
    rows += [(h, b) for h in ("klsh", "kslh", "prh") for b in (32, 64)]
    rows += [(m, b) for m in METHODS if method_reference(m) for b in (32, 64)]
    return rows


def json_name(method: str, bits: int | None) -> str:
    """The result file of one row: ``<method>-<bits>.json``, ``<method>-float.json``."""
    return f"{method}-{bits or 'float'}.json"


def not_applicable(method: str, bits: int | None, out: Path) -> str | None:
    """Why a row cannot exist, where its float row's JSON says so: ITQ's PCA gives at most as
    many bits as the descriptor has dimensions."""
    name, _, hasher = method.partition("+")
    float_row = out / json_name(name, None)
    if hasher != "itq" or bits is None or not float_row.is_file():
        return None
    dim = json.loads(float_row.read_text()).get("descriptor_dim")
    return f"n/a: ITQ gives at most {dim} bits on {dim}-d {name}" if dim and dim < bits else None


def survey_order(rows: list[dict]) -> list[dict]:
    """Rows by the survey's reference number (rows citing none last), stable otherwise."""

    def key(row: dict) -> int:
        ref = row.get("ref") or ""
        return int(ref[1 : ref.index("]")]) if ref.startswith("[") else 10_000

    return sorted(rows, key=key)


def write_table(rows: list[dict], missing: list[str], out: Path, stem: str, seconds: float) -> None:
    """``<stem>.json`` (rows, missing rows, machine), ``<stem>.md`` and ``<stem>.png``."""
    table = {
        "rows": rows,
        "missing": missing,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads",
        "date": time.strftime("%Y-%m-%d"),
        "total_seconds": round(seconds, 1),
        "rows_total_seconds": round(sum(r.get("total_seconds") or 0.0 for r in rows), 1),
    }
    (out / f"{stem}.json").write_text(json.dumps(table, indent=2) + "\n")
    text = markdown_table(rows)
    text += (
        f"\ns/img: describing seconds per image (a hashed row: its float row's); total s: what"
        f" the row itself spent (describing, where it was not cached, plus training and"
        f" evaluation; the CNN rows' frozen features are cached). Sum of the rows' total"
        f" seconds: {table['rows_total_seconds']:.0f}.\n"
    )
    if missing:
        text += f"\nMissing ({len(missing)}): {', '.join(missing)}.\n"
    (out / f"{stem}.md").write_text(text)
    if rows:
        (plot_survey if stem == "survey_table" else plot_table)(rows, out / f"{stem}.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path)
    parser.add_argument("--labels", type=Path)
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--methods", nargs="+", default=[*METHODS, *BASELINES])
    parser.add_argument("--survey", action="store_true", help="the survey's table (see above)")
    parser.add_argument("--reuse", action="store_true", help="read rows whose JSON exists")
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/features"))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if (args.images is None or args.labels is None) and not args.reuse:
        parser.error("--images and --labels are needed unless --reuse only assembles the table")
    args.out.mkdir(parents=True, exist_ok=True)
    setup = None
    if args.images is not None and args.labels is not None:
        setup = BenchSetup(
            args.images, args.labels, cache_dir=args.cache_dir, iterations=args.iterations
        )
    if args.survey:
        wanted = survey_methods()
    else:
        floats = {"float-knn", *DESCRIPTORS}
        wanted = [(m, None if m in floats else b) for m in args.methods for b in args.bits]
        wanted = list(dict.fromkeys(wanted))
    rows, curves, missing = [], {}, []
    start = time.perf_counter()
    for method, bits in wanted:
        path = args.out / json_name(method, bits)
        if args.reuse and path.is_file():
            rows.append(table_row(json.loads(path.read_text())))
            continue
        reason = not_applicable(method, bits, args.out)
        if reason:
            missing.append(f"{path.name} ({reason})")
            continue
        if setup is None or method not in method_names():
            missing.append(path.name)
            continue
        try:
            result, packed, labels = run_with_codes(setup, method, bits or 64)
        except ValueError as err:  # e.g. ITQ asked for more bits than the descriptor's dims
            missing.append(f"{path.name} ({err})")
            continue
        path.write_text(json.dumps(result, indent=2) + "\n")
        rows.append(table_row(result))
        print(
            json.dumps({k: rows[-1][k] for k in ("method", "bits", "map_at_20", "train_seconds")}),
            flush=True,
        )
        if bits == 64 and packed is not None and not args.survey:
            dist = hamming_distances(packed, packed)
            rel = single_label_relevance(labels, labels)
            curves[method] = pr_curve(dist, rel, 64, self_index=np.arange(len(labels)))
    share_describe_times(rows)
    if args.survey:
        rows = survey_order(rows)
    stem = "survey_table" if args.survey else "aid_table"
    write_table(rows, missing, args.out, stem, time.perf_counter() - start)
    if curves:
        save_pr_curve(curves, args.out / "aid_pr_64.png", title="AID, 64-bit codes")
    if missing:
        print(f"missing {len(missing)} rows: {', '.join(missing)}")
    print(f"done in {time.perf_counter() - start:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
