"""One training loop for every preset: seeded, device auto-detected, mixed precision on CUDA.

The same loop trains a hash head on cached frozen descriptors (the fast default) and fine-tunes
a backbone end to end or from cached activations (:class:`~stac_rscbir.models.backbones.
BackboneTail`): warm-up + cosine schedule, a lower learning rate for the backbone than for the
head, fixed BatchNorm statistics for small batches, and a train state saved every epoch that a
killed run resumes from.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

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
    epochs: float | None = None  # when set: iterations = ceil(epochs * N / batch_size)
    warmup: float = 0.0  # fraction of the iterations with a linear learning-rate warm-up
    schedule: Literal["constant", "cosine"] = "constant"
    backbone_lr: float | None = None  # default: the head's, times backbone_lr_factor
    backbone_lr_factor: float = 1.0  # fine-tuning a pretrained backbone: 0.1
    freeze_bn: bool = False  # keep the backbone's BatchNorm statistics (small batches)
    checkpoint_dir: Path | None = None  # train state saved every epoch; a rerun resumes
    checkpoint_every: int | None = None  # iterations between train states (default: an epoch)

    @classmethod
    def finetuning(cls, **overrides: object) -> TrainConfig:
        """Defaults for fine-tuning a pretrained backbone (overrides that are None keep them):
        3 epochs of batch 64, a 10 % linear warm-up then cosine decay, the backbone at a tenth
        of the head's learning rate, and the ImageNet BatchNorm statistics kept (updating them
        on 64-sample batches of augmented AID activations measured 1.7-2.4 points worse,
        benchmarks/RESULTS.md)."""
        settings: dict = {
            "epochs": 3.0,
            "batch_size": 64,
            "warmup": 0.1,
            "schedule": "cosine",
            "freeze_bn": True,
            "backbone_lr_factor": 0.1,
        }
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**settings)

    def steps(self, n_samples: int) -> int:
        """Iterations to run on ``n_samples`` samples."""
        if self.epochs is None:
            return self.iterations
        return max(1, math.ceil(self.epochs * n_samples / self.batch_size))

    def lr_factor(self, step: int, total: int) -> float:
        """Multiplier of the base learning rates at ``step``: linear warm-up, then constant or
        half-cosine decay to zero over the remaining iterations."""
        warm = int(self.warmup * total)
        if step < warm:
            return (step + 1) / warm
        if self.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


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


STATE_NAME = "train_state.pt"


def _fingerprint(spec: MethodSpec, bits: int, n: int, cfg: TrainConfig, total: int) -> dict:
    """What a saved train state must match to be resumed by this run."""
    keep = ("batch_size", "lr", "weight_decay", "seed", "warmup", "schedule", "backbone_lr")
    keep += ("backbone_lr_factor", "freeze_bn")
    settings = {k: v for k, v in asdict(cfg).items() if k in keep}
    return {"method": spec.name, "bits": bits, "n": n, "iterations": total, **settings}


def _set_batchnorm_eval(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


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
    init_from: HashingNet | None = None,
) -> TrainResult:
    """Train ``spec`` with single (N,) or multi-hot (N, C) labels.

    Frozen-backbone mode: ``inputs`` are cached descriptors (N, D) and ``backbone`` is None.
    Fine-tuning mode: ``inputs`` are normalised images (N, bands, H, W), trained end to end
    through ``backbone`` (and ``augment`` applied per batch). Two-source presets take the paired
    second view in ``second_source`` (with its own ``backbone2`` when its bands differ, and its
    own ``augment2``, e.g. speckle for SAR where ``augment`` jitters optical bands).
    ``init_from`` starts the head (and classifier, decoder, discriminator) from another network
    of the same preset, e.g. one trained on frozen descriptors: "linear probe, then fine-tune"
    (Kumar et al., ICLR 2022), so a random head does not distort pretrained features.
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
    if spec.two_views and augment is None:
        raise ValueError(
            f"method {spec.name!r} contrasts two augmented views: it needs an augmentation "
            "(fine-tune from cached activations, or images)"
        )
    if augment2 is not None and second_source is None:
        raise ValueError("augment2 augments the second source, but none was given")
    if second_source is not None and len(second_source) != len(y):
        raise ValueError(f"{len(second_source)} second-source inputs but {len(y)} labels")
    in_dim = int(getattr(backbone, "out_dim", 0)) if backbone is not None else inputs.shape[1]
    net = HashingNet(spec, in_dim, bits, n_classes, backbone, backbone2)
    if init_from is not None:  # e.g. a head trained on frozen features before fine-tuning
        missing, unexpected = net.load_state_dict(init_from.state_dict(), strict=False)
        if unexpected or any(not k.startswith("backbone") for k in missing):
            raise ValueError(f"init_from does not fit: missing {missing}, unexpected {unexpected}")
    net = net.to(device)
    disc_params = list(net.discriminator.parameters()) if net.discriminator is not None else []
    trainable = [
        (n, p)
        for n, p in net.named_parameters()
        if p.requires_grad and not n.startswith("discriminator.")
    ]
    lr = cfg.lr or spec.lr
    groups = [
        {"params": [p for n, p in trainable if not n.startswith("backbone")], "lr": lr},
        {
            "params": [p for n, p in trainable if n.startswith("backbone")],
            "lr": cfg.backbone_lr or lr * cfg.backbone_lr_factor,
        },
    ]
    opt = torch.optim.Adam([g for g in groups if g["params"]], weight_decay=cfg.weight_decay)
    opt_d = torch.optim.Adam(disc_params, lr=lr) if disc_params else None
    total = cfg.steps(len(y))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: cfg.lr_factor(step, total))
    x_all = inputs.to(device)
    x2_all = second_source.to(device) if second_source is not None else None
    y_all = torch.as_tensor(y, device=device)
    labelled_all = torch.as_tensor(
        np.random.default_rng(cfg.seed).random(len(y)) < spec.labelled_fraction, device=device
    )
    batches = _batches(spec, y, cfg.batch_size, cfg.seed)
    history: list[dict[str, float]] = []
    first = 0
    every = cfg.checkpoint_every or max(1, math.ceil(len(y) / cfg.batch_size))
    fingerprint = _fingerprint(spec, bits, len(y), cfg, total)
    state_path = cfg.checkpoint_dir / STATE_NAME if cfg.checkpoint_dir is not None else None
    if state_path is not None and state_path.is_file():
        first, history = _resume(state_path, fingerprint, net, opt, opt_d, sched, augment)
        for _ in range(first):  # the batch sequence is a pure function of the seed
            next(batches)
    start = time.perf_counter()
    net.train()
    if cfg.freeze_bn and net.backbone is not None:
        _set_batchnorm_eval(net.backbone)
    amp = device.type == "cuda"
    bar = tqdm(
        range(first, total),
        initial=first,
        total=total,
        desc=f"train {spec.name}-{bits}",
        disable=not cfg.progress,
    )
    seen, tick = 0, time.perf_counter()
    for step in bar:
        idx_np, rows = next(batches)
        idx = torch.as_tensor(idx_np, device=device)
        yb = y_all[idx]
        sim = similarity_matrix(yb)
        # bfloat16 autocast: mixed precision without the underflow that float16 needs a scaler for
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            x_raw = x_all[idx].float()
            xb = x_raw if augment is None else augment(x_raw)
            x2b = None
            if spec.two_views:  # a second augmented view of the same samples, same branch
                x2b = x_raw if augment is None else augment(x_raw)
            elif x2_all is not None:
                x2_raw = x2_all[idx].float()
                x2b = x2_raw if augment2 is None else augment2(x2_raw)
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
        sched.step()
        if opt_d is not None:
            opt_d.step()
        seen += len(idx_np)
        if step % 50 == 0 or step == total - 1:
            history.append({"step": step, "loss": float(loss.detach()), **terms})
            rate = seen / max(1e-9, time.perf_counter() - tick)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", img_s=f"{rate:.0f}")
        if state_path is not None and ((step + 1) % every == 0 or step == total - 1):
            _save_state(state_path, fingerprint, step + 1, net, opt, opt_d, sched, augment, history)
    net.eval()
    return TrainResult(net, time.perf_counter() - start, history, str(device))


def _rng_of(augment: Callable | None) -> np.random.Generator | None:
    """The NumPy generator of an :class:`~stac_rscbir.models.augment.Augment`, also when
    wrapped (``InUnits``), so a resumed run continues its random draws."""
    while augment is not None and not isinstance(
        getattr(augment, "rng", None), np.random.Generator
    ):
        augment = getattr(augment, "augment", None)
    return augment.rng if augment is not None else None  # type: ignore[union-attr]


def _save_state(
    path: Path,
    fingerprint: dict,
    step: int,
    net: HashingNet,
    opt: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer | None,
    sched: torch.optim.lr_scheduler.LRScheduler,
    augment: Callable | None,
    history: list[dict[str, float]],
) -> None:
    """Everything a killed run needs to continue at ``step``, written atomically."""
    from stac_rscbir.fsutil import atomic_write

    state = {
        "fingerprint": fingerprint,
        "step": step,
        "net": net.state_dict(),
        "opt": opt.state_dict(),
        "opt_d": opt_d.state_dict() if opt_d is not None else None,
        "sched": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "augment_rng": rng.bit_generator.state if (rng := _rng_of(augment)) else None,
        "history": history,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: torch.save(state, p))


def _resume(
    path: Path,
    fingerprint: dict,
    net: HashingNet,
    opt: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer | None,
    sched: torch.optim.lr_scheduler.LRScheduler,
    augment: Callable | None,
) -> tuple[int, list[dict[str, float]]]:
    """Load a train state saved by :func:`_save_state`; (next step, history so far)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} was saved by another training run ({state['fingerprint']}, this run is "
            f"{fingerprint}): remove it or point checkpoint_dir elsewhere"
        )
    net.load_state_dict(state["net"])
    opt.load_state_dict(state["opt"])
    if opt_d is not None and state["opt_d"] is not None:
        opt_d.load_state_dict(state["opt_d"])
    sched.load_state_dict(state["sched"])
    torch.set_rng_state(state["torch_rng"])
    rng = _rng_of(augment)
    if rng is not None and state["augment_rng"] is not None:
        rng.bit_generator.state = state["augment_rng"]
    return int(state["step"]), list(state["history"])


@torch.inference_mode()
def encode(
    net: HashingNet, features: torch.Tensor, batch_size: int = 1024, source: int = 0
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """{0,1} codes and relaxed float codes (N, bits) of descriptors (or images, with a backbone)."""
    device = next(net.parameters()).device
    bits, floats = [], []
    for start in range(0, len(features), batch_size):
        b, h = net.encode(features[start : start + batch_size].to(device).float(), source)
        bits.append(b.cpu().numpy())
        floats.append(h.cpu().numpy())
    return np.concatenate(bits).astype(np.uint8), np.concatenate(floats).astype(np.float32)
