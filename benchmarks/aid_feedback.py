"""AID relevance-feedback benchmark: does Rocchio refinement of the query improve the ranking?

The 60/40 protocol of ``benchmarks/aid_retrieval.py`` (frozen EfficientNet-Lite0 features,
cached; each held-out image queries the other held-out images), one 64-bit ``adversarial``
head. Per query:

* round 0: Hamming ranking of the query's code (ties by database index), as in the AID table;
* round 0 + rerank (control): the top-``POOL`` Hamming candidates re-ranked by Euclidean
  distance of relaxed codes, no feedback, to tell the re-ranking from the feedback;
* rounds 1, 2: the top 10 of the previous round are judged by the labels (same class:
  relevant), added to the judgements of earlier rounds, and the query descriptor becomes
  ``q' = rocchio(q, relevant, not_relevant)`` (alpha 1, beta 0.75, gamma 0.15: the function the
  API uses); the candidates are the top-``POOL`` Hamming neighbours of the binarised ``q'``,
  re-ranked by Euclidean distance to ``q'``, followed by the rest in Hamming order. Judged
  items stay in the ranking, as in the API.

Because judged items stay, part of a round's gain is relevant items the user has already seen.
Each feedback round is therefore also scored on the **residual collection** (the ranking with
every item judged so far removed), beside the round-0 Hamming ranking with the same items
removed: the gain that is new to the user.

Reports mAP@20 (variant A and truncated) and P@10 per round: JSON, PNG and a markdown table in
benchmarks/results/feedback/.

    .venv/bin/python benchmarks/aid_feedback.py --images ../shared/datasets/aid \
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

from stac_rscbir.data.imagefolder import read_labels_csv, split_per_class
from stac_rscbir.eval.metrics import hamming_distances, map_at_k, precision_at_k
from stac_rscbir.eval.retrieval_bench import BenchSetup
from stac_rscbir.extension.codec import pack_bits
from stac_rscbir.index.feedback import ALPHA, BETA, GAMMA, rocchio
from stac_rscbir.models.features import cached_features
from stac_rscbir.models.methods import METHODS
from stac_rscbir.models.training import TrainConfig, encode, train_hashing

OUT = Path(__file__).resolve().parent / "results" / "feedback"
POOL = 100  # the API's feedback pool for k = 20: max(4 k, 100)
JUDGED = 10  # results judged per round


def ranking(dist: np.ndarray) -> np.ndarray:
    """Database indices per query by (distance, index); the query itself (dist inf) last."""
    return np.argsort(dist, axis=1, kind="stable")[:, :-1]


def reranked(order: np.ndarray, q: np.ndarray, relaxed: np.ndarray) -> np.ndarray:
    """The top-POOL of each row of ``order`` re-ranked by Euclidean distance to ``q``."""
    top = order[:, :POOL]
    d = np.linalg.norm(relaxed[top] - q[:, None, :], axis=2)
    inner = np.take_along_axis(top, np.argsort(d, axis=1, kind="stable"), axis=1)
    return np.concatenate([inner, order[:, POOL:]], axis=1)


def scores(order: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    ranked = (labels[order] == labels[:, None]).astype(np.uint8)
    return {
        "map_at_20": map_at_k(ranked, 20, "A"),
        "map_at_20_truncated": map_at_k(ranked, 20, "truncated"),
        "precision_at_10": precision_at_k(ranked, 10),
    }


def residual(order: np.ndarray, judged: np.ndarray) -> np.ndarray:
    """Each row of ``order`` without the items judged for that query, cut to a common length."""
    rows = [row[~judged[i, row]] for i, row in enumerate(order)]
    width = min(len(r) for r in rows)
    return np.stack([r[:width] for r in rows])


def hamming_with_self(query_packed: np.ndarray, db_packed: np.ndarray) -> np.ndarray:
    dist = hamming_distances(query_packed, db_packed).astype(np.float64)
    np.fill_diagonal(dist, np.inf)  # the query is database item i: excluded (ranked last)
    return dist


def plot(rounds: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = [r["round"] for r in rounds]
    for key, label in (
        ("map_at_20", "mAP@20 (A)"),
        ("map_at_20_truncated", "mAP@20 (truncated)"),
        ("precision_at_10", "P@10"),
    ):
        ax.plot(names, [r[key] for r in rounds], marker="o", label=label)
    ax.set_ylabel("score")
    ax.set_title("AID, 64-bit adversarial head, Rocchio relevance feedback")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rounds: list[dict]) -> str:
    lines = [
        "| round | mAP@20 (A) | mAP@20 (trunc.) | P@10 | judged per query "
        "| residual mAP@20 (A): this round / round 0 | residual P@10: this round / round 0 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rounds:
        res = (
            (
                f"{r['residual']['map_at_20']:.3f} / {r['residual_round0']['map_at_20']:.3f}",
                f"{r['residual']['precision_at_10']:.3f} / "
                f"{r['residual_round0']['precision_at_10']:.3f}",
            )
            if "residual" in r
            else ("-", "-")
        )
        lines.append(
            f"| {r['round']} | {r['map_at_20']:.3f} | {r['map_at_20_truncated']:.3f} "
            f"| {r['precision_at_10']:.3f} | {r['judged']} | {res[0]} | {res[1]} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("../shared/datasets/aid"))
    parser.add_argument("--labels", type=Path, default=Path("../shared/datasets/aid/labels.csv"))
    parser.add_argument("--method", default="adversarial", choices=sorted(METHODS))
    parser.add_argument("--bits", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/features"))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    setup = BenchSetup(args.images, args.labels, cache_dir=args.cache_dir)
    data = read_labels_csv(setup.images, setup.labels)
    train_idx, test_idx = split_per_class(data.labels, setup.train_fraction, setup.seed)
    feats, _ = cached_features(data, setup.backbone, setup.input_size, setup.cache_dir, None)
    labels = np.asarray(data.labels)[test_idx]
    trained = train_hashing(
        METHODS[args.method],
        feats[train_idx],
        data.labels[train_idx],
        args.bits,
        TrainConfig(iterations=args.iterations, seed=setup.seed),
    )
    train_seconds = time.perf_counter() - start
    codes, relaxed = encode(trained.net, feats[test_idx])
    packed = pack_bits(codes)
    head = trained.net.head

    def binarize(q: np.ndarray) -> np.ndarray:
        return pack_bits(head.binarize(torch.from_numpy(q)).numpy().astype(np.uint8))

    n = len(labels)
    order = ranking(hamming_with_self(packed, packed))
    order0 = order
    rounds = [{"round": "0 (Hamming)", "judged": 0, **scores(order, labels)}]
    control = reranked(order, relaxed, relaxed)
    rounds.append({"round": "0 + rerank (no feedback)", "judged": 0, **scores(control, labels)})
    judged = np.zeros((n, n), dtype=bool)
    rows = np.arange(n)[:, None]
    for r in range(1, args.rounds + 1):
        judged[rows, order[:, :JUDGED]] = True
        same = labels[None, :] == labels[:, None]
        refined = np.stack(
            [
                rocchio(
                    relaxed[i],
                    relaxed[judged[i] & same[i]],
                    relaxed[judged[i] & ~same[i]],
                    ALPHA,
                    BETA,
                    GAMMA,
                )
                for i in range(n)
            ]
        )
        order = reranked(ranking(hamming_with_self(binarize(refined), packed)), refined, relaxed)
        rounds.append(
            {
                "round": f"{r} (feedback)",
                "judged": int(judged.sum(1).mean()),
                **scores(order, labels),
                "residual": scores(residual(order, judged), labels),
                "residual_round0": scores(residual(order0, judged), labels),
            }
        )
        print(json.dumps(rounds[-1]), flush=True)
    result = {
        "method": args.method,
        "bits": args.bits,
        "iterations": args.iterations,
        "alpha": ALPHA,
        "beta": BETA,
        "gamma": GAMMA,
        "pool": POOL,
        "judged_per_round": JUDGED,
        "n_queries": n,
        "n_database": n - 1,
        "n_train": len(train_idx),
        "rounds": rounds,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads",
        "date": time.strftime("%Y-%m-%d"),
    }
    (args.out / "aid_feedback.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(rounds)
    (args.out / "aid_feedback.md").write_text(table)
    plot(rounds, args.out / "aid_feedback.png")
    print(table)
    print(f"done in {result['total_seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
