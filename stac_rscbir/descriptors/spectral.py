"""[4] Bag of spectral values (O. E. Dai, B. Demir, B. Sankur & L. Bruzzone 2018, "A novel system
for content-based retrieval of single and multi-label high-dimensional remote sensing images",
IEEE JSTARS 11(7):2473-2490; the survey's [4]), and its multi-label part, the sparse-reconstruction
label likelihoods (:func:`label_likelihoods`).

Each pixel's spectral vector x_i in R^B (all B bands) is a "word": a codebook {c_1 .. c_K} is
learnt by k-means on pixels sampled from the training images, each pixel is quantised to its
nearest codeword, q(x_i) = argmin_k ||x_i - c_k||_2, and the image is the normalised histogram

    h_k = |{i : q(x_i) = k}| / n_pixels,   k = 1 .. K,

the bag of spectral values. Spectral by construction, it works on any number of bands (3 for RGB,
12 for Sentinel-2). sklearn's MiniBatchKMeans learns the codebook; the histogram is written here.
"""

from __future__ import annotations

import warnings

import numpy as np
import numpy.typing as npt
from sklearn.cluster import MiniBatchKMeans
from sklearn.linear_model import orthogonal_mp

from stac_rscbir.descriptors.base import DescriptorSpec, Images, unit_rows


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


def label_likelihoods(
    x: npt.ArrayLike,
    atoms: npt.ArrayLike,
    atom_labels: npt.ArrayLike,
    nonzero: int = 5,
    exclude: npt.ArrayLike | None = None,
) -> npt.NDArray[np.float64]:
    """[4]'s multi-label step: each row of ``x`` reconstructed sparsely from the labelled
    ``atoms`` (the training images' descriptors), and one likelihood per label from the atoms of
    that label, (n, L) in [0, 1].

    With the rows and atoms L2-normalised (``D`` the atoms as columns, ``||x|| = 1``), the sparse
    code is Orthogonal Matching Pursuit's (``sklearn.linear_model.orthogonal_mp``)

        alpha = argmin_a ||x - D a||_2  subject to  ||a||_0 <= nonzero,

    the residual of label l keeps only the coefficients of the atoms carrying l
    (``y_l`` their 0/1 indicator, as in sparse-representation classification)

        r_l(x) = ||x - D (alpha * y_l)||_2,

    and the likelihood is the share of the query the label's atoms explain,

        p_l(x) = max(0, 1 - r_l(x))   (r_l = ||x|| = 1 when no atom of l is used: p_l = 0).

    Assumed, as the paper's exact likelihood normalisation is not reproduced here: this residual
    to likelihood map and ``nonzero``. ``exclude[i]`` names an atom row ``i`` may not use (its own
    entry when the described image is itself an atom: leave-one-out), -1 for none. A zero row
    (no descriptor) gets all-zero likelihoods."""
    queries = unit_rows(np.asarray(x, dtype=np.float64))
    dictionary = unit_rows(np.asarray(atoms, dtype=np.float64)).T  # (d, N) unit columns
    labels = np.asarray(atom_labels, dtype=np.float64)
    if labels.ndim != 2 or len(labels) != dictionary.shape[1]:
        raise ValueError(f"atom_labels must be ({dictionary.shape[1]}, L), got {labels.shape}")
    skip = np.full(len(queries), -1) if exclude is None else np.asarray(exclude, dtype=np.int64)
    out = np.zeros((len(queries), labels.shape[1]))
    for i, (query, own) in enumerate(zip(queries, skip, strict=True)):
        keep = np.flatnonzero(np.arange(dictionary.shape[1]) != own)
        k = min(nonzero, len(keep), dictionary.shape[0])
        if not query.any() or k == 0:
            continue
        alpha = np.zeros(dictionary.shape[1])
        with warnings.catch_warnings():  # OMP stopping early (nothing left to explain) is fine
            warnings.simplefilter("ignore", RuntimeWarning)
            alpha[keep] = orthogonal_mp(dictionary[:, keep], query, n_nonzero_coefs=k)
        partial = dictionary @ (alpha[:, None] * labels)  # (d, L): D (alpha * y_l) per label
        residual = np.linalg.norm(query[:, None] - partial, axis=0)
        out[i] = np.maximum(0.0, 1.0 - residual)
    return out


def likelihood_distance(
    query_p: npt.ArrayLike,
    db_p: npt.ArrayLike,
    query_x: npt.ArrayLike,
    db_x: npt.ArrayLike,
    tie: float = 1e-3,
) -> npt.NDArray[np.float64]:
    """The (Q, N) ranking distance of the multi-label retrieval: the cosine distance between
    label likelihood vectors, ``1 - p(q).p(a) / (||p(q)|| ||p(a)||)`` (1 where either is all
    zero; the cosine, as likelihoods from a few atoms are small fractions and an archive image's
    vector may be its 0/1 labels), with ties (images of the same label profile) broken by the
    descriptors' Euclidean distance, weighted by ``tie`` (small: it only orders equals)."""
    p, q = unit_rows(np.asarray(query_p, np.float64)), unit_rows(np.asarray(db_p, np.float64))
    left, right = np.asarray(query_x, np.float64), np.asarray(db_x, np.float64)
    squared = (left**2).sum(1)[:, None] - 2.0 * left @ right.T + (right**2).sum(1)[None, :]
    return 1.0 - p @ q.T + tie * np.sqrt(np.maximum(squared, 0.0))


SPEC = DescriptorSpec(
    name="bosv",
    reference="[4] Dai et al. 2018, bag of spectral values for high-dimensional RS images",
    factory=BagOfSpectralValues,
    input_size=128,
    learns=True,
    any_bands=True,
    histogram=True,
)
