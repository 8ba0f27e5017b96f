"""Chipping scenes into model-sized windows and the Items of the derived chip collection."""

from __future__ import annotations

import datetime as dt
import itertools

import numpy as np
import pystac
import pytest
import rasterio.transform
from affine import Affine
from pyproj import Transformer
from rasterio.windows import Window
from shapely.geometry import MultiPolygon, Point, Polygon, shape

from stac_rscbir.data.chips import (
    Chip,
    chip_collection,
    chip_id,
    chip_item,
    chip_pixels,
    chip_windows,
    is_patch,
    make_chips,
    scene_chip_collection_id,
)
from stac_rscbir.extension.cbir import CBIRExtension, CBIRModel
from stac_rscbir.extension.validation import cbir_errors, schema_errors, validate

# A Sentinel-2 tile (T33UUP-like, 10 m, EPSG:32633) and the Landsat-8 scene of the chip example.
S2 = (Affine(10.0, 0.0, 399960.0, 0.0, -10.0, 5900040.0), "EPSG:32633")
L8 = (Affine(30.0, 0.0, 717345.0, 0.0, -30.0, -2776995.0), "EPSG:32621")


def coverage(height: int, width: int, size: int, stride: int | None = None) -> np.ndarray:
    count = np.zeros((height, width), dtype=int)
    for r, c in chip_windows(height, width, size, stride):
        count[r : r + size, c : c + size] += 1
    return count


def scene_item(item_id: str = "S2B_33UUP_20200601_0_L2A", **props: object) -> pystac.Item:
    properties = {
        "platform": "sentinel-2b",
        "constellation": "sentinel-2",
        "instruments": ["msi"],
        "gsd": 10,
        "eo:cloud_cover": 12.5,
        **props,
    }
    return pystac.Item(
        item_id,
        {"type": "Point", "coordinates": [13.5, 53.0]},
        [13.5, 53.0, 13.5, 53.0],
        dt.datetime(2020, 6, 1, 10, 15, tzinfo=dt.UTC),
        properties,
        collection=None,
    )


def item_problems(item: pystac.Item) -> list[str]:
    d = item.to_dict(include_self_link=False)
    return schema_errors(d) + cbir_errors(d)


# -- windows -----------------------------------------------------------------------------------


def test_windows_tile_exact_multiple_once_row_major() -> None:
    wins = chip_windows(240, 360, 120)
    assert wins == [(0, 0), (0, 120), (0, 240), (120, 0), (120, 120), (120, 240)]
    assert (coverage(240, 360, 120) == 1).all()


def test_last_windows_shifted_back_to_the_edge() -> None:
    wins = chip_windows(250, 300, 120)
    rows = sorted({r for r, _ in wins})
    cols = sorted({c for _, c in wins})
    assert rows == [0, 120, 130] and cols == [0, 120, 180]
    count = coverage(250, 300, 120)
    assert (count >= 1).all()
    assert all(r + 120 <= 250 and c + 120 <= 300 for r, c in wins)
    assert wins == sorted(wins)


@pytest.mark.parametrize(("h", "w", "size", "stride"), [(500, 333, 128, 64), (128, 200, 128, 100)])
def test_overlapping_stride_covers_every_pixel(h: int, w: int, size: int, stride: int) -> None:
    wins = chip_windows(h, w, size, stride)
    assert (coverage(h, w, size, stride) >= 1).all()
    assert len(set(wins)) == len(wins)
    rows = sorted({r for r, _ in wins})
    assert all(b - a <= stride for a, b in itertools.pairwise(rows))
    assert rows[-1] == h - size


def test_scene_exactly_chip_sized_is_one_window() -> None:
    assert chip_windows(120, 120, 120) == [(0, 0)]


@pytest.mark.parametrize(("h", "w", "dim"), [(100, 500, "height"), (500, 119, "width")])
def test_too_small_scene_names_the_sizes(h: int, w: int, dim: str) -> None:
    n = min(h, w)
    with pytest.raises(ValueError, match=rf"{dim} of {n} px is smaller than .* 120 px"):
        chip_windows(h, w, 120)


@pytest.mark.parametrize("stride", [0, -3, 121])
def test_bad_stride_rejected(stride: int) -> None:
    with pytest.raises(ValueError, match="stride"):
        chip_windows(500, 500, 120, stride)


# -- georeferencing ----------------------------------------------------------------------------


@pytest.mark.parametrize(("grid", "size"), [(S2, 120), (L8, 256)])
def test_chip_transform_and_corners_follow_the_scene_grid(
    grid: tuple[Affine, str], size: int
) -> None:
    transform, crs = grid
    kept, dropped = make_chips(np.ones((1000, 1100), bool), transform, crs, size)
    assert not dropped
    for chip in kept:
        assert chip.transform == transform @ Affine.translation(chip.col_off, chip.row_off)
        r0, c0, r1, c1 = chip.row_off, chip.col_off, chip.row_off + size, chip.col_off + size
        # outer corners: rasterio's xy with offset="ul" of the window's corner pixels
        xs, ys = rasterio.transform.xy(transform, [r0, r0, r1, r1], [c0, c1, c1, c0], offset="ul")
        np.testing.assert_allclose(chip.corners_native(), np.column_stack([xs, ys]), atol=1e-6)
        # the chip's pixel centres are the scene's
        assert rasterio.transform.xy(chip.transform, 5, 7) == pytest.approx(
            rasterio.transform.xy(transform, r0 + 5, c0 + 7)
        )
        minx, miny, maxx, maxy = chip.geometry_native().bounds
        step = abs(transform.a) * size
        assert (maxx - minx, maxy - miny) == pytest.approx((step, step))
        assert chip.window == Window(c0, r0, size, size)
        assert chip.crs == crs and chip.scene_shape == (1000, 1100)


@pytest.mark.parametrize("grid", [S2, L8])
def test_wgs84_geometry_matches_pyproj_corners(grid: tuple[Affine, str]) -> None:
    transform, crs = grid
    chip = Chip.from_scene(transform, crs, 256, 512, 256, 256)
    to_wgs = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    geom = chip.geometry_wgs84()
    assert isinstance(geom, Polygon) and geom.is_valid and geom.exterior.is_ccw
    ring = np.asarray(geom.exterior.coords)
    for x, y in chip.corners_native():
        lon, lat = to_wgs.transform(x, y)
        assert np.min(np.hypot(ring[:, 0] - lon, ring[:, 1] - lat)) < 1e-7
    cx, cy = chip.transform @ (128, 128)
    assert geom.contains(Point(*to_wgs.transform(cx, cy)))
    lon, lat = to_wgs.transform(*np.asarray(chip.corners_native()).T)
    assert chip.bbox_wgs84 == pytest.approx([min(lon), min(lat), max(lon), max(lat)], abs=1e-7)
    # densified ring: 4 corners + 4 points per edge, closed
    assert len(ring) == 4 * 5 + 1
    assert len(chip.geometry_wgs84(densify_pts=0).exterior.coords) == 5


def test_landsat_chip_matches_the_published_example_footprint() -> None:
    chip = Chip.from_scene(*L8, row_off=256, col_off=512, height=256, width=256)
    assert list(chip.transform)[:6] == [30, 0, 732705, 0, -30, -2784675]
    assert chip.bbox_wgs84 == pytest.approx(
        [-54.691328, -25.22945, -54.613836, -25.158942], abs=1e-6
    )


def test_chip_across_the_antimeridian_is_split() -> None:
    # UTM zone 60 at the equator: lon 180 lies near easting 834 km
    chip = Chip.from_scene(Affine(10, 0, 833000, 0, -10, 1000), "EPSG:32660", 0, 0, 256, 256)
    geom = chip.geometry_wgs84()
    assert isinstance(geom, MultiPolygon) and len(geom.geoms) == 2
    west, south, east, north = chip.bbox_wgs84
    assert west > 179.9 and east < -179.9 and south < 0 < north
    assert all(-180 <= x <= 180 for p in geom.geoms for x, _ in p.exterior.coords)
    assert item_problems(chip_item(scene_item(), chip)) == []


# -- valid fraction, pixels, patches ----------------------------------------------------------


def test_valid_fraction_filters_mostly_nodata_chips() -> None:
    valid = np.ones((200, 300), bool)
    valid[:100, :100] = False  # chip (0, 0) all nodata
    valid[:100, 100:105] = False  # chip (0, 100): 5 of 100 columns -> 0.95
    valid[100:, 200:215] = False  # chip (100, 200): 0.85
    kept, dropped = make_chips(valid, *S2, size=100, min_valid=0.9)
    fractions = {(c.row_off, c.col_off): c.valid_fraction for c in kept + dropped}
    assert fractions == pytest.approx(
        {
            (0, 0): 0.0,
            (0, 100): 0.95,
            (0, 200): 1.0,
            (100, 0): 1.0,
            (100, 100): 1.0,
            (100, 200): 0.85,
        }
    )
    assert [(c.row_off, c.col_off) for c in dropped] == [(0, 0), (100, 200)]
    assert len(kept) == 4
    for chip in kept + dropped:
        assert chip.valid_fraction == pytest.approx(chip_pixels(valid, chip).mean())
    kept_all, dropped_none = make_chips(valid, *S2, size=100, min_valid=0.0)
    assert len(kept_all) == 6 and not dropped_none


def test_make_chips_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        make_chips(np.ones((2, 200, 200), bool), *S2, size=100)
    with pytest.raises(ValueError, match="min_valid"):
        make_chips(np.ones((200, 200), bool), *S2, size=100, min_valid=1.5)


def test_chip_pixels_slices_bands_window() -> None:
    data = np.arange(3 * 250 * 300, dtype=np.float32).reshape(3, 250, 300)
    kept, _ = make_chips(np.ones((250, 300), bool), *S2, size=120)
    for chip in kept:
        px = chip_pixels(data, chip)
        assert px.shape == (3, 120, 120)
        np.testing.assert_array_equal(
            px, data[:, chip.window.toslices()[0], chip.window.toslices()[1]]
        )
    outside = Chip.from_scene(*S2, row_off=200, col_off=0, height=120, width=120)
    with pytest.raises(ValueError, match="outside"):
        chip_pixels(data, outside)


@pytest.mark.parametrize(
    ("h", "w", "size", "expected"),
    [
        (120, 120, 120, True),
        (128, 128, 120, True),
        (120, 132, 120, True),
        (256, 256, 120, False),
        (100, 120, 120, False),
        (10980, 10980, 120, False),
    ],
)
def test_is_patch(h: int, w: int, size: int, expected: bool) -> None:
    assert is_patch(h, w, size) is expected


# -- chip Items and collection -----------------------------------------------------------------


def test_chip_items_validate_round_trip_and_link_the_scene() -> None:
    scene = scene_item()
    scene.set_self_href("https://example.com/collections/s2/items/S2B_33UUP_20200601_0_L2A")
    scene.add_asset("visual", pystac.Asset("https://example.com/visual.tif"))
    valid = np.ones((700, 500), bool)
    kept, _ = make_chips(valid, *S2, size=256, stride=200)
    items = [chip_item(scene, chip, source_asset="visual") for chip in kept]
    ids = [it.id for it in items]
    assert len(set(ids)) == len(ids) == len(kept)
    for chip, item in zip(kept, items, strict=True):
        assert (
            item.id
            == chip_id(scene.id, chip)
            == (f"{scene.id}-chip-r{chip.row_off}-c{chip.col_off}")
        )
        assert item_problems(item) == []
        validate(item)
        back = pystac.Item.from_dict(item.to_dict())
        assert back.to_dict() == item.to_dict()
        ext = CBIRExtension.ext(back)
        assert ext.chip is not None
        assert ext.chip.window == (chip.col_off, chip.row_off, chip.width, chip.height)
        assert ext.chip.source_asset == "visual"
        assert ext.chip.properties["source_shape"] == [700, 500]
        (link,) = back.get_links("derived_from")
        assert link.href == scene.get_self_href()
        assert back.assets == {}
        props = back.properties
        assert props["proj:code"] == "EPSG:32633"
        assert props["proj:shape"] == [256, 256]
        assert props["proj:transform"] == list(chip.transform)[:6]
        assert props["platform"] == "sentinel-2b" and props["instruments"] == ["msi"]
        assert props["constellation"] == "sentinel-2" and props["gsd"] == 10
        assert "eo:cloud_cover" not in props
        assert back.datetime == scene.datetime
        footprint = shape(back.geometry)
        assert footprint.equals_exact(chip.geometry_wgs84(), tolerance=1e-7)
        assert back.bbox == pytest.approx(chip.bbox_wgs84, abs=1e-7)


def test_chip_item_without_self_href_and_with_time_range() -> None:
    scene = scene_item(start_datetime="2020-06-01T10:00:00Z", end_datetime="2020-06-01T10:30:00Z")
    scene.properties["proj:shape"] = [300, 300]
    chip = Chip.from_scene(*S2, row_off=0, col_off=120, height=120, width=120)
    item = chip_item(scene, chip)
    assert item.get_links("derived_from")[0].href == f"./{scene.id}.json"
    assert item.properties["start_datetime"] == "2020-06-01T10:00:00Z"
    assert item.properties["end_datetime"] == "2020-06-01T10:30:00Z"
    # no scene grid on the chip: source_shape comes from the scene's proj:shape
    assert CBIRExtension.ext(item).chip.properties["source_shape"] == [300, 300]  # type: ignore[union-attr]
    assert "source_asset" not in item.properties["cbir:chip"]
    assert item_problems(item) == []
    template = "https://api/collections/{collection}/items/{id}"
    with pytest.raises(ValueError, match="collection id"):
        chip_item(scene, chip, href_base=template)
    scene.collection_id = "sentinel-2-l2a"
    api = chip_item(scene, chip, href_base=template)
    assert api.get_links("derived_from")[0].href == (
        f"https://api/collections/sentinel-2-l2a/items/{scene.id}"
    )
    plain = chip_item(scene, chip, href_base="https://host/items/")
    assert plain.get_links("derived_from")[0].href == f"https://host/items/{scene.id}"


def test_chip_collection() -> None:
    scenes = pystac.Collection(
        "sentinel-2-l2a",
        "Sentinel-2 L2A scenes",
        pystac.Extent(
            pystac.SpatialExtent([[12.0, 52.0, 15.0, 54.0]]),
            pystac.TemporalExtent([[dt.datetime(2020, 1, 1, tzinfo=dt.UTC), None]]),
        ),
        license="proprietary",
    )
    assert scene_chip_collection_id(scenes.id) == "sentinel-2-l2a-chips"
    model = CBIRModel.create(
        "s2-milan-64", "1.0.0", 64, ["B02", "B03", "B04"], chip_size=(120, 120)
    )
    chips = chip_collection(scenes, chip_size=120, models=[model])
    assert chips.id == "sentinel-2-l2a-chips"
    assert chips.extent.to_dict() == scenes.extent.to_dict()
    assert chips.extent is not scenes.extent
    assert CBIRExtension.has_extension(chips)
    assert chips.get_links("derived_from")[0].href == "../sentinel-2-l2a/collection.json"
    validate(chips)
    back = pystac.Collection.from_dict(chips.to_dict())
    assert back.to_dict() == chips.to_dict()
    # chips added to it keep validating
    chip = Chip.from_scene(*S2, row_off=0, col_off=0, height=120, width=120)
    item = chip_item(scene_item(), chip)
    chips.add_item(item)
    chips.normalize_hrefs("https://example.com/sentinel-2-l2a-chips")
    assert item.collection_id == "sentinel-2-l2a-chips"
    assert item_problems(item) == []
    bare = chip_collection(scenes)
    assert not CBIRExtension.has_extension(bare)
    assert schema_errors(bare.to_dict(include_self_link=False)) == []
