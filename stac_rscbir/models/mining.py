"""Online triplet miners and label-similarity matrices for a batch of embeddings.

Labels are either single-label class ids, a 1-D integer tensor (B,), or multi-hot rows, a 2-D
{0, 1} tensor (B, C). Positives of an anchor are the *other* images with the same class /
sharing >= 1 label; negatives are the images sharing no label (never the anchor itself, even
for an all-zero label row). Miners return a ``torch.long`` tensor (T, 3) of
``(anchor, positive, negative)`` batch rows on the embeddings' device, ready for
:func:`stac_rscbir.models.losses.triplet_loss_from_indices`; T may be 0 when the batch holds no
valid triplet. Distances are squared Euclidean (as in MiLaN's triplet loss), computed in at
least float32 and without gradients: mining only selects indices.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "all_valid_triplets",
    "batch_hard_triplets",
    "graded_similarity_matrix",
    "positive_negative_masks",
    "semi_hard_triplets",
    "similarity_matrix",
]

LabelsLike = Tensor | npt.ArrayLike


def _as_labels(labels: LabelsLike, device: torch.device | None = None) -> Tensor:
    """Validated label tensor: (B,) integer ids or (B, C) multi-hot."""
    y = labels if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    if y.ndim not in (1, 2):
        raise ValueError(
            f"labels must be (B,) class ids or (B, C) multi-hot, got shape {tuple(y.shape)}"
        )
    if y.ndim == 1 and (y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex()):
        raise ValueError(f"single-label class ids must be integers, got {y.dtype}")
    if device is not None:
        y = y.to(device)
    return y


def _overlap(a: Tensor, b: Tensor) -> Tensor:
    """Number of shared labels between multi-hot rows of ``a`` and ``b``, (B, N) float."""
    return a.float() @ b.float().T


def similarity_matrix(
    labels: LabelsLike, other: LabelsLike | None = None, *, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Binary relevance s_ij = 1[same class] or 1[shares >= 1 label], (B, N) in ``dtype``.

    ``other`` defaults to ``labels`` (a (B, B) batch matrix whose diagonal is 1 except for
    all-zero label rows). This is the ``sim_matrix`` of the pairwise losses.
    """
    a = _as_labels(labels)
    b = a if other is None else _as_labels(other, a.device)
    if a.ndim != b.ndim or (a.ndim == 2 and a.shape[1] != b.shape[1]):
        raise ValueError(
            f"labels and other must be of the same kind, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    sim = a[:, None] == b[None, :] if a.ndim == 1 else _overlap(a, b) > 0.5
    return sim.to(dtype)


def graded_similarity_matrix(
    labels: LabelsLike,
    other: LabelsLike | None = None,
    *,
    kind: Literal["jaccard", "shared"] = "jaccard",
) -> Tensor:
    """Graded relevance for multi-label data, (B, N) float32: Jaccard |y_i AND y_j| / |y_i OR y_j|
    (0 when both rows are empty) or the raw number of shared labels (``kind="shared"``, the
    DSRH/NDCG grade). Single-label ids give the 0/1 same-class matrix for either kind.
    """
    if kind not in ("jaccard", "shared"):
        raise ValueError(f"kind must be 'jaccard' or 'shared', got {kind!r}")
    a = _as_labels(labels)
    b = a if other is None else _as_labels(other, a.device)
    if a.ndim == 1 or b.ndim == 1:
        return similarity_matrix(a, b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"labels have {a.shape[1]} and {b.shape[1]} classes")
    inter = _overlap(a, b)
    if kind == "shared":
        return inter
    union = a.float().sum(1, keepdim=True) + b.float().sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1.0), torch.zeros_like(inter))


def positive_negative_masks(labels: LabelsLike) -> tuple[Tensor, Tensor]:
    """Boolean (B, B) masks of in-batch positives (similar, i != j) and negatives (no shared
    label, i != j), the building block of every miner.
    """
    y = _as_labels(labels)
    sim = similarity_matrix(y, dtype=torch.bool)
    not_self = ~torch.eye(y.shape[0], dtype=torch.bool, device=y.device)
    return sim & not_self, ~sim & not_self


def _distances(embeddings: Tensor, normalize: bool) -> Tensor:
    if embeddings.ndim != 2:
        raise ValueError(
            f"embeddings must be a (batch, dim) matrix, got shape {tuple(embeddings.shape)}"
        )
    with torch.no_grad():
        x = embeddings.detach()
        x = x.float() if x.dtype not in (torch.float32, torch.float64) else x
        if normalize:
            x = F.normalize(x, dim=1)
        sq = x.pow(2).sum(1)
        d = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)
        d.fill_diagonal_(0.0)
    return d


def _masks_for(embeddings: Tensor, labels: LabelsLike) -> tuple[Tensor, Tensor]:
    y = _as_labels(labels, embeddings.device)
    if y.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels have {y.shape[0]} rows but embeddings have {embeddings.shape[0]}")
    return positive_negative_masks(y)


def batch_hard_triplets(
    embeddings: Tensor, labels: LabelsLike, *, normalize: bool = False
) -> Tensor:
    """Batch-hard triplets (Hermans et al. 2017): per anchor its farthest positive and its
    closest negative under squared Euclidean distance, (T, 3) long.

    One triplet per anchor that has at least one positive and one negative, anchors in
    ascending order; ties go to the lowest index. ``normalize`` L2-normalises the embeddings
    first, to mine in the same space as a triplet loss on normalised codes.
    """
    d = _distances(embeddings, normalize)
    pos, neg = _masks_for(embeddings, labels)
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    far_pos = torch.where(pos, d, -inf).argmax(1)
    near_neg = torch.where(neg, d, inf).argmin(1)
    a = torch.nonzero(pos.any(1) & neg.any(1)).squeeze(1)
    return torch.stack([a, far_pos[a], near_neg[a]], 1).long()


def semi_hard_triplets(
    embeddings: Tensor,
    labels: LabelsLike,
    margin: float = 0.2,
    *,
    fallback_hardest: bool = True,
    normalize: bool = False,
    squared: bool = True,
) -> Tensor:
    """Semi-hard triplets (Schroff et al., FaceNet 2015), (T, 3) long.

    For every (anchor, positive) pair whose anchor has a negative, choose among the negatives
    with ``d(a, p) < d(a, n) < d(a, p) + margin`` the closest one. When no negative satisfies
    this, ``fallback_hardest=True`` takes the closest negative overall (a hard triplet if it
    lies inside d(a, p), an already-satisfied one beyond the margin) so every positive pair
    stays in the batch; ``fallback_hardest=False`` drops the pair. Distances are squared
    Euclidean (``squared=False``: Euclidean), matching the loss the margin belongs to. Rows
    are ordered by (anchor, positive).
    """
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    d = _distances(embeddings, normalize)
    if not squared:
        d = d.sqrt()
    pos, neg = _masks_for(embeddings, labels)
    a_idx, p_idx = torch.nonzero(pos & neg.any(1, keepdim=True), as_tuple=True)
    out = []
    inf = torch.tensor(float("inf"), dtype=d.dtype, device=d.device)
    b = max(1, d.shape[0])
    chunk = max(1, (1 << 22) // b)
    for s in range(0, a_idx.numel(), chunk):
        a, p = a_idx[s : s + chunk], p_idx[s : s + chunk]
        dap = d[a, p][:, None]
        dan = d[a]
        negm = neg[a]
        semi = negm & (dan > dap) & (dan < dap + margin)
        n = torch.where(semi, dan, inf).argmin(1)
        has = semi.any(1)
        if fallback_hardest:
            n = torch.where(has, n, torch.where(negm, dan, inf).argmin(1))
        else:
            a, p, n = a[has], p[has], n[has]
        out.append(torch.stack([a, p, n], 1))
    if not out:
        return torch.empty(0, 3, dtype=torch.long, device=embeddings.device)
    return torch.cat(out).long()


def all_valid_triplets(labels: LabelsLike) -> Tensor:
    """Every valid (anchor, positive, negative) of the batch ("batch all"), (T, 3) long in
    lexicographic order, on the labels' device. T grows as B³: use on small batches.
    """
    pos, neg = positive_negative_masks(labels)
    valid = pos[:, :, None] & neg[:, None, :]
    return torch.nonzero(valid).long()
