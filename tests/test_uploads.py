"""Uploaded query images (``similarity.image``) are decoded strictly and checked against what the
model takes (issue 15 B): a truncated or corrupt file, too few pixels, another band count or
pixel values in other units are a 400 naming the mismatch; GeoTIFF scale/offset is applied; a
good image is still ranked as brute force ranks it."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest
from fastapi.testclient import TestClient
from rasterio.io import MemoryFile

from stac_rscbir.api.app import create_api
from stac_rscbir.extension.cbir import (
    INPUT_DTYPES,
    CBIRFieldError,
    CBIRModel,
    Descriptor,
    HashCode,
)
from stac_rscbir.extension.validation import cbir_schema
from stac_rscbir.models.config import (
    CONFIG_NAME,
    DERIVED_UNITS,
    InputSpec,
    load_config,
    save_config,
)
from stac_rscbir.models.encoder import HashEncoder

from .api_builders import StoreFactory, _collection, _hamming, _item, rgb_checkpoint

MODEL = "rgb-refl-64"
#: The model of these tests takes uint16 reflectance x 10000, as Sentinel-2 L2A's files hold it.
REFLECTANCE = InputSpec((0, 10000), 16, "uint16", "reflectance x 10000")
N = 12


def _image(pixels: np.ndarray, driver: str = "PNG", **profile: Any) -> str:
    """``pixels`` (bands, rows, cols) as a base64 PNG or GeoTIFF of their dtype."""
    bands, rows, cols = pixels.shape
    with MemoryFile() as mem:
        with mem.open(
            driver=driver, width=cols, height=rows, count=bands, dtype=pixels.dtype, **profile
        ) as dst:
            dst.write(pixels)
        return base64.b64encode(mem.read()).decode()


def _model(folder: Path, values: InputSpec | None) -> HashEncoder:
    """The RGB test model, normalised for reflectance x 10000, with ``values`` as its input."""
    ckpt = rgb_checkpoint(folder, MODEL)
    config = replace(load_config(ckpt), mean=[1500.0] * 3, std=[800.0] * 3, input=values)
    save_config(ckpt, config)
    return HashEncoder.load(ckpt)


def _serve(
    store_factory: StoreFactory, folder: Path, values: InputSpec | None = REFLECTANCE
) -> tuple[TestClient, np.ndarray, np.ndarray]:
    """An API over N items coded by the model from random uint16 reflectance chips: (client,
    the chips, their bits)."""
    encoder = _model(folder / "model", values)
    chips = np.random.default_rng(5).integers(0, 10000, size=(N, 3, 32, 32), dtype=np.uint16)
    bits, relaxed = encoder.encode_numpy(chips.astype(np.float32))
    store = store_factory()
    store.create_collection(_collection("img"))
    items = []
    for i in range(N):
        it = _item(i, "img")
        code = HashCode.from_bits(MODEL, "1.0.0", bits[i], descriptor=Descriptor.create(relaxed[i]))
        it["properties"]["cbir:codes"] = [code.to_dict()]
        items.append(it)
    store.upsert_items(items)
    api = create_api(store, store_factory.index_dir, {MODEL: folder / "model"})
    return TestClient(api.app), chips, bits


def _query(client: TestClient, image: str, k: int = N) -> Any:
    body = {"limit": k, "similarity": {"model": MODEL, "image": image, "k": k}}
    return client.post("/search", json=body)


def _brute_force(bits: np.ndarray, query: int) -> list[tuple[int, str]]:
    return sorted((_hamming(bits[query], bits[i]), f"item-{i:03d}") for i in range(N))


def test_good_uploads_are_ranked_as_brute_force(
    store_factory: StoreFactory, tmp_path: Path
) -> None:
    """A 16-bit PNG and a uint16 GeoTIFF of a chip rank the items as brute force does."""
    client, chips, bits = _serve(store_factory, tmp_path)
    with client:
        for image in (_image(chips[4]), _image(chips[4], "GTiff", compress="deflate")):
            r = _query(client, image)
            assert r.status_code == 200, r.text
            got = [(f["properties"]["cbir:distance"], f["id"]) for f in r.json()["features"]]
            assert got == _brute_force(bits, 4)


def _truncated(pixels: np.ndarray) -> str:
    """The first 200 bytes of a PNG of ``pixels``."""
    return base64.b64encode(base64.b64decode(_image(pixels))[:200]).decode()


def _png_with_extra_rows(pixels: np.ndarray) -> str:
    """A 16-bit RGB PNG of ``pixels`` whose image data holds twice the rows its header says:
    GDAL reads it with only a warning (libpng: "Too much image data")."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows, cols = pixels.shape[1:]
    lines = [b"\0" + row.astype(">u2").tobytes() for row in np.moveaxis(pixels, 0, -1)]
    header = struct.pack(">IIBBBBB", cols, rows, 16, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"".join(lines * 2)))
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(data).decode()


#: name -> (the upload, made from the chips; words the 400 must contain)
BAD_UPLOADS: dict[str, tuple[Any, list[str]]] = {
    # GDAL decodes an 8-bit PNG whole, and filled a truncated one with garbage without a word
    "truncated 8-bit PNG": (
        lambda c: _truncated((c[4] // 40).astype(np.uint8)),
        ["truncated or corrupt", "libpng"],
    ),
    "truncated 16-bit PNG": (lambda c: _truncated(c[4]), ["truncated or corrupt", "libpng"]),
    "corrupt PNG read with a GDAL warning": (
        lambda c: _png_with_extra_rows(c[4]),
        ["damaged", "Too much image data"],
    ),
    "truncated GeoTIFF": (
        lambda c: base64.b64encode(base64.b64decode(_image(c[4], "GTiff"))[:3000]).decode(),
        ["truncated or corrupt", "TIFF"],
    ),
    "1x1": (lambda c: _image(c[4][:, :1, :1]), ["1 x 1 px", "at least 16 x 16"]),
    "8x8": (lambda c: _image(c[4][:, :8, :8]), ["8 x 8 px", "at least 16 x 16"]),
    "8-bit PNG": (
        lambda c: _image((c[4] // 40).astype(np.uint8)),
        ["8-bit PNG (values 0 to 255)", "uint16 values 0 to 10000 (reflectance x 10000)"],
    ),
    "4 bands": (
        lambda c: _image(np.concatenate([c[4], c[5][:1]])),
        ["4 band(s) given", "takes 3 (red, green, blue)"],
    ),
    "1 band": (lambda c: _image(c[4][:1]), ["1 band(s) given", "takes 3"]),
    "reflectance 0-1 scaled wrongly": (
        lambda c: _image(c[4].astype(np.float32) * 10, "GTiff"),
        ["32-bit float GeoTIFF has values", "uint16 values 0 to 10000"],
    ),
    "NaN": (
        lambda c: _image(np.where(c[4] > 5000, np.nan, c[4]).astype(np.float32), "GTiff"),
        ["NaN or infinite"],
    ),
}


def test_bad_uploads_are_400_naming_the_mismatch(
    store_factory: StoreFactory, tmp_path: Path
) -> None:
    """Each bad upload of issue 15 B is a 400 whose message says what does not fit; none is
    ranked (before: a truncated PNG, 1x1, 8x8 and 8-bit images all returned a ranking)."""
    client, chips, _ = _serve(store_factory, tmp_path)
    with client:
        for name, (make, words) in BAD_UPLOADS.items():
            r = _query(client, make(chips))
            assert r.status_code == 400, (name, r.status_code, r.text)
            text = json.dumps(r.json())
            assert "similarity.image" in text, (name, text)
            for word in words:
                assert word in text, (name, word, text)


def test_geotiff_scale_offset_is_applied(store_factory: StoreFactory, tmp_path: Path) -> None:
    """A model fitted on reflectance 0-1 (items with ``raster:bands`` scale) takes a uint16
    GeoTIFF whose scale/offset tags give that reflectance: the same codes as the float file."""
    values = InputSpec((0.0, 1.0), 16, "float32", "reflectance")
    client, chips, _ = _serve(store_factory, tmp_path, values)
    refl = chips[4].astype(np.float32) / 10000
    with client:
        as_float = _query(client, _image(refl, "GTiff"))
        assert as_float.status_code == 200, as_float.text
        scaled = _image(chips[4], "GTiff")
        with MemoryFile(base64.b64decode(scaled)) as mem, mem.open() as src:
            assert src.scales == (1.0,) * 3  # the plain uint16 file is in DN: 0-10000
        r = _query(client, scaled)
        assert r.status_code == 400 and "has values 0" in r.text, r.text
        with MemoryFile() as mem:
            with mem.open(driver="GTiff", width=32, height=32, count=3, dtype="uint16") as dst:
                dst.write(chips[4])
                dst.scales = (1e-4,) * 3
                dst.offsets = (0.0,) * 3
            tagged = base64.b64encode(mem.read()).decode()
        r = _query(client, tagged)
        assert r.status_code == 200, r.text
        assert [f["id"] for f in r.json()["features"]] == [
            f["id"] for f in as_float.json()["features"]
        ]


def test_input_spec_of_sample_and_derived(tmp_path: Path) -> None:
    """The checkpoint says what it takes: narrowest type and range of the fitting sample; a
    checkpoint saved without ``input`` still loads and gets it from its normalisation."""
    assert InputSpec.of_sample(np.array([0, 255.0]), 16).dtype == "uint8"
    assert InputSpec.of_sample(np.array([3, 9000.0]), 16).dtype == "uint16"
    assert InputSpec.of_sample(np.array([-25.5, 2.0, np.nan]), 16).value_range == (-25.5, 2.0)
    assert InputSpec.of_sample(np.array([-25.5, 2.0]), 16).dtype == "float32"
    ckpt = rgb_checkpoint(tmp_path / "old", "old-model")  # mean 120, std 60, input size 32
    raw = json.loads((ckpt / CONFIG_NAME).read_text())
    assert raw.pop("input") is None
    (ckpt / CONFIG_NAME).write_text(json.dumps(raw))
    config = HashEncoder.load(ckpt).config
    assert config.input is None
    assert config.input_of(0) == InputSpec((0.0, 240.0), 16, units=DERIVED_UNITS)
    explicit = _model(tmp_path / "new", REFLECTANCE).config
    assert load_config(tmp_path / "new").input == REFLECTANCE == explicit.input
    with pytest.raises(ValueError, match="8-bit PNG"):
        REFLECTANCE.check("m", "8-bit PNG", "uint8", (32, 32), (0.0, 255.0))
    REFLECTANCE.check("m", "16-bit PNG", "uint16", (16, 40), (0.0, 12000.0))


def test_ingestion_describes_the_models_input(tmp_path: Path) -> None:
    """Ingestion writes the checkpoint's input (saved, or derived for an old checkpoint) into
    the ``cbir:models`` entry, where the schema accepts it."""
    from stac_rscbir.ingest.worker import IngestOptions, Ingestor

    options = IngestOptions(device="cpu", progress=False)
    for values, expected in (
        (REFLECTANCE, REFLECTANCE.to_stac()),
        (None, {"value_range": [-100.0, 3100.0], "min_size": 16, "units": DERIVED_UNITS}),
    ):
        entry = Ingestor(_model(tmp_path / str(values), values), options).model_description()
        assert entry.to_dict()["input"] == {"chip_size": [32, 32], **expected}


def test_model_entry_states_its_input() -> None:
    """The ``cbir:models`` entry carries the input values; bad ones name their field."""
    model = CBIRModel.create(
        MODEL,
        "1.0.0",
        64,
        ["red", "green", "blue"],
        chip_size=(32, 32),
        values=REFLECTANCE.to_stac(),
    )
    assert model.to_dict()["input"] == {
        "chip_size": [32, 32],
        "value_range": [0.0, 10000.0],
        "min_size": 16,
        "dtype": "uint16",
        "units": "reflectance x 10000",
    }
    schema = cbir_schema()
    definition = schema["definitions"]["model_input"]
    assert tuple(definition["properties"]["dtype"]["enum"]) == INPUT_DTYPES
    only_input = {"definitions": schema["definitions"], "$ref": "#/definitions/model_input"}
    jsonschema.Draft7Validator(only_input).validate(model.to_dict()["input"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(only_input).validate({"dtype": "uint12"})
    for bad, field in (
        ({"value_range": [5, 1]}, "input.value_range"),
        ({"dtype": "uint12"}, "input.dtype"),
        ({"min_size": 0}, "input.min_size"),
    ):
        with pytest.raises(CBIRFieldError, match=field):
            CBIRModel.create(MODEL, "1.0.0", 64, ["red"], values=bad)
