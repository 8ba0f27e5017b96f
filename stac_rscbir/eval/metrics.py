"""Retrieval metrics for hash codes and float descriptors (numpy only).

Conventions (definitions follow ``shared/reference/deep-hashing.md`` §4):

* A *ranked relevance matrix* ``ranked`` has one row per query and one column per database item,
  in rank order (best first). Values are graded relevance ``s_i`` (the number of shared labels)
  or binary relevance; any value ``> 0`` counts as relevant (``rel_i = 1[s_i > 0]``).
* ``R`` is the number of relevant database items of a query. By default it is read off the row,
  so rows must hold the *whole* ranking (all database items except excluded ones) unless
  ``n_relevant`` is given. NDCG always reads its ideal ranking off the whole row.
* ``k`` larger than the number of columns is allowed: missing positions count as non-relevant,
  so P@k and ACG@k still divide by ``k``.
* Ties in distance are broken by database index (stable sort), never by chance, unless
  ``tie_break="random"`` is asked for explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal, NamedTuple

import numpy as np
import numpy.typing as npt

TieBreak = Literal["index", "random"]
MapVariant = Literal["A", "B", "truncated", "C", "D"]
DescriptorMetric = Literal["euclidean", "cosine"]
#: A method's own distance between descriptor rows: (Q, D) queries x (N, D) database -> (Q, N).
DistanceFn = Callable[[npt.NDArray[np.float64], npt.NDArray[np.float64]], npt.NDArray[np.float64]]
RankingMetric = Callable[[npt.NDArray[np.generic], int], float]

DEFAULT_KS: tuple[int, ...] = (10, 20, 50, 100)

#: Bits set in each byte value; the popcount used when numpy has no ``bitwise_count`` (< 2.0).
_POPCOUNT_TABLE = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
#: Upper bound on the words held by one XOR block in :func:`hamming_distances`.
_BLOCK_WORDS = 1 << 22


# --------------------------------------------------------------------------- distances


def _popcount_rows_table(x: npt.NDArray[np.unsignedinteger]) -> npt.NDArray[np.int32]:
    """Set bits summed over the last axis, via the 256-entry byte table (portable fallback)."""
    as_bytes = x.view(np.uint8)
    return _POPCOUNT_TABLE[as_bytes].sum(axis=-1, dtype=np.int32)


def _popcount_rows_native(x: npt.NDArray[np.unsignedinteger]) -> npt.NDArray[np.int32]:
    """Set bits summed over the last axis, via ``np.bitwise_count`` (numpy >= 2.0, vectorised)."""
    return np.bitwise_count(x).sum(axis=-1, dtype=np.int32)


_popcount_rows = _popcount_rows_native if hasattr(np, "bitwise_count") else _popcount_rows_table


def _as_words(packed: npt.NDArray[np.uint8]) -> npt.NDArray[np.unsignedinteger]:
    """View packed bytes (n, B) as the widest unsigned words dividing B: fewer XORs, same counts."""
    width = next(w for w in (8, 4, 2, 1) if packed.shape[1] % w == 0)
    return np.ascontiguousarray(packed).view(np.dtype(f"u{width}"))


def _check_packed(codes: npt.ArrayLike, name: str) -> npt.NDArray[np.uint8]:
    arr = np.asarray(codes)
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(
            f"{name} must be packed codes, a 2-D uint8 array (n, bytes); "
            f"got {arr.dtype} {arr.shape}"
        )
    return arr


def hamming_distances(
    query: npt.ArrayLike, database: npt.ArrayLike, *, chunk_size: int = 4096
) -> npt.NDArray[np.int32]:
    """Hamming distances (Q, N) between packed codes, by XOR + popcount over database chunks.

    ``query`` (Q, B) and ``database`` (N, B) are ``numpy.packbits`` bytes (see
    :mod:`stac_rscbir.extension.codec`); the bit order does not matter as long as both agree.
    ``chunk_size`` database rows are compared at a time, with as many queries as keep the XOR
    block under 4 Mi words (32 MiB at most), so memory stays bounded whatever Q and N are.
    """
    q = _check_packed(query, "query")
    d = _check_packed(database, "database")
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"code widths differ: query {q.shape[1]} bytes, database {d.shape[1]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    qw, dw = _as_words(q), _as_words(d)
    out = np.empty((len(qw), len(dw)), dtype=np.int32)
    q_rows = max(1, _BLOCK_WORDS // (min(chunk_size, max(len(dw), 1)) * qw.shape[1]))
    for d0 in range(0, len(dw), chunk_size):
        d_block = dw[None, d0 : d0 + chunk_size]
        for q0 in range(0, len(qw), q_rows):
            xor = qw[q0 : q0 + q_rows, None] ^ d_block
            out[q0 : q0 + q_rows, d0 : d0 + chunk_size] = _popcount_rows(xor)
    return out


def descriptor_distances(
    query: npt.ArrayLike, database: npt.ArrayLike, metric: DescriptorMetric = "euclidean"
) -> npt.NDArray[np.float64]:
    """Distances (Q, N) between float descriptors, for the float kNN baselines.

    ``"euclidean"``: the L2 distance (computed in float64 from the Gram matrix);
    ``"cosine"``: ``1 - cos`` (a zero vector has cosine 0 to everything).
    """
    q = np.asarray(query, dtype=np.float64)
    d = np.asarray(database, dtype=np.float64)
    if q.ndim != 2 or d.ndim != 2 or q.shape[1] != d.shape[1]:
        raise ValueError(f"descriptors must be (Q, D) and (N, D), got {q.shape} and {d.shape}")
    if metric == "cosine":
        tiny = np.finfo(np.float64).tiny
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), tiny)
        d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), tiny)
        return 1.0 - q @ d.T
    if metric == "euclidean":
        sq = (q * q).sum(axis=1)[:, None] + (d * d).sum(axis=1)[None, :] - 2.0 * (q @ d.T)
        return np.sqrt(np.maximum(sq, 0.0))
    raise ValueError(f"unknown metric {metric!r}, expected 'euclidean' or 'cosine'")


# --------------------------------------------------------------------------- ranking


def _exclusion_mask(
    shape: tuple[int, int],
    exclude: npt.ArrayLike | None,
    self_index: npt.ArrayLike | None,
) -> npt.NDArray[np.bool_] | None:
    """The (Q, N) mask of database items removed from each query's ranking, or None."""
    if exclude is None and self_index is None:
        return None
    mask = np.zeros(shape, dtype=bool)
    if exclude is not None:
        ex = np.asarray(exclude)
        if ex.dtype != np.bool_ or ex.shape != shape:
            raise ValueError(f"exclude must be a boolean array of shape {shape}, got {ex.shape}")
        mask |= ex
    if self_index is not None:
        idx = np.asarray(self_index)
        if idx.shape != (shape[0],) or idx.dtype.kind not in "iu":
            raise ValueError(f"self_index must be {shape[0]} integers, got {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < 0 or idx.max() >= shape[1]):
            raise ValueError(f"self_index out of range [0, {shape[1]})")
        mask[np.arange(shape[0]), idx] = True
    return mask


def _excluded_per_row(mask: npt.NDArray[np.bool_]) -> int:
    """How many items every row excludes; rankings stay rectangular only if that is constant."""
    counts = mask.sum(axis=1)
    if counts.size and (counts != counts[0]).any():
        raise ValueError("every query must exclude the same number of database items")
    return int(counts[0]) if counts.size else 0


def _drop_excluded(
    matrix: npt.NDArray[np.generic], mask: npt.NDArray[np.bool_] | None
) -> npt.NDArray[np.generic]:
    """Remove the masked entries of each row of ``matrix``, keeping the order of the rest."""
    if mask is None:
        return matrix
    m = _excluded_per_row(mask)
    return matrix[~mask].reshape(matrix.shape[0], matrix.shape[1] - m)


def rank(
    distances: npt.ArrayLike,
    *,
    tie_break: TieBreak = "index",
    exclude: npt.ArrayLike | None = None,
    self_index: npt.ArrayLike | None = None,
    seed: int | None = None,
) -> npt.NDArray[np.intp]:
    """Database indices of each query sorted by increasing distance, ties broken deterministically.

    ``tie_break="index"`` keeps tied items in database order (stable sort), so results never
    depend on chance; ``"random"`` orders ties by a random key drawn from ``seed``, for robustness
    checks. Excluded items (``exclude[q, i]`` True, or ``i == self_index[q]`` for a query that is
    itself database item ``self_index[q]``) are removed: the result is (Q, N - m) where every query
    must exclude the same number m of items.
    """
    dist = np.asarray(distances)
    if dist.ndim != 2:
        raise ValueError(f"distances must be 2-D (Q, N), got shape {dist.shape}")
    mask = _exclusion_mask(dist.shape, exclude, self_index)
    if tie_break == "index":
        order = np.argsort(dist, axis=1, kind="stable")
    elif tie_break == "random":
        secondary = np.random.default_rng(seed).random(dist.shape)
        order = np.lexsort((secondary, dist), axis=-1)
    else:
        raise ValueError(f"unknown tie_break {tie_break!r}, expected 'index' or 'random'")
    if mask is None:
        return order
    return _drop_excluded(order, np.take_along_axis(mask, order, axis=1))


def ranked_relevance(relevance: npt.ArrayLike, order: npt.ArrayLike) -> npt.NDArray[np.generic]:
    """Reorder a (Q, N) relevance matrix by a ranking from :func:`rank` (rows in rank order)."""
    return np.take_along_axis(np.asarray(relevance), np.asarray(order), axis=1)


# --------------------------------------------------------------------------- relevance


def single_label_relevance(
    query_labels: npt.ArrayLike, db_labels: npt.ArrayLike
) -> npt.NDArray[np.int32]:
    """Relevance (Q, N) for single-label data: 1 where the query and item share their class."""
    q, d = np.asarray(query_labels), np.asarray(db_labels)
    if q.ndim != 1 or d.ndim != 1:
        raise ValueError(f"single-label labels must be 1-D, got {q.shape} and {d.shape}")
    return (q[:, None] == d[None, :]).astype(np.int32)


def _check_multi_hot(labels: npt.ArrayLike, name: str) -> npt.NDArray[np.float32]:
    arr = np.asarray(labels)
    if arr.ndim != 2 or not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be a 2-D multi-hot 0/1 array, got shape {arr.shape}")
    return arr.astype(np.float32)


def shared_label_counts(
    query_labels: npt.ArrayLike, db_labels: npt.ArrayLike
) -> npt.NDArray[np.int32]:
    """Graded relevance (Q, N) for multi-hot labels: the number of shared labels ``y_q . y_d``."""
    q = _check_multi_hot(query_labels, "query_labels")
    d = _check_multi_hot(db_labels, "db_labels")
    if q.shape[1] != d.shape[1]:
        raise ValueError(f"label widths differ: {q.shape[1]} vs {d.shape[1]}")
    # float32 BLAS product: exact for counts below 2**24, much faster than an integer matmul
    return np.rint(q @ d.T).astype(np.int32)


def multi_label_relevance(
    query_labels: npt.ArrayLike, db_labels: npt.ArrayLike
) -> npt.NDArray[np.int32]:
    """Binary relevance (Q, N) for multi-hot labels: 1 where the two share at least one label."""
    return (shared_label_counts(query_labels, db_labels) > 0).astype(np.int32)


# --------------------------------------------------------------------------- ranking metrics


def _as_ranked(ranked: npt.ArrayLike) -> npt.NDArray[np.generic]:
    arr = np.asarray(ranked)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"ranked relevance must be 2-D (Q, N) with N >= 1, got {arr.shape}")
    return arr


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _relevant_count(
    ranked: npt.NDArray[np.generic], n_relevant: npt.ArrayLike | None
) -> npt.NDArray[np.float64]:
    """R per query: given, or counted on the (whole) ranked row."""
    if n_relevant is None:
        return (ranked > 0).sum(axis=1).astype(np.float64)
    r = np.asarray(n_relevant, dtype=np.float64)
    if r.shape != (ranked.shape[0],):
        raise ValueError(f"n_relevant must have shape ({ranked.shape[0]},), got {r.shape}")
    return r


def _safe_div(num: npt.ArrayLike, den: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Elementwise num / den, 0 where den is 0 (the convention for an empty denominator)."""
    num = np.asarray(num, dtype=np.float64)
    den = np.broadcast_to(np.asarray(den, dtype=np.float64), num.shape)
    out = np.zeros(num.shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _positions(n: int) -> npt.NDArray[np.float64]:
    return np.arange(1, n + 1, dtype=np.float64)


def _average_precision(
    ranked: npt.NDArray[np.generic], k: int, variant: MapVariant, n_relevant: npt.ArrayLike | None
) -> npt.NDArray[np.float64]:
    """Per-query AP@k under one of the §4.2 variants (see :func:`map_at_k`)."""
    if variant == "C":
        rel = ranked > 0
        cum = rel.cumsum(axis=1)
        m = np.minimum(k, _relevant_count(ranked, n_relevant))
        terms = np.where(rel & (cum <= m[:, None]), cum / _positions(rel.shape[1]), 0.0)
        return _safe_div(terms.sum(axis=1), m)
    hits = ranked[:, :k] > 0
    cum = hits.cumsum(axis=1)
    summed = (cum / _positions(hits.shape[1]) * hits).sum(axis=1)
    if variant == "A":
        return _safe_div(summed, cum[:, -1])
    if variant in ("B", "truncated"):
        return _safe_div(summed, np.minimum(k, _relevant_count(ranked, n_relevant)))
    if variant == "D":
        return summed / k
    raise ValueError(f"unknown mAP variant {variant!r}, expected one of A, B/truncated, C, D")


def map_at_k(
    ranked: npt.ArrayLike,
    k: int,
    variant: MapVariant = "A",
    *,
    n_relevant: npt.ArrayLike | None = None,
) -> float:
    """Mean over queries of AP@k, in the named variant of deep-hashing.md §4.2.

    With ``P@i = N_rel@i / i`` and ``S = sum_{i<=k} rel_i * P@i``:

    * ``"A"`` (MiLaN ``eval.py``, torchmetrics ``RetrievalMAP(top_k)``, DSRH, IBM):
      ``AP@k = S / N_rel@k``, 0 when nothing relevant is in the top k.
    * ``"B"`` = ``"truncated"`` (TREC-style truncated AP): ``AP@k = S / min(k, R)``, with R the
      number of relevant items in the whole database for that query; 0 when R = 0.
    * ``"C"`` (DCMH/DJSRH/DUCH ``calc_map_k``): ``AP = (1/m) sum_{j<=m} j / pos_j``, m = min(k, R),
      pos_j the rank of the j-th relevant item in the *full* ranking (may exceed k); 0 if R = 0.
    * ``"D"`` (Tang group ``cal_AP``): ``AP@k = S / k``.

    At k = N, A, B and C coincide.
    """
    arr = _as_ranked(ranked)
    return float(np.mean(_average_precision(arr, _check_k(k), variant, n_relevant)))


def _precision(ranked: npt.NDArray[np.generic], k: int) -> npt.NDArray[np.float64]:
    return (ranked[:, :k] > 0).sum(axis=1) / k


def precision_at_k(ranked: npt.ArrayLike, k: int) -> float:
    """Mean P@k = N_rel@k / k: the fraction of the top k that is relevant."""
    return float(np.mean(_precision(_as_ranked(ranked), _check_k(k))))


def _recall(
    ranked: npt.NDArray[np.generic], k: int, n_relevant: npt.ArrayLike | None
) -> npt.NDArray[np.float64]:
    hits = (ranked[:, :k] > 0).sum(axis=1)
    return _safe_div(hits, _relevant_count(ranked, n_relevant))


def recall_at_k(ranked: npt.ArrayLike, k: int, *, n_relevant: npt.ArrayLike | None = None) -> float:
    """Mean R@k = N_rel@k / R: the share of all relevant items found in the top k (0 if R = 0)."""
    return float(np.mean(_recall(_as_ranked(ranked), _check_k(k), n_relevant)))


def _acg(ranked: npt.NDArray[np.generic], k: int) -> npt.NDArray[np.float64]:
    return ranked[:, :k].astype(np.float64).sum(axis=1) / k


def acg_at_k(ranked: npt.ArrayLike, k: int) -> float:
    """Mean ACG@k = (1/k) sum_{i<=k} s_i (DSRH): the average graded relevance of the top k."""
    return float(np.mean(_acg(_as_ranked(ranked), _check_k(k))))


def _dcg(gains: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return (gains / np.log2(_positions(gains.shape[1]) + 1.0)).sum(axis=1)


def _ideal_gains(ranked: npt.NDArray[np.generic], k: int) -> npt.NDArray[np.float64]:
    """Gains ``2^s - 1`` of the best min(k, N) items of each whole row, best first."""
    top = min(k, ranked.shape[1])
    # a full sort: numpy's vectorised sorts beat partition on these many-tied small integers
    best = np.sort(ranked, axis=1)[:, : -top - 1 : -1]
    return np.exp2(best.astype(np.float64)) - 1.0


def _ndcg(
    ranked: npt.NDArray[np.generic], k: int, ideal_gains: npt.NDArray[np.float64] | None = None
) -> npt.NDArray[np.float64]:
    """Per-query NDCG@k; ``ideal_gains`` (from :func:`_ideal_gains` at any k' >= k) saves a sort."""
    top = min(k, ranked.shape[1])
    ideal = _ideal_gains(ranked, k) if ideal_gains is None else ideal_gains[:, :top]
    gains = np.exp2(ranked[:, :top].astype(np.float64)) - 1.0
    return _safe_div(_dcg(gains), _dcg(ideal))


def ndcg_at_k(ranked: npt.ArrayLike, k: int) -> float:
    """Mean NDCG@k with gain ``2^s - 1`` and discount ``1/log2(1 + i)`` (DSRH).

    IDCG@k is the DCG@k of the ideal ordering of *all* database items in the row (not a re-sort
    of the retrieved top k, which would be optimistic); a query with no relevant item scores 0.
    """
    return float(np.mean(_ndcg(_as_ranked(ranked), _check_k(k))))


def _weighted_ap(ranked: npt.NDArray[np.generic], k: int) -> npt.NDArray[np.float64]:
    graded = ranked[:, :k].astype(np.float64)
    acg_at_i = graded.cumsum(axis=1) / _positions(graded.shape[1])
    hits = graded > 0
    return _safe_div((acg_at_i * hits).sum(axis=1), hits.sum(axis=1))


def weighted_map_at_k(ranked: npt.ArrayLike, k: int) -> float:
    """Mean WAP@k = (1/N_rel@k) sum_{i<=k} rel_i * ACG@i (DSRH weighted mAP; 0 if N_rel@k = 0).

    ``ACG@i = (1/i) sum_{j<=i} s_j``; the range is [0, number of labels], not [0, 1]. With binary
    relevance it equals mAP variant A.
    """
    return float(np.mean(_weighted_ap(_as_ranked(ranked), _check_k(k))))


def per_query_metrics(
    ranked: npt.ArrayLike,
    ks: Iterable[int] = DEFAULT_KS,
    *,
    include_graded: bool = True,
    n_relevant: npt.ArrayLike | None = None,
) -> dict[str, npt.NDArray[np.float64]]:
    """Per-query values (for means, spreads or paired tests) of every ranking metric at each k.

    Keys per k: ``map_at_{k}`` (variant A), ``map_at_{k}_truncated`` (variant B),
    ``precision_at_{k}``, ``recall_at_{k}``; with ``include_graded`` also ``ndcg_at_{k}``,
    ``acg_at_{k}`` and ``wmap_at_{k}``. This is the one ranking-to-metrics step that
    :func:`evaluate_codes` and :func:`evaluate_float` share.
    """
    arr = _as_ranked(ranked)
    ks = [_check_k(k) for k in ks]
    ideal = _ideal_gains(arr, max(ks)) if include_graded and ks else None
    out: dict[str, npt.NDArray[np.float64]] = {}
    for k in ks:
        out[f"map_at_{k}"] = _average_precision(arr, k, "A", n_relevant)
        out[f"map_at_{k}_truncated"] = _average_precision(arr, k, "truncated", n_relevant)
        out[f"precision_at_{k}"] = _precision(arr, k)
        out[f"recall_at_{k}"] = _recall(arr, k, n_relevant)
        if include_graded:
            out[f"ndcg_at_{k}"] = _ndcg(arr, k, ideal)
            out[f"acg_at_{k}"] = _acg(arr, k)
            out[f"wmap_at_{k}"] = _weighted_ap(arr, k)
    return out


# --------------------------------------------------------------------------- Hamming-radius metrics


def _radius_counts(
    distances: npt.ArrayLike,
    relevance: npt.ArrayLike,
    max_radius: int,
    mask: npt.NDArray[np.bool_] | None,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Items and relevant items within radius r, for r = 0..max_radius: two (Q, r+1) arrays."""
    dist = np.asarray(distances)
    rel = np.asarray(relevance) > 0
    if dist.ndim != 2 or dist.dtype.kind not in "iu" or rel.shape != dist.shape:
        raise ValueError(
            f"need integer distances and relevance of the same 2-D shape, got "
            f"{dist.dtype} {dist.shape} and {rel.shape}"
        )
    if dist.size and dist.min() < 0:
        raise ValueError("Hamming distances cannot be negative")
    if max_radius < 0:
        raise ValueError(f"radius must be >= 0, got {max_radius}")
    n_q = dist.shape[0]
    bins = max_radius + 2  # the last bin collects everything farther than max_radius
    flat = np.minimum(dist, max_radius + 1).astype(np.intp) + bins * np.arange(n_q)[:, None]
    keep = np.ones(dist.shape, dtype=bool) if mask is None else ~mask

    def cumulative(selected: npt.NDArray[np.bool_]) -> npt.NDArray[np.int64]:
        counts = np.bincount(flat[selected], minlength=n_q * bins).reshape(n_q, bins)
        return counts[:, :-1].cumsum(axis=1)

    return cumulative(keep), cumulative(keep & rel)


def _radius_precision(
    distances: npt.ArrayLike,
    relevance: npt.ArrayLike,
    radius: int,
    mask: npt.NDArray[np.bool_] | None,
) -> npt.NDArray[np.float64]:
    ball, hits = _radius_counts(distances, relevance, radius, mask)
    return _safe_div(hits[:, -1], ball[:, -1])


def precision_within_hamming_radius(
    distances: npt.ArrayLike,
    relevance: npt.ArrayLike,
    radius: int = 2,
    *,
    exclude: npt.ArrayLike | None = None,
    self_index: npt.ArrayLike | None = None,
) -> float:
    """Mean over queries of the precision of the items at Hamming distance <= ``radius``.

    ``distances`` and ``relevance`` are (Q, N) in database order. A query whose ball is empty
    scores 0 (the usual deep-hashing convention) and still counts in the mean.
    """
    mask = _exclusion_mask(np.shape(distances), exclude, self_index)
    return float(np.mean(_radius_precision(distances, relevance, radius, mask)))


def pr_curve(
    distances: npt.ArrayLike,
    relevance: npt.ArrayLike,
    bits: int,
    *,
    exclude: npt.ArrayLike | None = None,
    self_index: npt.ArrayLike | None = None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Precision and recall of Hamming-ball retrieval at every radius r = 0..bits (two arrays).

    Per query: ``P(r) = TP(r) / |ball(r)|`` (0 for an empty ball, as in
    :func:`precision_within_hamming_radius`) and ``R(r) = TP(r) / R``; both are averaged over the
    queries with R >= 1 (a query with nothing relevant has no PR curve).
    """
    dist = np.asarray(distances)
    if dist.size and dist.max() > bits:
        raise ValueError(f"distances exceed bits={bits}")
    mask = _exclusion_mask(dist.shape, exclude, self_index)
    ball, hits = _radius_counts(dist, relevance, bits, mask)
    total = hits[:, -1]
    has_relevant = total > 0
    if not has_relevant.any():
        raise ValueError("no query has a relevant database item: the PR curve is undefined")
    precision = _safe_div(hits, ball)[has_relevant].mean(axis=0)
    recall = (hits[has_relevant] / total[has_relevant, None]).mean(axis=0)
    return precision, recall


# --------------------------------------------------------------------------- random baseline


class RandomBaseline(NamedTuple):
    """A metric under uniformly random rankings: mean and standard deviation over draws."""

    mean: float
    std: float


def random_ranking_baseline(
    relevance: npt.ArrayLike,
    k: int,
    metric: RankingMetric = map_at_k,
    n_draws: int = 100,
    seed: int = 0,
    *,
    exclude: npt.ArrayLike | None = None,
    self_index: npt.ArrayLike | None = None,
) -> RandomBaseline:
    """``metric(ranked, k)`` when every query's (non-excluded) items are shuffled uniformly.

    ``relevance`` is (Q, N) in database order. Publish this beside every result: some metrics
    (e.g. mAP variant A with any-overlap relevance) are high even for random rankings.
    Example: ``random_ranking_baseline(rel, 20, functools.partial(map_at_k, variant="B"))``.
    """
    rel = np.asarray(relevance)
    if rel.ndim != 2:
        raise ValueError(f"relevance must be 2-D (Q, N), got shape {rel.shape}")
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    kept = _drop_excluded(rel, _exclusion_mask(rel.shape, exclude, self_index))
    rng = np.random.default_rng(seed)
    values = [metric(rng.permuted(kept, axis=1), k) for _ in range(n_draws)]
    return RandomBaseline(float(np.mean(values)), float(np.std(values)))


# --------------------------------------------------------------------------- evaluation


def _is_multi_label(
    query_labels: npt.NDArray[np.generic],
    db_labels: npt.NDArray[np.generic],
    multi_label: bool | None,
) -> bool:
    """Resolve ``multi_label``: None means multi-hot (2-D) labels are multi-label."""
    inferred = query_labels.ndim == 2
    if multi_label is None:
        multi_label = inferred
    if multi_label != inferred or db_labels.ndim != query_labels.ndim:
        raise ValueError(
            f"multi_label={multi_label} needs {'2-D multi-hot' if multi_label else '1-D class'} "
            f"labels, got shapes {query_labels.shape} and {db_labels.shape}"
        )
    return multi_label


def _evaluate(
    block_distances: Callable[[slice], npt.NDArray[np.generic]],
    n_database: int,
    query_labels: npt.ArrayLike,
    db_labels: npt.ArrayLike,
    *,
    ks: Sequence[int],
    multi_label: bool | None,
    self_index: npt.ArrayLike | None,
    exclude: npt.ArrayLike | None,
    radius: int | None,
    random_draws: int,
    seed: int,
    query_block: int,
) -> dict[str, float]:
    """Rank query blocks, score them with :func:`per_query_metrics`, return the means."""
    yq, yd = np.asarray(query_labels), np.asarray(db_labels)
    multi = _is_multi_label(yq, yd, multi_label)
    n_q = len(yq)
    if len(yd) != n_database:
        raise ValueError(f"{len(yd)} database labels for {n_database} database items")
    if n_q == 0 or query_block < 1:
        raise ValueError("need at least one query and query_block >= 1")
    relevance_of = shared_label_counts if multi else single_label_relevance
    sx = None if self_index is None else np.asarray(self_index)
    ex = None if exclude is None else np.asarray(exclude)
    if sx is not None and sx.shape != (n_q,):
        raise ValueError(f"self_index must have shape ({n_q},), got {sx.shape}")
    if ex is not None and ex.shape != (n_q, n_database):
        raise ValueError(f"exclude must have shape ({n_q}, {n_database}), got {ex.shape}")
    rng = np.random.default_rng(seed)
    sums: dict[str, float] = {}

    def add(name: str, values: npt.NDArray[np.float64], weight: float = 1.0) -> None:
        sums[name] = sums.get(name, 0.0) + weight * float(values.sum())

    for start in range(0, n_q, query_block):
        rows = slice(start, min(start + query_block, n_q))
        dist = block_distances(rows)
        rel = relevance_of(yq[rows], yd)
        mask = _exclusion_mask(
            dist.shape, None if ex is None else ex[rows], None if sx is None else sx[rows]
        )
        ranked = ranked_relevance(rel, rank(dist, exclude=mask))
        for name, values in per_query_metrics(ranked, ks, include_graded=multi).items():
            add(name, values)
        if radius is not None:
            add(f"precision_within_radius_{radius}", _radius_precision(dist, rel, radius, mask))
        kept = _drop_excluded(rel, mask)
        for _ in range(random_draws):
            shuffled = rng.permuted(kept, axis=1)
            for name, values in per_query_metrics(shuffled, ks, include_graded=multi).items():
                add(f"random_{name}", values, 1.0 / random_draws)
    return {name: total / n_q for name, total in sums.items()}


def evaluate_codes(
    query_codes: npt.ArrayLike,
    db_codes: npt.ArrayLike,
    query_labels: npt.ArrayLike,
    db_labels: npt.ArrayLike,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    multi_label: bool | None = None,
    self_index: npt.ArrayLike | None = None,
    exclude: npt.ArrayLike | None = None,
    radius: int = 2,
    random_draws: int = 5,
    seed: int = 0,
    query_block: int = 1024,
) -> dict[str, float]:
    """Hamming-ranking retrieval metrics of packed codes, averaged over queries.

    Labels are 1-D class ids (single-label) or 2-D multi-hot arrays (multi-label: binary metrics
    use "shares >= 1 label", graded ones the number of shared labels); ``multi_label=None``
    infers which from their shape. Ties are broken by database index; ``self_index`` /
    ``exclude`` remove items (e.g. the query itself) from each ranking. Keys: those of
    :func:`per_query_metrics` for every k in ``ks`` (graded ones only for multi-label),
    ``precision_within_radius_{radius}``, and ``random_<key>`` for every ranking metric, averaged
    over ``random_draws`` uniformly random rankings (0 draws to skip). Queries are processed
    ``query_block`` at a time to bound memory.
    """
    q = _check_packed(query_codes, "query_codes")
    d = _check_packed(db_codes, "db_codes")
    return _evaluate(
        lambda rows: hamming_distances(q[rows], d),
        len(d),
        query_labels,
        db_labels,
        ks=ks,
        multi_label=multi_label,
        self_index=self_index,
        exclude=exclude,
        radius=radius,
        random_draws=random_draws,
        seed=seed,
        query_block=query_block,
    )


def evaluate_float(
    query_desc: npt.ArrayLike,
    db_desc: npt.ArrayLike,
    query_labels: npt.ArrayLike,
    db_labels: npt.ArrayLike,
    *,
    metric: DescriptorMetric | DistanceFn = "euclidean",
    ks: Sequence[int] = DEFAULT_KS,
    multi_label: bool | None = None,
    self_index: npt.ArrayLike | None = None,
    exclude: npt.ArrayLike | None = None,
    random_draws: int = 5,
    seed: int = 0,
    query_block: int = 1024,
) -> dict[str, float]:
    """The :func:`evaluate_codes` metrics for float descriptors ranked by ``metric`` distance.

    Same keys, except the Hamming-radius precision, which has no float counterpart. ``metric``
    may also be a method's own distance, ``metric(query_block, db_desc) -> (Q, N)`` (the
    survey's re-weighted or re-ranked distances: class-probability weights, query expansion).
    """
    q = np.asarray(query_desc, dtype=np.float64)
    d = np.asarray(db_desc, dtype=np.float64)
    return _evaluate(
        lambda rows: (
            metric(q[rows], d) if callable(metric) else descriptor_distances(q[rows], d, metric)
        ),
        len(d),
        query_labels,
        db_labels,
        ks=ks,
        multi_label=multi_label,
        self_index=self_index,
        exclude=exclude,
        radius=None,
        random_draws=random_draws,
        seed=seed,
        query_block=query_block,
    )
