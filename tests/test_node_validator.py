"""The examples pass stac-node-validator, the stac-extensions template's own checker, offline."""

from __future__ import annotations

import os
import shutil
import subprocess

import pyproj
import pystac.validation.jsonschemas

from .conftest import ROOT, require

EXT = ROOT / "extension-schema"


def _run_check(*paths: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYSTAC_SCHEMAS": os.path.dirname(pystac.validation.jsonschemas.__file__),
        "PROJJSON_SCHEMA": os.path.join(pyproj.datadir.get_data_dir(), "projjson.schema.json"),
    }
    return subprocess.run(
        ["npm", "run", "--silent", "check-examples", "--", *paths],
        cwd=EXT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_examples_pass_stac_node_validator() -> None:
    require(shutil.which("npm") is not None, "npm is not installed")
    require(
        (EXT / "node_modules/.bin/stac-node-validator").exists(),
        "stac-node-validator not installed (scripts/test runs npm ci)",
    )
    result = _run_check()
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Invalid: 0" in out and "Skipped: 0" in out, out
    n_examples = len(list((EXT / "examples").glob("*.json")))
    assert f"Passed: {n_examples}" in out, out


def test_stac_node_validator_rejects_a_bad_code(tmp_path) -> None:  # type: ignore[no-untyped-def]
    require(
        (EXT / "node_modules/.bin/stac-node-validator").exists(),
        "stac-node-validator not installed (scripts/test runs npm ci)",
    )
    text = (EXT / "examples/item-sentinel1-grd.json").read_text()
    import json

    doc = json.loads(text)
    doc["properties"]["cbir:codes"][0]["code"] = "abc"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc, indent=2) + "\n")
    out = _run_check(str(bad))
    assert "Invalid: 1" in out.stdout + out.stderr, out.stdout + out.stderr
