"""Bad input gets a 4xx with a JSON error that names the problem, never a 5xx or a hang, and
leaves the store as it was; over both stores (the ``store_factory`` fixture of conftest)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from rasterio.io import MemoryFile

from stac_rscbir.api.app import create_api
from stac_rscbir.extension.cbir import CBIRModel, HashCode

from .api_builders import MODEL, N, StoreFactory, _bits, _collection, _item, rgb_checkpoint

ITEM = {"collection": "scenes", "id": "item-001"}
CODE = HashCode.from_bits(MODEL, "1.0.0", _bits(1)).code
BOWTIE = {"type": "Polygon", "coordinates": [[[10, 45], [11, 46], [11, 45], [10, 46], [10, 45]]]}
UNCLOSED = {"type": "Polygon", "coordinates": [[[10, 45], [11, 45], [11, 46], [10, 46]]]}
IMAGE_MODEL = "rgb-bad-64"


def _state(store: Any) -> tuple[int, int]:
    return store.count(), store.generation()


@pytest.fixture
def served(store_factory: StoreFactory) -> Iterator[tuple[TestClient, Any]]:
    """A client over a store with N coded items (``max_k=50``, a 64 KB body cap), and the store."""
    store = store_factory()
    store.create_collection(_collection())
    store.upsert_items([_item(i) for i in range(N)])
    api = create_api(store, store_factory.index_dir, {}, max_k=50, max_body_bytes=64 * 1024)
    with TestClient(api.app, raise_server_exceptions=False) as client:
        yield client, store


def _rejected(r: Any, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    r.json()
    for word in words:
        assert word.lower() in r.text.lower(), (word, r.text[:800])


# (name, body of POST /search, status, words the error names)
SEARCH_CASES: list[tuple[str, Any, int, tuple[str, ...]]] = [
    ("not an object", [1, 2], 400, ("JSON object",)),
    (
        "unknown similarity field",
        {"similarity": {"model": MODEL, "item": ITEM, "kk": 5}},
        400,
        ("similarity", "kk", "extra"),
    ),
    (
        "unknown item field",
        {"similarity": {"model": MODEL, "item": {**ITEM, "x": 1}}},
        400,
        ("item", "extra"),
    ),
    (
        "code of the wrong length",
        {"similarity": {"model": MODEL, "code": "AAAA"}},
        400,
        ("similarity.code", "24 bits"),
    ),
    (
        "code not base64",
        {"similarity": {"model": MODEL, "code": "not base64!"}},
        400,
        ("similarity.code", "base64"),
    ),
    (
        "code not hex",
        {"similarity": {"model": MODEL, "code": "zz" * 8, "encoding": "hex"}},
        400,
        ("similarity.code",),
    ),
    (
        "unknown model (code)",
        {"similarity": {"model": "nope", "code": CODE}},
        400,
        ("unknown model 'nope'", MODEL),
    ),
    (
        "unknown model (item)",
        {"similarity": {"model": "nope", "item": ITEM}},
        400,
        ("unknown model 'nope'", MODEL),
    ),
    (
        "unknown model (descriptor)",
        {"similarity": {"model": "nope", "descriptor": "AAAAAA=="}},
        400,
        ("unknown model 'nope'", MODEL),
    ),
    (
        "k over max_k",
        {"similarity": {"model": MODEL, "item": ITEM, "k": 51}},
        400,
        ("similarity.k", "50"),
    ),
    ("k zero", {"similarity": {"model": MODEL, "item": ITEM, "k": 0}}, 400, ("k",)),
    (
        "huge k",
        {"similarity": {"model": MODEL, "item": ITEM, "k": 10**30}},
        400,
        ("similarity.k",),
    ),
    ("limit zero", {"limit": 0}, 400, ("limit",)),
    ("limit not a number", {"limit": "many"}, 400, ("limit",)),
    (
        "max_distance over the bits",
        {"similarity": {"model": MODEL, "item": ITEM, "max_distance": 65}},
        400,
        ("max_distance", "64 bits"),
    ),
    (
        "max_distance negative",
        {"similarity": {"model": MODEL, "item": ITEM, "max_distance": -1}},
        400,
        ("max_distance",),
    ),
    ("self-intersecting polygon", {"intersects": BOWTIE}, 400, ("intersects", "self-intersection")),
    ("unclosed polygon", {"intersects": UNCLOSED}, 400, ("intersects", "same start and end")),
    ("bbox min > max (latitude)", {"bbox": [10, 46, 11, 45]}, 400, ("bbox", "latitude")),
    ("bbox min > max (longitude)", {"bbox": [11, 45, 10, 46]}, 400, ("bbox", "west")),
    ("bbox of 3 numbers", {"bbox": [10, 45, 11]}, 400, ("bbox",)),
    (
        "datetime end before start",
        {"datetime": "2022-01-01T00:00:00Z/2021-01-01T00:00:00Z"},
        400,
        ("datetime", "begin date after end date"),
    ),
    ("datetime garbage", {"datetime": "garbage"}, 400, ("datetime",)),
    ("datetime interval garbage", {"datetime": "2021-01-01T00:00:00Z/x"}, 400, ("datetime",)),
    ("datetime interval open both ends", {"datetime": "../.."}, 400, ("datetime",)),
]


@pytest.mark.parametrize(
    "body, status, words", [c[1:] for c in SEARCH_CASES], ids=[c[0] for c in SEARCH_CASES]
)
def test_bad_post_search(
    served: tuple[TestClient, Any], body: Any, status: int, words: tuple[str, ...]
) -> None:
    client, store = served
    before = _state(store)
    _rejected(client.post("/search", json=body), status, *words)
    assert _state(store) == before


GET_CASES: list[tuple[str, str, dict[str, str], int, tuple[str, ...]]] = [
    ("bbox min > max", "/search", {"bbox": "11,45,10,46"}, 400, ("bbox",)),
    ("bbox garbage", "/search", {"bbox": "a,b,c,d"}, 400, ("bbox",)),
    (
        "datetime end before start",
        "/search",
        {"datetime": "2022-01-01T00:00:00Z/2021-01-01T00:00:00Z"},
        400,
        ("datetime",),
    ),
    ("datetime garbage", "/search", {"datetime": "yesterday"}, 400, ("datetime",)),
    (
        "intersects self-intersecting",
        "/search",
        {"intersects": json.dumps(BOWTIE)},
        400,
        ("intersects", "self-intersection"),
    ),
    (
        "intersects unclosed",
        "/search",
        {"intersects": json.dumps(UNCLOSED)},
        400,
        ("intersects", "same start and end"),
    ),
    (
        "intersects not GeoJSON",
        "/search",
        {"intersects": '{"type": "Polygon"}'},
        400,
        ("intersects",),
    ),
    ("intersects not JSON", "/search", {"intersects": "{oops"}, 400, ("intersects",)),
    (
        "intersects with NaN",
        "/search",
        {"intersects": '{"type": "Point", "coordinates": [NaN, 45]}'},
        400,
        ("intersects",),
    ),
    (
        "similarity_k over max_k",
        "/search",
        {"similarity_item": "scenes/item-001", "similarity_model": MODEL, "similarity_k": "51"},
        400,
        ("similarity.k", "50"),
    ),
    (
        "similarity_max_distance over the bits",
        "/search",
        {
            "similarity_item": "scenes/item-001",
            "similarity_model": MODEL,
            "similarity_max_distance": "99",
        },
        400,
        ("max_distance",),
    ),
    (
        "similarity_code wrong length",
        "/search",
        {"similarity_code": "AAAA", "similarity_model": MODEL},
        400,
        ("similarity.code",),
    ),
    (
        "similarity_model unknown",
        "/search",
        {"similarity_code": CODE, "similarity_model": "nope"},
        400,
        ("unknown model", MODEL),
    ),
    ("limit zero", "/search", {"limit": "0"}, 400, ("limit",)),
    (
        "similar: k over max_k",
        "/collections/scenes/items/item-001/similar",
        {"model": MODEL, "k": "51"},
        400,
        ("similarity.k",),
    ),
    (
        "similar: unknown model",
        "/collections/scenes/items/item-001/similar",
        {"model": "nope"},
        400,
        ("unknown model", MODEL),
    ),
    ("items: bbox min > max", "/collections/scenes/items", {"bbox": "11,45,10,46"}, 400, ("bbox",)),
    (
        "items: datetime end before start",
        "/collections/scenes/items",
        {"datetime": "2022-01-01T00:00:00Z/2021-01-01T00:00:00Z"},
        400,
        ("datetime",),
    ),
]


@pytest.mark.parametrize(
    "path, params, status, words", [c[1:] for c in GET_CASES], ids=[c[0] for c in GET_CASES]
)
def test_bad_get(
    served: tuple[TestClient, Any],
    path: str,
    params: dict[str, str],
    status: int,
    words: tuple[str, ...],
) -> None:
    client, store = served
    before = _state(store)
    _rejected(client.get(path, params=params), status, *words)
    assert _state(store) == before


def test_model_defaults_to_the_only_one_and_is_required_among_several(
    served: tuple[TestClient, Any],
) -> None:
    """A query that names no model uses the one model the store has codes of; once items carry
    codes of two models, it is a 400 naming both."""
    client, store = served

    def ranked(similarity: dict[str, Any]) -> list[tuple[str, int]]:
        r = client.post("/search", json={"similarity": similarity, "limit": 5})
        assert r.status_code == 200, r.text
        return [(f["id"], f["properties"]["cbir:distance"]) for f in r.json()["features"]]

    assert ranked({"item": ITEM, "k": 5}) == ranked({"model": MODEL, "item": ITEM, "k": 5})
    item = _item(N)
    item["properties"]["cbir:codes"].append(HashCode.from_bits("other-64", "1", _bits(7)).to_dict())
    collection = _collection()  # codes of a model its collection does not declare are a 400
    collection["cbir:models"].append(CBIRModel.create("other-64", "1", 64, ["red"]).to_dict())
    assert client.put("/collections/scenes", json=collection).status_code == 200
    r = client.post("/collections/scenes/items", json=item)
    assert r.status_code in (200, 201), r.text
    before = _state(store)
    _rejected(
        client.post("/search", json={"similarity": {"item": ITEM}}),
        400,
        "similarity.model",
        MODEL,
        "other-64",
    )
    assert _state(store) == before


def test_malformed_json_and_oversized_bodies(served: tuple[TestClient, Any]) -> None:
    client, store = served
    before = _state(store)
    headers = {"content-type": "application/json"}
    for path in ("/search", "/collections", "/collections/scenes/items"):
        _rejected(client.post(path, content=b'{"similarity": ', headers=headers), 400, "JSON")
    _rejected(
        client.put("/collections/scenes/items/item-001", content=b"{oops", headers=headers),
        400,
        "JSON",
    )
    big = {"ids": ["x" * 1000] * 100}  # ~100 KB over the 64 KB cap
    _rejected(client.post("/search", json=big), 413, "PayloadTooLarge")
    _rejected(client.post("/collections/scenes/items", json=big), 413, "PayloadTooLarge")

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
        yield b'{"ids": ['
        for _ in range(200):
            yield b'"' + b"x" * 1000 + b'",'
        yield b'"x"]}'

    _rejected(client.post("/search", content=chunks(), headers=headers), 413, "PayloadTooLarge")
    assert _state(store) == before
    # the cap is not in the way of ordinary requests
    assert client.post("/search", json={"limit": 2}).status_code == 200


def test_limit_is_capped_not_refused(served: tuple[TestClient, Any]) -> None:
    """The STAC API spec: a limit over the maximum acts as the maximum (stac-fastapi: 10000)."""
    client, _ = served
    r = client.post("/search", json={"limit": 10**12})
    assert r.status_code == 200 and r.json()["numberReturned"] == N
    r = client.get("/search", params={"limit": str(10**12)})
    assert r.status_code == 200 and r.json()["numberReturned"] == N


# --------------------------------------------------------------------------- uploaded images


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return rgb_checkpoint(tmp_path_factory.mktemp("m") / "m", IMAGE_MODEL)


def _png(count: int = 3, size: int = 32) -> str:
    pixels = np.random.default_rng(0).integers(0, 255, size=(count, size, size), dtype=np.uint8)
    with MemoryFile() as mem:
        with mem.open(driver="PNG", width=size, height=size, count=count, dtype="uint8") as dst:
            dst.write(pixels)
        return base64.b64encode(mem.read()).decode()


def _bomb() -> str:
    """A GeoTIFF whose header says 30000 x 30000 x 3 (2.7 G values) in ~200 KB: sparse tiles."""
    with MemoryFile() as mem:
        with mem.open(
            driver="GTiff",
            width=30_000,
            height=30_000,
            count=3,
            dtype="uint8",
            tiled=True,
            SPARSE_OK="TRUE",
        ):
            pass
        raw = mem.read()
    assert len(raw) < 2_000_000
    return base64.b64encode(raw).decode()


def _vrt() -> str:
    """A GDAL VRT naming a file of the server: not an accepted format."""
    xml = (
        '<VRTDataset rasterXSize="32" rasterYSize="32"><VRTRasterBand dataType="Byte" band="1">'
        "<SimpleSource><SourceFilename>/etc/passwd</SourceFilename></SimpleSource>"
        "</VRTRasterBand></VRTDataset>"
    )
    return base64.b64encode(xml.encode()).decode()


IMAGE_CASES: list[tuple[str, Any, int, tuple[str, ...]]] = [
    ("not base64", "not base64!", 400, ("similarity.image", "base64")),
    ("not an image", base64.b64encode(b"hello, world").decode(), 400, ("similarity.image", "PNG")),
    ("a GDAL VRT", _vrt(), 400, ("similarity.image", "PNG")),
    ("one band for three", _png(count=1), 400, ("similarity.image", "1 band", "takes 3")),
    ("decompression bomb", _bomb(), 413, ("similarity.image", "too large", "30000 x 30000")),
    ("over the byte cap", "A" * 3_000_000, 413, ("similarity.image", "too large")),
]


@pytest.mark.parametrize(
    "image, status, words", [c[1:] for c in IMAGE_CASES], ids=[c[0] for c in IMAGE_CASES]
)
def test_bad_uploaded_image(
    tmp_path: Path, checkpoint: Path, image: str, status: int, words: tuple[str, ...]
) -> None:
    from stac_rscbir.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "s.db")
    store.create_collection(_collection())
    store.upsert_items([_item(i) for i in range(5)])
    api = create_api(
        store, tmp_path / "index", {IMAGE_MODEL: checkpoint}, max_image_bytes=2_000_000
    )
    before = _state(store)
    with TestClient(api.app, raise_server_exceptions=False) as client:
        body = {"similarity": {"model": IMAGE_MODEL, "image": image, "k": 3}}
        _rejected(client.post("/search", json=body), status, *words)
        ok = {"similarity": {"model": IMAGE_MODEL, "image": _png(), "k": 3}}
        assert client.post("/search", json=ok).status_code == 200
    assert _state(store) == before
    store.close()


def test_pixel_cap_is_configurable(tmp_path: Path, checkpoint: Path) -> None:
    from stac_rscbir.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "s.db")
    api = create_api(store, tmp_path / "index", {IMAGE_MODEL: checkpoint}, max_image_pixels=1000)
    with TestClient(api.app, raise_server_exceptions=False) as client:
        body = {"similarity": {"model": IMAGE_MODEL, "image": _png(), "k": 3}}
        _rejected(client.post("/search", json=body), 413, "32 x 32 pixels x 3", "1000")
    store.close()
