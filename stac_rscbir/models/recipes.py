"""Ready-made recipes: a preset trained on a labelled RGB image folder, or an ITQ head fitted
on unlabelled chips, each to an encoder that saves and loads like any other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from stac_rscbir.data.imagefolder import read_labels_csv
from stac_rscbir.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from stac_rscbir.models.checkpoint import ModelConfig
from stac_rscbir.models.encoder import HashEncoder
from stac_rscbir.models.features import cached_features
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
) -> tuple[HashEncoder, TrainResult]:
    """Train ``method`` on frozen-backbone features of every listed image and save the encoder.

    The checkpoint holds the backbone and the head; its config carries the bands, the
    normalisation in raw 8-bit pixel units and the input size, so it encodes raw RGB chips.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    if METHODS[method].two_sources:
        raise ValueError(f"method {method!r} needs paired sources; an RGB folder has one")
    cfg = config or TrainConfig()
    data = read_labels_csv(images, labels_csv)
    feats, _ = cached_features(data, backbone, input_size, cache_dir, cfg.device)
    result = train_hashing(METHODS[method], feats, data.labels, bits, cfg)
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
        extra={"trained_on": str(labels_csv), "iterations": cfg.iterations, "seed": cfg.seed},
    )
    encoder = HashEncoder.build(model_config, head_state=result.net.state_dict(), pretrained=True)
    encoder.save(out)
    return encoder, result


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
