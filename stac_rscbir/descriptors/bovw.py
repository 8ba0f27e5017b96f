"""[1] Yang & Newsam 2013, "Geographic image retrieval using local invariant features", IEEE
TGRS 51(2): a bag of visual words of SIFT descriptors.

Local SIFT descriptors (``cv2.SIFT_create``) are quantised against a visual vocabulary of K words,
the k-means centroids of descriptors sampled from the training images
(``sklearn.cluster.MiniBatchKMeans``); an image becomes its word-count histogram ``n_id``
(:meth:`SiftBoVW.counts`, non-negative, for the histogram hashers such as [23] pLSH), weighted by
tf-idf as in the paper (after Sivic & Zisserman's video Google):

    t_id = (n_id / n_d) * log(N / n_i)

with ``n_d`` the image's number of descriptors, ``N`` the number of training images and ``n_i``
the number of training images containing word i (``max(n_i, 1)``), then L2-normalised so that
Euclidean distance ranks as cosine similarity does.

The paper extracts SIFT both at difference-of-Gaussian keypoints (saliency-based) and on a
regular grid; the default here is the grid (``keypoints="dense"``: a descriptor every ``step``
pixels, of support ``patch``), a fixed number of descriptors per image at about the cost of DoG
detection, which also never leaves an image without words; ``keypoints="dog"`` is the other.
SIFT runs on the grey view (8-bit band mean). The SPEC's 256 px image with a 16 px step and
16 px support gives a 16 x 16 grid of words at ~0.03 s per image (SIFT's cost grows with
descriptors x support area: an 8 px step costs ~3x for no gain on an AID sample).
"""

from __future__ import annotations

import cv2
import numpy as np
import numpy.typing as npt
from sklearn.cluster import MiniBatchKMeans

from stac_rscbir.descriptors.base import DescriptorSpec, Images, gray, unit_rows


def tfidf(counts: npt.NDArray[np.float64], idf: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """``t_id = (n_id / n_d) * idf_i``, each row L2-normalised (rows without words stay zero)."""
    totals = counts.sum(axis=1, keepdims=True)
    weighted = counts / np.maximum(totals, 1.0) * idf
    return unit_rows(weighted).astype(np.float32)


def inverse_document_frequency(counts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """``idf_i = log(N / max(n_i, 1))`` over the N rows of a count matrix."""
    present = (counts > 0).sum(axis=0)
    return np.log(counts.shape[0] / np.maximum(present, 1))


class SiftBoVW:
    """SIFT bag of visual words with a k-means vocabulary and tf-idf weights."""

    def __init__(
        self,
        words: int = 500,
        keypoints: str = "dense",
        step: int = 16,
        patch: int = 16,
        sample: int = 100_000,
        seed: int = 0,
    ) -> None:
        if keypoints not in ("dense", "dog"):
            raise ValueError(f"keypoints must be 'dense' or 'dog', not {keypoints!r}")
        self.words, self.keypoints, self.step, self.patch = words, keypoints, step, patch
        self.sample, self.seed = sample, seed
        self._sift = cv2.SIFT_create()
        self.kmeans: MiniBatchKMeans | None = None
        self.idf: npt.NDArray[np.float64] | None = None

    def __getstate__(self) -> dict[str, object]:
        """Picklable, so a fitted vocabulary saves in a checkpoint: cv2's SIFT object is not,
        and holds no fitted state, so it is left out and made again on load."""
        state = self.__dict__.copy()
        del state["_sift"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._sift = cv2.SIFT_create()

    def local_descriptors(self, image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """The image's SIFT descriptors, (m, 128) float32 (m = 0 where DoG finds no keypoint)."""
        grey = np.clip(np.rint(gray(image) * 255.0), 0, 255).astype(np.uint8)
        if self.keypoints == "dense":
            h, w = grey.shape
            half = self.step // 2
            points = [
                cv2.KeyPoint(float(x), float(y), float(self.patch))
                for y in range(half, h, self.step)
                for x in range(half, w, self.step)
            ]
            _, desc = self._sift.compute(grey, points)
        else:
            _, desc = self._sift.detectAndCompute(grey, None)
        return np.zeros((0, 128), np.float32) if desc is None else desc.astype(np.float32)

    def fit(self, images: Images, labels: npt.NDArray[np.int64] | None = None) -> SiftBoVW:
        """The vocabulary from up to ``sample`` descriptors drawn evenly over the training images,
        then the idf of the training images' counts (a second SIFT pass: memory stays at the
        sample)."""
        rng = np.random.default_rng(self.seed)
        per_image = max(1, -(-self.sample // max(len(images), 1)))
        drawn = []
        for image in images:  # a sample per image: all of AID's dense SIFT would be gigabytes
            desc = self.local_descriptors(image)
            keep = (
                desc
                if len(desc) <= per_image
                else desc[rng.choice(len(desc), per_image, replace=False)]
            )
            drawn.append(keep)
        pool = np.concatenate(drawn)
        if len(pool) < self.words:
            raise ValueError(f"{len(pool)} SIFT descriptors cannot fit {self.words} visual words")
        self.kmeans = MiniBatchKMeans(
            n_clusters=self.words, random_state=self.seed, batch_size=4096, n_init=3
        ).fit(pool)
        self.idf = inverse_document_frequency(self.counts(images).astype(np.float64))
        return self

    def _histogram(self, desc: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        if self.kmeans is None:
            raise RuntimeError("SiftBoVW.fit must run before describing images")
        if len(desc) == 0:
            return np.zeros(self.words)
        return np.bincount(self.kmeans.predict(desc), minlength=self.words).astype(np.float64)

    def counts(self, images: Images) -> npt.NDArray[np.float32]:
        """Raw visual-word counts ``n_id``, (n, words): the non-negative histograms."""
        return np.stack([self._histogram(self.local_descriptors(im)) for im in images]).astype(
            np.float32
        )

    def transform(self, images: Images) -> npt.NDArray[np.float32]:
        """tf-idf weighted, L2-normalised histograms, (n, words)."""
        if self.idf is None:
            raise RuntimeError("SiftBoVW.fit must run before describing images")
        return tfidf(self.counts(images).astype(np.float64), self.idf)


SPEC = DescriptorSpec(
    name="sift-bovw",
    reference="[1] Yang & Newsam 2013, bag of visual words of SIFT local invariant features",
    factory=SiftBoVW,
    input_size=256,
    learns=True,
    any_bands=False,
    histogram=True,
)
