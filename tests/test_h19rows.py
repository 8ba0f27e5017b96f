"""Issue 19 (h19rows): [4]'s sparse-reconstruction label likelihoods on hand-computed cases, and
the survey table assembled from result JSONs."""

from __future__ import annotations

import numpy as np
import pytest

from stac_rscbir.descriptors.spectral import label_likelihoods, likelihood_distance

# three orthonormal atoms: e1 carries label A, e2 label B, e3 both
ATOMS = np.eye(3)
LABELS = np.array([[1, 0], [0, 1], [1, 1]])


def test_likelihoods_of_orthonormal_atoms() -> None:
    # x = 0.8 e1 + 0.6 e2: OMP with 2 atoms takes e1 and e2, alpha = (0.8, 0.6, 0);
    # r_A = ||x - 0.8 e1|| = 0.6, r_B = ||x - 0.6 e2|| = 0.8 -> p = (0.4, 0.2)
    x = np.array([[0.8, 0.6, 0.0]])
    np.testing.assert_allclose(label_likelihoods(x, ATOMS, LABELS, nonzero=2), [[0.4, 0.2]])
    # one atom: e1 only (largest correlation) -> r_A = 0.6, r_B = ||x|| = 1
    np.testing.assert_allclose(label_likelihoods(x, ATOMS, LABELS, nonzero=1), [[0.4, 0.0]])
    # scale does not matter (rows and atoms are L2-normalised)
    np.testing.assert_allclose(label_likelihoods(5 * x, 3 * ATOMS, LABELS, nonzero=2), [[0.4, 0.2]])


def test_an_atom_explains_itself_unless_left_out() -> None:
    x = ATOMS[[2]]  # e3, labels A and B
    np.testing.assert_allclose(label_likelihoods(x, ATOMS, LABELS, nonzero=1), [[1.0, 1.0]])
    # without itself e3 is orthogonal to every atom: OMP's least squares gives alpha = 0
    np.testing.assert_allclose(
        label_likelihoods(x, ATOMS, LABELS, nonzero=1, exclude=[2]), [[0.0, 0.0]]
    )


def test_negative_coefficients_are_clipped() -> None:
    # atoms e1 (A) and (e1 + e2)/sqrt2 (B), x = (-0.6, 0.8): OMP takes e1 (|corr| 0.6 > 0.14),
    # alpha_1 = -0.6, residual (0, 0.8); then a2, and the exact solve x = -1.4 e1 + 0.8 sqrt2 a2:
    # r_A = ||x + 1.4 e1|| = ||(0.8, 0.8)|| = 1.13, r_B = ||x - (0.8, 0.8)|| = 1.4 -> p = (0, 0)
    atoms, labels = np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[1, 0], [0, 1]])
    x = [[-0.6, 0.8]]
    np.testing.assert_allclose(label_likelihoods(x, atoms, labels, nonzero=2), [[0, 0]], atol=1e-12)
    # one atom: e1 alone, r_A = ||(0, 0.8)|| = 0.8 -> p_A = 0.2
    np.testing.assert_allclose(label_likelihoods(x, atoms, labels, nonzero=1), [[0.2, 0.0]])


def test_zero_rows_and_bad_labels() -> None:
    np.testing.assert_array_equal(label_likelihoods(np.zeros((1, 3)), ATOMS, LABELS), [[0, 0]])
    with pytest.raises(ValueError, match="atom_labels"):
        label_likelihoods(np.ones((1, 3)), ATOMS, LABELS[:2])


def test_likelihood_distance_is_cosine_with_descriptor_ties() -> None:
    # p(q) = (1, 0): cosine distance 0 to (2, 0) and (1, 0), 1 to (0, 1) and to the zero vector,
    # 1 - 1/sqrt2 to (1, 1); equal likelihoods are ordered by 1e-3 * ||x_q - x_a||
    db_p = [[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]]
    db_x = [[3.0], [4.0], [0.0], [0.0], [0.0]]
    d = likelihood_distance([[1.0, 0.0]], db_p, [[0.0]], db_x)
    np.testing.assert_allclose(d, [[0.003, 0.004, 1.0, 1.0, 1.0 - np.sqrt(0.5)]])
