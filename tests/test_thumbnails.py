"""Thumbnails: the renderer against hand-computed oracles, the assets ingestion writes, and the
``stac-rscbir thumbnails`` backfill (idempotent, resumable), served by the API."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
import rasterio
from PIL import Image
from typer.testing import CliRunner

from stac_rscbir.cli import app
from stac_rscbir.data.profiles import PROFILES
from stac_rscbir.data.render import MIN_GAMMA, SAR_RANGES_DB, TARGET_MEDIAN, Look, png_bytes
from stac_rscbir.ingest.sinks import CatalogSink, StoreSink
from stac_rscbir.ingest.sources import items_from_file, items_from_store
from stac_rscbir.ingest.thumbnails import THUMBNAIL, backfill
from stac_rscbir.ingest.worker import Ingestor
from stac_rscbir.store.sqlite import SQLiteStore

from .api_builders import StoreFactory
from .ingest_builders import CHIP, OPTIONS, _scene
from .stac_builders import raster_item, static_catalog

RGB_BANDS = PROFILES["rgb"].bands
SAR_BANDS = PROFILES["sentinel1-grd"].bands


def _decode(data: bytes | Path) -> np.ndarray:
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with Image.open(source) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGBA"))


# ---------------------------------------------------------------- the renderer


def test_optical_stretch_maps_the_2nd_and_98th_percentiles_and_hides_nodata() -> None:
    # 100 valid pixels valued 0..99 in each band: linear percentiles at 2 % and 98 % are
    # 0.02 * 99 = 1.98 and 97.02; invalid pixels (huge values, NaN) must not move them
    values = np.arange(100, dtype=np.float64).reshape(10, 10)
    data = np.stack([values, values, values])
    data = np.concatenate([data, np.full((3, 2, 10), 1e6)], axis=1)  # 2 invalid rows
    valid = np.ones((12, 10), dtype=bool)
    valid[10:] = False
    data[0, 0, 5] = np.nan  # a NaN pixel marked valid is treated as nodata
    look = Look.of(data, valid, RGB_BANDS)
    assert look is not None and look.kind == "optical"
    valid_values = np.delete(np.arange(100.0), 5)
    expected_lo, expected_hi = np.percentile(valid_values, (2, 98))
    assert look.lo == pytest.approx((expected_lo,) * 3) and look.hi == pytest.approx(
        (expected_hi,) * 3
    )
    assert look.gamma == 1.0  # the stretched median is 0.5: bright enough
    image = look.rgba(data, valid)
    assert image.shape == (12, 10, 4) and image.dtype == np.uint8
    assert (image[10:, :, 3] == 0).all() and (image[10:, :, :3] == 0).all()
    assert image[0, 5, 3] == 0 and (image[0, 5, :3] == 0).all()
    v = 55.0  # pixel (5, 5)
    expected = round((v - expected_lo) / (expected_hi - expected_lo) * 255)
    assert tuple(image[5, 5]) == (expected, expected, expected, 255)
    assert tuple(image[0, 0, :3]) == (0, 0, 0) and tuple(image[9, 9, :3]) == (255, 255, 255)


def test_each_band_has_its_own_stretch_and_band_order_follows_common_names() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, size=(40, 40))
    # bands given as blue, green, red (as a scene's asset may be): each with its own offset/scale
    data = np.stack([100 + 10 * base, 1000 + 50 * base, 5000 + 400 * base])
    bands = tuple(reversed(RGB_BANDS))
    look = Look.of(data, np.ones((40, 40), bool), bands)
    assert look is not None and look.bands == (2, 1, 0)
    image = look.rgba(data, np.ones((40, 40), bool)).astype(int)
    # one underlying brightness: the per-band stretch makes the three channels equal (grey)
    assert np.abs(image[..., 0] - image[..., 1]).max() <= 1
    assert np.abs(image[..., 1] - image[..., 2]).max() <= 1


def test_a_dark_scene_gets_a_gamma_that_lifts_its_median() -> None:
    rng = np.random.default_rng(1)
    values = rng.uniform(0, 1, size=(60, 60)) ** 2  # stretched median about 0.25: dark
    data, valid = np.stack([values] * 3), np.ones((60, 60), bool)
    look = Look.optical(data, valid)
    assert MIN_GAMMA < look.gamma < 1.0
    image = look.rgba(data, valid)
    assert abs(float(np.median(image[..., 0])) - TARGET_MEDIAN * 255) <= 2
    # a very dark scene: the gamma is bounded, not whatever would lift its median
    very_dark = np.stack([rng.exponential(1.0, size=(60, 60)) ** 3] * 3)
    assert Look.optical(very_dark, valid).gamma == MIN_GAMMA


def test_sar_is_vv_vh_and_their_difference_in_db_over_fixed_ranges() -> None:
    vv = np.array([[-25.0, 0.0, -12.5, -10.0, -40.0]])
    vh = np.array([[-30.0, -5.0, -17.5, -25.0, -20.0]])
    data, valid = np.stack([vv, vh]), np.array([[True, True, True, True, False]])
    look = Look.of(data, valid, SAR_BANDS)
    assert look is not None and look.kind == "sar" and look.gamma == 1.0
    assert (look.lo, look.hi) == ((-25.0, -30.0, 0.0), (0.0, -5.0, 15.0))
    assert SAR_RANGES_DB["VV-VH"] == (0.0, 15.0)
    image = look.rgba(data, valid)
    # each channel: (value - lo) / (hi - lo) * 255; VV - VH = 5 dB -> 85
    assert [tuple(p) for p in image[0, :4]] == [
        (0, 0, 85, 255),
        (255, 255, 85, 255),
        (128, 128, 85, 255),
        (153, 51, 255, 255),
    ]
    assert image[0, 4, 3] == 0  # nodata
    # the same dB values render the same whatever the scene: no per-scene statistics
    other = Look.of(data[:, :, :2], valid[:, :2], SAR_BANDS)
    assert other == look


def test_no_colour_bands_no_look_pngs_round_trip_quicklooks_are_small() -> None:
    nir = (replace(RGB_BANDS[0], name="nir", common_name="nir"),)
    assert Look.of(np.zeros((1, 4, 4)), np.ones((4, 4), bool), nir) is None
    rgba = np.zeros((40, 20, 4), np.uint8)
    rgba[..., 0], rgba[:10, :, 3] = 200, 255
    np.testing.assert_array_equal(_decode(png_bytes(rgba)), rgba)
    scene, valid = np.ones((3, 1030, 700)), np.ones((1030, 700), bool)
    quicklook = Look.optical(scene, valid).quicklook(scene, valid)
    assert quicklook.shape == (344, 234, 4)  # every 3rd row and column: at most 512 px
    empty = Look.optical(np.zeros((3, 4, 4)), np.zeros((4, 4), bool))  # no valid pixel
    assert (empty.rgba(np.zeros((3, 4, 4)), np.zeros((4, 4), bool))[..., 3] == 0).all()


# ---------------------------------------------------------------- ingestion and backfill


def _scenes(tmp_path: Path) -> list[pystac.Item]:
    data = tmp_path / "data"
    data.mkdir()
    return [
        raster_item("scene-a", _scene(data, "a", 100, 90, seed=1, hole=40)),
        raster_item("scene-b", _scene(data, "b", 64, 64, seed=2)),
    ]


def _expected_chip(tif: Path, window: dict[str, int]) -> np.ndarray:
    """The oracle: the scene's own 2-98 % look (all its valid pixels) applied to the window."""
    with rasterio.open(tif) as src:
        pixels = src.read().astype(np.float32)
    valid = (pixels != 0).any(axis=0)
    look = Look.optical(pixels, valid)
    rows = slice(window["row_off"], window["row_off"] + window["height"])
    cols = slice(window["col_off"], window["col_off"] + window["width"])
    return look.rgba(pixels[:, rows, cols], valid[rows, cols])


def _scene_file(root: Path, scene: str) -> Path:
    return root / "scenes" / scene / f"{scene}.json"


def test_ingested_chips_carry_a_thumbnail_asset_stretched_per_scene(
    checkpoint: Path, tmp_path: Path
) -> None:
    root = tmp_path / "catalog"
    catalog = static_catalog(root, _scenes(tmp_path))
    folder = root / "thumbnails"
    before = {s: json.loads(_scene_file(root, s).read_text()) for s in ("scene-a", "scene-b")}
    options = replace(OPTIONS, thumbnails=folder)
    report = Ingestor.from_checkpoint(checkpoint, options).run(
        items_from_file(catalog), CatalogSink(root)
    )
    assert report.items_encoded == 2 and report.chips_encoded > 0
    chip_files = sorted((root / "scenes-chips").glob("*/*.json"))
    assert len(chip_files) == report.chips_encoded
    transparent = 0
    for path in chip_files:
        chip = json.loads(path.read_text())
        asset = chip["assets"][THUMBNAIL]
        assert asset["roles"] == ["thumbnail"] and asset["type"] == "image/png"
        image = _decode(Path(asset["href"]))
        assert image.shape == (CHIP, CHIP, 4)
        scene = "a" if chip["id"].startswith("scene-a") else "b"
        window = chip["properties"]["cbir:chip"]["window"]
        np.testing.assert_array_equal(
            image, _expected_chip(tmp_path / "data" / f"{scene}.tif", window)
        )
        transparent += int((image[..., 3] == 0).any())
    assert transparent > 0  # chips over scene-a's nodata hole show it as transparent
    for scene in ("scene-a", "scene-b"):  # the scenes, rewritten in place, have a quicklook
        stored = json.loads(_scene_file(root, scene).read_text())
        quicklook = stored["assets"].pop(THUMBNAIL)
        assert quicklook["roles"] == ["thumbnail"] and Path(quicklook["href"]).is_relative_to(
            folder
        )
        assert _decode(Path(quicklook["href"])).shape[2] == 4
        assert stored["assets"] == before[scene]["assets"]  # the others kept as they were


def _ingest_without_thumbnails(store: Any, checkpoint: Path, tmp_path: Path) -> Any:
    """``store``, with scenes ingested before thumbnails existed."""
    scenes = _scenes(tmp_path)
    static_catalog(tmp_path / "catalog", scenes)
    collection = scenes[0].get_collection()
    store.create_collection(collection.to_dict(include_self_link=False))
    for item in scenes:
        item.make_asset_hrefs_absolute()
    store.upsert_items([i.to_dict(include_self_link=False) for i in scenes])
    stored = [pystac.Item.from_dict(store.get_item("scenes", i.id)) for i in scenes]
    Ingestor.from_checkpoint(checkpoint, OPTIONS).run(stored, StoreSink(store))
    return store


def _assert_thumbnails(chips: list[dict[str, Any]], tmp_path: Path) -> None:
    """Every chip has a thumbnail file: its window rendered with its scene's look."""
    assert chips
    for chip in chips:
        scene = "a" if chip["id"].startswith("scene-a") else "b"
        image = _decode(Path(chip["assets"][THUMBNAIL]["href"]))
        window = chip["properties"]["cbir:chip"]["window"]
        np.testing.assert_array_equal(
            image, _expected_chip(tmp_path / "data" / f"{scene}.tif", window)
        )


def _chip_dicts(store: Any) -> list[dict[str, Any]]:
    return [i.to_dict() for i in items_from_store(store, ["scenes-chips"])]


class _KilledAfter:
    """The store, with writes failing after ``n`` upserts (a run killed between scenes)."""

    def __init__(self, store: Any, n: int) -> None:
        self.store, self.left = store, n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def upsert_items(self, items: list[dict[str, Any]]) -> None:
        if self.left == 0:
            raise KeyboardInterrupt("killed")
        self.left -= 1
        self.store.upsert_items(items)


def test_backfill_gives_every_chip_a_thumbnail_resumes_and_is_idempotent(
    checkpoint: Path, tmp_path: Path, store_factory: StoreFactory
) -> None:
    store = _ingest_without_thumbnails(store_factory(), checkpoint, tmp_path)
    folder = tmp_path / "thumbs"
    try:
        chips = _chip_dicts(store)
        assert chips and not any(THUMBNAIL in c["assets"] for c in chips)
        with pytest.raises(KeyboardInterrupt):  # killed after the first scene was committed
            backfill(_KilledAfter(store, 1), folder, progress=False)
        first = [c for c in _chip_dicts(store) if THUMBNAIL in c["assets"]]
        assert first and len(first) < len(chips)
        # the committed scene's files (the killed scene's may be there too, named by no item)
        stamps = {
            p: p.stat().st_mtime_ns for p in (Path(c["assets"][THUMBNAIL]["href"]) for c in first)
        }

        resumed = backfill(store, folder, progress=False)
        assert (resumed.scenes_seen, resumed.scenes_done, resumed.errors) == (2, 1, [])
        assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())  # not redone
        chips = _chip_dicts(store)
        _assert_thumbnails(chips, tmp_path)
        for scene in ("scene-a", "scene-b"):
            assert Path(store.get_item("scenes", scene)["assets"][THUMBNAIL]["href"]).is_file()
        files = sorted(folder.rglob("*.png"))
        assert len(files) == len(chips) + 2
        stamps = {p: p.stat().st_mtime_ns for p in files}
        generation = store.generation()

        again = backfill(store, folder, progress=False)
        assert (again.scenes_done, again.files_written) == (0, 0)
        assert {p: p.stat().st_mtime_ns for p in folder.rglob("*.png")} == stamps
        assert store.generation() == generation  # nothing written to the store either
    finally:
        store.close()


def test_backfill_of_a_catalog_writes_the_item_files_in_place(
    checkpoint: Path, tmp_path: Path
) -> None:
    root = tmp_path / "catalog"
    catalog = static_catalog(root, _scenes(tmp_path))
    Ingestor.from_checkpoint(checkpoint, OPTIONS).run(items_from_file(catalog), CatalogSink(root))
    chip_files = sorted((root / "scenes-chips").glob("*/*.json"))
    before = {p: json.loads(p.read_text()) for p in chip_files}
    folder = root / "thumbnails"

    report = backfill(catalog, folder, progress=False)
    assert (report.scenes_done, report.errors) == (2, [])
    assert report.files_written == len(chip_files) + 2
    chips = [json.loads(p.read_text()) for p in chip_files]
    _assert_thumbnails(chips, tmp_path)
    for path, chip in zip(chip_files, chips, strict=True):  # only the asset was added
        chip["assets"].pop(THUMBNAIL)
        assert chip == before[path]
    for scene in ("scene-a", "scene-b"):
        asset = json.loads(_scene_file(root, scene).read_text())["assets"][THUMBNAIL]
        assert Path(asset["href"]).is_relative_to(folder)
    # the catalog still reads, and a second run finds nothing to do
    assert (
        len(list(pystac.Catalog.from_file(str(catalog)).get_items(recursive=True)))
        == len(chip_files) + 2
    )
    again = backfill(catalog, folder, progress=False)
    assert (again.scenes_done, again.files_written) == (0, 0)


def test_cli_thumbnails_and_the_api_serves_them(checkpoint: Path, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from stac_rscbir.api.app import create_api

    _ingest_without_thumbnails(SQLiteStore(tmp_path / "archive.db"), checkpoint, tmp_path).close()
    folder, db = tmp_path / "thumbs", str(tmp_path / "archive.db")
    runner = CliRunner()
    result = runner.invoke(app, ["thumbnails", str(folder), "--db", db])
    assert result.exit_code == 0, result.output
    assert "2 of 2 scenes" in result.output
    result = runner.invoke(app, ["thumbnails", str(folder), "--db", db])
    assert result.exit_code == 0 and "0 of 2 scenes" in result.output and "0 files" in result.output

    store = SQLiteStore(tmp_path / "archive.db")
    try:
        chip = _chip_dicts(store)[0]
        api = create_api(store, tmp_path / "index", asset_roots=[folder, tmp_path / "data"])
        client = TestClient(api.app)
        served = client.get(f"/collections/scenes-chips/items/{chip['id']}").json()
        href = served["assets"][THUMBNAIL]["href"]
        assert href.endswith(f"/items/{chip['id']}/assets/{THUMBNAIL}")
        response = client.get(href)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert response.content == Path(chip["assets"][THUMBNAIL]["href"]).read_bytes()
    finally:
        store.close()


def test_sar_chips_get_fixed_range_false_colour_from_the_backfill_and_the_api(
    tmp_path: Path,
) -> None:
    """A Sentinel-1 scene (VV and VH in dB, one asset each) cut into chips with no model: the
    backfill renders VV / VH / VV-VH over the fixed dB ranges, as the API does on request."""
    from fastapi.testclient import TestClient
    from rasterio.transform import from_origin

    from stac_rscbir.api.app import create_api
    from stac_rscbir.data.chips import chip_item, make_chips, scene_chip_collection_id

    from .stac_builders import make_item, write_cog

    rng = np.random.default_rng(3)
    db = rng.uniform(-30.0, -2.0, (2, 64, 64)).astype(np.float32)
    db[:, :20, :20] = np.nan  # nodata
    transform = from_origin(500_000, 5_300_000, 10, 10)
    assets = {}
    for band, layer in zip(("VV", "VH"), db, strict=True):
        path = write_cog(tmp_path / f"s1_{band}.tif", layer[None], transform, nodata=np.nan)
        assets[band] = {"href": path}
    scene = make_item("s1-scene", assets)
    for asset in scene.assets.values():
        asset.media_type = pystac.MediaType.GEOTIFF
    scene.collection_id = "sar"
    valid = np.isfinite(db).all(axis=0)
    chips, _ = make_chips(valid, transform, "EPSG:32633", size=CHIP, min_valid=0.5)
    chip_items = []
    for chip in chips:
        item = chip_item(scene, chip, href_base="https://x/collections/sar/items")
        item.collection_id = scene_chip_collection_id("sar")
        chip_items.append(item.to_dict(include_self_link=False))
    store = SQLiteStore(tmp_path / "archive.db")
    try:
        extent = pystac.Extent(
            pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
            pystac.TemporalExtent([[None, None]]),
        )
        for cid in ("sar", "sar-chips"):
            collection = pystac.Collection(cid, cid, extent, license="other")
            store.create_collection(collection.to_dict(include_self_link=False))
        store.upsert_items([scene.to_dict(include_self_link=False), *chip_items])
        folder = tmp_path / "thumbs"
        report = backfill(store, folder, progress=False)
        assert (report.scenes_done, report.errors) == (1, [])
        look = Look.of(db, valid, SAR_BANDS)
        for chip, d in zip(chips, chip_items, strict=True):
            stored = store.get_item("sar-chips", d["id"])
            image = _decode(Path(stored["assets"][THUMBNAIL]["href"]))
            rows = slice(chip.row_off, chip.row_off + CHIP)
            cols = slice(chip.col_off, chip.col_off + CHIP)
            np.testing.assert_array_equal(image, look.rgba(db[:, rows, cols], valid[rows, cols]))
        # on request (no stored thumbnail under the roots): the same look of the chip's window
        client = TestClient(create_api(store, tmp_path / "index", asset_roots=[tmp_path]).app)
        d = chip_items[0]
        served = client.get(f"/collections/sar-chips/items/{d['id']}/thumbnail")
        assert served.status_code == 200
        rows = slice(chips[0].row_off, chips[0].row_off + CHIP)
        cols = slice(chips[0].col_off, chips[0].col_off + CHIP)
        np.testing.assert_array_equal(
            _decode(served.content), look.rgba(db[:, rows, cols], valid[rows, cols])
        )
    finally:
        store.close()
