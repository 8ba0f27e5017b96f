"""Shared paths, helpers and fixtures of the test suite."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import settings

if TYPE_CHECKING:
    from .api_builders import Deployment, StoreFactory

ROOT = Path(__file__).resolve().parents[1]
# Timing varies with machine load (CI shares 2 cores); correctness, not speed, is tested here.
settings.register_profile("rscbir", deadline=None)
settings.load_profile("rscbir")

CHROMIUM = Path("/usr/bin/chromium")
EXAMPLES = ROOT / "extension-schema" / "examples"
SCHEMA_FILE = ROOT / "extension-schema" / "json-schema" / "schema.json"


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's, through Playwright: its own browser download is not used)."""
    require(CHROMIUM.exists(), f"{CHROMIUM} not found: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "playwright is not installed (the dev extra)")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(params=sorted(p.name for p in EXAMPLES.glob("*.json")))
def example(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Each published example, freshly loaded."""
    return load_json(EXAMPLES / request.param)


def require(condition: bool, reason: str) -> None:
    """Skip when an optional resource is missing locally; fail in CI (RSCBIR_REQUIRE_ALL=1)."""
    if condition:
        return
    if os.environ.get("RSCBIR_REQUIRE_ALL") == "1":
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pgstac_dsn() -> Iterator[str]:
    """The DSN of a throwaway PostgreSQL 15 + PostGIS cluster with pgstac migrated (one per
    session; tests keep to their own collections). Skips locally, fails in CI, when PostgreSQL,
    PostGIS or pypgstac are not installed."""
    from .pgcluster import missing, start_cluster

    reason = missing()
    require(reason is None, reason or "")
    cluster = start_cluster()
    try:
        yield cluster.dsn
    finally:
        cluster.stop()


def _database_dsn(dsn: str, name: str) -> str:
    return f"{dsn.rsplit('/', 1)[0]}/{name}"


@pytest.fixture(scope="session")
def pgstac_template(pgstac_dsn: str) -> str:
    """The DSN of a database migrated by pypgstac, with the store's generation counter, that
    nobody connects to: the template of :func:`pgstac_db`."""
    import psycopg

    from stac_rscbir.store.pgstac import PgstacStore

    from .pgcluster import migrate

    with psycopg.connect(pgstac_dsn, autocommit=True) as conn:
        conn.execute("CREATE DATABASE rscbir_template")
    dsn = _database_dsn(pgstac_dsn, "rscbir_template")
    migrate(dsn)
    PgstacStore(dsn).close()  # installs the generation counter and its triggers
    return dsn


@contextmanager
def fresh_pgstac_db(pgstac_dsn: str) -> Iterator[str]:
    """A pgstac database of its own, copied from the template (~0.3 s), dropped after use."""
    import uuid

    import psycopg

    name = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pgstac_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name} TEMPLATE rscbir_template STRATEGY FILE_COPY")
    try:
        yield _database_dsn(pgstac_dsn, name)
    finally:
        with psycopg.connect(pgstac_dsn, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pgstac_db(pgstac_dsn: str, pgstac_template: str) -> Iterator[str]:
    """The DSN of a fresh pgstac database of its own."""
    with fresh_pgstac_db(pgstac_dsn) as dsn:
        yield dsn


# ------------------------------------------------------------------- fixtures of several modules
# (the builders they use live in api_builders.py and ingest_builders.py)


@pytest.fixture(params=["sqlite", "pgstac"])
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """An empty store of each kind: a SQLite file, or a fresh pgstac database."""
    from stac_rscbir.store.sqlite import SQLiteStore

    from .api_builders import StoreFactory

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


@contextmanager
def open_deployment(kind: str, tmp: Path, request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """A deployment (api_builders.Deployment) over an empty database of its own: a SQLite file,
    or a fresh pgstac database for our app on pgstac and for stac-fastapi-pgstac + plugin."""
    from stac_rscbir.store.sqlite import SQLiteStore

    from .api_builders import Deployment

    if kind == "sqlite":
        deployment = Deployment(kind, lambda: SQLiteStore(tmp / "stac.db"), tmp / "index")
        try:
            yield deployment
        finally:
            deployment.close()
        return
    from stac_rscbir.store.pgstac import PgstacStore

    pgstac_dsn = request.getfixturevalue("pgstac_dsn")
    request.getfixturevalue("pgstac_template")
    with fresh_pgstac_db(pgstac_dsn) as dsn:
        deployment = Deployment(kind, lambda: PgstacStore(dsn), tmp / "index", dsn)
        try:
            yield deployment
        finally:
            deployment.close()


@pytest.fixture(params=["sqlite", "pgstac", "plugin"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Deployment]:
    """An empty deployment of each kind: our app on SQLite, our app on pgstac,
    stac-fastapi-pgstac with the similarity plugin."""
    with open_deployment(request.param, tmp_path, request) as d:
        yield d


@pytest.fixture(scope="module", params=["sqlite", "pgstac", "plugin"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The URL of a real server (uvicorn on a free loopback port) of each deployment, holding
    the ``scenes`` collection and its N coded items (api_builders.py); one per module."""
    from stac_rscbir.api.server import BackgroundServer

    from .api_builders import N, _collection, _item

    with open_deployment(request.param, tmp_path_factory.mktemp("server"), request) as d:
        store = d()
        store.create_collection(_collection())
        store.upsert_items([_item(i) for i in range(N)])
        with BackgroundServer(d.app()) as srv:
            yield srv.url


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small RGB hashing model (ingest_builders.py: random weights, ``CHIP`` pixels); one per
    module."""
    from .ingest_builders import rgb_model

    return rgb_model(tmp_path_factory.mktemp("ckpt") / "model")
