"""Checkpoints: safetensors weights beside a JSON config that says how to rebuild and feed them
(the config, read without torch, is :mod:`stac_rscbir.models.config`'s)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from stac_rscbir.fsutil import atomic_write
from stac_rscbir.models.config import WEIGHTS_NAME, ModelConfig, load_config, save_config


def save_checkpoint(directory: Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``, each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p)))
    save_config(directory, config)
    return directory


def load_checkpoint(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint folder back: its config and its CPU tensors."""
    config = load_config(directory)
    return config, load_file(str(directory / WEIGHTS_NAME))
