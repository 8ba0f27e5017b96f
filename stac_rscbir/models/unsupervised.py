"""Unsupervised hashing of float descriptors: the survey's non-deep baselines LSH and ITQ.

Both follow FAISS's explicit phases: ``fit`` on training descriptors, then ``encode`` any
descriptors into {0,1} bit matrices (pack them with :func:`stac_rscbir.extension.codec.pack_bits`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]
Bits = npt.NDArray[np.uint8]


def _as_matrix(x: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (n, d) matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf")
    return arr


@dataclass
class LSH:
    """Sign random projections (Charikar 2002) of mean-centred descriptors."""

    bits: int
    seed: int = 0
    mean_: FloatArray | None = field(default=None, init=False)
    planes_: FloatArray | None = field(default=None, init=False)

    def fit(self, x: npt.ArrayLike) -> LSH:
        """Draw ``bits`` Gaussian hyperplanes through the training mean."""
        data = _as_matrix(x, "x")
        rng = np.random.default_rng(self.seed)
        self.mean_ = data.mean(axis=0)
        self.planes_ = rng.standard_normal((data.shape[1], self.bits))
        return self

    def encode(self, x: npt.ArrayLike) -> Bits:
        """{0,1} codes (n, bits): the side of each hyperplane."""
        if self.planes_ is None or self.mean_ is None:
            raise RuntimeError("LSH.encode called before fit")
        data = _as_matrix(x, "x")
        return ((data - self.mean_) @ self.planes_ > 0).astype(np.uint8)


@dataclass
class ITQ:
    """Iterative quantization (Gong & Lazebnik 2011): PCA to ``bits`` dims, then the rotation
    that minimises the quantization error to the binary hypercube."""

    bits: int
    iterations: int = 50
    seed: int = 0
    mean_: FloatArray | None = field(default=None, init=False)
    projection_: FloatArray | None = field(default=None, init=False)

    def fit(self, x: npt.ArrayLike) -> ITQ:
        """Learn the PCA projection and the ITQ rotation on training descriptors."""
        data = _as_matrix(x, "x")
        if self.bits > min(data.shape):
            raise ValueError(
                f"ITQ needs bits <= min(n, d) = {min(data.shape)} for PCA, got bits={self.bits}"
            )
        self.mean_ = data.mean(axis=0)
        centred = data - self.mean_
        # principal directions from the SVD of the centred data (largest variance first)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        pca = vt[: self.bits].T
        v = centred @ pca
        rng = np.random.default_rng(self.seed)
        rotation, _ = np.linalg.qr(rng.standard_normal((self.bits, self.bits)))
        for _ in range(self.iterations):
            b = np.where(v @ rotation >= 0, 1.0, -1.0)
            # orthogonal Procrustes: R = argmin ||B - V R||_F over orthogonal R
            u, _, wt = np.linalg.svd(v.T @ b)
            rotation = u @ wt
        self.projection_ = pca @ rotation
        return self

    def encode(self, x: npt.ArrayLike) -> Bits:
        """{0,1} codes (n, bits)."""
        if self.projection_ is None or self.mean_ is None:
            raise RuntimeError("ITQ.encode called before fit")
        data = _as_matrix(x, "x")
        return ((data - self.mean_) @ self.projection_ >= 0).astype(np.uint8)
