"""How a chip (or a scene) looks: the one renderer of thumbnails, quicklooks and contact sheets.

numpy and Pillow only (no rasterio, no torch), so the API can import it. A :class:`Look` is
fixed once per scene from all its valid pixels and then applied to each of its chips, so the
chips of a scene share one colour scale (a chip of water is not stretched to look like land):

* optical (bands with the common names red, green, blue): true colour, each band stretched
  linearly from its 2nd to its 98th percentile over the scene's valid pixels (per band: this
  also removes the blue haze cast of top-of-atmosphere scenes), then a gamma that lifts a dark
  scene's median to :data:`TARGET_MEDIAN` (never darkens: gamma <= 1);
* SAR (VV and VH backscatter in dB, as the reader gives them to models): false colour
  red = VV, green = VH, blue = VV - VH, each over the fixed range of :data:`SAR_RANGES_DB`,
  so scenes compare across dates;
* nodata (invalid or non-finite pixels) is transparent: RGBA with alpha 0.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "PERCENTILES",
    "QUICKLOOK_SIZE",
    "SAR_RANGES_DB",
    "TARGET_MEDIAN",
    "Look",
    "chip_slices",
    "png_bytes",
]

#: The optical stretch's percentiles of each band's valid pixels.
PERCENTILES: tuple[float, float] = (2.0, 98.0)
#: A stretched scene whose median brightness is below this gets a gamma that lifts it here.
TARGET_MEDIAN: float = 0.4
#: Smallest gamma applied (the strongest brightening).
MIN_GAMMA: float = 0.5
#: Fixed display ranges in dB of the SAR false colour channels (red, green, blue).
SAR_RANGES_DB: dict[str, tuple[float, float]] = {
    "VV": (-25.0, 0.0),
    "VH": (-30.0, -5.0),
    "VV-VH": (0.0, 15.0),
}
#: Longest side in pixels of a scene quicklook.
QUICKLOOK_SIZE: int = 512
#: Most valid pixels the percentiles are taken from (an even subsample of a bigger scene).
MAX_SAMPLES: int = 1 << 20


class _Band(Protocol):
    """What the renderer needs of a band (a :class:`~stac_rscbir.data.profiles.BandSpec`)."""

    name: str
    common_name: str | None
    polarization: str | None


def _find(bands: Sequence[_Band], wanted: Sequence[str], attr: str) -> tuple[int, ...] | None:
    """Indices of the bands whose ``attr`` (or name) is each of ``wanted``; None if one lacks."""
    found = []
    for want in wanted:
        hits = [
            i
            for i, b in enumerate(bands)
            if want.lower() in {str(getattr(b, attr, None) or "").lower(), b.name.lower()}
        ]
        if not hits:
            return None
        found.append(hits[0])
    return tuple(found)


def _valid(data: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return np.asarray(valid, dtype=bool) & np.isfinite(data).all(axis=0)


@dataclass(frozen=True)
class Look:
    """A fixed rendering: which bands make red, green and blue, and how their values map to
    [0, 1] (``lo`` -> 0, ``hi`` -> 1, clipped, then ``** gamma``)."""

    kind: str  # "optical" or "sar"
    bands: tuple[int, ...]  # optical: red, green, blue; SAR: VV, VH
    lo: tuple[float, float, float]
    hi: tuple[float, float, float]
    gamma: float = 1.0

    @classmethod
    def of(cls, data: npt.ArrayLike, valid: npt.ArrayLike, bands: Sequence[_Band]) -> Look | None:
        """The look of a scene (``data`` (bands, H, W) in ``bands``' order, ``valid`` (H, W)):
        SAR when it has VV and VH, else optical when it has red, green and blue, else None (no
        band to show)."""
        sar = _find(bands, ("VV", "VH"), "polarization")
        if sar is not None:
            ranges = [SAR_RANGES_DB[k] for k in ("VV", "VH", "VV-VH")]
            lo, hi = zip(*ranges, strict=True)
            return cls("sar", sar, lo, hi)  # type: ignore[arg-type]
        rgb = _find(bands, ("red", "green", "blue"), "common_name")
        if rgb is None:
            return None
        return cls.optical(np.asarray(data)[list(rgb)], valid, rgb)

    @classmethod
    def optical(
        cls, rgb: npt.ArrayLike, valid: npt.ArrayLike, bands: tuple[int, ...] = (0, 1, 2)
    ) -> Look:
        """The percentile stretch (and gamma) of red, green, blue pixels (3, H, W)."""
        rgb = np.asarray(rgb)
        values = rgb[:, _valid(rgb, np.asarray(valid))]
        step = max(1, -(-values.shape[1] // MAX_SAMPLES))  # a whole S2 tile: every 115th pixel
        values = values[:, ::step].astype(np.float64)
        if values.shape[1] == 0:
            return cls("optical", bands, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        lo, hi = np.percentile(values, PERCENTILES, axis=1)
        hi = np.where(hi > lo, hi, lo + 1.0)
        stretched = np.clip((values - lo[:, None]) / (hi - lo)[:, None], 0.0, 1.0)
        median = float(np.median(stretched.mean(axis=0)))
        gamma = 1.0
        if 0.0 < median < TARGET_MEDIAN:
            gamma = max(MIN_GAMMA, float(np.log(TARGET_MEDIAN) / np.log(median)))
        return cls("optical", bands, tuple(lo.tolist()), tuple(hi.tolist()), gamma)

    def channels(self, data: np.ndarray) -> np.ndarray:
        """The three display channels (3, H, W) of ``data`` (bands, H, W), before scaling."""
        picked = np.asarray(data, dtype=np.float64)[list(self.bands)]
        if self.kind == "sar":
            vv, vh = picked
            return np.stack([vv, vh, vv - vh])
        return picked

    def rgba(self, data: npt.ArrayLike, valid: npt.ArrayLike) -> np.ndarray:
        """(H, W, 4) uint8 of ``data`` (bands, H, W): invalid pixels are transparent."""
        rgb = self.channels(np.asarray(data))
        mask = _valid(rgb, np.asarray(valid))
        lo = np.asarray(self.lo)[:, None, None]
        hi = np.asarray(self.hi)[:, None, None]
        scaled = np.clip((np.nan_to_num(rgb) - lo) / (hi - lo), 0.0, 1.0) ** self.gamma
        out = np.empty((*rgb.shape[1:], 4), dtype=np.uint8)
        out[..., :3] = np.moveaxis((scaled * 255).round(), 0, -1).astype(np.uint8)
        out[..., :3] *= mask[..., None]
        out[..., 3] = np.where(mask, 255, 0)
        return out

    def quicklook(self, data: npt.ArrayLike, valid: npt.ArrayLike) -> np.ndarray:
        """:meth:`rgba` of every k-th row and column, so the longest side is at most
        :data:`QUICKLOOK_SIZE` (a whole scene is never converted at full size)."""
        data, valid = np.asarray(data), np.asarray(valid)
        step = max(1, -(-max(valid.shape) // QUICKLOOK_SIZE))
        return self.rgba(data[:, ::step, ::step], valid[::step, ::step])


def png_bytes(rgba: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3|4) uint8 image."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="PNG")
    return buffer.getvalue()


def chip_slices(
    props: dict[str, Any], transform: Any, shape: tuple[int, int]
) -> tuple[slice, slice] | None:
    """(rows, cols) of a chip in a grid (``transform``: an affine.Affine, ``shape``: (H, W)),
    from the chip's own grid (``proj:transform``, ``proj:shape``); None without them or when
    the chip lies outside the grid. Works whatever grid the scene was read on."""
    from affine import Affine

    grid, size = props.get("proj:transform"), props.get("proj:shape")
    if not grid or not size:
        return None
    xs, ys = Affine(*grid[:6]) @ (np.array([0, size[1]]), np.array([0, size[0]]))
    cols, rows = ~transform @ (xs, ys)
    r0, r1 = (int(np.clip(round(v), 0, shape[0])) for v in sorted(rows))
    c0, c1 = (int(np.clip(round(v), 0, shape[1])) for v in sorted(cols))
    return (slice(r0, r1), slice(c0, c1)) if r1 > r0 and c1 > c0 else None
