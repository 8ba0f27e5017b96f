"""One training loop for every preset: seeded, device auto-detected, mixed precision on CUDA."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import torch
from tqdm.auto import tqdm

from stac_rscbir.models.methods import HashingNet, MethodSpec, method_loss
from stac_rscbir.models.mining import similarity_matrix
from stac_rscbir.models.samplers import ClassPairTripletSampler, PKBatchSampler, RandomBatchSampler


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
    """Endless (batch indices, triplet rows in batch coordinates or None) for the method."""
    while True:
        if spec.sampling == "class_pair_triplets":
            sampler = ClassPairTripletSampler(labels, triplets_per_batch=batch_size // 3, seed=seed)
            for triplets in sampler:
                flat = np.asarray(triplets, dtype=np.int64).reshape(-1, 3)
                idx = flat.reshape(-1)
                rows = np.arange(idx.size, dtype=np.int64).reshape(-1, 3)
                yield idx, rows
        elif spec.sampling == "pk":
            n_classes = len(np.unique(labels))
            k = 4
            p = max(2, min(n_classes, batch_size // k))
            for batch in PKBatchSampler(labels, p=p, k=k, replace=True, seed=seed):
                yield np.asarray(batch, dtype=np.int64), None
        else:
            for batch in RandomBatchSampler(len(labels), batch_size=batch_size, seed=seed):
                yield np.asarray(batch, dtype=np.int64), None
        seed += 1


def train_hashing(
    spec: MethodSpec,
    features: torch.Tensor,
    labels: npt.ArrayLike,
    bits: int,
    config: TrainConfig | None = None,
    *,
    second_source: torch.Tensor | None = None,
) -> TrainResult:
    """Train ``spec`` on cached descriptors ``features`` (N, D) with single or multi-hot labels."""
    cfg = config or TrainConfig()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    y = np.asarray(labels)
    single = y.ndim == 1
    n_classes = int(y.max()) + 1 if single else y.shape[1]
    if spec.two_sources and second_source is None:
        raise ValueError(f"method {spec.name!r} needs a second source (paired descriptors)")
    net = HashingNet(spec, features.shape[1], bits, n_classes).to(device)
    disc_params = list(net.discriminator.parameters()) if net.discriminator is not None else []
    main_params = [p for n, p in net.named_parameters() if not n.startswith("discriminator.")]
    opt = torch.optim.Adam(main_params, lr=cfg.lr or spec.lr, weight_decay=cfg.weight_decay)
    opt_d = torch.optim.Adam(disc_params, lr=cfg.lr or spec.lr) if disc_params else None
    x_all = features.to(device)
    x2_all = second_source.to(device) if second_source is not None else None
    y_all = torch.as_tensor(y, device=device)
    labelled_all = torch.as_tensor(
        np.random.default_rng(cfg.seed).random(len(y)) < spec.labelled_fraction, device=device
    )
    # MiLaN's class-pair sampler needs single labels; multi-label data use the first label.
    sample_labels = y if single else y.argmax(axis=1)
    batches = _batches(spec, sample_labels, cfg.batch_size, cfg.seed)
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
        with torch.autocast(device.type, enabled=amp):
            loss, d_loss, terms = method_loss(
                net,
                x_all[idx],
                yb,
                sim,
                triplets=torch.as_tensor(rows, device=device) if rows is not None else None,
                labelled=labelled_all[idx],
                x2=x2_all[idx] if x2_all is not None else None,
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
    """{0,1} codes (N, bits) and relaxed float codes (N, bits) of cached descriptors."""
    device = next(net.parameters()).device
    bits, floats = [], []
    for start in range(0, len(features), batch_size):
        b, h = net.encode(features[start : start + batch_size].to(device), source)
        bits.append(b.cpu().numpy())
        floats.append(h.cpu().numpy())
    return np.concatenate(bits).astype(np.uint8), np.concatenate(floats).astype(np.float32)
