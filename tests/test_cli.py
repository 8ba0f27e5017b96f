"""The command line: validate and codes over the examples and over broken files."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
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
    tables = _printed_tables(result.output)
    oracle = _example_codes()
    assert set(tables) == set(oracle)  # one table per (model, version), none missing
    # two S2 items carry the 64-bit model, with different codes: a real 2 x 2 comparison
    first, second = oracle["ben-s2-milan-64", "1.0.0"].values()
    assert first != second
    for key, (bits, rows) in tables.items():
        codes = oracle[key]
        ids = [item_id for item_id, _ in rows]
        assert sorted(ids) == sorted(codes), key
        assert all(bits == 8 * len(codes[i]) for i in ids), key
        matrix = np.array([dists for _, dists in rows])
        assert matrix.shape == (len(ids), len(ids)), key
        assert not np.diag(matrix).any(), key  # a zero diagonal
        assert (matrix == matrix.T).all(), key  # symmetric
        expected = [[_hamming(codes[a], codes[b]) for b in ids] for a in ids]
        assert matrix.tolist() == expected, key


_TITLE = re.compile(r"(\S+) @ (\S+): (\d+)-bit codes, Hamming distances")


def _printed_tables(output: str) -> dict[tuple[str, str], tuple[int, list[tuple[str, list[int]]]]]:
    """The tables ``codes`` printed: (model, version) -> (bits, [(item id, distances)]) in row
    order; checks the ``#k`` labels of rows and columns on the way."""
    tables: dict[tuple[str, str], tuple[int, list[tuple[str, list[int]]]]] = {}
    rows: list[tuple[str, list[int]]] = []
    for line in output.splitlines():
        if title := _TITLE.search(line):
            rows = []
            tables[title[1], title[2]] = (int(title[3]), rows)
            continue
        cells = [c.strip() for c in line.strip().strip("┃│").split("┃" if "┃" in line else "│")]
        if cells[0] == "item":  # the header: item, code (hex), #0, #1, ...
            assert cells[2:] == [f"#{k}" for k in range(len(cells) - 2)], line
        elif cells[0].startswith("#"):
            label, item_id = cells[0].split(" ", 1)
            assert label == f"#{len(rows)}", line
            rows.append((item_id, [int(c) for c in cells[2:]]))
    return tables


def _example_codes() -> dict[tuple[str, str], dict[str, bytes]]:
    """The oracle, read without the CLI's codec: (model, version) -> {item id: code bytes}."""
    codes: dict[tuple[str, str], dict[str, bytes]] = {}
    for path in EXAMPLES.glob("*.json"):
        doc = json.loads(path.read_text())
        if doc.get("type") != "Feature":
            continue
        for entry in doc["properties"].get("cbir:codes", []):
            text = entry["code"]
            raw = bytes.fromhex(text) if entry["encoding"] == "hex" else base64.b64decode(text)
            codes.setdefault((entry["model"], entry["model_version"]), {})[doc["id"]] = raw
    return codes


def _hamming(a: bytes, b: bytes) -> int:
    """Differing bits; the bit order within a byte does not change the count."""
    assert len(a) == len(b)
    return sum((x ^ y).bit_count() for x, y in zip(a, b, strict=True))
