"""stac-fastapi-pgstac with the similarity plugin (stac_rscbir.api.pgstac_plugin), against the
stock stac-fastapi-pgstac app over the same pgstac database.

Without similarity the plugin's answers are the stock app's, byte for byte; with it, the
candidates follow pgstac's own filter semantics (CQL2, ``query``, bbox, datetime...) and the
items come through stac-fastapi-pgstac's own search path (``fields``, links). The shared API
suite (test_api.py, test_feedback.py, test_client.py, the validators) runs on the plugin too,
through the ``deployment`` and ``server`` fixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from psycopg.types.json import Jsonb
from shapely.geometry import box, shape

from stac_rscbir.api.similarity import CONFORMANCE
from stac_rscbir.extension.cbir import HashCode

from .api_builders import MODEL, N, _bits, _collection, _item, _ranking, pg_environ
from .conftest import ROOT, fresh_pgstac_db

TRIANGLE = {"type": "Polygon", "coordinates": [[[10, 45], [10.75, 45], [10, 45.75], [10, 45]]]}
OTHER = "other"  # a second collection: the items 0..19 again, under other ids


def _other(i: int) -> dict[str, Any]:
    item = _item(i, OTHER)
    item["id"] = f"o-{i:03d}"
    return item


@pytest.fixture(scope="module")
def apps(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, TestClient, str]]:
    """(stock stac-fastapi-pgstac, stac-fastapi-pgstac + plugin, DSN) over one pgstac database
    holding ``scenes`` (N items) and ``other`` (20 items), both apps configured by the same
    environment (PG*, ENABLE_TRANSACTIONS_EXTENSIONS) as an operator would."""
    from stac_fastapi.pgstac.app import instantiate_api

    from stac_rscbir.api.pgstac_plugin import create_app
    from stac_rscbir.store.pgstac import PgstacStore

    pgstac_dsn = request.getfixturevalue("pgstac_dsn")
    request.getfixturevalue("pgstac_template")
    tmp = tmp_path_factory.mktemp("plugin")
    with fresh_pgstac_db(pgstac_dsn) as dsn, pytest.MonkeyPatch.context() as env:
        with PgstacStore(dsn) as store:
            store.create_collection(_collection())
            store.upsert_items([_item(i) for i in range(N)])
            store.create_collection(_collection(OTHER))
            store.upsert_items([_other(i) for i in range(20)])
        for name, value in pg_environ(dsn).items():
            env.setenv(name.upper(), value)
        env.setenv("ENABLE_TRANSACTIONS_EXTENSIONS", "true")
        env.setenv("RSCBIR_INDEX_DIR", str(tmp / "index"))
        env.setenv("RSCBIR_MAX_K", "500")
        with TestClient(instantiate_api().app) as stock, TestClient(create_app()) as plugin:
            yield stock, plugin, dsn


# ------------------------------------------------------------------ without similarity: stock

GETS = [
    "/search",
    "/search?limit=5",
    "/search?collections=scenes&bbox=10,45,10.5,45.5&datetime=2021-01-05T00:00:00Z/2021-03-01T00:00:00Z",
    "/search?filter=eo:cloud_cover<10&filter-lang=cql2-text&limit=50",
    "/search?ids=item-001,item-002,o-003",
    "/search?sortby=-properties.eo:cloud_cover&limit=3",
    "/search?fields=id,properties.platform&limit=4",
    "/search?intersects=" + json.dumps(TRIANGLE),
    '/search?query={"platform":{"eq":"sentinel-2a"}}&limit=7',
    "/search?filter=eo:cloud_cover<&filter-lang=cql2-text",  # 400
    "/search?datetime=not-a-date",  # 400
    "/collections",
    "/collections/scenes",
    "/collections/nope",  # 404
    "/collections/scenes/items?limit=3",
    "/collections/scenes/items/item-001",
    "/collections/scenes/items/nope",  # 404
    "/queryables",
    "/collections/scenes/queryables",
    "/_mgmt/ping",
    "/_mgmt/health",
]
POSTS = [
    {},
    {"limit": 4},
    {
        "filter": {"op": "<", "args": [{"property": "eo:cloud_cover"}, 5]},
        "filter-lang": "cql2-json",
    },
    {"intersects": TRIANGLE, "collections": ["scenes"], "limit": 50},
    {"query": {"eo:cloud_cover": {"lt": 5}}},
    {"fields": {"include": ["id"]}, "limit": 3},
    {"fields": {"exclude": ["properties"]}, "limit": 3},
    {"sortby": [{"field": "properties.eo:cloud_cover", "direction": "asc"}], "limit": 3},
    {"bbox": [1, 2]},  # 400
    {"datetime": "2021-02-01T00:00:00Z/..", "collections": ["scenes", "other"], "limit": 30},
]


def _next(response: Any) -> dict[str, Any] | None:
    if response.status_code != 200:
        return None
    links = response.json().get("links", []) if isinstance(response.json(), dict) else []
    return next((link for link in links if link["rel"] == "next"), None)


def _same(stock: TestClient, plugin: TestClient, method: str, url: str, body: Any = None) -> Any:
    """Ask both apps; assert the same status, headers that matter and bytes; follow ``next``
    once."""
    a = stock.request(method, url, json=body)
    b = plugin.request(method, url, json=body)
    assert (a.status_code, a.headers.get("content-type")) == (
        b.status_code,
        b.headers.get("content-type"),
    ), (method, url, body, b.text)
    assert a.content == b.content, (method, url, body)
    return a


@pytest.mark.parametrize("url", GETS)
def test_get_requests_without_similarity_are_the_stock_apps(apps: Any, url: str) -> None:
    stock, plugin, _ = apps
    first = _same(stock, plugin, "GET", url)
    if (link := _next(first)) is not None:  # pgstac's own paging token, followed by both
        _same(stock, plugin, "GET", link["href"])


@pytest.mark.parametrize("body", POSTS, ids=[json.dumps(b)[:60] for b in POSTS])
def test_post_searches_without_similarity_are_the_stock_apps(apps: Any, body: Any) -> None:
    stock, plugin, _ = apps
    first = _same(stock, plugin, "POST", "/search", body)
    if (link := _next(first)) is not None:
        _same(stock, plugin, "POST", "/search", link["body"])


def test_landing_conformance_and_api_differ_by_the_similarity_class(apps: Any) -> None:
    stock, plugin, _ = apps
    for url in ("/", "/conformance"):
        a, b = stock.get(url).json(), plugin.get(url).json()
        assert sorted(b.pop("conformsTo")) == sorted([*a.pop("conformsTo"), CONFORMANCE])
        assert a == b
    a, b = stock.get("/api").json(), plugin.get("/api").json()
    assert set(b["paths"]) - set(a["paths"]) == {
        "/collections/{collection_id}/items/{item_id}/similar"
    }
    params = {p["name"] for p in b["paths"]["/search"]["get"]["parameters"]}
    assert {"similarity_item", "similarity_code", "similarity_k"} <= params


# ------------------------------------------------------------------ with similarity


def _dists(page: dict[str, Any]) -> list[tuple[int, str]]:
    return [(f["properties"]["cbir:distance"], f["id"]) for f in page["features"]]


def _pages(client: TestClient, response: Any) -> list[dict[str, Any]]:
    """Every page of a search, following its ``next`` links (GET or POST)."""
    pages = []
    while True:
        assert response.status_code == 200, response.text
        pages.append(response.json())
        link = _next(response)
        if link is None:
            return pages
        if link.get("method") == "POST":
            response = client.post(link["href"], json=link["body"])
        else:
            response = client.get(link["href"])


def test_get_similarity_with_pgstac_filters_pages_by_next_links(apps: Any) -> None:
    _, plugin, _ = apps
    params = {
        "similarity_item": "scenes/item-011",
        "similarity_model": MODEL,
        "similarity_k": 40,
        "collections": "scenes",
        "bbox": "10.0,45.0,10.55,45.75",
        "filter": "eo:cloud_cover < 40",
        "filter-lang": "cql2-text",
        "limit": 7,
    }
    pages = _pages(plugin, plugin.get("/search", params=params))
    window = box(10.0, 45.0, 10.55, 45.75)
    keep = {i for i in range(N) if shape(_item(i)["geometry"]).intersects(window) and i % 50 < 40}
    expected = _ranking(_bits(11), keep)[:40]
    assert [h for p in pages for h in _dists(p)] == expected
    assert len(pages) == -(-len(expected) // 7)
    first = pages[0]
    assert first["numberMatched"] == len(expected) and first["numberReturned"] == 7
    assert first["cbir:similarity"]["model"] == MODEL
    nxt = _next_link(first)
    assert nxt["method"] == "GET" and "similarity_item=scenes%2Fitem-011" in nxt["href"]
    rels = [link["rel"] for link in first["links"]]
    assert rels == ["root", "self", "next"]  # as stac-fastapi-pgstac links a search
    item_links = {link["rel"] for link in first["features"][0]["links"]}
    assert {"self", "parent", "collection", "root"} <= item_links  # its own item links


def _next_link(page: dict[str, Any]) -> dict[str, Any]:
    return next(link for link in page["links"] if link["rel"] == "next")


def test_post_similarity_with_the_query_extension_and_intersects(apps: Any) -> None:
    _, plugin, _ = apps
    sim = {"model": MODEL, "item": {"collection": "scenes", "id": "item-030"}, "k": 80}
    body = {
        "similarity": sim,
        "query": {"platform": {"eq": "sentinel-2a"}},
        "collections": ["scenes"],
        "limit": 6,
    }
    pages = _pages(plugin, plugin.post("/search", json=body))
    keep = {i for i in range(N) if i % 2}
    assert [h for p in pages for h in _dists(p)] == _ranking(_bits(30), keep)
    assert _next_link(pages[0])["body"]["similarity"] == sim
    ids = [f"item-{i:03d}" for i in range(N)]
    body = {"similarity": sim, "intersects": TRIANGLE, "ids": ids, "limit": 80}
    r = plugin.post("/search", json=body)
    keep = {i for i in range(N) if shape(_item(i)["geometry"]).intersects(shape(TRIANGLE))}
    assert _dists(r.json()) == _ranking(_bits(30), keep)


def test_similarity_keeps_the_requests_fields(apps: Any) -> None:
    _, plugin, _ = apps
    sim = {"model": MODEL, "item": {"collection": "scenes", "id": "item-005"}, "k": 10}
    expected = _ranking(_bits(5))[:10]
    scenes = ["scenes"]
    r = plugin.post(
        "/search", json={"similarity": sim, "collections": scenes, "fields": {"include": ["id"]}}
    )
    features = r.json()["features"]
    assert _dists(r.json()) == expected
    assert all("assets" not in f and "geometry" not in f for f in features)
    fields = {"exclude": ["id", "bbox"]}
    r = plugin.post("/search", json={"similarity": sim, "collections": scenes, "fields": fields})
    features = r.json()["features"]
    assert [f["properties"]["cbir:distance"] for f in features] == [d for d, _ in expected]
    assert all("id" not in f and "bbox" not in f and "geometry" in f for f in features)


def test_similar_route_across_collections_pages_with_next_links(apps: Any) -> None:
    _, plugin, _ = apps
    url = "/collections/scenes/items/item-005/similar"
    pages = _pages(plugin, plugin.get(url, params={"model": MODEL, "k": 20, "limit": 6}))
    assert [len(p["features"]) for p in pages] == [6, 6, 6, 2]
    both = sorted(
        [(int((_bits(5) != _bits(i)).sum()), "scenes", f"item-{i:03d}") for i in range(N)]
        + [(int((_bits(5) != _bits(i)).sum()), OTHER, f"o-{i:03d}") for i in range(20)]
    )
    assert [h for p in pages for h in _dists(p)] == [(d, i) for d, _, i in both[:20]]
    r = plugin.get(url, params={"model": MODEL, "k": 20, "collections": OTHER, "limit": 20})
    assert r.status_code == 200, r.text
    assert _dists(r.json()) == [(d, i) for d, c, i in both if c == OTHER]
    assert {f["collection"] for f in r.json()["features"]} == {OTHER}


def test_similarity_errors_are_4xx(apps: Any) -> None:
    _, plugin, _ = apps
    sim = {"model": MODEL, "item": {"collection": "scenes", "id": "item-001"}}
    cases = [
        ({"similarity": sim, "sortby": [{"field": "id", "direction": "asc"}]}, 400, "sortby"),
        ({"similarity": sim, "token": "bm90LWEtdG9rZW4="}, 400, "token"),
        ({"similarity": {**sim, "item": {"collection": "scenes", "id": "nope"}}}, 404, "nope"),
        ({"similarity": {**sim, "model": "unknown"}}, 400, "unknown"),
        ({"similarity": {**sim, "k": 501}}, 400, "501"),  # RSCBIR_MAX_K
        ({"similarity": {"model": MODEL}}, 400, "similarity"),
        ({"similarity": sim, "filter": {"op": "nope", "args": []}}, 400, ""),
    ]
    for body, status, word in cases:
        r = plugin.post("/search", json=body)
        assert r.status_code == status and word in r.text, (body, r.status_code, r.text)
    r = plugin.get("/search", params={"similarity_item": "no-slash"})
    assert r.status_code == 400 and "similarity_item" in r.text, r.text
    r = plugin.get("/search", params={"similarity_item": "scenes/item-001", "sortby": "id"})
    assert r.status_code == 400 and "sortby" in r.text, r.text


def test_a_write_behind_the_apps_back_is_found(apps: Any) -> None:
    """pypgstac-style writes (pgstac's SQL API) bump the generation triggers; the index
    catches up at the next search."""
    _, plugin, dsn = apps
    code = HashCode.from_bits(MODEL, "1.0.0", 1 - _bits(3)).code
    body = {"similarity": {"model": MODEL, "code": code, "k": 1}, "collections": [OTHER]}
    assert plugin.post("/search", json=body).json()["features"][0]["id"] != "o-900"
    new = _item(900, OTHER, bits=1 - _bits(3))
    new["id"] = "o-900"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET search_path TO pgstac, public")
        conn.execute("SELECT upsert_items(%s)", (Jsonb([new]),))
    try:
        hit = plugin.post("/search", json=body).json()["features"][0]
        assert (hit["id"], hit["properties"]["cbir:distance"]) == ("o-900", 0)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SET search_path TO pgstac, public")
            conn.execute("SELECT delete_item('o-900', %s)", (OTHER,))


def test_importing_the_plugin_does_not_import_torch() -> None:
    code = (
        "import sys, stac_rscbir.api.pgstac_plugin; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr


def test_plugin_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from stac_rscbir.api.pgstac_plugin import PluginSettings

    monkeypatch.setenv("RSCBIR_INDEX_DIR", "/var/lib/rscbir")
    monkeypatch.setenv("RSCBIR_MODELS", "a=/ckpt/a, b=/ckpt/b")
    monkeypatch.setenv("RSCBIR_MAX_K", "200")
    s = PluginSettings()  # type: ignore[call-arg]
    assert (s.index_dir, s.models, s.max_k) == (
        Path("/var/lib/rscbir"),
        {"a": Path("/ckpt/a"), "b": Path("/ckpt/b")},
        200,
    )
    monkeypatch.setenv("RSCBIR_MODELS", "no-path")
    with pytest.raises(ValueError, match="RSCBIR_MODELS"):
        PluginSettings()  # type: ignore[call-arg]


def test_the_example_app_serves_similarity(
    apps: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """examples/pgstac_plugin.py (the Python form of the README section) over the same
    database, configured by the same environment."""
    import runpy

    monkeypatch.setenv("RSCBIR_INDEX_DIR", str(tmp_path / "index"))
    app = runpy.run_path(str(ROOT / "examples" / "pgstac_plugin.py"))["app"]
    with TestClient(app) as client:
        assert client.get("/").json()["title"] == "My STAC API, with similarity search"
        r = client.get(
            "/collections/scenes/items/item-005/similar",
            params={"model": MODEL, "k": 5, "collections": "scenes"},
        )
        assert r.status_code == 200, r.text
        assert _dists(r.json()) == _ranking(_bits(5))[:5]


def test_enabled_extensions_keep_their_choice_and_gain_similarity(tmp_path: Path) -> None:
    """ENABLED_EXTENSIONS chooses stac-fastapi-pgstac's extensions as before; similarity is
    added to the list (the app is built without a database: /conformance needs none)."""
    from stac_fastapi.pgstac.config import Settings

    from stac_rscbir.api.pgstac_plugin import instantiate_similarity_api

    settings = Settings(enabled_extensions=["filter", "pagination"])
    api = instantiate_similarity_api(index_dir=tmp_path, settings=settings)
    conformance = TestClient(api.app).get("/conformance").json()["conformsTo"]
    assert CONFORMANCE in conformance
    assert any("filter" in c for c in conformance)
    assert not any(c.endswith("/item-search#sort") or "#query" in c for c in conformance)
    assert api.settings.enabled_extensions == ["filter", "pagination", "similarity"]
