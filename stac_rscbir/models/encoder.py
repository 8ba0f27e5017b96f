"""A trained hashing model for inference: backbone + hash head, saved and loaded in one call."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from stac_rscbir.models.augment import DIHEDRAL, dihedral
from stac_rscbir.models.backbones import build_backbone
from stac_rscbir.models.checkpoint import load_checkpoint, save_checkpoint
from stac_rscbir.models.config import ModelConfig
from stac_rscbir.models.methods import HashingNet, method_spec


class HashEncoder(nn.Module):
    """Images (B, bands, H, W), normalised per ``config``, to {0,1} codes and float descriptors.

    A cross-modal model has one branch per sensor (``config.sources``); ``source`` picks the
    branch, and the codes of all branches live in one Hamming space.

    With ``config.tta`` (test-time augmentation) the relaxed code is the mean over the 8
    dihedral views (rotations by quarter turns, with and without a flip) and the code is the
    branch head's binarisation of that mean: codes become invariant to those transforms, at 8
    times the model time.
    """

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
        """A fresh encoder for ``config`` (ImageNet backbones when ``pretrained``)."""
        spec = method_spec(config.method)
        backbones = [
            build_backbone(s.backbone, in_bands=len(s.bands), pretrained=pretrained)
            for s in config.sources
        ]
        if len(backbones) > 1 and not spec.two_sources:
            raise ValueError(f"method {config.method!r} has one branch; the config names two")
        dims = {int(b.out_dim) for b in backbones}
        if len(dims) > 1:
            raise ValueError(
                f"the branches' backbones give {sorted(dims)}-d features; "
                "the hash heads need one width"
            )
        n_classes = int(config.head.get("n_classes", 1))
        net = HashingNet(
            spec,
            backbones[0].out_dim,
            config.bits,
            n_classes,
            backbone=backbones[0],
            backbone2=backbones[1] if len(backbones) > 1 else None,
        )
        if head_state is not None:
            net.load_state_dict(head_state, strict=False)
        return cls(config, net.eval())

    def normalise(self, pixels: torch.Tensor, source: int = 0) -> torch.Tensor:
        """Apply the branch's per-band mean/std to raw (B, bands, H, W) values."""
        sources = self.config.sources
        if not 0 <= source < len(sources):
            raise ValueError(
                f"model {self.config.model_id!r} has {len(sources)} branch(es), no source {source}"
            )
        branch = sources[source]
        if pixels.shape[1] != len(branch.bands):
            raise ValueError(
                f"{pixels.shape[1]} band(s) given to branch {source} of model "
                f"{self.config.model_id!r}, which takes {len(branch.bands)} "
                f"({', '.join(branch.bands)})"
            )
        mean = torch.tensor(branch.mean, device=pixels.device).view(1, -1, 1, 1)
        std = torch.tensor(branch.std, device=pixels.device).view(1, -1, 1, 1)
        return (pixels.float() - mean) / std

    @torch.inference_mode()
    def forward(self, pixels: torch.Tensor, source: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """({0,1} uint8 codes (B, bits), relaxed float codes (B, bits)) of raw pixels."""
        x = self.normalise(pixels, source)
        if not self.config.tta:
            return self.net.encode(x, source)
        relaxed = self.relaxed_tta(x, source)
        return self.binarize(relaxed, source), relaxed

    @torch.inference_mode()
    def relaxed_tta(self, x: torch.Tensor, source: int = 0) -> torch.Tensor:
        """Mean relaxed code (B, bits, float32) of the 8 dihedral views of normalised ``x``.

        One forward per view rather than one of 8B images, so peak memory stays that of a
        plain batch. Non-square inputs work: a quarter turn swaps H and W, and every backbone
        ends with global pooling.
        """
        views = [self.net(dihedral(x, k), source).float() for k in DIHEDRAL]
        return torch.stack(views).mean(dim=0)

    def binarize(self, relaxed: torch.Tensor, source: int = 0) -> torch.Tensor:
        """{0,1} codes of relaxed codes by the branch's own hash head."""
        return self.net.head_of(source).binarize(relaxed)

    def encode_numpy(
        self, pixels: npt.NDArray[np.floating], source: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """NumPy convenience around :meth:`forward` on the encoder's device."""
        device = next(self.parameters()).device
        bits, relaxed = self(torch.as_tensor(pixels, device=device), source)
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
