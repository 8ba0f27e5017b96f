"""[4] Bag of spectral values (Dai, Zhang, Guo & Fan 2018, "A novel system for content-based
retrieval of single and multi-label high-dimensional remote sensing images", IEEE JSTARS).

Each pixel's spectral vector x_i in R^B (all B bands) is a "word": a codebook {c_1 .. c_K} is
learnt by k-means on pixels sampled from the training images, each pixel is quantised to its
nearest codeword, q(x_i) = argmin_k ||x_i - c_k||_2, and the image is the normalised histogram

    h_k = |{i : q(x_i) = k}| / n_pixels,   k = 1 .. K,

the bag of spectral values. Spectral by construction, it works on any number of bands (3 for RGB,
12 for Sentinel-2). sklearn's MiniBatchKMeans learns the codebook; the histogram is written here.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from sklearn.cluster import MiniBatchKMeans

from stac_rscbir.descriptors.base import DescriptorSpec, Images


class BagOfSpectralValues:
    """K-word spectral codebook (k-means on training pixels) and per-image word histograms."""

    def __init__(self, words: int = 128, pixels_per_image: int = 256, seed: int = 0) -> None:
        self.words = words
        self.pixels_per_image = pixels_per_image
        self.seed = seed
        self.codebook_: npt.NDArray[np.float32] | None = None

    def fit(
        self, images: Images, labels: npt.NDArray[np.int64] | None = None
    ) -> BagOfSpectralValues:
        """Learn the codebook from ``pixels_per_image`` random pixels of each training image."""
        rng = np.random.default_rng(self.seed)
        samples = []
        for img in images:
            pixels = img.reshape(-1, img.shape[2])
            take = min(self.pixels_per_image, len(pixels))
            samples.append(pixels[rng.choice(len(pixels), take, replace=False)])
        data = np.concatenate(samples).astype(np.float32)
        if len(data) < self.words:
            raise ValueError(f"{len(data)} training pixels for {self.words} codewords")
        kmeans = MiniBatchKMeans(self.words, random_state=self.seed, n_init=3, batch_size=4096)
        self.codebook_ = kmeans.fit(data).cluster_centers_.astype(np.float32)
        return self

    def histogram(self, image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The normalised word histogram of one (H, W, B) image."""
        if self.codebook_ is None:
            raise RuntimeError("fit the codebook first")
        pixels = image.reshape(-1, image.shape[2]).astype(np.float32)
        if pixels.shape[1] != self.codebook_.shape[1]:
            raise ValueError(
                f"image has {pixels.shape[1]} bands, codebook {self.codebook_.shape[1]}"
            )
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; the ||x||^2 term does not change the argmin
        dist = (self.codebook_**2).sum(axis=1) - 2.0 * pixels @ self.codebook_.T
        hist = np.bincount(dist.argmin(axis=1), minlength=len(self.codebook_))
        return (hist / len(pixels)).astype(np.float32)

    def transform(self, images: Images) -> npt.NDArray[np.float32]:
        """(n, K) histograms."""
        return np.stack([self.histogram(img) for img in images])


SPEC = DescriptorSpec(
    name="bosv",
    reference="[4] Dai et al. 2018, bag of spectral values for high-dimensional RS images",
    factory=BagOfSpectralValues,
    input_size=128,
    learns=True,
    any_bands=True,
)
