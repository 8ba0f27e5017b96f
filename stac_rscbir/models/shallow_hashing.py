"""The survey's traditional (non-deep) hashing methods beyond LSH/ITQ: [8] KLSH and KSLH,
[9] partial randomness hashing, [23] probabilistic latent semantic hashing.

Each follows :mod:`stac_rscbir.models.unsupervised`'s interface: ``Cls(bits, seed=0, ...)``,
``fit(x, y=None) -> self`` (``y`` used by the supervised KSLH and PRH), ``encode(x) -> (n, bits)``
{0,1} uint8. :data:`HASHERS` maps a benchmark name to its class (LSH and ITQ included) and
:func:`fit_hasher` fits any of them, passing labels only to the supervised ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np
import numpy.typing as npt
from scipy.linalg import eigh
from scipy.optimize import minimize
from scipy.spatial.distance import cdist

from stac_rscbir.models.unsupervised import ITQ, LSH, Bits, FloatArray, _as_matrix


class Hasher(Protocol):
    """What the benchmark needs of a hasher."""

    def encode(self, x: npt.ArrayLike) -> Bits: ...


def _kernel(x: FloatArray, anchors: FloatArray, kind: str, sigma: float) -> FloatArray:
    """k(x, a): RBF exp(-||x - a||^2 / (2 sigma^2)) or linear x . a."""
    if kind == "linear":
        return x @ anchors.T
    return np.exp(-cdist(x, anchors, "sqeuclidean") / (2.0 * sigma**2))


def _bandwidth(x: FloatArray, anchors: FloatArray) -> float:
    """The RBF width: mean Euclidean distance from (up to 2000) samples to the anchors."""
    return float(cdist(x[:2000], anchors).mean()) or 1.0


def _check_kind(kind: str) -> None:
    if kind not in ("rbf", "linear"):
        raise ValueError(f"kernel must be 'rbf' or 'linear', got {kind!r}")


def _pick(n: int, count: int, rng: np.random.Generator) -> npt.NDArray[np.intp]:
    return np.sort(rng.choice(n, size=min(count, n), replace=False))


@dataclass
class KLSH:
    """Kernelized LSH (Kulis & Grauman 2009), the unsupervised hashing of [8] (Demir & Bruzzone
    2016, "Hashing-based scalable remote sensing image search and retrieval in large archives",
    IEEE TGRS 54(2)).

    ``anchors`` (p) samples x_1..x_p are drawn from the training set; K is their kernel
    matrix, centred K_c = H K H (H = I - 11^T/p) so the feature space mean is at the origin.
    Each bit draws a random subset S of ``subset`` (t) anchors; its hyperplane in feature space
    is the whitened mean of the subset, z = Sigma^{-1/2} (1/t) sum_{i in S} phi(x_i), which
    in kernel terms is
    w = K_c^{-1/2} e_S / t (e_S the indicator of S; K_c^{-1/2} through the eigendecomposition,
    the null space dropped), and h(x) = sign(sum_i w_i k_c(x, x_i)) with k_c the centred kernel
    vector of x. RBF kernel of width the mean sample-anchor distance.
    """

    bits: int
    seed: int = 0
    anchors: int = 300
    subset: int = 30
    kernel: str = "rbf"
    anchors_: FloatArray | None = field(default=None, init=False)
    subsets_: npt.NDArray[np.intp] | None = field(default=None, init=False)
    weights_: FloatArray | None = field(default=None, init=False)
    sigma_: float = field(default=1.0, init=False)
    _kmean: FloatArray | None = field(default=None, init=False, repr=False)

    supervised: ClassVar[bool] = False

    def fit(self, x: npt.ArrayLike, y: npt.ArrayLike | None = None) -> KLSH:
        """Draw the anchors and the per-bit subsets; whiten the centred anchor kernel."""
        _check_kind(self.kernel)
        data = _as_matrix(x, "x")
        rng = np.random.default_rng(self.seed)
        anchors = data[_pick(len(data), self.anchors, rng)]
        p = len(anchors)
        t = min(self.subset, p)
        self.sigma_ = _bandwidth(data, anchors)
        k = _kernel(anchors, anchors, self.kernel, self.sigma_)
        self._kmean = k.mean(axis=0)
        centred = k - self._kmean[None, :] - self._kmean[:, None] + k.mean()
        values, vectors = eigh(centred)
        keep = values > 1e-10 * max(values.max(), 1e-300)
        inv_sqrt = (vectors[:, keep] / np.sqrt(values[keep])) @ vectors[:, keep].T
        self.subsets_ = np.stack([rng.choice(p, size=t, replace=False) for _ in range(self.bits)])
        indicator = np.zeros((p, self.bits))
        indicator[self.subsets_, np.arange(self.bits)[:, None]] = 1.0 / t
        self.anchors_, self.weights_ = anchors, inv_sqrt @ indicator
        return self

    def encode(self, x: npt.ArrayLike) -> Bits:
        """{0,1} codes (n, bits): sign of the whitened kernel projections."""
        if self.weights_ is None or self.anchors_ is None or self._kmean is None:
            raise RuntimeError("KLSH.encode called before fit")
        k = _kernel(_as_matrix(x, "x"), self.anchors_, self.kernel, self.sigma_)
        centred = k - k.mean(axis=1, keepdims=True) - self._kmean[None, :] + self._kmean.mean()
        return (centred @ self.weights_ > 0).astype(np.uint8)


def _smooth(z: FloatArray) -> FloatArray:
    """KSH's sigmoid surrogate of sign: phi(z) = 2 / (1 + exp(-z)) - 1 = tanh(z / 2)."""
    return np.tanh(z / 2.0)


@dataclass
class KSLH:
    """Kernel-based supervised hashing (Liu et al. 2012, KSH), the supervised hashing of [8]
    (Demir & Bruzzone 2016, IEEE TGRS 54(2)).

    ``anchors`` samples a_1..a_m fix the kernel feature k(x) = [k(x, a_j)]_j - mu (mu its mean
    over the training set); bit k is h_k(x) = sign(k(x)^T w_k). On ``labelled`` training samples
    the pairwise label matrix S (+1 same class, -1 otherwise) is fitted by code inner products,
    min_W || B B^T - r S ||_F^2 with B = sign(K_l W), r = bits (eq. of KSH). Greedy, bit by
    bit, on the residual R_{k-1} = r S - sum_{t<k} b_t b_t^T: maximise b_k^T R_{k-1} b_k.
    Spectral relaxation init: the top generalised eigenvector of
    (K_l^T R K_l) w = lambda (K_l^T K_l) w, scaled so that w^T K_l^T K_l w = l; then the
    sigmoid-smoothed objective -phi(K_l w)^T R phi(K_l w) is minimised by gradient (L-BFGS),
    grad = -K_l^T ((2 R phi) * (1 - phi^2) / 2); the refined w is kept only if its sign codes
    fit R better than the spectral one's.
    """

    bits: int
    seed: int = 0
    anchors: int = 300
    labelled: int = 2000
    iterations: int = 100
    kernel: str = "rbf"
    anchors_: FloatArray | None = field(default=None, init=False)
    weights_: FloatArray | None = field(default=None, init=False)
    mean_: FloatArray | None = field(default=None, init=False)
    sigma_: float = field(default=1.0, init=False)

    supervised: ClassVar[bool] = True

    def fit(self, x: npt.ArrayLike, y: npt.ArrayLike | None = None) -> KSLH:
        """Greedy bit-wise fit of the label similarity matrix on the labelled subset."""
        _check_kind(self.kernel)
        if y is None:
            raise ValueError("KSLH is supervised: fit needs the class labels y")
        data = _as_matrix(x, "x")
        labels = np.asarray(y)
        if labels.shape != (len(data),):
            raise ValueError(f"y must have one label per row of x, got shape {labels.shape}")
        rng = np.random.default_rng(self.seed)
        self.anchors_ = data[_pick(len(data), self.anchors, rng)]
        self.sigma_ = _bandwidth(data, self.anchors_)
        feats = _kernel(data, self.anchors_, self.kernel, self.sigma_)
        self.mean_ = feats.mean(axis=0)
        rows = _pick(len(data), self.labelled, rng)
        kl = feats[rows] - self.mean_
        sub = labels[rows]
        residual = self.bits * np.where(sub[:, None] == sub[None, :], 1.0, -1.0)
        gram = kl.T @ kl
        gram += 1e-6 * np.trace(gram) / len(gram) * np.eye(len(gram))
        weights = []
        for _ in range(self.bits):
            _, vecs = eigh(kl.T @ residual @ kl, gram, subset_by_index=[len(gram) - 1] * 2)
            w0 = vecs[:, 0] * np.sqrt(len(kl) / (vecs[:, 0] @ gram @ vecs[:, 0]))
            w1 = minimize(
                _smoothed_loss,
                w0,
                args=(kl, residual),
                jac=True,
                method="L-BFGS-B",
                options={"maxiter": self.iterations},
            ).x
            b0, b1 = (np.where(kl @ w > 0, 1.0, -1.0) for w in (w0, w1))
            w, b = (w1, b1) if b1 @ residual @ b1 >= b0 @ residual @ b0 else (w0, b0)
            residual -= np.outer(b, b)
            weights.append(w)
        self.weights_ = np.stack(weights, axis=1)
        return self

    def encode(self, x: npt.ArrayLike) -> Bits:
        """{0,1} codes (n, bits)."""
        if self.weights_ is None or self.anchors_ is None or self.mean_ is None:
            raise RuntimeError("KSLH.encode called before fit")
        feats = _kernel(_as_matrix(x, "x"), self.anchors_, self.kernel, self.sigma_) - self.mean_
        return (feats @ self.weights_ > 0).astype(np.uint8)


def _smoothed_loss(w: FloatArray, kl: FloatArray, residual: FloatArray) -> tuple[float, FloatArray]:
    """KSH's smoothed bit objective -phi^T R phi and its gradient in w."""
    phi = _smooth(kl @ w)
    r_phi = residual @ phi
    return float(-phi @ r_phi), -kl.T @ (r_phi * (1.0 - phi**2))


@dataclass
class PRH:
    """Partial randomness hashing ([9] Li & Ren 2017, "Partial randomness hashing for
    large-scale remote sensing image retrieval", IEEE GRSL 14(3)).

    The projection is part random, part learned: a seeded Gaussian matrix P (d x m, m =
    ``random_dim``, default 8 x bits) maps centred descriptors to V = (X - mu) P without
    looking at the data; the learned weight matrix W (m x bits) is fitted on that small
    projected data, and h(x) = sign(W^T P^T (x - mu)).

    * With labels (the survey: "a weight matrix defined using labeled images"; the
      benchmark's ``prh``): each class c gets a seeded random codeword t_c in {-1,1}^bits and
      W is the ridge regression of the labelled images' codewords T on V,
      W = (V^T V + lambda I)^{-1} V^T T, lambda = ``ridge`` x the mean eigenvalue of V^T V.
    * Without labels: the top-``bits`` principal directions E of V, then the rotation R
      minimising the quantisation loss ||B - V E R||_F^2 (ITQ's alternation of
      B = sign(V E R) and the Procrustes step R = U Q^T, U S Q^T = (V E)^T B), W = E R;
      ``iterations=0`` leaves R random (the random-only rotation). ``losses_`` records it.

    Assumed (the letter's full text was not available): the two learned objectives above
    (class-codeword regression, ITQ quantisation) and m as a parameter.
    """

    bits: int
    seed: int = 0
    random_dim: int | None = None
    iterations: int = 50
    ridge: float = 0.01
    mean_: FloatArray | None = field(default=None, init=False)
    random_: FloatArray | None = field(default=None, init=False)
    learned_: FloatArray | None = field(default=None, init=False)
    losses_: list[float] = field(default_factory=list, init=False)

    supervised: ClassVar[bool] = True

    def fit(self, x: npt.ArrayLike, y: npt.ArrayLike | None = None) -> PRH:
        """Draw the random projection, then learn W on the projected data (with y: supervised)."""
        data = _as_matrix(x, "x")
        dim = self.random_dim or 8 * self.bits
        rng = np.random.default_rng(self.seed)
        self.mean_ = data.mean(axis=0)
        self.random_ = rng.standard_normal((data.shape[1], dim)) / np.sqrt(data.shape[1])
        v = (data - self.mean_) @ self.random_
        if y is None:
            self.learned_ = self._quantisation_fit(v, rng)
        else:
            labels = np.asarray(y)
            if labels.shape != (len(data),):
                raise ValueError(f"y must have one label per row of x, got shape {labels.shape}")
            self.learned_ = self._codeword_fit(v, labels, rng)
        return self

    def _codeword_fit(
        self, v: FloatArray, labels: npt.NDArray, rng: np.random.Generator
    ) -> FloatArray:
        """Ridge regression of V onto seeded random class codewords."""
        classes, index = np.unique(labels, return_inverse=True)
        codewords = np.where(rng.standard_normal((len(classes), self.bits)) >= 0, 1.0, -1.0)
        gram = v.T @ v
        penalty = self.ridge * np.trace(gram) / len(gram)
        return np.linalg.solve(gram + penalty * np.eye(len(gram)), v.T @ codewords[index])

    def _quantisation_fit(self, v: FloatArray, rng: np.random.Generator) -> FloatArray:
        """PCA to ``bits`` dims, then ITQ's rotation minimising the quantisation loss."""
        if self.bits > min(v.shape):
            raise ValueError(
                f"unsupervised PRH needs bits <= min(n, random_dim) = {min(v.shape)} for PCA, "
                f"got bits={self.bits}"
            )
        _, _, vt = np.linalg.svd(v, full_matrices=False)
        pca = vt[: self.bits].T
        v = v @ pca
        w, _ = np.linalg.qr(rng.standard_normal((self.bits, self.bits)))
        self.losses_ = [self._loss(v, w)]
        for _ in range(self.iterations):
            b = np.where(v @ w >= 0, 1.0, -1.0)
            u, _, qt = np.linalg.svd(v.T @ b)
            w = u @ qt
            self.losses_.append(self._loss(v, w))
        return pca @ w

    @staticmethod
    def _loss(v: FloatArray, w: FloatArray) -> float:
        """Quantisation loss ||sign(V W) - V W||_F^2 / n."""
        proj = v @ w
        return float(((np.where(proj >= 0, 1.0, -1.0) - proj) ** 2).sum() / len(v))

    def encode(self, x: npt.ArrayLike) -> Bits:
        """{0,1} codes (n, bits)."""
        if self.learned_ is None or self.random_ is None or self.mean_ is None:
            raise RuntimeError("PRH.encode called before fit")
        proj = (_as_matrix(x, "x") - self.mean_) @ self.random_ @ self.learned_
        return (proj >= 0).astype(np.uint8)


def _counts(x: npt.ArrayLike) -> FloatArray:
    data = _as_matrix(x, "x")
    if (data < 0).any():
        raise ValueError("pLSH needs non-negative histograms (word counts), got negative values")
    return data


@dataclass
class PLSH:
    """Probabilistic latent semantic hashing ([23] Fernandez-Beltran, Demir, Pla & Plaza 2020,
    "Unsupervised remote sensing image retrieval using probabilistic latent semantic hashing",
    IEEE GRSL; cited by the survey as [23]) on bag-of-words count histograms n(d, w).

    pLSA (Hofmann 1999) with one topic per bit, fitted by EM on the training histograms:
    E-step P(z|d,w) = P(z|d) P(w|z) / sum_z' P(z'|d) P(w|z');
    M-step P(w|z) ~ sum_d n(d,w) P(z|d,w), P(z|d) ~ sum_w n(d,w) P(z|d,w)
    (vectorised as the multiplicative updates with n(d,w) / P(w|d)), which never decreases the
    log-likelihood L = sum_{d,w} n(d,w) log sum_z P(z|d) P(w|z) (``loglik_``). An image's
    topic posterior P(z|d) comes from fold-in (P(w|z) fixed, EM on P(z|d) alone); bit z is
    P(z|d) > t_z with t_z the median of topic z over the training images (assumed threshold
    rule: balanced bits).
    """

    bits: int
    seed: int = 0
    iterations: int = 100
    fold_in_iterations: int = 50
    word_topic_: FloatArray | None = field(default=None, init=False)
    thresholds_: FloatArray | None = field(default=None, init=False)
    loglik_: list[float] = field(default_factory=list, init=False)

    supervised: ClassVar[bool] = False

    def fit(self, x: npt.ArrayLike, y: npt.ArrayLike | None = None) -> PLSH:
        """EM for P(z|d), P(w|z) on the training counts, then the per-topic thresholds."""
        counts = _counts(x)
        rng = np.random.default_rng(self.seed)
        doc_topic = _normalise(rng.random((len(counts), self.bits)) + 0.5)
        word_topic = _normalise(rng.random((self.bits, counts.shape[1])) + 0.5)
        self.loglik_ = [_loglik(counts, doc_topic, word_topic)]
        for _ in range(self.iterations):
            ratio = counts / np.maximum(doc_topic @ word_topic, 1e-300)
            doc_topic, word_topic = (
                _normalise(doc_topic * (ratio @ word_topic.T)),
                _normalise(word_topic * (doc_topic.T @ ratio)),
            )
            self.loglik_.append(_loglik(counts, doc_topic, word_topic))
        self.word_topic_ = word_topic
        self.thresholds_ = np.median(self.posteriors(counts), axis=0)
        return self

    def posteriors(self, x: npt.ArrayLike) -> FloatArray:
        """P(z|d) (n, bits) by fold-in: EM on P(z|d) with P(w|z) fixed."""
        if self.word_topic_ is None:
            raise RuntimeError("PLSH used before fit")
        counts = _counts(x)
        doc_topic = np.full((len(counts), self.bits), 1.0 / self.bits)
        for _ in range(self.fold_in_iterations):
            ratio = counts / np.maximum(doc_topic @ self.word_topic_, 1e-300)
            doc_topic = _normalise(doc_topic * (ratio @ self.word_topic_.T))
        return doc_topic

    def encode(self, x: npt.ArrayLike) -> Bits:
        """{0,1} codes (n, bits): each topic posterior above its training median."""
        if self.thresholds_ is None:
            raise RuntimeError("PLSH.encode called before fit")
        return (self.posteriors(x) > self.thresholds_).astype(np.uint8)


def _normalise(m: FloatArray) -> FloatArray:
    """Rows to probability distributions (an all-zero row, an empty document, to uniform)."""
    total = m.sum(axis=1, keepdims=True)
    return np.where(total > 0, m / np.where(total > 0, total, 1.0), 1.0 / m.shape[1])


def _loglik(counts: FloatArray, doc_topic: FloatArray, word_topic: FloatArray) -> float:
    p = doc_topic @ word_topic
    mask = counts > 0
    return float((counts[mask] * np.log(p[mask])).sum())


#: Benchmark name -> hasher class; ``plsh`` needs count histograms (a descriptor, not CNN
#: features).
HASHERS: dict[str, type] = {
    "lsh": LSH,
    "itq": ITQ,
    "klsh": KLSH,
    "kslh": KSLH,
    "prh": PRH,
    "plsh": PLSH,
}
#: The hashers the benchmark runs on the frozen CNN features.
FEATURE_HASHERS: tuple[str, ...] = ("lsh", "itq", "klsh", "kslh", "prh")
#: Where each hasher comes from; "[n]" is the survey's reference (tables cite it).
HASHER_REFERENCES: dict[str, str] = {
    "lsh": "Indyk & Motwani 1998, random-hyperplane LSH (Charikar 2002)",
    "itq": "Gong & Lazebnik, CVPR 2011",
    "klsh": "[8] Demir & Bruzzone 2016, kernelized LSH",
    "kslh": "[8] Demir & Bruzzone 2016, kernel-based supervised hashing",
    "prh": "[9] Li & Ren 2017, partial randomness hashing",
    "plsh": "[23] Fernandez-Beltran et al. 2020, probabilistic latent semantic hashing",
}


def fit_hasher(
    name: str, bits: int, x: npt.ArrayLike, y: npt.ArrayLike | None = None, seed: int = 0
) -> Hasher:
    """Fit the hasher ``name`` on training rows ``x`` (labels ``y`` reach supervised ones only)."""
    if name not in HASHERS:
        raise ValueError(f"unknown hasher {name!r}; choose from {sorted(HASHERS)}")
    cls = HASHERS[name]
    hasher = cls(bits, seed=seed)
    return hasher.fit(x, y) if getattr(cls, "supervised", False) else hasher.fit(x)
