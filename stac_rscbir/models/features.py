"""Frozen-backbone descriptors of labelled images, computed once and cached on disk."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from stac_rscbir.data.imagefolder import ImageFileDataset, LabelledImages
from stac_rscbir.models.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from stac_rscbir.models.backbones import extract_features as run_backbone
from stac_rscbir.models.training import pick_device


def cached_features(
    data: LabelledImages,
    backbone: str,
    input_size: int,
    cache_dir: Path,
    device: str | None = None,
    panchromatic: bool = False,
) -> tuple[torch.Tensor, float]:
    """(N, D) descriptors of ``data``'s images (RGB, or their panchromatic view) and the seconds
    spent (0.0 on a cache hit).

    The cache key covers the backbone, input size and the image list (resolved paths, so the
    same files hit the same cache however they are spelled), so a changed dataset or setting
    never reads stale features; the file is written atomically.
    """
    key = hashlib.sha256(
        json.dumps(
            [backbone, input_size, panchromatic, [str(Path(p).resolve()) for p in data.paths]]
        ).encode()
    ).hexdigest()[:16]
    view = "-pan" if panchromatic else ""
    path = cache_dir / f"{backbone}-{input_size}{view}-{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path)), 0.0
    start = time.perf_counter()
    net = build_backbone(backbone, in_bands=3, pretrained=True)
    dataset = ImageFileDataset(
        data.paths,
        data.labels,
        size=input_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        panchromatic=panchromatic,
    )
    loader = DataLoader(dataset, batch_size=64, num_workers=1)
    feats = run_backbone(net, (x for x, _ in loader), device=pick_device(device))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, feats.numpy())
    tmp.replace(path)
    return feats, time.perf_counter() - start
