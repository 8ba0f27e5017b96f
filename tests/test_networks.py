"""Behaviour of the model library's networks: backbones, hash heads, autoencoder, initialisation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stac_rscbir.models import losses
from stac_rscbir.models.autoencoder import (
    ConvAutoencoder,
    finetune,
    layer_reconstruction_error,
    layerwise_pretrain,
)
from stac_rscbir.models.backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EfficientNetLite0,
    ResNet,
    SmallCNN,
    adapt_stem_weight,
    build_backbone,
    extract_features,
    freeze,
    imagenet_normalize,
    load_efficientnet_lite0_state,
    unfreeze,
)
from stac_rscbir.models.heads import ClassifierHead, HashHead, dhnn_head, milan_head, rsim_head
from stac_rscbir.models.init import STRATEGIES, init_random, initialize


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def lite0_state() -> dict[str, torch.Tensor]:
    return load_efficientnet_lite0_state()


@pytest.fixture(scope="module")
def lite0_12() -> EfficientNetLite0:
    return EfficientNetLite0(12, pretrained=True).eval()


def smooth_images(n: int, bands: int, size: int, seed: int) -> torch.Tensor:
    """Spatially smooth random images (learnable by a small AE, unlike white noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, bands, size // 8, size // 8, generator=g)
    return nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------
# backbones
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("bands", [2, 3, 12])
@pytest.mark.parametrize("size", [120, 64])
def test_backbones_accept_any_band_count_and_size(name: str, bands: int, size: int) -> None:
    net = build_backbone(name, in_bands=bands, pretrained=False).eval()
    assert net.in_bands == bands
    with torch.no_grad():
        out = net(torch.randn(2, bands, size, size))
    assert out.shape == (2, net.out_dim)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_backbone_dims_and_constructor_options() -> None:
    assert SmallCNN(12).out_dim == 256
    assert SmallCNN(12, width=8, out_dim=64)(torch.randn(1, 12, 32, 32)).shape == (1, 64)
    assert ResNet(12).out_dim == 512
    small = ResNet(4, layers=(1, 1), widths=(16, 32))
    assert small(torch.randn(1, 4, 64, 64)).shape == (1, 32)
    assert EfficientNetLite0(12, pretrained=False).out_dim == 1280
    # ResNet-18 parameter count for 3 bands (11.18 M trunk without the 1000-class fc)
    assert sum(p.numel() for p in ResNet(3).parameters()) == 11_176_512


def test_backbones_reject_wrong_band_count() -> None:
    for net in (SmallCNN(12), ResNet(12), EfficientNetLite0(12, pretrained=False)):
        with pytest.raises(ValueError, match="12"):
            net(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError):
        SmallCNN(0)


def test_build_backbone_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'") as err:
        build_backbone("vgg16", in_bands=3, pretrained=False)
    for name in BACKBONES:
        assert name in str(err.value)
    assert isinstance(build_backbone("EfficientNet-Lite0", 3, pretrained=False), EfficientNetLite0)


def test_build_backbone_warns_without_offline_weights() -> None:
    with pytest.warns(UserWarning, match="no offline pretrained weights"):
        net = build_backbone("resnet18", in_bands=12, pretrained=True)
    assert isinstance(net, ResNet)


def test_efficientnet_three_bands_keeps_imagenet_weights(
    lite0_state: dict[str, torch.Tensor],
) -> None:
    net = EfficientNetLite0(3, pretrained=True)
    own = net.net.state_dict()
    expected = {k: v for k, v in lite0_state.items() if not k.startswith("_fc.")}
    assert set(own) == set(expected)
    for key, value in expected.items():
        assert torch.equal(own[key], value), key
    assert net.pretrained


def test_efficientnet_twelve_bands_stem_rule(
    lite0_state: dict[str, torch.Tensor], lite0_12: EfficientNetLite0
) -> None:
    rgb = lite0_state["_conv_stem.weight"]
    stem = lite0_12.stem.weight
    assert stem.shape == (32, 12, 3, 3)
    expected = (rgb.mean(dim=1, keepdim=True) * 3 / 12).repeat(1, 12, 1, 1)
    torch.testing.assert_close(stem, expected, rtol=0, atol=0)
    # everything after the stem (stem BN included) keeps its ImageNet weights
    own = lite0_12.net.state_dict()
    for key, value in lite0_state.items():
        if key != "_conv_stem.weight" and not key.startswith("_fc."):
            assert torch.equal(own[key], value), key
    torch.testing.assert_close(
        adapt_stem_weight(rgb, 2), rgb.mean(1, keepdim=True).repeat(1, 2, 1, 1) * 1.5
    )


def test_efficientnet_adapted_stem_matches_rgb_on_grey_input(
    lite0_12: EfficientNetLite0,
) -> None:
    rgb_net = EfficientNetLite0(3, pretrained=True).eval()
    grey = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        a = lite0_12.stem(grey.repeat(1, 12, 1, 1))
        b = rgb_net.stem(grey.repeat(1, 3, 1, 1))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_pretrained_efficientnet_differs_from_random(lite0_12: EfficientNetLite0) -> None:
    random_net = EfficientNetLite0(12, pretrained=False).eval()
    assert not random_net.pretrained
    x = torch.randn(2, 12, 64, 64)
    with torch.no_grad():
        a, b = lite0_12(x), random_net(x)
    assert a.shape == b.shape == (2, 1280)
    assert not torch.allclose(a, b, atol=1e-3)


def test_imagenet_normalisation_is_the_lite_recipe() -> None:
    # EfficientNet-Lite checkpoints were trained on (x_255 - 127) / 128
    torch.testing.assert_close(torch.tensor(IMAGENET_MEAN), torch.full((3,), 127 / 255))
    torch.testing.assert_close(torch.tensor(IMAGENET_STD), torch.full((3,), 128 / 255))
    assert EfficientNetLite0.input_mean == IMAGENET_MEAN
    pixels = torch.tensor([0.0, 127 / 255, 1.0]).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    out = imagenet_normalize(pixels)
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([-127 / 128, 0.0, 1.0]))
    with pytest.raises(ValueError):
        imagenet_normalize(torch.rand(1, 12, 4, 4))


# --------------------------------------------------------------------------------------------
# hash heads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("activation", "low", "high", "space"),
    [("sigmoid", 0.0, 1.0, "01"), ("tanh", -1.0, 1.0, "pm1"), ("linear", None, None, "pm1")],
)
def test_hash_head_range_and_binarize(
    activation: str, low: float | None, high: float | None, space: str
) -> None:
    head = HashHead(64, 32, hidden=(48,), activation=activation)  # type: ignore[arg-type]
    assert head.space == space
    h = head(torch.randn(16, 64) * 3)
    assert h.shape == (16, 32)
    if low is not None and high is not None:
        assert (h > low).all() and (h < high).all()
    bits = head.binarize(h)
    assert bits.shape == (16, 32) and bits.dtype == torch.uint8
    assert set(bits.unique().tolist()) <= {0, 1}
    expected = h > 0.5 if space == "01" else h >= 0
    assert torch.equal(bits, expected.to(torch.uint8))
    # the same bits as the losses module's quantisation target
    hard = losses.binarize(h, space=space)  # type: ignore[arg-type]
    assert torch.equal(bits, (hard > (0.5 if space == "01" else 0)).to(torch.uint8))
    assert torch.equal(head.hash(torch.zeros(3, 64)), head.binarize(head(torch.zeros(3, 64))))


def test_milan_head_architecture() -> None:
    head = milan_head(2048, 32)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (2048, 1024),
        (1024, 512),
        (512, 32),
    ]
    slopes = [m.negative_slope for m in head.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.2, 0.2]
    assert isinstance(head.net[-1], nn.Sigmoid) and head.space == "01"
    assert head.threshold == 0.5


def test_other_head_presets() -> None:
    rsim = rsim_head(768, 128)
    assert any(isinstance(m, nn.GELU) for m in rsim.modules())
    assert isinstance(rsim.net[-1], nn.Tanh) and rsim.space == "pm1"
    dhnn = dhnn_head(512, 64)
    assert [type(m) for m in dhnn.net] == [nn.Linear] and dhnn.threshold == 0.0
    with pytest.raises(ValueError, match="activation"):
        HashHead(8, 4, activation="relu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expects"):
        dhnn(torch.randn(2, 8))


def test_classifier_head() -> None:
    clf = ClassifierHead(32, 19)
    logits = clf(torch.rand(5, 32))
    assert logits.shape == (5, 19)
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3, 18]))
    loss.backward()
    assert clf.fc.weight.grad is not None


# --------------------------------------------------------------------------------------------
# fine-tuning vs frozen backbone
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smallcnn", "efficientnet-lite0"])
def test_gradients_reach_backbone_unless_frozen(name: str) -> None:
    backbone = build_backbone(name, in_bands=12, pretrained=False)
    head = HashHead(backbone.out_dim, 16, hidden=(32,), activation="tanh")
    x = torch.randn(2, 12, 64, 64, requires_grad=True)
    head(backbone(x)).pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in backbone.parameters())

    backbone.zero_grad(set_to_none=True)
    head.zero_grad(set_to_none=True)
    freeze(backbone)
    assert not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())
    x2 = torch.randn(2, 12, 64, 64)
    head(backbone(x2)).pow(2).sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is not None for p in head.parameters())

    unfreeze(backbone)
    assert backbone.training and all(p.requires_grad for p in backbone.parameters())


# --------------------------------------------------------------------------------------------
# feature extraction (cached frozen features)
# --------------------------------------------------------------------------------------------


def test_extract_features_matches_direct_forward() -> None:
    net = SmallCNN(12, width=8, out_dim=32)
    net.train()
    x = torch.randn(10, 12, 32, 32)
    feats = extract_features(net, x, device="cpu", batch_size=4, progress=False)
    assert net.training  # mode restored
    assert feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert feats.shape == (10, 32)
    net.eval()
    with torch.no_grad():
        direct = net(x)
    torch.testing.assert_close(feats, direct, rtol=1e-5, atol=1e-5)
    # the same from a DataLoader of (x, y) tuples and from a generator of tensors
    loader = DataLoader(TensorDataset(x, torch.arange(10)), batch_size=3)
    torch.testing.assert_close(
        extract_features(net, loader, progress=False), direct, rtol=1e-5, atol=1e-5
    )
    gen = (x[i : i + 5] for i in range(0, 10, 5))
    torch.testing.assert_close(
        extract_features(net, gen, progress=False), direct, rtol=1e-5, atol=1e-5
    )
    # cached features can feed a trainable head (they are not inference tensors)
    assert not feats.is_inference()
    head = HashHead(32, 8, activation="sigmoid")
    head(feats).sum().backward()
    assert head.net[0].weight.grad is not None
    with pytest.raises(ValueError, match="no batches"):
        extract_features(net, [], progress=False)


def test_extract_features_of_float64_backbone_is_float32() -> None:
    net = SmallCNN(3, width=4, out_dim=8).to(torch.float64)
    feats = extract_features(net, [torch.randn(2, 3, 16, 16, dtype=torch.float64)], progress=False)
    assert feats.dtype == torch.float32


# --------------------------------------------------------------------------------------------
# convolutional autoencoder and layer-wise pre-training
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("bands", "h", "w"), [(12, 120, 120), (2, 64, 64), (3, 33, 47)])
def test_autoencoder_reconstructs_input_size(bands: int, h: int, w: int) -> None:
    ae = ConvAutoencoder(bands, widths=(8, 16, 32))
    x = torch.randn(2, bands, h, w)
    assert ae(x).shape == x.shape
    code = ae.encode(x)
    assert code.shape == (2, 32, *ae.code_size(h, w))
    assert ae.descriptor(x).shape == (2, 32)
    flat = ae.as_backbone("flatten", input_size=(h, w))
    assert flat(x).shape == (2, flat.out_dim)
    pooled = ae.as_backbone()
    assert (pooled.in_bands, pooled.out_dim) == (bands, 32)


def test_layerwise_pretraining_reduces_layer1_error() -> None:
    batches = [smooth_images(4, 12, 32, seed) for seed in range(4)]
    ae = ConvAutoencoder(12, widths=(16, 32))
    before = layer_reconstruction_error(ae, batches, 1)
    history = layerwise_pretrain(ae, batches, epochs_per_layer=15, lr=3e-3)
    after = layer_reconstruction_error(ae, batches, 1)
    assert len(history) == 2 and all(len(h) == 15 for h in history)
    assert after < 0.5 * before
    assert history[1][-1] < history[1][0]  # layer 2 learns on the (frozen) layer-1 codes
    assert all(p.requires_grad for p in ae.parameters())  # ready for fine-tuning
    with torch.no_grad():
        full_before = float(nn.functional.mse_loss(ae(batches[0]), batches[0]))
    losses_ft = finetune(ae, batches, epochs=5, lr=1e-3)
    assert len(losses_ft) == 5
    with torch.no_grad():
        assert float(nn.functional.mse_loss(ae(batches[0]), batches[0])) < full_before


def test_layerwise_pretraining_freezes_earlier_layers() -> None:
    batches = [smooth_images(2, 4, 16, seed) for seed in range(2)]
    deep = ConvAutoencoder(4, widths=(8, 16))
    shallow = ConvAutoencoder(4, widths=(8,))
    shallow.encoders[0].load_state_dict(deep.encoders[0].state_dict())
    shallow.decoders[0].load_state_dict(deep.decoders[0].state_dict())
    layerwise_pretrain(deep, batches, epochs_per_layer=3, lr=1e-3)
    layerwise_pretrain(shallow, batches, epochs_per_layer=3, lr=1e-3)
    # layer 1 ends where training layer 1 alone left it: layer-2 training did not touch it
    for a, b in zip(deep.layer_parameters(1), shallow.layer_parameters(1), strict=True):
        torch.testing.assert_close(a, b)


def test_layerwise_pretraining_needs_reiterable_batches() -> None:
    ae = ConvAutoencoder(2, widths=(4,))
    gen = (torch.randn(2, 2, 8, 8) for _ in range(2))
    with pytest.raises(ValueError, match="generator"):
        layerwise_pretrain(ae, gen, epochs_per_layer=2)


# --------------------------------------------------------------------------------------------
# initialisation strategies
# --------------------------------------------------------------------------------------------


def test_init_random_schemes_are_seeded() -> None:
    a = init_random(SmallCNN(3, width=4, out_dim=8), "kaiming", seed=1)
    b = init_random(SmallCNN(3, width=4, out_dim=8), "kaiming", seed=1)
    c = init_random(SmallCNN(3, width=4, out_dim=8), "xavier", seed=1)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    w_a, w_c = a.features[0].weight, c.features[0].weight
    assert not torch.equal(w_a, w_c)
    bound = (6 / (w_c.shape[1] * 9 + w_c.shape[0] * 9)) ** 0.5
    assert w_c.abs().max() <= bound
    with pytest.raises(ValueError, match="scheme"):
        init_random(nn.Linear(2, 2), "orthogonal")  # type: ignore[arg-type]


def test_initialize_pretrained_loads_imagenet_into_nested_backbone(
    lite0_state: dict[str, torch.Tensor],
) -> None:
    model = nn.Sequential(EfficientNetLite0(3, pretrained=False), HashHead(1280, 16))
    head_before = copy.deepcopy(model[1].state_dict())
    assert initialize(model, "pretrained") is model
    assert torch.equal(model[0].stem.weight, lite0_state["_conv_stem.weight"])
    for key, value in model[1].state_dict().items():
        assert torch.equal(value, head_before[key])
    with pytest.raises(ValueError, match="EfficientNetLite0"):
        initialize(SmallCNN(3), "pretrained")


def test_initialize_random_and_layerwise() -> None:
    assert set(STRATEGIES) >= {"random", "pretrained", "layerwise"}
    net = SmallCNN(3, width=4, out_dim=8)
    before = net.features[0].weight.clone()
    initialize(net, "random", seed=3)
    assert not torch.equal(before, net.features[0].weight)
    ae = ConvAutoencoder(3, widths=(4, 8))
    batches = [smooth_images(2, 3, 16, 0)]
    err = layer_reconstruction_error(ae, batches, 1)
    initialize(ae, "layerwise", batches=batches, epochs_per_layer=10, lr=3e-3)
    assert layer_reconstruction_error(ae, batches, 1) < err
    with pytest.raises(ValueError, match="batches"):
        initialize(ae, "layerwise")
    with pytest.raises(ValueError, match="ConvAutoencoder"):
        initialize(net, "layerwise", batches=batches)
    with pytest.raises(ValueError, match="valid strategies"):
        initialize(net, "imagenet21k")
