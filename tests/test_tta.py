"""Test-time augmentation (TTA) at encoding: the mean relaxed code of the 8 dihedral views before
the binarisation, set in the checkpoint's config so the archive and the queries are encoded
alike (``ingest --tta``, the API's uploaded-image queries)."""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from fastapi.testclient import TestClient
from rasterio.io import MemoryFile
from rasterio.transform import from_origin
from rasterio.windows import Window
from typer.testing import CliRunner

from stac_rscbir.cli import app
from stac_rscbir.extension.cbir import HashCode
from stac_rscbir.extension.validation import cbir_errors, schema_errors
from stac_rscbir.models.checkpoint import load_checkpoint
from stac_rscbir.models.config import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModelConfig,
    SourceConfig,
    load_config,
)
from stac_rscbir.models.encoder import HashEncoder

from .ingest_builders import CHIP, MODEL, _scene, rgb_model
from .stac_builders import RGB, raster_item, static_catalog

# how each head turns relaxed codes into bits: linear/tanh heads by sign, sigmoid heads at 0.5
THRESHOLD = {
    "dhnn": (np.greater_equal, 0.0),
    "milan": (np.greater, 0.5),
    "duch": (np.greater_equal, 0.0),
}


def _model(folder: Path, method: str = "dhnn", *, tta: bool = False, two: bool = False) -> Path:
    config = ModelConfig(
        method=method,
        bits=32,
        bands=list(RGB),
        backbone="smallcnn",
        mean=[1000.0, 1100.0, 1200.0],
        std=[300.0, 300.0, 300.0],
        model_id=f"tta-{method}",
        input_size=CHIP,
        head={"n_classes": 1},
        tta=tta,
        second_source=(
            SourceConfig(["VV", "VH"], "smallcnn", [-12.0, -19.0], [3.0, 3.0]) if two else None
        ),
    )
    torch.manual_seed(0)
    return HashEncoder.build(config, pretrained=False).save(folder)


def _views(x: np.ndarray) -> list[np.ndarray]:
    """The 8 dihedral views of (B, C, H, W) images by NumPy (independent of augment.dihedral)."""
    out = []
    for quarter_turns in range(4):
        turned = np.rot90(x, quarter_turns, axes=(-2, -1))
        out += [np.ascontiguousarray(turned), np.ascontiguousarray(turned[..., ::-1])]
    return out


def _with_tta(encoder: HashEncoder) -> HashEncoder:
    """The same network, encoding with TTA."""
    return HashEncoder(dataclasses.replace(encoder.config, tta=True), encoder.net)


def _pixels(rng: np.random.Generator, n: int, bands: int, h: int, w: int) -> np.ndarray:
    low, high = (-25.0, -5.0) if bands == 2 else (400.0, 2000.0)
    return rng.uniform(low, high, (n, bands, h, w)).astype(np.float32)


def _check_oracle(plain: HashEncoder, x: np.ndarray, source: int, method: str) -> None:
    bits, relaxed = _with_tta(plain).encode_numpy(x, source)
    oracle = np.mean([plain.encode_numpy(v, source)[1] for v in _views(x)], axis=0)
    np.testing.assert_allclose(relaxed, oracle, rtol=0, atol=1e-6)
    above, threshold = THRESHOLD[method]
    assert np.abs(oracle - threshold).min() > 1e-5  # no near-ties: the bits are well defined
    np.testing.assert_array_equal(bits, above(oracle, threshold).astype(np.uint8))
    # TTA really changes codes: some bits differ from the untransformed image's
    assert (bits != plain.encode_numpy(x, source)[0]).any()


@pytest.mark.parametrize("method", ["dhnn", "milan"])  # a sign head and a sigmoid (0.5) head
def test_tta_code_is_the_binarised_mean_of_the_eight_views(method: str, tmp_path: Path) -> None:
    plain = HashEncoder.load(_model(tmp_path / "m", method))
    x = _pixels(np.random.default_rng(1), 6, 3, CHIP, CHIP)
    _check_oracle(plain, x, 0, method)


def test_tta_runs_per_branch_of_a_cross_modal_model(tmp_path: Path) -> None:
    plain = HashEncoder.load(_model(tmp_path / "m", "duch", two=True))
    rng = np.random.default_rng(2)
    _check_oracle(plain, _pixels(rng, 5, 3, CHIP, CHIP), 0, "duch")
    _check_oracle(plain, _pixels(rng, 5, 2, CHIP, CHIP), 1, "duch")


@pytest.mark.parametrize("shape", [(CHIP, CHIP), (CHIP, CHIP + 8)])  # square and not
def test_tta_codes_do_not_change_under_rotations_and_flips(
    shape: tuple[int, int], tmp_path: Path
) -> None:
    """The 8 views of any view of an image are the same 8 views: equal relaxed codes up to the
    order of the float sum, so equal codes (a quarter turn of a non-square image swaps H, W)."""
    encoder = HashEncoder.load(_model(tmp_path / "m", tta=True))
    x = _pixels(np.random.default_rng(3), 4, 3, *shape)
    bits, relaxed = encoder.encode_numpy(x)
    for view in _views(x)[1:]:
        view_bits, view_relaxed = encoder.encode_numpy(view)
        np.testing.assert_allclose(view_relaxed, relaxed, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(view_bits, bits)
    # without TTA the same network is not invariant: the property is TTA's
    plain = HashEncoder(dataclasses.replace(encoder.config, tta=False), encoder.net)
    plain_bits = plain.encode_numpy(x)[0]
    assert any((plain.encode_numpy(v)[0] != plain_bits).any() for v in _views(x)[1:])


def test_tta_is_stored_in_the_config_and_old_configs_load_without_it(tmp_path: Path) -> None:
    ckpt = _model(tmp_path / "m", tta=True)
    raw = json.loads((ckpt / CONFIG_NAME).read_text())
    assert raw["tta"] is True and raw["format_version"] == 1
    config, _ = load_checkpoint(ckpt)
    assert config.tta and HashEncoder.load(ckpt).config == config
    assert HashEncoder.load(ckpt).describe()["tta"] is True
    # a config.json written before the field existed loads as no TTA
    del raw["tta"]
    (ckpt / CONFIG_NAME).write_text(json.dumps(raw))
    old = load_config(ckpt)
    assert old.tta is False and old == dataclasses.replace(config, tta=False)
    assert HashEncoder.load(ckpt).config.tta is False


def _ingest(catalog: Path, ckpt: Path, *extra: str) -> str:
    args = ["ingest", str(catalog), "--model", str(ckpt), "--chip-size", str(CHIP)]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", *extra])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # rich wraps long lines


def _scene_code(root: Path, item_id: str) -> dict:
    (code,) = json.loads((root / "scenes" / item_id / f"{item_id}.json").read_text())["properties"][
        "cbir:codes"
    ]
    return code


def test_ingest_tta_switches_the_checkpoint_once_and_encodes_again(tmp_path: Path) -> None:
    ckpt = rgb_model(tmp_path / "model")
    before = load_config(ckpt)
    weights = (ckpt / WEIGHTS_NAME).read_bytes()
    scene = _scene(tmp_path, "t1", 64, 64, seed=11)
    root = tmp_path / "catalog"
    catalog = static_catalog(root, [raster_item("t1", scene)])
    assert "1 encoded, 0 already encoded" in _ingest(catalog, ckpt)
    assert _scene_code(root, "t1")["model_version"] == "1.0.0"

    out = _ingest(catalog, ckpt, "--tta")
    assert (
        f"TTA switched on for model {MODEL}: {ckpt / CONFIG_NAME} now has tta=true and version "
        "1.0.0 -> 1.0.0+tta" in out
    )
    assert "Items encoded by 1.0.0 will be encoded again" in out
    # the codes made without TTA are not taken for TTA ones: the item is encoded again
    assert "1 encoded, 0 already encoded" in out and "4 chips" in out
    after = load_config(ckpt)
    assert after == dataclasses.replace(before, tta=True, version="1.0.0+tta")
    assert (ckpt / WEIGHTS_NAME).read_bytes() == weights  # same weights, new encoding
    assert _scene_code(root, "t1")["model_version"] == "1.0.0+tta"

    # every chip's code is the TTA encoder applied to its pixels (one code per item: replaced)
    encoder = HashEncoder.load(ckpt)
    assert encoder.config.tta
    chips = sorted((root / "scenes-chips").glob("*/*.json"))
    assert len(chips) == 4
    with rasterio.open(scene) as src:
        for path in chips:
            chip = json.loads(path.read_text())
            (code,) = chip["properties"]["cbir:codes"]
            assert code["model_version"] == "1.0.0+tta"
            w = chip["properties"]["cbir:chip"]["window"]
            window = Window(w["col_off"], w["row_off"], w["width"], w["height"])
            bits, _ = encoder.encode_numpy(src.read(window=window).astype(np.float32)[None])
            np.testing.assert_array_equal(HashCode.from_dict(code).bit_array(), bits[0])
    # the collections describe the TTA encoding, and the catalog stays valid
    models = json.loads((root / "scenes" / "collection.json").read_text())["cbir:models"]
    (described,) = [m for m in models if m["version"] == "1.0.0+tta"]
    assert described["tta"] is True and described["id"] == MODEL
    assert all("tta" not in m for m in models if m["version"] == "1.0.0")
    for path in [*root.glob("*/*.json"), *root.glob("*/*/*.json")]:
        doc = json.loads(path.read_text())
        assert schema_errors(doc) + cbir_errors(doc) == [], path

    # again with --tta: the checkpoint already has it, nothing is switched nor encoded again
    out = _ingest(catalog, ckpt, "--tta")
    assert (
        f"TTA: model {MODEL} 1.0.0+tta already encodes with test-time augmentation; "
        "checkpoint unchanged" in out
    )
    assert "0 encoded, 1 already encoded" in out
    assert load_config(ckpt) == after
    # and without --tta the checkpoint still encodes with it
    assert "0 encoded, 1 already encoded" in _ingest(catalog, ckpt)


def test_ingest_tta_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    catalog = static_catalog(tmp_path / "catalog", [])
    result = CliRunner().invoke(
        app, ["ingest", str(catalog), "--model", str(tmp_path / "nope"), "--tta"]
    )
    assert result.exit_code == 1 and "--tta" in result.output and "missing" in result.output


def _geotiff(pixels: np.ndarray) -> str:
    with MemoryFile() as mem:
        count, height, width = pixels.shape
        with mem.open(
            driver="GTiff",
            width=width,
            height=height,
            count=count,
            dtype=pixels.dtype,
            crs="EPSG:32633",
            transform=from_origin(500_000, 5_300_000, 10, 10),
        ) as dst:
            dst.write(pixels)
        return base64.b64encode(mem.read()).decode()


def test_an_uploaded_image_gets_the_code_ingestion_gave_it_with_tta(tmp_path: Path) -> None:
    """The API encodes uploads with the served checkpoint, whose config has the TTA that
    ``ingest --tta`` set: an archived patch uploaded as a query is at Hamming distance 0."""
    from stac_rscbir.api.app import create_api
    from stac_rscbir.store.sqlite import SQLiteStore

    ckpt = rgb_model(tmp_path / "model")
    plain = HashEncoder.load(ckpt)
    paths = [_scene(tmp_path, f"p{i}", CHIP, CHIP, seed=30 + i) for i in range(4)]
    root = tmp_path / "catalog"
    catalog = static_catalog(root, [raster_item(p.stem, p) for p in paths])
    assert "4 encoded" in _ingest(catalog, ckpt, "--tta")

    with rasterio.open(paths[2]) as src:
        pixels = src.read()
    stored = HashCode.from_dict(_scene_code(root, "p2")).bit_array()
    tta_bits, _ = HashEncoder.load(ckpt).encode_numpy(pixels[None].astype(np.float32))
    np.testing.assert_array_equal(stored, tta_bits[0])
    # without TTA the patch would get another code: a mixed archive would miss it
    assert (plain.encode_numpy(pixels[None].astype(np.float32))[0][0] != stored).any()

    store = SQLiteStore(tmp_path / "stac.db")
    try:
        store.create_collection(json.loads((root / "scenes" / "collection.json").read_text()))
        store.upsert_items(
            [json.loads((root / "scenes" / p.stem / f"{p.stem}.json").read_text()) for p in paths]
        )
        api = create_api(store, tmp_path / "index", {MODEL: ckpt})
        body = {"similarity": {"model": MODEL, "image": _geotiff(pixels), "k": 4}}
        with TestClient(api.app) as client:
            r = client.post("/search", json=body)
        assert r.status_code == 200, r.text
        first = r.json()["features"][0]
        assert first["id"] == "p2" and first["properties"]["cbir:distance"] == 0
    finally:
        store.close()
