"""The STAC API with the similarity extension, on the three deployments: our app over the
embedded SQLite store, our app over pgstac, and stac-fastapi-pgstac with the similarity plugin
(a fresh database per test); every test runs on each."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from rasterio.io import MemoryFile
from shapely.geometry import box, shape

from stac_rscbir.api.similarity import CONFORMANCE
from stac_rscbir.extension.cbir import Descriptor, HashCode
from stac_rscbir.models.encoder import HashEncoder

from .api_builders import (
    MODEL,
    Deployment,
    N,
    _bits,
    _collection,
    _item,
    _ranking,
    rgb_checkpoint,
)


@pytest.fixture
def db(deployment: Deployment) -> Deployment:
    """The deployment, its database holding the ``scenes`` collection and N items."""
    store = deployment()
    store.create_collection(_collection())
    store.upsert_items([_item(i) for i in range(N)])
    return deployment


def _client(db: Deployment, models: dict[str, Path] | None = None) -> TestClient:
    return TestClient(db.app(models))


@pytest.fixture
def client(db: Deployment) -> Iterator[TestClient]:
    with _client(db) as c:
        yield c


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

    # the oracle: the 20 Hamming nearest, ordered by the Euclidean distance of their descriptors
    # (decoded here from the items, not by the codec), ties by Hamming distance, then id
    def descriptor(item_id: str) -> np.ndarray:
        entry = _item(int(item_id[-3:]))["properties"]["cbir:codes"][0]["descriptor"]
        return np.frombuffer(base64.b64decode(entry["value"]), "<f4").astype(np.float64)

    query = descriptor("item-000")
    hamming_top = _ranking(_bits(0))[:20]
    euclid = sorted((float(np.linalg.norm(descriptor(i) - query)), d, i) for d, i in hamming_top)
    gaps = np.diff([e for e, _, _ in euclid])
    assert gaps.min() > 1e-4  # no near-tie that float32 arithmetic on the server may flip
    assert _ids_dists(reranked) == [(d, i) for _, d, i in euclid]
    assert _ids_dists(reranked) != hamming_top  # the re-ranking really reordered the list


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


def test_restart_and_lost_index_lose_nothing(db: Deployment) -> None:
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


def test_query_by_uploaded_image(deployment: Deployment, tmp_path: Path) -> None:
    ckpt = rgb_checkpoint(tmp_path / "model", "rgb-img-64")
    encoder = HashEncoder.load(ckpt)
    rng = np.random.default_rng(3)
    images = rng.integers(0, 255, size=(12, 3, 32, 32), dtype=np.uint8)
    bits, relaxed = encoder.encode_numpy(images.astype(np.float32))
    store = deployment()
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
    with _client(deployment, {"rgb-img-64": ckpt}) as c:
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
