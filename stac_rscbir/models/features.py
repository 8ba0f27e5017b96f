"""What the frozen part of a backbone makes of labelled images, computed once and cached on disk:
descriptors (frozen-feature training) or intermediate activations (partial fine-tuning)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from stac_rscbir.data.imagefolder import ImageFileDataset, LabelledImages
from stac_rscbir.models.augment import dihedral
from stac_rscbir.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EfficientNetLite0,
    build_backbone,
)
from stac_rscbir.models.backbones import extract_features as run_backbone
from stac_rscbir.models.training import pick_device


def _cache_path(cache_dir: Path, stem: str, key_parts: list[object], data: LabelledImages) -> Path:
    """A cache file named after ``stem`` and a hash of the settings and the resolved image list,
    so a changed dataset or setting never reads stale arrays (however the paths are spelled)."""
    key = hashlib.sha256(
        json.dumps([*key_parts, [str(Path(p).resolve()) for p in data.paths]]).encode()
    ).hexdigest()[:16]
    return cache_dir / f"{stem}-{key}.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def _images(data: LabelledImages, input_size: int, panchromatic: bool = False) -> DataLoader:
    dataset = ImageFileDataset(
        data.paths,
        data.labels,
        size=input_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        panchromatic=panchromatic,
    )
    return DataLoader(dataset, batch_size=64, num_workers=1)


def cached_features(
    data: LabelledImages,
    backbone: str,
    input_size: int,
    cache_dir: Path,
    device: str | None = None,
    panchromatic: bool = False,
) -> tuple[torch.Tensor, float]:
    """(N, D) descriptors of ``data``'s images (RGB, or their panchromatic view) and the seconds
    spent (0.0 on a cache hit). Cached on disk, written atomically."""
    view = "-pan" if panchromatic else ""
    path = _cache_path(
        cache_dir, f"{backbone}-{input_size}{view}", [backbone, input_size, panchromatic], data
    )
    if path.is_file():
        return torch.from_numpy(np.load(path)), 0.0
    start = time.perf_counter()
    net = build_backbone(backbone, in_bands=3, pretrained=True)
    loader = _images(data, input_size, panchromatic)
    feats = run_backbone(net, (x for x, _ in loader), device=pick_device(device))
    _save_atomic(path, feats.numpy())
    return feats, time.perf_counter() - start


def cached_activations(
    data: LabelledImages,
    input_size: int,
    start: int,
    cache_dir: Path,
    views: tuple[int, ...] = (0,),
    device: str | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, float]:
    """(N, V, C, h, w) float16 inputs of block ``start`` of the ImageNet EfficientNet-Lite0 for
    the dihedral ``views`` of each RGB image (0: as is; see :func:`dihedral`), and the seconds
    spent (0.0 on a cache hit).

    The frozen front of partial fine-tuning, run once: training and test-time augmentation then
    cost only the blocks after ``start`` (:class:`~stac_rscbir.models.backbones.BackboneTail`).
    """
    path = _cache_path(
        cache_dir,
        f"efficientnet-lite0-{input_size}-block{start}-v{''.join(map(str, views))}",
        ["activations", input_size, start, list(views)],
        data,
    )
    if path.is_file():
        return torch.from_numpy(np.load(path)), 0.0
    begin = time.perf_counter()
    dev = pick_device(device)
    net = EfficientNetLite0(3, pretrained=True).to(dev).eval()
    out: list[torch.Tensor] = []
    loader = _images(data, input_size)
    with torch.inference_mode():
        for x, _ in tqdm(loader, desc=f"activations block {start}", disable=not progress):
            x = x.to(dev)
            acts = [net.activations(dihedral(x, k), start) for k in views]
            out.append(torch.stack(acts, dim=1).to(torch.float16).cpu())
    acts_all = torch.cat(out).clone()
    _save_atomic(path, acts_all.numpy())
    return acts_all, time.perf_counter() - begin


def load_images(
    data: LabelledImages, input_size: int, progress: bool = True
) -> tuple[torch.Tensor, float]:
    """(N, 3, S, S) float16 RGB images normalised for the ImageNet backbone, for fine-tuning the
    whole network (no cache: decoding is cheap next to training), and the seconds spent."""
    begin = time.perf_counter()
    loader = _images(data, input_size)
    batches = [x.to(torch.float16) for x, _ in tqdm(loader, desc="images", disable=not progress)]
    return torch.cat(batches), time.perf_counter() - begin
