"""Relevance feedback: Rocchio refinement of a query descriptor (survey refs [11], [19]).

The user marks some results relevant and some not relevant; the query moves towards the mean
of the relevant descriptors and away from the mean of the not relevant ones::

    q' = alpha * q + beta * mean(relevant) - gamma * mean(not_relevant)

with the classic defaults alpha = 1, beta = 0.75, gamma = 0.15 (Rocchio 1971; Salton & Buckley
1990). An empty group drops its term. The API (``similarity.feedback``) and the AID benchmark
(``benchmarks/aid_feedback.py``) both use :func:`rocchio`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

ALPHA = 1.0
BETA = 0.75
GAMMA = 0.15


def rocchio(
    q: npt.ArrayLike,
    relevant: Sequence[npt.ArrayLike] | npt.ArrayLike = (),
    not_relevant: Sequence[npt.ArrayLike] | npt.ArrayLike = (),
    alpha: float = ALPHA,
    beta: float = BETA,
    gamma: float = GAMMA,
) -> npt.NDArray[np.float32]:
    """The refined query ``alpha q + beta mean(relevant) - gamma mean(not_relevant)`` (float32).

    ``relevant`` / ``not_relevant`` are sequences (or 2-D arrays) of descriptors of ``q``'s
    dimension; an empty one contributes nothing. ValueError on a dimension mismatch.
    """
    query = np.asarray(q, dtype=np.float64)
    if query.ndim != 1 or query.size == 0:
        raise ValueError("the query descriptor must be a non-empty 1-D vector")
    out = alpha * query
    for vectors, weight, name in (
        (relevant, beta, "relevant"),
        (not_relevant, -gamma, "not_relevant"),
    ):
        arr = np.asarray(vectors, dtype=np.float64)
        if arr.size == 0:
            continue
        if arr.ndim != 2 or arr.shape[1] != query.size:
            raise ValueError(
                f"{name} descriptors must have the query's dimension {query.size}, "
                f"got shape {arr.shape}"
            )
        out = out + weight * arr.mean(axis=0)
    return out.astype(np.float32)
