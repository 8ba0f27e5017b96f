"""The small RGB hashing model and the raster scenes that the ingestion tests share (the model
is the ``checkpoint`` fixture of tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rasterio.transform import from_origin

from stac_rscbir.ingest.worker import IngestOptions

from .stac_builders import RGB, write_cog

CHIP = 32
MODEL = "test-rgb-smallcnn-32"
OPTIONS = IngestOptions(chip_size=CHIP, batch_size=16, progress=False, device="cpu")


def rgb_model(folder: Path) -> Path:
    """A small RGB hashing model (random weights: the pipeline, not accuracy, is under test)."""
    import torch

    from stac_rscbir.models.config import ModelConfig
    from stac_rscbir.models.encoder import HashEncoder

    config = ModelConfig(
        method="dhnn",
        bits=32,
        bands=list(RGB),
        backbone="smallcnn",
        mean=[1000.0, 1100.0, 1200.0],
        std=[300.0, 300.0, 300.0],
        model_id=MODEL,
        input_size=CHIP,
        head={"n_classes": 1},
    )
    torch.manual_seed(0)
    return HashEncoder.build(config, pretrained=False).save(folder)


def _scene(folder: Path, name: str, height: int, width: int, seed: int, hole: int = 0) -> Path:
    """A 3-band uint16 10 m UTM scene; a ``hole`` x ``hole`` nodata block at the top left."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(400, 2000, size=(3, height, width), dtype=np.uint16)
    pixels[:, :hole, :hole] = 0
    origin = from_origin(500_000 + 1000 * seed, 5_300_000, 10, 10)
    return write_cog(folder / f"{name}.tif", pixels, origin)
