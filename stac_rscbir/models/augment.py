"""Band-aware data augmentation for multi-sensor remote-sensing tensors (C, H, W) or (B, C, H, W).

Geometric transforms (flips, 90-degree rotations, optional random crop + resize) are valid for
every sensor: the nadir view of the Earth has no canonical "up". Radiometric transforms depend
on the sensor:

* ``"optical"`` (any number of bands, e.g. Sentinel-2's 12): brightness and contrast jitter with
  an independent factor per band, so nothing assumes the bands are R, G, B. No hue or
  saturation jitter: they are only defined for RGB and would mix physically distinct bands.
* ``"rgb"`` (exactly 3 bands): the same jitter, but one factor shared by the three bands by
  default so the colour balance is kept. Still no hue or saturation jitter.
* ``"sar"`` (e.g. Sentinel-1 VV/VH): geometric transforms only. Brightness/contrast jitter is
  refused; the only radiometric option is speckle-like noise that follows the SAR speckle
  model: multiplicative Gamma(L, 1/L) noise (mean 1, L looks) on linear intensities, or its
  exact log-domain form ``10·log10(G)`` added to dB values. Apply it before any z-scoring,
  since the noise is defined in physical units.

All randomness comes from a NumPy generator seeded at construction, so a given seed gives the
same sequence of augmentations. In a multi-worker ``DataLoader`` each worker holds a copy of
the generator: call :meth:`Augment.reseed` from ``worker_init_fn`` (e.g. with
``torch.initial_seed()``) so the workers do not repeat each other. Every sample of a batch gets
its own random draw. Output has the input's shape, dtype and device; integer inputs are
computed in float32, rounded and clamped to their dtype's range.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DIHEDRAL", "Augment", "InUnits", "Sensor", "dihedral"]

Sensor = Literal["optical", "sar", "rgb"]
_DEFAULT_JITTER = 0.2
_UNSIGNED_AS_SIGNED = {
    torch.uint16: torch.int16,
    torch.uint32: torch.int32,
    torch.uint64: torch.int64,
}


def _check_prob(value: float, name: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return float(value)


def _check_jitter(value: float, name: str) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


#: The 8 symmetries of the square (4 rotations, each with and without a left-right flip).
DIHEDRAL: tuple[int, ...] = tuple(range(8))


def dihedral(x: Tensor, k: int) -> Tensor:
    """Transform ``k`` (0-7) of the dihedral group on the last two axes: rotate by ``k % 4``
    quarter turns, then flip left-right when ``k >= 4``; ``k = 0`` is the identity. Exact
    (no resampling), so it applies to images and to feature maps alike."""
    if k not in DIHEDRAL:
        raise ValueError(f"dihedral transform index must be 0-7, got {k!r}")
    out = torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x
    return torch.flip(out, dims=(-1,)) if k >= 4 else out


class Augment:
    """Seeded, sensor-aware augmentation that returns a tensor of the same shape and dtype.

    Args:
        sensor: ``"optical"``, ``"rgb"`` or ``"sar"`` (see the module docstring).
        hflip: probability of a left-right flip.
        vflip: probability of an up-down flip.
        rot90: rotate by a uniform multiple of 90 degrees (only 0/180 for non-square images,
            so the shape is kept).
        crop_scale: ``(min, max)`` area fraction of a random square-proportioned crop that is
            resized back to (H, W) bilinearly; ``None`` disables it.
        brightness: gain jitter, ``x <- x · g`` with ``g ~ U(1 - b, 1 + b)`` (optical/rgb;
            default 0.2; must be 0 or None for SAR).
        contrast: stretch around the band mean, ``x <- (x - mean) · c + mean`` with
            ``c ~ U(1 - c, 1 + c)`` (optical/rgb; default 0.2; must be 0 or None for SAR).
        per_band: independent jitter factors per band (default True for optical, False for
            rgb).
        speckle_looks: SAR only: number of looks L of Gamma speckle noise; ``None`` disables it.
        sar_scale: SAR only: ``"linear"`` intensities (multiplicative noise) or ``"db"``
            (additive noise in dB).
        seed: seed of the NumPy generator (``None``: fresh entropy).
    """

    def __init__(
        self,
        sensor: Sensor = "optical",
        *,
        hflip: float = 0.5,
        vflip: float = 0.5,
        rot90: bool = True,
        crop_scale: tuple[float, float] | None = None,
        brightness: float | None = None,
        contrast: float | None = None,
        per_band: bool | None = None,
        speckle_looks: float | None = None,
        sar_scale: Literal["linear", "db"] = "db",
        seed: int | None = 0,
    ) -> None:
        if sensor not in ("optical", "sar", "rgb"):
            raise ValueError(f"sensor must be 'optical', 'sar' or 'rgb', got {sensor!r}")
        self.sensor: Sensor = sensor
        self.hflip = _check_prob(hflip, "hflip")
        self.vflip = _check_prob(vflip, "vflip")
        self.rot90 = bool(rot90)
        if crop_scale is not None:
            lo, hi = crop_scale
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
            crop_scale = (float(lo), float(hi))
        self.crop_scale = crop_scale
        if sensor == "sar":
            for name, value in (("brightness", brightness), ("contrast", contrast)):
                if value:
                    raise ValueError(
                        f"{name} jitter is not valid for SAR (backscatter is a physical "
                        "quantity, not a colour); SAR gets geometric transforms and optional "
                        "speckle noise only"
                    )
            if per_band:
                raise ValueError("per_band applies to optical jitter, not to SAR")
            self.brightness = self.contrast = 0.0
            self.per_band = False
            if speckle_looks is not None and speckle_looks <= 0:
                raise ValueError(f"speckle_looks must be > 0, got {speckle_looks}")
            if sar_scale not in ("linear", "db"):
                raise ValueError(f"sar_scale must be 'linear' or 'db', got {sar_scale!r}")
        else:
            if speckle_looks is not None:
                raise ValueError("speckle noise is a SAR model; use sensor='sar'")
            b = _DEFAULT_JITTER if brightness is None else brightness
            c = _DEFAULT_JITTER if contrast is None else contrast
            self.brightness = _check_jitter(b, "brightness")
            self.contrast = _check_jitter(c, "contrast")
            self.per_band = (sensor == "optical") if per_band is None else bool(per_band)
        self.speckle_looks = None if speckle_looks is None else float(speckle_looks)
        self.sar_scale = sar_scale
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        """Restart the random stream from ``seed`` (e.g. per DataLoader worker)."""
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def __repr__(self) -> str:
        return (
            f"Augment(sensor={self.sensor!r}, hflip={self.hflip}, vflip={self.vflip}, "
            f"rot90={self.rot90}, crop_scale={self.crop_scale}, brightness={self.brightness}, "
            f"contrast={self.contrast}, per_band={self.per_band}, "
            f"speckle_looks={self.speckle_looks}, sar_scale={self.sar_scale!r})"
        )

    def __call__(self, x: Tensor) -> Tensor:
        """Augment one image (C, H, W) or each image of a batch (B, C, H, W) independently."""
        if not isinstance(x, Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.ndim not in (3, 4):
            raise ValueError(f"expected (C, H, W) or (B, C, H, W), got shape {tuple(x.shape)}")
        if x.dtype == torch.bool or x.is_complex():
            raise ValueError(f"cannot augment a {x.dtype} tensor")
        if self.sensor == "rgb" and x.shape[-3] != 3:
            raise ValueError(f"sensor='rgb' needs 3 bands, got {x.shape[-3]}; use 'optical'")
        if x.ndim == 3:
            return self._one(x)
        return torch.stack([self._one(s) for s in x]) if len(x) else x.clone()

    # ----------------------------------------------------------------------------------------

    def _one(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = self._geometric(x)
        radiometric = self.speckle_looks is not None or self.brightness > 0 or self.contrast > 0
        if self.crop_scale is None and not radiometric:
            return x.contiguous()
        work = x.to(torch.float64 if dtype == torch.float64 else torch.float32)
        if self.crop_scale is not None:
            work = self._crop_resize(work)
        if self.sensor == "sar":
            if self.speckle_looks is not None:
                work = self._speckle(work)
        else:
            work = self._jitter(work)
        return self._cast(work, dtype)

    def _geometric(self, x: Tensor) -> Tensor:
        # flips are permutations: run unsigned types torch cannot flip as same-width signed ints
        unsigned = _UNSIGNED_AS_SIGNED.get(x.dtype)
        if unsigned is not None:
            return self._geometric(x.view(unsigned)).view(x.dtype)
        if self.rng.random() < self.hflip:
            x = torch.flip(x, dims=(-1,))
        if self.rng.random() < self.vflip:
            x = torch.flip(x, dims=(-2,))
        if self.rot90:
            square = x.shape[-1] == x.shape[-2]
            k = int(self.rng.integers(0, 4)) if square else 2 * int(self.rng.integers(0, 2))
            if k:
                x = torch.rot90(x, k, dims=(-2, -1))
        return x

    def _crop_resize(self, x: Tensor) -> Tensor:
        assert self.crop_scale is not None
        h, w = x.shape[-2:]
        scale = self.rng.uniform(*self.crop_scale)
        ch = min(h, max(1, round(h * scale**0.5)))
        cw = min(w, max(1, round(w * scale**0.5)))
        top = int(self.rng.integers(0, h - ch + 1))
        left = int(self.rng.integers(0, w - cw + 1))
        crop = x[:, top : top + ch, left : left + cw]
        if (ch, cw) == (h, w):
            return crop
        return F.interpolate(crop[None], size=(h, w), mode="bilinear", align_corners=False)[0]

    def _factors(self, c: int, amount: float) -> Tensor:
        n = c if self.per_band else 1
        f = self.rng.uniform(1.0 - amount, 1.0 + amount, size=n)
        return torch.as_tensor(np.broadcast_to(f, c).copy())

    def _jitter(self, x: Tensor) -> Tensor:
        c = x.shape[0]
        if self.brightness > 0:
            x = x * self._factors(c, self.brightness).to(x)[:, None, None]
        if self.contrast > 0:
            mean = x.mean(dim=(-2, -1), keepdim=True)
            x = (x - mean) * self._factors(c, self.contrast).to(x)[:, None, None] + mean
        return x

    def _speckle(self, x: Tensor) -> Tensor:
        looks = self.speckle_looks
        assert looks is not None
        g = self.rng.gamma(shape=looks, scale=1.0 / looks, size=tuple(x.shape))
        g = np.maximum(g, np.finfo(np.float64).tiny)  # log10 stays finite
        if self.sar_scale == "linear":
            return x * torch.as_tensor(g).to(x)
        return x + torch.as_tensor(10.0 * np.log10(g)).to(x)

    @staticmethod
    def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
        if dtype.is_floating_point:
            return x.to(dtype).contiguous()
        info = torch.iinfo(dtype)
        return x.round().clamp(info.min, info.max).to(dtype).contiguous()


class InUnits:
    """Apply an augmentation defined in physical units to per-band z-scored tensors.

    ``x -> (augment(x * std + mean) - mean) / std`` per band, so a training loop that feeds
    normalised batches still gets speckle in dB (SAR) or a gain on reflectances (optical), not
    on z-scores. ``mean`` and ``std`` are the normalisation's per-band values.
    """

    def __init__(
        self, augment: Callable[[Tensor], Tensor], mean: Sequence[float], std: Sequence[float]
    ) -> None:
        if len(mean) != len(std) or not len(mean):
            raise ValueError(f"need one mean and one std per band, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {list(std)}")
        self.augment = augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __repr__(self) -> str:
        return f"InUnits({self.augment!r}, bands={len(self.mean)})"

    def __call__(self, x: Tensor) -> Tensor:
        """Augment normalised (C, H, W) or (B, C, H, W) ``x``; same shape and dtype out."""
        if x.shape[-3] != len(self.mean):
            raise ValueError(f"expected {len(self.mean)} bands on axis -3, got {tuple(x.shape)}")
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        physical = x.float() * std + mean
        return ((self.augment(physical) - mean) / std).to(x.dtype)
