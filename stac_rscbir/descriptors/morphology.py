"""[2] Aptoula 2014, "Remote sensing image retrieval with global morphological texture
descriptors", IEEE TGRS 52(5): a global morphological size distribution (pattern spectrum) of a
grey image.

What is implemented is the granulometric pattern spectrum that [2]'s morphological texture
descriptors build on: a granulometry is a family of openings ``gamma_l`` removing ever larger
bright structures (l_1 < l_2 < ...), and its pattern spectrum is the volume each step removes,
i.e. the distribution of the image content over sizes. Size is measured by area (attribute
openings: the area of a connected component of an upper level set, so no structuring-element
shape is imposed), as in the area pattern spectra that Aptoula and co-authors later applied to
retrieval (Bosilj, Aptoula, Lefevre & Kijak 2016, ISPRS IJGI 5(12):228). With ``gamma_l`` the
area opening of threshold ``l`` (components of area < l lowered,
``skimage.morphology.area_opening``):

    PS_open(i)  = ( sum_x gamma_{l_{i-1}}(f)(x) - sum_x gamma_{l_i}(f)(x) ) / V(f),  gamma_{l_0} = f
    PS_close(i) = ( sum_x phi_{l_i}(f)(x) - sum_x phi_{l_{i-1}}(f)(x) ) / V(f*)

with ``phi_l`` the area closing (the antigranulometry: dark structures), ``f* = max f - f``,
``V(f) = sum_x (f(x) - min f)`` and a last open-ended bin (areas >= the largest threshold), so
each half sums to 1 (scale- and contrast-normalised). The thresholds are powers of two,
``l_i = 2^i``. The descriptor is ``[PS_open, PS_close]``.

All openings at once: the max-tree of ``f`` (``skimage.morphology.max_tree``) holds every
connected component of every upper level set; an area opening of threshold ``l`` lowers each
node of area < l to its parent's level, removing ``area(node) * (f(node) - f(parent))`` of
volume. So the spectrum is one pass over the tree: each node's volume goes into its area's bin
(the exact equality with the differences of ``area_opening`` is tested). The closings are the
openings of the negative. Computed on the grey view (the band mean: a grey-level texture
description), quantised to 256 levels, 4-connectivity. At 128 px (the SPEC's input
size; the max-tree is ~90 % of the cost, ~0.02 s per image against ~0.13 s at 256 px, and on a
300-image AID sample 128 px ranked no worse) the 14 scales reach the whole image.

Left out: [2]'s own covariance-based descriptors (the circular covariance histogram and the
rotation-invariant point-wise covariance) are not implemented here.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from skimage.morphology import max_tree

from stac_rscbir.descriptors.base import DescriptorSpec, Images, gray


def opening_spectrum(
    image: npt.NDArray[np.uint8], edges: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    """The area-opening pattern spectrum of a 2-D integer image: ``len(edges) + 1`` bins, bin i
    the volume of the components of area in ``[edges[i-1], edges[i])`` (bin 0: area < edges[0],
    the last: area >= edges[-1]), divided by ``sum(f - min f)``; zeros for a flat image."""
    parent, order = max_tree(image, connectivity=1)
    par = parent.ravel()
    levels = image.ravel().astype(np.int64)
    area = np.ones(par.size, dtype=np.int64).tolist()
    par_list = par.tolist()
    for q in order[:0:-1].tolist():  # leaves to root; order[0] is the root
        area[par_list[q]] += area[q]
    area_arr = np.asarray(area, dtype=np.int64)
    volume = area_arr * (levels - levels[par])  # non-canonical pixels and the root: 0
    spectrum = np.bincount(
        np.searchsorted(edges, area_arr, side="right"), weights=volume, minlength=len(edges) + 1
    )
    total = spectrum.sum()
    return spectrum / total if total > 0 else spectrum


class PatternSpectrum:
    """Area pattern spectra of openings and closings on the grey view; fixed (no fit)."""

    def __init__(self, scales: int = 14) -> None:
        self.edges = 2 ** np.arange(1, scales + 1, dtype=np.int64)

    def fit(self, images: Images, labels: npt.NDArray[np.int64] | None = None) -> PatternSpectrum:
        return self

    def describe(self, image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """One image's ``[PS_open, PS_close]`` (2 * (scales + 1) values)."""
        grey = np.clip(np.rint(gray(image) * 255.0), 0, 255).astype(np.uint8)
        return np.concatenate(
            [opening_spectrum(grey, self.edges), opening_spectrum(255 - grey, self.edges)]
        ).astype(np.float32)

    def transform(self, images: Images) -> npt.NDArray[np.float32]:
        return np.stack([self.describe(image) for image in images])


SPEC = DescriptorSpec(
    name="morph-ps",
    reference="[2] Aptoula 2014, global morphological texture descriptors (area pattern spectra)",
    factory=PatternSpectrum,
    input_size=128,
    learns=False,
    any_bands=True,
)
