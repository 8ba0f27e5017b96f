"""deploy/: the compose file validated offline by Debian's docker-compose 1.29 (no Docker engine
here or in CI), its wiring, the Dockerfiles' pins, and `stac-rscbir listen`, the worker's
default command, run as the container would run it (a subprocess) on a real pgstac."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT, require

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
README = DEPLOY / "README.md"
CLI = str(Path(sys.executable).with_name("stac-rscbir"))
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")  # ${VAR...}, not $${escaped}


def _compose_variables() -> set[str]:
    return set(VARIABLE.findall(COMPOSE.read_text()))


def _docker_compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    binary = shutil.which("docker-compose")
    require(binary is not None, "docker-compose (apt-get install docker-compose) not installed")
    clean = {k: v for k, v in os.environ.items() if k not in _compose_variables()}
    return subprocess.run(
        [str(binary), "-f", str(COMPOSE), *args],
        env={**clean, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The compose file as docker-compose resolves it with every default."""
    run = _docker_compose("config")
    assert run.returncode == 0, run.stderr
    return yaml.safe_load(run.stdout)


def test_compose_file_is_valid() -> None:
    run = _docker_compose("config", "-q")
    assert (run.returncode, run.stdout) == (0, ""), run.stderr
    assert "WARNING" not in run.stderr, run.stderr  # e.g. a variable without a default


def test_services_and_their_wiring(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert {"pgstac", "migrate", "api", "api-pgstac", "worker"} <= set(services)
    assert {"dask-scheduler", "dask-worker"} <= set(services)

    pgstac = services["pgstac"]
    assert "pg_isready" in " ".join(pgstac["healthcheck"]["test"])
    migrate = services["migrate"]
    assert "pypgstac migrate" in " ".join(migrate["command"])
    assert migrate["depends_on"]["pgstac"]["condition"] == "service_healthy"

    api = services["api"]
    assert api["build"]["dockerfile"] == "deploy/Dockerfile.api"
    assert Path(api["build"]["context"]) == ROOT
    assert api["depends_on"]["pgstac"]["condition"] == "service_healthy"
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert any(str(p).endswith("8080:8080/tcp") for p in api["ports"]), api["ports"]
    assert "/_mgmt/ping" in " ".join(api["healthcheck"]["test"])
    assert any(v.startswith("indexes:/indexes") for v in api["volumes"])

    # stac-fastapi-pgstac + plugin: the same image, its own app path and environment, its own
    # index volume, in the `plugin` profile
    plugin = services["api-pgstac"]
    assert plugin["image"] == api["image"] and plugin["build"] == api["build"]
    assert api["build"]["args"]["EXTRAS"] == "pgstac"  # the light server, no torch
    assert plugin["profiles"] == ["plugin"]
    assert plugin["command"][:3] == [
        "uvicorn",
        "stac_rscbir.api.pgstac_plugin:create_app",
        "--factory",
    ]
    env = plugin["environment"]
    assert (env["PGHOST"], env["PGPORT"], env["PGDATABASE"]) == ("pgstac", "5432", "pgstac")
    assert (env["PGUSER"], env["PGPASSWORD"]) == ("postgres", "postgres")
    assert env["RSCBIR_INDEX_DIR"] == "/indexes" and "RSCBIR_MODELS" in env
    assert any(str(p).endswith("8081:8080/tcp") for p in plugin["ports"]), plugin["ports"]
    assert any(v.startswith("plugin-indexes:/indexes") for v in plugin["volumes"])
    assert plugin["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "/_mgmt/ping" in " ".join(plugin["healthcheck"]["test"])

    dsn = "postgresql://postgres:postgres@pgstac:5432/pgstac"
    for name in ("migrate", "api", "worker", "dask-worker"):
        assert services[name]["environment"]["PGSTAC_DSN"] == dsn, name

    worker = services["worker"]
    assert worker["build"]["dockerfile"] == "deploy/Dockerfile.worker"
    assert worker["command"] == ["listen"]
    assert worker["depends_on"]["pgstac"]["condition"] == "service_healthy"
    assert worker["environment"]["RSCBIR_MODEL"] == "/models/default"
    for name in ("worker", "dask-worker"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name

    scheduler, dask_worker = services["dask-scheduler"], services["dask-worker"]
    assert scheduler["command"][:2] == ["dask", "scheduler"]
    assert dask_worker["command"][:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    for svc in (scheduler, dask_worker):
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile.worker"
        assert svc["profiles"] == ["dask"]
    assert {"pgdata", "indexes", "plugin-indexes"} <= set(resolved["volumes"])


def test_plugin_service_configures_stac_fastapi_pgstac(
    resolved: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """stac-fastapi-pgstac's own settings classes read the api-pgstac service's environment."""
    require(find_spec("stac_fastapi.pgstac") is not None, "stac-fastapi-pgstac (pgstac extra)")
    from stac_fastapi.pgstac.config import PostgresSettings, Settings

    for key in [k for k in os.environ if k.startswith(("PG", "ENABLE_", "DB_"))]:
        monkeypatch.delenv(key)
    for key, value in resolved["services"]["api-pgstac"]["environment"].items():
        monkeypatch.setenv(key, str(value))
    pg = PostgresSettings(_env_file=None)
    assert (pg.pghost, pg.pgport, pg.pgdatabase) == ("pgstac", 5432, "pgstac")
    assert (pg.pguser, pg.pgpassword) == ("postgres", "postgres")
    assert Settings(_env_file=None).enable_transactions_extensions is False


def test_configuration_comes_from_the_environment() -> None:
    run = _docker_compose(
        "config",
        env={
            "PGSTAC_DSN": "postgresql://u:p@db:5432/x",
            "API_PORT": "9090",
            "RSCBIR_MODEL": "/m",
            "PGHOST": "db",
            "POSTGRES_PASSWORD": "p",
            "API_EXTRAS": "pgstac,ml,ingest",
        },
    )
    assert run.returncode == 0, run.stderr
    services = yaml.safe_load(run.stdout)["services"]
    assert services["api"]["environment"]["PGSTAC_DSN"] == "postgresql://u:p@db:5432/x"
    assert services["worker"]["environment"]["PGSTAC_DSN"] == "postgresql://u:p@db:5432/x"
    assert any(str(p).endswith(":9090:8080/tcp") for p in services["api"]["ports"])
    assert services["worker"]["environment"]["RSCBIR_MODEL"] == "/m"
    plugin = services["api-pgstac"]
    assert (plugin["environment"]["PGHOST"], plugin["environment"]["PGPASSWORD"]) == ("db", "p")
    assert plugin["build"]["args"]["EXTRAS"] == "pgstac,ml,ingest"


def test_every_variable_has_a_default_and_is_documented() -> None:
    text = COMPOSE.read_text()
    variables = _compose_variables()
    assert {"PGSTAC_DSN", "POSTGRES_PASSWORD", "API_PORT", "RSCBIR_MODEL"} <= variables
    without_default = sorted(
        set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)\}", text))
        | set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)[:?]?\?", text))
    )
    assert without_default == [], f"variables without a default: {without_default}"
    readme = README.read_text()
    table = set(re.findall(r"^\| `([A-Z_][A-Z0-9_]*)` \|", readme, flags=re.MULTILINE))
    assert sorted(variables - table) == [], "compose variables missing from deploy/README.md"


def _text(name: str) -> str:
    return (DEPLOY / name).read_text()


def test_dockerfiles_pin_torch_and_extras() -> None:
    api, worker = _text("Dockerfile.api"), _text("Dockerfile.worker")
    for text in (api, worker):
        assert "ARG TORCH_VERSION=2.13.0" in text
        assert '"torch==${TORCH_VERSION}"' in text
        assert "-c /opt/torch-constraint.txt" in text  # the project cannot swap the build
        assert "USER rscbir" in text  # non-root
        assert 'ENTRYPOINT ["' in text
        assert "COPY deploy/entrypoint.sh" in text
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", api, flags=re.MULTILINE)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in api
    # the API image installs the light server (no torch) unless EXTRAS names ml or ingest
    assert re.search(r"^ARG EXTRAS=pgstac$", api, flags=re.MULTILINE)
    assert '".[${EXTRAS}]"' in api
    assert "*,ml,* | *,ingest,*)" in api and "stac_rscbir.api.pgstac_plugin" in api
    assert "HEALTHCHECK" in api and "/_mgmt/ping" in api
    assert 'CMD ["serve"]' in api
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+-runtime-", worker, flags=re.MULTILINE)
    assert re.search(
        r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cu\d+$", worker, re.M
    )
    assert '".[ml,ingest,pgstac,dask]"' in worker
    assert 'CMD ["listen"]' in worker
    # the files the images copy exist, and the build context lets them through
    for path in ("pyproject.toml", "README.md", "extension-schema/json-schema/schema.json"):
        assert (ROOT / path).is_file(), path
    for name in ("Dockerfile.api.dockerignore", "Dockerfile.worker.dockerignore"):
        ignore = _text(name).splitlines()
        assert {"!stac_rscbir", "!deploy/entrypoint.sh", "!pyproject.toml"} <= set(ignore)


def test_entrypoint_builds_the_serve_command(tmp_path: Path) -> None:
    fake = tmp_path / "stac-rscbir"
    fake.write_text('#!/bin/sh\necho "$@"\n')
    fake.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        "PGSTAC_DSN": "postgresql://u:p@db/x",
        "RSCBIR_MODELS": "/models/a,/models/b",
    }
    entry = str(DEPLOY / "entrypoint.sh")
    out = subprocess.run(
        ["bash", entry, "serve"], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [
        *("serve", "--dsn", "postgresql://u:p@db/x", "--index-dir", "/indexes"),
        *("--host", "0.0.0.0", "--port", "8080", "--model", "/models/a", "--model", "/models/b"),
    ]
    out = subprocess.run(
        ["bash", entry, "listen", "--idle-timeout", "3"], env=env, capture_output=True
    )
    assert out.stdout.decode().split() == ["listen", "--idle-timeout", "3"]
    out = subprocess.run(["bash", entry, "serve"], env={"PATH": env["PATH"]}, capture_output=True)
    assert out.returncode != 0 and b"PGSTAC_DSN" in out.stderr


# ----------------------------------------------------------------------------- listen


def _listen(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PGSTAC_", "RSCBIR_"))}
    return subprocess.run(
        [CLI, "listen", *args],
        env={**env, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_listen_encodes_items_loaded_before_it_started(
    pgstac_dsn: str, checkpoint: Path, tmp_path: Path
) -> None:
    from . import pgstac_builders as pg

    cid = "listen-cli-scenes"
    items = pg._scenes(tmp_path, cid, seed=700)
    pg._insert(pgstac_dsn, cid, items)  # nobody listens: only the catch-up can find them
    common = ["--dsn", pgstac_dsn, "--model", str(checkpoint), "--collections", cid]
    run = _listen(*common, "--idle-timeout", "2", "--device", "cpu", "--batch-size", "16")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 encoded, 0 already encoded, 0 refused" in run.stdout, run.stdout
    assert "6 chips" in run.stdout
    pg._assert_encoded_once(pgstac_dsn, cid, items)
    # the trigger is in place (installed by the command, idempotently)
    run = _listen(*common, "--idle-timeout", "0.5", "--device", "cpu")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 encoded" in run.stdout
    pg._assert_encoded_once(pgstac_dsn, cid, items)


def test_listen_errors_are_one_line(checkpoint: Path) -> None:
    require(find_spec("psycopg") is not None, "psycopg not installed (the pgstac extra)")
    bad = "postgresql://someone:secret@127.0.0.1:1/nowhere"
    run = _listen("--dsn", bad, "--model", str(checkpoint), "--device", "cpu", timeout=120)
    assert run.returncode == 1
    assert "cannot connect to pgstac" in run.stdout and "secret" not in run.stdout
    assert "Traceback" not in run.stdout + run.stderr
    run = _listen("--dsn", bad, "--model", str(checkpoint.parent / "missing"), timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stdout + run.stderr
