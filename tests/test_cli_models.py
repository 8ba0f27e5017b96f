"""`stac-rscbir train` and `stac-rscbir bench retrieval` on a small labelled folder of PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stac_rscbir.cli import app
from stac_rscbir.models.encoder import HashEncoder

runner = CliRunner()
COLOURS = {"water": (20, 60, 160), "forest": (30, 120, 40), "desert": (210, 180, 120)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Three classes of noisy solid-colour 40x40 images, 8 each, with a path,class CSV."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = ["path,class"]
    for name, rgb in COLOURS.items():
        (root / name).mkdir()
        for i in range(8):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 25, (40, 40, 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
            rows.append(f"{name}/{i}.png,{name}")
    csv = root / "labels.csv"
    csv.write_text("\n".join(rows) + "\n")
    return root, csv


COMMON = ["--input-size", "64"]  # the ImageNet EfficientNet-Lite0 shipped in its wheel


def test_bench_retrieval_writes_the_documented_json(folder: tuple[Path, Path], tmp_path: Path):
    images, csv = folder
    out = tmp_path / "r.json"
    args = [
        "bench",
        "retrieval",
        "--images",
        str(images),
        "--labels",
        str(csv),
        "--bits",
        "16",
        "--iterations",
        "100",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    ]
    result = runner.invoke(app, [*args, "--method", "dhcnn", *COMMON])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    for key in (
        "method",
        "bits",
        "map_at_20",
        "map_at_20_truncated",
        "precision_at_10",
        "n_queries",
        "n_database",
        "train_seconds",
    ):
        assert key in doc
    assert (doc["method"], doc["bits"]) == ("dhcnn", 16)
    assert doc["n_queries"] == 9 and doc["n_database"] == 8  # 40 % of 8 per class, 3 classes
    # colour classes are separable: far better than random rankings
    assert doc["map_at_20"] > doc["metrics"]["random_map_at_20"] + 0.2
    for method in ("itq", "lsh", "random", "float-knn"):  # ITQ's PCA needs bits <= 15 here
        result = runner.invoke(app, [*args, "--method", method, "--bits", "8", *COMMON])
        assert result.exit_code == 0, result.output
        doc = json.loads(out.read_text())  # rewritten for this method
        assert (doc["method"], doc["bits"]) == (method, None if method == "float-knn" else 8)
        assert 0.0 <= doc["map_at_20"] <= 1.0
    result = runner.invoke(app, [*args, "--method", "itq", *COMMON])
    assert result.exit_code == 1 and "ITQ needs bits <= min(n, d) = 15" in result.output


def test_bench_rejects_unknown_method_and_bits(folder: tuple[Path, Path], tmp_path: Path):
    images, csv = folder
    base = [
        "bench",
        "retrieval",
        "--images",
        str(images),
        "--labels",
        str(csv),
        "--out",
        str(tmp_path / "x.json"),
    ]
    result = runner.invoke(app, [*base, "--method", "nope"])
    assert result.exit_code == 2 and "unknown method 'nope'" in result.output
    result = runner.invoke(app, [*base, "--method", "itq", "--bits", "63"])
    assert result.exit_code == 2 and "--bits must be one of" in result.output
    missing = tmp_path / "missing.csv"
    result = runner.invoke(
        app,
        [
            "bench",
            "retrieval",
            "--images",
            str(images),
            "--labels",
            str(missing),
            "--out",
            str(tmp_path / "x.json"),
            "--method",
            "itq",
        ],
    )
    assert result.exit_code == 1 and "labels CSV not found" in result.output


def test_train_saves_an_encoder_that_loads_in_one_call(folder: tuple[Path, Path], tmp_path):
    images, csv = folder
    out = tmp_path / "model"
    result = runner.invoke(
        app,
        [
            "train",
            "--images",
            str(images),
            "--labels",
            str(csv),
            "--method",
            "milan",
            "--bits",
            "32",
            "--iterations",
            "30",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
            *COMMON,
        ],
    )
    assert result.exit_code == 0, result.output
    encoder = HashEncoder.load(out)
    assert encoder.config.method == "milan" and encoder.config.bands == ["red", "green", "blue"]
    pixels = np.asarray(Image.open(images / "water/0.png").convert("RGB"), dtype=np.float32)
    batch = pixels.transpose(2, 0, 1)[None]
    bits, _ = encoder.encode_numpy(batch)
    assert bits.shape == (1, 32) and set(np.unique(bits)) <= {0, 1}
    again, _ = HashEncoder.load(out).encode_numpy(batch)
    np.testing.assert_array_equal(bits, again)
