"""BigEarthNet patch readers: band order, the 120x120 grid, S1 channels, labels, errors, stats."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from rasterio import Affine
from rasterio.errors import NotGeoreferencedWarning

from stac_rscbir.data.bigearthnet import (
    LABELS_19,
    LABELS_43,
    PATCH_SIZE,
    S1_BANDS,
    S2_BANDS,
    S2_RESOLUTION_M,
    BandStats,
    BenPatches,
    band_file,
    concat,
    load_ben,
    load_ben_v1,
    load_ben_v2,
    multi_hot,
    read_patch,
    read_s1_patch,
    read_s2_patch,
)
from stac_rscbir.models.backbones import build_backbone
from stac_rscbir.models.config import ModelConfig
from stac_rscbir.models.encoder import HashEncoder
from stac_rscbir.models.methods import METHODS
from stac_rscbir.models.training import TrainConfig, encode, train_hashing

from .conftest import require

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
BEN_V1 = DATASETS / "bigearthnet" / "BENv1"
BEN_V2 = DATASETS / "bigearthnet" / "BENv2"


def _raw(folder: Path, band: str) -> np.ndarray:
    """A band file exactly as stored, float64."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # the benchmark TIFFs have no CRS
        with rasterio.open(band_file(folder, band)) as src:
            return src.read(1).astype(np.float64)


def _bilinear(source: np.ndarray) -> np.ndarray:
    """Half-pixel-centred bilinear upsampling to the patch grid (independent reference)."""
    t = torch.from_numpy(source)[None, None]
    return F.interpolate(t, size=(PATCH_SIZE, PATCH_SIZE), mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()


# --------------------------------------------------------------------------- shared data


@pytest.fixture(scope="module")
def v1_root() -> Path:
    require(BEN_V1.exists(), f"BigEarthNet v1 patches not found at {BEN_V1}")
    return BEN_V1


@pytest.fixture(scope="module")
def v1_s2(v1_root: Path) -> BenPatches:
    return load_ben_v1(v1_root, "s2", label_set=19)


@pytest.fixture(scope="module")
def a_patch(v1_root: Path) -> Path:
    return v1_root / "S2A_MSIL2A_20170613T101031_39_24"


@pytest.mark.shared
def test_s2_bands_in_documented_order_on_one_grid(v1_s2: BenPatches, a_patch: Path) -> None:
    assert (
        v1_s2.bands
        == S2_BANDS
        == (
            *("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08"),
            *("B8A", "B09", "B11", "B12"),
        )
    )
    assert v1_s2.images.shape == (30, 12, 120, 120) and v1_s2.images.dtype == np.float32
    image = read_s2_patch(a_patch)
    np.testing.assert_array_equal(image, v1_s2.images[v1_s2.names.index(a_patch.name)])
    for k, band in enumerate(S2_BANDS):
        raw = _raw(a_patch, band)
        assert raw.shape == (120 * 10 // S2_RESOLUTION_M[band],) * 2
        if S2_RESOLUTION_M[band] == 10:
            np.testing.assert_array_equal(image[k], raw, err_msg=band)
        else:  # GDAL rounds the interpolated DN to whole numbers: within half a DN
            np.testing.assert_allclose(image[k], _bilinear(raw), atol=0.5 + 1e-3, err_msg=band)


@pytest.mark.shared
def test_60m_band_block_matches_its_source_pixel(a_patch: Path) -> None:
    source = _raw(a_patch, "B01")  # 20x20 at 60 m: one source pixel covers a 6x6 block
    up = read_s2_patch(a_patch)[S2_BANDS.index("B01")]
    assert up.shape == (120, 120)
    for i, j in [(5, 7), (10, 10), (14, 3)]:
        block = up[6 * i : 6 * i + 6, 6 * j : 6 * j + 6]
        # the 2x2 block centre lies 1/12 source pixel from the source pixel centre, so it is
        # 11/12 that pixel and 1/12 its neighbour along each axis
        w = np.array([1 / 12, 11 / 12, 0.0])
        for dy, wy in ((2, w), (3, w[::-1])):
            for dx, wx in ((2, w), (3, w[::-1])):
                expected = wy @ source[i - 1 : i + 2, j - 1 : j + 2] @ wx
                assert abs(block[dy, dx] - expected) <= 0.5 + 1e-3
        neighbourhood = source[i - 1 : i + 2, j - 1 : j + 2]
        assert neighbourhood.min() - 0.5 <= block.min() <= block.max() <= neighbourhood.max() + 0.5


@pytest.mark.shared
def test_s1_has_vv_and_vh_in_db_as_stored(v1_root: Path, a_patch: Path) -> None:
    s1 = load_ben_v1(v1_root, "s1")
    assert s1.bands == S1_BANDS == ("VV", "VH")
    assert s1.images.shape == (30, 2, 120, 120) and s1.images.dtype == np.float32
    image = read_s1_patch(a_patch)
    np.testing.assert_array_equal(image, s1.images[s1.names.index(a_patch.name)])
    np.testing.assert_array_equal(image[0], _raw(a_patch, "VV"))
    np.testing.assert_array_equal(image[1], _raw(a_patch, "VH"))
    assert np.isfinite(s1.images).all() and np.median(s1.images) < 0  # backscatter in dB


@pytest.mark.shared
def test_multi_hot_labels_and_splits_match_the_files(v1_root: Path, v1_s2: BenPatches) -> None:
    records = json.loads((v1_root / "labels.json").read_text())
    assert list(v1_s2.names) == list(records)
    v1_43 = load_ben_v1(v1_root, "s1", label_set=43)
    for patches, classes, key in ((v1_s2, LABELS_19, "labels_19"), (v1_43, LABELS_43, "labels_43")):
        assert patches.labels.shape == (30, len(classes)) and patches.labels.dtype == np.uint8
        for name, row in zip(patches.names, patches.labels, strict=True):
            assert {classes[c] for c in np.flatnonzero(row)} == set(records[name][key])
    for split in ("train", "val", "test"):
        listed = (v1_root / f"split_{split}.csv").read_text().split()
        assert sorted(v1_s2.in_split(split).names) == sorted(listed)


@pytest.mark.shared
def test_ben_v2_labelled_patches_with_paired_s1() -> None:
    require(BEN_V2.exists(), f"BigEarthNet v2 patches not found at {BEN_V2}")
    with (BEN_V2 / "metadata.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    s2, s1 = load_ben_v2(BEN_V2, "s2"), load_ben_v2(BEN_V2, "s1")
    assert s2.images.shape == (18, 12, 120, 120) and s1.images.shape == (18, 2, 120, 120)
    assert s1.names == s2.names == tuple(r["patch_id"] for r in rows)
    np.testing.assert_array_equal(s1.labels, s2.labels)
    for r, row in zip(rows, s2.labels, strict=True):
        assert {LABELS_19[c] for c in np.flatnonzero(row)} == set(r["labels"].split(";"))
    np.testing.assert_array_equal(s1.images[0, 0], _raw(BEN_V2 / rows[0]["s1_name"], "VV"))
    assert {s2.split.count(s) for s in ("train", "val", "test")} == {6}


@pytest.mark.shared
def test_missing_band_error_names_the_band(a_patch: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(a_patch, tmp_path / a_patch.name))
    band_file(copy, "B8A").unlink()
    band_file(copy, "VH").unlink()
    with pytest.raises(FileNotFoundError, match=r"band B8A is missing"):
        read_s2_patch(copy)
    with pytest.raises(FileNotFoundError, match=r"band VH is missing"):
        read_patch(copy, "s1")


@pytest.mark.shared
def test_band_stats_from_training_patches(v1_s2: BenPatches) -> None:
    train = v1_s2.in_split("train")
    stats = BandStats.fit(train.images, train.bands)
    np.testing.assert_allclose(stats.mean, train.images.mean(axis=(0, 2, 3)), rtol=1e-5)
    z = stats.normalise(train.images)
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1, atol=1e-4)
    restored = BandStats.from_config(json.loads(json.dumps(stats.to_config())))
    assert restored == stats


@pytest.mark.shared
@pytest.mark.parametrize(("sensor", "method"), [("s2", "milan"), ("s1", "triplet")])
def test_train_checkpoint_and_encode_raw_patches(
    v1_root: Path, sensor: str, method: str, tmp_path: Path
) -> None:
    """The multispectral / SAR path end to end: fit stats, train, save, reload, encode raw DN/dB."""
    patches = load_ben_v1(v1_root, sensor, label_set=19)  # type: ignore[arg-type]
    train = patches.in_split("train", "val")
    stats = BandStats.fit(train.images, train.bands)
    result = train_hashing(
        METHODS[method],
        torch.from_numpy(stats.normalise(train.images)),
        train.labels,
        16,
        TrainConfig(iterations=8, batch_size=8, progress=False),
        backbone=build_backbone("smallcnn", len(train.bands), pretrained=False),
    )
    losses = [h["loss"] for h in result.history]
    assert all(np.isfinite(losses))
    config = ModelConfig(
        method=method,
        bits=16,
        backbone="smallcnn",
        head={"n_classes": train.labels.shape[1]},
        **stats.to_config(),
    )
    HashEncoder(config, result.net).save(tmp_path / "ckpt")
    encoder = HashEncoder.load(tmp_path / "ckpt")
    codes, _ = encoder.encode_numpy(patches.images)  # raw physical units in, codes out
    direct, _ = encode(result.net.eval(), torch.from_numpy(stats.normalise(patches.images)))
    assert codes.shape == (len(patches), 16)
    np.testing.assert_array_equal(codes, direct)


# --------------------------------------------------------------------------- no shared data


def _write(path: Path, pixels: np.ndarray, resolution_m: int) -> None:
    """A single-band UTM GeoTIFF as BigEarthNet ships it."""
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=pixels.shape[0],
        width=pixels.shape[1],
        count=1,
        dtype=pixels.dtype,
        crs="EPSG:32633",
        transform=Affine(resolution_m, 0, 500_000, 0, -resolution_m, 5_000_000),
    ) as dst:
        dst.write(pixels, 1)


def _fake_patch(folder: Path) -> Path:
    """A patch folder with 12 S2 bands at 10/20/60 m (band k constant 100k, B01 a ramp) + S1."""
    folder.mkdir(parents=True)
    for k, (band, res) in enumerate(S2_RESOLUTION_M.items()):
        n = 120 * 10 // res
        pixels = np.full((n, n), 100 * k, dtype=np.uint16)
        if band == "B01":
            pixels = (100 * np.arange(n)[:, None] + 3 * np.arange(n)[None, :]).astype(np.uint16)
        _write(band_file(folder, band), pixels, res)
    _write(band_file(folder, "VV"), np.full((120, 120), -12.5, dtype=np.float32), 10)
    _write(band_file(folder, "VH"), np.full((120, 120), -19.25, dtype=np.float32), 10)
    return folder


def test_fake_patch_folder_loads_on_one_grid(tmp_path: Path) -> None:
    folder = _fake_patch(tmp_path / "S2A_MSIL2A_20990101T000000_1_2")
    image = read_s2_patch(folder)
    assert image.shape == (12, 120, 120) and image.dtype == np.float32
    for k in range(1, 12):  # constant bands come back constant, in S2_BANDS order
        assert np.all(image[k] == 100 * k), S2_BANDS[k]
    # bilinear upsampling reproduces the 60 m linear ramp away from the clamped borders:
    # output pixel y sits at source row (y + 0.5) / 6 - 0.5
    src = (np.arange(120) + 0.5) / 6 - 0.5
    ramp = 100 * src[:, None] + 3 * src[None, :]
    np.testing.assert_allclose(image[0, 3:-3, 3:-3], ramp[3:-3, 3:-3], atol=0.5 + 1e-3)
    s1 = read_s1_patch(folder)
    assert s1.shape == (2, 120, 120) and np.all(s1[0] == -12.5) and np.all(s1[1] == -19.25)


def test_fake_ben_v1_root_with_labels_and_splits(tmp_path: Path) -> None:
    names = ["S2A_MSIL2A_20990101T000000_1_2", "S2B_MSIL2A_20990101T000000_3_4"]
    for name in names:
        _fake_patch(tmp_path / name)
    labels = {
        names[0]: {"labels_43": ["Sea and ocean"], "labels_19": ["Marine waters"]},
        names[1]: {
            "labels_43": ["Pastures", "Mixed forest"],
            "labels_19": ["Pastures", "Mixed forest"],
        },
    }
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    (tmp_path / "split_train.csv").write_bytes(f"{names[1]}\r\n".encode())
    (tmp_path / "split_test.csv").write_bytes(f"{names[0]}\r\n".encode())
    patches = load_ben_v1(tmp_path, "s2", label_set=19)
    assert patches.names == tuple(names) and patches.split == ("test", "train")
    assert patches.images.shape == (2, 12, 120, 120)
    np.testing.assert_array_equal(np.flatnonzero(patches.labels[0]), [18])
    np.testing.assert_array_equal(np.flatnonzero(patches.labels[1]), [4, 10])
    s1 = load_ben_v1(tmp_path, "s1", label_set=43)
    assert s1.images.shape == (2, 2, 120, 120) and s1.labels.shape == (2, 43)
    both = concat(patches, patches.in_split("train"))
    assert both.names == (*names, names[1]) and len(both.images) == 3
    with pytest.raises(ValueError, match="different sensors"):
        concat(patches, s1)
    with pytest.raises(ValueError, match="label_set"):
        load_ben_v1(tmp_path, "s2", label_set=10)


def test_unreadable_or_misshapen_band_is_named(tmp_path: Path) -> None:
    folder = _fake_patch(tmp_path / "patch")
    band_file(folder, "B05").write_bytes(b"not a tiff")
    with pytest.raises(ValueError, match=r"patch patch: cannot read band B05"):
        read_s2_patch(folder)
    _write(band_file(folder, "B05"), np.zeros((120, 120), dtype=np.uint16), 10)
    with pytest.raises(ValueError, match=r"band B05 \(20 m\) should be one 60x60 band"):
        read_s2_patch(folder)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "metadata.csv").write_text("patch_id,labels,split,s1_name\nP,Pastures,train,S\n")
    with pytest.raises(FileNotFoundError, match="patch folder not found"):
        load_ben_v2(v2)


def test_multi_hot_and_band_stats_edge_cases() -> None:
    np.testing.assert_array_equal(
        multi_hot([["Pastures", "Urban fabric"], []], LABELS_19)[:, [0, 4]], [[1, 1], [0, 0]]
    )
    with pytest.raises(ValueError, match="unknown label"):
        multi_hot([["Pasture"]], LABELS_19)
    images = np.stack([np.full((2, 4, 4), 7.0), np.arange(32.0).reshape(2, 4, 4)], axis=1)
    stats = BandStats.fit(images, ("VV", "VH"))
    assert stats.mean[0] == 7.0 and stats.std[0] == 1.0  # a constant band is only centred
    assert np.all(stats.normalise(images)[:, 0] == 0)
    with pytest.raises(ValueError, match="2 bands"):
        stats.normalise(np.zeros((1, 3, 4, 4)))


@pytest.mark.shared
def test_load_ben_joins_both_folders_in_the_same_order_per_sensor(v1_root: Path) -> None:
    require(BEN_V2.exists(), f"BigEarthNet v2 patches not found at {BEN_V2}")
    root = v1_root.parent
    s2, s1 = load_ben(root, "s2"), load_ben(root, "s1")
    v1, v2 = load_ben_v1(v1_root, "s2", label_set=19), load_ben_v2(BEN_V2, "s2")
    assert s2.names == (*v1.names, *v2.names) == s1.names
    np.testing.assert_array_equal(s2.labels, s1.labels)
    assert load_ben(root, "s2", ["v2"]).names == v2.names
    with pytest.raises(ValueError, match="sources"):
        load_ben(root, "s2", ["v3"])
