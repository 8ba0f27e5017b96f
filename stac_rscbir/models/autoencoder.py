"""Convolutional autoencoder for N-band images with greedy layer-wise pre-training.

The survey's Table 1 lists convolutional auto-encoders trained by reconstruction with greedy
layer-wise pre-training ([15]; [13] uses a sparse auto-encoder). The network here is a stack of
``L`` layers; layer ``l`` is a pair (encoder conv with stride 2, decoder transposed conv with
stride 2)::

    x -> enc_1 -> ... -> enc_L = code -> dec_L -> ... -> dec_1 -> x_hat   (x_hat has x's size)

Greedy pre-training (:func:`layerwise_pretrain`) trains layer 1 as a shallow AE on ``x``, freezes
it, trains layer 2 as a shallow AE on the layer-1 codes, and so on; :func:`finetune` then trains
the whole stack end to end. Decoders use ``ConvTranspose2d(..., output_size=...)`` so any input
size is reconstructed exactly (120x120 BigEarthNet patches, 64x64 chips, odd sizes).
The code map, average-pooled (or flattened), is the descriptor that a hash head consumes
(:meth:`ConvAutoencoder.descriptor`, :meth:`ConvAutoencoder.as_backbone`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

__all__ = [
    "AutoencoderEncoder",
    "ConvAutoencoder",
    "finetune",
    "layer_reconstruction_error",
    "layerwise_pretrain",
]

Pool = Literal["avg", "flatten"]


class ConvAutoencoder(nn.Module):
    """Stacked convolutional AE: ``len(widths)`` stride-2 conv layers and mirrored decoders.

    Hidden layers use LeakyReLU(``negative_slope``); the last decoder (back to the input bands)
    is linear, because inputs are z-scored band values. Each inner decoder ends with the same
    activation as the encoder output it reconstructs.
    """

    def __init__(
        self,
        in_bands: int,
        widths: Sequence[int] = (32, 64, 128),
        kernel_size: int = 3,
        negative_slope: float = 0.1,
    ) -> None:
        super().__init__()
        if in_bands < 1 or not widths or any(int(w) < 1 for w in widths):
            raise ValueError(f"need in_bands >= 1 and positive widths, got {in_bands}, {widths}")
        if kernel_size < 2 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        self.in_bands = int(in_bands)
        self.widths = tuple(int(w) for w in widths)
        self.out_dim = self.widths[-1]
        pad = kernel_size // 2
        channels = [self.in_bands, *self.widths]
        self.encoders = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for i, (c_in, c_out) in enumerate(itertools.pairwise(channels)):
            self.encoders.append(
                nn.Sequential(
                    nn.Conv2d(c_in, c_out, kernel_size, stride=2, padding=pad),
                    nn.LeakyReLU(negative_slope),
                )
            )
            deconv = nn.ConvTranspose2d(c_out, c_in, kernel_size, stride=2, padding=pad)
            act: nn.Module = nn.Identity() if i == 0 else nn.LeakyReLU(negative_slope)
            self.decoders.append(nn.ModuleDict({"deconv": deconv, "act": act}))

    @property
    def n_layers(self) -> int:
        """Number of encoder/decoder layer pairs."""
        return len(self.encoders)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_bands:
            raise ValueError(
                f"ConvAutoencoder expects (B, {self.in_bands}, H, W), got {tuple(x.shape)}"
            )

    def decode_layer(self, layer: int, z: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Decoder of layer ``layer`` (1-based): (B, C_l, h, w) -> (B, C_{l-1}, *size)."""
        dec = self.decoders[layer - 1]
        return dec["act"](dec["deconv"](z, output_size=list(size)))

    def encode_to(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Output of encoder layers 1..``layer`` (``layer`` = 0 returns ``x``)."""
        self._check(x)
        if not 0 <= layer <= self.n_layers:
            raise ValueError(f"layer must be in 0..{self.n_layers}, got {layer}")
        for enc in self.encoders[:layer]:
            x = enc(x)
        return x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, H, W) -> code map (B, widths[-1], ~H/2^L, ~W/2^L)."""
        return self.encode_to(x, self.n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x`` with its exact shape."""
        self._check(x)
        sizes = []
        z = x
        for enc in self.encoders:
            sizes.append(z.shape[-2:])
            z = enc(z)
        for layer in range(self.n_layers, 0, -1):
            z = self.decode_layer(layer, z, sizes[layer - 1])
        return z

    def layer_forward(self, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(target, reconstruction) of the shallow AE of ``layer`` (1-based) on input ``x``.

        The target is the input of that layer, i.e. ``x`` encoded by layers 1..layer-1 without
        gradients (they are frozen during greedy pre-training).
        """
        if not 1 <= layer <= self.n_layers:
            raise ValueError(f"layer must be in 1..{self.n_layers}, got {layer}")
        with torch.no_grad():
            target = self.encode_to(x, layer - 1)
        z = self.encoders[layer - 1](target)
        return target, self.decode_layer(layer, z, target.shape[-2:])

    def layer_parameters(self, layer: int) -> list[nn.Parameter]:
        """Parameters of the encoder and decoder of ``layer`` (1-based)."""
        return [*self.encoders[layer - 1].parameters(), *self.decoders[layer - 1].parameters()]

    def descriptor(self, x: torch.Tensor, pool: Pool = "avg") -> torch.Tensor:
        """(B, D) descriptor: the code map average-pooled (D = widths[-1]) or flattened."""
        z = self.encode(x)
        if pool == "avg":
            return z.mean(dim=(2, 3))
        if pool == "flatten":
            return z.flatten(1)
        raise ValueError(f"pool must be 'avg' or 'flatten', got {pool!r}")

    def code_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the code map for an input of ``height`` x ``width``."""
        for _ in range(self.n_layers):
            height, width = (height + 1) // 2, (width + 1) // 2
        return height, width

    def as_backbone(
        self, pool: Pool = "avg", input_size: tuple[int, int] | None = None
    ) -> AutoencoderEncoder:
        """The encoder as a backbone (``in_bands``, ``out_dim``); shares this AE's weights."""
        return AutoencoderEncoder(self, pool, input_size)


class AutoencoderEncoder(nn.Module):
    """An AE's encoder as a backbone: (B, N, H, W) -> (B, out_dim) descriptors."""

    def __init__(
        self, ae: ConvAutoencoder, pool: Pool = "avg", input_size: tuple[int, int] | None = None
    ) -> None:
        super().__init__()
        if pool not in ("avg", "flatten"):
            raise ValueError(f"pool must be 'avg' or 'flatten', got {pool!r}")
        self.ae = ae
        self.pool: Pool = pool
        self.in_bands = ae.in_bands
        if pool == "avg":
            self.out_dim = ae.widths[-1]
        else:
            if input_size is None:
                raise ValueError("pool='flatten' needs input_size to fix out_dim")
            h, w = ae.code_size(*input_size)
            self.out_dim = ae.widths[-1] * h * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_bands, H, W) -> (B, out_dim)."""
        out = self.ae.descriptor(x, self.pool)
        if out.shape[1] != self.out_dim:
            raise ValueError(
                f"descriptor has {out.shape[1]} dims, expected {self.out_dim} "
                "(input size differs from input_size)"
            )
        return out


def _inputs(batches: Iterable[Any], device: torch.device) -> Iterable[torch.Tensor]:
    for item in batches:
        x = item[0] if isinstance(item, list | tuple) else item
        yield torch.as_tensor(x).to(device, dtype=torch.float32)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.no_grad()
def layer_reconstruction_error(
    ae: ConvAutoencoder, batches: Iterable[Any], layer: int = 1
) -> float:
    """Mean squared reconstruction error of the shallow AE of ``layer`` over ``batches``."""
    was_training = ae.training
    ae.eval()
    total, count = 0.0, 0
    for x in _inputs(batches, _device_of(ae)):
        target, recon = ae.layer_forward(x, layer)
        total += float(F.mse_loss(recon, target, reduction="sum"))
        count += target.numel()
    ae.train(was_training)
    if count == 0:
        raise ValueError("batches yielded nothing")
    return total / count


def _fit(
    ae: ConvAutoencoder,
    params: list[nn.Parameter],
    batches: Iterable[Any],
    epochs: int,
    lr: float,
    layer: int | None,
    progress: bool,
) -> list[float]:
    opt = torch.optim.Adam(params, lr=lr)
    device = _device_of(ae)
    losses: list[float] = []
    desc = f"AE layer {layer}" if layer is not None else "AE fine-tune"
    for _ in tqdm(range(epochs), desc=desc, disable=not progress):
        total, n = 0.0, 0
        for x in _inputs(batches, device):
            if layer is None:
                target, recon = x, ae(x)
            else:
                target, recon = ae.layer_forward(x, layer)
            loss = F.mse_loss(recon, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
            n += 1
        if n == 0:
            raise ValueError(
                "batches yielded nothing (a generator is spent after one pass: "
                "pass a list of tensors or a DataLoader)"
            )
        losses.append(total / n)
    return losses


def layerwise_pretrain(
    ae: ConvAutoencoder,
    batches: Iterable[Any],
    epochs_per_layer: int = 5,
    lr: float = 1e-3,
    progress: bool = False,
) -> list[list[float]]:
    """Greedy layer-wise pre-training; returns the mean MSE per epoch for each layer.

    Layer ``l`` is trained alone (Adam, MSE) to reconstruct its input, the frozen output of
    layers 1..l-1. ``batches`` must be re-iterable (a list of tensors or ``(x, ...)`` tuples, or
    a DataLoader). All parameters are trainable again afterwards, ready for :func:`finetune`.
    """
    if epochs_per_layer < 1:
        raise ValueError(f"epochs_per_layer must be >= 1, got {epochs_per_layer}")
    ae.train()
    history: list[list[float]] = []
    try:
        for layer in range(1, ae.n_layers + 1):
            for p in ae.parameters():
                p.requires_grad_(False)
            params = ae.layer_parameters(layer)
            for p in params:
                p.requires_grad_(True)
            history.append(_fit(ae, params, batches, epochs_per_layer, lr, layer, progress))
    finally:
        for p in ae.parameters():
            p.requires_grad_(True)
    return history


def finetune(
    ae: ConvAutoencoder,
    batches: Iterable[Any],
    epochs: int = 5,
    lr: float = 1e-4,
    progress: bool = False,
) -> list[float]:
    """End-to-end reconstruction training of the whole AE; returns the mean MSE per epoch."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    ae.train()
    return _fit(ae, list(ae.parameters()), batches, epochs, lr, None, progress)
