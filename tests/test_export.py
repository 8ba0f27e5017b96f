"""`stac-rscbir export` / `import`: a collection's codes and descriptors as stac-geoparquet.

Round trips from a SQLite store and from a pgstac store into a new store give identical
rankings (brute force over ``iter_codes``) and identical ``cbir:codes``; the code column
unpacks to the bits of ``code_of``; the file reads with plain pyarrow and geopandas; bad input
is a clear CLI error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from stac_rscbir.cli import app
from stac_rscbir.extension import CBIRModel, HashCode
from stac_rscbir.extension.cbir import code_of
from stac_rscbir.store.sqlite import SQLiteStore

from .api_builders import MODEL, _collection, _item

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("stac_geoparquet")

runner = CliRunner()
N = 60
LITTLE = "test-little-32"  # a second model: 32 bits, little bit order, no descriptor


def _items(cid: str = "scenes") -> list[dict[str, Any]]:
    """N items with a code (and descriptor) of MODEL; every other one also a LITTLE code."""
    items = []
    for i in range(N):
        item = _item(i, cid)
        if i % 2 == 0:
            bits = np.random.default_rng(500 + i).integers(0, 2, 32)
            code = HashCode.from_bits(LITTLE, "2.0", bits, bit_order="little")
            item["properties"]["cbir:codes"].append(code.to_dict())
        items.append(item)
    return items


def _source_collection(cid: str = "scenes") -> dict[str, Any]:
    collection = _collection(cid)
    little = CBIRModel.create(LITTLE, "2.0", 32, ["red"], bit_order="little", resolution=10.0)
    collection["cbir:models"].append(little.to_dict())
    return collection


def _fill(store: Any) -> None:
    for cid in ("scenes", "others"):  # only the exported collection may reach the file
        store.create_collection(_source_collection(cid))
        store.upsert_items(_items(cid) if cid == "scenes" else _items(cid)[:5])


@contextmanager
def _store(kind: str, tmp: Path, name: str, request: pytest.FixtureRequest) -> Iterator[Any]:
    """(CLI options, an open store) of a new store of ``kind``."""
    if kind == "sqlite":
        store = SQLiteStore(tmp / f"{name}.db")
        try:
            yield ["--db", str(tmp / f"{name}.db")], store
        finally:
            store.close()
        return
    from stac_rscbir.store.pgstac import PgstacStore

    from .conftest import fresh_pgstac_db

    pgstac_dsn = request.getfixturevalue("pgstac_dsn")
    request.getfixturevalue("pgstac_template")
    with fresh_pgstac_db(pgstac_dsn) as dsn:
        store = PgstacStore(dsn)
        try:
            yield ["--dsn", dsn], store
        finally:
            store.close()


def _rankings(store: Any, model: str) -> list[list[tuple[int, tuple[str, str]]]]:
    """Brute force over the codes of the store's "scenes": for each of 8 queries (the first
    codes), every item by (Hamming distance, key)."""
    codes = sorted(
        (c for c in store.iter_codes(model) if c.key[0] == "scenes"), key=lambda c: c.key
    )
    keys = [c.key for c in codes]
    packed = np.stack([np.frombuffer(c.code, dtype=np.uint8) for c in codes])
    out = []
    for q in range(8):
        dist = np.unpackbits(packed ^ packed[q], axis=1).sum(axis=1)
        out.append(sorted(zip(dist.tolist(), keys, strict=True)))
    return out


def _invoke(args: list[str]) -> Any:
    result = runner.invoke(app, args, terminal_width=250)
    assert "Traceback" not in result.output
    return result


@pytest.mark.parametrize("kind", ["sqlite", "pgstac"])
def test_round_trip_gives_identical_rankings(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    out = tmp_path / "export" / "scenes.parquet"
    with _store(kind, tmp_path, "source", request) as (opts, source):
        _fill(source)
        result = _invoke(
            ["export", str(out), "--collection", "scenes", *opts, "--batch-size", "25"]
        )
        assert result.exit_code == 0, result.output
        assert f"{N} items" in result.output
        originals = {i["id"]: i for batch in source.iter_items("scenes", 1000) for i in batch}
        before = {m: _rankings(source, m) for m in (MODEL, LITTLE)}
        descriptors = {
            c.key: c.descriptor for c in source.iter_codes(MODEL) if c.key[0] == "scenes"
        }
    assert pq.ParquetFile(out).metadata.num_row_groups == 3  # one per batch of 25
    with _store(kind, tmp_path, "target", request) as (opts, target):
        result = _invoke(["import", str(out), *opts, "--batch-size", "7"])
        assert result.exit_code == 0, result.output
        assert target.get_collection("scenes")["cbir:models"] == _source_collection()["cbir:models"]
        assert "emb:type" not in target.get_collection("scenes")
        for m in (MODEL, LITTLE):
            assert _rankings(target, m) == before[m]
        assert {c.key: c.descriptor for c in target.iter_codes(MODEL)} == descriptors
        copies = {i["id"]: i for batch in target.iter_items("scenes", 1000) for i in batch}
    assert copies.keys() == originals.keys()
    for iid, item in originals.items():
        copy = copies[iid]
        assert sorted(copy["properties"]["cbir:codes"], key=lambda e: e["model"]) == sorted(
            item["properties"]["cbir:codes"], key=lambda e: e["model"]
        )
        assert copy["geometry"] == item["geometry"]
        assert copy["properties"]["platform"] == item["properties"]["platform"]


def test_code_column_holds_the_packed_bits_of_code_of(tmp_path: Path) -> None:
    db, out = tmp_path / "a.db", tmp_path / "a.parquet"
    with SQLiteStore(db) as store:
        _fill(store)
    result = _invoke(["export", str(out), "--collection", "scenes", "--db", str(db)])
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    items = {i["id"]: i for i in _items()}
    assert sorted(table.column("id").to_pylist()) == sorted(items)
    assert set(table.column("collection").to_pylist()) == {"scenes"}
    ids = table.column("id").to_pylist()
    for model, nbytes, order in ((MODEL, 8, "big"), (LITTLE, 4, "little")):
        column = f"cbir:code:{model}"
        field = table.schema.field(column)
        assert str(field.type) == f"fixed_size_binary[{nbytes}]"
        assert json.loads(field.metadata[b"cbir:model"])["bit_order"] == order
        for iid, value in zip(ids, table.column(column).to_pylist(), strict=True):
            code = code_of(items[iid], model)
            if code is None:
                assert value is None
                continue
            bits = np.unpackbits(np.frombuffer(value, dtype=np.uint8), bitorder=order)
            assert np.array_equal(bits, code.bit_array())
            assert value == code.packed().tobytes()
    desc = table.column(f"cbir:descriptor:{MODEL}")
    assert str(desc.type) == "fixed_size_list<element: float>[64]"
    first = table.column("id").to_pylist()[0]
    expected = code_of(items[first], MODEL).descriptor.array()  # type: ignore[union-attr]
    assert np.array_equal(np.asarray(desc[0].as_py(), dtype=np.float32), expected)
    assert f"cbir:descriptor:{LITTLE}" not in table.column_names  # a model without descriptors

    # the collection, described with the Embedding extension, in the file and beside it
    meta = json.loads(table.schema.metadata[b"stac-geoparquet"])["collections"]["scenes"]
    sidecar = json.loads((tmp_path / "a.collection.json").read_text())
    assert meta == sidecar
    assert (
        "https://stac-extensions.github.io/embeddings/v0.0.1/schema.json"
        in (sidecar["stac_extensions"])
    )
    assert (sidecar["emb:type"], sidecar["emb:dimensions"], sidecar["data_type"]) == (
        "chip",
        64,
        "float32",
    )
    assert sidecar["assets"]["embeddings"]["href"] == "./a.parquet"
    assert "geo" in {k.decode() for k in table.schema.metadata}


def test_one_model_and_an_mlm_link(tmp_path: Path) -> None:
    db, out = tmp_path / "a.db", tmp_path / "little.parquet"
    with SQLiteStore(db) as store:
        collection = _source_collection()
        collection["cbir:models"][1]["href"] = "https://example.org/models/little.json"
        store.create_collection(collection)
        store.upsert_items(_items())
    result = _invoke(
        ["export", str(out), "--collection", "scenes", "--db", str(db), "--model", f"{LITTLE}@2.0"]
    )
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert [c for c in table.column_names if c.startswith("cbir:")] == [f"cbir:code:{LITTLE}"]
    assert table.column(f"cbir:code:{LITTLE}").null_count == N // 2
    sidecar = json.loads(out.with_name("little.collection.json").read_text())
    assert (sidecar["emb:dimensions"], sidecar["data_type"], sidecar["gsd"]) == (32, "other", 10.0)
    assert {"rel": "emb:model", "href": "https://example.org/models/little.json"}.items() <= (
        next(link for link in sidecar["links"] if link["rel"] == "emb:model").items()
    )


def test_reads_with_geopandas(tmp_path: Path) -> None:
    geopandas = pytest.importorskip("geopandas")
    db, out = tmp_path / "a.db", tmp_path / "a.parquet"
    with SQLiteStore(db) as store:
        _fill(store)
    assert _invoke(["export", str(out), "--collection", "scenes", "--db", str(db)]).exit_code == 0
    frame = geopandas.read_parquet(out)
    assert len(frame) == N
    assert frame.crs.to_epsg() == 4326
    assert frame.geometry.iloc[0].geom_type == "Polygon"


def test_export_from_a_static_catalog(tmp_path: Path) -> None:
    import pystac

    catalog = pystac.Catalog("root", "a catalog")
    collection = pystac.Collection.from_dict(_source_collection())
    catalog.add_child(collection)
    for item in _items()[:10]:
        collection.add_item(pystac.Item.from_dict(item))
    catalog.normalize_and_save(str(tmp_path / "cat"), pystac.CatalogType.SELF_CONTAINED)
    out = tmp_path / "cat.parquet"
    result = _invoke(
        [
            "export",
            str(out),
            "--collection",
            "scenes",
            "--catalog",
            str(tmp_path / "cat" / "catalog.json"),
        ]
    )
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).num_rows == 10
    with SQLiteStore(tmp_path / "b.db") as store:
        pass
    result = _invoke(["import", str(out), "--db", str(tmp_path / "b.db")])
    assert result.exit_code == 0, result.output
    with SQLiteStore(tmp_path / "b.db") as store:
        assert len(list(store.iter_codes(MODEL))) == 10


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    with SQLiteStore(db) as store:
        _fill(store)
    out = str(tmp_path / "x.parquet")
    pq.write_table(pa.table({"id": ["a"]}), tmp_path / "plain.parquet")
    cases = [
        (["export", out, "--collection", "nope", "--db", str(db)], "collection 'nope' not found"),
        (
            ["export", out, "--collection", "scenes", "--db", str(db), "--model", "nope"],
            "model 'nope' is not declared",
        ),
        (
            ["export", out, "--collection", "scenes", "--db", str(db), "--model", f"{MODEL}@9"],
            "is not declared",
        ),
        (
            ["export", str(db / "x.parquet"), "--collection", "scenes", "--db", str(db)],
            "cannot write",
        ),
        (["export", str(tmp_path), "--collection", "scenes", "--db", str(db)], "is a folder"),
        (["export", out, "--collection", "scenes", "--db", str(tmp_path / "no.db")], "not found"),
        (["export", out, "--collection", "scenes"], "exactly one of --db"),
        (["import", str(tmp_path / "none.parquet"), "--db", str(db)], "file not found"),
        (["import", str(db), "--db", str(tmp_path / "b.db")], "not a readable Parquet file"),
        (
            ["import", str(tmp_path / "plain.parquet"), "--db", str(tmp_path / "b.db")],
            "not an export of stac-rscbir",
        ),
    ]
    for args, message in cases:
        result = _invoke(args)
        assert result.exit_code != 0, args
        assert isinstance(result.exception, SystemExit), (args, result.exception)
        assert message in " ".join(result.output.split()), (args, result.output)
    assert not (tmp_path / "no.db").exists()
    assert not Path(out).exists()


def test_descriptors_keep_their_dtype_when_the_model_declares_none(tmp_path: Path) -> None:
    from stac_rscbir.extension import Descriptor

    collection = _collection()
    collection["cbir:models"] = [CBIRModel.create("f16", "1", 32, ["red"]).to_dict()]
    items = []
    for i in range(6):
        item = _item(i)
        rng = np.random.default_rng(i)
        desc = Descriptor.create(rng.normal(size=16), dtype="float16")
        code = HashCode.from_bits("f16", "1", rng.integers(0, 2, 32), descriptor=desc)
        item["properties"]["cbir:codes"] = [code.to_dict()]
        items.append(item)
    with SQLiteStore(tmp_path / "a.db") as store:
        store.create_collection(collection)
        store.upsert_items(items)
    out = tmp_path / "f16.parquet"
    result = _invoke(["export", str(out), "--collection", "scenes", "--db", str(tmp_path / "a.db")])
    assert result.exit_code == 0, result.output
    field = pq.read_schema(out).field("cbir:descriptor:f16")
    assert str(field.type) == "fixed_size_list<element: float>[16]"
    assert field.metadata[b"cbir:descriptor_dtype"] == b"float16"
    assert _invoke(["import", str(out), "--db", str(tmp_path / "b.db")]).exit_code == 0
    with SQLiteStore(tmp_path / "b.db") as store:
        for item in items:
            copy = store.get_item("scenes", item["id"])
            assert copy["properties"]["cbir:codes"] == item["properties"]["cbir:codes"]
