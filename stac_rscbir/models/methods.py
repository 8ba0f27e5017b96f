"""The survey's deep hashing systems (Table 2) and feature-learning baselines (Table 1) as presets.

A preset names the hash layer, how mini-batches are drawn and the weighted loss terms of the paper.
:class:`HashingNet` is the one network all presets share: an optional backbone (fine-tuning mode;
absent when features are cached from a frozen backbone), a hash head, and the optional parts a
method needs (classifier on the codes, decoder, discriminator, a second branch for another source).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from stac_rscbir.models import losses as L
from stac_rscbir.models.heads import ClassifierHead, HashHead
from stac_rscbir.models.mining import batch_hard_triplets

Sampling = Literal["class_pair_triplets", "random", "pk"]


@dataclass(frozen=True)
class MethodSpec:
    """A named deep hashing method: hash layer, sampling and loss weights of its paper."""

    name: str
    summary: str
    activation: Literal["linear", "sigmoid", "tanh"]
    hidden: tuple[int, ...]
    sampling: Sampling
    weights: dict[str, float]
    margin: float = 0.2
    classifier: bool = False
    decoder: bool = False
    adversarial: bool = False
    two_sources: bool = False
    joint_code: bool = False  # two sources: quantize both branches toward sign(½(h1 + h2))
    two_views: bool = False  # two augmented views of each sample through the same branch
    temperature: float = 0.5  # NT-Xent temperature of contrastive cross-source terms
    labelled_fraction: float = 1.0
    # CSQ / OrthoHash: fixed ±1 class centres (codebook) kept as a buffer of the network
    hash_centres: bool = False
    code_batch_norm: bool = False  # a BatchNorm on the codes (OrthoHash's bit balance)
    lr: float = 1e-3
    reference: str = ""
    extra: dict[str, float] = field(default_factory=dict)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "dhnn",
            "DHNN: pairwise likelihood (contrastive family) + quantization, linear hash layer",
            activation="linear",
            hidden=(1024,),
            sampling="random",
            weights={"pairwise": 1.0, "quantization": 0.1},
            reference="Li et al., TGRS 2018 [24]",
        ),
        MethodSpec(
            "sidhcnn",
            "Source-invariant DHCNN: intra- and inter-source pairwise (contrastive) constraints, "
            "quantization and the feature-distribution (bit balance) constraint, one branch per "
            "source, linear hash layer",
            activation="linear",
            hidden=(1024,),
            sampling="random",
            weights={
                "pairwise": 1.0,
                "cross_pairwise": 1.0,
                "quantization": 0.1,
                "bit_balance": 0.1,
            },
            two_sources=True,
            reference="Li et al., TGRS 2018 [25]",
        ),
        MethodSpec(
            "duch",
            "DUCH-style cross-modal hashing (no labels): NT-Xent between the two sources' "
            "relaxed codes of each co-registered pair (the pair's other view is the positive, "
            "the rest of the batch the negatives), quantization of both branches toward the "
            "joint code sign((h1 + h2) / 2), per-code bit balance on both branches; one branch "
            "per source, tanh hash layer",
            activation="tanh",
            hidden=(1024,),
            sampling="random",
            weights={"cross_ntxent": 1.0, "quantization": 0.001, "bit_balance_code": 0.01},
            two_sources=True,
            joint_code=True,
            temperature=0.5,
            reference="Mikriukov, Ravanbakhsh & Demir, ICASSP 2022; RSiM DA4DTE S1/S2 heads",
        ),
        MethodSpec(
            "milan",
            "MiLaN: triplet (margin 0.2) on class-pair triplets + push + per-code bit balance, "
            "sigmoid hash layer 1024-512-K",
            activation="sigmoid",
            hidden=(1024, 512),
            sampling="class_pair_triplets",
            weights={"triplet": 1.0, "push": 0.001, "bit_balance_code": 1.0},
            reference="Roy et al., GRSL 2020 [26]; official MHCLN code",
        ),
        MethodSpec(
            "dhcnn",
            "DHCNN: pairwise likelihood + quantization + cross-entropy of a classifier on the "
            "codes (visual and semantic retrieval), linear hash layer",
            activation="linear",
            hidden=(1024,),
            sampling="random",
            weights={"pairwise": 1.0, "quantization": 0.1, "cross_entropy": 1.0},
            classifier=True,
            reference="Song et al., TGRS 2021 [27]",
        ),
        MethodSpec(
            "sshaae",
            "SSHAAE: semi-supervised adversarial autoencoder: reconstruction + adversarial "
            "toward a binary prior (its bit balance) + per-bit balance + cross-entropy and "
            "pairwise (contrastive) terms on the labelled half + quantization, linear hash layer",
            activation="linear",
            hidden=(1024,),
            sampling="random",
            weights={
                "reconstruction": 1.0,
                "adversarial": 0.1,
                "bit_balance": 0.1,
                "cross_entropy": 1.0,
                "pairwise": 1.0,
                "quantization": 0.1,
            },
            classifier=True,
            decoder=True,
            adversarial=True,
            labelled_fraction=0.5,
            reference="Tang et al., Remote Sensing 2019 [28]",
        ),
        MethodSpec(
            "adversarial",
            "Adversarial hash-code learning: pairwise likelihood + cross-entropy + a "
            "discriminator pushing codes toward the uniform binary prior + quantization, "
            "sigmoid hash layer",
            activation="sigmoid",
            hidden=(1024,),
            sampling="random",
            weights={
                "pairwise": 1.0,
                "cross_entropy": 1.0,
                "adversarial": 0.1,
                "quantization": 0.1,
            },
            classifier=True,
            adversarial=True,
            reference="Liu et al., IGARSS 2019 [29]",
        ),
        MethodSpec(
            "contrastive",
            "Unsupervised contrastive hashing (no labels, `stac-rscbir fit`): NT-Xent between "
            "the relaxed codes of two augmented views of each chip (the other view is the "
            "positive, the rest of the batch the negatives), quantization toward the joint code "
            "sign((h1 + h2) / 2), per-code bit balance; tanh hash layer",
            activation="tanh",
            hidden=(1024,),
            sampling="random",
            weights={"cross_ntxent": 1.0, "quantization": 0.001, "bit_balance_code": 0.01},
            two_views=True,
            joint_code=True,
            temperature=0.3,
            reference="after CIBHash (Qiu et al., IJCAI 2021) and SimCLR's NT-Xent (Chen et "
            "al., ICML 2020)",
        ),
        MethodSpec(
            "csq",
            "CSQ (hash centres, beyond Table 3): BCE between each relaxed code and its class's "
            "Hadamard hash centre (multi-label: the sign of the mean of its labels' centres) + "
            "the quantization term (|h| - 1)² of the official code (weight 0.05, lambda2 in its "
            "options.py), tanh hash layer",
            activation="tanh",
            hidden=(1024,),
            sampling="random",
            weights={"central": 1.0, "csq_quantization": 0.05},
            hash_centres=True,
            reference="Yuan et al., CVPR 2020; yuanli2333/Hadamard-Matrix-for-hashing",
        ),
        MethodSpec(
            "orthohash",
            "OrthoHash (proxies, beyond Table 3): one loss, the cross-entropy of scaled cosine "
            "margin logits s·(cos(h, c_k) - m·[k is a label]) against a fixed ±1 codebook "
            "(multi-label: label-smoothed softmax CE), s = 8, m = 0.2; linear hash layer "
            "followed by a BatchNorm on the codes (bit balance), no separate quantization term",
            activation="linear",
            hidden=(1024,),
            sampling="random",
            weights={"orthohash": 1.0},
            margin=0.2,
            hash_centres=True,
            code_batch_norm=True,
            extra={"scale": 8.0},
            reference="Hoe et al., NeurIPS 2021; kamwoh/orthohash",
        ),
        MethodSpec(
            "ce",
            "Baseline (Table 1): cross-entropy classifier features, binarised by sign",
            activation="tanh",
            hidden=(1024,),
            sampling="random",
            weights={"cross_entropy": 1.0},
            classifier=True,
            reference="Zhou, Newsam, Li & Shao, Remote Sensing 2017 [17]: a CE feature learner",
        ),
        MethodSpec(
            "triplet",
            "Baseline (Table 1): triplet metric learning with online batch-hard mining, "
            "binarised by sign",
            activation="linear",
            hidden=(1024,),
            sampling="pk",
            weights={"triplet_mined": 1.0},
            margin=0.2,
            reference="Cao et al., IJRS 2020 [22]",
        ),
    )
}


#: Heads fitted without gradients: a linear projection of frozen descriptors, then sign.
PROJECTION_HEADS: dict[str, MethodSpec] = {
    "itq": MethodSpec(
        "itq",
        "ITQ (unsupervised): PCA of frozen descriptors + learned rotation, sign; stored as a "
        "linear hash layer",
        activation="linear",
        hidden=(),
        sampling="random",
        weights={},
        reference="Gong & Lazebnik, CVPR 2011",
    )
}


def method_spec(name: str) -> MethodSpec:
    """A trained preset (:data:`METHODS`) or a fitted projection head (:data:`PROJECTION_HEADS`)."""
    spec = METHODS.get(name) or PROJECTION_HEADS.get(name)
    if spec is None:
        raise ValueError(f"unknown method {name!r}: one of {sorted(METHODS | PROJECTION_HEADS)}")
    return spec


#: Seed of the hash centres / codebook of :class:`HashingNet` (CSQ, OrthoHash presets).
CENTRE_SEED = 0


class HashingNet(nn.Module):
    """Backbone (optional) -> hash head -> relaxed codes, with the parts a method needs."""

    centres: torch.Tensor | None  # (n_classes, bits) ±1 hash centres / codebook
    centre_ties: torch.Tensor | None  # (bits,) ±1 tie-break of multi-label centres

    def __init__(
        self,
        spec: MethodSpec,
        in_dim: int,
        bits: int,
        n_classes: int,
        backbone: nn.Module | None = None,
        backbone2: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.bits = bits
        self.backbone = backbone
        self.backbone2 = backbone2  # None: the second source shares ``backbone``
        self.head = HashHead(in_dim, bits, hidden=spec.hidden, activation=spec.activation)
        self.head2 = (
            HashHead(in_dim, bits, hidden=spec.hidden, activation=spec.activation)
            if spec.two_sources
            else None
        )
        self.classifier = ClassifierHead(bits, n_classes) if spec.classifier else None
        self.decoder = (
            nn.Sequential(nn.Linear(bits, 1024), nn.ReLU(), nn.Linear(1024, in_dim))
            if spec.decoder
            else None
        )
        self.discriminator = L.HashDiscriminator(bits) if spec.adversarial else None
        if spec.code_batch_norm:  # OrthoHash: codes = BN(linear); bits = sign of the BN output
            for head in (self.head, self.head2):
                if head is not None:
                    head.net.append(nn.BatchNorm1d(bits))
        # fixed, seeded class centres / codebook (C, bits), saved with the checkpoint so a loaded
        # model keeps its training targets; ties of multi-label centres take the bits of one
        # fixed random ±1 vector, as in CSQ's official code (None, and not saved, otherwise)
        centres = ties = None
        if spec.hash_centres:
            centres = L.hash_centres(n_classes, bits, seed=CENTRE_SEED)
            g = torch.Generator().manual_seed(CENTRE_SEED + 1)
            ties = torch.randint(0, 2, (bits,), generator=g).float() * 2 - 1
        self.register_buffer("centres", centres)
        self.register_buffer("centre_ties", ties)

    def features(self, x: torch.Tensor, source: int = 0) -> torch.Tensor:
        """Descriptors of the input: the (source's) backbone output, or ``x`` itself if cached."""
        backbone = self.backbone2 if source == 1 and self.backbone2 is not None else self.backbone
        return x if backbone is None else backbone(x)

    def head_of(self, source: int = 0) -> HashHead:
        """The hash head of a source: ``head2`` for source 1 of two-source presets."""
        return self.head2 if source == 1 and self.head2 is not None else self.head

    def forward(self, x: torch.Tensor, source: int = 0) -> torch.Tensor:
        """Relaxed codes (B, bits) in the head's value range."""
        return self.head_of(source)(self.features(x, source))

    @torch.inference_mode()
    def encode(self, x: torch.Tensor, source: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(bits as {0,1} uint8, relaxed float codes) for inference."""
        h = self.forward(x, source)
        return self.head_of(source).binarize(h), h.float()

    def space(self) -> str:
        return self.head.space


def _pm1(h: torch.Tensor, space: str) -> torch.Tensor:
    """Relaxed codes in the ±1 range that pairwise likelihoods compare (sigmoid codes as 2h - 1)."""
    return 2 * h - 1 if space == "01" else h


def binarize_joint(h1: torch.Tensor, h2: torch.Tensor, space: str) -> torch.Tensor:
    """The joint binary target of two views' relaxed codes, sign(½(h1 + h2)) (DA4DTE), detached
    and in the head's value space."""
    return L.binarize((h1 + h2) / 2, space)  # type: ignore[arg-type]


def method_loss(
    net: HashingNet,
    x: torch.Tensor,
    labels: torch.Tensor,
    sim: torch.Tensor,
    *,
    triplets: torch.Tensor | None = None,
    labelled: torch.Tensor | None = None,
    x2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """The weighted loss of ``net.spec`` on one batch, the discriminator's loss (adversarial
    methods, else None; its gradients reach only the discriminator) and each term's value.

    ``sim`` is the (B, B) 0/1 similarity of the batch, ``triplets`` (T, 3) batch indices for
    triplet methods, ``labelled`` a (B,) mask for semi-supervised methods, ``x2`` the second
    source's view of the same samples for two-source methods.
    """
    spec = net.spec
    w = spec.weights
    space = net.space()
    feats = net.features(x)
    h = net.head(feats)
    h2 = None
    if spec.two_views:
        if x2 is None:
            raise ValueError(f"method {spec.name!r} needs a second augmented view (x2)")
        h2 = net.head(net.features(x2))
    elif spec.two_sources:
        if x2 is None or net.head2 is None:
            raise ValueError(f"method {spec.name!r} needs the second source's view (x2)")
        h2 = net.head2(net.features(x2, source=1))
    # single-source terms apply to every branch; cross terms tie the branches together
    branches = [h] if h2 is None else [h, h2]
    terms: dict[str, torch.Tensor] = {}
    mask = (
        labelled
        if labelled is not None
        else torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    )
    if "pairwise" in w:
        # supervised pairs only (semi-supervised presets); sigmoid codes compared as 2h - 1
        terms["pairwise"] = (
            sum(
                L.pairwise_likelihood_loss(_pm1(hb, space)[mask], sim[mask][:, mask])
                for hb in branches
            )
            if int(mask.sum()) >= 2
            else h.sum() * 0
        )
    if "quantization" in w:
        joint = binarize_joint(h, h2, space) if spec.joint_code and h2 is not None else None
        terms["quantization"] = sum(
            L.quantization_loss(hb, space=space, target=joint) for hb in branches
        )
    if "bit_balance" in w:
        terms["bit_balance"] = sum(
            L.bit_balance_loss(hb, mode="per_bit", space=space) for hb in branches
        )
    if "triplet" in w:
        assert triplets is not None, "triplet methods need triplets"
        terms["triplet"] = L.triplet_loss(
            h[triplets[:, 0]], h[triplets[:, 1]], h[triplets[:, 2]], margin=spec.margin
        )
    if "triplet_mined" in w:
        # mine in the space the loss measures (L2-normalised codes), so the hardest
        # positive/negative are the hardest for this loss
        mined = batch_hard_triplets(h.detach(), labels, normalize=True)
        terms["triplet_mined"] = L.triplet_loss_from_indices(h, mined, margin=spec.margin)
    if "push" in w:
        terms["push"] = L.milan_push_loss(h)
    if "bit_balance_code" in w:
        terms["bit_balance_code"] = sum(
            L.bit_balance_loss(hb, mode="per_code", space=space) for hb in branches
        )
    if "cross_entropy" in w:
        assert net.classifier is not None
        logits = net.classifier(h)
        if labels.ndim == 1:
            ce = L.cross_entropy_loss(logits[mask], labels[mask]) if mask.any() else h.sum() * 0
        else:
            ce = (
                L.multilabel_bce_loss(logits[mask], labels[mask].float())
                if mask.any()
                else (h.sum() * 0)
            )
        terms["cross_entropy"] = ce
    if "central" in w or "orthohash" in w:
        assert net.centres is not None, f"method {spec.name!r} needs hash centres"
        hl, yl = h[mask], labels[mask]
        if "central" in w:  # CSQ: the class's centre, or the multi-label centre of its labels
            target = (
                net.centres[yl.long()]
                if yl.ndim == 1
                else L.multilabel_centres(yl, net.centres, net.centre_ties)
            )
            terms["central"] = L.csq_loss(hl, target) if mask.any() else h.sum() * 0
        if "orthohash" in w:
            terms["orthohash"] = (
                L.orthohash_loss(
                    hl, yl, net.centres, scale=spec.extra.get("scale", 8.0), margin=spec.margin
                )
                if mask.any()
                else h.sum() * 0
            )
    if "csq_quantization" in w:
        terms["csq_quantization"] = sum(
            L.csq_quantization_loss(hb, form="squared") for hb in branches
        )
    if "reconstruction" in w:
        assert net.decoder is not None
        terms["reconstruction"] = L.reconstruction_loss(feats.detach(), net.decoder(h))
    d_loss = None
    if "adversarial" in w:
        assert net.discriminator is not None
        terms["adversarial"], d_loss = L.adversarial_losses(net.discriminator, h, space=space)
    if "cross_pairwise" in w:
        assert h2 is not None
        terms["cross_pairwise"] = L.pairwise_likelihood_loss(_pm1(h, space), sim, _pm1(h2, space))
    if "cross_ntxent" in w:
        assert h2 is not None
        terms["cross_ntxent"] = L.nt_xent_loss(h, h2, temperature=spec.temperature)
    total = sum(w[k] * v for k, v in terms.items())
    logged = {k: float(v.detach()) for k, v in terms.items()}
    if d_loss is not None:
        logged["discriminator"] = float(d_loss.detach())
    return total, d_loss, logged  # type: ignore[return-value]
