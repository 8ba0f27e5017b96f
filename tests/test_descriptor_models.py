"""Descriptor models (issue 19): a survey descriptor + a shallow hasher fitted on unlabelled
chips (`stac-rscbir fit --descriptor`), saved as a checkpoint folder that the one loader gives
to ingestion and the API, so any descriptor method can back the search service."""

from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import numpy as np
import pystac
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from rasterio.io import MemoryFile
from typer.testing import CliRunner

from stac_rscbir.api.app import create_api
from stac_rscbir.cli import app
from stac_rscbir.data.samples import folder_images, item_chips
from stac_rscbir.descriptors.base import load_image
from stac_rscbir.extension import CBIRExtension
from stac_rscbir.ingest.sinks import StoreSink
from stac_rscbir.ingest.worker import IngestOptions, Ingestor
from stac_rscbir.models.config import enable_tta, load_config
from stac_rscbir.models.descriptor_model import (
    DESCRIPTOR_STATE_NAME,
    DescriptorEncoder,
    DescriptorFit,
    stretch_range,
)
from stac_rscbir.models.encoder import HashEncoder
from stac_rscbir.models.loader import load_encoder
from stac_rscbir.store.sqlite import SQLiteStore

from .test_fit import _catalog, _said, images  # noqa: F401 (the fixture)

runner = CliRunner()
RGB = ["red", "green", "blue"]


def _chips(n: int = 24, bands: int = 3, size: int = 24) -> np.ndarray:
    """Seeded uint16-like chips (n, bands, size, size), float32."""
    return np.random.default_rng(3).integers(100, 4000, (n, bands, size, size)).astype(np.float32)


def test_the_stretch_maps_the_sample_percentiles_to_0_and_1() -> None:
    """Band 0 holds 0..100: its 2nd and 98th percentiles are 2 and 98 (width 96), so 50 maps to
    (50 - 2) / 96 = 0.5, 0 clips to 0 and 100 to 1; a constant band gets width 1."""
    band0 = np.arange(101, dtype=np.float32)
    pixels = np.stack([band0, np.full(101, 7.0, np.float32)])[None, :, None, :]  # (1, 2, 1, 101)
    low, width = stretch_range(pixels)
    assert low == pytest.approx([2.0, 7.0]) and width == pytest.approx([96.0, 1.0])
    encoder = DescriptorEncoder.fit(
        _chips(20, 2, 16), ["red", "nir"], DescriptorFit("bosv", "lsh", 8), model_id="m"
    )
    encoder.config = replace(encoder.config, mean=low, std=width)
    x = np.zeros((1, 2, 1, 4), np.float32)
    x[0, 0] = [0.0, 50.0, 100.0, np.nan]
    x[0, 1] = 7.0
    (image,) = encoder.scale(x)
    np.testing.assert_allclose(image[0, :, 0], [0.0, 0.5, 1.0, 0.0])  # NaN as the low end
    np.testing.assert_allclose(image[0, :, 1], 0.0)


@pytest.mark.parametrize("hasher", ["lsh", "itq", "klsh", "prh", "plsh"])
def test_a_saved_model_gives_identical_codes_after_load(tmp_path: Path, hasher: str) -> None:
    """Every unsupervised hasher's state (arrays in hasher.npz, scalars in config.json) and a
    fixed descriptor (rebuilt, nothing saved) round-trip exactly."""
    chips = _chips()
    fitted = DescriptorEncoder.fit(chips, RGB, DescriptorFit("lbp", hasher, 16), model_id="m")
    fitted.save(tmp_path)
    loaded = load_encoder(tmp_path)
    assert isinstance(loaded, DescriptorEncoder) and not (tmp_path / DESCRIPTOR_STATE_NAME).exists()
    (b1, d1), (b2, d2) = fitted.encode_numpy(chips), loaded.encode_numpy(chips)
    assert b1.shape == (24, 16) and d1.shape == (24, 162)  # 3 bands x (10 + 18 + 26) LBP bins
    np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(d1, d2)
    config = load_config(tmp_path)
    assert (config.kind, config.method, config.backbone) == ("descriptor", f"lbp+{hasher}", "lbp")
    assert config.descriptor_dim == 162 and config.input_size == 24


def test_a_learnt_descriptor_is_pickled_and_checked_on_load(tmp_path: Path) -> None:
    """bosv learns a codebook: it is saved (descriptor.pkl), reloads to identical codes, and a
    pickle changed after the fit is refused before it is read."""
    chips = _chips()
    fitted = DescriptorEncoder.fit(chips, RGB, DescriptorFit("bosv", "itq", 16), model_id="m")
    fitted.save(tmp_path)
    loaded = load_encoder(tmp_path)
    np.testing.assert_array_equal(fitted.encode_numpy(chips)[0], loaded.encode_numpy(chips)[0])
    (tmp_path / DESCRIPTOR_STATE_NAME).write_bytes(b"not the fitted codebook")
    with pytest.raises(ValueError, match="does not match the SHA-256"):
        load_encoder(tmp_path)


def test_a_sift_vocabulary_saves_without_its_opencv_object(tmp_path: Path) -> None:
    """sift-bovw holds a scikit-learn vocabulary and an OpenCV SIFT object (not picklable): the
    vocabulary is saved, SIFT made again, and the codes and tf-idf descriptors are identical."""
    chips = _chips(40, 3, 64)  # 16 dense SIFT descriptors per chip: 640 for 500 words
    fitted = DescriptorEncoder.fit(chips, RGB, DescriptorFit("sift-bovw", "itq", 16), model_id="m")
    fitted.save(tmp_path)
    (b1, d1), (b2, d2) = fitted.encode_numpy(chips), load_encoder(tmp_path).encode_numpy(chips)
    np.testing.assert_array_equal(b1, b2)
    np.testing.assert_array_equal(d1, d2)


def test_an_rgb_descriptor_on_two_bands_says_which_bands(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"needs 3 bands \(red, green, blue\), got 2 \(vv, vh\)"):
        DescriptorEncoder.fit(_chips(8, 2), ["vv", "vh"], DescriptorFit("sift-bovw"), model_id="m")
    catalog = _catalog(tmp_path)
    out = tmp_path / "m"
    args = ["fit", str(catalog), "--out", str(out), "--descriptor", "sift-bovw"]
    result = runner.invoke(app, [*args, "--bands", "red,green"], terminal_width=200)
    assert result.exit_code == 2, result.output
    assert "'sift-bovw'" in _said(result) and "got 2 (red, green)" in _said(result)
    assert isinstance(result.exception, SystemExit) and not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--descriptor", "hog"], "unknown descriptor 'hog'"),
        (["--descriptor", "lbp", "--hasher", "sha"], "--hasher must be one of"),
        (["--descriptor", "lbp", "--method", "itq"], "with --descriptor give --hasher"),
        (["--descriptor", "sgcn"], "'sgcn' ([21] Chaudhuri"),
        (["--descriptor", "cnn-wd"], "learns from labelled images"),
        (["--descriptor", "multicode"], "no shallow hasher codes it"),
    ],
)
def test_fit_refuses_bad_descriptor_options(images: Path, tmp_path: Path, args, message) -> None:  # noqa: F811
    result = runner.invoke(app, ["fit", str(images), "--out", str(tmp_path / "m"), *args])
    assert result.exit_code == 2 and message in _said(result), result.output
    assert not (tmp_path / "m").exists()


def test_fit_descriptor_on_a_folder_scales_0_255_like_the_benchmark(
    images: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    out = tmp_path / "lbp-itq"
    args = ["fit", str(images), "--out", str(out), "--descriptor", "lbp", "--bits", "16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "128 views of red, green, blue at 32 px from 16 images" in _said(result)
    assert "the fixed range 0-255 to [0, 1]" in _said(result) and "wrote" in _said(result)
    encoder = load_encoder(out)
    assert isinstance(encoder, DescriptorEncoder)
    assert encoder.config.mean == [0.0] * 3 and encoder.config.std == [255.0] * 3
    pixels = folder_images(images).pixels
    bits, desc = encoder.encode_numpy(pixels)
    assert bits.shape == (16, 16) and desc.shape == (16, 162)
    np.testing.assert_array_equal(bits, load_encoder(out).encode_numpy(pixels)[0])
    with pytest.raises(ValueError, match="test-time augmentation is for network models"):
        enable_tta(out)


def test_a_folder_model_describes_an_image_as_the_benchmark_does(
    images: Path,  # noqa: F811
) -> None:
    """Fitted with the 0-255 range, a descriptor model's vectors of an 8-bit RGB file are the
    benchmark's (``load_image``: the file / 255), so the served model is the table's row."""
    paths = sorted(images.rglob("*.png"))
    raw = np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in paths])
    chips = np.moveaxis(raw, -1, 1)  # (N, 3, 32, 32), raw 0-255
    how = DescriptorFit("bosv", "itq", 16)
    encoder = DescriptorEncoder.fit(chips, RGB, how, model_id="m", value_range=(0.0, 255.0))
    _, served = encoder.encode_numpy(chips)
    benchmark = encoder.descriptor.transform([load_image(p, 32) for p in paths])
    np.testing.assert_array_equal(served, benchmark)


def _geotiff(pixels: np.ndarray) -> str:
    """(bands, rows, cols) uint16 pixels as a base64 GeoTIFF."""
    bands, rows, cols = pixels.shape
    with MemoryFile() as mem:
        with mem.open(driver="GTiff", width=cols, height=rows, count=bands, dtype="uint16") as dst:
            dst.write(pixels)
        return base64.b64encode(mem.read()).decode()


def test_ingest_and_search_with_a_descriptor_model(tmp_path: Path) -> None:
    """fit (CLI) -> ingest into the SQLite store -> the real app: by item the item itself comes
    first at Hamming distance 0 (and descriptor distance 0 re-ranked); by its descriptor and by
    an upload of its pixels too; a network checkpoint still loads as a network."""
    catalog = _catalog(tmp_path)
    out = tmp_path / "lbp-itq-16"
    args = ["fit", str(catalog), "--out", str(out), "--chip", "32", "--descriptor", "lbp"]
    result = runner.invoke(app, [*args, "--bits", "16"])
    assert result.exit_code == 0, result.output
    assert "a per-band 2-98 % stretch of the sample" in _said(result)

    items = list(pystac.read_file(str(catalog)).get_items(recursive=True))  # type: ignore[attr-defined]
    store = SQLiteStore(tmp_path / "archive.db")
    try:
        store.create_collection(items[0].get_collection().to_dict(include_self_link=False))
        store.upsert_items([i.to_dict(include_self_link=False) for i in items])
        options = IngestOptions(progress=False, device="cpu", readers=1)
        report = Ingestor.from_checkpoint(out, options).run(
            [pystac.Item.from_dict(store.get_item("scenes", i.id)) for i in items],
            StoreSink(store),
        )
        assert (report.items_encoded, report.chips_encoded, report.errors) == (2, 8, [])
        api = create_api(store, tmp_path / "index", {"lbp-itq-16": out})
        with TestClient(api.app) as client:
            (described,) = client.get("/collections/scenes").json()["cbir:models"]
            assert (described["method"], described["backbone"]) == ("lbp+itq", "lbp")
            collections = client.get("/collections").json()["collections"]
            (chip_collection,) = [c["id"] for c in collections if c["id"] != "scenes"]
            chips = client.get(f"/collections/{chip_collection}/items").json()["features"]
            query = chips[3]
            code = CBIRExtension.ext(pystac.Item.from_dict(query)).get_code("lbp-itq-16")
            assert code is not None and code.descriptor is not None
            assert code.descriptor.array().shape == (162,)

            def search(similarity: dict) -> list[dict]:
                body = {"similarity": {"model": "lbp-itq-16", "k": 5, **similarity}}
                r = client.post("/search", json={**body, "collections": [chip_collection]})
                assert r.status_code == 200, r.text
                return r.json()["features"]

            by_item = {"item": {"collection": chip_collection, "id": query["id"]}}
            first = search(by_item)[0]
            assert (first["id"], first["properties"]["cbir:distance"]) == (query["id"], 0)
            first = search({**by_item, "rerank": True})[0]
            assert first["id"] == query["id"] and first["properties"]["cbir:score"] == 0.0
            desc = base64.b64encode(code.descriptor.array().astype("<f4").tobytes()).decode()
            first = search({"descriptor": desc, "rerank": True})[0]
            assert (first["id"], first["properties"]["cbir:distance"]) == (query["id"], 0)
            # the chip's own pixels, uploaded: encoded by the same checkpoint, so distance 0
            pixels = item_chips([i for i in items if query["id"].startswith(i.id)], RGB, 32)
            encoder = load_encoder(out)
            codes = encoder.encode_numpy(pixels.pixels)[0]
            same = (codes == code.bit_array()).all(axis=1)
            own = pixels.pixels[same]
            assert len(own), "the query chip is among its scene's chips"
            upload = search({"image": _geotiff(own[0].astype(np.uint16))})
            assert upload[0]["properties"]["cbir:distance"] == 0
    finally:
        store.close()
    assert isinstance(load_encoder(_network_checkpoint(tmp_path)), HashEncoder)


def _network_checkpoint(folder: Path) -> Path:
    from .api_builders import rgb_checkpoint

    return rgb_checkpoint(folder / "network", "net-64")
