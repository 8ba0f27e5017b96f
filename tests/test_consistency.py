"""The three ways to ask (POST /search, GET /search, /similar) and the Python helper agree: one
default k, the same fields, paging with `next` links that survives writes, and a response that
says which order it is in (issue 15, part D). API tests run on both stores."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pystac_client import Client
from rasterio.io import MemoryFile

from stac_rscbir.api.app import create_api
from stac_rscbir.api.server import BackgroundServer
from stac_rscbir.client import distances, search_similar
from stac_rscbir.extension.cbir import DEFAULT_K, Descriptor, HashCode
from stac_rscbir.models.encoder import HashEncoder

from .api_builders import (
    MODEL,
    N,
    StoreFactory,
    _bits,
    _collection,
    _item,
    _ranking,
    rgb_checkpoint,
)
from .conftest import ROOT

ITEM = {"collection": "scenes", "id": "item-005"}


@pytest.fixture
def db(store_factory: StoreFactory) -> StoreFactory:
    """The store factory, its store holding the ``scenes`` collection and N items."""
    store = store_factory()
    store.create_collection(_collection())
    store.upsert_items([_item(i) for i in range(N)])
    return store_factory


def _app(db: StoreFactory) -> TestClient:
    """A new API process (replica) over the test's database."""
    return TestClient(create_api(db(), db.index_dir).app)


@pytest.fixture
def client(db: StoreFactory) -> Iterator[TestClient]:
    with _app(db) as c:
        yield c


def _ok(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def _hits(page: dict[str, Any]) -> list[tuple[int, str]]:
    return [(f["properties"]["cbir:distance"], f["id"]) for f in page["features"]]


def _next(page: dict[str, Any]) -> dict[str, Any] | None:
    return next((link for link in page["links"] if link["rel"] == "next"), None)


def _follow(client: TestClient, page: dict[str, Any]) -> list[tuple[int, str]]:
    """The hits of ``page`` and of every page its `next` links lead to (GET or POST)."""
    seen = _hits(page)
    while (link := _next(page)) is not None:
        if link.get("method") == "POST":
            page = _ok(client.post(link["href"], json=link["body"]))
        else:
            page = _ok(client.get(link["href"]))
        seen += _hits(page)
    return seen


def test_one_default_k_for_post_get_similar_and_the_helper(client: TestClient) -> None:
    answers = [
        client.post("/search", json={"similarity": {"model": MODEL, "item": ITEM}}),
        client.get("/search", params={"similarity_item": "scenes/item-005"}),
        client.get("/collections/scenes/items/item-005/similar"),
    ]
    for r in answers:
        page = _ok(r)
        assert page["cbir:similarity"]["k"] == DEFAULT_K, r.url
        assert page["numberMatched"] == min(DEFAULT_K, N)
        assert len(page["features"]) == 10 and _next(page) is not None  # the default limit


def test_the_helper_has_the_same_default_k(server: str) -> None:
    search = search_similar(Client.open(server), item=("scenes", "item-005"), model=MODEL)
    assert search.get_parameters()["similarity"]["k"] == DEFAULT_K
    got = [(int(d), item.id) for item, d in distances(search.items())]
    assert got == _ranking(_bits(5))[:DEFAULT_K]  # all N < DEFAULT_K, over several pages


def test_similar_honours_limit_and_pages_over_k(client: TestClient) -> None:
    page = _ok(client.get("/collections/scenes/items/item-005/similar?k=30&limit=7"))
    assert len(page["features"]) == 7 and page["numberMatched"] == 30
    assert _follow(client, page) == _ranking(_bits(5))[:30]  # 7 + 7 + 7 + 7 + 2
    post = {"similarity": {"model": MODEL, "item": ITEM, "k": 30}, "limit": 30}
    assert _hits(_ok(client.post("/search", json=post))) == _ranking(_bits(5))[:30]


def test_get_search_takes_the_post_similarity_fields(client: TestClient) -> None:
    bits = _bits(9)
    entry = _item(9)["properties"]["cbir:codes"][0]["descriptor"]["value"]
    little = np.packbits(bits, bitorder="little").tobytes()
    cases = [  # (POST similarity, the same as GET parameters)
        (
            {"code": np.packbits(bits).tobytes().hex(), "encoding": "hex"},
            {"similarity_code": np.packbits(bits).tobytes().hex(), "similarity_encoding": "hex"},
        ),
        (
            {"code": base64.b64encode(little).decode(), "bit_order": "little"},
            {
                "similarity_code": base64.b64encode(little).decode(),
                "similarity_bit_order": "little",
            },
        ),
        (
            {"item": ITEM, "rerank": True, "max_distance": 20},
            {
                "similarity_item": "scenes/item-005",
                "similarity_rerank": "true",
                "similarity_max_distance": 20,
            },
        ),
        (
            {
                "item": ITEM,
                "feedback": {"relevant": [{"collection": "scenes", "id": "item-009"}], "beta": 2},
            },
            {
                "similarity_item": "scenes/item-005",
                "similarity_relevant": "scenes/item-009",
                "similarity_beta": 2,
            },
        ),
    ]
    for body, params in cases:
        sim = {"model": MODEL, "k": 12, **body}
        post = _ok(client.post("/search", json={"similarity": sim, "limit": 12}))
        get = _ok(client.get("/search", params={"similarity_k": 12, "limit": 12, **params}))
        assert post["features"] and get["features"] == post["features"], params
        assert get["cbir:similarity"] == post["cbir:similarity"]
    assert _hits(post) != _ranking(_bits(5))[:12]  # the feedback weights reached the server
    # a descriptor query needs the model's checkpoint (none here): the same answer both ways
    post = client.post("/search", json={"similarity": {"model": MODEL, "descriptor": entry}})
    get = client.get("/search", params={"similarity_model": MODEL, "similarity_descriptor": entry})
    assert post.status_code == get.status_code == 400 and post.json() == get.json()
    assert "checkpoint" in post.text
    hexcode = np.packbits(bits).tobytes().hex()  # without its encoding: a hint, not "96 bits"
    r = client.get("/search", params={"similarity_code": hexcode, "similarity_model": MODEL})
    assert r.status_code == 400 and "similarity_encoding=hex" in r.text
    r = client.get("/search", params={"similarity_code": "00" * 8, "similarity_encoding": "b64"})
    assert r.status_code == 400 and "similarity_encoding" in r.text
    r = client.get("/search", params={"similarity_k": 5})  # no query: not silently a plain search
    assert r.status_code == 400 and "exactly one of" in r.text


@pytest.mark.parametrize(
    ("field", "value"),
    [("k", True), ("k", 2.0), ("k", "10"), ("max_distance", True), ("max_distance", 3.0)],
)
def test_k_and_max_distance_are_strict_integers(client: TestClient, field: str, value: Any) -> None:
    body = {"similarity": {"model": MODEL, "item": ITEM, field: value}}
    r = client.post("/search", json=body)
    assert r.status_code == 400, r.text
    error = r.json()  # the field named in the message (or in FastAPI's error locations)
    assert field in str(error.get("description") or error.get("detail")), r.text
    assert "Traceback" not in r.text


def test_sortby_with_similarity_is_refused(client: TestClient) -> None:
    body = {
        "similarity": {"model": MODEL, "item": ITEM},
        "sortby": [{"field": "properties.datetime", "direction": "desc"}],
    }
    r = client.post("/search", json=body)
    assert r.status_code == 400 and "sortby cannot be combined with similarity" in r.text
    r = client.get("/search", params={"similarity_item": "scenes/item-005", "sortby": "-datetime"})
    assert r.status_code == 400 and "sortby" in r.text
    assert _ok(client.post("/search", json={"sortby": body["sortby"]}))["features"]  # alone: fine


def test_paging_survives_a_write_between_pages(db: StoreFactory) -> None:
    """Page 1, a write of a distance-0 item, then `next`: the pages slice the ranked list of
    page 1 (no repeat, nothing skipped); another replica serves the next page while the store
    is unchanged, and answers 410 once it changed (it does not hold that list)."""
    body = {"similarity": {"model": MODEL, "item": ITEM, "k": 20}, "limit": 5}
    before = _ranking(_bits(5))[:20]
    with _app(db) as a, _app(db) as b, _app(db) as c:
        first = _ok(a.post("/search", json=body))
        link = _next(first)
        assert link is not None
        assert _hits(_ok(b.post("/search", json=link["body"]))) == before[5:10]
        r = a.post("/collections/scenes/items", json=_item(700, bits=_bits(5)))
        assert r.status_code in (200, 201), r.text
        pages = _hits(first) + _follow(a, _ok(a.post("/search", json=link["body"])))
        assert pages[5:10] == before[5:10]
        assert pages == before and len(set(pages)) == 20
        stale = c.post("/search", json=link["body"])
        assert stale.status_code == 410, stale.text
        assert "run the search again" in stale.text
        again = _follow(a, _ok(a.post("/search", json=body)))  # a new search sees the write
        assert (0, "item-700") in again and len(again) == 20


def test_rerank_and_feedback_say_their_order_and_score(client: TestClient) -> None:
    plain = _ok(client.post("/search", json={"similarity": {"model": MODEL, "item": ITEM}}))
    assert plain["cbir:similarity"]["order"] == "hamming"
    assert all("cbir:score" not in f["properties"] for f in plain["features"])
    reranked = [
        client.post(
            "/search",
            json={"similarity": {"model": MODEL, "item": ITEM, "k": 20, "rerank": True}},
        ),
        client.get("/collections/scenes/items/item-005/similar?k=20&rerank=true"),
        client.post(
            "/search",
            json={
                "similarity": {
                    "model": MODEL,
                    "item": ITEM,
                    "k": 20,
                    "feedback": {"relevant": [{"collection": "scenes", "id": "item-009"}]},
                }
            },
        ),
    ]
    for r in reranked:
        page = _ok(r)
        assert page["cbir:similarity"]["order"] == "descriptor"
        scores = [f["properties"]["cbir:score"] for f in page["features"]]
        assert scores == sorted(scores) and all(s >= 0 for s in scores)
    # the score is the Euclidean distance of the descriptors, ranked before the Hamming distance
    query = _descriptor(5)
    top = _ok(reranked[0])["features"][0]
    expected = float(np.linalg.norm(_descriptor(int(top["id"][-3:])) - query))
    assert top["properties"]["cbir:score"] == pytest.approx(expected, abs=1e-4)


def _descriptor(i: int) -> np.ndarray:
    entry = _item(i)["properties"]["cbir:codes"][0]["descriptor"]
    return np.frombuffer(base64.b64decode(entry["value"]), "<f4").astype(np.float64)


def test_search_similar_takes_a_path_bytes_or_pixels(
    store_factory: StoreFactory, tmp_path: Path
) -> None:
    ckpt = rgb_checkpoint(tmp_path / "model", "rgb-img-64")
    images = np.random.default_rng(3).integers(0, 255, size=(12, 3, 32, 32), dtype=np.uint8)
    bits, relaxed = HashEncoder.load(ckpt).encode_numpy(images.astype(np.float32))
    store = store_factory()
    store.create_collection(_collection("img"))
    items = []
    for i in range(12):
        item = _item(i, "img")
        code = HashCode.from_bits(
            "rgb-img-64", "1.0.0", bits[i], descriptor=Descriptor.create(relaxed[i])
        )
        item["properties"]["cbir:codes"] = [code.to_dict()]
        items.append(item)
    store.upsert_items(items)
    png = tmp_path / "query.png"
    with MemoryFile() as mem:
        with mem.open(driver="PNG", width=32, height=32, count=3, dtype="uint8") as dst:
            dst.write(images[4])
        png.write_bytes(mem.read())
    api = create_api(store, store_factory.index_dir, {"rgb-img-64": ckpt})
    with BackgroundServer(api.app) as server:
        client = Client.open(server.url)
        answers = [
            [
                (item.id, d)
                for item, d in distances(search_similar(client, image=image, k=5).items())
            ]
            for image in (str(png), png, png.read_bytes(), images[4])
        ]
        with pytest.raises(TypeError, match="file path, bytes or a numpy array"):
            search_similar(client, image=42)  # type: ignore[arg-type]
    assert answers[0][0] == ("item-004", 0)
    assert answers == [answers[0]] * 4


def _readme_example() -> str:
    """The README's pystac-client example (the python block after the test marker)."""
    text = (ROOT / "README.md").read_text()
    marker = "<!-- tested by tests/test_consistency.py -->"
    assert marker in text
    block = text.split(marker, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    return block


def test_readme_pystac_client_examples_run(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's helper and request_modifier examples, run as written against a server
    (only the server, example item, model and filters are this test's)."""
    code = _readme_example()
    for name, value in {
        "URL": repr(server),
        "EXAMPLE": repr(ITEM),
        "MODEL": repr(MODEL),
        "FILTERS": "{'datetime': '2021-01-01/2021-02-10'}",
    }.items():
        code, n = re.subn(rf"^{name} = .*$", f"{name} = {value}", code, flags=re.M)
        assert n == 1, name
    exec(compile(code, "README.md", "exec"), {})
    lines = capsys.readouterr().out.split("\n")
    printed = [(int(d), i) for i, d in (line.split() for line in lines if line)]
    keep = {i for i in range(N) if i <= 40}
    expected = _ranking(_bits(5), keep)[:50]
    assert printed == expected + expected  # the helper, then plain pystac-client


def test_ranked_lists_for_paging_are_bounded() -> None:
    """The paging cache holds at most ``max_hits`` hits: least recently used lists go first, a
    list longer than the whole cache is not held."""
    from stac_rscbir.api.similarity.ranking import Ranked, RankedHit, RankedLists

    def ranked(n: int) -> Ranked:
        return Ranked([RankedHit(("c", f"i{j}"), j, None) for j in range(n)], {})

    cache = RankedLists(max_hits=10)
    cache.put(("a", 1), ranked(4))
    cache.put(("b", 1), ranked(4))
    assert cache.get(("a", 1)) is not None  # now the most recently used
    cache.put(("c", 1), ranked(4))  # 12 hits: "b" goes
    assert cache.get(("b", 1)) is None
    assert cache.get(("a", 1)) is not None and cache.get(("c", 1)) is not None
    cache.put(("d", 1), ranked(11))
    assert cache.get(("d", 1)) is None and cache.get(("a", 1)) is not None
