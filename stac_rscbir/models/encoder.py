"""A trained hashing model for inference: backbone + hash head, saved and loaded in one call."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from stac_rscbir.models.backbones import build_backbone
from stac_rscbir.models.checkpoint import ModelConfig, load_checkpoint, save_checkpoint
from stac_rscbir.models.methods import HashingNet, method_spec


class HashEncoder(nn.Module):
    """Images (B, bands, H, W), normalised per ``config``, to {0,1} codes and float descriptors."""

    def __init__(self, config: ModelConfig, net: HashingNet) -> None:
        super().__init__()
        if net.backbone is None:
            raise ValueError("a HashEncoder needs the network's backbone")
        self.config = config
        self.net = net

    @classmethod
    def build(
        cls,
        config: ModelConfig,
        head_state: dict[str, torch.Tensor] | None = None,
        pretrained: bool = True,
    ) -> HashEncoder:
        """A fresh encoder for ``config`` (ImageNet backbone when ``pretrained``)."""
        backbone = build_backbone(
            config.backbone, in_bands=len(config.bands), pretrained=pretrained
        )
        n_classes = int(config.head.get("n_classes", 1))
        net = HashingNet(
            method_spec(config.method), backbone.out_dim, config.bits, n_classes, backbone=backbone
        )
        if head_state is not None:
            net.load_state_dict(head_state, strict=False)
        return cls(config, net.eval())

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Apply the checkpoint's per-band mean/std to raw (B, bands, H, W) values."""
        mean = torch.tensor(self.config.mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(self.config.std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels.float() - mean) / std

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """({0,1} uint8 codes (B, bits), relaxed float codes (B, bits)) of raw pixels."""
        return self.net.encode(self.normalise(pixels))

    def encode_numpy(self, pixels: npt.NDArray[np.floating]) -> tuple[np.ndarray, np.ndarray]:
        """NumPy convenience around :meth:`forward` on the encoder's device."""
        device = next(self.parameters()).device
        bits, relaxed = self(torch.as_tensor(pixels, device=device))
        return bits.cpu().numpy(), relaxed.cpu().numpy()

    def save(self, directory: Path) -> Path:
        """Write the checkpoint (safetensors + config.json)."""
        return save_checkpoint(directory, self.config, self.net.state_dict())

    @classmethod
    def load(cls, directory: Path, device: str | torch.device = "cpu") -> HashEncoder:
        """Rebuild an encoder from a checkpoint folder written by :meth:`save`."""
        config, state = load_checkpoint(directory)
        try:
            method_spec(config.method)
        except ValueError as exc:
            raise ValueError(f"{directory}: {exc}") from exc
        encoder = cls.build(config, pretrained=False)
        encoder.net.load_state_dict(state)
        return encoder.to(device).eval()

    def describe(self) -> dict[str, object]:
        """The config as a plain dict (e.g. for a STAC ``cbir:models`` entry)."""
        return asdict(self.config)
