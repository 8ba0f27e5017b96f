"""The coded STAC items and collection of the API tests, their brute-force ranking, the store
factory behind the ``store_factory`` fixture and the deployments behind the ``deployment``
fixture (tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI
from shapely.geometry import box, mapping

from stac_rscbir.extension.cbir import CBIRModel, Descriptor, HashCode
from stac_rscbir.store.base import ItemStore

if TYPE_CHECKING:
    from stac_rscbir.api.server import BackgroundServer

MODEL = "test-64"
N = 80
RNG = np.random.default_rng(7)
CENTRES = RNG.integers(0, 2, size=(4, 64), dtype=np.uint8)
T0 = datetime(2021, 1, 1, tzinfo=UTC)
OTHER = "scenes-s1"  # the second collection of :func:`thumbnail_archive`
COLOURS = [(200, 60, 40), (40, 160, 70), (50, 90, 200), (210, 190, 60)]  # by code cluster


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


def thumbnail_archive(folder: Path) -> Path:
    """A SQLite store of ``N`` chips (four code clusters), each with a PNG thumbnail asset under
    ``folder/thumbs``, plus ``OTHER``: every fourth chip in another collection under the same
    model (as Sentinel-1 chips under a cross-modal one). Returns ``folder``."""
    from PIL import Image

    from stac_rscbir.store.sqlite import SQLiteStore

    thumbs = folder / "thumbs"
    thumbs.mkdir()
    items = []
    for i in range(N):
        png = thumbs / f"item-{i:03d}.png"
        shade = tuple(min(255, c + 3 * (i // 4)) for c in COLOURS[i % 4])
        Image.new("RGB", (32, 32), shade).save(png)
        item = _item(i)
        item["assets"] = {
            "thumbnail": {"href": str(png), "type": "image/png", "roles": ["thumbnail"]}
        }
        items.append(item)
    store = SQLiteStore(folder / "archive.db")
    store.create_collection(_collection())
    store.upsert_items(items)
    store.create_collection(_collection(OTHER))
    store.upsert_items([_item(i, OTHER) for i in range(0, N, 4)])
    store.close()
    return folder


@contextmanager
def serving(folder: Path, models: dict[str, Path] | None = None) -> Iterator[BackgroundServer]:
    """Our app over the :func:`thumbnail_archive` in ``folder`` (its thumbnails served), on a
    free port."""
    from stac_rscbir.api.app import create_api
    from stac_rscbir.api.server import BackgroundServer
    from stac_rscbir.store.sqlite import SQLiteStore

    store = SQLiteStore(folder / "archive.db")
    try:
        api = create_api(store, folder / "index", models, asset_roots=[folder / "thumbs"])
        with BackgroundServer(api.app) as running:
            yield running
    finally:
        store.close()


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


DEPLOYMENTS = ("sqlite", "pgstac", "plugin")


class Deployment(StoreFactory):
    """One of the three deployments the shared API suite runs on: our app over SQLite, our app
    over pgstac, stac-fastapi-pgstac with the similarity plugin (over pgstac). Calling it opens
    a store on its database (to fill it, or for our apps to serve); :meth:`app` builds the API
    (a new one is a server restart)."""

    def __init__(
        self,
        kind: str,
        open_store: Callable[[], ItemStore],
        index_dir: Path,
        dsn: str | None = None,
    ) -> None:
        super().__init__(open_store, index_dir)
        self.kind = kind
        self.dsn = dsn

    def app(self, models: dict[str, Path] | None = None) -> FastAPI:
        """The deployment's API over its database, with checkpoints ``models`` for image
        queries."""
        if self.kind != "plugin":
            from stac_rscbir.api.app import create_api

            return create_api(self(), self.index_dir, models or {}).app
        from stac_fastapi.pgstac.config import Settings

        from stac_rscbir.api.pgstac_plugin import instantiate_similarity_api

        assert self.dsn is not None
        return instantiate_similarity_api(
            index_dir=self.index_dir,
            models=models,
            settings=Settings(enable_transactions_extensions=True),
            postgres_settings=postgres_settings(self.dsn),
        ).app

    def stock_app(self) -> FastAPI:
        """The stock stac-fastapi-pgstac app (no plugin) over the plugin deployment's database,
        with its default lifespan's pools (given the test cluster's settings, not the
        environment's)."""
        from contextlib import asynccontextmanager

        from stac_fastapi.pgstac.app import instantiate_api
        from stac_fastapi.pgstac.config import Settings
        from stac_fastapi.pgstac.db import close_db_connection, connect_to_db
        from stac_fastapi.pgstac.models.extensions import Extensions

        assert self.dsn is not None
        pg = postgres_settings(self.dsn)

        @asynccontextmanager
        async def lifespan(app: FastAPI) -> Any:
            await connect_to_db(app, postgres_settings=pg, add_write_connection_pool=True)
            yield
            await close_db_connection(app)

        settings = Settings(enable_transactions_extensions=True)
        extensions = Extensions(settings=settings)  # instantiate_api's own reads the environment
        return instantiate_api(settings=settings, extensions=extensions, lifespan=lifespan).app


def postgres_settings(dsn: str) -> Any:
    """stac-fastapi-pgstac's PostgresSettings of a test cluster's DSN."""
    from stac_fastapi.pgstac.config import PostgresSettings

    return PostgresSettings(**pg_environ(dsn))  # type: ignore[arg-type]


def pg_environ(dsn: str) -> dict[str, str]:
    """The PG* environment stac-fastapi-pgstac reads, of a test cluster's DSN (trust login)."""
    from psycopg.conninfo import conninfo_to_dict

    parts = conninfo_to_dict(dsn)
    return {
        "pguser": str(parts.get("user") or "postgres"),
        "pgpassword": str(parts.get("password") or "unused"),
        "pghost": str(parts.get("host") or "127.0.0.1"),
        "pgport": str(parts.get("port") or 5432),
        "pgdatabase": str(parts["dbname"]),
    }


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
