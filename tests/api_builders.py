"""The coded STAC items and collection of the API tests, their brute-force ranking, and the
store factory behind the ``store_factory`` fixture (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry import box, mapping

from stac_rscbir.extension.cbir import CBIRModel, Descriptor, HashCode
from stac_rscbir.store.base import ItemStore

MODEL = "test-64"
N = 80
RNG = np.random.default_rng(7)
CENTRES = RNG.integers(0, 2, size=(4, 64), dtype=np.uint8)
T0 = datetime(2021, 1, 1, tzinfo=UTC)


def _bits(i: int) -> np.ndarray:
    """Clustered 64-bit codes: a cluster centre with a few flipped bits."""
    rng = np.random.default_rng(i)
    bits = CENTRES[i % 4].copy()
    flip = rng.choice(64, size=rng.integers(0, 12), replace=False)
    bits[flip] ^= 1
    return bits


def _item(i: int, collection: str = "scenes", bits: np.ndarray | None = None) -> dict[str, Any]:
    x, y = 10 + (i % 10) * 0.1, 45 + (i // 10) * 0.1
    bits = _bits(i) if bits is None else bits
    desc = (bits * 2.0 - 1.0 + np.random.default_rng(1000 + i).normal(0, 0.3, 64)).astype(
        np.float32
    )
    code = HashCode.from_bits(MODEL, "1.0.0", bits, descriptor=Descriptor.create(desc))
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": ["https://stac-extensions.github.io/cbir/v1.0.0/schema.json"],
        "id": f"item-{i:03d}",
        "collection": collection,
        "geometry": mapping(box(x, y, x + 0.08, y + 0.08)),
        "bbox": [x, y, x + 0.08, y + 0.08],
        "properties": {
            "datetime": (T0 + timedelta(days=i)).isoformat().replace("+00:00", "Z"),
            "platform": "sentinel-2a" if i % 2 else "sentinel-2b",
            "eo:cloud_cover": float(i % 50),
            "cbir:codes": [code.to_dict()],
        },
        "links": [],
        "assets": {},
    }


def _collection(cid: str = "scenes") -> dict[str, Any]:
    """A collection declaring the model of ``_item``'s codes (API writes are checked against it)."""
    model = CBIRModel.create(MODEL, "1.0.0", 64, ["red", "green", "blue"], descriptor_dim=64)
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
        "stac_extensions": ["https://stac-extensions.github.io/cbir/v1.0.0/schema.json"],
        "cbir:models": [model.to_dict()],
        "id": cid,
        "description": "test scenes",
        "license": "other",
        "extent": {
            "spatial": {"bbox": [[10, 45, 11.1, 46.1]]},
            "temporal": {"interval": [["2021-01-01T00:00:00Z", None]]},
        },
        "links": [],
    }


class StoreFactory:
    """New store objects over one test's database (a new object is a server restart), and the
    folder of the API's hash indexes; closes them all at the end of the test."""

    def __init__(self, open_store: Callable[[], ItemStore], index_dir: Path) -> None:
        self._open = open_store
        self.index_dir = index_dir
        self._stores: list[ItemStore] = []

    def __call__(self) -> ItemStore:
        store = self._open()
        self._stores.append(store)
        return store

    def close(self) -> None:
        for store in self._stores:
            store.close()  # type: ignore[attr-defined]


def _hamming(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.count_nonzero(a != b))


def _ranking(query: np.ndarray, keep: set[int] | None = None) -> list[tuple[int, str]]:
    """Brute force: (distance, id) of every item, ties broken by id."""
    return sorted(
        (_hamming(query, _bits(i)), f"item-{i:03d}") for i in range(N) if keep is None or i in keep
    )


def rgb_checkpoint(folder: Path, model_id: str) -> Path:
    """A small RGB model (random weights, seed 0) for image queries, saved in ``folder``."""
    import torch

    from stac_rscbir.models.config import ModelConfig
    from stac_rscbir.models.encoder import HashEncoder

    config = ModelConfig(
        method="dhnn",
        bits=64,
        bands=["red", "green", "blue"],
        backbone="smallcnn",
        mean=[120.0] * 3,
        std=[60.0] * 3,
        model_id=model_id,
        input_size=32,
        head={"n_classes": 1},
    )
    torch.manual_seed(0)
    return HashEncoder.build(config, pretrained=False).save(folder)
