"""A checkpoint's ``config.json``: how to rebuild a model and feed it, read and written without
torch, so the API (``stac-rscbir serve``) learns a checkpoint's model id without the ``ml`` extra.
The weights beside it (``model.safetensors``) are :mod:`stac_rscbir.models.checkpoint`'s."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from stac_rscbir.fsutil import atomic_write_text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: A descriptor model's fitted hasher arrays (:mod:`stac_rscbir.models.descriptor_model`).
HASHER_STATE_NAME = "hasher.npz"
#: What a checkpoint holds (its config's ``kind``): a network (backbone + hash head) or a
#: survey descriptor + a shallow hasher; and the file its ``config.json`` needs beside it.
NETWORK_KIND, DESCRIPTOR_KIND = "network", "descriptor"
KIND_FILES: dict[str, str] = {NETWORK_KIND: WEIGHTS_NAME, DESCRIPTOR_KIND: HASHER_STATE_NAME}
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


#: Integer pixel types :meth:`InputSpec.of_sample` tries, narrowest first (else ``float32``);
#: the STAC side lists the same in ``stac_rscbir.extension.cbir.INPUT_DTYPES``.
INTEGER_DTYPES: tuple[str, ...] = ("uint8", "uint16", "int16")
#: ``units`` of an :meth:`InputSpec.derived` range.
DERIVED_UNITS = "unknown; range derived as mean +- 2 std of the normalisation"
#: Smallest side of an image for a model without ``input_size`` (the backbones' stride is 32).
DEFAULT_MIN_SIZE = 16


def default_min_size(input_size: int | None) -> int:
    """Half the model's input size (an image is scaled up at most 2x), 16 px without one."""
    return max(1, input_size // 2) if input_size else DEFAULT_MIN_SIZE


@dataclass(frozen=True)
class InputSpec:
    """The pixel values one branch of a model takes, so an upload can be checked against them.

    ``value_range`` is [min, max] of the values the model was fitted on, in the units ingestion
    feeds it (raw numbers times the items' ``raster:bands`` scale, plus offset; SAR in dB);
    ``dtype`` the narrowest of :data:`INTEGER_DTYPES` that held them (else ``float32``);
    ``units`` free text (e.g. ``"reflectance x 10000"``); ``min_size`` the smallest side in
    pixels an image may have.
    Checkpoints written before this field get :meth:`derived` (no dtype, the range
    ``mean +- 2 std`` of the normalisation, half the input size).
    """

    value_range: tuple[float, float]
    min_size: int
    dtype: str | None = None
    units: str | None = None

    def __post_init__(self) -> None:
        lo, hi = (float(v) for v in self.value_range)  # a list when read back from JSON
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"input value_range must be finite [min, max], got {self.value_range}")
        object.__setattr__(self, "value_range", (lo, hi))
        if int(self.min_size) < 1:
            raise ValueError(f"input min_size must be >= 1, got {self.min_size}")
        if self.dtype is not None and self.dtype not in (*INTEGER_DTYPES, "float32"):
            raise ValueError(f"input dtype must be one of {INTEGER_DTYPES} or float32")

    @classmethod
    def of_sample(cls, pixels: npt.ArrayLike, min_size: int, units: str | None = None) -> InputSpec:
        """The range and narrowest type of the finite values of a fitting sample."""
        x = np.asarray(pixels)
        x = x[np.isfinite(x)]
        if x.size == 0:
            raise ValueError("no finite pixel values to describe the model's input")
        lo, hi = float(x.min()), float(x.max())
        dtype = "float32"
        if np.array_equal(x, np.round(x)):
            dtype = next(
                (t for t in INTEGER_DTYPES if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max),
                "float32",
            )
        return cls((lo, hi), min_size, dtype, units)

    @classmethod
    def derived(cls, mean: list[float], std: list[float], input_size: int | None) -> InputSpec:
        """What a checkpoint without ``input`` tells of it: its normalisation maps ``mean +-
        2 std`` of every band to [-2, 2], so that is taken as the range (no dtype), and
        ``units`` says so."""
        lo = min(m - 2 * s for m, s in zip(mean, std, strict=True))
        hi = max(m + 2 * s for m, s in zip(mean, std, strict=True))
        return cls((lo, hi), default_min_size(input_size), units=DERIVED_UNITS)

    def to_stac(self) -> dict[str, Any]:
        """The fields of a ``cbir:models`` entry's ``input`` (``None`` ones left out)."""
        out = {k: v for k, v in asdict(self).items() if v is not None}
        out["value_range"] = list(self.value_range)
        return out

    def describe(self) -> str:
        """E.g. ``uint16 values 0 to 10000 (reflectance x 10000)``, for messages."""
        lo, hi = self.value_range
        kind = f"{self.dtype} values" if self.dtype else "values"
        units = f" ({self.units})" if self.units else ""
        return f"{kind} {lo:g} to {hi:g}{units}"

    def check(
        self, model: str, what: str, dtype: str, shape: tuple[int, int], values: tuple[float, float]
    ) -> None:
        """Raise ``ValueError`` naming the mismatch if an image does not fit this input.

        ``what`` names the image (e.g. ``8-bit PNG``), ``dtype`` its pixel type after any
        scale/offset, ``shape`` (rows, cols), ``values`` its finite (min, max). Refused: a side
        under ``min_size``; an integer type that cannot hold the model's range (within 5 % of
        its width: an 8-bit image for a uint16 reflectance model, unsigned for dB); values
        further than one range width outside the range (reflectance 0-1 for 0-10000 stays
        undetected: the range cannot tell it from a dark image).
        """
        rows, cols = shape
        if min(rows, cols) < self.min_size:
            raise ValueError(
                f"{what} of {cols} x {rows} px is smaller than model {model!r} takes (at least "
                f"{self.min_size} x {self.min_size} px)"
            )
        lo, hi = self.value_range
        span = hi - lo
        if np.dtype(dtype).kind in "iu":
            info = np.iinfo(dtype)
            if info.max < hi - 0.05 * span or info.min > lo + 0.05 * span:
                raise ValueError(
                    f"{what} (values {info.min} to {info.max}) but model {model!r} takes "
                    f"{self.describe()}"
                )
        if values[0] < lo - span or values[1] > hi + span:
            raise ValueError(
                f"{what} has values {values[0]:g} to {values[1]:g}, but model {model!r} takes "
                f"{self.describe()}"
            )


def _spec(value: InputSpec | dict[str, Any] | None) -> InputSpec | None:
    return InputSpec(**value) if isinstance(value, dict) else value


@dataclass(frozen=True)
class SourceConfig:
    """One input branch of a model: the sensor bands it reads, its backbone, its normalisation,
    and the pixel values it takes (``None``: derived, see :class:`InputSpec`)."""

    bands: list[str]
    backbone: str
    mean: list[float]
    std: list[float]
    input: InputSpec | None = None

    def __post_init__(self) -> None:
        _check_normalisation(self.bands, self.mean, self.std)
        object.__setattr__(self, "input", _spec(self.input))


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
    # the pixel values the first branch takes (the second's are in second_source); None in
    # checkpoints written before it: see input_of
    input: InputSpec | None = None
    # what the folder holds (a key of KIND_FILES): "network" (HashEncoder) or "descriptor"
    # (DescriptorEncoder); the loader dispatches on it
    kind: str = NETWORK_KIND
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_normalisation(self.bands, self.mean, self.std)
        if self.kind not in KIND_FILES:
            raise ValueError(f"unknown model kind {self.kind!r}; known: {sorted(KIND_FILES)}")
        if isinstance(self.second_source, dict):  # read back from config.json
            object.__setattr__(self, "second_source", SourceConfig(**self.second_source))
        object.__setattr__(self, "input", _spec(self.input))

    @property
    def sources(self) -> list[SourceConfig]:
        """Every input branch, the first (source 0) from the top-level fields."""
        first = SourceConfig(
            list(self.bands), self.backbone, list(self.mean), list(self.std), self.input
        )
        return [first] if self.second_source is None else [first, self.second_source]

    def input_of(self, source: int = 0) -> InputSpec:
        """The pixel values branch ``source`` takes: as saved, else :meth:`InputSpec.derived`."""
        branch = self.sources[source]
        return branch.input or InputSpec.derived(branch.mean, branch.std, self.input_size)

    def source_for_band_count(self, count: int) -> int:
        """The branch that takes ``count`` bands; ``ValueError`` listing the branches if none."""
        for i, source in enumerate(self.sources):
            if len(source.bands) == count:
                return i
        takes = " or ".join(f"{len(s.bands)} ({', '.join(s.bands)})" for s in self.sources)
        raise ValueError(f"{count} band(s) given; model {self.model_id!r} takes {takes}")


def save_config(directory: Path, config: ModelConfig) -> Path:
    """(Re)write a checkpoint's ``config.json`` atomically; the weights are left alone."""
    text = json.dumps(asdict(config), indent=2, sort_keys=True) + "\n"
    path = directory / CONFIG_NAME
    atomic_write_text(path, text)
    return path


def load_config(directory: Path) -> ModelConfig:
    """Read a checkpoint's config alone (``FileNotFoundError`` if it, or the state file its
    kind needs, is missing)."""
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"checkpoint incomplete: {config_path} is missing")
    raw = json.loads(config_path.read_text())
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {version!r}, expected {FORMAT_VERSION}")
    config = ModelConfig(**raw)
    state_path = directory / KIND_FILES[config.kind]
    if not state_path.is_file():
        raise FileNotFoundError(f"checkpoint incomplete: {state_path} is missing")
    return config


def enable_tta(directory: Path) -> tuple[ModelConfig, ModelConfig | None]:
    """Switch a checkpoint to test-time augmentation: ``(config, None)`` when its config
    already has ``tta``; else ``config.json`` is rewritten (atomically, weights untouched) with
    ``tta`` true and the version suffixed ``+tta``, and the result is ``(new config, old
    config)``. The new version makes ingestion encode again what the old one encoded, so codes
    of the two encodings never share an archive."""
    config = load_config(directory)
    if config.kind != NETWORK_KIND:
        raise ValueError(
            f"{directory}: test-time augmentation is for network models; model "
            f"{config.model_id!r} is a {config.kind} model"
        )
    if config.tta:
        return config, None
    version = config.version
    if not version.endswith(TTA_VERSION_SUFFIX):
        version += TTA_VERSION_SUFFIX
    switched = replace(config, tta=True, version=version)
    save_config(directory, switched)
    return switched, config
