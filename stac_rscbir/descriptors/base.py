"""The contract of the survey's traditional descriptors (Sumbul, Kang & Demir, section 2):
image pixels -> one float vector per image.

A descriptor has explicit phases, as FAISS's indexes do: :meth:`Descriptor.fit` on training
images (a visual vocabulary, a spectral codebook; nothing for fixed descriptors such as LBP
histograms), then :meth:`Descriptor.transform` of any images to an (n, d) float32 array. Images
are (H, W, B) float32 arrays scaled to [0, 1], B bands (3 for AID's RGB, 12 for BigEarthNet
Sentinel-2), as :func:`load_image` reads them. The float vectors go where any descriptor goes:
the benchmark's float rows, ITQ/LSH codes, the index's re-rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

from stac_rscbir.eval.metrics import DistanceFn

Images = Sequence[npt.NDArray[np.float32]]  # (H, W, B) in [0, 1]


class Descriptor(Protocol):
    """Fit on training images (labels where the paper's method uses them), then describe."""

    def fit(self, images: Images, labels: npt.NDArray[np.int64] | None = None) -> Descriptor: ...

    def transform(self, images: Images) -> npt.NDArray[np.float32]: ...


@dataclass(frozen=True)
class DescriptorSpec:
    """A named descriptor method of the benchmark table (``--method NAME``)."""

    name: str
    reference: str  # the survey's reference: "[3] Tekeste & Demir 2018, ..."
    factory: Callable[[], Descriptor]
    input_size: int  # images are resized to input_size x input_size before description
    learns: bool  # fit() reads the training images (a vocabulary, a codebook)
    any_bands: bool  # works on B bands (True) or needs RGB (False)
    # the method's own (Q, N) distance between descriptor rows, where the paper ranks by one
    # (class-probability weights, query expansion, affinity fusion, set matching); None: L2
    distance: DistanceFn | None = None
    # the name of the spec whose cached descriptors this one ranks (an ablation of its distance:
    # same factory and input size), so both rows share one computation; None: its own
    descriptors_of: str | None = None
    # a fusion of other methods: its row is their rows side by side, each computed (and cached)
    # as its own method, so the fusion costs only its distance
    parts: tuple[DescriptorSpec, ...] = ()
    # its rows go through the shallow hashers (ITQ, LSH, ...); False where they are codes
    # already, or another method's rows, or mean nothing outside the method's own distance
    hashable: bool = True
    # its rows are bag-of-words histograms, the word counts pLSH [23] models
    histogram: bool = False
    # fit() needs the training images' labels (a fine-tuned or metric-learnt network)
    supervised: bool = False


def load_image(path: str | Path, size: int) -> npt.NDArray[np.float32]:
    """An RGB image file as (size, size, 3) float32 in [0, 1] (bilinear resize)."""
    with Image.open(path) as img:
        rgb = img.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.float32) / 255.0


def unit_rows(x: npt.NDArray[np.floating], axis: int = -1) -> npt.NDArray[np.floating]:
    """``x`` scaled to unit L2 norm along ``axis`` (zero vectors stay zero)."""
    norms = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def gray(image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The mean over bands: the single-band view of descriptors defined on grey levels."""
    return image.mean(axis=2, dtype=np.float32)
