"""Loss functions of deep-hashing RS CBIR (Table 3 of Sumbul, Kang & Demir's survey).

Every loss is a plain function over batch-first torch tensors that returns a scalar (0-d)
tensor, averaged over the batch unless its docstring says otherwise. The one stateful piece,
the discriminator of the adversarial loss, is a small :class:`torch.nn.Module`.

Table 3 row by row:

=================  ==========================================================================
Contrastive        :func:`contrastive_loss`, :func:`pairwise_contrastive_loss`,
                   :func:`pairwise_likelihood_loss` (DHNN/DPSH, which the survey files here)
Triplet            :func:`triplet_loss`, :func:`triplet_loss_from_indices` (MiLaN)
Adversarial        :class:`HashDiscriminator`, :func:`adversarial_losses` (SSHAAE, [29])
Reconstruction     :func:`reconstruction_loss` (SSHAAE's auto-encoder)
Cross-entropy      :func:`cross_entropy_loss`, :func:`multilabel_bce_loss` (DHCNN)
Bit balance        :func:`bit_balance_loss`, :func:`bit_decorrelation_loss`
Quantization       :func:`quantization_loss`, :func:`milan_push_loss`
Hash centres /     :func:`hash_centres`, :func:`multilabel_centres`, :func:`csq_loss`,
proxies (beyond    :func:`csq_quantization_loss` (CSQ, Yuan et al., CVPR 2020);
Table 3)           :func:`orthohash_loss` (OrthoHash, Hoe et al., NeurIPS 2021)
=================  ==========================================================================

plus :func:`nt_xent_loss`, the contrastive loss of RSiM's unsupervised cross-modal hashing
(DUCH; the BigEarthNet S1/S2 hash heads of ``rsim-tu-berlin/DA4DTE``).

Code spaces: ``"pm1"`` means relaxed codes in [-1, 1] (tanh or linear heads, ``b = sign(h)``);
``"01"`` means relaxed codes in [0, 1] (MiLaN's sigmoid head, ``b = 1[h > 0.5]``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

CodeSpace = Literal["pm1", "01"]
BalanceMode = Literal["per_bit", "per_code"]

__all__ = [
    "BalanceMode",
    "CodeSpace",
    "HashDiscriminator",
    "MultiLabelForm",
    "QuantizationForm",
    "adversarial_losses",
    "binarize",
    "bit_balance_loss",
    "bit_decorrelation_loss",
    "contrastive_loss",
    "cross_entropy_loss",
    "csq_loss",
    "csq_quantization_loss",
    "hash_centres",
    "milan_push_loss",
    "multilabel_bce_loss",
    "multilabel_centres",
    "nt_xent_loss",
    "orthohash_loss",
    "pairwise_contrastive_loss",
    "pairwise_likelihood_loss",
    "pairwise_squared_distances",
    "quantization_loss",
    "reconstruction_loss",
    "sample_binary_prior",
    "triplet_loss",
    "triplet_loss_from_indices",
]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _check_matrix(x: Tensor, name: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be a (batch, dim) matrix, got shape {tuple(x.shape)}")


def _check_same_shape(a: Tensor, b: Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _check_space(space: str) -> None:
    if space not in ("pm1", "01"):
        raise ValueError(f"space must be 'pm1' or '01', got {space!r}")


def _zero_like_graph(x: Tensor) -> Tensor:
    """A scalar zero that is still connected to ``x``'s graph (so ``.backward()`` works)."""
    return x.sum() * 0.0


def _safe_sqrt(x: Tensor) -> Tensor:
    """sqrt of a non-negative tensor, exactly 0 at 0 and with a finite (zero) gradient there."""
    tiny = torch.finfo(x.dtype).tiny
    return torch.where(x > 0, x.clamp_min(tiny).sqrt(), torch.zeros_like(x))


def pairwise_squared_distances(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances ``D_ij = ||x_i - y_j||^2`` via the Gram trick, clamped >= 0.

    ``y`` defaults to ``x``, in which case the diagonal is exactly zero. Memory is O(B·N), not
    O(B·N·D), so it is usable for large embedding dimensions.
    """
    _check_matrix(x, "x")
    same = y is None
    y = x if y is None else y
    _check_matrix(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dim, got {x.shape[1]} and {y.shape[1]}")
    d2 = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.T)
    d2 = d2.clamp_min(0.0)
    if same:
        d2 = d2 * (1.0 - torch.eye(x.shape[0], dtype=d2.dtype, device=d2.device))
    return d2


def binarize(h: Tensor, space: CodeSpace = "pm1") -> Tensor:
    """Hard codes of relaxed codes: ``sign(h)`` with sign(0) := +1 for ``"pm1"``; ``1[h > 0.5]``
    for ``"01"`` (MiLaN's ``(sign(h - 0.5) + 1) / 2`` without its 0.5 at exact ties).

    Returned detached and in ``h``'s dtype.
    """
    _check_space(space)
    h = h.detach()
    if space == "pm1":
        return torch.where(h >= 0, torch.ones_like(h), -torch.ones_like(h))
    return (h > 0.5).to(h.dtype)


# --------------------------------------------------------------------------------------------
# contrastive family
# --------------------------------------------------------------------------------------------


def contrastive_loss(x1: Tensor, x2: Tensor, similar: Tensor, margin: float = 1.0) -> Tensor:
    """Contrastive loss of Hadsell, Chopra & LeCun (CVPR 2006) over a batch of pairs.

    ``L = mean_i [ s_i · d_i^2 + (1 - s_i) · max(0, m - d_i)^2 ]``, ``d_i = ||x1_i - x2_i||_2``.

    ``similar`` (B,) is 1/True for a similar pair and 0/False for a dissimilar one (values in
    [0, 1] act as soft weights). Note the label convention is the *opposite* of the siamese GCN
    code of Chaudhuri et al. [21] (``y = 1`` dissimilar), and that code also divides by 2B
    (i.e. includes Hadsell's 1/2) and adds ``1e-4·(||f1|| + ||f2||)``; this function is 2x that
    loss without the norm penalty. Similar pairs pull (``d^2``), dissimilar pairs push until
    they are at least ``margin`` apart, after which they contribute exactly 0.

    Args:
        x1, x2: (B, D) embeddings of the two sides of each pair.
        similar: (B,) pair labels, 1 = similar.
        margin: m > 0, in the units of ``d`` (not squared).
    """
    _check_matrix(x1, "x1")
    _check_same_shape(x1, x2, "x1 and x2")
    if similar.shape != (x1.shape[0],):
        raise ValueError(f"similar must have shape ({x1.shape[0]},), got {tuple(similar.shape)}")
    s = similar.to(x1.dtype)
    d2 = (x1 - x2).pow(2).sum(1)
    d = _safe_sqrt(d2)
    per_pair = s * d2 + (1.0 - s) * F.relu(margin - d).pow(2)
    return per_pair.mean()


def pairwise_contrastive_loss(
    embeddings: Tensor, sim_matrix: Tensor, margin: float = 1.0
) -> Tensor:
    """:func:`contrastive_loss` over all unordered pairs ``i < j`` of a batch.

    ``L = mean_{i<j} [ S_ij · d_ij^2 + (1 - S_ij) · max(0, m - d_ij)^2 ]`` with
    ``d_ij = ||e_i - e_j||_2`` and ``S`` the (B, B) similarity matrix (1 = similar, e.g. same
    class or ≥ 1 shared label; values in [0, 1] act as soft weights; only the upper triangle
    is read). This is the in-batch form used by siamese RS CBIR and by DHNN/SIDHCNN-style
    pairwise constraints.
    """
    _check_matrix(embeddings, "embeddings")
    b = embeddings.shape[0]
    if sim_matrix.shape != (b, b):
        raise ValueError(f"sim_matrix must have shape ({b}, {b}), got {tuple(sim_matrix.shape)}")
    if b < 2:
        raise ValueError("pairwise_contrastive_loss needs at least 2 embeddings")
    iu = torch.triu_indices(b, b, offset=1, device=embeddings.device)
    d2 = pairwise_squared_distances(embeddings)[iu[0], iu[1]]
    s = sim_matrix.to(embeddings.dtype)[iu[0], iu[1]]
    per_pair = s * d2 + (1.0 - s) * F.relu(margin - _safe_sqrt(d2)).pow(2)
    return per_pair.mean()


def pairwise_likelihood_loss(
    u: Tensor, sim_matrix: Tensor, v: Tensor | None = None, exclude_self: bool = True
) -> Tensor:
    """Pairwise likelihood loss of DPSH (Li, Wang & Kang, IJCAI 2016) as used by DHNN [24].

    ``L = mean_{(i,j)} [ log(1 + exp(Θ_ij)) - s_ij · Θ_ij ]``, ``Θ_ij = ½ u_iᵀ v_j``,

    i.e. the negative log-likelihood of ``p(s_ij = 1) = sigmoid(Θ_ij)``, computed stably as
    ``softplus(Θ) - s·Θ`` (no overflow for large ``|Θ|``). DHNN/DPSH write it as a sum; it is
    averaged here (as in the DPSH PyTorch code) so its scale does not depend on the batch size.

    Args:
        u: (B, K) real-valued outputs of the (linear) hash layer.
        sim_matrix: (B, N) pair labels s_ij ∈ {0, 1} (1 = similar). With ``v`` omitted, N = B.
        v: optional (N, K) second set, e.g. DPSH's memory bank of the whole training set's
            codes; then every (i, j) pair is used.
        exclude_self: with ``v`` omitted, average over the ``B(B-1)`` ordered pairs ``i != j``
            (the diagonal carries no similarity information); otherwise over all ``B²``.
    """
    _check_matrix(u, "u")
    other = u if v is None else v
    _check_matrix(other, "v")
    if other.shape[1] != u.shape[1]:
        raise ValueError(
            f"u and v must have the same number of bits, got {u.shape[1]}, {other.shape[1]}"
        )
    if sim_matrix.shape != (u.shape[0], other.shape[0]):
        raise ValueError(
            f"sim_matrix must have shape ({u.shape[0]}, {other.shape[0]}), "
            f"got {tuple(sim_matrix.shape)}"
        )
    theta = 0.5 * (u @ other.T)
    s = sim_matrix.to(u.dtype)
    per_pair = F.softplus(theta) - s * theta
    if v is None and exclude_self:
        b = u.shape[0]
        if b < 2:
            raise ValueError("pairwise_likelihood_loss needs at least 2 codes when exclude_self")
        off = ~torch.eye(b, dtype=torch.bool, device=u.device)
        return per_pair[off].mean()
    return per_pair.mean()


# --------------------------------------------------------------------------------------------
# triplet
# --------------------------------------------------------------------------------------------


def _triplet_distances(a: Tensor, b: Tensor, normalize: bool, squared: bool) -> Tensor:
    if normalize:
        a = F.normalize(a, dim=1)
        b = F.normalize(b, dim=1)
    d2 = (a - b).pow(2).sum(1)
    return d2 if squared else _safe_sqrt(d2)


def triplet_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    margin: float = 0.2,
    normalize: bool = True,
    squared: bool = True,
) -> Tensor:
    """Triplet margin loss in MiLaN's form (Roy et al., GRSL 2020; ``MHCLN/UCMD/trainer.py``).

    ``L = mean_t max(0, d(a_t, p_t) - d(a_t, n_t) + alpha)``, with, by default, ``d`` the *squared*
    Euclidean distance between *L2-normalised* embeddings (``e = h / ||h||_2``) and alpha = 0.2,
    exactly as MiLaN applies it to its sigmoid outputs. ``normalize=False`` uses the raw
    embeddings and ``squared=False`` the plain Euclidean distance (Cao et al. [22] style).

    A triplet whose margin is met (``d(a,n) >= d(a,p) + alpha``) contributes exactly 0.

    Args:
        anchor, positive, negative: (T, D) embeddings, row t forming one triplet.
    """
    _check_matrix(anchor, "anchor")
    _check_same_shape(anchor, positive, "anchor and positive")
    _check_same_shape(anchor, negative, "anchor and negative")
    d_ap = _triplet_distances(anchor, positive, normalize, squared)
    d_an = _triplet_distances(anchor, negative, normalize, squared)
    return F.relu(d_ap - d_an + margin).mean()


def triplet_loss_from_indices(
    embeddings: Tensor,
    triplets: Tensor,
    margin: float = 0.2,
    normalize: bool = True,
    squared: bool = True,
) -> Tensor:
    """:func:`triplet_loss` on triplets given as indices into a batch, as produced by miners.

    Args:
        embeddings: (B, D) batch embeddings.
        triplets: (T, 3) integer tensor of ``(anchor, positive, negative)`` row indices. With
            T = 0 (a miner found nothing) the loss is a graph-connected 0.
    """
    _check_matrix(embeddings, "embeddings")
    if triplets.ndim != 2 or triplets.shape[1] != 3:
        raise ValueError(f"triplets must have shape (T, 3), got {tuple(triplets.shape)}")
    if triplets.dtype.is_floating_point or triplets.dtype == torch.bool:
        raise ValueError(f"triplets must be an integer tensor, got {triplets.dtype}")
    if triplets.shape[0] == 0:
        return _zero_like_graph(embeddings)
    idx = triplets.to(device=embeddings.device, dtype=torch.long)
    if int(idx.min()) < 0 or int(idx.max()) >= embeddings.shape[0]:
        raise ValueError("triplet indices out of range for the batch")
    return triplet_loss(
        embeddings[idx[:, 0]],
        embeddings[idx[:, 1]],
        embeddings[idx[:, 2]],
        margin=margin,
        normalize=normalize,
        squared=squared,
    )


# --------------------------------------------------------------------------------------------
# adversarial
# --------------------------------------------------------------------------------------------


class HashDiscriminator(nn.Module):
    """MLP discriminator on K-bit relaxed hash codes, returning one logit per code.

    ``K → hidden → … → hidden → 1`` with LeakyReLU(0.2) between layers (DCGAN-style; no batch
    norm, so real and generated batches can be scored separately and batch size 1 works).
    ``hidden`` defaults to 2K as in DUCH's hash discriminator
    (Linear(K→2K), BN, ReLU, Linear(2K→1)).
    It is trained to tell samples of the uniform binary prior (real) from the encoder's
    codes (fake); see :func:`adversarial_losses`.
    """

    def __init__(self, n_bits: int, hidden: int | None = None, n_hidden_layers: int = 2) -> None:
        super().__init__()
        if n_bits < 1:
            raise ValueError(f"n_bits must be >= 1, got {n_bits}")
        if n_hidden_layers < 1:
            raise ValueError(f"n_hidden_layers must be >= 1, got {n_hidden_layers}")
        hidden = 2 * n_bits if hidden is None else hidden
        self.n_bits = n_bits
        layers: list[nn.Module] = []
        width = n_bits
        for _ in range(n_hidden_layers):
            layers += [nn.Linear(width, hidden), nn.LeakyReLU(0.2)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, codes: Tensor) -> Tensor:
        """(B, K) codes → (B,) logits (positive = "looks like the binary prior")."""
        if codes.ndim != 2 or codes.shape[1] != self.n_bits:
            raise ValueError(f"codes must have shape (B, {self.n_bits}), got {tuple(codes.shape)}")
        return self.net(codes).squeeze(1)


def sample_binary_prior(
    n: int,
    n_bits: int,
    space: CodeSpace = "pm1",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``n`` codes drawn i.i.d. from the uniform binary prior: each bit is ±1 (``"pm1"``) or
    0/1 (``"01"``) with probability ½ — balanced and uncorrelated bits by construction."""
    _check_space(space)
    bits = torch.randint(0, 2, (n, n_bits), generator=generator, device=device).to(dtype)
    return 2.0 * bits - 1.0 if space == "pm1" else bits


def adversarial_losses(
    discriminator: nn.Module,
    codes: Tensor,
    prior: Literal["uniform_binary"] = "uniform_binary",
    space: CodeSpace = "pm1",
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """GAN losses that match the code distribution to a uniform binary prior.

    This is the adversarial-autoencoder idea of SSHAAE (Tang et al., IGARSS 2019 / Remote
    Sensing 2019 [28]) and of adversarial hash-code learning (Liu et al., IGARSS 2019 [29]):
    a discriminator D separates codes drawn from the prior (real) from the encoder's relaxed
    codes (fake), and the encoder is trained to fool it, which pushes codes towards balanced,
    independent, binary-like bits (Table 3: bit balance ✓, no labels needed). With
    ``BCE(z, y) = BCE-with-logits``:

    * ``generator_loss = mean_i BCE(D(h_i), 1) = mean_i softplus(-D(h_i))`` (non-saturating);
    * ``discriminator_loss = ½ [ mean_j BCE(D(b_j), 1) + mean_i BCE(D(h_i), 0) ]``,
      ``b_j ~ U({-1,+1}^K)`` (``space="pm1"``, tanh/linear heads) or ``U({0,1}^K)``
      (``space="01"``, sigmoid heads), B fresh prior samples per call.

    Gradient routing, so both losses can be added to the task loss and back-propagated once:
    ``generator_loss`` is computed with the discriminator's parameters *detached* (gradients
    reach ``codes`` only), and ``discriminator_loss`` uses ``codes.detach()`` (gradients reach
    the discriminator only). Step the encoder's optimiser and D's optimiser separately.

    Args:
        discriminator: module mapping (B, K) codes to (B,) or (B, 1) logits, e.g.
            :class:`HashDiscriminator`.
        codes: (B, K) relaxed codes from the hash head.
        prior: only ``"uniform_binary"`` is implemented.
        space: value set of the prior; match it to the head's output range.
        generator: optional RNG for reproducible prior samples.

    Returns:
        ``(generator_loss, discriminator_loss)``.
    """
    if prior != "uniform_binary":
        raise ValueError(f"unsupported prior {prior!r}; only 'uniform_binary' is implemented")
    _check_space(space)
    _check_matrix(codes, "codes")
    real = sample_binary_prior(
        codes.shape[0],
        codes.shape[1],
        space,
        generator=generator,
        device=codes.device,
        dtype=codes.dtype,
    )

    def logits_of(x: Tensor, frozen: bool) -> Tensor:
        if frozen:
            params = {k: p.detach() for k, p in discriminator.named_parameters()}
            out = functional_call(discriminator, params, (x,))
        else:
            out = discriminator(x)
        return out.reshape(x.shape[0])

    fake_for_g = logits_of(codes, frozen=True)
    generator_loss = F.binary_cross_entropy_with_logits(fake_for_g, torch.ones_like(fake_for_g))
    real_logits = logits_of(real, frozen=False)
    fake_logits = logits_of(codes.detach(), frozen=False)
    discriminator_loss = 0.5 * (
        F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
        + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    )
    return generator_loss, discriminator_loss


# --------------------------------------------------------------------------------------------
# reconstruction and classification
# --------------------------------------------------------------------------------------------


def reconstruction_loss(x: Tensor, x_hat: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared reconstruction error of an auto-encoder (SSHAAE's decoder branch [28]).

    ``L = Σ m ⊙ (x - x̂)² / Σ m`` over every element (batch, bands, pixels), with ``m`` = 1 for
    valid pixels; without ``mask`` this is ``mean (x - x̂)²``.

    Args:
        x: (B, …) target, e.g. (B, C, H, W) image bands or (B, D) features.
        x_hat: reconstruction, same shape.
        mask: optional boolean (or 0/1) tensor broadcastable to ``x``, True = valid, False =
            nodata (e.g. a (B, 1, H, W) cloud/nodata mask). Masked entries contribute nothing,
            even if ``x`` holds NaN/inf there, and receive zero gradient. If every entry is
            masked the loss is a graph-connected 0.
    """
    _check_same_shape(x, x_hat, "x and x_hat")
    if mask is None:
        return F.mse_loss(x_hat, x)
    valid = torch.broadcast_to(mask.to(device=x.device).bool(), x.shape)
    n_valid = valid.sum()
    # where() before squaring so NaN nodata values never reach the backward of pow.
    diff = torch.where(valid, x_hat - x, torch.zeros((), dtype=x_hat.dtype, device=x.device))
    if int(n_valid) == 0:
        return _zero_like_graph(diff)
    return diff.pow(2).sum() / n_valid.to(diff.dtype)


def cross_entropy_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Single-label softmax cross-entropy, as in DHCNN's classification branch [27].

    ``L = mean_i [ -z_{i, y_i} + log Σ_c exp(z_ic) ]``.

    Args:
        logits: (B, C) unnormalised class scores (e.g. a linear classifier on the hash code).
        target: (B,) integer class indices.
    """
    _check_matrix(logits, "logits")
    if target.shape != (logits.shape[0],):
        raise ValueError(f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}")
    return F.cross_entropy(logits, target.long())


def multilabel_bce_loss(
    logits: Tensor, multi_hot: Tensor, pos_weight: Tensor | None = None
) -> Tensor:
    """Multi-label binary cross-entropy: DHCNN's CE replaced for multi-label archives
    (BigEarthNet, multi-label UCMD).

    ``L = -mean_{i,c} [ y_ic log sigmoid(z_ic) + (1 - y_ic) log(1 - sigmoid(z_ic)) ]``
    (BCE-with-logits, numerically stable), optionally with per-class ``pos_weight`` (C,) on
    the positive term.

    Args:
        logits: (B, C) scores.
        multi_hot: (B, C) targets in {0, 1} (soft targets in [0, 1] are allowed).
    """
    _check_matrix(logits, "logits")
    _check_same_shape(logits, multi_hot, "logits and multi_hot")
    return F.binary_cross_entropy_with_logits(
        logits, multi_hot.to(logits.dtype), pos_weight=pos_weight
    )


# --------------------------------------------------------------------------------------------
# bit balance / independence
# --------------------------------------------------------------------------------------------


def bit_balance_loss(h: Tensor, mode: BalanceMode = "per_bit", space: CodeSpace = "pm1") -> Tensor:
    """Bit-balance penalty on relaxed codes ``h`` (B, K); c = 0 for ``"pm1"``, 0.5 for ``"01"``.

    * ``mode="per_bit"``: ``L = mean_k ( mean_i h_ik - c )²`` — each bit is on for half of
      the batch (the intent stated in MiLaN's code comment; SIDHCNN's feature-distribution
      constraint).
    * ``mode="per_code"``: ``L = mean_i ( mean_k h_ik - c )²`` — each code has half of its bits
      on. With ``space="01"`` this is *exactly* MiLaN's coded term
      (``tf.reduce_mean(embeddings, 1)``; weight gamma = 1). With ``space="pm1"`` it is DUCH /
      DA4DTE's ``Σ_i (Σ_k h_ik)²`` divided by ``B·K²`` (so multiply their weight by B·K² to
      reproduce them).

    Both are 0 for perfectly balanced codes and maximal (1 for ±1, 0.25 for 0/1) for constant
    codes.
    """
    _check_matrix(h, "h")
    _check_space(space)
    c = 0.0 if space == "pm1" else 0.5
    if mode == "per_bit":
        dim = 0
    elif mode == "per_code":
        dim = 1
    else:
        raise ValueError(f"mode must be 'per_bit' or 'per_code', got {mode!r}")
    return (h.mean(dim) - c).pow(2).mean()


def bit_decorrelation_loss(h: Tensor, space: CodeSpace = "pm1") -> Tensor:
    """Bit independence (decorrelation) penalty on relaxed codes (DeepBit / DMCH form).

    ``L = || (1/B) HᵀH - I_K ||_F² / K²`` (the mean over the K x K entries), with ``H = h`` for
    ``"pm1"`` and ``H = 2h - 1`` for ``"01"`` codes. The codes are not centred (that is the
    balance term's job); for exactly ±1 codes the diagonal vanishes and the loss is the mean
    squared correlation between different bits, e.g. 0 for the rows of a Hadamard matrix. For
    relaxed codes the diagonal also penalises ``mean_i h_ik² < 1``. Not part of MiLaN's code.
    """
    _check_matrix(h, "h")
    _check_space(space)
    hh = h if space == "pm1" else 2.0 * h - 1.0
    b, k = hh.shape
    gram = hh.T @ hh / b
    eye = torch.eye(k, dtype=hh.dtype, device=hh.device)
    return (gram - eye).pow(2).sum() / (k * k)


# --------------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------------


def quantization_loss(h: Tensor, space: CodeSpace = "pm1", target: Tensor | None = None) -> Tensor:
    """Quantization loss pulling relaxed codes to their binary codes (DHNN/DPSH, DUCH, DA4DTE).

    ``L = mean_i || b_i - h_i ||²`` (sum over bits, mean over the batch), with ``b`` detached:
    ``b = sign(h)`` for ``"pm1"`` (sign(0) := +1), ``b = 1[h > 0.5]`` for ``"01"``, or the
    given ``target`` — e.g. DA4DTE's ``B = sign(½(h_S1 + h_S2))`` shared by two modalities.
    DUCH/DA4DTE use ``||B - H||²`` summed over the batch (B times this); DHNN's η-weighted term
    is the same sum.
    """
    _check_matrix(h, "h")
    _check_space(space)
    if target is None:
        b = binarize(h, space)
    else:
        _check_same_shape(h, target, "h and target")
        b = target.detach().to(h.dtype)
    return (b - h).pow(2).sum(1).mean()


def milan_push_loss(h: Tensor) -> Tensor:
    """MiLaN's "push" / representation penalty on sigmoid codes (``MHCLN/UCMD/trainer.py``).

    ``L = -(1/K) · mean_i || h_i - 0.5·1 ||²`` — minimising it drives every sigmoid output
    away from the undecided 0.5 towards 0 or 1 (a quantization surrogate); MiLaN weights it by
    β = 0.001 (the code computes ``loss - beta * loss_2 / HASH_BITS``). Range [-0.25, 0].
    """
    _check_matrix(h, "h")
    return -(h - 0.5).pow(2).sum(1).mean() / h.shape[1]


# --------------------------------------------------------------------------------------------
# NT-Xent
# --------------------------------------------------------------------------------------------


def nt_xent_loss(
    z1: Tensor, z2: Tensor, temperature: float = 0.5, cross_modal_only: bool = False
) -> Tensor:
    """NT-Xent (SimCLR, Chen et al. 2020) between paired views/modalities, as in RSiM's DUCH
    and the DA4DTE S1/S2 hash heads (τ = 0.5 there; DUCH's class default is τ = 1).

    With ``z = normalize([z1; z2])`` (2B, D) and ``sim_ij = z_iᵀ z_j / τ``, each row i has its
    partner p(i) = i ± B as the positive:

    ``L = (1 / 2B) Σ_i -log( exp(sim_{i,p(i)}) / Σ_{j ≠ i} exp(sim_ij) )``.

    The self-similarity is masked out explicitly (DUCH subtracts the constant e^{1/τ} at τ = 1,
    which is only right for τ = 1), and the rows are averaged (DUCH sums them).
    ``cross_modal_only=True`` also masks same-modality negatives, leaving the symmetric
    InfoNCE/CLIP form ``½ [CE(z1 z2ᵀ/τ, I) + CE(z2 z1ᵀ/τ, I)]``.

    Args:
        z1, z2: (B, D) paired embeddings/relaxed codes; row i of both is a positive pair.
        temperature: τ > 0.
    """
    _check_matrix(z1, "z1")
    _check_same_shape(z1, z2, "z1 and z2")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)
    sim = z @ z.T / temperature
    idx = torch.arange(2 * b, device=z.device)
    blocks = idx // b
    drop = blocks[:, None] == blocks[None, :] if cross_modal_only else idx[:, None] == idx[None, :]
    sim = sim.masked_fill(drop, float("-inf"))
    positives = (idx + b) % (2 * b)
    return F.cross_entropy(sim, positives)


# --------------------------------------------------------------------------------------------
# hash centres / proxies (beyond Table 3): CSQ and OrthoHash
# --------------------------------------------------------------------------------------------

MultiLabelForm = Literal["label_smoothing", "bce"]
QuantizationForm = Literal["log_cosh", "squared"]


def _sylvester_hadamard(n: int) -> Tensor:
    """Sylvester's Hadamard matrix H_n (n a power of 2): ±1 entries, rows mutually orthogonal;
    the same matrix as ``scipy.linalg.hadamard(n)``."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _min_pairwise_hamming(codes: Tensor) -> int:
    """Smallest Hamming distance between two different rows of a ±1 matrix (bits if one row)."""
    c, k = codes.shape
    if c < 2:
        return k
    dist = (k - codes @ codes.T) / 2  # d_H(a, b) = (K - aᵀb) / 2 for ±1 codes
    off = ~torch.eye(c, dtype=torch.bool)
    return int(dist[off].min().round())


def hash_centres(
    n_classes: int,
    bits: int,
    seed: int = 0,
    *,
    min_distance: float | None = None,
    max_tries: int = 100,
) -> Tensor:
    """One ±1 hash centre per class, (n_classes, bits) float32: Central Similarity Quantization
    (Yuan et al., "Central Similarity Quantization for Efficient Image and Video Retrieval",
    CVPR 2020, Sec. 3.2; official code ``yuanli2333/Hadamard-Matrix-for-hashing``).

    * ``bits`` a power of 2 and ``n_classes <= 2·bits``: the first ``n_classes`` rows of
      ``[H_bits; -H_bits]`` (Sylvester's Hadamard matrix, as the official tutorial notebook and
      ``swuxyj/DeepHash-pytorch``'s ``CSQ.py`` take them). Two rows of ``H`` are exactly bits/2
      apart, a row and its negation bits apart, so every pair is >= bits/2 apart. Deterministic:
      ``seed`` plays no part.
    * otherwise: every bit an independent Bernoulli(0.5) draw of ±1 (the paper's construction;
      the official notebook draws exactly bits/2 ones per centre), redrawn with a
      ``seed``-ed generator until the smallest pairwise Hamming distance reaches
      ``min_distance`` (default bits/4; the notebook asks >= 20 of 64 bits). After
      ``max_tries`` draws the draw with the largest minimum distance is kept (for many classes
      and few bits the bound may be unreachable).
    """
    if n_classes < 1 or bits < 1:
        raise ValueError(f"n_classes and bits must be >= 1, got {n_classes}, {bits}")
    if max_tries < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    if bits & (bits - 1) == 0 and n_classes <= 2 * bits:
        h = _sylvester_hadamard(bits)
        return torch.cat([h, -h], 0)[:n_classes].contiguous()
    bound = bits / 4 if min_distance is None else min_distance
    g = torch.Generator().manual_seed(seed)
    best, best_dist = None, -1
    for _ in range(max_tries):
        draw = torch.randint(0, 2, (n_classes, bits), generator=g).float() * 2 - 1
        dist = _min_pairwise_hamming(draw)
        if dist > best_dist:
            best, best_dist = draw, dist
        if dist >= bound:
            break
    assert best is not None
    return best


def multilabel_centres(
    labels_multi_hot: Tensor, centres: Tensor, tie_break: Tensor | None = None
) -> Tensor:
    """CSQ's centre of a multi-label sample: the sign of the mean of its labels' centres
    (Yuan et al., CVPR 2020, Sec. 3.2; ``Hash_center_multilables`` in the official
    ``train.py``), (B, bits) in ``centres``' dtype.

    A bit on which the label centres cancel (mean exactly 0, e.g. two labels whose centres
    disagree there) takes ``tie_break``'s bit: a fixed ±1 vector (bits,) — the official code
    uses one random ±1 vector drawn once before training — or +1 when ``tie_break`` is None
    (``sign(0) := +1`` as :func:`binarize`). A sample with no label has a zero mean on every bit
    and so gets ``tie_break`` itself (all +1 by default) as its centre, one shared centre for
    "no label" (the official code would divide by zero there).

    Args:
        labels_multi_hot: (B, C) 0/1 (or boolean) labels.
        centres: (C, bits) ±1 class centres, e.g. :func:`hash_centres`.
        tie_break: optional (bits,) ±1 vector.
    """
    _check_matrix(labels_multi_hot, "labels_multi_hot")
    _check_matrix(centres, "centres")
    if labels_multi_hot.shape[1] != centres.shape[0]:
        raise ValueError(
            f"labels_multi_hot has {labels_multi_hot.shape[1]} classes, centres {centres.shape[0]}"
        )
    total = labels_multi_hot.to(centres.dtype) @ centres  # same sign as the mean
    if tie_break is None:
        tie = torch.ones_like(total)
    else:
        if tie_break.shape != (centres.shape[1],):
            raise ValueError(
                f"tie_break must have shape ({centres.shape[1]},), got {tuple(tie_break.shape)}"
            )
        tie = tie_break.to(total).expand_as(total)
    one = torch.ones_like(total)
    return torch.where(total > 0, one, torch.where(total < 0, -one, tie))


def _at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it already is (e.g. bfloat16 codes under autocast)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def csq_loss(h: Tensor, centres_of_batch: Tensor) -> Tensor:
    """Central similarity loss of CSQ (Yuan et al., CVPR 2020, Eq. 5; official ``train.py``:
    ``nn.BCELoss()(0.5 * (y + 1), 0.5 * (hash_center + 1))``).

    ``L = -mean_{i,k} [ t_ik log p_ik + (1 - t_ik) log(1 - p_ik) ]``, ``p = (1 + h)/2``,
    ``t = (1 + c)/2``,

    i.e. the binary cross-entropy between the relaxed code mapped to (0, 1) and its centre
    mapped to {0, 1}, averaged over bits and batch. Computed in float32 (or float64) as
    ``log p = log1p(h) - log 2``, with ``h`` clamped to ``[-1 + 1e-7, 1 - 1e-7]`` so a
    saturated tanh gives a finite loss (PyTorch's BCELoss clamps the log at -100 instead).

    Args:
        h: (B, K) relaxed codes in (-1, 1) (tanh head).
        centres_of_batch: (B, K) ±1 target centre of each sample (``centres[y]`` for single
            labels, :func:`multilabel_centres` for multi-hot labels).
    """
    _check_matrix(h, "h")
    _check_same_shape(h, centres_of_batch, "h and centres_of_batch")
    x = _at_least_float32(h).clamp(-1.0 + 1e-7, 1.0 - 1e-7)
    t = (centres_of_batch.to(x) + 1.0) / 2.0
    log2 = math.log(2.0)
    log_p = torch.log1p(x) - log2
    log_q = torch.log1p(-x) - log2
    return -(t * log_p + (1.0 - t) * log_q).mean()


def csq_quantization_loss(h: Tensor, form: QuantizationForm = "log_cosh") -> Tensor:
    """CSQ's quantization term, pulling relaxed ±1 codes to the vertices (Yuan et al.,
    CVPR 2020), averaged over bits and batch:

    * ``form="log_cosh"`` (the paper, Eq. 6, written there for codes in (0, 1) as
      ``log cosh(|2h - 1| - 1)``): ``L = mean_{i,k} log cosh(|h_ik| - 1)``, computed stably as
      ``|x| + softplus(-2|x|) - log 2``. The paper sums over samples and bits; the mean here is
      that sum divided by B·K.
    * ``form="squared"`` (the official ``train.py``: ``torch.mean((torch.abs(y) - 1.0) ** 2)``,
      also ``swuxyj/DeepHash-pytorch``): ``L = mean_{i,k} (|h_ik| - 1)²``. For codes in [-1, 1]
      this is :func:`quantization_loss` divided by K.

    Both are 0 exactly at ±1 codes; log cosh grows linearly, not quadratically, far from them.
    """
    _check_matrix(h, "h")
    x = h.abs() - 1.0
    if form == "log_cosh":
        ax = x.abs()
        return (ax + F.softplus(-2.0 * ax) - math.log(2.0)).mean()
    if form == "squared":
        return x.pow(2).mean()
    raise ValueError(f"form must be 'log_cosh' or 'squared', got {form!r}")


def orthohash_loss(
    h: Tensor,
    labels: Tensor,
    codebook: Tensor,
    scale: float = 8.0,
    margin: float = 0.2,
    multilabel: MultiLabelForm = "label_smoothing",
) -> Tensor:
    """OrthoHash's single objective (Hoe et al., "One Loss for All: Deep Hashing with a Single
    Cosine Similarity based Learning Objective", NeurIPS 2021; official code
    ``kamwoh/orthohash``, ``functions/loss/orthohash.py``, margin type ``"cos"``).

    With ``cos_ik = cos(h_i, c_k)`` against the fixed ±1 codebook rows ``c_k`` (one per class)
    and ``y_ik`` = 1 if k is a label of i, the margin logits are
    ``z_ik = s · (cos_ik - m · y_ik)`` and

    * single labels (B,): ``L = mean_i CE(z_i, y_i) = mean_i [-z_{i,y_i} + log Σ_k exp z_ik]``;
    * multi-hot labels (B, C), ``multilabel="label_smoothing"`` (the official default): the
      softmax cross-entropy against the label distribution ``y_i / Σ_k y_ik``,
      ``L = mean_i -Σ_k (y_ik / Σ_k' y_ik') log softmax(z_i)_k``, over the samples with at
      least one label (one without labels has no target; a graph-connected 0 if none has);
    * ``multilabel="bce"`` (the code's alternative): ``mean_{i,k} BCE-with-logits(z_ik, y_ik)``.

    Maximising the cosine to a ±1 code also pulls ``h`` toward the quantized direction, which is
    why the paper needs no separate quantization loss (the code's optional ``quan`` term
    defaults to weight 0); bit balance comes from a BatchNorm on the codes (the preset's head).
    Official defaults: s = 8, m = 0.2 (the README trains CIFAR-10 with m = 0.3).

    Args:
        h: (B, K) continuous codes (BatchNorm outputs, unbounded).
        labels: (B,) class indices or (B, C) multi-hot labels.
        codebook: (C, K) ±1 class codes, e.g. :func:`hash_centres` (fixed, not learned).
    """
    _check_matrix(h, "h")
    _check_matrix(codebook, "codebook")
    if multilabel not in ("label_smoothing", "bce"):
        raise ValueError(f"multilabel must be 'label_smoothing' or 'bce', got {multilabel!r}")
    if codebook.shape[1] != h.shape[1]:
        raise ValueError(f"codebook has {codebook.shape[1]} bits, h has {h.shape[1]}")
    x = _at_least_float32(h)
    cos = F.normalize(x, dim=1) @ F.normalize(codebook.to(x), dim=1).T
    b, c = cos.shape
    if labels.ndim == 1:
        if labels.shape != (b,):
            raise ValueError(f"labels must have shape ({b},), got {tuple(labels.shape)}")
        target = labels.long()
        y = F.one_hot(target, c).to(cos)
        return F.cross_entropy(scale * (cos - margin * y), target)
    if labels.shape != (b, c):
        raise ValueError(f"multi-hot labels must have shape ({b}, {c}), got {labels.shape}")
    y = labels.to(cos)
    logits = scale * (cos - margin * y)
    if multilabel == "bce":
        return F.binary_cross_entropy_with_logits(logits, y)
    count = y.sum(1)
    keep = count > 0
    if not bool(keep.any()):
        return _zero_like_graph(logits)
    dist = y[keep] / count[keep, None]
    return -(dist * F.log_softmax(logits[keep], dim=1)).sum(1).mean()
