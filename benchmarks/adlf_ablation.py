"""[20] adlf-vlad on AID: how its query expansion's k and alpha were chosen, and what
PCA-whitening of the VLADs does. Reads the cached descriptors of the benchmark's ``adlf-vlad``
row (computed if missing) and writes benchmarks/results/aid/adlf-vlad-ablation.json.

k and alpha are chosen on the training rows (each training image queries the other training
images), never on the test rows; whitening is fitted on the training VLADs and scored on the
test rows, as the benchmark row would be.

    .venv/bin/python benchmarks/adlf_ablation.py --images ../shared/datasets/aid \
        --labels ../shared/datasets/aid/labels.csv
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA

from stac_rscbir.data.imagefolder import read_labels_csv, split_per_class
from stac_rscbir.descriptors.cache import cached_descriptors
from stac_rscbir.eval.metrics import DescriptorMetric, DistanceFn, evaluate_float
from stac_rscbir.systems.adlf import SPEC, QueryExpansion

OUT = Path(__file__).resolve().parent / "results" / "aid" / "adlf-vlad-ablation.json"


def map20(
    x: np.ndarray, labels: np.ndarray, metric: DescriptorMetric | DistanceFn = "euclidean"
) -> float:
    """mAP@20 of the rows of ``x`` querying each other (self excluded)."""
    result = evaluate_float(x, x, labels, labels, metric=metric, self_index=np.arange(len(x)))
    return round(float(result["map_at_20"]), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/features"))
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    data = read_labels_csv(args.images, args.labels)
    train, test = split_per_class(data.labels, 0.6, 0)
    feats, _ = cached_descriptors(data, SPEC, train, args.cache_dir)
    x_train, y_train = feats[train], data.labels[train]
    x_test, y_test = feats[test], data.labels[test]
    rows: dict[str, float] = {"train l2": map20(x_train, y_train)}
    for k in (3, 5, 10):
        for alpha in (0.0, 3.0):
            rows[f"train qe k={k} alpha={alpha:g}"] = map20(
                x_train, y_train, QueryExpansion(k, alpha)
            )
            print(rows, flush=True)
    rows["test l2"] = map20(x_test, y_test)
    rows["test qe (SPEC)"] = map20(x_test, y_test, SPEC.distance)
    whitened = PCA(256, whiten=True, random_state=0).fit(x_train).transform(x_test)
    whitened /= np.linalg.norm(whitened, axis=1, keepdims=True)
    rows["test whitened 256 l2"] = map20(whitened, y_test)
    rows["test whitened 256 qe"] = map20(whitened, y_test, SPEC.distance)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
