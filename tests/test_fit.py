"""`stac-rscbir fit`: hashing models fitted on unlabelled chips (a folder of images or the chips
of STAC items), their checkpoints, the chip sample they fit on, and the clear errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pystac
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from stac_rscbir.cli import app
from stac_rscbir.data.bigearthnet import BandStats
from stac_rscbir.data.samples import folder_images, item_chips
from stac_rscbir.extension import CBIRExtension
from stac_rscbir.models.backbones import IMAGENET_MEAN, IMAGENET_STD
from stac_rscbir.models.encoder import HashEncoder
from stac_rscbir.models.finetune import Finetune
from stac_rscbir.models.fit import FitSettings, fit_encoder

from .stac_builders import raster_item, static_catalog, write_cog_at

runner = CliRunner()
# (red, green, blue) of four kinds of ground, for images that differ in content
KINDS = ((20, 60, 160), (30, 120, 40), (210, 180, 120), (120, 120, 120))


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny tensors: one torch thread (no OpenMP waits on a busy machine), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _texture(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: a kind's colour, a stripe pattern of its own, noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    pattern = np.sin(2 * np.pi * (xx * (kind + 1) + yy * (3 - kind)))[..., None]
    rgb = np.array(KINDS[kind]) + 50 * pattern + rng.normal(0, 15, (size, size, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 PNGs of 32x32 (4 kinds x 4), in two subfolders, no labels anywhere."""
    root = tmp_path_factory.mktemp("unlabelled")
    rng = np.random.default_rng(0)
    for i in range(16):
        sub = root / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(_texture(i % 4, 32, rng)).save(sub / f"{i:02d}.png")
    return root


def _catalog(root: Path) -> Path:
    """A static catalog of two 64x64 RGB uint16 scenes (10 m, UTM): 4 chips of 32 px each."""
    rng = np.random.default_rng(1)
    items = []
    for i in range(2):
        pixels = np.moveaxis(_texture(i, 64, rng), -1, 0).astype(np.uint16) * 8 + 100
        path = write_cog_at(root / f"s{i}.tif", pixels, 10.0, nodata=0, x0=500_000.0 + 1000 * i)
        items.append(raster_item(f"s{i}", path))
    return static_catalog(root / "catalog", items)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _catalog(tmp_path_factory.mktemp("stac"))


FAST = ["--epochs", "1.5", "--batch-size", "8"]  # 16 chips: 3 iterations


def _said(result: object) -> str:
    """The command's output with rich's line wrapping undone."""
    return " ".join(result.output.split())  # type: ignore[attr-defined]


def test_fit_on_an_image_folder_writes_a_checkpoint_that_loads(images: Path, tmp_path: Path):
    out = tmp_path / "folder-model"
    result = runner.invoke(app, ["fit", str(images), "--out", str(out), *FAST, "--bits", "32"])
    assert result.exit_code == 0, result.output
    assert "16 chips of red, green, blue at 32 px from 16 images" in _said(result)
    assert "ImageNet input mean/std x 255" in _said(result)
    assert "contrastive 32-bit head, last 2 blocks + head convolution fine-tuned" in _said(result)
    assert "3 iterations, loss" in _said(result) and "wrote" in _said(result)

    config = json.loads((out / "config.json").read_text())
    assert (config["method"], config["bits"], config["input_size"]) == ("contrastive", 32, 32)
    assert config["model_id"] == "folder-model" and config["bands"] == ["red", "green", "blue"]
    assert config["mean"] == pytest.approx([255 * m for m in IMAGENET_MEAN])
    assert config["std"] == pytest.approx([255 * s for s in IMAGENET_STD])
    extra = config["extra"]
    assert extra["labels"] == "none" and extra["trained_on"] == str(images)
    assert (extra["epochs"], extra["iterations"], extra["chips"]) == (1.5, 3, 16)
    assert extra["finetune"] == "last 2 blocks + head convolution"

    encoder = HashEncoder.load(out)
    again = HashEncoder.load(out)
    sample = folder_images(images).pixels
    bits, relaxed = encoder.encode_numpy(sample)
    assert bits.shape == (16, 32) and set(np.unique(bits)) <= {0, 1}
    assert np.array_equal(bits, encoder.encode_numpy(sample)[0])  # deterministic
    assert np.array_equal(bits, again.encode_numpy(sample)[0])
    assert np.allclose(relaxed, again.encode_numpy(sample)[1])


def test_fit_twice_with_one_seed_gives_the_same_model(images: Path, tmp_path: Path):
    outs = [tmp_path / "one", tmp_path / "two"]
    for out in outs:
        args = ["fit", str(images), "--out", str(out), *FAST, "--bits", "16", "--finetune", "0"]
        assert runner.invoke(app, [*args, "--model-id", "m"]).exit_code == 0
    sample = folder_images(images).pixels
    first, second = (HashEncoder.load(o).encode_numpy(sample)[1] for o in outs)
    assert np.allclose(first, second, atol=1e-5)


def test_fit_on_a_stac_catalog_and_ingest_with_it(tmp_path: Path):
    catalog = _catalog(tmp_path)  # its own: ingest writes codes and chips back into it
    out = tmp_path / "stac-model"
    args = ["fit", str(catalog), "--out", str(out), "--chip", "32", "--bands", "red,green,blue"]
    result = runner.invoke(app, [*args, "--epochs", "2", "--batch-size", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "8 chips of red, green, blue at 32 px from 8 chips of 2 items" in _said(result)
    assert "per-band mean/std of the sample" in _said(result)
    encoder = HashEncoder.load(out)
    config = encoder.config
    assert (config.method, config.input_size, config.extra["labels"]) == ("contrastive", 32, "none")
    # the sample's statistics, in the scenes' units
    items = list(pystac.read_file(str(catalog)).get_items(recursive=True))  # type: ignore[attr-defined]
    rgb = ("red", "green", "blue")
    stats = BandStats.fit(item_chips(items, rgb, 32).pixels, rgb)
    assert config.mean == pytest.approx(stats.mean) and config.std == pytest.approx(stats.std)

    # ingest and serve take it like any other checkpoint
    ingested = runner.invoke(
        app, ["ingest", str(catalog), "--model", str(out), "--device", "cpu", "--readers", "1"]
    )
    assert ingested.exit_code == 0, ingested.output
    assert "2 encoded" in _said(ingested) and "8 chips" in _said(ingested)
    collection = pystac.Collection.from_file(str(catalog.parent / "scenes" / "collection.json"))
    (model,) = CBIRExtension.ext(collection).models
    assert (model.id, model.properties["method"], model.bits) == ("stac-model", "contrastive", 64)
    item = pystac.Item.from_file(str(catalog.parent / "scenes" / "s0" / "s0.json"))
    assert CBIRExtension.ext(item).get_code("stac-model") is not None


def test_fit_itq_is_the_fallback(catalog: Path, tmp_path: Path):
    out = tmp_path / "itq"
    args = ["fit", str(catalog), "--out", str(out), "--chip", "32", "--method", "itq"]
    result = runner.invoke(app, [*args, "--bits", "32"])
    assert result.exit_code == 0, result.output
    assert "64 views of red, green, blue at 32 px from 8 chips of 2 items" in _said(result)
    assert "ITQ 32-bit head (no training: the fallback)" in _said(result)
    encoder = HashEncoder.load(out)
    assert encoder.config.method == "itq" and encoder.config.extra["finetune"] == "frozen"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--bits", "40"], 2, "--bits must be one of"),
        (["--method", "lsh"], 2, "--method must be one of"),
        (["--finetune", "17"], 2, "--finetune takes 'all' or a block count"),
        (["--bands", "red,green,ultraviolet"], 2, "unknown bands ['ultraviolet']"),
        (["--chip", "128"], 1, "no chips of red, green, blue"),
        (["--model-id", "my model"], 2, "model id 'my model'"),
    ],
)
def test_fit_refuses_bad_input_clearly(
    catalog: Path, tmp_path: Path, args: list[str], code: int, message: str
):
    result = runner.invoke(
        app, ["fit", str(catalog), "--out", str(tmp_path / "m"), *args], terminal_width=200
    )
    assert result.exit_code == code, result.output
    assert message in _said(result)
    assert isinstance(result.exception, SystemExit)  # no traceback
    assert not (tmp_path / "m").exists()


def test_fit_refuses_empty_folders_and_missing_sources(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    empty = runner.invoke(app, ["fit", str(tmp_path / "empty"), "--out", str(tmp_path / "m")])
    assert empty.exit_code == 1 and "no image files" in _said(empty)
    assert isinstance(empty.exception, SystemExit)
    missing = runner.invoke(app, ["fit", str(tmp_path / "nope"), "--out", str(tmp_path / "m")])
    assert missing.exit_code == 2 and "not found" in _said(missing)
    (tmp_path / "bad.json").write_text('{"type": "Nonsense"}')
    bad = runner.invoke(app, ["fit", str(tmp_path / "bad.json"), "--out", str(tmp_path / "m")])
    assert bad.exit_code == 1 and "expected a STAC Catalog" in _said(bad)


def test_a_short_seeded_fit_learns_view_invariant_codes(images: Path):
    """The loss falls, and after the fit a chip's turned view is nearer to it than other chips
    are (cosine of the relaxed codes)."""
    sample = folder_images(images, 48)
    pixels = np.concatenate([sample.pixels, sample.pixels[:, :, ::-1]])  # 32 chips
    settings = FitSettings(bits=32, finetune=Finetune(2), epochs=8, batch_size=16, progress=False)
    rgb = ["red", "green", "blue"]
    stats = BandStats.fit(pixels, rgb)
    fit = fit_encoder(pixels, rgb, stats.mean, stats.std, settings, model_id="t", input_size=48)
    assert fit.losses is not None and fit.losses[1] < 0.75 * fit.losses[0]  # ~0.5 measured

    def unit(x: np.ndarray) -> np.ndarray:
        relaxed = fit.encoder.encode_numpy(np.ascontiguousarray(x))[1]
        return relaxed / np.linalg.norm(relaxed, axis=1, keepdims=True)

    codes, turned = unit(pixels), unit(np.rot90(pixels, 1, axes=(2, 3)))
    view = (codes * turned).sum(1).mean()
    n = len(codes)
    others = ~np.eye(n, dtype=bool) & ~np.roll(np.eye(n, dtype=bool), n // 2, axis=1)
    other = (codes @ codes.T)[others].mean()  # not itself, not its flipped copy
    assert view > other + 0.15  # measured over seeds 0-2: 0.70-0.80 against 0.41-0.43


def test_chip_sample_views_and_subsets_are_seeded(catalog: Path):
    items = list(pystac.read_file(str(catalog)).get_items(recursive=True))  # type: ignore[attr-defined]
    chips = item_chips(items, ("red", "green", "blue"), 32)
    assert chips.pixels.shape == (8, 3, 32, 32) and (chips.available, chips.sources) == (8, 2)
    views = item_chips(items, ("red", "green", "blue"), 32, views=True)
    assert len(views) == 64
    # every chip with its 8 flips/rotations: the sets of views match the chips'
    expected = {
        np.rot90(v, r, axes=(1, 2)).tobytes()
        for c in chips.pixels
        for v in (c, c[:, ::-1])
        for r in range(4)
    }
    assert {v.tobytes() for v in views.pixels} == expected
    some = item_chips(items, ("red", "green", "blue"), 32, views=True, max_chips=10, seed=3)
    assert len(some) == 10 and some.available == 8
    again = item_chips(items, ("red", "green", "blue"), 32, views=True, max_chips=10, seed=3)
    assert np.array_equal(some.pixels, again.pixels)
    with pytest.raises(ValueError, match="unknown bands"):
        item_chips(items, ("red", "infrared-ish"), 32)


def test_folder_sample_keeps_one_square_size_else_resizes(images: Path, tmp_path: Path):
    assert folder_images(images).pixels.shape == (16, 3, 32, 32)
    assert folder_images(images, 40, max_chips=5).pixels.shape == (5, 3, 40, 40)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (30, 20), (10, 20, 30)).save(mixed / "wide.png")
    Image.new("RGB", (50, 50), (10, 20, 30)).save(mixed / "square.jpg")
    (mixed / "broken.png").write_bytes(b"not a png")
    sample = folder_images(mixed)
    assert sample.pixels.shape == (2, 3, 120, 120) and len(sample.skipped) == 1
    assert sample.pixels.max() <= 255 and sample.pixels[:, 0].mean() == pytest.approx(10, abs=1)


def test_the_demo_and_the_example_choose_how_to_fit(tmp_path: Path):
    from stac_rscbir.demo import fit_model, fit_settings, run_demo

    assert fit_settings().method == "itq"
    trained = fit_settings("contrastive")
    assert (trained.finetune, trained.epochs) == (Finetune(2), 20.0)
    with pytest.raises(ValueError, match="unknown fit 'lsh'"):
        run_demo(tmp_path / "never", fit="lsh")
    assert not (tmp_path / "never").exists()  # refused before any work

    rng = np.random.default_rng(2)
    scene = np.moveaxis(_texture(2, 240, rng), -1, 0).astype(np.uint16) * 8 + 100
    item = raster_item("big", write_cog_at(tmp_path / "big.tif", scene, 10.0, nodata=0))
    ckpt, fitted = fit_model(
        [item], "scenes", tmp_path / "models", "efficientnet-lite0", 600, fit="contrastive"
    )
    assert ckpt.name == "scenes-efficientnet-lite0-contrastive-64" and fitted.chips == 4
    assert fitted.summary().startswith("ImageNet efficientnet-lite0 + contrastive 64-bit head")
    assert HashEncoder.load(ckpt).config.extra["labels"] == "none"

    from .test_example_public_stac import _load_example

    parser = _load_example().build_parser()
    assert parser.parse_args([]).fit == "itq"
    assert parser.parse_args(["--fit", "contrastive"]).fit == "contrastive"
