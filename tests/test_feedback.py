"""Relevance feedback (Rocchio, survey refs [11], [19]): the math, the API on the three
deployments, the client. A constructed case: cluster A (codes ~all ones), cluster B (~all zeros)
and a query half way between; marking A relevant and B not relevant moves A up."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pystac_client import Client

from stac_rscbir.client import distances, search_similar
from stac_rscbir.extension.cbir import Descriptor, HashCode
from stac_rscbir.index.feedback import rocchio

from .api_builders import MODEL, Deployment, _collection, _item

A = [f"item-{i:03d}" for i in range(10)]
B = [f"item-{i:03d}" for i in range(10, 20)]
QUERY = {"collection": "scenes", "id": "item-020"}


def _coded(i: int, bits: np.ndarray, desc: np.ndarray) -> dict[str, Any]:
    item = _item(i, bits=bits)
    code = HashCode.from_bits(MODEL, "1.0.0", bits, descriptor=Descriptor.create(desc))
    item["properties"]["cbir:codes"] = [code.to_dict()]
    return item


def _clusters() -> list[dict[str, Any]]:
    rng = np.random.default_rng(3)
    items = []
    for i in range(20):
        bits = np.full(64, 1 if i < 10 else 0, np.uint8)
        bits[rng.choice(64, size=4, replace=False)] ^= 1
        items.append(_coded(i, bits, (bits * 2.0 - 1.0 + rng.normal(0, 0.3, 64)).astype("f4")))
    q_bits = np.repeat(np.array([1, 0], np.uint8), 32)  # half A, half B
    items.append(_coded(20, q_bits, (q_bits - 0.5).astype("f4")))
    no_code = _item(21)
    no_code["properties"].pop("cbir:codes")
    return [*items, no_code]


@pytest.fixture
def fb_client(deployment: Deployment) -> Any:
    store = deployment()
    store.create_collection(_collection())
    store.upsert_items(_clusters())
    with TestClient(deployment.app()) as c:
        yield c


def _post(client: TestClient, feedback: dict[str, Any] | None, k: int = 10) -> list[str]:
    sim: dict[str, Any] = {"model": MODEL, "item": QUERY, "k": k}
    if feedback is not None:
        sim["feedback"] = feedback
    r = client.post("/search", json={"similarity": sim, "limit": k})
    assert r.status_code == 200, r.text
    return [f["id"] for f in r.json()["features"]]


def _refs(ids: list[str]) -> list[dict[str, str]]:
    return [{"collection": "scenes", "id": i} for i in ids]


def test_rocchio_hand_values() -> None:
    got = rocchio([1.0, 0.0], [[0.0, 1.0], [0.0, 3.0]], [[4.0, 4.0]])
    np.testing.assert_allclose(got, [1 - 0.15 * 4, 0.75 * 2 - 0.15 * 4])  # [0.4, 0.9]
    np.testing.assert_allclose(rocchio([1.0, -2.0]), [1.0, -2.0])  # no feedback: q
    np.testing.assert_allclose(rocchio([1.0, -2.0], [], [[2.0, 2.0]]), [0.7, -2.3])
    got = rocchio([2.0, 0.0], [[0.0, 2.0]], (), alpha=0.5, beta=1.0, gamma=9.0)
    np.testing.assert_allclose(got, [1.0, 2.0])
    assert got.dtype == np.float32
    with pytest.raises(ValueError, match="dimension"):
        rocchio([1.0, 0.0], [[1.0, 2.0, 3.0]])


def test_feedback_moves_the_relevant_cluster_up(fb_client: TestClient) -> None:
    before = _post(fb_client, None)
    assert set(before[1:]) - set(A)  # the query itself, then a mix of A and B (Hamming ~32)
    feedback = {"relevant": _refs(A[:2]), "not_relevant": _refs(B[:2])}
    after = _post(fb_client, feedback, k=11)
    assert set(after) == {*A, QUERY["id"]}  # all of A and the query, the relevant items too
    both = _post(fb_client, feedback, k=21)
    assert set(both[:11]) == {*A, QUERY["id"]} and set(both[11:]) == set(B)
    # the reverse judgement brings B up
    reverse = {"relevant": _refs(B[:3]), "not_relevant": _refs(A[:1])}
    assert set(_post(fb_client, reverse, k=11)) == {*B, QUERY["id"]}
    # the response says what was used; GET takes the same as comma lists
    r = fb_client.post(
        "/search",
        json={"similarity": {"model": MODEL, "item": QUERY, "k": 10, "feedback": feedback}},
    )
    info = r.json()["cbir:similarity"]["feedback"]
    assert info == {"relevant": 2, "not_relevant": 2, "alpha": 1.0, "beta": 0.75, "gamma": 0.15}
    r = fb_client.get(
        "/search",
        params={
            "similarity_item": "scenes/item-020",
            "similarity_model": MODEL,
            "similarity_k": 11,
            "limit": 11,
            "similarity_relevant": "scenes/item-000,scenes/item-001",
            "similarity_not_relevant": "scenes/item-010,scenes/item-011",
        },
    )
    assert r.status_code == 200, r.text
    assert [f["id"] for f in r.json()["features"]] == after
    # ... and so does the item's /similar endpoint
    r = fb_client.get(
        "/collections/scenes/items/item-020/similar",
        params={
            "model": MODEL,
            "k": 11,
            "limit": 11,  # /similar pages like /search (10 items a page by default)
            "relevant": "scenes/item-000,scenes/item-001",
            "not_relevant": "scenes/item-010,scenes/item-011",
        },
    )
    assert r.status_code == 200, r.text
    assert [f["id"] for f in r.json()["features"]] == after
    assert r.json()["cbir:similarity"]["feedback"]["relevant"] == 2


def test_feedback_errors_name_the_item(fb_client: TestClient) -> None:
    def post(sim: dict[str, Any]) -> Any:
        return fb_client.post("/search", json={"similarity": {"model": MODEL, **sim}})

    r = post({"item": QUERY, "feedback": {"relevant": _refs(["nope"])}})
    assert r.status_code == 404, r.text
    r = post({"item": QUERY, "feedback": {"not_relevant": _refs(["item-021"])}})
    assert r.status_code == 400 and "item-021" in r.text and "no code" in r.text, r.text
    r = post({"item": QUERY, "feedback": {"relevant": [{"collection": "scenes"}]}})
    assert r.status_code == 400, r.text
    r = post({"code": "AAAAAAAAAAA=", "feedback": {"relevant": _refs(A[:1])}})
    assert r.status_code == 400 and "descriptor" in r.text, r.text
    r = fb_client.get(
        "/search",
        params={"similarity_item": "scenes/item-020", "similarity_relevant": "no-slash"},
    )
    assert r.status_code == 400, r.text
    r = fb_client.get("/collections/scenes/items/item-020/similar", params={"relevant": "x"})
    assert r.status_code == 400 and "relevant must be a comma list" in r.text, r.text


def test_client_sends_feedback(server: str) -> None:
    client = Client.open(server)
    search = search_similar(
        client,
        item=("scenes", "item-005"),
        model=MODEL,
        k=20,
        relevant=[("scenes", "item-001"), ("scenes", "item-009")],
        not_relevant=[("scenes", "item-002")],
    )
    got = {item.id for item, _ in distances(search.items())}
    assert got == {f"item-{i:03d}" for i in range(1, 80, 4)}  # item-005's cluster (i % 4 == 1)
    # the same set comes without feedback: the server's echo shows the judgements arrived
    (page,) = search.pages_as_dicts()
    used = page["cbir:similarity"]["feedback"]
    assert (used["relevant"], used["not_relevant"]) == (2, 1)


def test_descriptor_binarization_is_inferred() -> None:
    from stac_rscbir.index.hashindex import HashIndex

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, (50, 64), dtype=np.uint8)
    keys = [("c", str(i)) for i in range(50)]
    pm1 = HashIndex("m").build_arrays(keys, np.packbits(bits, axis=1), 1, bits * 2.0 - 1.0)
    assert pm1.descriptor_binarization() == (0.0, 1.0)
    zero_one = HashIndex("m").build_arrays(keys, np.packbits(bits, axis=1), 1, bits * 0.8 + 0.1)
    assert zero_one.descriptor_binarization() == (0.5, 1.0)
    assert (
        HashIndex("m").build_arrays(keys, np.packbits(bits, axis=1), 1).descriptor_binarization()
        is None
    )
