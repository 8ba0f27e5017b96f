"""The STAC API with the similarity extension, over both stores: the embedded SQLite store
and pgstac (a fresh database per test); every test runs on each."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from rasterio.io import MemoryFile
from shapely.geometry import box, mapping, shape

from stac_rscbir.api.app import create_api
from stac_rscbir.api.similarity import CONFORMANCE
from stac_rscbir.extension.cbir import Descriptor, HashCode
from stac_rscbir.models.checkpoint import ModelConfig
from stac_rscbir.models.encoder import HashEncoder
from stac_rscbir.store.base import ItemStore
from stac_rscbir.store.sqlite import SQLiteStore

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
    return {
        "type": "Collection",
        "stac_version": "1.1.0",
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


@pytest.fixture(params=["sqlite", "pgstac"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """An empty store of each kind: a SQLite file, or a fresh pgstac database."""
    if request.param == "sqlite":
        factory = StoreFactory(lambda: SQLiteStore(tmp_path / "stac.db"), tmp_path / "index")
    else:
        from stac_rscbir.store.pgstac import PgstacStore

        dsn = request.getfixturevalue("pgstac_db")
        factory = StoreFactory(lambda: PgstacStore(dsn), tmp_path / "index")
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def db(store_factory: StoreFactory) -> StoreFactory:
    """The store factory, its store holding the ``scenes`` collection and N items."""
    store = store_factory()
    store.create_collection(_collection())
    store.upsert_items([_item(i) for i in range(N)])
    return store_factory


def _client(db: StoreFactory, models: dict[str, Path] | None = None) -> TestClient:
    api = create_api(db(), db.index_dir, models or {})
    return TestClient(api.app)


@pytest.fixture
def client(db: StoreFactory) -> Iterator[TestClient]:
    with _client(db) as c:
        yield c


def _hamming(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.count_nonzero(a != b))


def _ranking(query: np.ndarray, keep: set[int] | None = None) -> list[tuple[int, str]]:
    """Brute force: (distance, id) of every item, ties broken by id."""
    return sorted(
        (_hamming(query, _bits(i)), f"item-{i:03d}") for i in range(N) if keep is None or i in keep
    )


def _search(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/search", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _ids_dists(page: dict[str, Any]) -> list[tuple[int, str]]:
    return [(f["properties"]["cbir:distance"], f["id"]) for f in page["features"]]


def test_landing_conformance_and_openapi(client: TestClient) -> None:
    conf = client.get("/conformance").json()["conformsTo"]
    assert CONFORMANCE in conf
    assert any("item-search" in c for c in conf) and any("filter" in c for c in conf)
    assert CONFORMANCE in client.get("/").json()["conformsTo"]
    spec = client.get("/api").json()
    post = spec["components"]["schemas"]
    assert any("similarity" in (s.get("properties") or {}) for s in post.values())
    params = {p["name"] for p in spec["paths"]["/search"]["get"]["parameters"]}
    assert {"similarity_item", "similarity_code", "similarity_k"} <= params
    assert "/collections/{collection_id}/items/{item_id}/similar" in spec["paths"]


def test_query_by_item_is_ranked_by_hamming(client: TestClient) -> None:
    page = _search(
        client,
        {
            "similarity": {
                "model": MODEL,
                "item": {"collection": "scenes", "id": "item-005"},
                "k": 15,
            },
            "limit": 15,
        },
    )
    assert _ids_dists(page) == _ranking(_bits(5))[:15]
    assert page["features"][0]["id"] == "item-005"
    assert page["cbir:similarity"]["exact"] is True
    assert page["numberMatched"] == 15


def test_similarity_composes_with_filters(client: TestClient) -> None:
    bbox = [10.0, 45.0, 10.55, 45.75]
    body = {
        "similarity": {"model": MODEL, "item": {"collection": "scenes", "id": "item-011"}, "k": 40},
        "bbox": bbox,
        "datetime": "2021-01-05T00:00:00Z/2021-03-01T00:00:00Z",
        "filter": {"op": "<", "args": [{"property": "eo:cloud_cover"}, 40]},
        "filter-lang": "cql2-json",
        "limit": 40,
    }
    page = _search(client, body)
    keep = {
        i
        for i in range(N)
        if shape(_item(i)["geometry"]).intersects(box(*bbox)) and 4 <= i <= 59 and i % 50 < 40
    }
    assert _ids_dists(page) == _ranking(_bits(11), keep)[:40]
    assert all(int(f["id"][-3:]) in keep for f in page["features"])


def test_similarity_with_intersects_and_collections(client: TestClient) -> None:
    # a triangle over the lower-left of the grid: exact geometry, not its bounding box
    triangle = {"type": "Polygon", "coordinates": [[[10, 45], [10.75, 45], [10, 45.75], [10, 45]]]}
    body = {
        "similarity": {"model": MODEL, "item": {"collection": "scenes", "id": "item-030"}, "k": 80},
        "intersects": triangle,
        "collections": ["scenes"],
        "limit": 80,
    }
    keep = {i for i in range(N) if shape(_item(i)["geometry"]).intersects(shape(triangle))}
    assert 0 < len(keep) < N / 2
    assert _ids_dists(_search(client, body)) == _ranking(_bits(30), keep)
    assert _search(client, {**body, "collections": ["other"]})["features"] == []


def test_paging_is_stable_over_the_ranked_list(client: TestClient) -> None:
    body: dict[str, Any] = {
        "similarity": {"model": MODEL, "item": {"collection": "scenes", "id": "item-002"}, "k": 23},
        "limit": 5,
    }
    seen = []
    page = _search(client, body)
    while True:
        seen += _ids_dists(page)
        nxt = [link for link in page["links"] if link["rel"] == "next"]
        if not nxt:
            break
        assert nxt[0]["method"] == "POST"
        page = _search(client, nxt[0]["body"])
    assert seen == _ranking(_bits(2))[:23]
    token = _search(client, body)["links"][-1]["body"]["token"]
    other = {**body, "token": token, "similarity": {**body["similarity"], "k": 30}}
    r = client.post("/search", json=other)
    assert r.status_code == 400 and "token" in r.text


def test_query_by_code_get_and_similar_endpoint(client: TestClient) -> None:
    bits = _bits(9)
    code = HashCode.from_bits(MODEL, "1.0.0", bits).code
    expected = _ranking(bits)[:10]
    assert (
        _ids_dists(_search(client, {"similarity": {"model": MODEL, "code": code, "k": 10}}))
        == expected
    )
    hexcode = np.packbits(bits).tobytes().hex()
    page = _search(
        client, {"similarity": {"model": MODEL, "code": hexcode, "encoding": "hex", "k": 10}}
    )
    assert _ids_dists(page) == expected
    r = client.get(
        "/search",
        params={
            "similarity_item": "scenes/item-009",
            "similarity_model": MODEL,
            "similarity_k": 10,
            "limit": 10,
        },
    )
    assert r.status_code == 200, r.text
    assert _ids_dists(r.json()) == expected
    r = client.get("/collections/scenes/items/item-009/similar", params={"model": MODEL, "k": 10})
    assert r.status_code == 200, r.text
    assert _ids_dists(r.json()) == expected


def test_max_distance_and_rerank(client: TestClient) -> None:
    page = _search(
        client,
        {
            "similarity": {
                "model": MODEL,
                "item": {"collection": "scenes", "id": "item-000"},
                "k": 80,
                "max_distance": 6,
            },
            "limit": 80,
        },
    )
    assert _ids_dists(page) == [h for h in _ranking(_bits(0)) if h[0] <= 6]
    reranked = _search(
        client,
        {
            "similarity": {
                "model": MODEL,
                "item": {"collection": "scenes", "id": "item-000"},
                "k": 20,
                "rerank": True,
            },
            "limit": 20,
        },
    )
    assert {f["id"] for f in reranked["features"]} == {i for _, i in _ranking(_bits(0))[:20]}


def test_transactions_update_the_index(client: TestClient) -> None:
    _search(
        client,
        {
            "similarity": {
                "model": MODEL,
                "item": {"collection": "scenes", "id": "item-001"},
                "k": 5,
            }
        },
    )
    new = _item(500, bits=_bits(1))
    r = client.post("/collections/scenes/items", json=new)
    assert r.status_code in (200, 201), r.text
    page = _search(
        client,
        {
            "similarity": {
                "model": MODEL,
                "item": {"collection": "scenes", "id": "item-001"},
                "k": 3,
            }
        },
    )
    assert "item-500" in {f["id"] for f in page["features"]}
    moved = _item(500, bits=1 - _bits(1))
    r = client.put("/collections/scenes/items/item-500", json=moved)
    assert r.status_code == 200, r.text
    page = _search(
        client,
        {
            "similarity": {
                "model": MODEL,
                "code": HashCode.from_bits(MODEL, "1.0.0", 1 - _bits(1)).code,
                "k": 1,
            }
        },
    )
    assert (
        page["features"][0]["id"] == "item-500"
        and page["features"][0]["properties"]["cbir:distance"] == 0
    )
    assert client.delete("/collections/scenes/items/item-500").status_code in (200, 204)
    page = _search(
        client,
        {
            "similarity": {
                "model": MODEL,
                "code": HashCode.from_bits(MODEL, "1.0.0", 1 - _bits(1)).code,
                "k": 80,
            },
            "limit": 80,
        },
    )
    assert "item-500" not in {f["id"] for f in page["features"]}


def test_restart_and_lost_index_lose_nothing(db: StoreFactory) -> None:
    body = {
        "similarity": {"model": MODEL, "item": {"collection": "scenes", "id": "item-033"}, "k": 12},
        "limit": 12,
    }
    with _client(db) as c:
        c.post("/collections/scenes/items", json=_item(600, bits=_bits(33)))
        first = _search(c, body)
    with _client(db) as c:  # restart: the persisted index is reused
        assert _search(c, body) == first
    import shutil

    shutil.rmtree(db.index_dir)
    with _client(db) as c:  # index gone: rebuilt from the store
        assert _search(c, body) == first
    assert "item-600" in {f["id"] for f in first["features"]}


def test_bad_similarity_requests_are_400_or_404(client: TestClient) -> None:
    item = {"collection": "scenes", "id": "item-001"}
    cases = [
        ({"similarity": {"model": MODEL, "item": item, "code": "AAAAAAAAAAA="}}, 400),
        ({"similarity": {"model": MODEL}}, 400),
        ({"similarity": {"model": MODEL, "item": {"collection": "scenes", "id": "nope"}}}, 404),
        ({"similarity": {"model": "other-model", "item": item}}, 400),
        ({"similarity": {"model": MODEL, "code": "not base64!"}}, 400),
        ({"similarity": {"model": MODEL, "code": "AAAA"}}, 400),  # 24 bits for a 64-bit model
        ({"similarity": {"model": MODEL, "item": item, "k": 0}}, 400),
        ({"similarity": {"model": MODEL, "image": "AAAA"}}, 400),
    ]
    for body, status in cases:
        r = client.post("/search", json=body)
        assert r.status_code == status, (body, r.status_code, r.text)
        assert "Traceback" not in r.text
    r = client.get("/search", params={"similarity_item": "no-slash"})
    assert r.status_code == 400


def rgb_checkpoint(folder: Path, model_id: str) -> Path:
    """A small RGB model (random weights, seed 0) for image queries, saved in ``folder``."""
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


def test_query_by_uploaded_image(store_factory: StoreFactory, tmp_path: Path) -> None:
    ckpt = rgb_checkpoint(tmp_path / "model", "rgb-img-64")
    encoder = HashEncoder.load(ckpt)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, size=(12, 3, 32, 32), dtype=np.uint8)
    bits, relaxed = encoder.encode_numpy(images.astype(np.float32))
    store = store_factory()
    store.create_collection(_collection("img"))
    items = []
    for i in range(12):
        it = _item(i, "img")
        it["properties"]["cbir:codes"] = [
            HashCode.from_bits(
                "rgb-img-64", "1.0.0", bits[i], descriptor=Descriptor.create(relaxed[i])
            ).to_dict()
        ]
        items.append(it)
    store.upsert_items(items)
    with MemoryFile() as mem:
        with mem.open(driver="PNG", width=32, height=32, count=3, dtype="uint8") as dst:
            dst.write(images[4])
        png = base64.b64encode(mem.read()).decode()
    api = create_api(store, store_factory.index_dir, {"rgb-img-64": ckpt})
    with TestClient(api.app) as c:
        page = _search(c, {"similarity": {"model": "rgb-img-64", "image": png, "k": 3}})
        assert page["features"][0]["id"] == "item-004"
        assert page["features"][0]["properties"]["cbir:distance"] == 0
        gray = base64.b64encode(b"P5 not an image").decode()
        assert (
            c.post(
                "/search", json={"similarity": {"model": "rgb-img-64", "image": gray}}
            ).status_code
            == 400
        )
