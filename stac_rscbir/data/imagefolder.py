"""Labelled image folders described by a CSV (``path,class``), as the AID benchmark ships them."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image
from torch.utils.data import Dataset


@dataclass(frozen=True)
class LabelledImages:
    """Image paths with integer labels; ``classes[label]`` is the class name."""

    root: Path
    paths: list[Path]
    labels: npt.NDArray[np.int64]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def select(self, rows: npt.ArrayLike) -> LabelledImages:
        """The images at ``rows`` (e.g. one side of a split), same classes."""
        idx = np.asarray(rows, dtype=np.int64)
        return LabelledImages(
            self.root, [self.paths[i] for i in idx], self.labels[idx], self.classes
        )


def read_labels_csv(images: Path, labels_csv: Path) -> LabelledImages:
    """Read a ``path,class`` CSV (paths relative to ``images``); every listed file must exist."""
    if not labels_csv.is_file():
        raise FileNotFoundError(f"labels CSV not found: {labels_csv}")
    with labels_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"path", "class"} <= set(reader.fieldnames):
            raise ValueError(
                f"{labels_csv}: expected columns 'path,class', got {reader.fieldnames}"
            )
        rows = [(row["path"], row["class"]) for row in reader]
    if not rows:
        raise ValueError(f"{labels_csv}: no rows")
    missing = [p for p, _ in rows if not (images / p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} images listed in {labels_csv} are missing under {images}, "
            f"e.g. {missing[:3]}"
        )
    classes = sorted({c for _, c in rows})
    index = {c: i for i, c in enumerate(classes)}
    return LabelledImages(
        root=images,
        paths=[images / p for p, _ in rows],
        labels=np.array([index[c] for _, c in rows], dtype=np.int64),
        classes=classes,
    )


def split_per_class(
    labels: npt.ArrayLike, train_fraction: float = 0.6, seed: int = 0
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Seeded per-class split: ceil(fraction * n) of each class to train, the rest to test."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train: list[npt.NDArray[np.int64]] = []
    test: list[npt.NDArray[np.int64]] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        cut = math.ceil(train_fraction * len(members))
        train.append(members[:cut])
        test.append(members[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class ImageFileDataset(Dataset[tuple[torch.Tensor, int]]):
    """RGB image files as normalised float tensors (3, size, size) with their labels.

    ``panchromatic=True`` yields the luminance image in all three bands: the PAN side of a
    PAN/multispectral cross-source pair (as in DSRSID) for two-source presets on RGB data.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | npt.NDArray[np.int64],
        size: int | None = None,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        panchromatic: bool = False,
    ) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = np.asarray(labels)
        self.size = size
        self.panchromatic = panchromatic
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with Image.open(self.paths[i]) as img:
            # a panchromatic view (luminance repeated in 3 bands) simulates a second source
            rgb = img.convert("L").convert("RGB") if self.panchromatic else img.convert("RGB")
            if self.size is not None and rgb.size != (self.size, self.size):
                rgb = rgb.resize((self.size, self.size), Image.Resampling.BILINEAR)
            pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)
        return (pixels.permute(2, 0, 1) - self.mean) / self.std, int(self.labels[i])
