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


Writes = list[tuple[str, list[dict[str, Any]] | None]]  # (item id, its codes | None: delete)


def _follow_and_rebuild(
    store: ItemStore, index_dir: Path, name: str, versions: list[str], writes: Writes
) -> dict[tuple[str, str], HashCode]:
    """Declare model ``name`` in collection ``name`` in ``versions``, make ``writes`` (one
    transaction each) with an index following them (the hook reads the change log), rebuild
    another from the store; assert both hold the code the rule picks of each item (spelled out
    here: the last listed entry of the model, at the served version, that decodes, if 64 bits
    long), and that ``get_code`` agrees. The indexed codes."""
    kind = "sqlite" if isinstance(store, SQLiteStore) else "pgstac"
    collection = {**_collection(name), "id": name}
    collection["cbir:models"] = [CBIRModel.create(name, v, 64, ["red"]).to_dict() for v in versions]
    store.create_collection(collection)
    served = served_model(store, name)
    version = None if served is None else served.version
    assert version == (versions[-1] if versions else None)

    indexes = LiveIndexes(store, index_dir / "followed")
    try:
        followed = indexes.index(name)  # built now, then kept in step by the hook alone
        live: dict[str, dict[str, Any]] = {}
        for item_id, codes in writes:
            if codes is None:
                if item_id not in live:
                    continue
                store.delete_item(name, item_id)
                del live[item_id]
                indexes.on_item(name, None, item_id)
                continue
            item = _item(int(item_id.rsplit("-", 1)[1]), collection=name)
            item["id"] = item_id
            item["properties"]["cbir:codes"] = codes
            _write(store, kind, item)
            live[item_id] = item
            indexes.on_item(name, item, item_id)
        assert indexes.index(name) is followed, "a hook failed: the index was rebuilt"
    finally:
        indexes.close()
    rebuilt = LiveIndexes(store, index_dir / "rebuilt")
    try:
        again = rebuilt.index(name)  # from the store's iter_codes
    finally:
        rebuilt.close()
    assert _contents(followed) == _contents(again)

    expected: dict[tuple[str, str], HashCode] = {}
    for item_id, item in live.items():
        good = []
        for entry in item["properties"]["cbir:codes"]:
            if entry["model"] == name and version in (None, entry["model_version"]):
                with contextlib.suppress(CBIRFieldError):
                    good.append(HashCode.from_dict(entry))
        picked = code_of(item, name, version)
        assert (picked.to_dict() if picked else None) == (good[-1].to_dict() if good else None)
        got = CBIRExtension.ext(pystac.Item.from_dict(item)).get_code(name, version)
        assert (got.to_dict() if got else None) == (picked.to_dict() if picked else None)
        if picked is not None and picked.bits == 64:
            expected[(name, item_id)] = picked
    assert _contents(again) == {k: c.packed().tobytes() for k, c in expected.items()}
    for key, code in expected.items():
        if code.descriptor is not None:
            for index in (followed, again):
                np.testing.assert_array_equal(index.descriptor(key), code.descriptor.array())
    return expected


@given(data=st.data())
@EXAMPLES
def test_hook_and_rebuild_index_the_code_the_rule_picks(
    store: ItemStore, tmp_path: Path, data: st.DataObject
) -> None:
    n = next(_examples)
    name = f"rule-{n}"
    raw_sql = not isinstance(store, SQLiteStore)
    versions = data.draw(st.sampled_from(DECLARATIONS), label="declared versions")
    codes = entries(name, bool(versions), raw_sql)
    slot = st.integers(0, SLOTS - 1).map(lambda i: f"item-{i}")
    write = st.tuples(slot, st.one_of(codes, codes, codes, st.none()))
    writes = data.draw(st.lists(write, min_size=1, max_size=8), label="writes")
    _follow_and_rebuild(store, tmp_path / name, name, versions, writes)


def _code(model: str, version: str, fill: int) -> dict[str, Any]:
    return HashCode.from_bits(model, version, np.full(64, fill, np.uint8)).to_dict()


def test_the_cases_hook_and_rebuild_used_to_answer_differently(
    store: ItemStore, tmp_path: Path
) -> None:
    """The hook took the last entry, a rebuild the greatest version string (pgstac: of two
    codes of one version, either)."""
    name = "undeclared"
    writes: Writes = [
        ("item-0", [_code(name, "2", 1), _code(name, "10", 0), _code(name, "1", 0)]),
        ("item-1", [_code(name, "1", 0), _code("other", "1", 0), _code(name, "2", 1)]),
    ]
    got = _follow_and_rebuild(store, tmp_path / name, name, [], writes)
    assert {k[1]: c.model_version for k, c in got.items()} == {"item-0": "1", "item-1": "2"}
    if isinstance(store, SQLiteStore):
        return  # the SQLite store cannot hold what follows
    name = "declared"
    broken = {**_code(name, "1", 1), "code": "not base64!"}
    writes = [
        ("item-0", [_code(name, "1", 0), _code(name, "2", 0), _code(name, "1", 1)]),
        ("item-1", [_code(name, "1", 1), broken]),
    ]
    got = _follow_and_rebuild(store, tmp_path / name, name, ["2", "1"], writes)
    assert {k[1]: c.packed()[0] for k, c in got.items()} == {"item-0": 255, "item-1": 255}


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
