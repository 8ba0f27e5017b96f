"""[3] Local binary patterns for remote-sensing image retrieval (Tekeste & Demir 2018,
"Advanced local binary patterns for remote sensing image retrieval", IGARSS 2018).

The LBP code of a pixel with grey level g_c and P neighbours g_p on a circle of radius R is

    LBP_{P,R} = sum_{p=0}^{P-1} s(g_p - g_c) 2^p,   s(x) = 1 if x >= 0 else 0.

The rotation-invariant uniform variant (``uniform``, LBP^{riu2}) maps every pattern with at most
two 0/1 transitions around the circle, U <= 2, to its number of ones (0..P) and all others to
P + 1: P + 2 bins. ``nri_uniform`` keeps the uniform patterns apart per rotation
(P (P - 1) + 3 bins). The image descriptor is the histogram of codes, for each (P, R) of a
multi-resolution set and for each band (the paper's per-band texture of multispectral images),
each histogram normalised to sum 1, concatenated and scaled to sum 1 overall.

skimage.feature.local_binary_pattern computes the codes; the histograms are written here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from skimage.feature import local_binary_pattern

from stac_rscbir.descriptors.base import DescriptorSpec, Images

SCALES: tuple[tuple[int, float], ...] = ((8, 1.0), (16, 2.0), (24, 3.0))


def n_bins(points: int, method: str) -> int:
    """How many distinct codes ``method`` gives for ``points`` neighbours."""
    if method == "uniform":
        return points + 2
    if method == "nri_uniform":
        return points * (points - 1) + 3
    raise ValueError(f"unknown LBP method {method!r}; choose 'uniform' or 'nri_uniform'")


class LBPHistogram:
    """Multi-radius, per-band LBP histograms (fixed: :meth:`fit` learns nothing)."""

    def __init__(
        self, scales: Sequence[tuple[int, float]] = SCALES, method: str = "uniform"
    ) -> None:
        for points, _ in scales:
            n_bins(points, method)  # validates method
        self.scales = tuple(scales)
        self.method = method

    def fit(self, images: Images, labels: npt.NDArray[np.int64] | None = None) -> LBPHistogram:
        """Nothing to learn: LBP histograms are fixed."""
        return self

    def describe(self, image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The concatenated, L1-normalised histograms of one (H, W, B) image."""
        levels = np.rint(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
        parts = []
        for band in range(levels.shape[2]):
            for points, radius in self.scales:
                codes = local_binary_pattern(levels[:, :, band], points, radius, self.method)
                bins = n_bins(points, self.method)
                hist = np.bincount(codes.astype(np.int64).ravel(), minlength=bins)
                parts.append(hist / hist.sum())
        out = np.concatenate(parts)
        return (out / len(parts)).astype(np.float32)

    def transform(self, images: Images) -> npt.NDArray[np.float32]:
        """(n, B * sum of bins) descriptors."""
        return np.stack([self.describe(img) for img in images])


SPEC = DescriptorSpec(
    name="lbp",
    reference="[3] Tekeste & Demir 2018, local binary patterns for RS image retrieval",
    factory=LBPHistogram,
    input_size=256,
    learns=False,
    any_bands=True,
)
