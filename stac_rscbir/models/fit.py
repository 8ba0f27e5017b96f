"""Hashing models fitted on the spot on UNLABELLED chips: ``stac-rscbir fit``, the demo and
``examples/index_public_stac.py``.

Two ways, both from the ImageNet EfficientNet-Lite0, both saved as ordinary checkpoints that
``ingest`` and ``serve`` take like any trained model:

* ``contrastive`` (the default): the ``contrastive`` preset (NT-Xent between the relaxed codes
  of two augmented views of each chip, quantization, bit balance; after CIBHash) trains the hash
  head with the last ``finetune`` blocks of the backbone
  (:func:`~stac_rscbir.models.recipes.fit_contrastive_encoder`);
* ``itq``: PCA + ITQ rotation of the frozen backbone's descriptors of the 8 flips/rotations of
  each chip (:func:`~stac_rscbir.models.recipes.fit_itq_encoder`): no training loop, the
  fast fallback.

>>> sample = item_chips(items, bands, 120, max_chips=600, views=settings.views)
>>> stats = BandStats.fit(sample.pixels, bands)
>>> fit = fit_encoder(sample.pixels, bands, stats.mean, stats.std, settings,
...                   model_id="my-model", input_size=120)
>>> fit.encoder.save(out); print(fit.summary())
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stac_rscbir.models.config import InputSpec, ModelConfig, default_min_size
from stac_rscbir.models.encoder import HashEncoder
from stac_rscbir.models.finetune import Finetune

#: Methods that fit without labels, the default first.
FIT_METHODS: tuple[str, ...] = ("contrastive", "itq")
BACKBONE = "efficientnet-lite0"


@dataclass(frozen=True)
class FitSettings:
    """How to fit: method, code length, what of the backbone trains, how long."""

    method: str = "contrastive"
    bits: int = 64
    #: contrastive only: the last blocks of the backbone that train with the head.
    finetune: Finetune = field(default_factory=lambda: Finetune(2))
    #: 20: on 600 AID images (120 px, labels only to score) 5-10 epochs scored below ITQ
    epochs: float = 20.0
    batch_size: int = 64
    seed: int = 0
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.method not in FIT_METHODS:
            raise ValueError(f"unknown fit method {self.method!r}; choose from {FIT_METHODS}")
        if self.epochs <= 0 or self.batch_size < 2:
            raise ValueError(
                f"need epochs > 0 and batch size >= 2, got {self.epochs}, {self.batch_size}"
            )

    @property
    def views(self) -> bool:
        """Whether the sample holds the 8 flips/rotations of each chip (ITQ) or the chips
        themselves (contrastive training makes its own augmented views)."""
        return self.method == "itq"

    def tuned(self) -> str:
        """What of the backbone trains, in words."""
        if self.method == "itq":
            return "frozen"
        if self.finetune.whole:
            return "whole network"
        if self.finetune.blocks == 0:
            return "head convolution"
        return f"last {self.finetune.blocks} blocks + head convolution"

    def describe(self, backbone: str = BACKBONE) -> str:
        """The model in one line, e.g. for the demo's output."""
        if self.method == "itq":
            return (
                f"ImageNet {backbone} (frozen) + ITQ {self.bits}-bit head "
                "(no training: the fallback)"
            )
        return (
            f"ImageNet {backbone} + contrastive {self.bits}-bit head, {self.tuned()} "
            f"fine-tuned without labels ({self.epochs:g} epochs)"
        )


@dataclass
class FitResult:
    """A fitted encoder and what happened while fitting it."""

    encoder: HashEncoder
    settings: FitSettings
    chips: int
    seconds: float
    device: str
    #: contrastive: the loss at the first and the last logged step; itq: None.
    losses: tuple[float, float] | None = None
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> str:
        """``<model in words>, <seconds> s``."""
        return f"{self.settings.describe(self.encoder.config.backbone)}, {self.seconds:.0f} s"


def fit_encoder(
    pixels: npt.NDArray[np.floating],
    bands: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    settings: FitSettings,
    *,
    model_id: str,
    input_size: int,
    version: str = "1.0.0",
    extra: dict[str, Any] | None = None,
    backbone: str = BACKBONE,
    checkpoint_dir: Path | None = None,
) -> FitResult:
    """Fit ``settings.method`` on raw-unit ``pixels`` (N, bands, H, W) normalised by the
    per-band ``mean``/``std`` (stored in the checkpoint's config, so ingest feeds it alike).

    ``extra`` goes into the config's ``extra`` with ``labels: "none"``, the fine-tuning, the
    chips, the seed and (contrastive) the epochs and iterations. ``backbone`` other than
    efficientnet-lite0 is for ITQ only. ``checkpoint_dir`` keeps a contrastive run's train state
    (a killed run resumes).
    """
    from stac_rscbir.models.recipes import fit_contrastive_encoder, fit_itq_encoder
    from stac_rscbir.models.training import TrainConfig

    if len(pixels) == 0:
        raise ValueError("no chips to fit on")
    if settings.method == "itq" and len(pixels) < settings.bits:
        raise ValueError(
            f"ITQ needs at least {settings.bits} chips (views) for {settings.bits} bits, "
            f"got {len(pixels)}"
        )
    if settings.method == "contrastive" and len(pixels) < 2:
        raise ValueError("contrastive fitting needs at least 2 chips (the others are negatives)")
    train = TrainConfig.finetuning(
        epochs=settings.epochs,
        batch_size=min(settings.batch_size, len(pixels)),
        seed=settings.seed,
        device=settings.device,
        progress=settings.progress,
        checkpoint_dir=checkpoint_dir,
    )
    meta: dict[str, Any] = {
        **(extra or {}),
        "labels": "none",
        "finetune": settings.tuned(),
        "chips": len(pixels),
        "seed": settings.seed,
    }
    if settings.method == "contrastive":
        meta.update(epochs=settings.epochs, iterations=train.steps(len(pixels)))
    config = ModelConfig(
        method=settings.method,
        bits=settings.bits,
        bands=list(bands),
        backbone=backbone,
        mean=[float(v) for v in mean],
        std=[float(v) for v in std],
        version=version,
        model_id=model_id,
        input_size=input_size,
        descriptor_dim=settings.bits,
        extra=meta,
        input=InputSpec.of_sample(pixels, default_min_size(input_size)),
    )
    start = time.perf_counter()
    if settings.method == "itq":
        encoder = fit_itq_encoder(config, np.asarray(pixels), progress=settings.progress)
        return FitResult(encoder, settings, len(pixels), time.perf_counter() - start, "cpu")
    encoder, result = fit_contrastive_encoder(config, pixels, settings.finetune, train)
    losses = None
    if result.history:
        losses = (result.history[0]["loss"], result.history[-1]["loss"])
    return FitResult(
        encoder,
        settings,
        len(pixels),
        time.perf_counter() - start,
        result.device,
        losses,
        result.history,
    )
