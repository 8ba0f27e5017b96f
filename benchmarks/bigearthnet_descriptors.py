"""BigEarthNet S2 (12 bands) retrieval with the survey's N-band descriptors, [3] LBP per band and
[4] bag of spectral values, compared by Euclidean distance (float rows).

Same data and protocol as ``bigearthnet_retrieval.py``: train + val patches are the archive
(and BoSV's codebook pixels), test patches the queries, relevant = shares a label. Each band is
stretched to [0, 1] between its 2nd and 98th percentiles over the training patches. The data
are tiny (48 patches): this proves the 12-band path end to end, not accuracy. Writes
benchmarks/results/bigearthnet/descriptors.json.

    .venv/bin/python benchmarks/bigearthnet_descriptors.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from stac_rscbir.data.bigearthnet import load_ben
from stac_rscbir.descriptors.registry import DESCRIPTORS
from stac_rscbir.eval.metrics import evaluate_float

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "bigearthnet"
OUT = ROOT / "benchmarks" / "results" / "bigearthnet" / "descriptors.json"


def main() -> None:
    patches = load_ben(DATA, "s2")
    train, test = patches.in_split("train", "val"), patches.in_split("test")
    low, high = np.percentile(train.images, (2, 98), axis=(0, 2, 3), keepdims=True)[:, 0]

    def as_images(images: np.ndarray) -> list[np.ndarray]:
        stretched = np.clip((images - low) / (high - low), 0.0, 1.0).astype(np.float32)
        return list(stretched.transpose(0, 2, 3, 1))  # (N, B, H, W) -> N x (H, W, B)

    rows = []
    for name in ("lbp", "bosv"):
        spec = DESCRIPTORS[name]
        start = time.perf_counter()
        descriptor = spec.factory().fit(as_images(train.images))
        db = descriptor.transform(as_images(train.images))
        queries = descriptor.transform(as_images(test.images))
        seconds = time.perf_counter() - start
        metrics = evaluate_float(
            queries, db, test.labels, train.labels, multi_label=True, ks=(5, 10)
        )
        rows.append(
            {
                "method": name,
                "descriptor": spec.reference,
                "bands": list(train.bands),
                "descriptor_dim": int(db.shape[1]),
                "n_train": len(train),
                "n_query": len(test),
                "seconds_per_image": round(seconds / (len(train) + len(test)), 5),
                "metrics": metrics,
            }
        )
        m = metrics
        print(
            f"{name:5} d={db.shape[1]:4} mAP@10 {m['map_at_10']:.3f} "
            f"(random {m['random_map_at_10']:.3f}) P@5 {m['precision_at_5']:.3f} "
            f"(random {m['random_precision_at_5']:.3f})"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
