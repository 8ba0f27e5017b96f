"""One training loop for every preset: seeded, device auto-detected, mixed precision on CUDA."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from tqdm.auto import tqdm

from stac_rscbir.models.methods import HashingNet, MethodSpec, method_loss
from stac_rscbir.models.mining import similarity_matrix
from stac_rscbir.models.samplers import (
    ClassPairTripletSampler,
    MultiLabelTripletSampler,
    PKBatchSampler,
    RandomBatchSampler,
)


@dataclass
class TrainConfig:
    """Optimisation settings shared by all presets."""

    iterations: int = 2000
    batch_size: int = 128
    lr: float | None = None
    weight_decay: float = 0.0
    seed: int = 0
    device: str | None = None
    progress: bool = True


@dataclass
class TrainResult:
    """The trained network and what happened while training it."""

    net: HashingNet
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    device: str = "cpu"


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present (or asked), else CPU."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) for reproducible runs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _batches(
    spec: MethodSpec, labels: npt.NDArray[np.int64], batch_size: int, seed: int
) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64] | None]]:
    """Endless (batch indices, triplet rows in batch coordinates or None) for the method.

    Triplet presets draw class-pair triplets (MiLaN) for single labels and label-overlap
    triplets for multi-hot labels; mining presets draw P x K batches (random batches for
    multi-hot labels, mined with the shares-a-label similarity).
    """
    multi = labels.ndim == 2
    while True:
        if spec.sampling == "class_pair_triplets":
            per_batch = max(1, batch_size // 3)
            sampler: Iterable = (
                MultiLabelTripletSampler(labels, triplets_per_batch=per_batch, seed=seed)
                if multi
                else ClassPairTripletSampler(labels, triplets_per_batch=per_batch, seed=seed)
            )
            for triplets in sampler:
                idx = np.asarray(triplets, dtype=np.int64).reshape(-1)
                yield idx, np.arange(idx.size, dtype=np.int64).reshape(-1, 3)
        elif spec.sampling == "pk" and not multi:
            k = 4
            p = max(2, min(len(np.unique(labels)), batch_size // k))
            for batch in PKBatchSampler(labels, p=p, k=k, replace=True, seed=seed):
                yield np.asarray(batch, dtype=np.int64), None
        else:
            for batch in RandomBatchSampler(len(labels), batch_size=batch_size, seed=seed):
                if len(batch) > 1:  # pairwise losses need two samples
                    yield np.asarray(batch, dtype=np.int64), None
        seed += 1


def train_hashing(
    spec: MethodSpec,
    inputs: torch.Tensor,
    labels: npt.ArrayLike,
    bits: int,
    config: TrainConfig | None = None,
    *,
    second_source: torch.Tensor | None = None,
    backbone: nn.Module | None = None,
    backbone2: nn.Module | None = None,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    augment2: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TrainResult:
    """Train ``spec`` with single (N,) or multi-hot (N, C) labels.

    Frozen-backbone mode: ``inputs`` are cached descriptors (N, D) and ``backbone`` is None.
    Fine-tuning mode: ``inputs`` are normalised images (N, bands, H, W), trained end to end
    through ``backbone`` (and ``augment`` applied per batch). Two-source presets take the paired
    second view in ``second_source`` (with its own ``backbone2`` when its bands differ, and its
    own ``augment2``, e.g. speckle for SAR where ``augment`` jitters optical bands).
    """
    cfg = config or TrainConfig()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    y = np.asarray(labels)
    single = y.ndim == 1
    n_classes = int(y.max()) + 1 if single else y.shape[1]
    if spec.two_sources and second_source is None:
        raise ValueError(f"method {spec.name!r} needs a second source (paired inputs)")
    if len(inputs) != len(y):
        raise ValueError(f"{len(inputs)} inputs but {len(y)} labels")
    if augment2 is not None and second_source is None:
        raise ValueError("augment2 augments the second source, but none was given")
    if second_source is not None and len(second_source) != len(y):
        raise ValueError(f"{len(second_source)} second-source inputs but {len(y)} labels")
    in_dim = int(getattr(backbone, "out_dim", 0)) if backbone is not None else inputs.shape[1]
    net = HashingNet(spec, in_dim, bits, n_classes, backbone, backbone2).to(device)
    disc_params = list(net.discriminator.parameters()) if net.discriminator is not None else []
    main_params = [p for n, p in net.named_parameters() if not n.startswith("discriminator.")]
    opt = torch.optim.Adam(main_params, lr=cfg.lr or spec.lr, weight_decay=cfg.weight_decay)
    opt_d = torch.optim.Adam(disc_params, lr=cfg.lr or spec.lr) if disc_params else None
    x_all = inputs.to(device)
    x2_all = second_source.to(device) if second_source is not None else None
    y_all = torch.as_tensor(y, device=device)
    labelled_all = torch.as_tensor(
        np.random.default_rng(cfg.seed).random(len(y)) < spec.labelled_fraction, device=device
    )
    batches = _batches(spec, y, cfg.batch_size, cfg.seed)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    net.train()
    amp = device.type == "cuda"
    bar = tqdm(range(cfg.iterations), desc=f"train {spec.name}-{bits}", disable=not cfg.progress)
    for step in bar:
        idx_np, rows = next(batches)
        idx = torch.as_tensor(idx_np, device=device)
        yb = y_all[idx]
        sim = similarity_matrix(yb)
        # bfloat16 autocast: mixed precision without the underflow that float16 needs a scaler for
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            xb = x_all[idx] if augment is None else augment(x_all[idx])
            x2b = None
            if x2_all is not None:
                x2b = x2_all[idx] if augment2 is None else augment2(x2_all[idx])
            loss, d_loss, terms = method_loss(
                net,
                xb,
                yb,
                sim,
                triplets=torch.as_tensor(rows, device=device) if rows is not None else None,
                labelled=labelled_all[idx],
                x2=x2b,
            )
        opt.zero_grad(set_to_none=True)
        if opt_d is not None:
            opt_d.zero_grad(set_to_none=True)
        (loss if d_loss is None else loss + d_loss).backward()  # d_loss only reaches D
        opt.step()
        if opt_d is not None:
            opt_d.step()
        if step % 50 == 0 or step == cfg.iterations - 1:
            history.append({"step": step, "loss": float(loss.detach()), **terms})
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    net.eval()
    return TrainResult(net, time.perf_counter() - start, history, str(device))


@torch.inference_mode()
def encode(
    net: HashingNet, features: torch.Tensor, batch_size: int = 1024, source: int = 0
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """{0,1} codes and relaxed float codes (N, bits) of descriptors (or images, with a backbone)."""
    device = next(net.parameters()).device
    bits, floats = [], []
    for start in range(0, len(features), batch_size):
        b, h = net.encode(features[start : start + batch_size].to(device), source)
        bits.append(b.cpu().numpy())
        floats.append(h.cpu().numpy())
    return np.concatenate(bits).astype(np.uint8), np.concatenate(floats).astype(np.float32)
