"""Checks by tools we did not write: stac-api-validator and schemathesis, against a real server.

Both run offline: every JSON schema the validators look up is answered from local copies
(pystac's bundled STAC 1.1 core and GeoJSON schemas, the ``cbir`` schema and the vendored
extension schemas, the JSON Schema meta-schemas of ``jsonschema_specifications``), and any
attempt to resolve a host other than the loopback server fails the run instead of hanging.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from shapely.geometry import Point, Polygon, box, mapping

from stac_rscbir.api.app import create_api
from stac_rscbir.api.server import BackgroundServer
from stac_rscbir.store.sqlite import SQLiteStore

from .api_builders import DEPLOYMENTS, Deployment, _collection, _item
from .conftest import open_deployment, require

ITEM_SCHEMA = "https://schemas.stacspec.org/v1.1.0/item-spec/json-schema/item.json"
CBIR_SCHEMA = "https://stac-extensions.github.io/cbir/v1.0.0/schema.json"
N_ITEMS = 30
COLLECTION = "scenes"
# Intersects the items of the grid's first row (see tests.api_builders._item).
GEOMETRY = {
    "type": "Polygon",
    "coordinates": [[[10.0, 45.0], [10.55, 45.0], [10.55, 45.25], [10.0, 45.25], [10.0, 45.0]]],
}


def _varied_item(i: int) -> dict[str, Any]:
    """The api_builders item, with points, triangles and datetime ranges mixed in, and the last
    one far away (in the bbox the validator uses to check that ``ids`` overrides nothing)."""
    item = _item(i, COLLECTION)
    (x0, y0, x1, y1) = item["bbox"]
    if i == N_ITEMS - 1:
        geom = box(20.2, 20.2, 20.3, 20.3)
    elif i % 5 == 1:
        geom = Point(x0 + 0.04, y0 + 0.04)
    elif i % 5 == 2:
        geom = Polygon([(x0, y0), (x1, y0), (x0 + 0.04, y1), (x0, y0)])
    else:
        geom = None
    if geom is not None:
        item["geometry"] = mapping(geom)
        item["bbox"] = list(geom.bounds)
    if i % 4 == 3:  # an interval instead of an instant
        props = item["properties"]
        props["start_datetime"] = props["datetime"]
        props["end_datetime"] = props["datetime"].replace("T00:00:00", "T12:00:00")
        props["datetime"] = None
    return item


def _described_collection() -> dict[str, Any]:
    collection = _collection(COLLECTION)
    collection["title"] = "Test scenes"
    collection["extent"]["spatial"]["bbox"] = [[10.0, 20.2, 20.3, 46.1]]
    collection["summaries"] = {"platform": ["sentinel-2a", "sentinel-2b"]}
    return collection


@contextmanager
def _serve(deployment: Deployment) -> Iterator[str]:
    """A uvicorn server on a free loopback port of ``deployment``, with 30 coded items."""
    store = deployment()
    store.create_collection(_described_collection())
    store.upsert_items([_varied_item(i) for i in range(N_ITEMS)])
    with BackgroundServer(deployment.app()) as srv:
        yield srv.url


@pytest.fixture(scope="module", params=DEPLOYMENTS)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The validated server, of each deployment."""
    tmp = tmp_path_factory.mktemp("validator")
    with open_deployment(request.param, tmp, request) as deployment, _serve(deployment) as url:
        yield url


# --------------------------------------------------------------------------- offline plumbing


def _offline_schemas() -> dict[str, dict[str, Any]]:
    """Every schema the validators may look up, keyed by URL (without a trailing '#')."""
    import jsonschema_specifications
    from pystac.validation.local_validator import get_local_schema_cache

    from stac_rscbir.extension.validation import local_schemas

    found: dict[str, dict[str, Any]] = {}
    for uri, schema in {**get_local_schema_cache(), **local_schemas()}.items():
        found[uri.rstrip("#")] = schema
    for uri, schema in jsonschema_specifications.REGISTRY.items():
        found[uri.rstrip("#")] = schema.contents
    return found


_STACSPEC = re.compile(
    r"https://schemas\.stacspec\.org/v1\.1\.0/[a-z-]+/json-schema/([\w-]+\.json)"
)


def _offline_lookup(schemas: dict[str, dict[str, Any]], seen: set[str]) -> Any:
    """stac-validator's schema fetcher, answered from ``schemas``; ``seen`` records each URL."""
    by_name = {
        uri.rsplit("/", 1)[1]: s
        for uri, s in schemas.items()
        if uri.startswith("https://schemas.stacspec.org/v1.1.0/")
    }

    def lookup(uri: str) -> dict[str, Any]:
        key = uri.split("#", 1)[0]
        seen.add(key)
        if key in schemas:
            return schemas[key]
        m = _STACSPEC.fullmatch(key)  # the spec's shared schemas, wherever they are cited
        if m and m.group(1) in by_name:
            return by_name[m.group(1)]
        raise LookupError(f"schema {uri} is not available offline")

    return lookup


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Resolve only loopback hosts; record any other host a tool tried to reach."""
    tried: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name not in ("127.0.0.1", "localhost", "::1"):
            tried.append(name)
            raise socket.gaierror(socket.EAI_NONAME, f"offline test: {name} not resolved")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return tried


# --------------------------------------------------------------------------- stac-api-validator


def test_stac_api_validator(
    server: str, offline: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    require(
        importlib.util.find_spec("stac_api_validator") is not None,
        "stac-api-validator is not installed (dev extra)",
    )
    import pystac.validation
    import stac_validator.utilities as sv_utils
    from stac_api_validator.validations import QueryConfig, validate_api

    from stac_rscbir.extension.validation import OfflineSTACValidator

    # stac-validator reads every schema through this cache (the wheel lacks its local_schemas/)
    seen: set[str] = set()
    monkeypatch.setattr(sv_utils, "_schema_cache", _offline_lookup(_offline_schemas(), seen))
    # the final pystac validation of the landing page and collections
    monkeypatch.setattr(pystac.validation.RegisteredValidator, "_validator", OfflineSTACValidator())

    warnings, errors = validate_api(
        root_url=server,
        ccs_to_validate=["core", "collections", "features", "item-search", "filter"],
        collection=COLLECTION,
        geometry=json.dumps(GEOMETRY),
        auth_bearer_token=None,
        auth_query_parameter=None,
        fields_nested_property=None,
        validate_pagination=True,
        query_config=QueryConfig(*[None] * 13),
        transaction_collection=None,
        headers=None,
    )
    report = {"warnings": list(warnings), "errors": list(errors)}
    logging.getLogger(__name__).warning("stac-api-validator: %s", json.dumps(report, indent=1))
    assert not offline, f"tried to reach the network: {sorted(set(offline))}"
    assert not list(errors), "\n".join(errors)
    # the items were checked against the STAC item schema and the cbir extension's schema
    assert {ITEM_SCHEMA, CBIR_SCHEMA} <= seen, sorted(seen)


# --------------------------------------------------------------------------- schemathesis


# Examples per operation and generation mode; RSCBIR_FUZZ_SCALE=10 for a longer hunt.
_SCALE = float(os.environ.get("RSCBIR_FUZZ_SCALE", "1"))
EXAMPLES = {"positive": round(30 * _SCALE), "negative": round(20 * _SCALE)}


@pytest.fixture(scope="module", params=DEPLOYMENTS)
def fuzz_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str | None]]:
    """(URL, URL of the stock stac-fastapi-pgstac app over the same database for the plugin
    deployment, else None) of a server of its own, of each deployment: the fuzzer writes
    through the Transactions endpoints."""
    tmp = tmp_path_factory.mktemp("fuzz")
    with open_deployment(request.param, tmp, request) as deployment, _serve(deployment) as url:
        if deployment.kind != "plugin":
            yield url, None
            return
        with BackgroundServer(deployment.stock_app()) as stock:
            yield url, stock.url


@pytest.mark.filterwarnings("ignore::UserWarning:geojson_pydantic")
def test_schemathesis_no_server_errors(
    fuzz_server: tuple[str, str | None], offline: list[str]
) -> None:
    """Every operation of the service's OpenAPI document, valid and invalid requests: no 5xx,
    every answer (errors included) is JSON, and on our app it has a documented status, content
    type, headers and a body that validates against the documented schema.

    stac-fastapi-pgstac + plugin keeps stac-fastapi-pgstac's own OpenAPI document (it lists 200
    and 422 where the app answers 400 and 404, with or without the plugin) and its own answers
    to requests without similarity, 5xx included: there the check is that the plugin adds no
    5xx. A 5xx of the plugin's server is replayed on the stock app over the same database; it
    fails the test unless the stock app answers it with a 5xx too (logged: stac-fastapi-pgstac's
    own, e.g. a PUT of an empty body, an unknown CQL2 operator).
    """
    require(
        importlib.util.find_spec("schemathesis") is not None,
        "schemathesis is not installed (dev extra)",
    )
    import requests
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    url, stock_url = fuzz_server
    checks = [not_a_server_error]
    if stock_url is None:
        checks += [
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            response_headers_conformance,
        ]

    schema = schemathesis.openapi.from_url(f"{url}/api")
    session = requests.Session()
    failures: list[str] = []
    counts: dict[int, int] = {}
    unsatisfiable: list[str] = []
    upstream: list[str] = []  # 5xx the stock stac-fastapi-pgstac app answers too

    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, n in EXAMPLES.items():

            @given(case=operation.as_strategy(schemathesis.GenerationMode(mode)))
            @settings(
                max_examples=n,
                derandomize=True,
                database=None,
                deadline=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: Any) -> None:
                response = case.call(base_url=url, session=session, timeout=30)
                counts[response.status_code] = counts.get(response.status_code, 0) + 1
                if stock_url is not None and response.status_code >= 500:
                    stock = case.call(base_url=stock_url, session=session, timeout=30)
                    if stock.status_code >= 500:
                        upstream.append(case.operation.label)
                        return
                case.validate_response(response, checks=checks)
                if response.content:
                    json.loads(response.content)  # every answer, errors included, is JSON

            try:
                run()
            except Unsatisfiable:  # no invalid request exists (no parameters, free-text paths)
                unsatisfiable.append(f"{operation.label} ({mode})")
            except (Exception, BaseExceptionGroup) as exc:  # schemathesis raises groups
                failures.append(f"{operation.label} ({mode}): {exc}")

    log = logging.getLogger(__name__)
    log.warning("schemathesis: status codes %s; no invalid requests for %s", counts, unsatisfiable)
    if upstream:
        log.warning("5xx of stac-fastapi-pgstac itself: %s", sorted(set(upstream)))
    assert not failures, "\n\n".join(failures)
    assert sum(counts.values()) > 300  # the run did exercise the API
    assert not offline, f"tried to reach the network: {sorted(set(offline))}"


def _far_past_item() -> dict[str, Any]:
    item = _varied_item(0)
    item["properties"]["datetime"] = "0001-01-01T00:00:00+14:00"  # before year 1 in UTC
    return item


@pytest.mark.parametrize(
    ("method", "url", "body", "message"),
    [
        ("POST", "/search", [], "must be a JSON object"),
        ("POST", "/search", {"datetime": "0001-01-01T00:00:00+14:00"}, "out of range"),
        ("PUT", "/collections/scenes/items/item-000", None, "must be a STAC Item"),
        ("PUT", "/collections/scenes/items/item-000", _far_past_item(), "out of range"),
        ("POST", "/collections/scenes/items", _far_past_item(), "out of range"),
        ("POST", "/collections", [], "valid dictionary"),
        ("GET", "/search?bbox=0,0,1,1&intersects=" + json.dumps(GEOMETRY), None, "together"),
        ("GET", "/search?intersects={not json", None, "intersects is not valid GeoJSON"),
    ],
)
def test_what_the_fuzzer_found_is_a_clear_400(
    tmp_path: Path, method: str, url: str, body: Any, message: str
) -> None:
    """Requests that gave 500s (tracebacks) before: now 400s that say what is wrong."""
    from fastapi.testclient import TestClient

    store = SQLiteStore(tmp_path / "stac.db")
    store.create_collection(_collection(COLLECTION))
    store.upsert_items([_varied_item(0)])
    with TestClient(create_api(store, tmp_path / "index").app) as client:
        r = client.request(method, url, json=body)
    assert r.status_code == 400, r.text
    assert message in r.text


def test_get_search_takes_intersects_as_geojson_text(tmp_path: Path) -> None:
    """What stac-api-validator found: GET /search?intersects=<GeoJSON> was a 400."""
    from fastapi.testclient import TestClient

    store = SQLiteStore(tmp_path / "stac.db")
    store.create_collection(_described_collection())
    store.upsert_items([_varied_item(i) for i in range(N_ITEMS)])
    with TestClient(create_api(store, tmp_path / "index").app) as client:
        get = client.get("/search", params={"intersects": json.dumps(GEOMETRY), "limit": 100})
        post = client.post("/search", json={"intersects": GEOMETRY, "limit": 100})
    assert get.status_code == 200, get.text
    ids = [f["id"] for f in get.json()["features"]]
    assert ids == [f["id"] for f in post.json()["features"]]
    assert 0 < len(ids) < N_ITEMS
