"""The pystac extension class: ext(), typed properties, apply, several models, summaries, hooks."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pystac
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stac_rscbir.extension import (
    CODES_PROP,
    MODEL_REL,
    SCHEMA_URI,
    CBIRExtension,
    CBIRFieldError,
    CBIRModel,
    ChipWindow,
    Descriptor,
    HashCode,
)
from stac_rscbir.extension.cbir import SummariesCBIRExtension

from .conftest import EXAMPLES


def make_item(item_id: str = "patch-1") -> pystac.Item:
    geom = {"type": "Point", "coordinates": [13.7, 48.2]}
    item = pystac.Item(item_id, geom, [13.7, 48.2, 13.7, 48.2], dt.datetime(2017, 6, 13), {})
    item.add_asset("B02", pystac.Asset("./B02.tif", media_type=pystac.MediaType.GEOTIFF))
    return item


def test_ext_requires_or_adds_the_schema_uri() -> None:
    item = make_item()
    assert not CBIRExtension.has_extension(item)
    with pytest.raises(pystac.ExtensionNotImplemented):
        CBIRExtension.ext(item)
    CBIRExtension.ext(item, add_if_missing=True)
    assert item.stac_extensions == [SCHEMA_URI]
    assert CBIRExtension.has_extension(item)
    with pytest.raises(pystac.ExtensionTypeError):
        CBIRExtension.ext(pystac.Catalog("c", "d"))  # type: ignore[type-var]


@given(
    st.sampled_from([16, 32, 64, 128, 256]),
    st.sampled_from(["big", "little"]),
    st.sampled_from(["base64", "hex"]),
    st.integers(0, 2**32 - 1),
)
def test_item_roundtrip_through_json_is_bit_exact(
    bits: int, order: str, enc: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    vec = rng.integers(0, 2, bits).astype(np.uint8)
    desc = rng.normal(size=24).astype(np.float32)
    item = make_item()
    CBIRExtension.ext(item, add_if_missing=True).add_code(
        HashCode.from_bits(
            "m", "1", vec, bit_order=order, encoding=enc, descriptor=Descriptor.create(desc)
        )
    )
    again = pystac.Item.from_dict(item.to_dict())
    code = CBIRExtension.ext(again).get_code("m")
    assert code is not None and code.bits == bits
    np.testing.assert_array_equal(code.bit_array(), vec)
    np.testing.assert_array_equal(code.descriptor.array(), desc)  # type: ignore[union-attr]


def test_words_constructor_matches_bits() -> None:
    words = np.array([0x8000000000000001, 42], dtype=np.uint64)
    code = HashCode.from_words("m", "1", words)
    assert code.bits == 128
    np.testing.assert_array_equal(code.words(), words)
    assert code.bit_array()[0] == 1 and code.bit_array()[63] == 1


def test_several_models_per_item_one_code_each() -> None:
    item = make_item()
    ext = CBIRExtension.ext(item, add_if_missing=True)
    s2 = HashCode.from_bits("s2-model", "1.0", np.ones(64, np.uint8))
    s1 = HashCode.from_bits("s1-model", "2.0", np.zeros(32, np.uint8))
    ext.apply(codes=[s2, s1])
    assert [c.model for c in ext.codes or []] == ["s2-model", "s1-model"]
    newer = HashCode.from_bits("s2-model", "1.1", np.zeros(64, np.uint8))
    ext.add_code(newer)  # replaces the code of the same model
    assert ext.get_code("s2-model").model_version == "1.1"  # type: ignore[union-attr]
    assert ext.get_code("s2-model", "1.0") is None
    ext.remove_code("s2-model")
    ext.remove_code("s1-model")
    assert CODES_PROP not in item.properties
    twice = r"cbir:codes\[1\]: a second code of model 's1-model' version '2\.0' \(first at \[0\]\)"
    with pytest.raises(CBIRFieldError, match=twice):
        ext.codes = [s1, s1]
    with pytest.raises(CBIRFieldError, match="needs at least one code"):
        ext.codes = []


def test_reading_a_corrupted_item_names_the_field() -> None:
    item = make_item()
    ext = CBIRExtension.ext(item, add_if_missing=True)
    ext.add_code(HashCode.from_bits("a", "1", np.ones(64, np.uint8)))
    ext.add_code(HashCode.from_bits("b", "1", np.ones(64, np.uint8)))
    item.properties[CODES_PROP][1]["code"] = "AAAA"
    with pytest.raises(CBIRFieldError, match=r"^cbir:codes\[1\]\.code: decodes to 24 bits"):
        ext.codes  # noqa: B018
    item.properties[CODES_PROP][1]["code"] = item.properties[CODES_PROP][0]["code"]
    del item.properties[CODES_PROP][1]["model_version"]
    with pytest.raises(CBIRFieldError, match=r"^cbir:codes\[1\]\.model_version: is required"):
        ext.codes  # noqa: B018


def test_asset_and_item_assets_codes() -> None:
    item = make_item()
    asset = item.assets["B02"]
    with pytest.raises(pystac.ExtensionNotImplemented):
        CBIRExtension.ext(asset)
    aext = CBIRExtension.ext(asset, add_if_missing=True)
    aext.add_code(HashCode.from_bits("m", "1", np.ones(16, np.uint8)))
    assert SCHEMA_URI in item.stac_extensions
    assert CODES_PROP in asset.extra_fields and CODES_PROP not in item.properties
    assert CBIRExtension.ext(item).codes is None  # asset codes are not the item's


def test_collection_models_and_model_checks() -> None:
    coll = pystac.Collection.from_file(str(EXAMPLES / "collection.json"))
    ext = CBIRExtension.ext(coll)
    models = ext.models or []
    assert {m.id for m in models} >= {"ben-s2-milan-64", "ben-s1-dhcnn-32"}
    s1 = ext.get_model("ben-s1-dhcnn-32")
    assert s1 is not None and s1.bands == ["VV", "VH"] and s1.encoding == "hex"
    good = HashCode.from_bits(
        s1.id, s1.version, np.ones(32, np.uint8), bit_order="little", encoding="hex"
    )
    s1.check_code(good)
    wrong = HashCode.from_bits(
        s1.id, s1.version, np.ones(64, np.uint8), bit_order="little", encoding="hex"
    )
    with pytest.raises(CBIRFieldError, match=r"^code\.bits: 64 differs from model ben-s1-dhcnn-32"):
        s1.check_code(wrong)
    with pytest.raises(CBIRFieldError, match=r"model\.bands: must be a non-empty list"):
        CBIRModel.create("x", "1", 64, [])
    with pytest.raises(CBIRFieldError, match=r"model\.id: 'bad id' is not a model identifier"):
        CBIRModel.create("bad id", "1", 64, ["red"])


def test_summaries_list_code_formats_without_values() -> None:
    coll = pystac.Collection(
        "c",
        "d",
        pystac.Extent(pystac.SpatialExtent([[0, 0, 1, 1]]), pystac.TemporalExtent([[None, None]])),
    )
    items = [make_item("a"), make_item("b")]
    for item, bits in zip(items, (64, 128), strict=True):
        CBIRExtension.ext(item, add_if_missing=True).add_code(
            HashCode.from_bits(
                "m" + str(bits),
                "1",
                np.ones(bits, np.uint8),
                descriptor=Descriptor.create(np.ones(4)),
            )
        )
    summary = CBIRExtension.summaries(coll, add_if_missing=True).summarize(items)
    assert [s["bits"] for s in summary] == [64, 128]
    assert all("code" not in s and "value" not in s["descriptor"] for s in summary)
    assert SummariesCBIRExtension(coll).codes == summary


def test_chip_window_and_model_link() -> None:
    item = make_item()
    ext = CBIRExtension.ext(item, add_if_missing=True)
    ext.chip = ChipWindow.create(
        512, 256, 128, 128, source_asset="image", source_shape=(1860, 2041)
    )
    assert ext.chip is not None and ext.chip.window == (512, 256, 128, 128)
    with pytest.raises(CBIRFieldError, match=r"cbir:chip\.window: extends beyond source_shape"):
        ChipWindow.create(2000, 0, 128, 128, source_shape=(1860, 2041))
    with pytest.raises(CBIRFieldError, match=r"cbir:chip\.window\.width: must be an integer >= 1"):
        ChipWindow.create(0, 0, 0, 128)
    link = ext.add_model_link("../collection.json", "s2-model")  # type: ignore[attr-defined]
    assert link.rel == MODEL_REL and link.extra_fields["cbir:model"] == "s2-model"


def test_extension_hooks_are_registered_through_entry_point() -> None:
    from pystac.extensions.hooks import RegisteredExtensionHooks

    from stac_rscbir.extension.cbir import CBIR_EXTENSION_HOOKS

    registry = RegisteredExtensionHooks()  # empty: nothing added by hand
    assert SCHEMA_URI not in registry.hooks
    registry.get_deprecation_message(make_item())  # any public use discovers the entry points
    assert registry.hooks[SCHEMA_URI] is CBIR_EXTENSION_HOOKS
