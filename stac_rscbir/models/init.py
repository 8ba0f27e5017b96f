"""Network initialisation strategies of the survey's Table 1, behind one entry point.

* ``"random"`` (also ``"kaiming"``, ``"xavier"``): :func:`init_random`, He or Glorot weights;
* ``"pretrained"``: ImageNet weights, offline, for every :class:`EfficientNetLite0` inside the
  model (stem adapted to its band count by ``backbones.adapt_stem_weight``);
* ``"layerwise"``: greedy layer-wise pre-training of a :class:`ConvAutoencoder` inside the model
  (:func:`~stac_rscbir.models.autoencoder.layerwise_pretrain`), which needs training batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from stac_rscbir.models.autoencoder import ConvAutoencoder, layerwise_pretrain
from stac_rscbir.models.backbones import EfficientNetLite0

__all__ = ["STRATEGIES", "init_random", "initialize"]

M = TypeVar("M", bound=nn.Module)
Scheme = Literal["kaiming", "xavier"]
STRATEGIES: tuple[str, ...] = ("random", "kaiming", "xavier", "pretrained", "layerwise")

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)


def init_random(
    module: M, scheme: Scheme = "kaiming", seed: int | None = None, negative_slope: float = 0.0
) -> M:
    """Re-initialise all conv/linear/norm layers in place and return ``module``.

    ``"kaiming"``: He-normal weights (fan_out for convolutions, fan_in for linear layers) for
    (leaky) ReLU with ``negative_slope``; ``"xavier"``: Glorot-uniform weights. Biases are zero,
    norm layers get unit scale, zero shift and fresh running statistics. ``seed`` makes the draw
    reproducible without touching the global RNG.
    """
    if scheme not in ("kaiming", "xavier"):
        raise ValueError(f"scheme must be 'kaiming' or 'xavier', got {scheme!r}")
    nonlinearity = "leaky_relu" if negative_slope else "relu"
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        for m in module.modules():
            if isinstance(m, _WEIGHTED):
                if scheme == "xavier":
                    nn.init.xavier_uniform_(m.weight)
                else:
                    mode = "fan_in" if isinstance(m, nn.Linear) else "fan_out"
                    nn.init.kaiming_normal_(
                        m.weight, a=negative_slope, mode=mode, nonlinearity=nonlinearity
                    )
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, _NORMS):
                if getattr(m, "weight", None) is not None:
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()
    return module


def _find(model: nn.Module, kind: type[M]) -> list[M]:
    return [m for m in model.modules() if isinstance(m, kind)]


def initialize(
    model: M,
    strategy: str,
    *,
    batches: Iterable[Any] | None = None,
    epochs_per_layer: int = 5,
    lr: float = 1e-3,
    seed: int | None = None,
) -> M:
    """Initialise ``model`` in place by ``strategy`` (one of :data:`STRATEGIES`); returns it.

    ``"pretrained"`` loads ImageNet weights into each EfficientNetLite0 submodule and leaves the
    other layers untouched; ``"layerwise"`` greedily pre-trains each ConvAutoencoder submodule on
    ``batches`` (re-iterable) for ``epochs_per_layer`` epochs per layer at learning rate ``lr``.
    """
    key = strategy.strip().lower()
    if key in ("random", "kaiming"):
        return init_random(model, "kaiming", seed=seed)
    if key == "xavier":
        return init_random(model, "xavier", seed=seed)
    if key == "pretrained":
        nets = _find(model, EfficientNetLite0)
        if not nets:
            raise ValueError(
                f"strategy 'pretrained' needs an EfficientNetLite0 in the model (the only "
                f"backbone with offline ImageNet weights); {type(model).__name__} has none"
            )
        for net in nets:
            net.load_imagenet()
        return model
    if key == "layerwise":
        aes = _find(model, ConvAutoencoder)
        if not aes:
            raise ValueError(
                f"strategy 'layerwise' needs a ConvAutoencoder in the model; "
                f"{type(model).__name__} has none"
            )
        if batches is None:
            raise ValueError("strategy 'layerwise' needs training batches")
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            for ae in aes:
                layerwise_pretrain(ae, batches, epochs_per_layer=epochs_per_layer, lr=lr)
        return model
    raise ValueError(f"unknown strategy {strategy!r}; valid strategies: {', '.join(STRATEGIES)}")
