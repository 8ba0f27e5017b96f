"""Hash heads: descriptors (B, D) -> relaxed codes (B, K), and a classifier on the codes.

The hash layer types of the survey's Table 2:

* ``"sigmoid"`` (MiLaN [26], [29]): codes in (0, 1), bit = ``1[h > 0.5]``, code space ``"01"``;
* ``"tanh"`` (RSiM / DUCH-style heads): codes in (-1, 1), bit = ``1[h >= 0]``, space ``"pm1"``;
* ``"linear"`` (DHNN [24], [25], [27], [28]): unbounded codes, bit = ``1[h >= 0]``, space
  ``"pm1"``.

``pm1`` bits follow :func:`stac_rscbir.models.losses.binarize` (``sign(0) := +1``), so the stored
{0,1} bit k is 1 exactly where the quantisation target ``sign(h_k)`` is +1.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "ClassifierHead",
    "HashHead",
    "dhnn_head",
    "milan_head",
    "rsim_head",
]

Activation = Literal["linear", "sigmoid", "tanh"]
HiddenActivation = Literal["leaky_relu", "relu", "gelu"]
ACTIVATIONS: tuple[str, ...] = ("linear", "sigmoid", "tanh")
_HIDDEN: tuple[str, ...] = ("leaky_relu", "relu", "gelu")


def _hidden_act(kind: str, negative_slope: float) -> nn.Module:
    if kind == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    if kind == "relu":
        return nn.ReLU()
    return nn.GELU()


class HashHead(nn.Module):
    """MLP ``in_dim -> hidden... -> bits`` with a final linear, sigmoid or tanh hash layer."""

    def __init__(
        self,
        in_dim: int,
        bits: int,
        hidden: Sequence[int] = (),
        activation: Activation = "linear",
        negative_slope: float = 0.2,
        hidden_activation: HiddenActivation = "leaky_relu",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if hidden_activation not in _HIDDEN:
            raise ValueError(
                f"hidden_activation must be one of {_HIDDEN}, got {hidden_activation!r}"
            )
        if in_dim < 1 or bits < 1 or any(int(h) < 1 for h in hidden):
            raise ValueError(
                f"dimensions must be positive: in_dim={in_dim}, bits={bits}, hidden={tuple(hidden)}"
            )
        self.in_dim = int(in_dim)
        self.bits = int(bits)
        self.hidden = tuple(int(h) for h in hidden)
        self.activation: str = activation
        self.space: str = "01" if activation == "sigmoid" else "pm1"
        layers: list[nn.Module] = []
        dims = [self.in_dim, *self.hidden]
        for d_in, d_out in itertools.pairwise(dims):
            layers += [nn.Linear(d_in, d_out), _hidden_act(hidden_activation, negative_slope)]
        layers.append(nn.Linear(dims[-1], self.bits))
        if activation == "sigmoid":
            layers.append(nn.Sigmoid())
        elif activation == "tanh":
            layers.append(nn.Tanh())
        self.net = nn.Sequential(*layers)

    @property
    def threshold(self) -> float:
        """Binarisation threshold of the relaxed codes: 0.5 (sigmoid) or 0 (tanh, linear)."""
        return 0.5 if self.space == "01" else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) descriptors -> (B, bits) relaxed codes."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"HashHead expects (B, {self.in_dim}) input, got {tuple(x.shape)}")
        return self.net(x)

    def binarize(self, h: torch.Tensor) -> torch.Tensor:
        """{0,1} uint8 bits (B, bits) of relaxed codes: ``h > 0.5`` (sigmoid), ``h >= 0`` (pm1)."""
        h = h.detach()
        bits = h > 0.5 if self.space == "01" else h >= 0
        return bits.to(torch.uint8)

    @torch.inference_mode()
    def hash(self, x: torch.Tensor) -> torch.Tensor:
        """{0,1} uint8 bits of descriptors, computed without autograd."""
        return self.binarize(self.forward(x))


class ClassifierHead(nn.Module):
    """Linear logits (B, n_classes) on codes or descriptors, for (binary) cross-entropy."""

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        if in_dim < 1 or n_classes < 1:
            raise ValueError(f"in_dim and n_classes must be positive, got {in_dim}, {n_classes}")
        self.in_dim = int(in_dim)
        self.n_classes = int(n_classes)
        self.fc = nn.Linear(self.in_dim, self.n_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, n_classes) logits."""
        return self.fc(h)


def milan_head(in_dim: int, bits: int) -> HashHead:
    """MiLaN's head (official MHCLN code): in_dim-1024-512-K, LeakyReLU(0.2), sigmoid."""
    return HashHead(in_dim, bits, hidden=(1024, 512), activation="sigmoid", negative_slope=0.2)


def rsim_head(in_dim: int, bits: int, hidden: int = 768) -> HashHead:
    """RSiM's BigEarthNet-MM hash head (DA4DTE): Linear-GELU-Linear-tanh."""
    return HashHead(in_dim, bits, hidden=(hidden,), activation="tanh", hidden_activation="gelu")


def dhnn_head(in_dim: int, bits: int) -> HashHead:
    """DHNN's hash-like layer: one linear layer, codes binarised by sign."""
    return HashHead(in_dim, bits, hidden=(), activation="linear")
