"""Write protection: with a write token every Transactions route needs it (401 otherwise, and
nothing changes); reads need nothing; a read-only app has no Transactions routes. The
``serve`` command is read-only unless given a token or ``--allow-anonymous-writes``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from stac_rscbir.api.app import create_api
from stac_rscbir.store.sqlite import SQLiteStore

from .api_builders import MODEL, _collection, _item

TOKEN = "s3cret-token"
TRANSACTION_CLASS = "transaction"
# (method, path, body) of every Transactions route
WRITES: list[tuple[str, str, Any]] = [
    ("POST", "/collections", _collection("other")),
    ("PUT", "/collections/scenes", {**_collection("scenes"), "description": "changed"}),
    ("PATCH", "/collections/scenes", {"description": "changed"}),
    ("DELETE", "/collections/scenes", None),
    ("POST", "/collections/scenes/items", _item(100)),
    ("PUT", "/collections/scenes/items/item-001", _item(1) | {"links": []}),
    ("PATCH", "/collections/scenes/items/item-001", {"properties": {"x": 1}}),
    ("DELETE", "/collections/scenes/items/item-001", None),
]


def _store(tmp_path: Path) -> SQLiteStore:
    store = SQLiteStore(tmp_path / "stac.db")
    store.create_collection(_collection())
    store.upsert_items([_item(i) for i in range(10)])
    return store


@pytest.fixture
def protected(tmp_path: Path) -> Iterator[tuple[TestClient, SQLiteStore]]:
    store = _store(tmp_path)
    api = create_api(store, tmp_path / "index", write_token=TOKEN)
    with TestClient(api.app) as client:
        yield client, store
    store.close()


def _state(store: SQLiteStore) -> tuple[int, int, str]:
    return store.count(), store.generation(), store.get_collection("scenes")["description"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"X-API-Key": "wrong"},
        {"X-API-Key": ""},
    ],
    ids=["none", "wrong bearer", "basic", "token prefix", "wrong key", "empty key"],
)
def test_writes_without_the_token_are_401_and_change_nothing(
    protected: tuple[TestClient, SQLiteStore], headers: dict[str, str]
) -> None:
    client, store = protected
    before = _state(store)
    for method, path, body in WRITES:
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json")
        assert "token" in r.json()["description"]
        assert r.headers["www-authenticate"] == "Bearer"
    assert _state(store) == before


def test_writes_with_the_token(protected: tuple[TestClient, SQLiteStore]) -> None:
    client, store = protected
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    key = {"X-API-Key": TOKEN}
    r = client.post("/collections/scenes/items", json=_item(100), headers=bearer)
    assert r.status_code == 201, r.text
    r = client.put("/collections/scenes/items/item-100", json=_item(100), headers=key)
    assert r.status_code == 200, r.text
    assert store.count() == 11
    # the index followed the write
    body = {"similarity": {"model": MODEL, "item": {"collection": "scenes", "id": "item-100"}}}
    assert client.post("/search", json=body).json()["features"][0]["id"] == "item-100"
    r = client.delete("/collections/scenes/items/item-100", headers=bearer)
    assert r.status_code in (200, 204), r.text
    r = client.post("/collections", json=_collection("other"), headers=key)
    assert r.status_code == 201, r.text
    assert store.count() == 10 and len(store.all_collections()) == 2


def test_reads_need_nothing(protected: tuple[TestClient, SQLiteStore]) -> None:
    client, _ = protected
    for path in ("/", "/conformance", "/collections", "/collections/scenes", "/api"):
        assert client.get(path).status_code == 200, path
    assert client.get("/collections/scenes/items").json()["numberReturned"] == 10
    assert client.get("/collections/scenes/items/item-001").status_code == 200
    assert client.post("/search", json={"limit": 3}).json()["numberReturned"] == 3
    assert client.get("/search", params={"limit": 3}).status_code == 200
    r = client.get("/collections/scenes/items/item-001/similar", params={"model": MODEL})
    assert r.status_code == 200
    conformance = client.get("/conformance").json()["conformsTo"]
    assert any(TRANSACTION_CLASS in c for c in conformance)


def test_openapi_shows_the_security_schemes(protected: tuple[TestClient, SQLiteStore]) -> None:
    client, _ = protected
    spec = client.get("/api").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["WriteToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["WriteToken"]["description"],
    }
    assert (
        schemes["WriteApiKey"]["in"] == "header" and schemes["WriteApiKey"]["name"] == "X-API-Key"
    )
    post_item = spec["paths"]["/collections/{collection_id}/items"]["post"]
    assert {"WriteToken": []} in post_item["security"]
    assert "security" not in spec["paths"]["/search"]["post"]
    assert "security" not in spec["paths"]["/collections/{collection_id}/items"]["get"]


def test_read_only_app_has_no_transactions(tmp_path: Path) -> None:
    store = _store(tmp_path)
    api = create_api(store, tmp_path / "index", transactions=False)
    before = _state(store)
    with TestClient(api.app) as client:
        for method, path, body in WRITES:
            r = client.request(method, path, json=body, headers={"X-API-Key": TOKEN})
            assert r.status_code in (404, 405), (method, path, r.status_code)
        conformance = client.get("/conformance").json()["conformsTo"]
        assert not any(TRANSACTION_CLASS in c for c in conformance)
        spec = client.get("/api").json()
        assert "post" not in spec["paths"]["/collections"]
        assert client.post("/search", json={"limit": 2}).json()["numberReturned"] == 2
    assert _state(store) == before
    store.close()


def test_library_default_stays_open(tmp_path: Path) -> None:
    """create_api without a token: Transactions open to all (the CLI is stricter)."""
    store = _store(tmp_path)
    with TestClient(create_api(store, tmp_path / "index").app) as client:
        assert client.post("/collections/scenes/items", json=_item(100)).status_code == 201
    assert store.count() == 11
    store.close()


def test_empty_token_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        create_api(store, tmp_path / "index", write_token="")
    store.close()


# --------------------------------------------------------------------------- the serve command


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    import uvicorn

    apps: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    monkeypatch.delenv("RSCBIR_WRITE_TOKEN", raising=False)
    return apps


def _serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    from stac_rscbir.cli import app

    db = tmp_path / "stac.db"
    if not db.exists():
        _store(tmp_path).close()
    return CliRunner().invoke(app, ["serve", "--db", str(db), *args], env=env)


def _can_write(app: Any, headers: dict[str, str] | None = None) -> int:
    with TestClient(app) as client:
        return client.post(
            "/collections/scenes/items", json=_item(200), headers=headers
        ).status_code


def test_serve_is_read_only_by_default(tmp_path: Path, served: list[Any]) -> None:
    result = _serve(tmp_path)
    assert result.exit_code == 0, result.output
    assert "read-only" in result.output and "--write-token" in result.output
    assert _can_write(served[-1]) == 405
    result = _serve(tmp_path, "--read-only", "--write-token", TOKEN)
    assert result.exit_code == 0, result.output
    assert _can_write(served[-1], {"X-API-Key": TOKEN}) == 405


def test_serve_with_a_token(tmp_path: Path, served: list[Any]) -> None:
    result = _serve(tmp_path, "--write-token", TOKEN)
    assert result.exit_code == 0, result.output
    assert _can_write(served[-1]) == 401
    assert _can_write(served[-1], {"Authorization": f"Bearer {TOKEN}"}) == 201
    result = _serve(tmp_path, env={"RSCBIR_WRITE_TOKEN": "from-env"})
    assert result.exit_code == 0, result.output
    assert _can_write(served[-1], {"X-API-Key": TOKEN}) == 401
    # authorised (not 401): item-200, written above into the same database, conflicts
    assert _can_write(served[-1], {"X-API-Key": "from-env"}) == 409
    result = _serve(tmp_path, env={"RSCBIR_WRITE_TOKEN": ""})  # empty: no token, read-only
    assert result.exit_code == 0 and "read-only" in result.output
    assert _can_write(served[-1]) == 405


def test_serve_anonymous_writes(tmp_path: Path, served: list[Any]) -> None:
    result = _serve(tmp_path, "--allow-anonymous-writes")
    assert result.exit_code == 0, result.output
    assert "open to anyone" in result.output
    assert _can_write(served[-1]) == 201
    n = len(served)
    for args in (["--read-only"], ["--write-token", TOKEN]):
        result = _serve(tmp_path, "--allow-anonymous-writes", *args)
        assert result.exit_code == 2 and "contradicts" in result.output
    assert len(served) == n


def test_api_sink_sends_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from datetime import UTC, datetime

    import httpx
    import pystac

    from stac_rscbir.ingest.sinks import ApiSink

    # what goes over the wire: every request the sinks make, answered 404 by a mock transport
    sent: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers.get("authorization"))
        return httpx.Response(404)

    real_client = httpx.Client
    monkeypatch.setattr(
        httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(answer), **kw)
    )
    scene = pystac.Item("s", None, None, datetime(2021, 1, 1, tzinfo=UTC), {}, collection="c")
    monkeypatch.delenv("RSCBIR_WRITE_TOKEN", raising=False)
    assert not ApiSink("http://api").is_encoded(scene, "m", "1")
    assert not ApiSink("http://api", token="t").is_encoded(scene, "m", "1")
    monkeypatch.setenv("RSCBIR_WRITE_TOKEN", "from-env")
    assert not ApiSink("http://api").is_encoded(scene, "m", "1")
    assert sent == [None, "Bearer t", "Bearer from-env"]
