"""Bulk export of a collection's codes and descriptors as stac-geoparquet, and the re-import.

The file is what stac-geoparquet writes for the items (``stac_geoparquet.arrow``: ``id``,
``geometry`` as WKB, ``bbox``, ``datetime``, ``collection``, ``links``, ``assets``, the other
properties as columns, GeoParquet ``geo`` metadata), one row per item, plus a column pair per
exported model:

* ``cbir:code:<model>``: ``fixed_size_binary(bits / 8)``, the packed code exactly as
  :meth:`~stac_rscbir.extension.cbir.HashCode.packed` gives it (the extension's byte order and
  the model's ``bit_order``: ``numpy.unpackbits(code, bitorder=bit_order)`` is the bit vector);
* ``cbir:descriptor:<model>``: ``fixed_size_list<float32>[dim]``, when the model has descriptors.

A row without a code of the model's exported version (the one the Collection lists last in
``cbir:models``, or the one asked for) holds nulls there. Each column's Arrow field metadata
``cbir:model`` is the model's ``cbir:models`` entry (JSON), a descriptor column's
``cbir:descriptor_dtype`` the dtype the items stored (float16 descriptors come back as float16):
the file describes itself. The ``cbir:codes`` property is not a column; the re-import rebuilds
it from these columns (codes of other models or versions, and a code entry's ``bands``, are not
exported).

The Collection goes into the file's ``stac-geoparquet`` metadata (``collections``) and into a
sidecar ``<name>.collection.json``, described with the fields of the proposed STAC Embedding
extension (geo-embeddings/embeddings-stac-specification, ``emb:``) for the first exported
model: ``emb:type`` ``chip``, ``emb:dimensions`` and ``data_type`` of its descriptor column
(``float32``; of its code when it has none: ``bits`` dimensions, ``data_type`` ``other``),
``gsd`` and ``emb:chip_layout`` from its declared input, ``emb:fit_for_use`` ``retrieval``,
an ``emb:model`` link to the model's MLM Item or checkpoint where the Collection names one,
and the file as the ``embeddings`` asset. The re-import strips these additions again.

Both passes stream: the items are read batch by batch twice (stac-geoparquet's schema
inference, then the conversion), and each batch is one row group of the file.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stac_rscbir.extension.cbir import (
    CODES_PROP,
    MODEL_REL,
    CBIRModel,
    Descriptor,
    HashCode,
    code_of,
)
from stac_rscbir.extension.codec import CBIRFieldError
from stac_rscbir.fsutil import atomic_write, atomic_write_text
from stac_rscbir.store.models import declared_models

__all__ = [
    "CODE_COLUMN",
    "DESCRIPTOR_COLUMN",
    "EMB_SCHEMA_URI",
    "ExportError",
    "ExportResult",
    "ImportResult",
    "export_collection",
    "import_file",
    "select_models",
]

CODE_COLUMN = "cbir:code:{model}"
DESCRIPTOR_COLUMN = "cbir:descriptor:{model}"
#: Arrow field metadata key of a code/descriptor column: the model's ``cbir:models`` entry.
FIELD_MODEL_KEY = b"cbir:model"
#: ... and of a descriptor column: the dtype its items stored (float32 here, re-imported as that).
DTYPE_KEY = b"cbir:descriptor_dtype"
EMB_SCHEMA_URI = "https://stac-extensions.github.io/embeddings/v0.0.1/schema.json"
_EMB_LINK_RELS = ("emb:model", "emb:source-data")
_EMB_FIELDS = (
    "emb:type",
    "emb:dimensions",
    "data_type",
    "gsd",
    "emb:chip_layout",
    "emb:temporal_resolution",
    "emb:fit_for_use",
)
_EMBEDDINGS_ASSET = "embeddings"
_PARQUET_TYPE = "application/vnd.apache.parquet"

Batches = Callable[[], Iterable[Sequence[dict[str, Any]]]]  # a fresh pass over the items


class ExportError(ValueError):
    """An export or import that cannot run: the message names the reason."""


@dataclass
class ExportResult:
    """What an export wrote."""

    path: Path
    sidecar: Path
    rows: int
    codes: dict[str, int] = field(default_factory=dict)  # model id -> rows with a code
    skipped: dict[str, int] = field(default_factory=dict)  # model id -> codes not in its format


@dataclass
class ImportResult:
    """What an import wrote."""

    collection: str
    items: int
    codes: dict[str, int] = field(default_factory=dict)


def select_models(collection: dict[str, Any], wanted: Sequence[str] | None) -> list[CBIRModel]:
    """The models to export: each ``id`` or ``id@version`` of ``wanted`` (default: every model
    the Collection declares), at the version the Collection lists last unless one is named."""
    declared = declared_models(collection)
    current: dict[str, CBIRModel] = {}
    for (mid, _), model in declared.items():  # insertion order: the last listed wins
        current[mid] = model
    cid = collection.get("id")
    if not current:
        raise ExportError(f"collection {cid!r} declares no models (cbir:models): nothing to export")
    if not wanted:
        return list(current.values())
    chosen: list[CBIRModel] = []
    for spec in wanted:
        mid, _, version = spec.partition("@")
        model = declared.get((mid, version)) if version else current.get(mid)
        if model is None:
            known = ", ".join(f"{m}@{v}" for m, v in declared)
            raise ExportError(
                f"model {spec!r} is not declared by collection {cid!r} (declared: {known})"
            )
        if any(m.id == model.id for m in chosen):
            raise ExportError(f"model {mid!r} asked for twice: one version per model per file")
        chosen.append(model)
    return chosen


def _strip_codes(item: dict[str, Any]) -> dict[str, Any]:
    props = item.get("properties") or {}
    return {**item, "properties": {k: v for k, v in props.items() if k != CODES_PROP}}


class _Columns:
    """The code (and descriptor) column of one model, filled row by row."""

    def __init__(self, model: CBIRModel, descriptor_dim: int | None) -> None:
        self.model = model
        self.dim = descriptor_dim
        self.codes: list[bytes | None] = []
        self.descriptors: list[np.ndarray | None] = []
        self.dtype: str | None = None  # the stored descriptors' dtype (the first one seen)
        self.written = 0
        self.skipped = 0

    def add(self, item: dict[str, Any]) -> None:
        code = code_of(item, self.model.id, self.model.version)
        if code is not None:
            try:  # a code stored behind the API's back may not have the declared format
                self.model.check_code(code, CODES_PROP)
            except CBIRFieldError:
                self.skipped += 1
                code = None
        self.codes.append(None if code is None else code.packed().tobytes())
        desc = None if code is None or self.dim is None else code.descriptor
        vector = None if desc is None else desc.array().astype(np.float32)
        if desc is not None and self.dtype is None:
            self.dtype = desc.dtype
        self.descriptors.append(vector if vector is not None and vector.size == self.dim else None)
        self.written += code is not None

    def arrays(self) -> list[tuple[Any, Any]]:
        """[(field, array)] of the rows added since the last call."""
        import pyarrow as pa

        meta = {FIELD_MODEL_KEY: json.dumps(self.model.to_dict()).encode()}
        nbytes = self.model.bits // 8
        out = [
            (
                pa.field(CODE_COLUMN.format(model=self.model.id), pa.binary(nbytes), True, meta),
                pa.array(self.codes, type=pa.binary(nbytes)),
            )
        ]
        if self.dim is not None:
            missing = np.array([d is None for d in self.descriptors])
            flat = np.zeros((len(self.descriptors), self.dim), dtype=np.float32)
            for i, d in enumerate(self.descriptors):
                if d is not None:
                    flat[i] = d
            values = pa.FixedSizeListArray.from_arrays(
                pa.array(flat.reshape(-1)), self.dim, mask=pa.array(missing)
            )
            name = DESCRIPTOR_COLUMN.format(model=self.model.id)
            dtype = self.dtype or self.model.properties.get("descriptor", {}).get("dtype")
            desc_meta = {**meta, DTYPE_KEY: (dtype or "float32").encode()}
            out.append((pa.field(name, values.type, True, desc_meta), values))
        self.codes, self.descriptors = [], []
        return out


def describe(
    collection: dict[str, Any], models: Sequence[CBIRModel], dims: dict[str, int | None], file: str
) -> dict[str, Any]:
    """``collection`` with the Embedding extension's fields for the first of ``models`` and the
    exported file as its ``embeddings`` asset (:func:`undescribe` removes them again)."""
    out = copy.deepcopy(collection)
    primary = models[0]
    dim = dims.get(primary.id)
    out["stac_extensions"] = [*out.get("stac_extensions", []), EMB_SCHEMA_URI]
    out["emb:type"] = "chip"  # one vector per item (a chip, a patch or a scene), not per pixel
    out["emb:dimensions"] = dim if dim is not None else primary.bits
    out["data_type"] = "float32" if dim is not None else "other"  # packed bits: no STAC type
    model_input = primary.properties.get("input") or {}
    if isinstance(model_input.get("resolution"), int | float):
        out["gsd"] = model_input["resolution"]
    if model_input.get("chip_size"):
        out["emb:chip_layout"] = {
            "layout_type": "regular_grid",
            "chip_size": list(model_input["chip_size"]),
        }
    out["emb:temporal_resolution"] = "single_acquisition"
    out["emb:fit_for_use"] = ["retrieval"]
    links = [link for link in out.get("links", []) if isinstance(link, dict)]
    for model in models:
        href = next(
            (
                link.get("href")
                for link in links
                if link.get("rel") == MODEL_REL and link.get("cbir:model") == model.id
            ),
            model.properties.get("href"),
        )
        if isinstance(href, str):
            links.append(
                {"rel": "emb:model", "href": href, "title": f"model {model.id}@{model.version}"}
            )
    source = next((link.get("href") for link in links if link.get("rel") == "self"), None)
    if isinstance(source, str):
        links.append({"rel": "emb:source-data", "href": source, "title": "the source collection"})
    out["links"] = links
    out.setdefault("assets", {})[_EMBEDDINGS_ASSET] = {
        "href": f"./{file}",
        "type": _PARQUET_TYPE,
        "roles": ["data"],
        "title": "codes and descriptors (stac-geoparquet): "
        + ", ".join(f"{m.id}@{m.version}" for m in models),
    }
    return out


def undescribe(collection: dict[str, Any]) -> dict[str, Any]:
    """The Collection :func:`describe` started from."""
    out = {k: v for k, v in collection.items() if k not in _EMB_FIELDS}
    out["stac_extensions"] = [u for u in out.get("stac_extensions", []) if u != EMB_SCHEMA_URI]
    out["links"] = [link for link in out.get("links", []) if link.get("rel") not in _EMB_LINK_RELS]
    assets = {k: v for k, v in (out.get("assets") or {}).items() if k != _EMBEDDINGS_ASSET}
    if assets:
        out["assets"] = assets
    else:
        out.pop("assets", None)
    return out


def _sidecar_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".parquet") + ".collection.json")


def export_collection(
    batches: Batches,
    collection: dict[str, Any],
    path: Path,
    models: Sequence[CBIRModel],
    progress: bool = True,
) -> ExportResult:
    """Write the items of ``batches`` (``collection``'s) with the codes of ``models`` to
    ``path`` (stac-geoparquet, one row group per batch, written atomically) and the described
    Collection beside it. ``batches()`` is called twice: stac-geoparquet's schema inference,
    then the rows (``progress``: a progress bar for each pass)."""
    import pyarrow as pa

    check_writable(path)
    try:
        return _export(batches, collection, path, models, progress)
    except pa.ArrowException as exc:
        raise ExportError(
            f"collection {collection.get('id')!r}: stac-geoparquet cannot convert its items: {exc}"
        ) from exc


def _export(
    batches: Batches,
    collection: dict[str, Any],
    path: Path,
    models: Sequence[CBIRModel],
    progress: bool,
) -> ExportResult:
    import pyarrow as pa
    import stac_geoparquet.arrow as sga
    from stac_geoparquet.arrow._schema.models import InferredSchema  # its streaming inference

    schema = InferredSchema()
    dims: dict[str, int | None] = {m.id: m.descriptor_dim for m in models}
    for batch in _counted(batches(), None, "scan items", progress):
        schema.update_from_items([_strip_codes(item) for item in batch])
        for m in models:  # a model declared without a descriptor dim: the items say
            if dims[m.id] is None:
                dims[m.id] = next(
                    (
                        c.descriptor.dim
                        for c in (code_of(it, m.id, m.version) for it in batch)
                        if c is not None and c.descriptor is not None
                    ),
                    None,
                )
    if schema.count == 0:
        raise ExportError(f"collection {collection.get('id')!r} has no items to export")
    schema.manual_updates()
    columns = [_Columns(m, dims[m.id]) for m in models]

    def rows() -> Iterator[Any]:
        for batch in _counted(batches(), schema.count, "write rows", progress):
            for item in batch:
                for col in columns:
                    col.add(item)
            plain = [_strip_codes(item) for item in batch]
            table = sga.parse_stac_items_to_arrow(plain, schema=schema, chunk_size=len(plain))
            record = table.read_next_batch()
            for col in columns:
                for fld, array in col.arrays():
                    record = record.append_column(fld, array)
            yield record

    stream = rows()
    first = next(stream, None)
    if first is None:
        raise ExportError(f"collection {collection.get('id')!r}: its items were deleted meanwhile")
    described = describe(collection, models, dims, path.name)
    reader = pa.RecordBatchReader.from_batches(first.schema, _chain(first, stream))
    cid = str(collection.get("id"))
    atomic_write(path, lambda tmp: sga.to_parquet(reader, tmp, collections={cid: described}))
    sidecar = _sidecar_path(path)
    atomic_write_text(sidecar, json.dumps(described, indent=2) + "\n")
    return ExportResult(
        path,
        sidecar,
        schema.count,
        {c.model.id: c.written for c in columns},
        {c.model.id: c.skipped for c in columns if c.skipped},
    )


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


def _counted(
    batches: Iterable[Sequence[dict[str, Any]]], total: int | None, desc: str, show: bool
) -> Iterator[Sequence[dict[str, Any]]]:
    """``batches``, with a progress bar counting their items."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="item", disable=not show) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))


def check_writable(path: Path) -> None:
    """Raise ExportError unless a file can be written at ``path`` (checked before any work)."""
    import tempfile

    if path.is_dir():
        raise ExportError(f"{path} is a folder: give the path of the .parquet file to write")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from exc


# -- import ------------------------------------------------------------------------------------


def _file_collection(meta: dict[bytes, bytes] | None, path: Path) -> dict[str, Any]:
    raw = (meta or {}).get(b"stac-geoparquet")
    try:
        collections = json.loads(raw).get("collections") if raw else None
    except (ValueError, AttributeError):
        collections = None
    if not isinstance(collections, dict) or len(collections) != 1:
        raise ExportError(
            f"{path}: not an export of stac-rscbir (no single collection in its "
            "stac-geoparquet metadata)"
        )
    return undescribe(next(iter(collections.values())))


@dataclass(frozen=True)
class _ModelColumns:
    """Where one model's codes are in an export."""

    model: CBIRModel
    code: str  # the code column
    descriptor: str | None  # the descriptor column
    dtype: str  # the dtype descriptors are re-encoded in


def _model_columns(schema: Any) -> dict[str, _ModelColumns]:
    """model id -> its columns, from the fields' metadata."""
    import pyarrow as pa

    out: dict[str, _ModelColumns] = {}
    for fld in schema:
        raw = (fld.metadata or {}).get(FIELD_MODEL_KEY)
        if raw is None or not pa.types.is_fixed_size_binary(fld.type):
            continue  # not a code column (a descriptor column carries the model too)
        model = CBIRModel.from_dict(json.loads(raw), f"{fld.name} (field metadata)")
        desc_col: str | None = DESCRIPTOR_COLUMN.format(model=model.id)
        dtype = "float32"
        if desc_col in schema.names:
            dtype = (schema.field(desc_col).metadata or {}).get(DTYPE_KEY, b"float32").decode()
        else:
            desc_col = None
        out[model.id] = _ModelColumns(model, fld.name, desc_col, dtype)
    return out


def _codes_of_row(
    row: int, models: dict[str, _ModelColumns], columns: dict[str, Any]
) -> list[dict[str, Any]]:
    """The ``cbir:codes`` entries of one row, rebuilt from the model columns."""
    entries = []
    for cols in models.values():
        model = cols.model
        packed = columns[cols.code][row]
        if packed is None:
            continue
        descriptor = None
        vector = columns[cols.descriptor][row] if cols.descriptor is not None else None
        if vector is not None:
            descriptor = Descriptor.create(np.asarray(vector, dtype=np.float32), cols.dtype)
        code = HashCode.create(
            model.id,
            model.version,
            np.frombuffer(packed, dtype=np.uint8),
            model.bits,
            bit_order=model.bit_order,
            encoding=model.encoding,
            descriptor=descriptor,
        )
        entries.append(code.to_dict())
    return entries


def read_export(
    path: Path, batch_size: int = 5000
) -> tuple[dict[str, Any], int, Iterator[list[dict[str, Any]]]]:
    """(the Collection, the number of rows, the items in batches with ``cbir:codes`` rebuilt)
    of an export; the file is read one batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import stac_geoparquet.arrow as sga

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ExportError(f"{path}: not a readable Parquet file: {exc}") from exc
    schema = parquet.schema_arrow
    collection = _file_collection(schema.metadata, path)
    try:
        models = _model_columns(schema)
    except (CBIRFieldError, ValueError) as exc:
        raise ExportError(f"{path}: a code column's model description is invalid: {exc}") from exc
    model_cols = {c for m in models.values() for c in (m.code, m.descriptor) if c}

    def items() -> Iterator[list[dict[str, Any]]]:
        for batch in parquet.iter_batches(batch_size=batch_size):
            columns = {name: batch.column(name).to_pylist() for name in model_cols}
            plain = pa.Table.from_batches([batch.drop_columns(list(model_cols))])
            out = []
            for row, item in enumerate(sga.stac_table_to_items(plain)):
                codes = _codes_of_row(row, models, columns)
                if codes:
                    item.setdefault("properties", {})[CODES_PROP] = codes
                out.append(item)
            yield out

    return collection, parquet.metadata.num_rows, items()


def import_file(
    store: Any, path: Path, batch_size: int = 5000, progress: bool = True
) -> ImportResult:
    """Load an export into ``store`` (any ItemStore): its Collection, created when missing, then
    its items, upserted batch by batch with their ``cbir:codes`` rebuilt."""
    import pyarrow as pa

    from stac_rscbir.store.base import NotFoundError

    collection, total, batches = read_export(path, batch_size)
    cid = str(collection.get("id"))
    try:
        store.get_collection(cid)
    except NotFoundError:
        store.create_collection(collection)
    result = ImportResult(cid, 0)
    counted = _counted(batches, total, "import items", progress)
    while True:
        try:
            items = next(counted, None)
        except (pa.ArrowException, CBIRFieldError) as exc:
            raise ExportError(f"{path}: unreadable rows: {exc}") from exc
        if items is None:
            break
        store.upsert_items(list(items))
        result.items += len(items)
        for item in items:
            for entry in item["properties"].get(CODES_PROP, []):
                result.codes[entry["model"]] = result.codes.get(entry["model"], 0) + 1
    return result


# -- sources -----------------------------------------------------------------------------------


def store_source(store: Any, collection_id: str, batch_size: int) -> tuple[dict[str, Any], Batches]:
    """(the Collection, its items in batches) of an ItemStore; NotFoundError when unknown."""
    collection = store.get_collection(collection_id)
    return collection, lambda: store.iter_items(collection_id, batch_size)


def catalog_source(
    catalog: Path, collection_id: str, batch_size: int
) -> tuple[dict[str, Any], Batches]:
    """(the Collection, its items in batches) of a static catalog (walked again per pass)."""
    import itertools

    import pystac

    try:
        root = pystac.read_file(str(catalog))
    except (OSError, pystac.STACError, ValueError) as exc:
        raise ExportError(f"{catalog}: not a readable STAC catalog: {exc}") from exc
    if not isinstance(root, pystac.Catalog):
        raise ExportError(f"{catalog}: expected a STAC Catalog or Collection")
    found = root if root.id == collection_id else root.get_child(collection_id, recursive=True)
    if not isinstance(found, pystac.Collection):
        raise ExportError(f"collection {collection_id!r} not found in {catalog}")
    collection = found.to_dict(include_self_link=False, transform_hrefs=False)
    structure = ("root", "parent", "child", "item")  # the catalog's files, not the data's
    collection["links"] = [x for x in collection.get("links", []) if x.get("rel") not in structure]

    def batches() -> Iterator[list[dict[str, Any]]]:
        items = (
            item.to_dict(include_self_link=False, transform_hrefs=False)
            for item in found.get_items(recursive=True)
        )
        while batch := list(itertools.islice(items, batch_size)):
            yield batch

    return collection, batches
