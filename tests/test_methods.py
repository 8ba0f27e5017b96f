"""Behaviour of the deep hashing presets: the papers' loss terms and hash layers, HashingNet and
method_loss (weighted sum, gradient routing, fine-tuning vs frozen features, multi-hot labels)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stac_rscbir.models import losses
from stac_rscbir.models.backbones import build_backbone
from stac_rscbir.models.checkpoint import load_checkpoint
from stac_rscbir.models.config import ModelConfig
from stac_rscbir.models.encoder import HashEncoder
from stac_rscbir.models.methods import METHODS, HashingNet, MethodSpec, method_loss
from stac_rscbir.models.mining import similarity_matrix
from stac_rscbir.models.training import TrainConfig, encode, train_hashing

from .method_terms import EXPECTED_TERMS

LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2])
# (anchor, positive, negative) rows of the batch above
TRIPLETS = torch.tensor([[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 0, 7], [7, 3, 8]])


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # tiny tensors: one thread is fastest, and immune to spin-waiting on a busy CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def batch_loss(
    net: HashingNet,
    x: torch.Tensor,
    labels: torch.Tensor = LABELS,
    x2: torch.Tensor | None = None,
    labelled: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """method_loss on one batch with what the preset needs (triplets, second source)."""
    if (net.spec.two_sources or net.spec.two_views) and x2 is None:
        x2 = x + 0.1 * torch.randn_like(x)
    return method_loss(
        net,
        x,
        labels,
        similarity_matrix(labels),
        triplets=TRIPLETS if net.spec.sampling == "class_pair_triplets" else None,
        labelled=labelled,
        x2=x2,
    )


def final_activation(net: HashingNet) -> str:
    # the hash layer's activation; OrthoHash's BatchNorm on the codes follows it
    last = [m for m in net.head.net if not isinstance(m, nn.BatchNorm1d)][-1]
    if isinstance(last, nn.Sigmoid):
        return "sigmoid"
    if isinstance(last, nn.Tanh):
        return "tanh"
    assert isinstance(last, nn.Linear)
    return "linear"


def linear_widths(net: HashingNet) -> list[int]:
    return [m.out_features for m in net.head.net if isinstance(m, nn.Linear)]


# --------------------------------------------------------------------------------------------
# presets: the papers' loss combinations and hash layers
# --------------------------------------------------------------------------------------------


def test_every_preset_is_listed_under_its_name() -> None:
    assert set(METHODS) == set(EXPECTED_TERMS)
    assert all(spec.name == name for name, spec in METHODS.items())
    assert all(isinstance(spec, MethodSpec) and spec.summary for spec in METHODS.values())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_preset_logs_exactly_its_papers_terms_and_totals_their_weighted_sum(name: str) -> None:
    spec = METHODS[name]
    net = HashingNet(spec, in_dim=24, bits=16, n_classes=3)
    total, d_loss, logged = batch_loss(net, torch.randn(len(LABELS), 24))
    assert set(logged) == EXPECTED_TERMS[name]
    assert set(spec.weights) == EXPECTED_TERMS[name] - {"discriminator"}
    assert (d_loss is not None) == spec.adversarial == ("discriminator" in logged)
    assert torch.isfinite(total) and total.ndim == 0
    weighted = sum(spec.weights[k] * logged[k] for k in spec.weights)
    assert float(total.detach()) == pytest.approx(weighted, rel=1e-5, abs=1e-6)
    if d_loss is not None:
        assert float(d_loss.detach()) == pytest.approx(logged["discriminator"])


def test_milan_follows_the_official_code() -> None:
    spec = METHODS["milan"]
    # L = L_triplet(alpha = 0.2) + 0.001 * L_push + 1 * L_balance (per code), sigmoid head
    assert spec.weights == {"triplet": 1.0, "push": 0.001, "bit_balance_code": 1.0}
    assert spec.margin == pytest.approx(0.2)
    assert spec.sampling == "class_pair_triplets"
    net = HashingNet(spec, in_dim=2048, bits=32, n_classes=21)
    assert final_activation(net) == "sigmoid" and net.space() == "01"
    assert linear_widths(net) == [1024, 512, 32]
    slopes = [m.negative_slope for m in net.head.net if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.2, 0.2]
    h = torch.tensor([[0.2, 0.7, 0.5, 0.9]])
    assert net.head.binarize(h).tolist() == [[0, 1, 0, 1]]  # b = 1[h > 0.5]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_hashing_net_builds_the_hash_layer_and_parts_its_preset_names(name: str) -> None:
    spec = METHODS[name]
    net = HashingNet(spec, in_dim=24, bits=16, n_classes=5)
    assert final_activation(net) == spec.activation
    assert linear_widths(net) == [*spec.hidden, 16]
    assert net.space() == ("01" if spec.activation == "sigmoid" else "pm1")
    assert (net.classifier is not None) == spec.classifier == ("cross_entropy" in spec.weights)
    assert (net.decoder is not None) == spec.decoder == ("reconstruction" in spec.weights)
    assert (net.discriminator is not None) == spec.adversarial == ("adversarial" in spec.weights)
    centred = {"central", "orthohash"} & set(spec.weights)
    assert (net.centres is not None) == spec.hash_centres == bool(centred)
    assert isinstance(net.head.net[-1], nn.BatchNorm1d) == spec.code_batch_norm
    cross = {"cross_pairwise", "cross_ntxent"} & set(spec.weights)
    assert (net.head2 is not None) == spec.two_sources
    assert (spec.two_sources or spec.two_views) == bool(cross)
    if net.classifier is not None:
        assert net.classifier(torch.randn(3, 16)).shape == (3, 5)


def test_dhnn_has_a_linear_hash_layer_binarised_by_sign() -> None:
    net = HashingNet(METHODS["dhnn"], in_dim=24, bits=8, n_classes=3)
    assert final_activation(net) == "linear" and net.space() == "pm1"
    h = net(torch.randn(64, 24) * 50)
    assert h.abs().max() > 1  # unbounded codes
    assert net.head.binarize(torch.tensor([[-0.1, 0.0, 2.0]])).tolist() == [[0, 1, 1]]


def test_only_the_semi_supervised_preset_leaves_labels_out() -> None:
    assert METHODS["sshaae"].labelled_fraction < 1.0
    assert all(s.labelled_fraction == 1.0 for n, s in METHODS.items() if n != "sshaae")


# --------------------------------------------------------------------------------------------
# frozen features vs fine-tuning
# --------------------------------------------------------------------------------------------


def test_frozen_feature_mode_has_no_backbone_and_hashes_the_descriptors() -> None:
    net = HashingNet(METHODS["dhcnn"], in_dim=24, bits=16, n_classes=3)
    assert net.backbone is None and net.backbone2 is None
    assert not any(k.startswith("backbone") for k in net.state_dict())
    x = torch.randn(5, 24)
    assert net.features(x) is x
    torch.testing.assert_close(net(x), net.head(x))
    bits, relaxed = net.encode(x)
    assert bits.dtype == torch.uint8 and bits.shape == (5, 16)
    assert torch.equal(bits, (relaxed >= 0).to(torch.uint8))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fine_tuning_puts_gradients_on_every_backbone_parameter(name: str) -> None:
    backbone = build_backbone("smallcnn", in_bands=12)
    net = HashingNet(METHODS[name], backbone.out_dim, bits=16, n_classes=3, backbone=backbone)
    assert net.backbone is backbone
    images = torch.randn(len(LABELS), 12, 16, 16)
    total, d_loss, _ = batch_loss(net, images)
    (total if d_loss is None else total + d_loss).backward()
    grads = [p.grad for p in backbone.parameters()]
    assert all(g is not None for g in grads)
    assert all(float(g.abs().sum()) > 0 for g in grads if g is not None)
    assert all(p.grad is not None for p in net.head.parameters())


def test_two_source_preset_trains_a_second_backbone_for_other_bands() -> None:
    optical = build_backbone("smallcnn", in_bands=12)
    sar = build_backbone("smallcnn", in_bands=2)
    net = HashingNet(METHODS["sidhcnn"], optical.out_dim, 16, 3, backbone=optical, backbone2=sar)
    s2 = torch.randn(len(LABELS), 12, 16, 16)
    s1 = torch.randn(len(LABELS), 2, 16, 16)
    total, _, logged = batch_loss(net, s2, x2=s1)
    assert logged["cross_pairwise"] > 0
    total.backward()
    for module in (optical, sar, net.head, net.head2):
        assert module is not None
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    bits, _ = net.encode(s1, source=1)  # the SAR branch encodes 2-band input
    assert bits.shape == (len(LABELS), 16)


def test_duch_loss_is_ntxent_plus_joint_quantization_and_balance_of_both_branches() -> None:
    spec = METHODS["duch"]
    net = HashingNet(spec, in_dim=24, bits=16, n_classes=3)
    x, x2 = torch.randn(len(LABELS), 24), torch.randn(len(LABELS), 24)
    total, _, logged = batch_loss(net, x, x2=x2)
    h, h2 = net(x), net(x2, source=1)
    assert net.space() == "pm1" and spec.joint_code and not spec.classifier
    # the pair's own other view is the positive (labels play no part)
    z = torch.nn.functional.normalize(torch.cat([h, h2]), dim=1)
    sim = (z @ z.T / spec.temperature).fill_diagonal_(float("-inf"))
    n = len(LABELS)
    ntxent = torch.nn.functional.cross_entropy(sim, (torch.arange(2 * n) + n) % (2 * n))
    assert logged["cross_ntxent"] == pytest.approx(float(ntxent), rel=1e-5)
    # both branches are quantized toward ONE joint code, sign((h1 + h2) / 2)
    joint = torch.where((h + h2) >= 0, 1.0, -1.0)
    quant = ((joint - h) ** 2).sum(1).mean() + ((joint - h2) ** 2).sum(1).mean()
    assert logged["quantization"] == pytest.approx(float(quant), rel=1e-5)
    balance = (h.mean(1) ** 2).mean() + (h2.mean(1) ** 2).mean()
    assert logged["bit_balance_code"] == pytest.approx(float(balance), rel=1e-5)
    # labels do not change an unsupervised loss
    _, _, relabelled = batch_loss(net, x, labels=torch.zeros_like(LABELS), x2=x2)
    assert relabelled == pytest.approx(logged)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.head2.parameters())


def test_two_source_preset_shares_the_backbone_when_no_second_one_is_given() -> None:
    backbone = build_backbone("smallcnn", in_bands=4)
    net = HashingNet(METHODS["sidhcnn"], backbone.out_dim, 16, 3, backbone=backbone)
    x = torch.randn(4, 4, 16, 16)
    net.eval()
    torch.testing.assert_close(net.features(x, source=1), net.features(x, source=0))
    assert net.head2 is not None
    torch.testing.assert_close(net(x, source=1), net.head2(backbone(x)))


# --------------------------------------------------------------------------------------------
# adversarial gradient routing
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adversarial", "sshaae"])
def test_discriminator_loss_trains_only_the_discriminator(name: str) -> None:
    net = HashingNet(METHODS[name], in_dim=24, bits=16, n_classes=3)
    total, d_loss, _ = batch_loss(net, torch.randn(len(LABELS), 24))
    assert d_loss is not None and net.discriminator is not None
    d_loss.backward(retain_graph=True)
    assert all(p.grad is None for p in net.head.parameters())
    assert all(p.grad is not None for p in net.discriminator.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in net.discriminator.parameters())  # type: ignore[union-attr]
    net.zero_grad(set_to_none=True)
    total.backward()  # task terms + generator term
    assert all(p.grad is None for p in net.discriminator.parameters())
    assert all(p.grad is not None for p in net.head.parameters())


@pytest.mark.parametrize("name", ["adversarial", "sshaae"])
def test_generator_term_alone_reaches_the_head_but_not_the_discriminator(name: str) -> None:
    spec = dataclasses.replace(METHODS[name], weights={"adversarial": 1.0})
    net = HashingNet(spec, in_dim=24, bits=16, n_classes=3)
    total, d_loss, logged = batch_loss(net, torch.randn(len(LABELS), 24))
    assert set(logged) == {"adversarial", "discriminator"} and d_loss is not None
    total.backward()
    assert net.discriminator is not None
    assert all(p.grad is None for p in net.discriminator.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.head.parameters())


# --------------------------------------------------------------------------------------------
# individual terms
# --------------------------------------------------------------------------------------------


def test_mined_triplets_are_the_hardest_under_the_losss_own_distance() -> None:
    net = HashingNet(METHODS["triplet"], in_dim=24, bits=16, n_classes=3)
    # very different descriptor norms, so hardness in raw and in normalised space disagree
    x = torch.randn(len(LABELS), 24) * torch.logspace(-1, 1, len(LABELS))[:, None]
    _, _, logged = batch_loss(net, x)
    with torch.no_grad():
        e = F.normalize(net(x), dim=1)
    d = torch.cdist(e, e).pow(2)
    same = LABELS[:, None] == LABELS[None, :]
    eye = torch.eye(len(LABELS), dtype=torch.bool)
    hardest_pos = torch.where(same & ~eye, d, -torch.inf).amax(1)
    hardest_neg = torch.where(~same, d, torch.inf).amin(1)
    expected = F.relu(hardest_pos - hardest_neg + METHODS["triplet"].margin).mean()
    assert logged["triplet_mined"] == pytest.approx(float(expected), rel=1e-4, abs=1e-6)


def test_milan_triplet_term_uses_the_given_triplets() -> None:
    net = HashingNet(METHODS["milan"], in_dim=24, bits=16, n_classes=3)
    x = torch.randn(len(LABELS), 24)
    _, _, logged = batch_loss(net, x)
    with torch.no_grad():
        h = net(x)
    a, p, n = (h[TRIPLETS[:, i]] for i in range(3))
    expected = losses.triplet_loss(a, p, n, margin=0.2)
    assert logged["triplet"] == pytest.approx(float(expected), rel=1e-5)
    assert logged["push"] == pytest.approx(float(losses.milan_push_loss(h)), rel=1e-5)


def test_classifier_term_uses_only_the_labelled_part_of_the_batch() -> None:
    net = HashingNet(METHODS["sshaae"], in_dim=24, bits=16, n_classes=3)
    x = torch.randn(len(LABELS), 24)
    torch.manual_seed(1)
    _, _, none = batch_loss(net, x, labelled=torch.zeros(len(LABELS), dtype=torch.bool))
    assert none["cross_entropy"] == 0.0
    mask = torch.tensor([True, False, True, False, True, False, False, True, False])
    _, _, some = batch_loss(net, x, labelled=mask)
    assert net.classifier is not None
    with torch.no_grad():
        logits = net.classifier(net(x))
    expected = F.cross_entropy(logits[mask], LABELS[mask])
    assert some["cross_entropy"] == pytest.approx(float(expected), rel=1e-5)


def test_multi_hot_labels_use_bce_even_without_a_labelled_mask() -> None:
    net = HashingNet(METHODS["dhcnn"], in_dim=24, bits=16, n_classes=4)
    multi_hot = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1], [1, 0, 1, 0]]
    )
    x = torch.randn(len(multi_hot), 24)
    total, _, logged = method_loss(net, x, multi_hot, similarity_matrix(multi_hot))
    assert set(logged) == EXPECTED_TERMS["dhcnn"] and torch.isfinite(total)
    assert net.classifier is not None
    with torch.no_grad():
        logits = net.classifier(net(x))
    expected = F.binary_cross_entropy_with_logits(logits, multi_hot.float())
    assert logged["cross_entropy"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("name", ["triplet", "dhcnn", "adversarial"])
def test_multi_hot_labels_give_finite_losses(name: str) -> None:
    net = HashingNet(METHODS[name], in_dim=24, bits=16, n_classes=4)
    multi_hot = torch.tensor(
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1], [1, 0, 1, 0]]
    )
    total, _, logged = method_loss(net, torch.randn(6, 24), multi_hot, similarity_matrix(multi_hot))
    assert set(logged) == EXPECTED_TERMS[name] and torch.isfinite(total)


def test_hash_layers_follow_the_survey_table_2() -> None:
    # Table 2: [24] linear, [25] linear, [26] sigmoid, [27] linear, [28] linear, [29] sigmoid
    table2 = {
        "dhnn": "linear",
        "sidhcnn": "linear",
        "milan": "sigmoid",
        "dhcnn": "linear",
        "sshaae": "linear",
        "adversarial": "sigmoid",
    }
    for name, activation in table2.items():
        assert METHODS[name].activation == activation, name


# --------------------------------------------------------------------------------------------
# hash centres / proxies: CSQ and OrthoHash
# --------------------------------------------------------------------------------------------

CENTRED = ["csq", "orthohash"]
MULTI_HOT = torch.tensor(
    [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1], [1, 0, 1, 0]]
)


def test_csq_and_orthohash_follow_their_papers() -> None:
    csq = METHODS["csq"]
    # L = L_central + 0.05 · mean (|h| - 1)² (official code: lambda0 = 1, lambda2 = 0.05)
    assert csq.weights == {"central": 1.0, "csq_quantization": 0.05}
    assert csq.sampling == "random" and csq.hash_centres and not csq.code_batch_norm
    net = HashingNet(csq, in_dim=24, bits=16, n_classes=5)
    assert final_activation(net) == "tanh" and net.space() == "pm1"
    assert linear_widths(net) == [1024, 16]
    ortho = METHODS["orthohash"]
    # one loss: CE of s·(cos - m·y), s = 8, m = 0.2 (official defaults); BN on the codes
    assert ortho.weights == {"orthohash": 1.0}
    assert ortho.margin == pytest.approx(0.2) and ortho.extra["scale"] == pytest.approx(8.0)
    net = HashingNet(ortho, in_dim=24, bits=16, n_classes=5)
    assert final_activation(net) == "linear" and net.space() == "pm1"
    bn = net.head.net[-1]
    assert isinstance(bn, nn.BatchNorm1d) and bn.num_features == 16
    assert isinstance(net.head.net[-2], nn.Linear)
    net.eval()  # bits are the sign of the BatchNorm output
    x = torch.randn(6, 24)
    bits, relaxed = net.encode(x)
    assert torch.equal(bits, (relaxed >= 0).to(torch.uint8))


@pytest.mark.parametrize("name", CENTRED)
def test_hash_centre_presets_keep_a_seeded_hadamard_codebook_buffer(name: str) -> None:
    net = HashingNet(METHODS[name], in_dim=24, bits=16, n_classes=5)
    again = HashingNet(METHODS[name], in_dim=24, bits=16, n_classes=5)
    assert net.centres is not None and net.centre_ties is not None
    assert net.centres.shape == (5, 16) and net.centre_ties.shape == (16,)
    # 5 classes, 16 bits: the first 5 rows of the Sylvester Hadamard matrix H_16
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    h16 = torch.kron(torch.kron(torch.kron(h2, h2), h2), h2)
    assert torch.equal(net.centres, h16[:5])
    assert set(net.centre_ties.unique().tolist()) <= {-1.0, 1.0}
    assert again.centre_ties is not None and torch.equal(net.centre_ties, again.centre_ties)
    state = net.state_dict()
    assert torch.equal(state["centres"], net.centres) and "centre_ties" in state
    assert "centres" not in dict(net.named_parameters())  # fixed targets, never trained
    plain = HashingNet(METHODS["dhnn"], in_dim=24, bits=16, n_classes=5)
    assert plain.centres is None and "centres" not in plain.state_dict()


def test_csq_terms_match_their_formulas_for_single_labels() -> None:
    net = HashingNet(METHODS["csq"], in_dim=24, bits=16, n_classes=3)
    x = torch.randn(len(LABELS), 24)
    total, _, logged = batch_loss(net, x)
    with torch.no_grad():
        h = net(x)
    assert net.centres is not None
    # BCE between (h + 1)/2 and (c_y + 1)/2, mean over bits and batch
    p, t = (h + 1) / 2, (net.centres[LABELS] + 1) / 2
    central = -(t * p.log() + (1 - t) * (1 - p).log()).mean()
    assert logged["central"] == pytest.approx(float(central), rel=1e-5)
    assert logged["csq_quantization"] == pytest.approx(float(((h.abs() - 1) ** 2).mean()), 1e-5)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.head.parameters())


def test_csq_multi_hot_labels_use_the_sign_of_the_mean_label_centre() -> None:
    net = HashingNet(METHODS["csq"], in_dim=24, bits=16, n_classes=4)
    x = torch.randn(len(MULTI_HOT), 24)
    _, _, logged = method_loss(net, x, MULTI_HOT, similarity_matrix(MULTI_HOT))
    assert set(logged) == EXPECTED_TERMS["csq"]
    assert net.centres is not None and net.centre_ties is not None
    rows = []
    for labels in MULTI_HOT:  # by hand: mean of the label centres, sign, ties from centre_ties
        mean = net.centres[labels.bool()].mean(0)
        rows.append(
            [
                t if m == 0 else (1.0 if m > 0 else -1.0)
                for m, t in zip(mean, net.centre_ties, strict=True)
            ]
        )
    target = torch.tensor(rows)
    assert torch.equal(target[0], net.centres[0])  # one label: its own centre
    with torch.no_grad():
        h = net(x)
    expected = F.binary_cross_entropy((h + 1) / 2, (target + 1) / 2)
    assert logged["central"] == pytest.approx(float(expected), rel=1e-5)


def _orthohash_logits(h: torch.Tensor, codebook: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    cos = F.normalize(h, dim=1) @ F.normalize(codebook, dim=1).T
    return 8.0 * (cos - 0.2 * y)


def test_orthohash_term_is_margin_cosine_cross_entropy_single_and_multi_label() -> None:
    net = HashingNet(METHODS["orthohash"], in_dim=24, bits=16, n_classes=3)
    x = torch.randn(len(LABELS), 24)
    total, _, logged = batch_loss(net, x)
    with torch.no_grad():
        h = net(x)  # train mode: the BatchNorm normalises with the batch statistics
    assert net.centres is not None
    logits = _orthohash_logits(h, net.centres, F.one_hot(LABELS, 3).float())
    expected = F.cross_entropy(logits, LABELS)
    assert logged["orthohash"] == pytest.approx(float(expected), rel=1e-5)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.head.parameters())

    net = HashingNet(METHODS["orthohash"], in_dim=24, bits=16, n_classes=4)
    x = torch.randn(len(MULTI_HOT), 24)
    _, _, logged = method_loss(net, x, MULTI_HOT, similarity_matrix(MULTI_HOT))
    with torch.no_grad():
        h = net(x)
    assert net.centres is not None
    y = MULTI_HOT.float()
    log_p = F.log_softmax(_orthohash_logits(h, net.centres, y), dim=1)
    smoothed = -((y / y.sum(1, keepdim=True)) * log_p).sum(1).mean()  # label smoothing
    assert logged["orthohash"] == pytest.approx(float(smoothed), rel=1e-5)


def _tiny_data(multi: bool) -> tuple[torch.Tensor, np.ndarray]:
    """48 noisy 24-d descriptors of 4 classes; multi-hot with a second label on every 3rd."""
    gen = torch.Generator().manual_seed(0)
    y = np.repeat(np.arange(4), 12)
    means = 2.0 * torch.randn(4, 24, generator=gen)
    x = means[torch.as_tensor(y)] + torch.randn(len(y), 24, generator=gen)
    if not multi:
        return x, y
    labels = np.eye(4, dtype=np.int64)[y]
    labels[::3, 0] = 1
    return x, labels


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
@pytest.mark.parametrize("name", CENTRED)
def test_hash_centre_presets_train_on_tiny_data(name: str, multi: bool) -> None:
    x, labels = _tiny_data(multi)
    config = TrainConfig(iterations=40, batch_size=16, progress=False)
    result = train_hashing(METHODS[name], x, labels, 16, config)
    losses_ = [entry["loss"] for entry in result.history]
    assert all(np.isfinite(v) for entry in result.history for v in entry.values())
    assert set(result.history[-1]) == {"step", "loss"} | EXPECTED_TERMS[name]
    assert losses_[-1] < 0.8 * losses_[0]
    bits, _ = encode(result.net, x)
    y = np.repeat(np.arange(4), 12)
    dist = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    same = y[:, None] == y[None, :]
    assert dist[same].mean() < 0.5 * dist[~same].mean()


@pytest.mark.parametrize("name", CENTRED)
def test_hash_centre_preset_encoder_save_load_gives_identical_codes(
    name: str, tmp_path: Path
) -> None:
    config = ModelConfig(
        method=name,
        bits=16,
        bands=["B04", "B03", "B02"],
        backbone="smallcnn",
        mean=[1000.0, 1100.0, 1200.0],
        std=[300.0, 300.0, 300.0],
        input_size=16,
        head={"n_classes": 5},
    )
    torch.manual_seed(0)
    encoder = HashEncoder.build(config, pretrained=False)
    assert encoder.net.centres is not None
    with torch.no_grad():
        encoder.net.train()  # move OrthoHash's BatchNorm statistics off their initial values
        encoder.net(torch.randn(8, 3, 16, 16) + 0.5)
        encoder.net.centres.copy_(encoder.net.centres.flip(0))  # the checkpoint carries these
    encoder.net.eval()
    encoder.save(tmp_path / "enc")
    _, state = load_checkpoint(tmp_path / "enc")
    assert torch.equal(state["centres"], encoder.net.centres)
    loaded = HashEncoder.load(tmp_path / "enc")
    assert loaded.net.centres is not None and loaded.net.centre_ties is not None
    assert torch.equal(loaded.net.centres, encoder.net.centres)
    assert encoder.net.centre_ties is not None
    assert torch.equal(loaded.net.centre_ties, encoder.net.centre_ties)
    pixels = np.random.default_rng(0).uniform(0, 3000, size=(6, 3, 16, 16)).astype(np.float32)
    bits, relaxed = encoder.encode_numpy(pixels)
    again_bits, again_relaxed = loaded.encode_numpy(pixels)
    np.testing.assert_array_equal(bits, again_bits)
    np.testing.assert_array_equal(relaxed, again_relaxed)


def test_contrastive_preset_contrasts_two_views_through_one_branch() -> None:
    """NT-Xent between the same head's codes of two views, quantization toward their joint code,
    per-code balance of both: the terms equal the loss functions applied by hand."""
    torch.manual_seed(0)
    net = HashingNet(METHODS["contrastive"], in_dim=24, bits=16, n_classes=1)
    x = torch.randn(len(LABELS), 24)
    x2 = x + 0.3 * torch.randn_like(x)
    _, _, logged = batch_loss(net, x, x2=x2)
    h, h2 = net(x), net(x2)
    joint = torch.sign((h + h2) / 2).detach()
    expected = {
        "cross_ntxent": losses.nt_xent_loss(h, h2, temperature=0.3),
        "quantization": losses.quantization_loss(h, target=joint)
        + losses.quantization_loss(h2, target=joint),
        "bit_balance_code": losses.bit_balance_loss(h, mode="per_code")
        + losses.bit_balance_loss(h2, mode="per_code"),
    }
    for name, value in expected.items():
        assert logged[name] == pytest.approx(float(value.detach()), rel=1e-5), name
    assert net.head2 is None
