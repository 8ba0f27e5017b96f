"""Issue 15 (C): one error shape, ``{code, description}``, for every 4xx; validation errors are
400s that name the field without echoing the body; the OpenAPI document lists each error and
the similarity fields; CQL2 and coordinates are checked; the landing page is the API's own.
Over both stores (the ``store_factory`` fixture of conftest)."""

from __future__ import annotations

import base64
import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from stac_rscbir.api.app import create_api
from stac_rscbir.store.base import InvalidQueryError, SearchQuery

from .api_builders import MODEL, N, StoreFactory, _collection, _item

TOKEN = "s3cret"
ITEM = {"collection": "scenes", "id": "item-001"}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(store_factory: StoreFactory) -> Iterator[TestClient]:
    """A write-protected API over a store with the N coded items of api_builders."""
    store = store_factory()
    store.create_collection(_collection())
    store.upsert_items([_item(i) for i in range(N)])
    api = create_api(
        store, store_factory.index_dir, {}, write_token=TOKEN, max_body_bytes=8 * 1024 * 1024
    )
    with TestClient(api.app, raise_server_exceptions=False) as c:
        yield c


def _error(r: Any, status: int, *words: str) -> dict[str, Any]:
    """The body of an error answer: ``{code, description}`` and nothing else, JSON."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"code", "description"}, body
    assert isinstance(body["code"], str) and body["code"]
    for word in words:
        assert word.lower() in body["description"].lower(), (word, body)
    return body


# (method, url, body, headers, status, words of the description)
ERRORS: list[tuple[str, str, Any, dict[str, str], int, tuple[str, ...]]] = [
    ("POST", "/search", {"limit": "ten"}, {}, 400, ("limit", "integer", '"ten"')),
    ("GET", "/search?limit=ten", None, {}, 400, ("limit", "integer")),
    ("GET", "/collections/scenes/items/item-001/similar?k=ten", None, {}, 400, ("k",)),
    ("POST", "/search", {"limit": 0}, {}, 400, ("limit",)),
    ("POST", "/collections/scenes/items", _item(1), {}, 401, ("token",)),
    ("POST", "/collections/scenes/items", _item(1), {"X-API-Key": "no"}, 401, ("wrong",)),
    ("GET", "/collections/nope", None, {}, 404, ("nope",)),
    ("GET", "/collections/scenes/items/nope", None, {}, 404, ("nope",)),
    ("GET", "/no/such/route", None, {}, 404, ("not found",)),
    ("DELETE", "/search", None, {}, 405, ("not allowed",)),
    ("PATCH", "/collections/scenes", {"title": "x"}, AUTH, 405, ("PATCH",)),
    ("POST", "/collections/scenes/items", _item(1), AUTH, 409, ("item-001", "exists")),
    ("POST", "/collections", _collection(), AUTH, 409, ("scenes", "exists")),
    ("POST", "/search", {"ids": ["x" * 9 * 1024 * 1024]}, {}, 413, ("limit",)),
]


@pytest.mark.parametrize(
    ("method", "url", "body", "headers", "status", "words"),
    ERRORS,
    ids=[f"{e[4]} {e[0]} {e[1][:40]}" for e in ERRORS],
)
def test_every_error_has_one_shape(
    client: TestClient,
    method: str,
    url: str,
    body: Any,
    headers: dict[str, str],
    status: int,
    words: tuple[str, ...],
) -> None:
    """Before: 401, 409, 405, unknown routes and every validation error answered FastAPI's
    ``{"detail": ...}``; validation errors were 400 with the whole body echoed."""
    _error(client.request(method, url, json=body, headers=headers), status, *words)


def test_validation_error_names_the_field_and_does_not_echo_the_body(client: TestClient) -> None:
    """Before: a 5 MiB image with ``k: "ten"`` came back in a 7 MB error."""
    image = base64.b64encode(b"\x89PNG" + bytes(5 * 1024 * 1024)).decode()
    r = client.post("/search", json={"similarity": {"model": MODEL, "image": image, "k": "ten"}})
    body = _error(r, 400, "similarity.k", "integer", '"ten"')
    assert len(r.content) < 1000, len(r.content)
    assert image[:100] not in body["description"]


def test_long_inputs_are_truncated(client: TestClient) -> None:
    """A bad value is quoted (so the client sees it) but only its first characters."""
    r = client.post("/search", json={"limit": "9" * 10_000 + "x"})
    body = _error(r, 400, "limit", "...")
    assert len(body["description"]) < 300, body


def test_many_problems_are_counted_not_listed(client: TestClient) -> None:
    """A body with a dozen bad fields answers a short list and how many more there are."""
    bad = {"limit": "x", "similarity": {"model": MODEL, "item": ITEM, "k": "x"}}
    bad["similarity"].update({f"extra{i}": i for i in range(10)})
    body = _error(client.post("/search", json=bad), 400, "more")
    assert len(body["description"]) < 1000, body


@pytest.mark.parametrize(
    "filter_",
    [
        {"op": "frobnicate", "args": [{"property": "platform"}, "x"]},
        {"op": "frobnicate", "args": []},
        {
            "op": "and",
            "args": [
                {"op": "=", "args": [{"property": "platform"}, "sentinel-2a"]},
                {"op": "not", "args": [{"op": "frobnicate", "args": [1]}]},
            ],
        },
    ],
)
def test_unknown_cql2_operator_is_a_400(client: TestClient, filter_: dict[str, Any]) -> None:
    """Before: 200 with no items (cql2 reads an unknown operator as a custom function call,
    which matched nothing); POST, GET and the stores all refuse it now."""
    _error(client.post("/search", json={"filter": filter_}), 400, "frobnicate", "operator")
    params = {"filter-lang": "cql2-json", "filter": json.dumps(filter_)}
    _error(client.get("/search", params=params), 400, "frobnicate")
    text = {"filter-lang": "cql2-text", "filter": "frobnicate(platform, 'x')"}
    _error(client.get("/search", params=text), 400, "frobnicate")


STANDARD_FILTERS = [
    "NOT a LIKE 'x%' AND (b = 1 OR b <> 2) AND c < 1 AND c <= 1 AND c > 1 AND c >= 1",
    "a BETWEEN 0 AND 10 AND a IN (1, 2) AND a IS NULL AND a IS NOT NULL",
    "CASEI(a) = CASEI('X') AND ACCENTI(a) = ACCENTI('x')",
    "a + 1 - 2 * 3 / 4 % 5 ^ 6 div 7 >= 1",
    *(
        f"S_{op}(geometry, POINT(1 1))"
        for op in [
            "INTERSECTS",
            "EQUALS",
            "DISJOINT",
            "TOUCHES",
            "WITHIN",
            "OVERLAPS",
            "CROSSES",
            "CONTAINS",
        ]
    ),
    *(f"A_{op}(a, ('x'))" for op in ("EQUALS", "CONTAINS", "CONTAINEDBY", "OVERLAPS")),
    *(
        f"T_{op}(datetime, TIMESTAMP('2020-01-01T00:00:00Z'))"
        for op in [
            "AFTER",
            "BEFORE",
            "CONTAINS",
            "DISJOINT",
            "DURING",
            "EQUALS",
            "FINISHEDBY",
            "FINISHES",
            "INTERSECTS",
            "MEETS",
            "METBY",
            "OVERLAPPEDBY",
            "OVERLAPS",
            "STARTEDBY",
            "STARTS",
        ]
    ),
]


def test_every_cql2_operator_is_still_accepted() -> None:
    """The operator list does not refuse the standard's own operators and functions."""
    from stac_rscbir.store.items import CQL2_OPERATORS, parse_filter

    used = set()
    for text in STANDARD_FILTERS:
        expr = parse_filter(text)
        parse_filter(expr.to_json())
        used |= set(re.findall(r"'op': '([^']+)'", str(expr.to_json())))
    assert {op.lower() for op in used} == CQL2_OPERATORS


def test_unknown_cql2_operator_in_the_store(store_factory: StoreFactory) -> None:
    """The store owns the rule: a search through its Python API is refused too."""
    store = store_factory()
    store.create_collection(_collection())
    bad = {"op": "frobnicate", "args": [{"property": "platform"}, "x"]}
    with pytest.raises(InvalidQueryError, match="frobnicate"):
        store.search(SearchQuery(filter=bad))


OUT_OF_RANGE = [
    ("bbox", [1e308, 0, 1e308, 1], "longitude"),
    ("bbox", [10, -91, 11, 46], "latitude"),
    ("bbox", [10, 45, 0, 200, 46, 10], "longitude"),
    ("intersects", {"type": "Point", "coordinates": [1e308, 0]}, "longitude"),
    (
        "intersects",
        {"type": "Polygon", "coordinates": [[[0, 0], [1e308, 0], [1e308, 1], [0, 0]]]},
        "longitude",
    ),
    ("intersects", {"type": "LineString", "coordinates": [[0, 0], [0, 95]]}, "latitude"),
]


@pytest.mark.parametrize(("field", "value", "word"), OUT_OF_RANGE)
def test_coordinates_outside_wgs84_are_a_400(
    client: TestClient, field: str, value: Any, word: str
) -> None:
    """Before: GET bbox=1e308,... and intersects coordinates of 1e308 answered 200 (nothing
    matched); stac-pydantic refused only the POST bbox."""
    post_words = (field, word) if field == "intersects" else (field,)  # stac-pydantic's words
    _error(client.post("/search", json={field: value}), 400, *post_words)
    param = ",".join(map(str, value)) if field == "bbox" else json.dumps(value)
    _error(client.get("/search", params={field: param}), 400, field, word)
    if field == "bbox":
        _error(client.get("/collections/scenes/items", params={"bbox": param}), 400, field)
    sim = {"similarity": {"model": MODEL, "item": ITEM}, field: value}
    _error(client.post("/search", json=sim), 400, *post_words)


def test_whole_world_bbox_is_fine(client: TestClient) -> None:
    r = client.get("/search", params={"bbox": "-180,-90,180,90", "limit": 1})
    assert r.status_code == 200, r.text
    assert r.json()["numberMatched"] == N


# --------------------------------------------------------------------------- OpenAPI


def _responses(spec: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    return spec["paths"][path][method]["responses"]


def test_openapi_documents_errors_and_similarity(client: TestClient) -> None:
    """Before: every operation documented 200 and 422 (which the API never answered)."""
    spec = client.get("/api").json()
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    assert spec["components"]["schemas"]["ErrorResponse"]["required"] == ["code", "description"]
    expected = {
        ("post", "/search"): {"200", "400", "404", "410", "413"},
        ("get", "/search"): {"200", "400", "404", "410"},
        ("get", "/collections/{collection_id}"): {"200", "400", "404"},
        ("post", "/collections"): {"201", "400", "401", "409", "413"},
        ("post", "/collections/{collection_id}/items"): {
            "201",
            "204",
            "400",
            "401",
            "404",
            "409",
            "413",
        },
        ("put", "/collections/{collection_id}/items/{item_id}"): {
            "200",
            "400",
            "401",
            "404",
            "413",
        },
        ("patch", "/collections/{collection_id}"): {"200", "400", "401", "404", "405", "413"},
        ("delete", "/collections/{collection_id}/items/{item_id}"): {"204", "400", "401", "404"},
        ("get", "/collections/{collection_id}/items/{item_id}/similar"): {
            "200",
            "400",
            "404",
            "410",
        },
        ("get", "/"): {"200"},
    }
    for (method, path), statuses in expected.items():
        responses = _responses(spec, method, path)
        assert set(responses) == statuses, (method, path, sorted(responses))
        for status in statuses - {"200", "201", "204"}:
            assert responses[status]["content"]["application/json"]["schema"] == error
    assert not any("422" in ops[m]["responses"] for ops in spec["paths"].values() for m in ops)
    results = spec["components"]["schemas"]["SimilarityItemCollection"]
    for method, path in [
        ("post", "/search"),
        ("get", "/search"),
        ("get", "/collections/{collection_id}/items/{item_id}/similar"),
    ]:
        for content in _responses(spec, method, path)["200"]["content"].values():
            assert content["schema"] == {"$ref": "#/components/schemas/SimilarityItemCollection"}
    extra = results["allOf"][1]["properties"]
    similarity = extra["cbir:similarity"]
    assert {"model", "exact", "k", "ranked", "order"} <= set(similarity["properties"])
    assert "order" not in similarity["required"]
    item_props = extra["features"]["items"]["properties"]["properties"]["properties"]
    assert item_props["cbir:distance"]["type"] == "integer"
    assert "cbir:score" in item_props


def test_openapi_has_no_401_without_a_write_token(store_factory: StoreFactory) -> None:
    api = create_api(store_factory(), store_factory.index_dir, {})
    spec = api.app.openapi()
    assert "401" not in _responses(spec, "post", "/collections")
    assert "409" in _responses(spec, "post", "/collections")


def test_similarity_answer_matches_its_documented_schema(client: TestClient) -> None:
    """The cbir: fields of a real answer validate against the OpenAPI component."""
    import jsonschema

    spec = client.get("/api").json()
    results = spec["components"]["schemas"]["SimilarityItemCollection"]["allOf"][1]
    r = client.post("/search", json={"similarity": {"model": MODEL, "item": ITEM, "k": 5}})
    assert r.status_code == 200, r.text
    jsonschema.validate(r.json(), results)
    assert r.json()["features"][0]["properties"]["cbir:distance"] == 0


# --------------------------------------------------------------------------- landing page


def test_landing_page_is_the_apis_own(client: TestClient) -> None:
    """Before: the landing page said id ``stac-fastapi`` (the client's module-level default)."""
    landing = client.get("/").json()
    assert landing["id"] == "stac-rscbir"
    assert landing["title"] == "stac-rscbir"
    assert "hash codes" in landing["description"]
    assert client.get("/api").json()["info"]["title"] == "stac-rscbir"


def test_no_default_settings_warning_at_import() -> None:
    """Before: importing the API logged stac-fastapi's "Using default values for
    stac_fastapi_title, ..." warning (at `stac-rscbir serve` start-up)."""
    code = (
        "import logging; logging.basicConfig(level=logging.WARNING); "
        "import stac_rscbir.api.app, stac_rscbir.cli"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert "Using default values" not in out.stderr + out.stdout, out.stderr
    assert logging.getLogger("stac_fastapi.types.config").disabled is False
