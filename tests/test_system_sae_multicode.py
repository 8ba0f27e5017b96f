"""[13] the sparse auto-encoder of SIFT descriptors and [10] multicode hashing, on hand-computed
cases."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("cv2")
pytest.importorskip("sklearn")
pytest.importorskip("torch")

import torch

from stac_rscbir.descriptors.multicode import MultiCode, set_hamming
from stac_rscbir.descriptors.registry import DESCRIPTORS
from stac_rscbir.systems.sparse_ae import SiftSparseAE, SparseAutoencoder, kl_sparsity


def textured(n: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    """Random smooth-ish RGB images in [0, 1] (SIFT needs gradients)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        coarse = rng.random((size // 8, size // 8, 3)).astype(np.float32)
        out.append(np.kron(coarse, np.ones((8, 8, 1), np.float32)))
    return out


def test_kl_sparsity_on_hand_computed_mean_activations() -> None:
    # rho_hat = column means = (0.2, 0.5); rho = 0.05:
    # KL(.05||.2) = .05 ln(.25) + .95 ln(.95/.8) = 0.0939430
    # KL(.05||.5) = .05 ln(.1)  + .95 ln(1.9)    = 0.4946319
    h = torch.tensor([[0.1, 0.5], [0.3, 0.5]], dtype=torch.float64)
    assert kl_sparsity(h, 0.05).item() == pytest.approx(0.0939430 + 0.4946319, abs=1e-6)
    # no penalty where every unit's mean activation is the target
    assert kl_sparsity(torch.full((3, 4), 0.05, dtype=torch.float64), 0.05).item() == pytest.approx(
        0.0, abs=1e-12
    )


def hand_autoencoder() -> SparseAutoencoder:
    net = SparseAutoencoder(2, 2).double()
    with torch.no_grad():
        net.encoder.weight.copy_(torch.tensor([[1.0, -1.0], [0.0, 2.0]]))
        net.encoder.bias.copy_(torch.tensor([0.0, -1.0]))
        net.decoder.weight.copy_(torch.eye(2))
        net.decoder.bias.zero_()
    return net


def test_encoder_and_objective_on_a_hand_computed_case() -> None:
    net = hand_autoencoder()
    x = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    # W1 x + b1 = (0, 1) -> sigmoid = (0.5, 0.7310586)
    h = net.encode(x)
    np.testing.assert_allclose(h.detach().numpy(), [[0.5, 0.7310586]], atol=1e-7)
    # x_hat = h (identity decoder): 1/2 ((0.5-1)^2 + (0.7310586-1)^2) = 0.1611647; the decay
    # 0.1/2 (||W1||^2 + ||W2||^2) = 0.05 (1 + 1 + 4 + 2) = 0.4; beta = 0: no sparsity term
    assert net.loss(x, rho=0.05, beta=0.0, weight_decay=0.1).item() == pytest.approx(0.5611647)
    # with beta = 1 the one-row batch adds KL(.05||.5) + KL(.05||.7310586)
    kl = kl_sparsity(h, 0.05).item()
    assert net.loss(x, 0.05, 1.0, 0.0).item() == pytest.approx(0.1611647 + kl)


def test_sift_sae_shapes_and_pooling() -> None:
    images = textured(4)
    sae = SiftSparseAE(hidden=8, sample=64, epochs=2, batch=16).fit(images)
    mean = sae.transform(images)
    assert mean.shape == (4, 8) and mean.dtype == np.float32
    assert ((mean > 0) & (mean < 1)).all()  # means of sigmoid activations
    sae.pool = "max"
    assert (sae.transform(images) >= mean - 1e-6).all()  # the max bounds the mean
    with pytest.raises(ValueError, match="pool"):
        SiftSparseAE(pool="median")
    with pytest.raises(RuntimeError, match="fit"):
        SiftSparseAE().transform(images)


def test_set_hamming_on_two_images() -> None:
    # 2 codes of 4 bits per image. A = {1100, 0011}, B = {1110, 1100} (B's codes out of order).
    # H: a1-b1 = 1, a1-b2 = 0, a2-b1 = 3, a2-b2 = 4.
    # A -> B: mean(min(1, 0), min(3, 4)) = 1.5; B -> A: mean(min(1, 3), min(0, 4)) = 0.5
    # D(A, B) = (1.5 + 0.5) / 2 = 1.0
    a = [1, 1, 0, 0, 0, 0, 1, 1]
    b = [1, 1, 1, 0, 1, 1, 0, 0]
    rows = np.array([a, b], dtype=np.float64)
    np.testing.assert_allclose(set_hamming(rows, rows, bits=4), [[0.0, 1.0], [1.0, 0.0]])
    swapped = np.array([b[4:] + b[:4]], dtype=np.float64)  # a set: the order of codes is moot
    np.testing.assert_allclose(set_hamming(rows, swapped, bits=4), [[1.0], [0.0]])
    with pytest.raises(ValueError, match="4-bit codes"):
        set_hamming(rows[:, :6], rows[:, :6], bits=4)


def test_multicode_rows_are_fixed_sets_of_binary_codes() -> None:
    images = textured(5, seed=1)
    mc = MultiCode(bits=8, codes=3).fit(images)
    rows = mc.transform(images)
    assert rows.shape == (5, 24) and set(np.unique(rows)) <= {0.0, 1.0}
    dist = set_hamming(rows, rows, bits=8)
    np.testing.assert_allclose(np.diag(dist), 0.0)
    np.testing.assert_allclose(dist, dist.T)
    spec = DESCRIPTORS["multicode"]
    assert spec.distance is not None and spec.learns
    assert spec.distance(np.zeros((1, 256)), np.ones((2, 256))).tolist() == [[32.0, 32.0]]
    assert DESCRIPTORS["sift-sae"].learns and DESCRIPTORS["sift-sae"].distance is None
