"""Small AID ablation of [16] mlcnn (layers, spatial pooling, scale aggregation, scales) and of
[18] cnn-wd (weighted against plain Euclidean distance): one network fine-tuned on every scale
(with cnn-wd's 512-unit hidden layer), then each setting's descriptors from its maps; mAP@20
under the benchmark's 60/40 split.

    .venv/bin/python benchmarks/mlcnn_ablation.py --images ../shared/datasets/aid \
        --labels /tmp/aid40.csv --out benchmarks/results/aid/mlcnn-ablation.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from stac_rscbir.data.imagefolder import read_labels_csv, split_per_class
from stac_rscbir.descriptors.base import load_image
from stac_rscbir.eval.metrics import evaluate_float
from stac_rscbir.systems.cnn_wd import WeightedDistance, weighted_distance
from stac_rscbir.systems.finetuned import FinetunedLite0
from stac_rscbir.systems.mlcnn import aggregate

LAYERS = ("b5", "b11", "b15", "b16", "head")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[150, 128, 112])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    data = read_labels_csv(args.images, args.labels)
    train, test = split_per_class(data.labels, 0.6, 0)
    size = max(args.sizes)
    images = [load_image(p, size) for p in data.paths]
    start = time.perf_counter()
    net = FinetunedLite0(sizes=args.sizes, layers=(*LAYERS, "fc"), hidden=512, epochs=args.epochs)
    net.fit([images[i] for i in train], data.labels[train])
    fit_seconds = time.perf_counter() - start
    maps = net.maps([images[i] for i in test])
    y = data.labels[test]
    self_index = np.arange(len(test))

    def score(x: np.ndarray, metric: object = "euclidean") -> float:
        m = evaluate_float(x, x, y, y, metric=metric, self_index=self_index)  # type: ignore[arg-type]
        return round(m["map_at_20"], 4)

    rows = []
    feats = torch.nn.functional.normalize(maps[0]["fc"], dim=1)
    probs = maps[0]["logits"].softmax(dim=1)
    wd = torch.cat([feats, probs], dim=1).numpy()
    pooled = torch.nn.functional.normalize(maps[0]["head"].mean(dim=(2, 3)), dim=1)
    rows.append(
        {
            "system": "cnn-wd",
            "distance": "weighted, pooled head map as f",
            "map_at_20": score(
                torch.cat([pooled, probs], dim=1).numpy(), WeightedDistance(feature_dim=1280)
            ),
        }
    )
    rows.append(
        {"system": "cnn-wd", "distance": "weighted", "map_at_20": score(wd, weighted_distance)}
    )
    rows.append(
        {
            "system": "cnn-wd",
            "distance": "euclidean (fc features only)",
            "map_at_20": score(feats.numpy()),
        }
    )
    scale_sets = [args.sizes[:1], *[[args.sizes[0], s] for s in args.sizes[1:]]]
    if len(args.sizes) > 2:
        scale_sets.append(args.sizes)
    layer_sets = [
        ("head",),
        ("b16",),
        ("b11",),
        ("b15",),
        ("b11", "head"),
        ("b16", "head"),
        ("b11", "b16", "head"),
        ("b5", "b11", "b15", "b16", "head"),
    ]
    for layers, spatial, scales, fuse in itertools.product(
        layer_sets, ("max", "avg"), scale_sets, ("concat", "sum", "max")
    ):
        if len(scales) == 1 and fuse != "concat":
            continue
        chosen = [maps[args.sizes.index(s)] for s in scales]
        x = aggregate(chosen, layers, spatial, fuse).numpy()
        rows.append(
            {
                "system": "mlcnn",
                "layers": list(layers),
                "spatial": spatial,
                "sizes": scales,
                "scales": fuse,
                "dim": x.shape[1],
                "map_at_20": score(x),
            }
        )
        print(rows[-1], flush=True)
    args.out.write_text(
        json.dumps(
            {
                "n_train": len(train),
                "n_test": len(test),
                "sizes": args.sizes,
                "epochs": args.epochs,
                "fit_seconds": round(fit_seconds, 1),
                "rows": rows,
            },
            indent=1,
        )
    )
    for r in sorted(rows, key=lambda r: -r["map_at_20"])[:15]:
        print(r)


if __name__ == "__main__":
    main()
