"""The traditional hashers of shallow_hashing on small hand-checkable cases."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stac_rscbir.models.shallow_hashing import KLSH, KSLH, PLSH, PRH, fit_hasher


def test_klsh_linear_kernel_is_the_explicit_hyperplane() -> None:
    """With k(x, y) = x . y, KLSH bit k is sign((x - mean_A) . V U^T e_S / t), A_c = U s V^T."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 12))
    model = KLSH(8, seed=3, anchors=10, subset=4, kernel="linear").fit(x)
    assert model.anchors_ is not None and model.subsets_ is not None
    centred = model.anchors_ - model.anchors_.mean(axis=0)
    u, s, vt = np.linalg.svd(centred, full_matrices=False)
    keep = s > 1e-8 * s.max()
    u, vt = u[:, keep], vt[keep]
    indicator = np.zeros((10, 8))
    for bit, subset in enumerate(model.subsets_):
        indicator[subset, bit] = 1 / 4
    queries = rng.standard_normal((25, 12))
    expected = (queries - model.anchors_.mean(axis=0)) @ vt.T @ u.T @ indicator > 0
    np.testing.assert_array_equal(model.encode(queries), expected.astype(np.uint8))


def test_klsh_rbf_is_seeded_and_shaped() -> None:
    x = np.random.default_rng(0).standard_normal((60, 5))
    a = KLSH(16, seed=2, anchors=20, subset=5).fit(x).encode(x)
    b = KLSH(16, seed=2, anchors=20, subset=5).fit(x).encode(x)
    assert a.shape == (60, 16) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert 0 < a.mean() < 1


def _two_classes() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    y = np.repeat([0, 1], 30)
    x = rng.standard_normal((60, 6)) + np.where(y[:, None] == 0, -1.0, 1.0) * [2, 0, 0, 0, 0, 0]
    return x, y


def _fit_error(codes: np.ndarray, y: np.ndarray) -> float:
    """KSH's objective ||B B^T - r S||_F^2 with B in {-1, 1}."""
    b = 2.0 * codes - 1.0
    s = np.where(y[:, None] == y[None, :], 1.0, -1.0)
    return float(((b @ b.T - codes.shape[1] * s) ** 2).sum())


def test_kslh_separates_classes_and_fits_s_better_than_random() -> None:
    x, y = _two_classes()
    codes = KSLH(8, seed=0, anchors=20, labelled=60).fit(x, y).encode(x)
    ham = (codes[:, None, :] != codes[None, :, :]).sum(axis=2)
    same = y[:, None] == y[None, :]
    assert ham[same].mean() < ham[~same].mean()
    random = np.random.default_rng(0).integers(0, 2, codes.shape).astype(np.uint8)
    assert _fit_error(codes, y) < 0.5 * _fit_error(random, y)


def test_kslh_needs_labels() -> None:
    with pytest.raises(ValueError, match="labels"):
        KSLH(4).fit(np.ones((5, 2)))


def test_prh_random_part_is_seeded_and_learning_lowers_quantisation_loss() -> None:
    x = np.random.default_rng(2).standard_normal((200, 30)) @ np.diag(np.linspace(0.2, 3, 30))
    a, b = PRH(8, seed=4).fit(x), PRH(8, seed=4).fit(x)
    np.testing.assert_array_equal(a.encode(x), b.encode(x))
    assert not np.array_equal(a.random_, PRH(8, seed=5).fit(x).random_)
    random_only = PRH(8, seed=4, iterations=0).fit(x)
    np.testing.assert_array_equal(random_only.random_, a.random_)
    assert a.losses_[-1] < random_only.losses_[-1]
    assert all(later <= earlier + 1e-9 for earlier, later in itertools.pairwise(a.losses_))


def test_plsa_recovers_two_topics_and_loglik_never_decreases() -> None:
    """Docs 0-9 draw words 0-4, docs 10-19 words 5-9 (with a little noise)."""
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 2, (20, 10)).astype(float)
    counts[:10, :5] += rng.integers(5, 10, (10, 5))
    counts[10:, 5:] += rng.integers(5, 10, (10, 5))
    model = PLSH(2, seed=1, iterations=60).fit(counts)
    topic = model.posteriors(counts).argmax(axis=1)
    truth = np.repeat([0, 1], 10)
    assert (topic == truth).all() or (topic == 1 - truth).all()
    assert all(b >= a - 1e-9 for a, b in itertools.pairwise(model.loglik_))
    codes = model.encode(counts)
    assert codes.shape == (20, 2) and set(codes[:, 0]) == {0, 1}


def test_plsh_rejects_negative_histograms() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        PLSH(2).fit(-np.ones((3, 4)))


def test_prh_with_labels_gives_each_class_its_codeword() -> None:
    """Separable classes: the regression onto class codewords reproduces them on the train set."""
    x, y = _two_classes()
    model = PRH(8, seed=0, random_dim=6, ridge=1e-6).fit(x, y)
    codes = model.encode(x)
    ham = (codes[:, None, :] != codes[None, :, :]).sum(axis=2)
    same = y[:, None] == y[None, :]
    assert ham[same].mean() < ham[~same].mean()
    again = PRH(8, seed=0, random_dim=6, ridge=1e-6).fit(x, y)
    np.testing.assert_array_equal(again.encode(x), codes)


@pytest.mark.parametrize("name", ["lsh", "itq", "klsh", "kslh", "prh"])
def test_fit_hasher_gives_bits(name: str) -> None:
    x, y = _two_classes()
    codes = fit_hasher(name, 4, x, y, seed=0).encode(x)
    assert codes.shape == (60, 4) and codes.dtype == np.uint8
