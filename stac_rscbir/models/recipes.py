"""Ready-made training recipes: a preset on a labelled RGB image folder, to a saved encoder."""

from __future__ import annotations

from pathlib import Path

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
