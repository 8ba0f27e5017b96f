"""The survey's traditional descriptors: [3] LBP and [4] bag of spectral values on hand-computed
cases, N bands, the on-disk cache and their rows in the retrieval benchmark."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stac_rscbir.cli import app
from stac_rscbir.data.imagefolder import read_labels_csv
from stac_rscbir.descriptors.cache import cached_descriptors
from stac_rscbir.descriptors.lbp import LBPHistogram
from stac_rscbir.descriptors.registry import DESCRIPTORS
from stac_rscbir.descriptors.spectral import BagOfSpectralValues
from stac_rscbir.eval.retrieval_bench import BenchSetup, method_error, method_names, run


def test_lbp_hand_computed_codes_and_histogram() -> None:
    """P = 4, R = 1 (neighbours right, up, left, down: no interpolation; outside reads 0).

    0 5 0    centre 3: up 5 >= 3, left 0 < 3, down 5 >= 3, right 0 < 3 -> bits 1010 around the
    0 3 0    circle: 4 transitions, not uniform -> code P + 1 = 5. Top and bottom 5s: every
    0 5 0    neighbour (0, 3, outside 0) < 5 -> no ones -> code 0. The six 0s: every neighbour
             >= 0 -> four ones, uniform -> code 4. Histogram of codes 0..5: [2, 0, 0, 0, 6, 1] / 9.
    """
    grey = np.array([[0, 5, 0], [0, 3, 0], [0, 5, 0]], dtype=np.float32) / 255.0
    hist = LBPHistogram(scales=((4, 1.0),)).describe(grey[:, :, None])
    np.testing.assert_allclose(hist, np.array([2, 0, 0, 0, 6, 1]) / 9, atol=1e-7)


def test_bosv_hand_computed_histogram() -> None:
    """Pixels quantised to their nearest codeword: (0.1,0,0) -> c0 (0,0,0); (0.9,0.1,0) and
    (0.8,0,0.1) -> c1 (1,0,0); (0,0.1,0.9) -> c2 (0,0,1). Histogram [1, 2, 1] / 4."""
    bosv = BagOfSpectralValues(words=3)
    bosv.codebook_ = np.array([[0, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=np.float32)
    image = np.array(
        [[[0.1, 0, 0], [0.9, 0.1, 0]], [[0.8, 0, 0.1], [0, 0.1, 0.9]]], dtype=np.float32
    )
    np.testing.assert_allclose(bosv.transform([image])[0], [0.25, 0.5, 0.25])


def test_descriptors_take_twelve_bands() -> None:
    """Sentinel-2's 12 bands: LBP per band (12 x (10 + 18 + 26) bins), BoSV on 12-D pixels."""
    rng = np.random.default_rng(0)
    images = [rng.random((32, 32, 12), dtype=np.float32) for _ in range(3)]
    lbp = LBPHistogram().fit(images).transform(images)
    assert lbp.shape == (3, 12 * (10 + 18 + 26))
    np.testing.assert_allclose(lbp.sum(axis=1), 1.0, rtol=1e-5)
    bosv = BagOfSpectralValues(words=8, pixels_per_image=64).fit(images)
    assert bosv.codebook_ is not None and bosv.codebook_.shape == (8, 12)
    hists = bosv.transform(images)
    assert hists.shape == (3, 8)
    np.testing.assert_allclose(hists.sum(axis=1), 1.0, rtol=1e-5)


def _texture(label: int, rng: np.random.Generator) -> np.ndarray:
    """A 48 px RGB image of one of three classes differing in colour and texture."""
    size = 48
    yy, xx = np.mgrid[:size, :size]
    noise = rng.normal(0, 12, (size, size, 3))
    if label == 0:  # reddish horizontal stripes
        base = np.where((yy // 3) % 2 == 0, 200, 60)[:, :, None] * np.array([1.0, 0.3, 0.2])
    elif label == 1:  # green smooth gradient
        base = (80 + xx * 2)[:, :, None] * np.array([0.3, 1.0, 0.4])
    else:  # blue checkerboard
        base = np.where(((yy // 4) + (xx // 4)) % 2 == 0, 220, 30)[:, :, None] * np.array(
            [0.2, 0.4, 1.0]
        )
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture
def toy_folder(tmp_path: Path) -> BenchSetup:
    """3 classes x 6 synthetic PNGs and their ``path,class`` CSV."""
    rng = np.random.default_rng(0)
    rows = []
    for label, name in enumerate(("stripes", "gradient", "checks")):
        for i in range(6):
            path = f"{name}/{i}.png"
            (tmp_path / name).mkdir(exist_ok=True)
            Image.fromarray(_texture(label, rng)).save(tmp_path / path)
            rows.append((path, name))
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "class"), *rows])
    return BenchSetup(tmp_path, labels, cache_dir=tmp_path / "cache")


def test_cache_second_call_is_a_hit(toy_folder: BenchSetup) -> None:
    data = read_labels_csv(toy_folder.images, toy_folder.labels)
    spec = DESCRIPTORS["bosv"]
    assert not list(toy_folder.cache_dir.glob("descriptor-bosv-*.npy"))
    first, _ = cached_descriptors(data, spec, np.arange(12), toy_folder.cache_dir)
    assert first.dtype == np.float32 and first.shape == (18, 128)
    assert len(list(toy_folder.cache_dir.glob("descriptor-bosv-*.npy"))) == 1  # computed, saved
    again, seconds = cached_descriptors(data, spec, np.arange(12), toy_folder.cache_dir)
    assert seconds == 0.0
    np.testing.assert_array_equal(again, first)


def test_hashed_rows_only_where_a_descriptor_is_hashable() -> None:
    """pLSH only on histograms; no hashed rows of codes, shared rows or an affinity fusion."""
    names = set(method_names())
    assert {"bosv+plsh", "sift-bovw+plsh", "lbp+itq", "adlf-vlad+itq"} <= names
    assert not {"lbp+plsh", "multicode+itq", "ucnn-camf+lsh", "adlf-vlad-noqe+itq"} & names
    assert "multicode" in names and "ucnn-camf" in names
    assert method_error("lbp+itq") is None
    assert "use one of" in method_error("lbp+plsh") and "'itq'" in method_error("lbp+plsh")
    assert method_error("multicode+itq") == (
        "itq does not hash descriptor 'multicode': its rows are not hashed"
    )
    assert method_error("nope").startswith("unknown method 'nope'")


def test_benchmark_rows_on_a_separable_toy_set(toy_folder: BenchSetup) -> None:
    """Float and hashed descriptor rows retrieve the toy classes far above chance (1/3)."""
    assert {"lbp", "bosv", "lbp+itq", "bosv+lsh"} <= set(method_names())
    for method in ("lbp", "lbp+itq", "bosv"):
        result = run(toy_folder, method, bits=8)
        assert result["n_queries"] == 6 and result["n_train"] == 12
        assert result["descriptor_dim"] == {"lbp": 162, "bosv": 128}[method.split("+")[0]]
        assert result["bits"] == (8 if "+" in method else None)
        assert result["map_at_20"] > 0.8, (method, result["map_at_20"])
    assert result["describe_seconds"] > 0 and result["seconds_per_image"] > 0


def test_cli_bench_retrieval_runs_a_hashed_descriptor(toy_folder: BenchSetup) -> None:
    out = toy_folder.images / "bosv-lsh.json"
    args = ["bench", "retrieval", "--images", str(toy_folder.images)]
    args += ["--labels", str(toy_folder.labels), "--method", "bosv+lsh", "--bits", "32"]
    args += ["--cache-dir", str(toy_folder.cache_dir), "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())
    assert row["method"] == "bosv+lsh" and row["bits"] == 32 and row["descriptor_dim"] == 128
