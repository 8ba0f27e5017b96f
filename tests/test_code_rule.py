"""One rule for "the code of model M on an item" (issue 16, part 4), on both stores.

``stac_rscbir.extension.cbir.code_of`` is the rule: of the item's ``cbir:codes`` entries of the
model (at the version the index serves, when a Collection declares one) that decode, the one
listed last. The transaction hook (``LiveIndexes.on_item``: the written item on SQLite, the
items the change log names, read back, on pgstac), a rebuild from the store (``iter_codes`` +
``HashIndex.build``) and ``CBIRExtension.get_code`` all apply it, so an index that followed the
writes one by one and one rebuilt from the store hold identical codes, whatever the items
carry: several versions of the model, other models, codes of another bit length and, where the
store can hold them (pgstac, written by SQL behind the API), two codes of one version and
entries that do not decode. The API and both stores refuse two codes of one model and one
version (tests/test_write_checks.py).
"""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stac_rscbir.extension.cbir import CBIRExtension, CBIRModel, Descriptor, HashCode, code_of
from stac_rscbir.extension.codec import CBIRFieldError
from stac_rscbir.index.hashindex import HashIndex
from stac_rscbir.index.live import LiveIndexes
from stac_rscbir.store.base import ItemStore
from stac_rscbir.store.models import served_model
from stac_rscbir.store.sqlite import SQLiteStore

from .api_builders import StoreFactory, _collection, _item

VERSIONS = ("1", "2", "3")
# what a collection declares of the model: nothing (the index serves every version, the rule
# picks among them), one version, or two (the index serves the one listed last)
DECLARATIONS = ([], [], ["1"], ["1", "2"], ["2", "1"], ["3"])
SLOTS = 4  # item ids the writes choose from, so that items are updated and deleted
EXAMPLES = settings(
    max_examples=30,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_examples = itertools.count()


@st.composite
def entries(draw: st.DrawFn, model: str, declared: bool, raw_sql: bool) -> list[dict[str, Any]]:
    """The ``cbir:codes`` of one item: codes of ``model`` in any version (two of one version
    and undecodable entries only when ``raw_sql`` writes them behind the stores' checks; 32-bit
    codes only when ``declared`` fixes the index's bit length), and codes of another model."""
    kinds = ["code", "code", "code", "other"] + (["short"] if declared else [])
    out: list[dict[str, Any]] = []
    for kind in draw(st.lists(st.sampled_from(kinds), max_size=5)):
        version = draw(st.sampled_from(VERSIONS))
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        bits = rng.integers(0, 2, 32 if kind == "short" else 64, dtype=np.uint8)
        desc = Descriptor.create(rng.normal(size=8)) if draw(st.booleans()) else None
        name = "other-model" if kind == "other" else model
        out.append(HashCode.from_bits(name, version, bits, descriptor=desc).to_dict())
    if raw_sql and out and draw(st.booleans()):
        out.insert(draw(st.integers(0, len(out))), {**out[0], "code": "not base64!"})
    if raw_sql:
        return out
    firsts: dict[tuple[str, str], dict[str, Any]] = {}  # the stores refuse a second code of
    for e in out:  # one model and one version: keep the first
        firsts.setdefault((e["model"], e["model_version"]), e)
    return [e for e in out if firsts[(e["model"], e["model_version"])] is e]


def _write(store: ItemStore, kind: str, item: dict[str, Any]) -> None:
    """One transaction writing ``item``: the store's own write on SQLite, SQL on pgstac (as
    ``pypgstac load`` or any client may write, behind the stores' checks)."""
    if kind == "sqlite":
        store.upsert_items([item])
        return
    import psycopg

    with psycopg.connect(store.dsn) as conn:  # type: ignore[attr-defined]
        conn.execute("SET search_path TO pgstac, public")
        conn.execute("SELECT pgstac.upsert_item(%s::jsonb)", (json.dumps(item),))


def _contents(index: HashIndex) -> dict[tuple[str, str], bytes]:
    """What the index holds: key -> packed code."""
    return {key: index.code(key) for key in index.keys()}  # noqa: SIM118 (no __iter__)


@pytest.fixture
def store(store_factory: StoreFactory) -> ItemStore:
    """One store of each kind for all the examples of a test (each example its own model)."""
    return store_factory()


@given(data=st.data())
@EXAMPLES
def test_hook_and_rebuild_index_the_code_the_rule_picks(
    store: ItemStore, tmp_path: Path, data: st.DataObject
) -> None:
    n = next(_examples)
    kind = "sqlite" if isinstance(store, SQLiteStore) else "pgstac"
    model, cid = f"rule-{n}", f"rule-{n}"
    versions = data.draw(st.sampled_from(DECLARATIONS), label="declared versions")
    collection = {**_collection(cid), "id": cid}
    declared = [CBIRModel.create(model, v, 64, ["red"]).to_dict() for v in versions]
    collection["cbir:models"] = declared
    store.create_collection(collection)
    served = served_model(store, model)
    version = None if served is None else served.version
    assert version == (versions[-1] if versions else None)

    indexes = LiveIndexes(store, tmp_path / f"index-{n}")
    try:
        followed = indexes.index(model)  # built now, then kept in step by the hook alone
        live: dict[str, dict[str, Any]] = {}
        ops = st.tuples(st.sampled_from(["put", "put", "put", "delete"]), st.integers(0, SLOTS - 1))
        for op, slot in data.draw(st.lists(ops, min_size=1, max_size=8), label="writes"):
            item_id = f"item-{slot}"
            with indexes.writing():
                if op == "delete":
                    if item_id not in live:
                        continue
                    store.delete_item(cid, item_id)
                    del live[item_id]
                    indexes.on_item(cid, None, item_id)
                    continue
                item = _item(slot, collection=cid)
                item["id"] = item_id
                item["properties"]["cbir:codes"] = data.draw(
                    entries(model, bool(versions), kind == "pgstac"), label=f"{item_id} codes"
                )
                _write(store, kind, item)
                live[item_id] = item
                indexes.on_item(cid, item, item_id)
        assert indexes.index(model) is followed, "a hook failed: the index was rebuilt"
    finally:
        indexes.close()

    rebuilt = LiveIndexes(store, tmp_path / f"rebuilt-{n}")
    try:
        again = rebuilt.index(model)  # from the store's iter_codes
    finally:
        rebuilt.close()
    assert _contents(followed) == _contents(again)

    # the rule itself, spelled out: the last listed entry of the model (at the served
    # version) that decodes, in the index when of the index's bit length (64)
    expected: dict[tuple[str, str], HashCode] = {}
    for item_id, item in live.items():
        good = []
        for entry in item["properties"]["cbir:codes"]:
            if entry["model"] == model and version in (None, entry["model_version"]):
                with contextlib.suppress(CBIRFieldError):
                    good.append(HashCode.from_dict(entry))
        picked = code_of(item, model, version)
        assert (picked.to_dict() if picked else None) == (good[-1].to_dict() if good else None)
        got = CBIRExtension.ext(pystac.Item.from_dict(item)).get_code(model, version)
        assert (got.to_dict() if got else None) == (picked.to_dict() if picked else None)
        if picked is not None and picked.bits == 64:
            expected[(cid, item_id)] = picked
    assert _contents(again) == {k: c.packed().tobytes() for k, c in expected.items()}
    for key, code in expected.items():
        if code.descriptor is not None:
            for index in (followed, again):
                np.testing.assert_array_equal(index.descriptor(key), code.descriptor.array())


def test_code_of_reads_items_properties_and_asset_fields() -> None:
    older = HashCode.from_bits("m", "1", np.zeros(64, np.uint8))
    newer = HashCode.from_bits("m", "2", np.ones(64, np.uint8))
    props = {"cbir:codes": [newer.to_dict(), older.to_dict(), {"model": "m", "code": "?"}]}
    item = {"type": "Feature", "id": "a", "properties": props}
    for obj in (item, props):
        assert code_of(obj, "m").model_version == "1"  # type: ignore[union-attr]
        assert code_of(obj, "m", "2").model_version == "2"  # type: ignore[union-attr]
        assert code_of(obj, "m", "3") is None and code_of(obj, "n") is None
    assert code_of({"properties": {"cbir:codes": "no list"}}, "m") is None


@pytest.mark.parametrize("scope", ["item", "asset"])
def test_get_code_is_the_rule(scope: str) -> None:
    pitem = pystac.Item.from_dict(_item(0))
    v1 = HashCode.from_bits("m", "1", np.zeros(64, np.uint8))
    v2 = HashCode.from_bits("m", "2", np.ones(64, np.uint8))
    pitem.add_asset("image", pystac.Asset("image.tif"))
    target = pitem if scope == "item" else pitem.assets["image"]
    ext = CBIRExtension.ext(target, add_if_missing=True)
    ext.codes = [v2, v1]
    assert ext.get_code("m").model_version == "1"  # type: ignore[union-attr]
    assert ext.get_code("m", "2").model_version == "2"  # type: ignore[union-attr]
