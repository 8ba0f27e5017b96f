"""Behavioural tests of stac_rscbir.models.losses (the survey's Table 3 losses)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from stac_rscbir.models import losses as L

torch.set_num_threads(1)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


def hadamard(n: int) -> Tensor:
    """Sylvester Hadamard matrix (n a power of 2): ±1 entries, HᵀH = n·I."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def close(a: Tensor, b: float | Tensor, tol: float = 1e-10) -> bool:
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64),
        torch.as_tensor(b, dtype=torch.float64),
        atol=tol,
        rtol=tol,
    )


# --------------------------------------------------------------------------------------------
# gradients flow for every loss
# --------------------------------------------------------------------------------------------


def _leaf(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    return (randn(*shape, seed=seed) * scale).requires_grad_(True)


def _case_contrastive() -> tuple[Tensor, list[Tensor]]:
    x1, x2 = _leaf(4, 3, seed=1, scale=0.3), _leaf(4, 3, seed=2, scale=0.3)
    sim = torch.tensor([1, 0, 1, 0])
    return L.contrastive_loss(x1, x2, sim, margin=2.0), [x1, x2]


def _case_pairwise_contrastive() -> tuple[Tensor, list[Tensor]]:
    e = _leaf(5, 3, seed=3, scale=0.3)
    y = torch.tensor([0, 0, 1, 1, 2])
    return L.pairwise_contrastive_loss(e, (y[:, None] == y[None]).double(), margin=2.0), [e]


def _case_likelihood() -> tuple[Tensor, list[Tensor]]:
    u = _leaf(5, 8, seed=4)
    y = torch.tensor([0, 0, 1, 1, 2])
    return L.pairwise_likelihood_loss(u, (y[:, None] == y[None]).double()), [u]


def _case_triplet() -> tuple[Tensor, list[Tensor]]:
    a, p, n = (_leaf(4, 6, seed=s) for s in (5, 6, 7))
    return L.triplet_loss(a, p, n, margin=5.0), [a, p, n]


def _case_triplet_unnormalised_unsquared() -> tuple[Tensor, list[Tensor]]:
    a, p, n = (_leaf(4, 6, seed=s) for s in (5, 6, 7))
    return L.triplet_loss(a, p, n, margin=5.0, normalize=False, squared=False), [a, p, n]


def _case_triplet_indices() -> tuple[Tensor, list[Tensor]]:
    e = _leaf(6, 4, seed=8)
    t = torch.tensor([[0, 1, 2], [3, 4, 5], [1, 0, 5]])
    return L.triplet_loss_from_indices(e, t, margin=5.0), [e]


def _case_adversarial_generator() -> tuple[Tensor, list[Tensor]]:
    torch.manual_seed(0)
    h = _leaf(8, 6, seed=9, scale=0.2)
    d = L.HashDiscriminator(6).double()
    g_loss, _ = L.adversarial_losses(d, h, generator=gen(1))
    return g_loss, [h]


def _case_reconstruction() -> tuple[Tensor, list[Tensor]]:
    x = randn(2, 3, 4, 4, seed=10)
    x_hat = _leaf(2, 3, 4, 4, seed=11)
    mask = torch.rand(2, 1, 4, 4, generator=gen(12)) > 0.3
    return L.reconstruction_loss(x, x_hat, mask), [x_hat]


def _case_cross_entropy() -> tuple[Tensor, list[Tensor]]:
    z = _leaf(4, 5, seed=13)
    return L.cross_entropy_loss(z, torch.tensor([0, 4, 2, 2])), [z]


def _case_bce() -> tuple[Tensor, list[Tensor]]:
    z = _leaf(4, 5, seed=14)
    y = (randn(4, 5, seed=15) > 0).double()
    return L.multilabel_bce_loss(z, y), [z]


def _case_balance(mode: str, space: str) -> Callable[[], tuple[Tensor, list[Tensor]]]:
    def case() -> tuple[Tensor, list[Tensor]]:
        raw = _leaf(6, 8, seed=16)
        h = torch.tanh(raw) if space == "pm1" else torch.sigmoid(raw)
        return L.bit_balance_loss(h, mode=mode, space=space), [raw]  # type: ignore[arg-type]

    return case


def _case_decorrelation() -> tuple[Tensor, list[Tensor]]:
    raw = _leaf(6, 8, seed=17)
    return L.bit_decorrelation_loss(torch.tanh(raw)), [raw]


def _case_quantization(space: str) -> Callable[[], tuple[Tensor, list[Tensor]]]:
    def case() -> tuple[Tensor, list[Tensor]]:
        raw = _leaf(6, 8, seed=18)
        h = torch.tanh(raw) if space == "pm1" else torch.sigmoid(raw)
        return L.quantization_loss(h, space=space), [raw]  # type: ignore[arg-type]

    return case


def _case_push() -> tuple[Tensor, list[Tensor]]:
    raw = _leaf(6, 8, seed=19)
    return L.milan_push_loss(torch.sigmoid(raw)), [raw]


def _case_nt_xent(cross: bool) -> Callable[[], tuple[Tensor, list[Tensor]]]:
    def case() -> tuple[Tensor, list[Tensor]]:
        z1, z2 = _leaf(5, 8, seed=20), _leaf(5, 8, seed=21)
        return L.nt_xent_loss(z1, z2, temperature=0.5, cross_modal_only=cross), [z1, z2]

    return case


def _case_csq() -> tuple[Tensor, list[Tensor]]:
    raw = _leaf(6, 8, seed=22)
    centres = torch.where(randn(6, 8, seed=23) >= 0, 1.0, -1.0).double()
    return L.csq_loss(torch.tanh(raw), centres), [raw]


def _case_csq_quantization(form: str) -> Callable[[], tuple[Tensor, list[Tensor]]]:
    def case() -> tuple[Tensor, list[Tensor]]:
        raw = _leaf(6, 8, seed=24)
        return L.csq_quantization_loss(torch.tanh(raw), form=form), [raw]  # type: ignore[arg-type]

    return case


def _case_orthohash(multi: bool) -> Callable[[], tuple[Tensor, list[Tensor]]]:
    def case() -> tuple[Tensor, list[Tensor]]:
        h = _leaf(6, 8, seed=25)
        y = torch.tensor([0, 1, 2, 0, 1, 2])
        labels = F.one_hot(y, 3) | torch.tensor([0, 0, 1]) if multi else y
        return L.orthohash_loss(h, labels, L.hash_centres(3, 8)), [h]

    return case


GRAD_CASES: dict[str, Callable[[], tuple[Tensor, list[Tensor]]]] = {
    "contrastive": _case_contrastive,
    "pairwise_contrastive": _case_pairwise_contrastive,
    "pairwise_likelihood": _case_likelihood,
    "triplet": _case_triplet,
    "triplet_raw_euclidean": _case_triplet_unnormalised_unsquared,
    "triplet_from_indices": _case_triplet_indices,
    "adversarial_generator": _case_adversarial_generator,
    "reconstruction_masked": _case_reconstruction,
    "cross_entropy": _case_cross_entropy,
    "multilabel_bce": _case_bce,
    "balance_per_bit_pm1": _case_balance("per_bit", "pm1"),
    "balance_per_code_pm1": _case_balance("per_code", "pm1"),
    "balance_per_bit_01": _case_balance("per_bit", "01"),
    "balance_per_code_01": _case_balance("per_code", "01"),
    "decorrelation": _case_decorrelation,
    "quantization_pm1": _case_quantization("pm1"),
    "quantization_01": _case_quantization("01"),
    "milan_push": _case_push,
    "nt_xent": _case_nt_xent(False),
    "nt_xent_cross_modal": _case_nt_xent(True),
    "csq_central": _case_csq,
    "csq_quantization_log_cosh": _case_csq_quantization("log_cosh"),
    "csq_quantization_squared": _case_csq_quantization("squared"),
    "orthohash_single_label": _case_orthohash(False),
    "orthohash_multi_label": _case_orthohash(True),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradients_flow_to_inputs(name: str) -> None:
    loss, leaves = GRAD_CASES[name]()
    assert loss.ndim == 0
    assert torch.isfinite(loss)
    loss.backward()
    for leaf in leaves:
        assert leaf.grad is not None, name
        assert torch.isfinite(leaf.grad).all(), name
        assert leaf.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------
# contrastive
# --------------------------------------------------------------------------------------------


def test_contrastive_hand_values() -> None:
    x1 = torch.zeros(3, 2, dtype=torch.float64)
    x2 = torch.tensor([[3.0, 4.0], [0.3, 0.4], [1.2, 1.6]], dtype=torch.float64)  # d = 5, 0.5, 2
    sim = torch.tensor([1, 0, 0])
    # similar: 5² = 25; dissimilar d=0.5 < m=1: (1-0.5)² = 0.25; dissimilar d=2 >= 1: 0
    assert close(L.contrastive_loss(x1, x2, sim, margin=1.0), (25 + 0.25 + 0) / 3)
    # margin 3: the last pair now violates by 1 → (3-0.5)² + (3-2)²
    assert close(L.contrastive_loss(x1, x2, sim, margin=3.0), (25 + 6.25 + 1) / 3)


def test_contrastive_exactly_zero_when_margin_met() -> None:
    x1 = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    x2 = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 0.0]], dtype=torch.float64)
    sim = torch.tensor([True, True, False])
    x2.requires_grad_(True)
    loss = L.contrastive_loss(x1, x2, sim, margin=3.0)  # dissimilar pair exactly at margin
    assert loss.item() == 0.0
    loss.backward()  # identical similar pairs: sqrt at 0 must not give NaN
    assert torch.isfinite(x2.grad).all()
    # a dissimilar pair that is identical is maximally violated: m²
    assert close(L.contrastive_loss(x1[:1], x1[:1], torch.tensor([0]), margin=3.0), 9.0)


def test_pairwise_contrastive_hand_values_and_matches_pair_loop() -> None:
    e = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    s = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float64)
    # pairs (0,1) similar d=1 → 1; (0,2) dissimilar d=3 ≥ 2 → 0; (1,2) dissimilar d=2 ≥ 2 → 0
    assert close(L.pairwise_contrastive_loss(e, s, margin=2.0), 1 / 3)
    # margin 2.5: (1,2) violates by 0.5 → 0.25
    assert close(L.pairwise_contrastive_loss(e, s, margin=2.5), (1 + 0 + 0.25) / 3)

    x = randn(6, 4, seed=30)
    y = torch.tensor([0, 1, 0, 2, 1, 0])
    sm = (y[:, None] == y[None]).long()
    i, j = torch.triu_indices(6, 6, offset=1)
    expected = L.contrastive_loss(x[i], x[j], sm[i, j], margin=2.5)
    assert close(L.pairwise_contrastive_loss(x, sm, margin=2.5), expected, tol=1e-9)


# --------------------------------------------------------------------------------------------
# pairwise likelihood (DPSH / DHNN)
# --------------------------------------------------------------------------------------------


def _naive_likelihood(u: Tensor, v: Tensor, s: Tensor, skip_diag: bool) -> float:
    total, count = 0.0, 0
    for i in range(u.shape[0]):
        for j in range(v.shape[0]):
            if skip_diag and i == j:
                continue
            theta = 0.5 * sum(float(a) * float(b) for a, b in zip(u[i], v[j], strict=True))
            total += -(float(s[i, j]) * theta - math.log1p(math.exp(theta)))
            count += 1
    return total / count


def test_pairwise_likelihood_matches_naive_double_loop() -> None:
    u = randn(5, 6, seed=31)
    y = torch.tensor([0, 1, 0, 1, 2])
    s = (y[:, None] == y[None]).double()
    assert close(L.pairwise_likelihood_loss(u, s), _naive_likelihood(u, u, s, True), 1e-9)
    assert close(
        L.pairwise_likelihood_loss(u, s, exclude_self=False),
        _naive_likelihood(u, u, s, False),
        1e-9,
    )
    v = randn(4, 6, seed=32)  # memory bank form
    s2 = (torch.rand(5, 4, generator=gen(33)) > 0.5).double()
    assert close(L.pairwise_likelihood_loss(u, s2, v=v), _naive_likelihood(u, v, s2, False), 1e-9)


def test_pairwise_likelihood_is_stable_and_prefers_correct_similarity() -> None:
    u = randn(4, 16, seed=34) * 100.0  # |Θ| in the thousands: naive exp overflows
    s = torch.eye(4, dtype=torch.float64)
    loss = L.pairwise_likelihood_loss(u.float().requires_grad_(True), s)
    assert torch.isfinite(loss)
    codes = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]]) * 3
    s_good = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]])
    s_bad = 1 - s_good
    assert L.pairwise_likelihood_loss(codes, s_good) < L.pairwise_likelihood_loss(codes, s_bad)


# --------------------------------------------------------------------------------------------
# triplet
# --------------------------------------------------------------------------------------------


def test_triplet_hand_values_raw_distances() -> None:
    a = torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    n = torch.tensor([[2.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    # squared: t0: 1 - 4 + 0.2 < 0 → 0 ; t1: 1 - 0.25 + 0.2 = 0.95
    assert close(L.triplet_loss(a, p, n, 0.2, normalize=False, squared=True), 0.95 / 2)
    # plain Euclidean: t0: 1 - 2 + 0.2 < 0 ; t1: 1 - 0.5 + 0.2 = 0.7
    assert close(L.triplet_loss(a, p, n, 0.2, normalize=False, squared=False), 0.7 / 2)
    assert L.triplet_loss(a[:1], p[:1], n[:1], 0.2, normalize=False).item() == 0.0


def test_triplet_milan_default_normalised_squared() -> None:
    a = torch.tensor([[3.0, 0.0]], dtype=torch.float64)  # normalised to (1, 0)
    p = torch.tensor([[0.0, 2.0]], dtype=torch.float64)  # (0, 1): d² = 2
    n = torch.tensor([[-5.0, 0.0]], dtype=torch.float64)  # (-1, 0): d² = 4
    assert L.triplet_loss(a, p, n).item() == 0.0  # 2 - 4 + 0.2 < 0: margin met
    assert close(L.triplet_loss(a, n, p), 4 - 2 + 0.2)  # swapped: violated
    # exactly at the margin: d_an = d_ap + alpha → 0
    assert L.triplet_loss(a, p, n, margin=2.0).item() == 0.0
    assert close(L.triplet_loss(a, p, n, margin=2.5), 0.5)
    # scale invariance from the L2 normalisation
    assert close(L.triplet_loss(a * 7, n * 0.1, p * 3), 2.2)


def test_triplet_from_indices_matches_explicit_and_handles_empty() -> None:
    e = randn(6, 5, seed=40)
    t = torch.tensor([[0, 1, 2], [3, 4, 5], [2, 0, 4], [5, 5, 1]])
    for normalize in (True, False):
        for squared in (True, False):
            expected = L.triplet_loss(e[t[:, 0]], e[t[:, 1]], e[t[:, 2]], 1.0, normalize, squared)
            got = L.triplet_loss_from_indices(e, t, 1.0, normalize, squared)
            assert close(got, expected)
    leaf = e.clone().requires_grad_(True)
    empty = L.triplet_loss_from_indices(leaf, torch.empty(0, 3, dtype=torch.long))
    assert empty.item() == 0.0
    empty.backward()
    assert leaf.grad is not None
    with pytest.raises(ValueError):
        L.triplet_loss_from_indices(e, torch.tensor([[0, 1, 6]]))


def test_triplet_unsquared_finite_grad_at_zero_distance() -> None:
    a = torch.ones(2, 3, requires_grad=True)
    loss = L.triplet_loss(a, a.detach().clone(), torch.zeros(2, 3) + 0.5, 5.0, False, False)
    loss.backward()
    assert torch.isfinite(a.grad).all()


# --------------------------------------------------------------------------------------------
# adversarial
# --------------------------------------------------------------------------------------------


def test_discriminator_loss_decreases_with_training() -> None:
    torch.manual_seed(0)
    k = 8
    disc = L.HashDiscriminator(k)
    codes = torch.tanh(0.3 * torch.randn(64, k, generator=gen(50)))  # relaxed, far from ±1
    params = list(disc.parameters())
    rng = gen(51)
    with torch.no_grad():
        _, d0 = L.adversarial_losses(disc, codes, generator=gen(52))
    # plain SGD steps by hand (constructing a torch.optim optimiser costs seconds on first use)
    for _ in range(40):
        _, d_loss = L.adversarial_losses(disc, codes, generator=rng)
        grads = torch.autograd.grad(d_loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= 1.0 * g
    with torch.no_grad():
        _, d1 = L.adversarial_losses(disc, codes, generator=gen(52))
    assert d1 < 0.5 * d0, (d0, d1)


def test_generator_loss_gradients_reach_codes_only() -> None:
    torch.manual_seed(1)
    disc = L.HashDiscriminator(6, hidden=16)
    codes = torch.rand(10, 6, generator=gen(53)).requires_grad_(True)
    g_loss, d_loss = L.adversarial_losses(disc, codes, space="01", generator=gen(54))
    assert torch.isfinite(g_loss) and torch.isfinite(d_loss)
    g_loss.backward(retain_graph=True)
    assert codes.grad is not None
    assert torch.isfinite(codes.grad).all() and codes.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())  # D's params are detached in g_loss
    codes.grad = None
    d_loss.backward()
    assert codes.grad is None  # codes are detached in d_loss
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in disc.parameters())


def test_binary_prior_samples() -> None:
    pm1 = L.sample_binary_prior(2000, 16, "pm1", generator=gen(55))
    z01 = L.sample_binary_prior(2000, 16, "01", generator=gen(55))
    assert set(pm1.unique().tolist()) == {-1.0, 1.0}
    assert set(z01.unique().tolist()) == {0.0, 1.0}
    assert L.bit_balance_loss(pm1, "per_bit", "pm1") < 1e-3
    assert L.bit_balance_loss(z01, "per_bit", "01") < 1e-3
    with pytest.raises(ValueError):
        L.adversarial_losses(L.HashDiscriminator(16), pm1, prior="gaussian")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# reconstruction, CE, BCE
# --------------------------------------------------------------------------------------------


def test_reconstruction_mse_and_nodata_mask() -> None:
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    x_hat = torch.tensor([[1.0, 0.0, 3.0, 5.0]], dtype=torch.float64)
    assert close(L.reconstruction_loss(x, x_hat), (4 + 1) / 4)
    mask = torch.tensor([[True, False, True, True]])
    assert close(L.reconstruction_loss(x, x_hat, mask), 1 / 3)
    # NaN nodata in the target: no NaN in loss or gradient
    x_nan = x.clone()
    x_nan[0, 1] = float("nan")
    leaf = x_hat.clone().requires_grad_(True)
    loss = L.reconstruction_loss(x_nan, leaf, mask)
    loss.backward()
    assert close(loss, 1 / 3)
    assert torch.isfinite(leaf.grad).all() and leaf.grad[0, 1] == 0
    # broadcast (B,1,H,W) mask over bands; all-masked → 0
    img, rec = randn(2, 3, 2, 2, seed=60), randn(2, 3, 2, 2, seed=61)
    m = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    m[0, 0, 0, 0] = True
    expected = (img[0, :, 0, 0] - rec[0, :, 0, 0]).pow(2).mean()
    assert close(L.reconstruction_loss(img, rec, m), expected)
    assert L.reconstruction_loss(img, rec, torch.zeros_like(m)).item() == 0.0


def test_cross_entropy_matches_torch_and_hand_value() -> None:
    assert close(L.cross_entropy_loss(torch.zeros(1, 2), torch.tensor([0])), math.log(2), 1e-6)
    z = randn(5, 4, seed=62)
    y = torch.tensor([3, 0, 1, 1, 2])
    manual = -(F.log_softmax(z, 1)[torch.arange(5), y]).mean()
    assert close(L.cross_entropy_loss(z, y), manual)
    assert close(L.cross_entropy_loss(z, y), F.cross_entropy(z, y))


def test_multilabel_bce_matches_torch_and_hand_value() -> None:
    assert close(L.multilabel_bce_loss(torch.zeros(2, 3), torch.ones(2, 3)), math.log(2), 1e-6)
    z = randn(4, 6, seed=63)
    y = (randn(4, 6, seed=64) > 0).double()
    p = torch.sigmoid(z)
    manual = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert close(L.multilabel_bce_loss(z, y), manual, 1e-9)
    assert close(L.multilabel_bce_loss(z, y), torch.nn.BCEWithLogitsLoss()(z, y))
    w = torch.arange(1.0, 7.0, dtype=torch.float64)
    assert close(
        L.multilabel_bce_loss(z, y, pos_weight=w),
        F.binary_cross_entropy_with_logits(z, y, pos_weight=w),
    )


# --------------------------------------------------------------------------------------------
# bit balance and decorrelation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["per_bit", "per_code"])
def test_bit_balance_zero_for_balanced_positive_for_constant(mode: str) -> None:
    balanced_pm1 = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]])
    balanced_01 = (balanced_pm1 + 1) / 2
    assert L.bit_balance_loss(balanced_pm1, mode, "pm1").item() == 0.0  # type: ignore[arg-type]
    assert L.bit_balance_loss(balanced_01, mode, "01").item() == 0.0  # type: ignore[arg-type]
    const = torch.ones(3, 4)
    assert close(L.bit_balance_loss(const, mode, "pm1"), 1.0)  # type: ignore[arg-type]
    assert close(L.bit_balance_loss(-const, mode, "pm1"), 1.0)  # type: ignore[arg-type]
    assert close(L.bit_balance_loss(const, mode, "01"), 0.25)  # type: ignore[arg-type]
    assert close(L.bit_balance_loss(0 * const, mode, "01"), 0.25)  # type: ignore[arg-type]


def test_bit_balance_modes_differ_as_documented() -> None:
    # every code is constant (unbalanced per code), but each bit is on for half the batch
    h = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    assert L.bit_balance_loss(h, "per_bit", "pm1").item() == 0.0
    assert close(L.bit_balance_loss(h, "per_code", "pm1"), 1.0)
    # MiLaN's coded term: mean_i (mean_k h_ik - 0.5)²
    s = torch.tensor([[0.9, 0.9, 0.6], [0.1, 0.3, 0.2]], dtype=torch.float64)
    milan = ((s.mean(1) - 0.5) ** 2).mean()
    assert close(L.bit_balance_loss(s, "per_code", "01"), milan)
    assert close(L.bit_balance_loss(s, "per_bit", "01"), ((s.mean(0) - 0.5) ** 2).mean())
    with pytest.raises(ValueError):
        L.bit_balance_loss(s, "per_image", "01")  # type: ignore[arg-type]


def test_decorrelation_zero_for_hadamard_positive_for_correlated() -> None:
    h = hadamard(8)
    assert L.bit_decorrelation_loss(h).item() == 0.0
    assert L.bit_decorrelation_loss((h + 1) / 2, space="01").item() == 0.0
    assert L.bit_decorrelation_loss(h[:, :4]).item() == 0.0  # a subset of orthogonal columns
    # all bits identical: every off-diagonal correlation is 1 → 12 of 16 entries → 0.75
    assert close(L.bit_decorrelation_loss(torch.ones(4, 4)), 12 / 16)
    dup = torch.cat([h[:, :2], h[:, :2]], 1)  # bits 0,2 and 1,3 duplicated → 4 entries of 1
    assert close(L.bit_decorrelation_loss(dup), 4 / 16)


# --------------------------------------------------------------------------------------------
# quantization and MiLaN push
# --------------------------------------------------------------------------------------------


def test_quantization_zero_for_binary_codes_and_hand_values() -> None:
    assert L.quantization_loss(hadamard(4)).item() == 0.0
    assert L.quantization_loss((hadamard(4) + 1) / 2, space="01").item() == 0.0
    # ±1: h = 0.5 everywhere → b = 1, ||b - h||² = K·0.25
    assert close(L.quantization_loss(torch.full((3, 4), 0.5)), 1.0)
    h01 = torch.tensor([[0.2, 0.9], [0.6, 0.5]], dtype=torch.float64)  # b = [0,1], [1,0]
    assert close(L.quantization_loss(h01, space="01"), ((0.04 + 0.01) + (0.16 + 0.25)) / 2)
    # explicit shared target (DA4DTE's B = sign(mean of two modalities)), detached
    h = torch.tensor([[0.5, -0.5]], requires_grad=True)
    loss = L.quantization_loss(h, target=torch.tensor([[-1.0, -1.0]], requires_grad=True))
    assert close(loss, 1.5**2 + 0.5**2, 1e-6)
    loss.backward()
    assert close(h.grad, torch.tensor([[3.0, 1.0]]), 1e-6)


def test_milan_push_values() -> None:
    assert L.milan_push_loss(torch.full((2, 4), 0.5)).item() == 0.0
    assert close(L.milan_push_loss(torch.tensor([[0.0, 1.0], [1.0, 1.0]])), -0.25)
    near = L.milan_push_loss(torch.full((2, 4), 0.6))
    far = L.milan_push_loss(torch.full((2, 4), 0.9))
    assert far < near < 0


# --------------------------------------------------------------------------------------------
# NT-Xent
# --------------------------------------------------------------------------------------------


def _naive_nt_xent(z1: Tensor, z2: Tensor, tau: float, cross_only: bool) -> float:
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    b = z1.shape[0]
    total = 0.0
    for i in range(2 * b):
        pos = (i + b) % (2 * b)
        denom = 0.0
        for j in range(2 * b):
            if j == i or (cross_only and (j < b) == (i < b)):
                continue
            denom += math.exp(float(z[i] @ z[j]) / tau)
        total += -(float(z[i] @ z[pos]) / tau - math.log(denom))
    return total / (2 * b)


@pytest.mark.parametrize("cross", [False, True])
def test_nt_xent_matches_naive_loop(cross: bool) -> None:
    z1, z2 = randn(4, 5, seed=70), randn(4, 5, seed=71)
    for tau in (0.5, 1.0, 0.1):
        got = L.nt_xent_loss(z1, z2, temperature=tau, cross_modal_only=cross)
        assert close(got, _naive_nt_xent(z1, z2, tau, cross), 1e-9)


def test_nt_xent_cross_modal_equals_symmetric_infonce() -> None:
    z1, z2 = randn(6, 5, seed=72), randn(6, 5, seed=73)
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    logits = a @ b.T / 0.5
    t = torch.arange(6)
    clip = 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t))
    assert close(L.nt_xent_loss(z1, z2, 0.5, cross_modal_only=True), clip)


def test_nt_xent_lower_for_aligned_than_shuffled() -> None:
    z1 = randn(16, 32, seed=74)
    aligned = z1 + 0.1 * randn(16, 32, seed=75)
    shuffled = aligned[torch.randperm(16, generator=gen(76))]
    for cross in (False, True):
        good = L.nt_xent_loss(z1, aligned, cross_modal_only=cross)
        bad = L.nt_xent_loss(z1, shuffled, cross_modal_only=cross)
        assert good < bad - 1.0


# --------------------------------------------------------------------------------------------
# hash centres / proxies: CSQ and OrthoHash
# --------------------------------------------------------------------------------------------


def _pairwise_hamming(codes: Tensor) -> Tensor:
    """Hamming distances between the different rows of a ±1 matrix, by counting."""
    i, j = torch.triu_indices(codes.shape[0], codes.shape[0], offset=1)
    return (codes[i] != codes[j]).sum(1)


def test_hash_centres_are_hadamard_rows_at_least_half_the_bits_apart() -> None:
    # bits a power of 2, C <= bits: the first C rows of H_bits (the official CSQ notebook)
    assert torch.equal(L.hash_centres(5, 8), hadamard(8)[:5].float())
    # bits < C <= 2·bits: then the rows of -H_bits
    c = L.hash_centres(12, 8)
    assert c.shape == (12, 8) and c.dtype == torch.float32
    assert torch.equal(c, torch.cat([hadamard(8), -hadamard(8)])[:12].float())
    d = _pairwise_hamming(c)
    assert int(d.min()) == 4  # bits / 2
    assert int(d.max()) == 8  # a row and its negation
    # 16 classes at 8 bits: 8 antipodal pairs, every other pair exactly bits/2 apart
    assert sorted(_pairwise_hamming(L.hash_centres(16, 8)).tolist()) == [4] * 112 + [8] * 8
    for bits in (16, 32, 64):
        d = _pairwise_hamming(L.hash_centres(30, bits))  # AID: 30 classes
        assert int(d.min()) >= bits // 2
    assert torch.equal(L.hash_centres(30, 32, seed=0), L.hash_centres(30, 32, seed=5))


def test_hash_centres_bernoulli_when_no_hadamard_matrix_fits() -> None:
    for n, bits in ((6, 12), (9, 4), (30, 48)):  # bits not a power of 2, or C > 2·bits
        c = L.hash_centres(n, bits, seed=3)
        assert c.shape == (n, bits)
        assert set(c.unique().tolist()) <= {-1.0, 1.0}
        assert torch.equal(c, L.hash_centres(n, bits, seed=3))  # seeded
        assert int(_pairwise_hamming(c).min()) >= bits / 4
    assert not torch.equal(L.hash_centres(6, 12, seed=3), L.hash_centres(6, 12, seed=4))
    # unreachable bound: the best of max_tries draws is kept, still ±1 and seeded
    far = L.hash_centres(20, 6, seed=1, min_distance=6, max_tries=5)
    assert far.shape == (20, 6) and torch.equal(
        far, L.hash_centres(20, 6, 1, min_distance=6, max_tries=5)
    )
    assert L.hash_centres(1, 3).shape == (1, 3)
    with pytest.raises(ValueError):
        L.hash_centres(0, 8)


def test_multilabel_centres_hand_case() -> None:
    centres = torch.tensor([[1.0, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, 1]])
    labels = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]])
    # sums of the label centres: [1,1,-1,-1], [2,0,0,-2], [3,-1,-1,-1], [0,0,0,0]
    expected = torch.tensor(
        [[1.0, 1, -1, -1], [1, 1, 1, -1], [1, -1, -1, -1], [1, 1, 1, 1]]  # ties -> +1
    )
    assert torch.equal(L.multilabel_centres(labels, centres), expected)
    tie = torch.tensor([-1.0, -1, 1, -1])
    expected_tie = torch.tensor(
        [[1.0, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, -1], [-1, -1, 1, -1]]
    )
    assert torch.equal(L.multilabel_centres(labels.bool(), centres, tie), expected_tie)
    with pytest.raises(ValueError):
        L.multilabel_centres(labels[:, :2], centres)
    with pytest.raises(ValueError):
        L.multilabel_centres(labels, centres, tie[:3])


def test_csq_loss_hand_values_and_bce_form() -> None:
    # p = (1 + h)/2 = [0.75, 0.25], t = [1, 0]: -(log 0.75 + log 0.75)/2
    h = torch.tensor([[0.5, -0.5]], dtype=torch.float64)
    assert close(L.csq_loss(h, torch.tensor([[1.0, -1.0]])), 0.2876820724517809)
    # p = [0.5, 0.8], t = [1, 1]: -(log 0.5 + log 0.8)/2
    h = torch.tensor([[0.0, 0.6]], dtype=torch.float64)
    assert close(L.csq_loss(h, torch.tensor([[1.0, 1.0]])), 0.4581453659370775)
    # = BCE((h + 1)/2, (c + 1)/2), mean over bits and batch (the official code's nn.BCELoss)
    x = torch.tanh(randn(5, 8, seed=80))
    c = torch.where(randn(5, 8, seed=81) >= 0, 1.0, -1.0).double()
    assert close(L.csq_loss(x, c), F.binary_cross_entropy((x + 1) / 2, (c + 1) / 2), 1e-9)
    assert L.csq_loss(0.9 * c, c) < L.csq_loss(-0.9 * c, c)
    # saturated tanh codes: finite loss and gradient
    sat = torch.tensor([[1.0, -1.0]], requires_grad=True)
    loss = L.csq_loss(sat, torch.tensor([[-1.0, -1.0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(sat.grad).all()


def test_csq_quantization_hand_values() -> None:
    h = torch.tensor([[0.5, -1.0], [0.0, 0.9]], dtype=torch.float64)  # |h| - 1: -.5, 0, -1, -.1
    # paper: mean log cosh(|h| - 1) = (log cosh .5 + 0 + log cosh 1 + log cosh .1) / 4
    assert close(L.csq_quantization_loss(h), 0.13972175656573776)
    # official code: mean (|h| - 1)² = (0.25 + 0 + 1 + 0.01) / 4
    assert close(L.csq_quantization_loss(h, form="squared"), 0.315)
    assert L.csq_quantization_loss(hadamard(4)).item() == 0.0
    # squared form = quantization_loss / K for codes in [-1, 1]
    x = torch.tanh(randn(4, 6, seed=82))
    assert close(L.csq_quantization_loss(x, "squared"), L.quantization_loss(x) / 6)
    big = torch.full((1, 2), 1e4, dtype=torch.float64)  # stable far from ±1: ≈ |x| - log 2
    assert close(L.csq_quantization_loss(big), 1e4 - 1 - math.log(2), 1e-9)
    with pytest.raises(ValueError):
        L.csq_quantization_loss(h, form="l1")  # type: ignore[arg-type]


def test_orthohash_single_label_hand_values() -> None:
    codebook = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    # h = (1, 0): cos = (1/√2, 1/√2); label 0: z = 8·(cos - 0.2·[1, 0]), CE = log(1 + e^{1.6})
    h = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    assert close(L.orthohash_loss(h, torch.tensor([0]), codebook), 1.783900740888339)
    # h = (1, 1): cos = (1, 0). label 0: z = (6.4, 0) -> log(1 + e^{-6.4});
    # label 1: z = (8, -1.6) -> 9.6 + log(1 + e^{-9.6}); mean of the two
    h2 = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    assert close(L.orthohash_loss(h2, torch.tensor([0, 1]), codebook), 4.800863952428524)
    # scale and margin are the paper's s and m: with m = 0 and s = 1, plain cosine softmax CE
    cos = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    expected = F.cross_entropy(cos, torch.tensor([1]))
    got = L.orthohash_loss(h2[:1], torch.tensor([1]), codebook, scale=1.0, margin=0.0)
    assert close(got, expected)


def test_orthohash_multi_label_hand_values() -> None:
    codebook = hadamard(4)[:3]  # rows (1,1,1,1), (1,-1,1,-1), (1,1,-1,-1)
    h = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)  # cos = 1/2 with every row
    labels = torch.tensor([[1, 1, 0]])
    # z = 8·(0.5 - 0.2·y) = (2.4, 2.4, 4.0); label smoothing target (½, ½, 0):
    # L = logsumexp(z) - 2.4 = log(2 + e^{1.6})
    assert close(L.orthohash_loss(h, labels, codebook), 1.939177884473635)
    # BCE form: (2·softplus(-2.4) + softplus(4.0)) / 3
    assert close(L.orthohash_loss(h, labels, codebook, multilabel="bce"), 1.3972740774085697)
    # a sample without labels has no target: same value as without it
    h2 = torch.cat([h, randn(1, 4, seed=83)])
    both = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert close(L.orthohash_loss(h2, both, codebook), 1.939177884473635)
    none = L.orthohash_loss(h2.requires_grad_(True), torch.zeros(2, 3), codebook)
    assert none.item() == 0.0
    # one-hot multi-label form = single-label CE
    y = torch.tensor([2, 0, 1])
    x = randn(3, 4, seed=84)
    assert close(L.orthohash_loss(x, F.one_hot(y, 3), codebook), L.orthohash_loss(x, y, codebook))
    with pytest.raises(ValueError):
        L.orthohash_loss(x, y, codebook[:, :3])
    with pytest.raises(ValueError):
        L.orthohash_loss(x, y, codebook, multilabel="softmax")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------


def test_shape_and_argument_errors() -> None:
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError):
        L.contrastive_loss(x, torch.zeros(3, 3), torch.ones(3))
    with pytest.raises(ValueError):
        L.pairwise_contrastive_loss(x, torch.ones(2, 2))
    with pytest.raises(ValueError):
        L.pairwise_likelihood_loss(x, torch.ones(3, 4))
    with pytest.raises(ValueError):
        L.quantization_loss(x, space="ternary")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        L.nt_xent_loss(x, x, temperature=0.0)
    with pytest.raises(ValueError):
        L.HashDiscriminator(4)(torch.zeros(2, 3))
