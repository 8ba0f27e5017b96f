"""Sensor profiles and the STAC item pixel reader (odc-stac over local COGs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
import rasterio
from pystac.extensions.eo import Band
from pystac.extensions.raster import RasterBand
from rasterio.transform import from_origin
from rasterio.warp import transform_bounds

from stac_rscbir.data.bigearthnet import S1_BANDS, S2_BANDS, S2_RESOLUTION_M
from stac_rscbir.data.profiles import PROFILES, BandSpec, SensorProfile, profile_for_bands
from stac_rscbir.data.reader import ItemReadError, read_item
from tests.conftest import require
from tests.stac_builders import CRS, X0, Y0, ben_item, make_item, write_cog_at

# odc-stac / affine 3 / shapely 2 deprecations inside the libraries, not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
]

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
BEN = SHARED / "bigearthnet" / "georeferenced"
LANDSAT = SHARED / "rasters" / "landsat8" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"

SIDE_M = 600  # synthetic scene: 60 x 60 px at 10 m
S2 = PROFILES["sentinel2-l2a"]
# Earth Search v1 asset keys for the 12 model bands, in S2_BANDS order.
ES_KEYS = (
    "coastal",
    "blue",
    "green",
    "red",
    "rededge1",
    "rededge2",
    "rededge3",
    "nir",
    "nir08",
    "nir09",
    "swir16",
    "swir22",
)
SCALE, OFFSET = 1e-4, -0.1


def landsat_eo() -> list[Band]:
    """Landsat-8 OLI bands 2, 3, 4 as ``eo:bands``."""
    return [
        Band.create(name=f"B{n}", common_name=c) for n, c in ((2, "blue"), (3, "green"), (4, "red"))
    ]


def ramp(n: int, start: int) -> np.ndarray:
    return (start + np.arange(n * n, dtype=np.uint16)).reshape(n, n)


@pytest.fixture
def s2_item(tmp_path: Path) -> pystac.Item:
    """Earth-Search-style S2 L2A item: 12 single-band COGs at 10/20/60 m, scale/offset, nodata 0,
    an SCL layer with a cloud block; 10 m bands are ramps, coarser bands constant 1000 + 100 i."""
    assets: dict[str, dict[str, Any]] = {}
    for i, (name, key) in enumerate(zip(S2_BANDS, ES_KEYS, strict=True)):
        res = S2_RESOLUTION_M[name]
        n = SIDE_M // res
        arr = ramp(n, 1000 * (i + 1)) if res == 10 else np.full((n, n), 1000 + 100 * i, np.uint16)
        if name == "B02":
            arr[:5, :7] = 0  # a nodata corner
        spec = S2.bands[i]
        assets[key] = {
            "href": write_cog_at(tmp_path / f"{key}.tif", arr, res, nodata=0),
            "eo": [Band.create(name=name, common_name=spec.common_name)],
            "raster": [
                RasterBand.create(nodata=0, scale=SCALE, offset=OFFSET, spatial_resolution=res)
            ],
        }
    scl = np.full((30, 30), 4, np.uint8)  # 4 = vegetation
    scl[20:25, 10:15] = 9  # cloud, high probability: 10 m rows 40:50, cols 20:30
    scl[0, 29] = 3  # cloud shadow: 10 m rows 0:2, cols 58:60
    assets["scl"] = {"href": write_cog_at(tmp_path / "scl.tif", scl, 20, nodata=0)}
    return make_item("s2-synthetic", assets)


def expected_10m(i: int) -> np.ndarray:
    return ramp(60, 1000 * (i + 1)).astype(np.float64) * SCALE + OFFSET


# --- profiles -------------------------------------------------------------------------------


def test_profiles_match_the_benchmark_band_order() -> None:
    assert S2.band_names == S2_BANDS
    assert [b.common_name for b in S2.bands] == [
        "coastal",
        "blue",
        "green",
        "red",
        "rededge",
        "rededge",
        "rededge",
        "nir",
        "nir08",
        "nir09",
        "swir16",
        "swir22",
    ]
    assert PROFILES["sentinel1-grd"].band_names == S1_BANDS
    assert PROFILES["sentinel1-grd"].sar_db
    assert S2.cloud_mask == "scl" and set(S2.cloud_classes) == {3, 8, 9, 10}
    assert PROFILES["landsat-8-9"].resolution == 30
    assert PROFILES["rgb"].band_names == ("red", "green", "blue")


def test_profile_for_bands() -> None:
    assert profile_for_bands(list(S2_BANDS)) is S2
    assert profile_for_bands(["VV", "VH"]) is PROFILES["sentinel1-grd"]
    sub = profile_for_bands(["B04", "B03", "B02"])
    assert sub.band_names == ("B04", "B03", "B02")
    assert sub.resolution == 10 and sub.cloud_mask == "scl"
    assert profile_for_bands(["blue"]).name.startswith("rgb")  # smallest holder wins
    with pytest.raises(ValueError, match=r"unknown bands \['B99'\]"):
        profile_for_bands(["B02", "B99"])
    with pytest.raises(ValueError, match="not all in one sensor profile"):
        profile_for_bands(["B02", "VV"])
    with pytest.raises(ValueError, match="repeats"):
        SensorProfile("x", (BandSpec("a"), BandSpec("a")), 10.0)


# --- reading --------------------------------------------------------------------------------


def test_s2_bands_on_one_10m_grid_in_physical_units(s2_item: pystac.Item) -> None:
    px = read_item(s2_item, S2)
    assert px.bands == S2_BANDS and px.item_id == "s2-synthetic"
    assert px.data.dtype == np.float32 and px.data.shape == (12, 60, 60)
    assert px.crs == CRS
    assert px.transform == from_origin(X0, Y0, 10, 10)
    for i, name in enumerate(S2_BANDS):
        if S2_RESOLUTION_M[name] == 10:
            want = expected_10m(i)
            if name == "B02":
                want[:5, :7] = np.nan
            np.testing.assert_allclose(px.data[i], want, rtol=0, atol=1e-6)
        else:  # constant coarse bands stay constant under bilinear resampling
            np.testing.assert_allclose(px.data[i], (1000 + 100 * i) * SCALE + OFFSET, atol=1e-6)


def test_nodata_and_clouds_are_invalid(s2_item: pystac.Item) -> None:
    px = read_item(s2_item, S2)
    expected = np.ones((60, 60), bool)
    expected[:5, :7] = False  # B02 nodata
    expected[40:50, 20:30] = False  # SCL 9
    expected[0:2, 58:60] = False  # SCL 3
    np.testing.assert_array_equal(px.valid, expected)
    assert np.isnan(px.data[1, :5, :7]).all()
    assert np.isfinite(px.data[:, 40:50, 20:30]).all()  # cloudy pixels keep their values


def test_bbox_reads_the_matching_slice(s2_item: pystac.Item) -> None:
    full = read_item(s2_item, S2)
    # rows 12..35, cols 20..43 of the 10 m grid, shrunk by 1 m so no edge snaps outwards
    left, top = X0 + 20 * 10 + 1, Y0 - 12 * 10 - 1
    right, bottom = X0 + 44 * 10 - 1, Y0 - 36 * 10 + 1
    bbox = transform_bounds(CRS, "EPSG:4326", left, bottom, right, top)
    part = read_item(s2_item, S2, bbox=bbox)
    col, row = ~full.transform @ (part.transform.c, part.transform.f)
    r, c = round(row), round(col)
    h, w = part.valid.shape
    assert r <= 12 and c <= 20 and r + h >= 36 and c + w >= 44  # covers the box (reprojected)
    assert h < 60 and w < 60
    np.testing.assert_array_equal(part.data, full.data[:, r : r + h, c : c + w])
    np.testing.assert_array_equal(part.valid, full.valid[r : r + h, c : c + w])


def test_explicit_crs_and_resolution(s2_item: pystac.Item) -> None:
    px = read_item(s2_item, S2, resolution=20, crs="epsg:32633")
    assert px.data.shape == (12, 30, 30) and px.crs == CRS
    assert px.transform == from_origin(X0, Y0, 20, 20)
    np.testing.assert_allclose(px.data[4], 1400 * SCALE + OFFSET, atol=1e-6)  # B05 native


def test_sub_selection_profile_reads_only_those_bands(s2_item: pystac.Item) -> None:
    px = read_item(s2_item, profile_for_bands(["B08", "B04"]))
    assert px.bands == ("B08", "B04")
    np.testing.assert_allclose(px.data[0], expected_10m(7), atol=1e-6)
    np.testing.assert_allclose(px.data[1], expected_10m(3), atol=1e-6)


def test_relative_hrefs_of_a_saved_item(s2_item: pystac.Item, tmp_path: Path) -> None:
    for asset in s2_item.assets.values():
        asset.href = Path(asset.href).name
    s2_item.set_self_href(str(tmp_path / "item.json"))
    s2_item.save_object(include_self_link=True)
    px = read_item(pystac.Item.from_file(tmp_path / "item.json"), S2)
    np.testing.assert_allclose(px.data[3], expected_10m(3), atol=1e-6)


def test_planetary_computer_keys_and_multiband_eo_bands(tmp_path: Path) -> None:
    """Asset keys equal to model names (PC style) and a multi-band asset found by eo:bands."""
    b02 = write_cog_at(tmp_path / "b02.tif", ramp(20, 1), 10)
    stack = np.stack([ramp(20, 500), ramp(20, 900)])  # bands B03, B04 in one file
    item = make_item(
        "pc",
        {
            "B02": {"href": b02},
            "stack": {
                "href": write_cog_at(tmp_path / "stack.tif", stack, 10),
                "eo": [Band.create(name="B03"), Band.create(name="B04")],
            },
        },
    )
    px = read_item(item, profile_for_bands(["B04", "B02", "B03"]))
    np.testing.assert_array_equal(px.data, np.stack([stack[1], ramp(20, 1), stack[0]]))
    assert px.valid.all()  # no nodata declared anywhere


def test_rgb_by_common_name_at_native_resolution(tmp_path: Path) -> None:
    """Landsat-like 3-band asset (B2, B3, B4 = blue, green, red) at 30 m, off the 30 m lattice."""
    arr = np.stack([ramp(16, 100), ramp(16, 400), ramp(16, 700)])
    path = write_cog_at(
        tmp_path / "ls.tif", arr, 30, x0=717_345.0, y0=-2_776_995.0, crs="EPSG:32621"
    )
    eo = [
        Band.create(name=f"B{n}", common_name=c) for n, c in ((2, "blue"), (3, "green"), (4, "red"))
    ]
    item = make_item("ls", {"image": {"href": path, "eo": eo}}, crs="EPSG:32621")
    px = read_item(item, PROFILES["rgb"])
    assert px.transform == from_origin(717_345.0, -2_776_995.0, 30, 30)
    np.testing.assert_array_equal(px.data, arr[::-1].astype(np.float32))
    # a single-band "red" asset (common name) wins over the band of the same name in the stack
    red = write_cog_at(
        tmp_path / "b4.tif", ramp(16, 5), 30, x0=717_345.0, y0=-2_776_995.0, crs="EPSG:32621"
    )
    item = make_item(
        "ls2",
        {"visual": {"href": path, "eo": eo}, "B04": {"href": red, "eo": [eo[2]]}},
        crs="EPSG:32621",
    )
    px = read_item(item, PROFILES["rgb"])
    np.testing.assert_array_equal(px.data[0], ramp(16, 5))
    np.testing.assert_array_equal(px.data[1:], arr[1::-1])


def sar_item(tmp_path: Path, values: np.ndarray, unit: str | None = None) -> pystac.Item:
    raster = [RasterBand.create(unit=unit) if unit else RasterBand.create() for _ in range(2)]
    return make_item(
        "s1",
        {
            "image": {
                "href": write_cog_at(tmp_path / "s1.tif", values, 10),
                "raster": raster,
                "sar": ["VV", "VH"],
            }
        },
    )


def test_sar_linear_power_to_db(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lin = rng.uniform(1e-4, 0.5, (2, 24, 24)).astype(np.float32)
    lin[1, 0, 0] = 0.0  # no dB value -> invalid
    px = read_item(sar_item(tmp_path, lin), PROFILES["sentinel1-grd"])
    assert px.bands == ("VV", "VH")
    want = 10 * np.log10(np.maximum(lin, 1e-30).astype(np.float64))
    np.testing.assert_allclose(px.data[:, 1:, 1:], want[:, 1:, 1:], rtol=1e-5)
    assert not px.valid[0, 0] and px.valid.sum() == 24 * 24 - 1


def test_sar_db_kept_and_unit_decides(tmp_path: Path) -> None:
    db = np.full((2, 8, 8), -12.5, np.float32)
    px = read_item(sar_item(tmp_path, db), PROFILES["sentinel1-grd"])  # negatives: already dB
    np.testing.assert_array_equal(px.data, db)
    pos = np.full((2, 8, 8), 3.0, np.float32)
    px = read_item(sar_item(tmp_path, pos, unit="dB"), PROFILES["sentinel1-grd"])
    np.testing.assert_array_equal(px.data, pos)
    px = read_item(sar_item(tmp_path, pos, unit="amplitude"), PROFILES["sentinel1-grd"])
    np.testing.assert_allclose(px.data, 20 * np.log10(3.0), rtol=1e-6)


def test_missing_band(s2_item: pystac.Item) -> None:
    del s2_item.assets["rededge2"]
    with pytest.raises(ItemReadError, match=r"'B06'.*rededge2.*assets: coastal, blue") as err:
        read_item(s2_item, S2)
    assert err.value.kind == "missing-band" and err.value.item_id == "s2-synthetic"


def test_unreadable_asset(s2_item: pystac.Item, tmp_path: Path) -> None:
    # raster:bands complete: found while loading
    s2_item.assets["nir"].href = str(tmp_path / "gone.tif")
    with pytest.raises(ItemReadError, match="'nir'") as err:
        read_item(s2_item, S2)
    assert err.value.kind == "unreadable-asset"
    # the header opens, the pixels do not (truncated file)
    s2_item.assets["nir"].href = str(tmp_path / "nir.tif")
    blue = Path(s2_item.assets["blue"].href)
    blue.write_bytes(blue.read_bytes()[:-2000])
    with pytest.raises(ItemReadError, match=r"asset 'blue' \(.*blue\.tif\)") as err:
        read_item(s2_item, S2)
    assert err.value.kind == "unreadable-asset"
    # no raster:bands: found while reading the header
    text = tmp_path / "notes.tif"
    text.write_text("not a raster")
    item = make_item("bad", {"B02": {"href": write_cog_at(tmp_path / "ok.tif", ramp(4, 1), 10)}})
    item.assets["B02"].href = str(text)
    with pytest.raises(ItemReadError, match=r"'B02'.*notes\.tif") as err:
        read_item(item, profile_for_bands(["B02"]))
    assert err.value.kind == "unreadable-asset"


def test_all_nodata(tmp_path: Path) -> None:
    path = write_cog_at(tmp_path / "empty.tif", np.zeros((8, 8), np.uint16), 10, nodata=0)
    with pytest.raises(ItemReadError, match=r"\['B02'\] have no data") as err:
        read_item(make_item("empty", {"B02": {"href": path}}), profile_for_bands(["B02"]))
    assert err.value.kind == "all-nodata"


def test_bad_crs(tmp_path: Path) -> None:
    path = write_cog_at(tmp_path / "b02.tif", ramp(8, 1), 10)
    item = make_item("nocrs", {"B02": {"href": path}}, crs=None)
    with pytest.raises(ItemReadError, match="proj:code") as err:
        read_item(item, profile_for_bands(["B02"]))
    assert err.value.kind == "bad-crs"
    px = read_item(item, profile_for_bands(["B02"]), crs=CRS)  # a given CRS is enough
    np.testing.assert_array_equal(px.data[0], ramp(8, 1))
    item.properties["proj:code"] = "EPSG:999999"
    with pytest.raises(ItemReadError, match="EPSG:999999") as err:
        read_item(item, profile_for_bands(["B02"]))
    assert err.value.kind == "bad-crs"


# --- real data in ../shared -----------------------------------------------------------------


@pytest.mark.shared
def test_bigearthnet_s2_mixed_resolution_patches() -> None:
    from stac_rscbir.data.bigearthnet import read_s2_patch

    require(BEN.exists(), f"BigEarthNet georeferenced patches not found at {BEN}")
    patches = sorted((BEN / "BigEarthNet-S2-Example").iterdir())
    assert patches
    for patch in patches:
        px = read_item(ben_item(patch, S2_BANDS), S2)
        assert px.data.shape == (12, 120, 120) and px.valid.all()
        with rasterio.open(patch / f"{patch.name}_B02.tif") as src:
            assert px.transform == src.transform and px.crs == src.crs.to_string()
        for i, name in enumerate(S2_BANDS):
            if S2_RESOLUTION_M[name] == 10:
                with rasterio.open(patch / f"{patch.name}_{name}.tif") as src:
                    np.testing.assert_array_equal(px.data[i], src.read(1).astype(np.float32))
        # The benchmark reader that trains the models resamples the 20/60 m bands the same way
        # (bilinear onto the 10 m grid): equal up to GDAL's rounding to whole DN.
        np.testing.assert_allclose(px.data, read_s2_patch(patch), rtol=0, atol=1)


@pytest.mark.shared
def test_bigearthnet_s1_patch_in_db() -> None:
    require(BEN.exists(), f"BigEarthNet georeferenced patches not found at {BEN}")
    patches = sorted((BEN / "BigEarthNet-S1-Example").iterdir())
    assert patches
    for patch in patches:
        px = read_item(ben_item(patch, S1_BANDS), PROFILES["sentinel1-grd"])
        assert px.data.shape == (2, 120, 120) and px.valid.all()
        for i, name in enumerate(S1_BANDS):  # stored in dB (negative): kept as is
            with rasterio.open(patch / f"{patch.name}_{name}.tif") as src:
                np.testing.assert_array_equal(px.data[i], src.read(1))
                assert px.transform == src.transform


@pytest.mark.shared
def test_landsat8_scene_as_rgb() -> None:
    require(LANDSAT.exists(), f"Landsat-8 scene clip not found at {LANDSAT}")
    eo = [
        Band.create(name=f"B{n}", common_name=c) for n, c in ((2, "blue"), (3, "green"), (4, "red"))
    ]
    item = make_item("landsat8", {"image": {"href": LANDSAT, "eo": eo}}, crs="EPSG:32621")
    item.assets["image"].media_type = pystac.MediaType.GEOTIFF
    px = read_item(item, PROFILES["rgb"])
    with rasterio.open(LANDSAT) as src:
        ref = src.read()
        assert px.transform == src.transform
    assert px.data.shape == ref.shape == (3, 1860, 2041)
    np.testing.assert_array_equal(px.data, ref[::-1].astype(np.float32))
