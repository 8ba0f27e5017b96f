"""Checkpoints: safetensors weights beside a JSON config that says how to rebuild and feed them."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stac_rscbir.fsutil import atomic_write, atomic_write_text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a trained hashing model and prepare its input."""

    method: str
    bits: int
    bands: list[str]
    backbone: str
    mean: list[float]
    std: list[float]
    version: str = "1.0.0"
    model_id: str = ""
    input_size: int | None = None
    descriptor_dim: int | None = None
    head: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.bands) or len(self.std) != len(self.bands):
            raise ValueError(
                f"normalisation has {len(self.mean)} means and {len(self.std)} stds "
                f"for {len(self.bands)} bands"
            )
        if any(math.isnan(s) or s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")


def save_checkpoint(directory: Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``, each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p)))
    text = json.dumps(asdict(config), indent=2, sort_keys=True) + "\n"
    atomic_write_text(directory / CONFIG_NAME, text)
    return directory


def load_checkpoint(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint folder back: its config and its CPU tensors."""
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint incomplete: {path} is missing")
    raw = json.loads(config_path.read_text())
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {version!r}, expected {FORMAT_VERSION}")
    return ModelConfig(**raw), load_file(str(weights_path))
