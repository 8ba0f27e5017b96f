"""The command line: validate and codes over the examples and over broken files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from stac_rscbir.cli import app

from .conftest import EXAMPLES

runner = CliRunner()


def test_validate_examples_all_valid() -> None:
    result = runner.invoke(app, ["validate", str(EXAMPLES)])
    n = len(list(EXAMPLES.glob("*.json")))
    assert result.exit_code == 0, result.output
    assert f"{n} valid, 0 invalid" in result.output


def test_validate_reports_each_bad_file_and_fails(tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "collection.json", tmp_path)
    doc = json.loads((EXAMPLES / "item-sentinel1-grd.json").read_text())
    doc["properties"]["cbir:codes"][0]["bits"] = 64  # the model says 32, the code holds 32
    (tmp_path / "bad-bits.json").write_text(json.dumps(doc))
    (tmp_path / "broken.json").write_text("{not json")
    result = runner.invoke(app, ["validate", str(tmp_path)], terminal_width=250)
    assert result.exit_code == 1
    assert "1 valid, 2 invalid" in result.output
    assert "cbir:codes[0].code: decodes to 32 bits but the entry" in result.output
    assert "unreadable JSON" in result.output


def test_codes_prints_hamming_distances() -> None:
    result = runner.invoke(app, ["codes", str(EXAMPLES)], terminal_width=250)
    assert result.exit_code == 0, result.output
    assert "ben-s2-milan-64 @ 1.0.0: 64-bit codes, Hamming distances" in result.output
    # two S2 items carry the 64-bit model: the distance table has both and a zero diagonal
    lines = [ln for ln in result.output.splitlines() if "S2A_MSIL2A" in ln]
    assert len(lines) >= 2
