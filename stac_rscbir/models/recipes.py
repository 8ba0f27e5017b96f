"""Ready-made recipes: a preset trained on a labelled RGB image folder, a cross-modal model
trained on co-registered BigEarthNet S2/S1 pairs, or an ITQ head fitted on unlabelled chips,
each to an encoder that saves and loads like any other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from stac_rscbir.data.bigearthnet import BandStats, BenPatches
from stac_rscbir.data.imagefolder import read_labels_csv
from stac_rscbir.models.augment import Augment, InUnits
from stac_rscbir.models.backbones import IMAGENET_MEAN, IMAGENET_STD, build_backbone
from stac_rscbir.models.config import InputSpec, ModelConfig, SourceConfig, default_min_size
from stac_rscbir.models.encoder import HashEncoder
from stac_rscbir.models.features import cached_features
from stac_rscbir.models.finetune import (
    Finetune,
    full_backbone,
    train_finetuned,
    trainable_backbone,
    training_augment,
    training_inputs,
)
from stac_rscbir.models.methods import METHODS
from stac_rscbir.models.training import TrainConfig, TrainResult, train_hashing

RGB_BANDS = ["red", "green", "blue"]


def train_on_folder(
    images: Path,
    labels_csv: Path,
    method: str,
    bits: int,
    out: Path,
    *,
    backbone: str = "efficientnet-lite0",
    input_size: int = 150,
    cache_dir: Path = Path(".cache/features"),
    config: TrainConfig | None = None,
    model_id: str | None = None,
    version: str = "1.0.0",
    finetune: Finetune | None = None,
    tta: bool = False,
) -> tuple[HashEncoder, TrainResult]:
    """Train ``method`` on every listed image and save the encoder.

    By default the head trains on cached frozen-backbone descriptors; ``finetune`` also trains
    the last blocks of the ImageNet EfficientNet-Lite0 (from cached activations) or all of it.
    The checkpoint holds the backbone and the head; its config carries the bands, the
    normalisation in raw 8-bit pixel units, the input size and ``tta`` (encode with the mean
    relaxed code of the 8 dihedral views), so it encodes raw RGB chips as it was evaluated.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    if METHODS[method].two_sources:
        raise ValueError(f"method {method!r} needs paired sources; an RGB folder has one")
    if finetune is not None and backbone != "efficientnet-lite0":
        raise ValueError("fine-tuning starts from the ImageNet efficientnet-lite0 backbone")
    cfg = config or TrainConfig()
    data = read_labels_csv(images, labels_csv)
    feats, _ = cached_features(data, backbone, input_size, cache_dir, cfg.device)
    if finetune is None:
        result = train_hashing(METHODS[method], feats, data.labels, bits, cfg)
    else:  # a head trained on the frozen features first, as long as --iterations says
        inputs, _ = training_inputs(data, finetune, input_size, cache_dir, cfg.device)
        probe = TrainConfig(
            iterations=cfg.iterations, seed=cfg.seed, device=cfg.device, progress=cfg.progress
        )
        result, _ = train_finetuned(
            METHODS[method], inputs, feats, data.labels, bits, cfg, finetune, probe
        )
    model_config = ModelConfig(
        method=method,
        bits=bits,
        bands=RGB_BANDS,
        backbone=backbone,
        mean=[255.0 * m for m in IMAGENET_MEAN],
        std=[255.0 * s for s in IMAGENET_STD],
        version=version,
        model_id=model_id or f"{out.name}",
        input_size=input_size,
        descriptor_dim=bits,
        head={"n_classes": len(data.classes), "classes": data.classes},
        tta=tta,
        input=InputSpec((0, 255), default_min_size(input_size), "uint8", "8-bit RGB"),
        extra={
            "trained_on": str(labels_csv),
            "iterations": cfg.steps(len(data)),
            "seed": cfg.seed,
            "finetune": finetune.label() if finetune is not None else "frozen",
        },
    )
    if finetune is None:
        encoder = HashEncoder.build(model_config, head_state=result.net.state_dict())
    else:
        result.net.backbone = full_backbone(result.net)
        encoder = HashEncoder(model_config, result.net.cpu().eval())
    encoder.save(out)
    return encoder, result


def train_crossmodal(
    first: BenPatches,
    second: BenPatches,
    *,
    method: str = "duch",
    bits: int = 32,
    backbone: str = "smallcnn",
    config: TrainConfig | None = None,
    augment: bool = True,
    speckle_looks: float | None = 10.0,
    model_id: str = "ben-s2-s1-duch",
    version: str = "1.0.0",
) -> tuple[HashEncoder, TrainResult]:
    """Train a two-branch (cross-modal) preset on co-registered patches, row i of ``first`` and
    ``second`` the same place seen by two sensors (e.g. Sentinel-2 and Sentinel-1).

    Each branch gets its own backbone (random init), per-band statistics fitted on its patches
    and, with ``augment``, its own sensor-aware augmentation applied in physical units (flips
    and rotations; band gain and contrast jitter on optical data; on SAR, Gamma speckle of
    ``speckle_looks`` looks added in dB, None for none). The encoder's config holds
    both branches in physical units (DN for S2, dB for S1), so it encodes raw items of either
    sensor into one Hamming space.
    """
    spec = METHODS.get(method)
    if spec is None or not spec.two_sources:
        pairs = sorted(n for n, s in METHODS.items() if s.two_sources)
        raise ValueError(f"method {method!r} is not a two-branch preset; choose from {pairs}")
    if first.names != second.names or not np.array_equal(first.labels, second.labels):
        raise ValueError("the two sensors' patches are not paired row by row (names, labels)")
    cfg = config or TrainConfig()
    stats = [BandStats.fit(p.images, p.bands) for p in (first, second)]
    augments = [
        InUnits(
            Augment("sar", speckle_looks=speckle_looks, seed=cfg.seed + i)
            if p.sensor == "s1"
            else Augment("optical", seed=cfg.seed + i),
            st.mean,
            st.std,
        )
        if augment
        else None
        for i, (p, st) in enumerate(zip((first, second), stats, strict=True))
    ]
    torch.manual_seed(cfg.seed)  # the backbones' initialisation
    result = train_hashing(
        spec,
        torch.from_numpy(stats[0].normalise(first.images)),
        first.labels,
        bits,
        cfg,
        second_source=torch.from_numpy(stats[1].normalise(second.images)),
        backbone=build_backbone(backbone, len(first.bands)),
        backbone2=build_backbone(backbone, len(second.bands)),
        augment=augments[0],
        augment2=augments[1],
    )
    size = int(first.images.shape[-1])
    inputs = [InputSpec.of_sample(p.images, default_min_size(size)) for p in (first, second)]
    model_config = ModelConfig(
        method=method,
        bits=bits,
        backbone=backbone,
        version=version,
        model_id=model_id,
        input_size=size,
        descriptor_dim=bits,
        head={"n_classes": int(first.labels.shape[1])},
        second_source=SourceConfig(backbone=backbone, input=inputs[1], **stats[1].to_config()),
        input=inputs[0],
        extra={
            "trained_on": f"{len(first)} co-registered {first.sensor}/{second.sensor} pairs",
            "iterations": cfg.iterations,
            "seed": cfg.seed,
            "augment": augment,
            "speckle_looks": speckle_looks,
        },
        **stats[0].to_config(),
    )
    return HashEncoder(model_config, result.net.cpu().eval()), result


def fit_itq_encoder(
    config: ModelConfig, pixels: npt.NDArray[np.float32], progress: bool = True
) -> HashEncoder:
    """An encoder whose head is ITQ fitted on the frozen backbone's descriptors of ``pixels``.

    ``pixels`` are raw-unit training chips (N, bands, H, W); ``config.method`` must be "itq".
    The unsupervised way to a working model where no labels exist: PCA + rotation, stored as
    the linear hash layer (bits = sign((f - mean) @ P)), so it saves and loads like any other.
    """
    from stac_rscbir.models.backbones import extract_features
    from stac_rscbir.models.unsupervised import ITQ

    if config.method != "itq":
        raise ValueError(f"fit_itq_encoder needs method 'itq', got {config.method!r}")
    encoder = HashEncoder.build(config, pretrained=True)
    x = encoder.normalise(torch.from_numpy(np.asarray(pixels, np.float32)))
    feats = extract_features(encoder.net.backbone, x, progress=progress).numpy()
    itq = ITQ(config.bits).fit(feats)
    assert itq.projection_ is not None and itq.mean_ is not None
    layer = encoder.net.head.net[0]
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(itq.projection_.T.astype(np.float32)))
        layer.bias.copy_(torch.from_numpy(-(itq.mean_ @ itq.projection_).astype(np.float32)))
    return encoder.eval()


def fit_contrastive_encoder(
    config: ModelConfig,
    pixels: npt.NDArray[np.floating],
    finetune: Finetune | None = None,
    train: TrainConfig | None = None,
) -> tuple[HashEncoder, TrainResult]:
    """An encoder trained without labels by the ``contrastive`` preset on raw-unit chips
    (N, bands, H, W) of ``config``'s bands: two augmented views of each chip, NT-Xent between
    their relaxed codes, quantization and bit balance.

    ``finetune`` (default: the last 2 blocks) says what of the ImageNet EfficientNet-Lite0
    trains with the head; the views are dihedral transforms and random crops of the cached
    activations (partial) or of the chips (whole network, with optical jitter in raw units).
    """
    if config.method != "contrastive":
        raise ValueError(
            f"fit_contrastive_encoder needs method 'contrastive', got {config.method!r}"
        )
    if config.backbone != "efficientnet-lite0":
        raise ValueError("fitting starts from the ImageNet efficientnet-lite0 backbone")
    finetune = finetune or Finetune(2)
    cfg = train or TrainConfig.finetuning(epochs=10)
    encoder = HashEncoder.build(config, pretrained=True)
    backbone = encoder.net.backbone
    x = encoder.normalise(torch.from_numpy(np.asarray(pixels, np.float32)))
    inputs = x
    if not finetune.whole:
        with torch.inference_mode():
            acts = [backbone.activations(b, finetune.cache_block) for b in x.split(64)]
        inputs = torch.cat(acts).clone()
    augment = training_augment(finetune, cfg.seed, config.mean, config.std, crops=True)
    result = train_hashing(
        METHODS["contrastive"],
        inputs,
        np.zeros(len(inputs), dtype=np.int64),
        config.bits,
        cfg,
        backbone=trainable_backbone(finetune, backbone),
        augment=augment,
    )
    result.net.backbone = full_backbone(result.net)
    return HashEncoder(config, result.net.cpu().eval()), result
