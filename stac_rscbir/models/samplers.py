"""Mini-batch samplers for training deep hashing networks, kept apart from datasets and models.

In torchgeo's spirit a sampler only sees integer labels and yields indices; the dataset turns
indices into images and the model never knows how the batch was drawn. Labels are either
single-label class ids, a 1-D integer array (N,), or multi-hot rows, a 2-D {0, 1} array (N, C).

Relevance follows the RS CBIR literature: two single-label images are *similar* when they have
the same class; two multi-label images are similar when they share >= 1 label (>= ``min_shared``
where a sampler takes it) and *dissimilar* when they share none. Internally single labels are
treated as one-hot rows, so "shares a label" and "same class" are the same test.

=================================  ===========================================================
:class:`RandomBatchSampler`        plain shuffled batches (classification, auto-encoder losses)
:class:`PairSampler`               ``(i, j, similar)`` pairs, configurable positive fraction
:class:`ClassPairTripletSampler`   MiLaN: each batch = 2 random classes, (a, p, n) triplets
:class:`MultiLabelTripletSampler`  multi-label triplets, optionally Jaccard-graded positives
:class:`PKBatchSampler`            P classes x K images per batch, for online mining
=================================  ===========================================================

Reproducibility: every sampler draws from ``numpy.random.default_rng([seed, epoch])``. The
epoch counter starts at 0 and advances each time the sampler is iterated, so two samplers built
with the same seed yield the same sequence of epochs, and :meth:`set_epoch` resumes or replays a
given epoch. ``seed=None`` draws fresh OS entropy once and stores it in ``.seed`` for logging.

Batch samplers yield lists of Python ints and work as ``DataLoader(batch_sampler=...)``;
triplet samplers yield lists of ``(anchor, positive, negative)`` tuples by default, or with
``flat=True`` the flat list ``[a1, p1, n1, a2, p2, n2, ...]`` a DataLoader can fetch directly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import Sampler

__all__ = [
    "ClassPairTripletSampler",
    "MultiLabelTripletSampler",
    "PKBatchSampler",
    "PairSampler",
    "RandomBatchSampler",
]

IntArray = npt.NDArray[np.int64]
Triplet = tuple[int, int, int]
_PartnerKind = Literal["pos", "neg"]


# --------------------------------------------------------------------------------------------
# label validation and indexing
# --------------------------------------------------------------------------------------------


def _as_label_array(labels: npt.ArrayLike | torch.Tensor) -> np.ndarray:
    """Validated labels: 1-D non-negative ints (single-label) or 2-D {0,1} rows (multi-hot)."""
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    y = np.asarray(labels)
    if y.ndim not in (1, 2):
        raise ValueError(
            "labels must be a 1-D array of class ids (N,) or a 2-D multi-hot array (N, C), "
            f"got shape {y.shape}"
        )
    if y.shape[0] == 0:
        raise ValueError("labels is empty: a sampler needs at least one image")
    if y.ndim == 1:
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"single-label class ids must be integers, got dtype {y.dtype}")
        if int(y.min()) < 0:
            raise ValueError(f"class ids must be non-negative, got minimum {int(y.min())}")
        return y.astype(np.int64)
    if y.shape[1] == 0:
        raise ValueError("multi-hot labels have zero columns (no classes)")
    if y.dtype != np.bool_:
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
            raise ValueError(f"multi-hot labels must be bool, int or float, got dtype {y.dtype}")
        if not np.isin(y, (0, 1)).all():
            raise ValueError("multi-hot labels must contain only 0 and 1")
    return y.astype(bool)


class _LabelIndex:
    """Images grouped by identical label rows, for exact uniform sampling of partners.

    Single labels become one-hot rows, so one code path serves both label kinds. Work per
    anchor is O(U·C) for U distinct label rows instead of O(N·C) for N images.
    """

    def __init__(self, labels: npt.ArrayLike | torch.Tensor) -> None:
        y = _as_label_array(labels)
        self.multi = y.ndim == 2
        self.n = int(y.shape[0])
        if self.multi:
            rows, inverse, counts = np.unique(y, axis=0, return_inverse=True, return_counts=True)
            self.classes: np.ndarray | None = None
        else:
            classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
            rows = np.eye(len(classes), dtype=bool)
            self.classes = classes
        self.rows = rows.astype(bool)
        self.group = np.asarray(inverse, dtype=np.int64).reshape(-1)
        self.counts = counts.astype(np.int64)
        self.u = len(self.counts)
        self.order = np.argsort(self.group, kind="stable").astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.pos_in_group = np.empty(self.n, dtype=np.int64)
        self.pos_in_group[self.order] = np.arange(self.n) - np.repeat(self.starts, self.counts)
        self.sizes = self.rows.sum(1).astype(np.int64)
        self._rows_f = self.rows.astype(np.float32)

    def members(self, g: int) -> IntArray:
        """Image indices of label group ``g`` (ascending)."""
        return self.order[self.starts[g] : self.starts[g] + self.counts[g]]

    def overlap(self, groups: IntArray) -> np.ndarray:
        """Number of shared labels between the given groups and every group, (len, U) float32
        (exact small integers; compare with half-integer thresholds).
        """
        return self._rows_f[groups] @ self._rows_f.T

    def partner_counts(self, min_shared: int = 1) -> tuple[IntArray, IntArray]:
        """Positives (>= ``min_shared`` shared labels) and negatives (none shared) of an image
        of each group, self excluded, as two (U,) arrays; one pass over the U x U overlaps.
        """
        pos = np.empty(self.u, dtype=np.int64)
        neg = np.empty(self.u, dtype=np.int64)
        counts = self.counts.astype(np.float64)
        chunk = max(1, (1 << 22) // max(self.u, 1))
        for s in range(0, self.u, chunk):
            g = np.arange(s, min(s + chunk, self.u))
            o = self.overlap(g)
            any_shared = np.rint((o > 0.5) @ counts).astype(np.int64)
            self_any = self.sizes[g] > 0
            neg[g] = self.n - any_shared - ~self_any  # an empty row is its own "negative"
            if min_shared == 1:
                pos[g] = any_shared - self_any
            else:
                enough = np.rint((o > min_shared - 0.5) @ counts).astype(np.int64)
                pos[g] = enough - (self.sizes[g] >= min_shared)
        return pos, neg

    def _weights(self, g: int, kind: _PartnerKind, min_shared: int, graded: bool) -> np.ndarray:
        o = self.overlap(np.array([g]))[0].astype(np.float64)
        cnt = self.counts.astype(np.float64)
        cnt[g] -= 1  # never the anchor itself
        if kind == "neg":
            return cnt * (o < 0.5)
        w = cnt * (o > min_shared - 0.5)
        if graded:
            union = self.sizes[g] + self.sizes - o
            w = w * np.divide(o, union, out=np.zeros(self.u), where=union > 0.5)
        return w

    def draw_partners(
        self,
        anchors: IntArray,
        kind: _PartnerKind,
        rng: np.random.Generator,
        min_shared: int = 1,
        graded: bool = False,
    ) -> IntArray:
        """One partner per anchor: uniform over valid partners, or Jaccard-weighted if graded."""
        out = np.empty(len(anchors), dtype=np.int64)
        ga = self.group[anchors]
        for g in np.unique(ga):
            sel = np.flatnonzero(ga == g)
            cw = np.cumsum(self._weights(int(g), kind, min_shared, graded))
            total = cw[-1]
            if total <= 0:  # callers check eligibility first
                raise RuntimeError(f"no valid {kind} partner for anchor {int(anchors[sel[0]])}")
            gs = np.searchsorted(cw, rng.random(len(sel)) * total, side="right")
            gs = np.minimum(gs, self.u - 1)
            same = gs == g
            r = rng.integers(0, self.counts[gs] - same)
            r = r + (same & (r >= self.pos_in_group[anchors[sel]]))
            out[sel] = self.order[self.starts[gs] + r]
        return out

    def class_name(self, g: int) -> str:
        """Human-readable name of group ``g`` for error messages."""
        if self.classes is not None:
            return f"class {int(self.classes[g])}"
        return f"label set {np.flatnonzero(self.rows[g]).tolist()}"


def _check_positive_int(value: int, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _names(items: Sequence[object], limit: int = 10) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items)} in all)" if len(items) > limit else "")


class _Seeded:
    """Seed and epoch bookkeeping shared by all samplers."""

    seed: int
    epoch: int

    def _init_seed(self, seed: int | None) -> None:
        if seed is None:
            seed = int(np.random.SeedSequence().entropy % (1 << 63))
        self.seed = _check_positive_int(seed, "seed", minimum=0)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration replay epoch ``epoch`` (for resuming reproducibly)."""
        self.epoch = _check_positive_int(epoch, "epoch", minimum=0)

    def _next_rng(self) -> np.random.Generator:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        return rng


def _choice(rng: np.random.Generator, pool: IntArray, size: int) -> IntArray:
    """``size`` draws from ``pool``: without replacement when the pool is large enough."""
    return rng.choice(pool, size=size, replace=len(pool) < size)


# --------------------------------------------------------------------------------------------
# samplers
# --------------------------------------------------------------------------------------------


class RandomBatchSampler(_Seeded, Sampler[list[int]]):
    """Shuffled batches covering every index once per epoch, for losses that need no structure.

    Args:
        data: the number of images N, or the label array (only its length is used).
        batch_size: images per batch.
        drop_last: drop the final short batch.
        seed: seed of the per-epoch shuffles (``None``: fresh entropy, kept in ``.seed``).
    """

    def __init__(
        self,
        data: int | npt.ArrayLike | torch.Tensor,
        batch_size: int,
        *,
        drop_last: bool = False,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if isinstance(data, (int, np.integer)) and not isinstance(data, bool):
            self.n = _check_positive_int(data, "number of images")
        else:
            self.n = len(_as_label_array(data))  # type: ignore[arg-type]
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.drop_last = bool(drop_last)
        if self.drop_last and self.n < self.batch_size:
            raise ValueError(
                f"drop_last=True with {self.n} images < batch_size {self.batch_size} "
                "would yield no batch"
            )
        self._init_seed(seed)

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        perm = self._next_rng().permutation(self.n)
        for b in range(len(self)):
            yield perm[b * self.batch_size : (b + 1) * self.batch_size].tolist()


class PairSampler(_Seeded, Sampler[tuple[int, int, bool]]):
    """``(i, j, similar)`` index pairs with a fixed share of similar pairs, for contrastive and
    pairwise-likelihood losses (SGCN's 1:1 pairs at ``positive_fraction=0.5``).

    Similar = same class, or shares >= 1 label for multi-hot labels; dissimilar = different
    class / no shared label; never ``i == j``. The first index of a similar pair is uniform
    over the images that have a similar partner, the second uniform over that image's similar
    images (likewise for dissimilar pairs). Images without any similar (dissimilar) partner,
    e.g. the only image of a class, are **skipped** as first index of similar (dissimilar)
    pairs; a ``ValueError`` is raised only when no image at all can start a pair that is
    requested. Pairs come in random order.

    Args:
        labels: (N,) class ids or (N, C) multi-hot labels.
        num_pairs: pairs per epoch (default N).
        positive_fraction: share of similar pairs, rounded to a whole number of pairs.
        seed: sampling seed (``None``: fresh entropy, kept in ``.seed``).
    """

    def __init__(
        self,
        labels: npt.ArrayLike | torch.Tensor,
        num_pairs: int | None = None,
        positive_fraction: float = 0.5,
        *,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.index = _LabelIndex(labels)
        self.num_pairs = _check_positive_int(
            self.index.n if num_pairs is None else num_pairs, "num_pairs"
        )
        if not 0.0 <= positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.positive_fraction = float(positive_fraction)
        self.num_positive = round(self.num_pairs * self.positive_fraction)
        idx = self.index
        self._anchors: dict[_PartnerKind, IntArray] = {}
        wanted_pairs: tuple[tuple[_PartnerKind, int], ...] = (
            ("pos", self.num_positive),
            ("neg", self.num_pairs - self.num_positive),
        )
        partners = dict(zip(("pos", "neg"), idx.partner_counts(), strict=True))
        for kind, wanted in wanted_pairs:
            ok = partners[kind][idx.group] > 0
            self._anchors[kind] = np.flatnonzero(ok)
            if wanted > 0 and not ok.any():
                what = "similar" if kind == "pos" else "dissimilar"
                raise ValueError(
                    f"no image has a {what} partner, cannot draw {wanted} {what} pairs "
                    f"(positive_fraction={positive_fraction})"
                )
        self._init_seed(seed)

    def __len__(self) -> int:
        return self.num_pairs

    def __iter__(self) -> Iterator[tuple[int, int, bool]]:
        rng = self._next_rng()
        n_pos = self.num_positive
        n_neg = self.num_pairs - n_pos
        firsts, seconds = [], []
        counts: tuple[tuple[_PartnerKind, int], ...] = (("pos", n_pos), ("neg", n_neg))
        for kind, m in counts:
            if m == 0:
                continue
            a = rng.choice(self._anchors[kind], size=m, replace=True)
            firsts.append(a)
            seconds.append(self.index.draw_partners(a, kind, rng))
        i = np.concatenate(firsts)
        j = np.concatenate(seconds)
        sim = np.concatenate([np.ones(n_pos, dtype=bool), np.zeros(n_neg, dtype=bool)])
        perm = rng.permutation(self.num_pairs)
        for a, b, s in zip(i[perm].tolist(), j[perm].tolist(), sim[perm].tolist(), strict=True):
            yield a, b, s


class _TripletBatches(_Seeded, Sampler[list]):  # type: ignore[type-arg]
    """Common length and output format of the triplet batch samplers."""

    triplets_per_batch: int
    num_batches: int
    flat: bool

    def __len__(self) -> int:
        return self.num_batches

    def _emit(self, a: IntArray, p: IntArray, n: IntArray) -> list:  # type: ignore[type-arg]
        if self.flat:
            return np.stack([a, p, n], 1).reshape(-1).tolist()
        return list(zip(a.tolist(), p.tolist(), n.tolist(), strict=True))

    def _default_batches(self, n: int, num_batches: int | None) -> int:
        if num_batches is None:
            return max(1, n // (3 * self.triplets_per_batch))
        return _check_positive_int(num_batches, "num_batches")


class ClassPairTripletSampler(_TripletBatches):
    """MiLaN's triplet sampler: each batch draws two random classes c+ != c-, then
    ``triplets_per_batch`` anchors from c+, for each a *different* image of c+ as positive and
    an image of c- as negative (Roy et al., GRSL 2020; 30 triplets = a batch of 90 in the code).

    Anchors (and negatives) are drawn without replacement when the class is large enough, else
    with replacement; a positive is uniform over the other images of c+, so never its anchor.
    Classes with fewer than 2 images cannot give positives: they are **skipped** as c+ (listed
    in ``.skipped_classes``) but can still be c-. A ``ValueError`` is raised when there are
    fewer than 2 classes or no class with 2 images. Single-label only; for multi-hot labels use
    :class:`MultiLabelTripletSampler`.

    Yields, per batch, a list of ``(anchor, positive, negative)`` tuples, or the flat list
    ``[a1, p1, n1, ...]`` with ``flat=True``.

    Args:
        labels: (N,) integer class ids.
        triplets_per_batch: triplets per batch (MiLaN: 30).
        num_batches: batches per epoch (default ``max(1, N // (3 * triplets_per_batch))``).
        flat: yield flat index lists instead of tuples.
        seed: sampling seed (``None``: fresh entropy, kept in ``.seed``).
    """

    def __init__(
        self,
        labels: npt.ArrayLike | torch.Tensor,
        triplets_per_batch: int = 30,
        num_batches: int | None = None,
        *,
        flat: bool = False,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.index = _LabelIndex(labels)
        if self.index.multi:
            raise ValueError(
                "ClassPairTripletSampler needs single-label class ids (N,); got multi-hot "
                "labels - use MultiLabelTripletSampler"
            )
        idx = self.index
        assert idx.classes is not None
        if idx.u < 2:
            raise ValueError(
                f"ClassPairTripletSampler needs at least 2 classes, got {idx.u} "
                f"(class {int(idx.classes[0])})"
            )
        self._positive_groups = np.flatnonzero(idx.counts >= 2)
        self.skipped_classes: list[int] = [int(c) for c in idx.classes[idx.counts < 2]]
        if len(self._positive_groups) == 0:
            raise ValueError(
                "no class has 2 images, so no anchor/positive pair exists; classes with one "
                f"image: {_names(self.skipped_classes)}"
            )
        self.triplets_per_batch = _check_positive_int(triplets_per_batch, "triplets_per_batch")
        self.num_batches = self._default_batches(idx.n, num_batches)
        self.flat = bool(flat)
        self._init_seed(seed)

    @property
    def classes(self) -> list[int]:
        """Class ids present in the labels."""
        assert self.index.classes is not None
        return [int(c) for c in self.index.classes]

    def __iter__(self) -> Iterator[list]:  # type: ignore[type-arg]
        rng = self._next_rng()
        idx = self.index
        t = self.triplets_per_batch
        for _ in range(self.num_batches):
            g_pos = int(rng.choice(self._positive_groups))
            g_neg = int(rng.integers(0, idx.u - 1))
            g_neg += g_neg >= g_pos  # uniform over the other classes
            members = idx.members(g_pos)
            m = len(members)
            slot = rng.choice(m, size=t, replace=m < t)
            a = members[slot]
            p = members[(slot + rng.integers(1, m, size=t)) % m]
            n = _choice(rng, idx.members(g_neg), t)
            yield self._emit(a, p, n)


class MultiLabelTripletSampler(_TripletBatches):
    """Triplets for multi-label archives: positives share >= ``min_shared`` labels with the
    anchor, negatives share none (the "shares >= 1 label" relevance of RS CBIR).

    Anchors are uniform over the eligible images, without replacement within a batch when
    possible. With ``graded=True`` a positive is drawn with probability proportional to its
    Jaccard overlap ``|y_a AND y_p| / |y_a OR y_p|`` with the anchor (among images that share
    >= ``min_shared`` labels), favouring near-identical label sets; otherwise uniformly.
    Negatives are uniform over images with no shared label. Images without any valid positive
    or negative (e.g. a unique label set, a label row present in every other image, or an
    all-zero row as anchor) are **skipped** as anchors (their count is in
    ``.num_skipped_anchors``); a ``ValueError`` is raised when no image can be an anchor.
    Single-label ids are accepted and behave as one-hot rows (same class = positive).

    Args:
        labels: (N, C) multi-hot labels (or (N,) class ids).
        triplets_per_batch: triplets per batch.
        num_batches: batches per epoch (default ``max(1, N // (3 * triplets_per_batch))``).
        min_shared: labels a positive must share with its anchor (>= 1).
        graded: Jaccard-weighted positives instead of uniform ones.
        flat: yield flat ``[a1, p1, n1, ...]`` lists instead of tuples.
        seed: sampling seed (``None``: fresh entropy, kept in ``.seed``).
    """

    def __init__(
        self,
        labels: npt.ArrayLike | torch.Tensor,
        triplets_per_batch: int = 30,
        num_batches: int | None = None,
        *,
        min_shared: int = 1,
        graded: bool = False,
        flat: bool = False,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.index = _LabelIndex(labels)
        self.min_shared = _check_positive_int(min_shared, "min_shared")
        self.graded = bool(graded)
        idx = self.index
        n_pos, n_neg = idx.partner_counts(self.min_shared)
        ok_group = (n_pos > 0) & (n_neg > 0)
        self._anchors = np.flatnonzero(ok_group[idx.group])
        self.num_skipped_anchors = idx.n - len(self._anchors)
        if len(self._anchors) == 0:
            raise ValueError(
                f"no image has both a positive (>= {self.min_shared} shared labels, other "
                "image) and a negative (no shared label): cannot build any triplet"
            )
        self.triplets_per_batch = _check_positive_int(triplets_per_batch, "triplets_per_batch")
        self.num_batches = self._default_batches(idx.n, num_batches)
        self.flat = bool(flat)
        self._init_seed(seed)

    def __iter__(self) -> Iterator[list]:  # type: ignore[type-arg]
        rng = self._next_rng()
        t = self.triplets_per_batch
        for _ in range(self.num_batches):
            a = _choice(rng, self._anchors, t)
            p = self.index.draw_partners(a, "pos", rng, self.min_shared, self.graded)
            n = self.index.draw_partners(a, "neg", rng)
            yield self._emit(a, p, n)


class PKBatchSampler(_Seeded, Sampler[list[int]]):
    """Batches of P classes x K images (Hermans et al. 2017) for online triplet mining.

    Each batch draws P distinct classes uniformly, then K distinct images of each, and yields
    the P·K indices class by class. Classes with fewer than K images are **skipped** (listed
    in ``.skipped_classes``) unless ``replace=True``, which keeps classes with >= 2 images and
    draws their K images with replacement (duplicates in the batch). A ``ValueError`` naming
    the skipped classes is raised when fewer than P classes remain. Single-label only.

    Args:
        labels: (N,) integer class ids.
        p: classes per batch (>= 2, so every anchor has negatives).
        k: images per class (>= 2, so every anchor has positives).
        num_batches: batches per epoch (default ``max(1, N_usable // (p * k))``).
        replace: allow classes with 2..K-1 images, sampled with replacement.
        seed: sampling seed (``None``: fresh entropy, kept in ``.seed``).
    """

    def __init__(
        self,
        labels: npt.ArrayLike | torch.Tensor,
        p: int,
        k: int,
        num_batches: int | None = None,
        *,
        replace: bool = False,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        self.index = _LabelIndex(labels)
        if self.index.multi:
            raise ValueError(
                "PKBatchSampler needs single-label class ids (N,); got multi-hot labels - "
                "use MultiLabelTripletSampler or pass one label per image"
            )
        self.p = _check_positive_int(p, "p", minimum=2)
        self.k = _check_positive_int(k, "k", minimum=2)
        self.replace = bool(replace)
        idx = self.index
        assert idx.classes is not None
        need = 2 if self.replace else self.k
        self._groups = np.flatnonzero(idx.counts >= need)
        self.skipped_classes: list[int] = [int(c) for c in idx.classes[idx.counts < need]]
        if len(self._groups) < self.p:
            raise ValueError(
                f"PKBatchSampler needs p={self.p} classes with >= {need} images, only "
                f"{len(self._groups)} of {idx.u} classes qualify"
                + (
                    f" (skipped, too few images: {_names(self.skipped_classes)})"
                    if self.skipped_classes
                    else ""
                )
                + ". Lower p"
                + ("" if self.replace else " or k, or pass replace=True")
            )
        self.batch_size = self.p * self.k
        usable = int(idx.counts[self._groups].sum())
        self.num_batches = (
            max(1, usable // self.batch_size)
            if num_batches is None
            else _check_positive_int(num_batches, "num_batches")
        )
        self._init_seed(seed)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = self._next_rng()
        idx = self.index
        for _ in range(self.num_batches):
            groups = rng.choice(self._groups, size=self.p, replace=False)
            batch = [_choice(rng, idx.members(int(g)), self.k) for g in groups]
            yield np.concatenate(batch).tolist()
