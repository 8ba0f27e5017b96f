"""BigEarthNet S2 (12 bands) retrieval with the survey's N-band descriptors, [3] LBP per band and
[4] bag of spectral values, compared by Euclidean distance (float rows).

Same data and protocol as ``bigearthnet_retrieval.py``: train + val patches are the archive
(and BoSV's codebook pixels), test patches the queries, relevant = shares a label. Each band is
stretched to [0, 1] between its 2nd and 98th percentiles over the training patches. The data
are tiny (48 patches): this proves the 12-band path end to end, not accuracy.

Then [4]'s multi-label step on the BoSV descriptors (``spectral.label_likelihoods``): every
patch's label likelihoods from an OMP reconstruction by the labelled archive patches (an archive
patch leaves itself out), and two rankings: ``bosv+likelihood`` orders the archive by the
Euclidean distance between the query's and each archive patch's likelihood vectors (the
method: no archive label is read beyond the dictionary's), ``bosv+likelihood-vs-labels`` by the
distance between the query's likelihoods and each archive patch's own multi-hot labels (the
archive's labels known); both break ties by the BoSV distance. Writes
benchmarks/results/bigearthnet/descriptors.json.

    .venv/bin/python benchmarks/bigearthnet_descriptors.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from stac_rscbir.data.bigearthnet import BenPatches, load_ben
from stac_rscbir.descriptors.registry import DESCRIPTORS
from stac_rscbir.descriptors.spectral import label_likelihoods, likelihood_distance
from stac_rscbir.eval.metrics import evaluate_float

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "bigearthnet"
OUT = ROOT / "benchmarks" / "results" / "bigearthnet" / "descriptors.json"
NONZERO = 5  # atoms of the OMP reconstruction (of 32 archive patches)


def main() -> None:
    patches = load_ben(DATA, "s2")
    train, test = patches.in_split("train", "val"), patches.in_split("test")
    low, high = np.percentile(train.images, (2, 98), axis=(0, 2, 3), keepdims=True)[:, 0]

    def as_images(images: np.ndarray) -> list[np.ndarray]:
        stretched = np.clip((images - low) / (high - low), 0.0, 1.0).astype(np.float32)
        return list(stretched.transpose(0, 2, 3, 1))  # (N, B, H, W) -> N x (H, W, B)

    rows, described = [], {}
    for name in ("lbp", "bosv"):
        spec = DESCRIPTORS[name]
        start = time.perf_counter()
        descriptor = spec.factory().fit(as_images(train.images))
        db = descriptor.transform(as_images(train.images))
        queries = descriptor.transform(as_images(test.images))
        seconds = time.perf_counter() - start
        described[name] = queries, db, seconds
        metrics = evaluate_float(
            queries, db, test.labels, train.labels, multi_label=True, ks=(5, 10)
        )
        rows.append(row(name, spec.reference, db.shape[1], seconds, metrics, train, len(test)))
    queries, db, seconds = described["bosv"]
    start = time.perf_counter()
    query_p = label_likelihoods(queries, db, train.labels, NONZERO)
    db_p = label_likelihoods(db, db, train.labels, NONZERO, exclude=np.arange(len(db)))
    seconds += time.perf_counter() - start
    reference = DESCRIPTORS["bosv"].reference + f", OMP label likelihoods ({NONZERO} atoms)"
    for name, archive in (
        ("bosv+likelihood", db_p),
        ("bosv+likelihood-vs-labels", train.labels.astype(np.float64)),
    ):
        metrics = evaluate_float(
            np.hstack([query_p, queries]),
            np.hstack([archive, db]),
            test.labels,
            train.labels,
            metric=lambda q, d, a=archive.shape[1]: likelihood_distance(
                q[:, :a], d[:, :a], q[:, a:], d[:, a:]
            ),
            multi_label=True,
            ks=(5, 10),
        )
        rows.append(row(name, reference, db.shape[1], seconds, metrics, train, len(test)))
    for r in rows:
        m = r["metrics"]
        print(
            f"{r['method']:26} mAP@10 {m['map_at_10']:.3f} (random {m['random_map_at_10']:.3f})"
            f" P@5 {m['precision_at_5']:.3f} (random {m['random_precision_at_5']:.3f})"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(rows, indent=2) + "\n")


def row(
    name: str, reference: str, dim: int, seconds: float, metrics: dict, train: BenPatches, n: int
) -> dict:
    """One result row of descriptors.json (``n`` queries against the ``train`` archive)."""
    return {
        "method": name,
        "descriptor": reference,
        "bands": list(train.bands),
        "descriptor_dim": int(dim),
        "n_train": len(train),
        "n_query": n,
        "seconds_per_image": round(seconds / (len(train) + n), 5),
        "metrics": metrics,
    }


if __name__ == "__main__":
    main()
