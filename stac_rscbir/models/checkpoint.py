"""Checkpoints: safetensors weights beside a JSON config that says how to rebuild and feed them."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stac_rscbir.fsutil import atomic_write, atomic_write_text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
#: Suffix of the model version when a checkpoint is switched to test-time augmentation: the
#: same weights encode differently, so its codes must not pass for the version's earlier ones.
TTA_VERSION_SUFFIX = "+tta"


def _check_normalisation(bands: list[str], mean: list[float], std: list[float]) -> None:
    if len(mean) != len(bands) or len(std) != len(bands):
        raise ValueError(
            f"normalisation has {len(mean)} means and {len(std)} stds for {len(bands)} bands"
        )
    if any(math.isnan(s) or s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")


@dataclass(frozen=True)
class SourceConfig:
    """One input branch of a model: the sensor bands it reads, its backbone, its normalisation."""

    bands: list[str]
    backbone: str
    mean: list[float]
    std: list[float]

    def __post_init__(self) -> None:
        _check_normalisation(self.bands, self.mean, self.std)


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
    # cross-modal models: the second sensor's branch, coding into the same Hamming space
    second_source: SourceConfig | None = None
    # test-time augmentation: encode with the mean relaxed code of the 8 dihedral views (x8
    # model time); archive and queries follow it alike since both read this config
    tta: bool = False
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_normalisation(self.bands, self.mean, self.std)
        if isinstance(self.second_source, dict):  # read back from config.json
            object.__setattr__(self, "second_source", SourceConfig(**self.second_source))

    @property
    def sources(self) -> list[SourceConfig]:
        """Every input branch, the first (source 0) from the top-level fields."""
        first = SourceConfig(list(self.bands), self.backbone, list(self.mean), list(self.std))
        return [first] if self.second_source is None else [first, self.second_source]

    def source_for_band_count(self, count: int) -> int:
        """The branch that takes ``count`` bands; ``ValueError`` listing the branches if none."""
        for i, source in enumerate(self.sources):
            if len(source.bands) == count:
                return i
        takes = " or ".join(f"{len(s.bands)} ({', '.join(s.bands)})" for s in self.sources)
        raise ValueError(f"{count} band(s) given; model {self.model_id!r} takes {takes}")


def save_checkpoint(directory: Path, config: ModelConfig, state: dict[str, torch.Tensor]) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``, each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(tensors, str(p)))
    save_config(directory, config)
    return directory


def save_config(directory: Path, config: ModelConfig) -> Path:
    """(Re)write a checkpoint's ``config.json`` atomically; the weights are left alone."""
    text = json.dumps(asdict(config), indent=2, sort_keys=True) + "\n"
    path = directory / CONFIG_NAME
    atomic_write_text(path, text)
    return path


def load_config(directory: Path) -> ModelConfig:
    """Read a checkpoint's config alone (``FileNotFoundError`` if it, or the weights, is
    missing)."""
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint incomplete: {path} is missing")
    raw = json.loads(config_path.read_text())
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {version!r}, expected {FORMAT_VERSION}")
    return ModelConfig(**raw)


def load_checkpoint(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint folder back: its config and its CPU tensors."""
    config = load_config(directory)
    return config, load_file(str(directory / WEIGHTS_NAME))


def enable_tta(directory: Path) -> tuple[ModelConfig, ModelConfig | None]:
    """Switch a checkpoint to test-time augmentation: ``(config, None)`` when its config
    already has ``tta``; else ``config.json`` is rewritten (atomically, weights untouched) with
    ``tta`` true and the version suffixed ``+tta``, and the result is ``(new config, old
    config)``. The new version makes ingestion encode again what the old one encoded, so codes
    of the two encodings never share an archive."""
    config = load_config(directory)
    if config.tta:
        return config, None
    version = config.version
    if not version.endswith(TTA_VERSION_SUFFIX):
        version += TTA_VERSION_SUFFIX
    switched = replace(config, tta=True, version=version)
    save_config(directory, switched)
    return switched, config
