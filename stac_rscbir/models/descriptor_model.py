"""A survey descriptor with a shallow hasher as a search model: any method of
:data:`~stac_rscbir.descriptors.registry.DESCRIPTORS` (e.g. [3] LBP histograms, [4] bag of
spectral values) gives each chip its float descriptor, and a hasher of
:data:`~stac_rscbir.models.shallow_hashing.HASHERS` (ITQ by default) fitted on the chips'
descriptors gives its code, so the item gets both as ``cbir:`` properties: the code for the
Hamming index, the descriptor for the API's re-rank (Euclidean) and float queries. The survey's
section 2 pipeline (hand-crafted descriptor, then hashing for scalable search, as in [8]-[10],
[23]), as a checkpoint that ``ingest`` and ``serve`` load like a network
(:func:`stac_rscbir.models.loader.load_encoder`).

**Pixels.** Descriptors take (H, W, B) float32 in [0, 1]. Chips come in the units ingestion
reads (reflectance x scale + offset, dB, 8-bit RGB), so each band is stretched linearly,
``x' = clip((x - lo_b) / (hi_b - lo_b), 0, 1)``, with ``lo_b, hi_b`` the
:data:`STRETCH_PERCENTILES` (2nd and 98th) of band b over the fit sample's finite values, or a
fixed range (0-255 for a folder of 8-bit RGB images: the benchmark's own scaling of AID). They
are kept in the config as ``mean = lo`` and ``std = hi - lo``, so the config's one per-band
normalisation ``(x - mean) / std`` is the stretch here (then clipped), and ingestion fills
invalid pixels with ``lo``. Chips are described at the model's ``input_size`` (the fit's chip
size), not at the descriptor's benchmark size.

**Ranking.** The API re-ranks by the Euclidean distance of descriptors; a method whose paper
ranks by a distance of its own (``DescriptorSpec.distance``, used by the benchmark) is served
with the Euclidean one here.

**Checkpoint folder.** ``config.json`` (``kind: "descriptor"``; ``method`` is
``<descriptor>+<hasher>`` as in the benchmark's row names, ``backbone`` the descriptor;
``head`` the hasher's settings and scalar state), ``hasher.npz`` (the hasher's fitted arrays:
every hasher is a dataclass whose non-init fields are its fitted state) and, for descriptors
that learn (a vocabulary, a codebook), ``descriptor.pkl``: the fitted descriptor pickled,
because the :class:`~stac_rscbir.descriptors.base.Descriptor` protocol has no array export and
its methods hold arbitrary fitted objects (``sift-bovw``'s scikit-learn ``MiniBatchKMeans``).
A pickle runs code when read, so it is read only from a folder the operator names on the
command line (``ingest --model``, ``serve --model`` / ``--encode-with``), never from anything a
request carries, and its SHA-256, recorded in the config, is checked first (a file swapped or
rewritten after the fit is refused). Fixed descriptors (LBP, pattern spectra) are rebuilt from
their factory and save nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from stac_rscbir.descriptors.base import Descriptor, DescriptorSpec
from stac_rscbir.descriptors.registry import DESCRIPTORS
from stac_rscbir.fsutil import atomic_write
from stac_rscbir.models.config import (
    CONFIG_NAME,
    DESCRIPTOR_KIND,
    HASHER_STATE_NAME,
    InputSpec,
    ModelConfig,
    default_min_size,
    load_config,
    save_config,
)
from stac_rscbir.models.shallow_hashing import HASHERS, Hasher, fit_hasher

DESCRIPTOR_STATE_NAME = "descriptor.pkl"
#: Percentiles of each band over the fit sample that the stretch maps to 0 and 1.
STRETCH_PERCENTILES: tuple[float, float] = (2.0, 98.0)
RGB = ("red", "green", "blue")


def descriptor_spec(name: str, bands: Sequence[str]) -> DescriptorSpec:
    """The registry's spec of ``name``, checked for a descriptor model: fitted without labels,
    hashable, and on the chips' ``bands`` (an RGB-only descriptor needs exactly 3)."""
    spec = DESCRIPTORS.get(name)
    if spec is None:
        raise ValueError(f"unknown descriptor {name!r}; choose from {sorted(DESCRIPTORS)}")
    if spec.supervised:
        raise ValueError(
            f"descriptor {name!r} ({spec.reference}) learns from labelled images; a descriptor "
            "model fits on unlabelled chips: choose one of "
            f"{sorted(n for n, s in DESCRIPTORS.items() if not s.supervised and s.hashable)}"
        )
    if not spec.hashable:
        raise ValueError(
            f"descriptor {name!r} ({spec.reference}) ranks by its own distance only, "
            "no shallow hasher codes it: a descriptor model needs a hashable descriptor"
        )
    if not spec.any_bands and len(bands) != len(RGB):
        raise ValueError(
            f"descriptor {name!r} ({spec.reference}) works on RGB images: it needs 3 bands "
            f"({', '.join(RGB)}), got {len(bands)} ({', '.join(bands)})"
        )
    return spec


def stretch_range(
    pixels: npt.NDArray[np.floating], percentiles: tuple[float, float] = STRETCH_PERCENTILES
) -> tuple[list[float], list[float]]:
    """Per-band ``(lo, hi - lo)`` of (N, B, H, W) pixels: the ``percentiles`` of each band's
    finite values (a band with ``hi == lo`` gets width 1, so it maps to 0)."""
    x = np.asarray(pixels)  # no float64 copy: a 2000-chip sample is hundreds of MB already
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"need chips (N>0, bands, H, W), got shape {x.shape}")
    lows, widths = [], []
    for band in range(x.shape[1]):
        values = x[:, band][np.isfinite(x[:, band])]
        if values.size == 0:
            raise ValueError(f"band {band} has no finite values in the fit sample")
        lo, hi = np.percentile(values, percentiles)
        lows.append(float(lo))
        widths.append(float(hi - lo) if hi > lo else 1.0)
    return lows, widths


def _hasher_state(hasher: Hasher) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
    """A dataclass hasher as (settings, scalar state, array state): its init fields, and its
    fitted (non-init) fields split into JSON values and arrays."""
    settings, scalars, arrays = {}, {}, {}
    for f in dataclasses.fields(hasher):  # type: ignore[arg-type]
        value = getattr(hasher, f.name)
        if f.init:
            settings[f.name] = value
        elif isinstance(value, np.ndarray):
            arrays[f.name] = value
        else:
            scalars[f.name] = value
    return settings, scalars, arrays


@dataclass(frozen=True)
class DescriptorFit:
    """What fitting a descriptor model needs besides the chips."""

    descriptor: str
    hasher: str = "itq"
    bits: int = 64
    seed: int = 0


class DescriptorEncoder:
    """Raw-unit chips (N, bands, H, W) to {0,1} codes and float descriptors, through a survey
    descriptor and a shallow hasher; the same calls as
    :class:`~stac_rscbir.models.encoder.HashEncoder` (``__call__``, :meth:`binarize`,
    :meth:`encode_numpy`, ``config``), so ingestion and the API take either. Runs on the CPU
    (NumPy, scikit-image, OpenCV) whatever device it is moved to."""

    def __init__(self, config: ModelConfig, descriptor: Descriptor, hasher: Hasher) -> None:
        if config.kind != DESCRIPTOR_KIND:
            raise ValueError(
                f"a DescriptorEncoder needs a {DESCRIPTOR_KIND!r} config, got {config.kind!r}"
            )
        if config.tta:
            raise ValueError("test-time augmentation is for network models")
        self.spec = descriptor_spec(config.backbone, config.bands)
        self.config = config
        self.descriptor = descriptor
        self.hasher = hasher

    @classmethod
    def fit(
        cls,
        pixels: npt.NDArray[np.floating],
        bands: Sequence[str],
        how: DescriptorFit,
        *,
        model_id: str,
        value_range: tuple[float, float] | None = None,
        version: str = "1.0.0",
        extra: dict[str, Any] | None = None,
    ) -> DescriptorEncoder:
        """Fit on raw-unit chips (N, bands, H, W) without labels: the stretch (``value_range``
        for every band, else :func:`stretch_range` of the chips), the descriptor where it
        learns, then the hasher on the chips' descriptors."""
        spec = descriptor_spec(how.descriptor, bands)
        x = np.asarray(pixels, dtype=np.float32)
        if x.ndim != 4 or x.shape[1] != len(bands) or len(x) == 0:
            raise ValueError(f"need chips (N>0, {len(bands)}, H, W), got shape {x.shape}")
        if value_range is None:
            low, width = stretch_range(x)
            scaling = f"per-band {STRETCH_PERCENTILES[0]:g}-{STRETCH_PERCENTILES[1]:g} % stretch"
        else:
            lo, hi = value_range
            low, width = [lo] * len(bands), [hi - lo] * len(bands)
            scaling = f"fixed range {lo:g}-{hi:g}"
        size = int(x.shape[-1])
        config = ModelConfig(
            method=f"{how.descriptor}+{how.hasher}",
            bits=how.bits,
            bands=list(bands),
            backbone=how.descriptor,
            mean=low,
            std=width,
            version=version,
            model_id=model_id,
            input_size=size,
            head={"hasher": how.hasher},
            extra={
                **(extra or {}),
                "labels": "none",
                "reference": spec.reference,
                "scaling": f"{scaling} to [0, 1], clipped",
                "chips": len(x),
                "seed": how.seed,
            },
            input=InputSpec.of_sample(x, default_min_size(size)),
            kind=DESCRIPTOR_KIND,
        )
        descriptor = spec.factory()
        images = _scaled(x, config)
        if spec.learns:
            descriptor.fit(images)
        feats = descriptor.transform(images)
        try:
            hasher = fit_hasher(how.hasher, how.bits, feats, seed=how.seed)
        except ValueError as exc:
            raise ValueError(
                f"{how.hasher} on {len(feats)} {how.descriptor} descriptors of dim "
                f"{feats.shape[1]}: {exc}"
            ) from exc
        config = dataclasses.replace(config, descriptor_dim=int(feats.shape[1]))
        return cls(config, descriptor, hasher)

    def scale(self, pixels: npt.NDArray[np.floating]) -> list[npt.NDArray[np.float32]]:
        """Raw-unit chips (N, bands, H, W) as the descriptor's (H, W, bands) images in [0, 1]."""
        bands = self.config.bands
        if pixels.ndim != 4 or pixels.shape[1] != len(bands):
            raise ValueError(
                f"chips of shape {pixels.shape} given to model {self.config.model_id!r}, which "
                f"takes (N, {len(bands)}, H, W) ({', '.join(bands)})"
            )
        return _scaled(pixels, self.config)

    def encode_numpy(
        self, pixels: npt.NDArray[np.floating], source: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """({0,1} uint8 codes (N, bits), float32 descriptors (N, d)) of raw-unit chips."""
        self._check_source(source)
        desc = self.descriptor.transform(self.scale(np.asarray(pixels, dtype=np.float32)))
        desc = np.asarray(desc, dtype=np.float32)
        return self.hasher.encode(desc).astype(np.uint8), desc

    def __call__(self, pixels: torch.Tensor, source: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_numpy` on a tensor, as the network encoders are called."""
        bits, desc = self.encode_numpy(pixels.detach().float().cpu().numpy(), source)
        return torch.from_numpy(bits), torch.from_numpy(desc)

    def binarize(self, descriptors: torch.Tensor, source: int = 0) -> torch.Tensor:
        """The hasher's codes (N, bits) of descriptors (N, d): a scene's mean of its chips'
        descriptors, a descriptor query, a refined (feedback) query."""
        self._check_source(source)
        x = descriptors.detach().float().cpu().numpy()
        return torch.from_numpy(self.hasher.encode(x).astype(np.uint8))

    def _check_source(self, source: int) -> None:
        if source != 0:
            raise ValueError(f"model {self.config.model_id!r} has 1 branch, no source {source}")

    def to(self, device: str | torch.device) -> DescriptorEncoder:
        """Itself: descriptors run on the CPU."""
        return self

    def eval(self) -> DescriptorEncoder:
        """Itself: nothing switches between training and inference."""
        return self

    def save(self, directory: Path) -> Path:
        """Write ``hasher.npz``, ``descriptor.pkl`` (descriptors that learn) and then
        ``config.json`` (with the hasher's settings and the pickle's SHA-256), each atomically."""
        directory.mkdir(parents=True, exist_ok=True)
        settings, scalars, arrays = _hasher_state(self.hasher)
        atomic_write(directory / HASHER_STATE_NAME, lambda p: _save_npz(p, arrays))
        head: dict[str, Any] = {
            "hasher": self.config.head["hasher"],
            "hasher_settings": settings,
            "hasher_state": json.loads(json.dumps(scalars)),
        }
        if self.spec.learns:
            state = pickle.dumps(self.descriptor)
            atomic_write(directory / DESCRIPTOR_STATE_NAME, lambda p: p.write_bytes(state))
            head["descriptor_sha256"] = hashlib.sha256(state).hexdigest()
        save_config(directory, dataclasses.replace(self.config, head=head))
        return directory

    @classmethod
    def load(cls, directory: Path) -> DescriptorEncoder:
        """Rebuild an encoder from a folder written by :meth:`save` (see the module's note on
        the pickle)."""
        config = load_config(directory)
        spec = descriptor_spec(config.backbone, config.bands)
        head = config.head
        name = head.get("hasher")
        if name not in HASHERS:
            raise ValueError(f"{directory}: unknown hasher {name!r}; known: {sorted(HASHERS)}")
        hasher = HASHERS[name](**head["hasher_settings"])
        with np.load(directory / HASHER_STATE_NAME, allow_pickle=False) as arrays:
            for key in arrays.files:
                setattr(hasher, key, arrays[key])
        for key, value in head.get("hasher_state", {}).items():
            setattr(hasher, key, value)
        if not spec.learns:
            return cls(config, spec.factory(), hasher)
        path = directory / DESCRIPTOR_STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint incomplete: {path} is missing")
        state = path.read_bytes()
        if hashlib.sha256(state).hexdigest() != head.get("descriptor_sha256"):
            raise ValueError(
                f"{path} does not match the SHA-256 in {directory / CONFIG_NAME}: "
                "changed after the fit; refusing to unpickle it"
            )
        return cls(config, pickle.loads(state), hasher)

    def summary(self) -> str:
        """The model in one line, e.g. ``lbp ([3] ...) + itq 64-bit codes, 162-d descriptors``."""
        c = self.config
        return (
            f"{c.backbone} ({self.spec.reference}) + {c.head['hasher']} {c.bits}-bit codes, "
            f"{c.descriptor_dim}-d descriptors (fitted without labels)"
        )


def _scaled(pixels: npt.NDArray[np.floating], config: ModelConfig) -> list[npt.NDArray[np.float32]]:
    """The stretch ``clip((x - mean) / std, 0, 1)`` per band, as (H, W, bands) images."""
    low = np.asarray(config.mean, dtype=np.float32)[None, :, None, None]
    width = np.asarray(config.std, dtype=np.float32)[None, :, None, None]
    x = np.clip((np.asarray(pixels, dtype=np.float32) - low) / width, 0.0, 1.0)
    x = np.nan_to_num(x, nan=0.0)  # a NaN (no data in a float upload) as the stretch's low
    return list(np.ascontiguousarray(np.moveaxis(x, 1, -1)))


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
