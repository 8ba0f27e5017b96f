"""The ingestion worker end to end on real rasters written here: chips, codes, sinks, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pystac
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window
from typer.testing import CliRunner

from stac_rscbir.cli import app
from stac_rscbir.data.chips import chip_windows
from stac_rscbir.extension.cbir import CBIRExtension
from stac_rscbir.extension.validation import cbir_errors, schema_errors
from stac_rscbir.ingest.sinks import CatalogSink, GeoParquetSink
from stac_rscbir.ingest.sources import items_from_file
from stac_rscbir.ingest.worker import IngestOptions, Ingestor
from stac_rscbir.models.config import ModelConfig, SourceConfig
from stac_rscbir.models.encoder import HashEncoder

from .ingest_builders import CHIP, MODEL, OPTIONS, _scene
from .stac_builders import RGB, make_item, raster_item, static_catalog, write_cog


def _codes(item: dict) -> list[dict]:
    return item["properties"].get("cbir:codes", [])


def _code_bits(code: dict) -> np.ndarray:
    from stac_rscbir.extension.cbir import HashCode

    return HashCode.from_dict(code).bit_array()


def test_scenes_are_chipped_encoded_and_written_back_in_place(
    checkpoint: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    scenes = [
        raster_item("scene-a", _scene(data, "a", 100, 90, seed=1, hole=40)),
        raster_item("scene-b", _scene(data, "b", 64, 64, seed=2)),
    ]
    root = tmp_path / "catalog"
    catalog = static_catalog(root, scenes)
    ingestor = Ingestor.from_checkpoint(checkpoint, OPTIONS)
    report = ingestor.run(items_from_file(catalog), CatalogSink(root))

    windows_a = chip_windows(100, 90, CHIP)
    assert report.items_encoded == 2 and not report.errors
    # the 40x40 hole makes the chips overlapping it mostly nodata: they are dropped
    dropped = [
        (r, c) for r, c in windows_a if r < 40 and c < 40 and (40 - r) * (40 - c) > 0.1 * 32**2
    ]
    assert report.chips_dropped == len(dropped) > 0
    assert report.chips_encoded == len(windows_a) - len(dropped) + len(chip_windows(64, 64, CHIP))

    encoder = HashEncoder.load(checkpoint)
    chip_files = sorted((root / "scenes-chips").glob("*/*.json"))
    assert len(chip_files) == report.chips_encoded
    with rasterio.open(data / "a.tif") as src:
        scene_transform = src.transform
        for path in chip_files:
            chip = json.loads(path.read_text())
            if not chip["id"].startswith("scene-a"):
                continue
            w = chip["properties"]["cbir:chip"]["window"]
            # the chip's grid is the source grid, shifted to the window
            expected = scene_transform * rasterio.Affine.translation(w["col_off"], w["row_off"])
            assert chip["properties"]["proj:transform"] == pytest.approx(list(expected)[:6])
            # its code is the model applied to exactly those source pixels
            window = Window(w["col_off"], w["row_off"], w["width"], w["height"])
            pixels = src.read(window=window).astype(np.float32)
            # nodata pixels enter the model as the band means (zero after normalisation)
            nodata = (pixels == 0).all(axis=0)
            pixels[:, nodata] = np.asarray(encoder.config.mean, np.float32)[:, None]
            bits, _ = encoder.encode_numpy(pixels[None])
            (code,) = _codes(chip)
            np.testing.assert_array_equal(_code_bits(code), bits[0])
            assert any(link["rel"] == "derived_from" for link in chip["links"])

    # the scenes were rewritten in place, with a scene-level code and their links intact
    for scene in ("scene-a", "scene-b"):
        stored = json.loads((root / "scenes" / scene / f"{scene}.json").read_text())
        (code,) = _codes(stored)
        assert code["model"] == MODEL and code["bits"] == 32 and code["descriptor"]["dim"] == 32
        assert {"root", "parent", "collection"} <= {link["rel"] for link in stored["links"]}
    # the whole catalog is valid STAC and cbir, and reads back with pystac
    coll = json.loads((root / "scenes-chips" / "collection.json").read_text())
    assert coll["cbir:models"][0]["id"] == MODEL
    assert json.loads((root / "scenes" / "collection.json").read_text())["cbir:models"]
    for path in [*root.glob("*.json"), *root.glob("*/*.json"), *root.glob("*/*/*.json")]:
        doc = json.loads(path.read_text())
        assert schema_errors(doc) + cbir_errors(doc) == [], path
    walked = list(pystac.Catalog.from_file(str(catalog)).get_items(recursive=True))
    assert len(walked) == 2 + report.chips_encoded

    # rerun: everything is already encoded by this model version, nothing is rewritten
    def item_files() -> dict[Path, int]:
        return {
            p: p.stat().st_mtime_ns
            for p in root.rglob("*.json")
            if p.name not in ("collection.json", "catalog.json")
        }

    before = item_files()
    again = Ingestor.from_checkpoint(checkpoint, OPTIONS).run(
        items_from_file(catalog), CatalogSink(root)
    )
    assert (again.items_skipped, again.items_encoded, again.chips_encoded) == (2, 0, 0)
    assert item_files() == before


def test_bad_items_are_reported_and_skipped(checkpoint: Path, tmp_path: Path) -> None:
    good = raster_item("good", _scene(tmp_path, "good", CHIP, CHIP, seed=3))
    missing_band = raster_item(
        "missing-band",
        _scene(tmp_path, "two", CHIP, CHIP, seed=4),
        band_names=("red", "green", "nir"),
    )
    text = tmp_path / "broken.tif"
    text.write_text("not a raster")
    unreadable = raster_item("unreadable", _scene(tmp_path, "u", CHIP, CHIP, seed=5))
    unreadable.assets["image"].href = str(text)
    empty = write_cog(
        tmp_path / "empty.tif",
        np.zeros((3, CHIP, CHIP), np.uint16),
        from_origin(500_000, 5e6, 10, 10),
    )
    all_nodata = raster_item("all-nodata", empty)
    plain = np.full((3, CHIP, CHIP), 900, np.uint16)
    no_crs_file = write_cog(tmp_path / "n.tif", plain, from_origin(0, 0, 1, 1), crs=None)
    no_crs = raster_item("no-crs", no_crs_file, with_proj=False)
    sink = GeoParquetSink(tmp_path / "out")
    report = Ingestor.from_checkpoint(checkpoint, OPTIONS).run(
        [good, missing_band, unreadable, all_nodata, no_crs], sink
    )
    kinds = {e.item_id: e.kind for e in report.errors}
    assert kinds == {
        "missing-band": "missing-band",
        "unreadable": "unreadable-asset",
        "all-nodata": "all-nodata",
        "no-crs": "bad-crs",
    }
    assert all(e.item_id in e.message for e in report.errors)
    assert report.items_encoded == 1
    rows = pq.read_table(next((tmp_path / "out").glob("*.parquet"))).to_pylist()
    assert [r["id"] for r in rows] == ["good"]
    out = report.to_dict()
    assert out["errors_by_kind"] == {k: 1 for k in kinds.values()}


KILL_SCRIPT = """
import sys, threading
from pathlib import Path
from stac_rscbir.ingest.sinks import GeoParquetSink
from stac_rscbir.ingest.sources import items_from_file
from stac_rscbir.ingest.worker import IngestOptions, Ingestor

ingestor = Ingestor.from_checkpoint(Path(sys.argv[1]), IngestOptions(
    chip_size=32, batch_size=4, readers=1, progress=False, device="cpu"))
stall = int(sys.argv[4])  # after this many items the source hangs until the kill; -1: never
def items():
    for i, item in enumerate(items_from_file(Path(sys.argv[2]))):
        if i == stall:
            threading.Event().wait()
        yield item
report = ingestor.run(items(), GeoParquetSink(Path(sys.argv[3]), flush_every=2))
print("DONE", report.items_encoded, report.items_skipped, flush=True)
"""


def test_killed_run_resumes_with_no_loss_and_no_duplicates(
    checkpoint: Path, tmp_path: Path
) -> None:
    n = 24
    data = tmp_path / "data"
    data.mkdir()
    items = [
        raster_item(f"p{i:02d}", _scene(data, f"p{i}", CHIP, CHIP, seed=10 + i)) for i in range(n)
    ]
    catalog = static_catalog(tmp_path / "catalog", items)
    out = tmp_path / "parquet"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    cmd = [sys.executable, str(script), str(checkpoint), str(catalog), str(out)]
    # the source stalls after half the items, so the kill lands mid-run whatever the timing
    proc = subprocess.Popen([*cmd, str(n // 2)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline:
        assert proc.poll() is None, "the stalled run exited by itself"
        time.sleep(0.05)  # polls for the first committed part, bounded by the deadline
    os.kill(proc.pid, signal.SIGKILL)  # kill -9 in the middle of the run
    proc.wait()
    first = {
        r["id"]
        for p in out.glob("part-*.parquet")
        for r in pq.read_table(p, columns=["id"]).to_pylist()
    }
    assert 0 < len(first) <= n // 2, "a part was committed before the stall, none after"
    done = subprocess.run([*cmd, "-1"], capture_output=True, text=True, check=True)
    encoded, skipped = map(int, done.stdout.split()[1:3])
    assert encoded == n - len(first) and skipped == len(first)
    ids = [
        r["id"]
        for p in out.glob("part-*.parquet")
        for r in pq.read_table(p, columns=["id"]).to_pylist()
    ]
    assert sorted(ids) == sorted(i.id for i in items)  # every item exactly once
    assert not list(out.glob(".*"))  # no temporary files left behind as parts


def test_parts_abandoned_by_dead_writers_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    from stac_rscbir.fsutil import host_name

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid, host = int(gone.stdout), host_name()
    dead = tmp_path / f".part-m@1-{host}-{dead_pid}-0123456789ab.parquet.x1y2z3"
    live = tmp_path / f".part-m@1-{host}-{os.getpid()}-0123456789ab.parquet.a1b2c3"
    other_host = tmp_path / f".part-m@1-elsewhere-{dead_pid}-0123456789ab.parquet.q1w2e3"
    done = tmp_path / f"part-m@1-{host}-{dead_pid}-0123456789ab.parquet"
    for path in (dead, live, other_host, done):
        path.write_bytes(b"x")
    GeoParquetSink(tmp_path)
    assert not dead.exists()
    assert live.exists() and other_host.exists() and done.exists()


def test_dask_gives_the_same_codes_as_the_local_path(checkpoint: Path, tmp_path: Path) -> None:
    distributed = pytest.importorskip("dask.distributed")
    items = [raster_item(f"d{i}", _scene(tmp_path, f"d{i}", 64, 48, seed=40 + i)) for i in range(5)]
    local = Ingestor.from_checkpoint(checkpoint, OPTIONS).run(
        items, GeoParquetSink(tmp_path / "local")
    )
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        from stac_rscbir.ingest.distributed import ingest_dask

        remote = ingest_dask(
            client, items, checkpoint, GeoParquetSink(tmp_path / "dask"), OPTIONS, partition_size=2
        )
    assert (remote.items_encoded, remote.chips_encoded) == (
        local.items_encoded,
        local.chips_encoded,
    )

    def codes(folder: Path) -> dict[str, str]:
        rows = [r for p in folder.glob("*.parquet") for r in pq.read_table(p).to_pylist()]
        return {r["id"]: r["cbir:codes"][0]["code"] for r in rows}

    assert codes(tmp_path / "dask") == codes(tmp_path / "local")
    assert len(codes(tmp_path / "local")) == 5 + local.chips_encoded


def test_cli_ingest_writes_back_and_reports(checkpoint: Path, tmp_path: Path) -> None:
    items = [raster_item("c1", _scene(tmp_path, "c1", 64, 64, seed=7))]
    catalog = static_catalog(tmp_path / "catalog", items)
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(
        app,
        [
            "ingest",
            str(catalog),
            "--model",
            str(checkpoint),
            "--chip-size",
            "32",
            "--device",
            "cpu",
            "--report",
            str(report_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "1 encoded" in result.output and "4 chips" in result.output
    report = json.loads(report_path.read_text())
    assert report["items_encoded"] == 1 and report["chips_encoded"] == 4
    item = pystac.Item.from_file(str(tmp_path / "catalog" / "scenes" / "c1" / "c1.json"))
    assert CBIRExtension.ext(item).get_code(MODEL) is not None
    bad = CliRunner().invoke(
        app, ["ingest", str(tmp_path / "nope.json"), "--model", str(checkpoint)]
    )
    assert bad.exit_code == 1 and "not found" in bad.output


# --------------------------------------------------------------------------- cross-modal


def _two_branch(folder: Path) -> Path:
    """A cross-modal ``duch`` model: branch 0 reads RGB, branch 1 VV/VH (random weights)."""
    config = ModelConfig(
        method="duch",
        bits=32,
        bands=list(RGB),
        backbone="smallcnn",
        mean=[1000.0, 1100.0, 1200.0],
        std=[300.0, 300.0, 300.0],
        model_id="test-rgb-sar",
        input_size=CHIP,
        second_source=SourceConfig(["VV", "VH"], "smallcnn", [-12.0, -19.0], [3.0, 3.0]),
    )
    torch.manual_seed(0)
    return HashEncoder.build(config, pretrained=False).save(folder / "two-branch")


def _patch(folder: Path, name: str, bands: tuple[str, ...], seed: int) -> pystac.Item:
    """A CHIP x CHIP patch item with one single-band asset per band (keys = band names)."""
    rng = np.random.default_rng(seed)
    low, high = (-25.0, -5.0) if bands[0] == "VV" else (500.0, 2000.0)
    pixels = rng.uniform(low, high, (len(bands), CHIP, CHIP)).astype(np.float32)
    assets = {}
    for band, layer in zip(bands, pixels, strict=True):
        path = write_cog(
            folder / f"{name}_{band}.tif", layer[None], from_origin(5e5, 5.3e6, 10, 10)
        )
        assets[band] = {"href": path}
    item = make_item(name, assets)
    for asset in item.assets.values():
        asset.media_type = pystac.MediaType.GEOTIFF
    item.collection_id = "sar" if bands[0] == "VV" else "optical"
    return item


def test_a_two_branch_model_encodes_each_item_with_its_sensors_branch(tmp_path: Path) -> None:
    ckpt = _two_branch(tmp_path)
    optical = [_patch(tmp_path, f"opt-{i}", RGB, i) for i in range(5)]
    sar = [_patch(tmp_path, f"sar-{i}", ("VV", "VH"), 10 + i) for i in range(3)]
    neither = _patch(tmp_path, "nir-only", ("nir",), 99)
    # optical items in a row, then SAR: with batch 2 the SAR branch gets partial batches
    items = [*optical[:4], sar[0], neither, *sar[1:], optical[4]]
    options = IngestOptions(batch_size=2, readers=1, progress=False, device="cpu")
    sink = GeoParquetSink(tmp_path / "out")
    report = Ingestor.from_checkpoint(ckpt, options).run(items, sink)
    assert (report.items_encoded, report.items_seen) == (8, 9)
    (error,) = report.errors
    assert error.item_id == "nir-only" and error.kind == "missing-band"
    assert "rgb lacks" in error.message and "VV, VH" in error.message
    rows = {
        r["id"]: r
        for p in (tmp_path / "out").glob("*.parquet")
        for r in pq.read_table(p).to_pylist()
    }
    encoder = HashEncoder.load(ckpt)
    for item, source, bands in [
        *((i, 0, list(RGB)) for i in optical),
        *((i, 1, ["VV", "VH"]) for i in sar),
    ]:
        pixels = np.stack([rasterio.open(a.href).read(1) for a in item.assets.values()]).astype(
            np.float32
        )
        bits, _ = encoder.encode_numpy(pixels[None], source=source)
        (code,) = rows[item.id]["cbir:codes"]
        assert code["bands"] == bands and code["model"] == "test-rgb-sar"
        np.testing.assert_array_equal(_code_bits(code), bits[0])
    # the two branches really differ: the same SAR pixels through branch 0's bands are refused
    with pytest.raises(ValueError, match="branch 0"):
        encoder.encode_numpy(np.zeros((1, 2, CHIP, CHIP), np.float32), source=0)


# --------------------------------------------------------------------------- real data


SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
BEN = SHARED / "bigearthnet" / "georeferenced"
OPTIONS_REAL = IngestOptions(batch_size=32, progress=False, device="cpu")
LANDSAT = SHARED / "rasters" / "landsat8" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"


def _model(folder: Path, bands: tuple[str, ...], model_id: str, size: int) -> Path:
    config = ModelConfig(
        method="milan",
        bits=64,
        bands=list(bands),
        backbone="smallcnn",
        mean=[0.0] * len(bands),
        std=[1000.0 if b.startswith("B") else 5.0 for b in bands],
        model_id=model_id,
        input_size=size,
        head={"n_classes": 1},
    )
    torch.manual_seed(1)
    return HashEncoder.build(config, pretrained=False).save(folder / model_id)


@pytest.mark.shared
def test_bigearthnet_patches_are_encoded_whole(tmp_path: Path) -> None:
    """S2 (12 bands, three resolutions) and S1 (VV/VH dB) patches: one code per patch, no chips;
    the S1 codes equal the model run on the source files read independently."""
    from stac_rscbir.data.bigearthnet import S1_BANDS, S2_BANDS, read_s1_patch

    from .conftest import require
    from .stac_builders import ben_item

    require(BEN.exists(), f"BigEarthNet georeferenced patches not found at {BEN}")
    for sensor, bands in (("S2", S2_BANDS), ("S1", S1_BANDS)):
        patches = sorted((BEN / f"BigEarthNet-{sensor}-Example").iterdir())
        items = []
        for patch in patches:
            item = ben_item(patch, bands)
            item.collection_id = f"ben-{sensor.lower()}"
            items.append(item)
        ckpt = _model(tmp_path, bands, f"ben-{sensor.lower()}-test", 120)
        sink = GeoParquetSink(tmp_path / sensor)
        report = Ingestor.from_checkpoint(ckpt, OPTIONS_REAL).run(items, sink)
        assert (report.items_encoded, report.chips_encoded, report.errors) == (len(patches), 0, [])
        rows = {
            r["id"]: r
            for p in (tmp_path / sensor).glob("*.parquet")
            for r in pq.read_table(p).to_pylist()
        }
        assert sorted(rows) == sorted(p.name for p in patches)
        if sensor == "S1":
            encoder = HashEncoder.load(ckpt)
            for patch in patches:
                bits, _ = encoder.encode_numpy(read_s1_patch(patch)[None])
                np.testing.assert_array_equal(
                    _code_bits(rows[patch.name]["cbir:codes"][0]), bits[0]
                )


@pytest.mark.shared
def test_landsat_scene_is_chipped_on_its_own_grid(tmp_path: Path) -> None:
    """A real Landsat-8 clip (EPSG:32621, 30 m) cut into 256 px chips: every chip's grid and
    footprint follow from the source transform."""
    from pystac.extensions.eo import Band
    from rasterio.warp import transform_bounds
    from rasterio.windows import bounds as window_bounds

    from .conftest import require
    from .stac_builders import make_item

    require(LANDSAT.exists(), f"Landsat-8 scene clip not found at {LANDSAT}")
    eo = [
        Band.create(name=f"B{n}", common_name=c) for n, c in ((2, "blue"), (3, "green"), (4, "red"))
    ]
    item = make_item(
        "LC08_224078_20200518", {"image": {"href": LANDSAT, "eo": eo}}, crs="EPSG:32621"
    )
    item.collection_id = "landsat"
    ckpt = _model(tmp_path, RGB, "l8-rgb-test", 256)
    sink = GeoParquetSink(tmp_path / "out")
    report = Ingestor.from_checkpoint(ckpt, OPTIONS_REAL).run([item], sink)
    windows = chip_windows(1860, 2041, 256)
    assert report.items_encoded == 1 and report.chips_encoded + report.chips_dropped == len(windows)
    assert report.chips_encoded > 0
    rows = [r for p in (tmp_path / "out").glob("*.parquet") for r in pq.read_table(p).to_pylist()]
    chips = [r for r in rows if r.get("cbir:chip")]
    assert len(chips) == report.chips_encoded
    with rasterio.open(LANDSAT) as src:
        for chip in chips:
            w = chip["cbir:chip"]["window"]
            window = Window(w["col_off"], w["row_off"], w["width"], w["height"])
            expected = src.window_transform(window)
            assert list(chip["proj:transform"])[:6] == pytest.approx(list(expected)[:6])
            west, south, east, north = transform_bounds(
                src.crs, "EPSG:4326", *window_bounds(window, src.transform), densify_pts=21
            )
            bbox = chip["bbox"]  # stac-geoparquet stores it as a struct
            assert [bbox["xmin"], bbox["ymin"], bbox["xmax"], bbox["ymax"]] == pytest.approx(
                [west, south, east, north], abs=1e-6
            )


def test_near_patch_sized_items_are_resampled_and_encoded_whole(
    checkpoint: Path, tmp_path: Path
) -> None:
    """An item within 10 % of the chip size is one model input, resampled to the chip size."""
    items = [raster_item("near", _scene(tmp_path, "near", CHIP + 2, CHIP - 1, seed=8))]
    report = Ingestor.from_checkpoint(checkpoint, OPTIONS).run(
        items, GeoParquetSink(tmp_path / "o")
    )
    assert (report.items_encoded, report.chips_encoded, report.errors) == (1, 0, [])
