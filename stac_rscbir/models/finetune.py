"""Fine-tuning modes and test-time augmentation on labelled RGB folders, for ``train`` and the
retrieval benchmark alike.

``--finetune`` picks what trains besides the hash head:

* absent: nothing; the head trains on cached frozen descriptors (the fast default);
* ``N`` (0-16): the last ``N`` MBConv blocks and the head convolution of EfficientNet-Lite0. The
  front runs once per image and its activations are cached
  (:func:`~stac_rscbir.models.features.cached_activations`); augmentation (the dihedral
  transforms, and random crops for contrastive training) is applied to those feature maps, so
  each epoch costs only the trained blocks;
* ``all``: the whole network on images, with flips/rot90, random resized crops and the RGB
  jitter rule of :class:`~stac_rscbir.models.augment.Augment`.

Test-time augmentation (TTA) averages the relaxed codes of the 8 dihedral views before the
sign, as :class:`~stac_rscbir.models.encoder.HashEncoder` does for a checkpoint with ``tta``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from stac_rscbir.data.imagefolder import LabelledImages
from stac_rscbir.models.augment import DIHEDRAL, Augment, InUnits, dihedral
from stac_rscbir.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BackboneTail,
    EfficientNetLite0,
    extract_features,
    freeze,
)
from stac_rscbir.models.features import cached_activations, load_images
from stac_rscbir.models.methods import HashingNet, MethodSpec
from stac_rscbir.models.training import TrainConfig, TrainResult, encode, train_hashing

#: Block whose input activations are cached: partial fine-tuning of up to 16 - 11 = 5 blocks
#: (and TTA of frozen or partially fine-tuned models) all read this one cache.
CACHE_BLOCK = 11
N_BLOCKS = 16


@dataclass(frozen=True)
class Finetune:
    """What trains besides the head: the last ``blocks`` blocks, or the whole network (None)."""

    blocks: int | None

    @classmethod
    def parse(cls, text: str | None) -> Finetune | None:
        """``None`` (frozen), ``"all"`` or a block count ``"0"``-``"16"``; ValueError else."""
        if text is None:
            return None
        if text.strip().lower() == "all":
            return cls(None)
        try:
            blocks = int(text)
        except ValueError:
            blocks = -1
        if not 0 <= blocks <= N_BLOCKS:
            raise ValueError(f"--finetune takes 'all' or a block count 0-{N_BLOCKS}, got {text!r}")
        return cls(blocks)

    @property
    def whole(self) -> bool:
        return self.blocks is None

    @property
    def train_from(self) -> int:
        """First trained block."""
        return 0 if self.blocks is None else N_BLOCKS - self.blocks

    @property
    def cache_block(self) -> int:
        """Block whose input is cached (the earlier of :data:`CACHE_BLOCK` and the first trained
        block, so one cache serves every partial setting up to 5 blocks)."""
        return min(CACHE_BLOCK, self.train_from)

    def label(self) -> str:
        return "all" if self.blocks is None else f"last {self.blocks} blocks"


def training_inputs(
    data: LabelledImages,
    finetune: Finetune,
    input_size: int,
    cache_dir: Path,
    device: str | None = None,
) -> tuple[torch.Tensor, float]:
    """What the training loop feeds the network for ``finetune`` (cached activations or
    images) of every image of ``data``, and the seconds it took."""
    if finetune.whole:
        return load_images(data, input_size)
    acts, seconds = cached_activations(
        data, input_size, finetune.cache_block, cache_dir, device=device
    )
    return acts[:, 0], seconds


def trainable_backbone(
    finetune: Finetune | None, net: EfficientNetLite0 | None = None
) -> nn.Module | None:
    """The backbone the training loop updates (None: cached frozen descriptors): ``net``
    (default: a fresh ImageNet RGB EfficientNet-Lite0), or its tail after the cached block."""
    if finetune is None:
        return None
    if net is None:
        net = EfficientNetLite0(3, pretrained=True)
    if finetune.whole:
        return net
    return BackboneTail(net, finetune.cache_block, finetune.train_from)


def training_augment(
    finetune: Finetune | None,
    seed: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crops: bool = False,
) -> Callable | None:
    """Per-batch augmentation: on normalised images (whole network; flips/rot90, random resized
    crops, and optical gain/contrast jitter applied in the units ``mean``/``std`` undo, per band
    unless there are 3) or on the cached feature maps (partial: the dihedral transforms, plus
    random resized crops of the maps with ``crops``); none for frozen descriptors.

    Supervised fine-tuning takes no map crops (measured worse on AID, benchmarks/RESULTS.md);
    contrastive training needs them: two views that differ only by a symmetry make the
    task too easy (SimCLR found crops the most useful augmentation)."""
    if finetune is None:
        return None
    if finetune.whole:
        sensor = "rgb" if len(mean) == 3 else "optical"
        return InUnits(Augment(sensor, crop_scale=(0.5, 1.0), seed=seed), mean, std)
    crop = (0.6, 1.0) if crops else None
    return Augment("optical", crop_scale=crop, brightness=0.0, contrast=0.0, seed=seed)


def full_backbone(net: HashingNet) -> nn.Module | None:
    """The encoder's backbone after training: a tail's whole network, else the backbone."""
    backbone = net.backbone
    return backbone.backbone if isinstance(backbone, BackboneTail) else backbone


def encode_tta(
    net: HashingNet,
    data: LabelledImages,
    finetune: Finetune | None,
    input_size: int,
    cache_dir: Path,
    device: str | None = None,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32], float]:
    """Test-time augmentation: {0,1} codes, relaxed codes (the mean over the 8 dihedral views,
    taken before the sign) and the seconds spent preparing the views, for ``data``'s images
    through the trained ``net``."""
    if finetune is not None and finetune.whole:
        images, seconds = load_images(data, input_size, progress=False)
        views = [dihedral(images, k) for k in DIHEDRAL]
    else:
        block = CACHE_BLOCK if finetune is None else finetune.cache_block
        acts, seconds = cached_activations(data, input_size, block, cache_dir, DIHEDRAL, device)
        views = [acts[:, k] for k in DIHEDRAL]
        if finetune is None:  # frozen descriptors of each view: the rest of the frozen network
            rest = freeze(BackboneTail(EfficientNetLite0(3, pretrained=True), block, N_BLOCKS))
            views = [extract_features(rest, v.float(), progress=False) for v in views]
    relaxed = np.mean([encode(net, v, batch_size=256)[1] for v in views], axis=0)
    bits = net.head.binarize(torch.from_numpy(relaxed)).numpy().astype(np.uint8)
    return bits, relaxed.astype(np.float32), seconds


def train_finetuned(
    spec: MethodSpec,
    inputs: torch.Tensor,
    features: torch.Tensor | None,
    labels: npt.ArrayLike,
    bits: int,
    config: TrainConfig,
    finetune: Finetune,
    probe: TrainConfig | None,
) -> tuple[TrainResult, float]:
    """Fine-tune ``finetune`` of the backbone with the head on ``inputs`` (activations or
    images), and the seconds spent on the probe.

    With ``probe`` (and frozen ``features`` of the same images), the head first trains on the
    frozen descriptors and fine-tuning starts from it ("linear probe, then fine-tune", Kumar et
    al., ICLR 2022): a random head's early gradients would otherwise distort the pretrained
    blocks, and a few epochs of fine-tuning give the head far fewer steps than frozen training.
    """
    init, probe_seconds = None, 0.0
    if probe is not None:
        if features is None:
            raise ValueError("a probe trains on frozen features; none were given")
        probed = train_hashing(spec, features, labels, bits, probe)
        init, probe_seconds = probed.net.cpu(), probed.seconds
    result = train_hashing(
        spec,
        inputs,
        labels,
        bits,
        config,
        backbone=trainable_backbone(finetune),
        augment=training_augment(finetune, config.seed, crops=spec.two_views),
        init_from=init,
    )
    return result, probe_seconds
