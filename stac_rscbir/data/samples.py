"""Unlabelled training samples: chips cut from STAC items, or the images of a plain folder.

What ``stac-rscbir fit``, the demo and ``examples/index_public_stac.py`` fit their models on:

>>> sample = item_chips(items, ("red", "green", "blue"), size=120, max_chips=600, views=True)
>>> sample.pixels.shape  # (N, bands, 120, 120) float32 in the items' physical units
>>> stats = BandStats.fit(sample.pixels, bands)  # per-band mean/std for the model config

Chips are cut as ``ingest`` cuts them (:func:`~stac_rscbir.data.chips.make_chips`: full-size
windows with at least 90 % valid pixels, nodata set to 0), so a model sees at fit time what it
will encode. ``views=True`` gives the 8 flips/rotations of each chip instead (ground scenes have
no preferred orientation, and a small archive still gives ITQ's PCA more samples than code
bits). ``max_chips`` keeps a seeded random subset, chosen before any chip is copied.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pystac

from stac_rscbir.data.chips import Chip, chip_pixels, make_chips
from stac_rscbir.data.profiles import profile_for_bands
from stac_rscbir.data.reader import read_item

__all__ = [
    "IMAGE_SUFFIXES",
    "ChipSample",
    "folder_images",
    "image_files",
    "item_chips",
]

#: Image files a folder source is read from (PIL, converted to RGB).
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp")
#: The 8 dihedral views of a chip: as is or flipped upside down, each turned 0-3 quarter turns.
N_VIEWS = 8


@dataclass
class ChipSample:
    """Training pixels (N, bands, H, W) float32 and where they came from."""

    pixels: npt.NDArray[np.float32]
    #: Chips available before views and ``max_chips`` (items: kept windows; folder: images).
    available: int
    #: Items or files that gave pixels.
    sources: int
    #: ``"<item or file>: <why>"`` for each one skipped (unreadable, no full chip).
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.pixels)


def _select(total: int, max_chips: int | None, views: bool, seed: int) -> list[tuple[int, int]]:
    """(chip, view) pairs of the sample, in the seeded order the demo has always used: a
    permutation of every (chip, view), cut at ``max_chips``; view 0 only without ``views``."""
    per = N_VIEWS if views else 1
    order = np.random.default_rng(seed).permutation(total * per)
    if max_chips is not None:
        order = order[:max_chips]
    return [(int(i) // per, int(i) % per) for i in order]


def _view(chip: np.ndarray, view: int) -> np.ndarray:
    """View ``view`` (0-7) of a (bands, H, W) chip: (flipped if view >= 4) turned view % 4."""
    mirrored = chip[:, ::-1] if view // 4 else chip
    return np.rot90(mirrored, view % 4, axes=(1, 2))


def item_chips(
    items: Iterable[pystac.Item],
    bands: Sequence[str],
    size: int,
    *,
    max_chips: int | None = None,
    views: bool = False,
    seed: int = 0,
    min_valid: float = 0.9,
    strict: bool = True,
    progress: Callable[[Iterable[pystac.Item]], Iterable[pystac.Item]] | None = None,
) -> ChipSample:
    """Chips of ``bands`` cut from ``items`` (``size`` x ``size``, as ``ingest`` cuts them).

    ``strict`` raises (:class:`~stac_rscbir.data.reader.ItemReadError` and the like) for an
    unreadable item; otherwise it is skipped and listed in ``skipped``. ``ValueError`` for
    bands no sensor profile knows. ``progress`` wraps the item iterable (e.g. ``tqdm``).
    """
    if size < 1:
        raise ValueError(f"chip size must be positive, got {size}")
    profile = profile_for_bands(bands)
    scenes: list[np.ndarray] = []
    windows: list[tuple[int, Chip]] = []  # (scene index, chip)
    skipped: list[str] = []
    for item in progress(items) if progress else items:
        try:
            px = read_item(item, profile)
        except Exception as err:  # one broken item need not stop a lenient sample
            if strict:
                raise
            skipped.append(f"{item.id}: {err}")
            continue
        try:
            kept, _ = make_chips(px.valid, px.transform, px.crs, size, min_valid=min_valid)
        except ValueError as err:  # a scene smaller than a chip
            skipped.append(f"{item.id}: {err}")
            continue
        if not kept:
            skipped.append(f"{item.id}: no {size} px chip with {min_valid:.0%} valid pixels")
            continue
        windows += [(len(scenes), chip) for chip in kept]
        scenes.append(px.data)
    chosen = _select(len(windows), max_chips, views, seed)
    out = np.empty((len(chosen), len(profile.bands), size, size), np.float32)
    for row, (i, view) in enumerate(chosen):
        scene, chip = windows[i]
        out[row] = np.nan_to_num(_view(chip_pixels(scenes[scene], chip), view))
    return ChipSample(out, len(windows), len(scenes), skipped)


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted); FileNotFoundError for no folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def folder_images(
    folder: Path,
    size: int | None = None,
    *,
    max_chips: int | None = None,
    views: bool = False,
    seed: int = 0,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> ChipSample:
    """RGB images of a folder as (N, 3, H, W) float32 in raw 0-255 units.

    Images are resized (bilinear) to ``size`` x ``size``; with ``size`` None they are kept as
    they are when all have one square size, else resized to 120 px. ``ValueError`` for a folder
    without images; unreadable files are skipped and listed. Only the chosen images are read,
    each kept at the output size.
    """
    from PIL import Image, UnidentifiedImageError

    files = image_files(folder)
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    chosen = _select(len(files), max_chips, views, seed)
    wanted = sorted({i for i, _ in chosen})
    skipped: list[str] = []
    if size is None:  # image headers only
        shapes = set()
        for i in wanted:
            try:
                with Image.open(files[i]) as img:
                    shapes.add(img.size)
            except (OSError, UnidentifiedImageError):
                pass  # reported below, when it is read
        (w, h), *_ = shapes or {(0, 0)}
        size = h if len(shapes) == 1 and h == w else 120
    images: dict[int, np.ndarray] = {}  # (size, size, 3) uint8
    for i in progress(wanted) if progress else wanted:
        try:
            with Image.open(files[i]) as img:
                rgb = img.convert("RGB")
                if rgb.size != (size, size):
                    rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
                images[i] = np.asarray(rgb, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as err:
            skipped.append(f"{files[i]}: {err}")
    if not images:
        raise ValueError(f"none of the {len(files)} image files under {folder} could be read")
    kept = [(i, view) for i, view in chosen if i in images]
    pixels = np.empty((len(kept), 3, size, size), np.float32)
    for row, (i, view) in enumerate(kept):
        pixels[row] = _view(np.moveaxis(images[i], -1, 0), view)
    return ChipSample(pixels, len(files), len(images), skipped)
