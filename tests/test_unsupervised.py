"""LSH and ITQ baselines: fit/encode phases, determinism, ITQ's quantization objective."""

from __future__ import annotations

import numpy as np
import pytest

from stac_rscbir.models.unsupervised import ITQ, LSH


def clustered(n_per: int = 50, d: int = 32, k: int = 4, seed: int = 0) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=4.0, size=(k, d))
    x = np.concatenate([c + rng.normal(size=(n_per, d)) for c in centres])
    return x, np.repeat(np.arange(k), n_per)


def quantization_error(itq: ITQ, x: np.ndarray) -> float:
    v = (x - itq.mean_) @ itq.projection_  # type: ignore[operator]
    return float(np.square(np.where(v >= 0, 1.0, -1.0) - v).sum())


def test_lsh_is_seeded_and_shaped() -> None:
    x, _ = clustered()
    a = LSH(16, seed=1).fit(x).encode(x)
    b = LSH(16, seed=1).fit(x).encode(x)
    c = LSH(16, seed=2).fit(x).encode(x)
    assert a.shape == (200, 16) and a.dtype == np.uint8 and set(np.unique(a)) <= {0, 1}
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_itq_rotation_lowers_quantization_error_below_its_start() -> None:
    x, _ = clustered()
    start = ITQ(16, iterations=0, seed=3).fit(x)
    learned = ITQ(16, iterations=50, seed=3).fit(x)
    assert quantization_error(learned, x) < quantization_error(start, x)
    proj = learned.projection_
    # PCA basis times an orthogonal rotation: the columns stay orthonormal
    np.testing.assert_allclose(proj.T @ proj, np.eye(16), atol=1e-8)  # type: ignore[union-attr]


@pytest.mark.parametrize("method", [LSH, ITQ])
def test_codes_keep_clusters_apart(method: type) -> None:
    x, y = clustered()
    codes = method(32, seed=0).fit(x).encode(x)
    dist = (codes[:, None, :] != codes[None, :, :]).sum(-1)
    same = dist[y[:, None] == y[None, :]].mean()
    other = dist[y[:, None] != y[None, :]].mean()
    assert same < other / 2


def test_errors_are_clear() -> None:
    with pytest.raises(RuntimeError, match="before fit"):
        ITQ(8).encode(np.ones((2, 8)))
    with pytest.raises(ValueError, match=r"bits <= min\(n, d\) = 4"):
        ITQ(8).fit(np.random.default_rng(0).normal(size=(10, 4)))
    with pytest.raises(ValueError, match="contains NaN"):
        LSH(8).fit(np.full((3, 4), np.nan))
    with pytest.raises(ValueError, match=r"\(n, d\) matrix"):
        LSH(8).fit(np.ones(5))
