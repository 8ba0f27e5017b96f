"""Descriptors of a labelled image folder, computed once and cached on disk like the frozen CNN
features (:func:`stac_rscbir.models.features.cached_features`): the benchmark's descriptor rows
and their hashed variants then cost only the hashing after the first."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tqdm.auto import tqdm

from stac_rscbir.data.imagefolder import LabelledImages
from stac_rscbir.descriptors.base import DescriptorSpec, load_image
from stac_rscbir.models.features import _cache_path, _save_atomic

BATCH = 64


class _ImageFiles(Sequence[npt.NDArray[np.float32]]):
    """Image files read on access, so a descriptor's fit never holds the whole set in memory."""

    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> npt.NDArray[np.float32]:  # type: ignore[override]
        return load_image(self.paths[i], self.size)

    def __iter__(self) -> Iterator[npt.NDArray[np.float32]]:
        return (load_image(p, self.size) for p in self.paths)


def cached_descriptors(
    data: LabelledImages,
    spec: DescriptorSpec,
    train_rows: npt.ArrayLike,
    cache_dir: Path,
    progress: bool = True,
) -> tuple[npt.NDArray[np.float32], float]:
    """(N, d) float32 descriptors of ``data``'s images, fitted on ``train_rows`` (where the
    method learns), and the seconds spent (0.0 on a cache hit). A fusion's rows are its
    parts' cached rows side by side."""
    if spec.parts:
        described = [
            cached_descriptors(data, part, train_rows, cache_dir, progress) for part in spec.parts
        ]
        return np.concatenate([f for f, _ in described], axis=1), sum(s for _, s in described)
    rows = np.asarray(train_rows, dtype=np.int64)
    train_key = rows.tolist() if spec.learns else None
    name = spec.descriptors_of or spec.name
    path = _cache_path(
        cache_dir,
        f"descriptor-{name}-{spec.input_size}",
        ["descriptor", name, spec.input_size, train_key],
        data,
    )
    if path.is_file():
        return np.load(path), 0.0
    start = time.perf_counter()
    descriptor = spec.factory()
    if spec.learns:
        if progress:
            tqdm.write(f"{spec.name}: fitting on {len(rows)} training images")
        train = _ImageFiles([data.paths[i] for i in rows], spec.input_size)
        descriptor.fit(train, data.labels[rows])
    out = []
    for begin in tqdm(range(0, len(data), BATCH), desc=spec.name, disable=not progress):
        batch = _ImageFiles(data.paths[begin : begin + BATCH], spec.input_size)
        out.append(descriptor.transform(list(batch)))
    feats = np.concatenate(out).astype(np.float32)
    _save_atomic(path, feats)
    return feats, time.perf_counter() - start
