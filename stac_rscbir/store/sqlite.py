"""The embedded item store: one SQLite file, no server.

Layout (schema version 2):

* ``collections(id PRIMARY KEY, content)``: the Collection JSON.
* ``items(rowid, collection, id, dt, start_dt, end_dt, geom, content, UNIQUE(collection, id))``:
  the Item JSON (``content``, the source of truth), its geometry as WKB (``geom``, made valid for
  the exact spatial tests) and its times as UTC text ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (sortable):
  ``dt`` is ``datetime`` (``start_datetime`` when ``datetime`` is null; the sort key),
  ``start_dt``/``end_dt`` are ``start_datetime``/``end_datetime`` (``datetime`` when absent; the
  search range). ``items.collection`` references ``collections.id`` ON DELETE CASCADE.
* ``items_rtree``: an R*Tree (``id = items.rowid, minx, maxx, miny, maxy``) over the bounds of
  each item's *geometry* (not of its ``bbox`` field, so the prefilter can never lose an item whose
  ``bbox`` was written too small); it is only a prefilter, exact tests run with shapely.
* ``codes(item_rowid, model, version, code, descriptor)``: one row per ``cbir:codes`` entry,
  rewritten on every item write (packed bits, float32 little-endian descriptor), ON DELETE CASCADE.
* ``meta(key, value)``: ``schema_version``, ``generation`` (bumped last by every write
  transaction) and ``changes_horizon``.
* ``changes(generation, collection, id)``: the change log (the contract and the retention:
  :data:`~stac_rscbir.store.base.CHANGES_KEPT`), filled by triggers on ``items`` and
  ``collections``, so the writes of every process on the file are logged: an item inserted,
  updated or deleted logs its key at the generation its transaction commits (the counter + 1:
  a writer bumps it last, as this store and its older versions do; a writer behind its back
  that does not bump it at all is seen with the next write that does), a collection written
  ``(id, "")``, a collection deleted ``(id, "*")`` (its items, deleted by the cascade, are not
  logged one by one). A trigger on the generation counter prunes the log to its horizon. Read by
  :meth:`SQLiteStore.changes_since`. A version-1 file gets the log on open (its horizon: the
  generation at that moment).

Concurrency: one connection per thread (``threading.local``), opened on first use, so the
threads of an async web app's pool read in parallel (WAL: readers never block the writer nor each
other). Writes run in ``BEGIN IMMEDIATE`` transactions (one per write call, ``upsert_items`` of N
items included) and are also serialised in-process by a lock, so they never fail with "database
is locked" between threads of one process; other processes wait up to ``busy_timeout`` seconds.
A connection is only used by the thread that opened it; :meth:`SQLiteStore.close` closes all.

Search: SQL narrows the candidates (collections, ids, datetime, R*Tree on the bbox/intersects
bounds, and the simple top-level AND terms of the CQL2 filter, conservatively) in the requested
order; then shapely tests the item geometries exactly and ``cql2.Expr.matches`` evaluates the
filter on each remaining item (validated filters are cached: cql2's validation costs ~20 ms).
An item for which the filter cannot be evaluated (a property it lacks, a type mismatch) does
not match, as a NULL in SQL.
Paging tokens are ``base64url({"o": offset, "q": query hash})``: offsets, so a write between two
pages may shift items by a place; a token used with another query is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import math
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import cql2
import numpy as np
import shapely
import shapely.geometry
from shapely.errors import GEOSException

from stac_rscbir.extension.cbir import code_of
from stac_rscbir.store.base import (
    CHANGES_KEPT,
    COLLECTION_DELETED,
    COLLECTION_WRITTEN,
    PRUNE_EVERY,
    ConflictError,
    InvalidQueryError,
    ItemKey,
    NotFoundError,
    SearchPage,
    SearchQuery,
    StoredCode,
    StoreError,
)
from stac_rscbir.store.items import (
    Coverage,
    InvalidItemError,
    PreparedItem,
    collection_json,
    coverages,
    geometries,
    geometry,
    parse_bbox,
    parse_datetime_query,
    parse_filter,
    widen_extent,
)

__all__ = ["InvalidItemError", "SQLiteStore", "StoreDatabaseError"]

SCHEMA_VERSION = 2
_CODES_CHUNK = 5000
_R = TypeVar("_R")


class StoreDatabaseError(StoreError):
    """SQLite itself failed (disk full, corrupt file, locked for longer than the timeout)."""


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS collections (id TEXT PRIMARY KEY, content TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    rowid INTEGER PRIMARY KEY,
    collection TEXT NOT NULL REFERENCES collections(id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    dt TEXT,
    start_dt TEXT,
    end_dt TEXT,
    geom BLOB NOT NULL,
    content TEXT NOT NULL,
    UNIQUE (collection, id)
);
CREATE INDEX IF NOT EXISTS items_sort ON items (dt DESC, collection, id);
CREATE INDEX IF NOT EXISTS items_start ON items (start_dt, end_dt);
CREATE INDEX IF NOT EXISTS items_end ON items (end_dt, start_dt);
CREATE INDEX IF NOT EXISTS items_id ON items (id);
CREATE VIRTUAL TABLE IF NOT EXISTS items_rtree USING rtree(id, minx, maxx, miny, maxy);
CREATE TABLE IF NOT EXISTS codes (
    item_rowid INTEGER NOT NULL REFERENCES items(rowid) ON DELETE CASCADE,
    model TEXT NOT NULL,
    version TEXT NOT NULL,
    code BLOB NOT NULL,
    descriptor BLOB,
    PRIMARY KEY (item_rowid, model, version)
);
CREATE INDEX IF NOT EXISTS codes_model ON codes (model, version, item_rowid);
-- a new store starts at its creation time in microseconds, not 0: an index saved for an
-- earlier store at the same path can never look current to a new one
INSERT OR IGNORE INTO meta (key, value)
    VALUES ('generation', CAST((julianday('now') - 2440587.5) * 86400000000 AS INTEGER));
"""

# the change log (version 2), added to a version-1 file in place; the rule: store/base.py
_CHANGES = f"""
CREATE TABLE IF NOT EXISTS changes (
    generation INTEGER NOT NULL,
    collection TEXT NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (generation, collection, id)
) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (key, value)
    SELECT 'changes_horizon', value FROM meta WHERE key = 'generation';
CREATE TRIGGER IF NOT EXISTS items_insert_logged AFTER INSERT ON items BEGIN
    INSERT INTO changes VALUES ((SELECT value + 1 FROM meta WHERE key = 'generation'),
        NEW.collection, NEW.id) ON CONFLICT DO NOTHING;
END;
CREATE TRIGGER IF NOT EXISTS items_update_logged AFTER UPDATE ON items BEGIN
    INSERT INTO changes VALUES ((SELECT value + 1 FROM meta WHERE key = 'generation'),
        OLD.collection, OLD.id) ON CONFLICT DO NOTHING;
    INSERT INTO changes VALUES ((SELECT value + 1 FROM meta WHERE key = 'generation'),
        NEW.collection, NEW.id) ON CONFLICT DO NOTHING;
END;
-- the items of a deleted collection (the cascade) go with its '*' row, not one row each
CREATE TRIGGER IF NOT EXISTS items_delete_logged AFTER DELETE ON items
WHEN EXISTS (SELECT 1 FROM collections WHERE id = OLD.collection) BEGIN
    INSERT INTO changes VALUES ((SELECT value + 1 FROM meta WHERE key = 'generation'),
        OLD.collection, OLD.id) ON CONFLICT DO NOTHING;
END;
CREATE TRIGGER IF NOT EXISTS collections_insert_logged AFTER INSERT ON collections BEGIN
    INSERT INTO changes VALUES ((SELECT value + 1 FROM meta WHERE key = 'generation'),
        NEW.id, '{COLLECTION_WRITTEN}') ON CONFLICT DO NOTHING;
END;
CREATE TRIGGER IF NOT EXISTS collections_update_logged AFTER UPDATE ON collections BEGIN
    INSERT INTO changes VALUES ((SELECT value + 1 FROM meta WHERE key = 'generation'),
        NEW.id, '{COLLECTION_WRITTEN}') ON CONFLICT DO NOTHING;
END;
CREATE TRIGGER IF NOT EXISTS collections_delete_logged AFTER DELETE ON collections BEGIN
    INSERT INTO changes VALUES ((SELECT value + 1 FROM meta WHERE key = 'generation'),
        OLD.id, '{COLLECTION_DELETED}') ON CONFLICT DO NOTHING;
END;
CREATE TRIGGER IF NOT EXISTS changes_pruned AFTER UPDATE OF value ON meta
WHEN NEW.key = 'generation' AND NEW.value % {PRUNE_EVERY} = 0
    AND (SELECT value FROM meta WHERE key = 'changes_horizon') < NEW.value - {CHANGES_KEPT} BEGIN
    DELETE FROM changes WHERE generation <= NEW.value - {CHANGES_KEPT};
    UPDATE meta SET value = NEW.value - {CHANGES_KEPT} WHERE key = 'changes_horizon';
END;
"""

# one statement, one snapshot of the counter, the horizon and the log
_CHANGES_SQL = """
SELECT (SELECT value FROM meta WHERE key = 'generation'),
       (SELECT value FROM meta WHERE key = 'changes_horizon'),
       (SELECT json_group_array(json_array(collection, id)) FROM (
            SELECT DISTINCT collection, id FROM changes
            WHERE generation > ? AND generation <= (SELECT value FROM meta WHERE key = 'generation')
            ORDER BY collection, id))
"""


def _statements(script: str) -> list[str]:
    """The statements of ``script`` (a trigger's body holds several ``;``)."""
    out, part = [], ""
    for line in script.splitlines(keepends=True):
        part += line
        if sqlite3.complete_statement(part):
            out.append(part)
            part = ""
    return out


# ---------------------------------------------------------------------------------------------
# parsing helpers

_PROPERTY_NAME = re.compile(r"^[^\"\\\x00-\x1f]+$")
_TOP_LEVEL_SORT = {"id": "id", "collection": "collection", "datetime": "dt"}
_NOT_SORTABLE = {
    "geometry",
    "bbox",
    "assets",
    "links",
    "type",
    "stac_version",
    "stac_extensions",
    "properties",
}


_PUSHDOWN_SKIP = {"datetime", "start_datetime", "end_datetime", "geometry", "bbox", "type"}


def _filter_prefilter(expr: cql2.Expr) -> list[tuple[str, list[Any]]]:
    """SQL conditions implied by the filter, to narrow the rows ``cql2`` then evaluates.

    Conservative by construction: only the top-level AND of ``property = 'text'``,
    ``property IN ('text', ...)`` and ``property <op> number`` comparisons is translated; a row
    whose property has another JSON type, or whose top level has a field of that name, is kept
    for the exact evaluation (a row without the property anywhere cannot match in cql2). The
    result is always the exact ``cql2.Expr.matches`` answer; this only saves evaluating it.
    """
    try:
        node = expr.to_json()
    except Exception:
        return []
    conjuncts = node["args"] if isinstance(node, dict) and node.get("op") == "and" else [node]
    out: list[tuple[str, list[Any]]] = []
    for c in conjuncts:
        if not isinstance(c, dict) or not isinstance(c.get("args"), list) or len(c["args"]) != 2:
            continue
        op, (lhs, rhs) = c.get("op"), c["args"]
        if not (isinstance(lhs, dict) and set(lhs) == {"property"}):
            continue
        name = lhs["property"]
        if not isinstance(name, str):
            continue
        name = name.removeprefix("properties.")
        if name in _PUSHDOWN_SKIP or "." in name or not _PROPERTY_NAME.match(name):
            continue
        values = rhs if op == "in" and isinstance(rhs, list) and rhs else [rhs]
        strings = all(isinstance(v, str) for v in values)
        numbers = all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        )
        if not (
            (op in ("=", "in") and strings) or (op in ("=", "<", "<=", ">", ">=", "in") and numbers)
        ):
            continue
        test = "IN (SELECT value FROM json_each(?))" if op == "in" else f"{op} ?"
        value = json.dumps(values) if op == "in" else values[0]
        if name in ("id", "collection"):
            if strings:
                out.append((f"items.{name} {test}", [value]))
            continue
        # cql2 also finds a name at the item's top level: such rows are always kept
        path, top = f'$.properties."{name}"', f'$."{name}"'
        types = "('text')" if strings else "('integer', 'real')"
        out.append(
            (
                f"(json_type(items.content, ?) IS NOT NULL "
                f"OR json_type(items.content, ?) NOT IN {types} "
                f"OR json_extract(items.content, ?) {test})",
                [top, path, path, value],
            )
        )
    return out


def _sort_terms(sortby: Sequence[dict[str, str]] | None) -> list[tuple[str, list[Any], str]]:
    """[(SQL expression, params, ASC|DESC)] for ``sortby``, then collection and id."""
    terms: list[tuple[str, list[Any], str]] = []
    seen: set[str] = set()
    for i, spec in enumerate(sortby or [{"field": "datetime", "direction": "desc"}]):
        if not isinstance(spec, dict) or not isinstance(spec.get("field"), str):
            raise InvalidQueryError(f"sortby[{i}]: expected {{'field': ..., 'direction': ...}}")
        name = spec["field"].strip()
        direction = str(spec.get("direction", "asc")).lower()
        if direction not in ("asc", "desc"):
            raise InvalidQueryError(f"sortby[{i}].direction: {direction!r} is not 'asc' or 'desc'")
        prop = name[len("properties.") :] if name.startswith("properties.") else None
        if prop == "datetime" or name in _TOP_LEVEL_SORT:
            column = _TOP_LEVEL_SORT.get(name, "dt")
            expr, params = column, []
        elif prop is not None and prop and _PROPERTY_NAME.match(prop):
            column, expr, params = name, "json_extract(content, ?)", [f'$.properties."{prop}"']
        elif prop is None and name and name not in _NOT_SORTABLE and _PROPERTY_NAME.match(name):
            # a bare property name (as pgstac accepts it): the same as properties.<name>
            column, expr = f"properties.{name}", "json_extract(content, ?)"
            params = [f'$.properties."{name}"']
        else:
            raise InvalidQueryError(
                f"sortby[{i}].field: unknown sortby field {name!r} (use id, collection, "
                "datetime or properties.<name>)"
            )
        if column in seen:
            continue
        seen.add(column)
        terms.append((expr, params, direction.upper()))
    for column in ("collection", "id"):
        if column not in seen:
            terms.append((column, [], "ASC"))
    return terms


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def _query_hash(query: SearchQuery) -> str:
    """A hash of everything that decides which items come in which order (not limit/token)."""
    parts = {
        "collections": list(query.collections) if query.collections else None,
        "ids": list(query.ids) if query.ids else None,
        "bbox": list(query.bbox) if query.bbox else None,
        "intersects": query.intersects,
        "datetime": query.datetime,
        "filter": query.filter,
        "sortby": list(query.sortby) if query.sortby else None,
    }
    text = json.dumps(_canonical(parts), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _make_token(offset: int, qhash: str) -> str:
    raw = json.dumps({"o": offset, "q": qhash}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _read_token(token: str, qhash: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        offset, token_hash = data["o"], data["q"]
    except (binascii.Error, ValueError, TypeError, KeyError) as exc:
        raise InvalidQueryError(f"token: {token!r} is not a paging token of this store") from exc
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise InvalidQueryError(f"token: {token!r} is not a paging token of this store")
    if token_hash != qhash:
        raise InvalidQueryError(
            "token: the token belongs to another query (repeat the first page's parameters)"
        )
    return offset


# ---------------------------------------------------------------------------------------------
# the store


class _Plan:
    """A search turned into SQL (WHERE + ORDER BY) plus the exact tests that run after it."""

    def __init__(self, query: SearchQuery, sort: bool) -> None:
        where: list[str] = []
        params: list[Any] = []
        if query.collections:
            where.append("items.collection IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(list(query.collections)))
        if query.ids:
            where.append("items.id IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(list(query.ids)))
        if query.datetime is not None:
            start, end = parse_datetime_query(query.datetime)
            if end is not None:
                where.append("items.start_dt <= ?")
                params.append(end)
            if start is not None:
                where.append("items.end_dt >= ?")
                params.append(start)
        self.shapes: list[shapely.Geometry] = []
        if query.bbox is not None:
            minx, miny, maxx, maxy = parse_bbox(query.bbox)
            self.shapes.append(shapely.box(minx, miny, maxx, maxy))
        if query.intersects is not None:
            try:
                self.shapes.append(geometry(query.intersects, "intersects"))
            except ValueError as exc:
                raise InvalidQueryError(str(exc)) from exc
        for shape in self.shapes:
            minx, miny, maxx, maxy = shape.bounds
            where.append(
                "items.rowid IN (SELECT id FROM items_rtree "
                "WHERE minx <= ? AND maxx >= ? AND miny <= ? AND maxy >= ?)"
            )
            params.extend([maxx, minx, maxy, miny])
            shapely.prepare(shape)
        self.expr = parse_filter(query.filter) if query.filter is not None else None
        if self.expr is not None:
            for sql, sql_params in _filter_prefilter(self.expr):
                where.append(sql)
                params.extend(sql_params)
        self.where = " AND ".join(where) or "1"
        self.params = params
        self.order = ""
        self.order_params: list[Any] = []
        if sort:
            terms = _sort_terms(query.sortby)
            # NULLS LAST for JSON fields (items without the property); the columns are never null
            self.order = "ORDER BY " + ", ".join(
                f"{e} {d}" + (" NULLS LAST" if p else "") for e, p, d in terms
            )
            self.order_params = [p for _, ps, _ in terms for p in ps]

    @property
    def exact(self) -> bool:
        """Whether rows need testing in Python after the SQL."""
        return bool(self.shapes) or self.expr is not None

    def keep(self, geoms: list[bytes], contents: list[str] | None) -> np.ndarray:
        """A boolean mask over candidate rows: the exact geometry tests, then the filter."""
        mask = np.ones(len(geoms), dtype=bool)
        if not geoms:
            return mask
        if self.shapes:
            arr = shapely.from_wkb(geoms)
            for shape in self.shapes:
                try:
                    mask &= shapely.intersects(shape, arr)
                except GEOSException as exc:
                    raise InvalidQueryError(f"geometry test failed: {exc}") from exc
        if self.expr is not None:
            assert contents is not None
            matches = self.expr.matches
            for i in np.flatnonzero(mask):
                try:
                    mask[i] = bool(matches(json.loads(contents[i])))
                except Exception:  # an item the filter cannot be evaluated on does not match
                    mask[i] = False
        return mask


class SQLiteStore:
    """:class:`~stac_rscbir.store.base.ItemStore` over one SQLite file (created if missing).

    ``busy_timeout`` is how long (seconds) a write waits for another process's write to end.
    Usable from many threads (one connection each); see the module docstring.
    """

    def __init__(self, path: str | Path, *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._write_lock = threading.RLock()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._guard(self._init_schema)

    # -- connections ----------------------------------------------------------------------

    def _init_schema(self) -> None:
        conn = self._conn()
        with self._write_lock:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is not None and row[0] not in (1, SCHEMA_VERSION):
                    raise StoreDatabaseError(
                        f"{self.path}: schema version {row[0]}, this code reads {SCHEMA_VERSION}"
                    )
                for statement in _statements(_CHANGES):  # version 1 -> 2: the change log
                    conn.execute(statement)
                conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                    (SCHEMA_VERSION,),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise StoreDatabaseError(f"{self.path}: the store is closed")
        conn = sqlite3.connect(
            self.path,
            timeout=self.busy_timeout,
            isolation_level=None,  # autocommit; write transactions are explicit
            check_same_thread=False,  # only the owning thread uses it; close() may come from any
        )
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        self._local.conn = conn
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def close(self) -> None:
        """Close every thread's connection; the store cannot be used afterwards."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with suppress(sqlite3.Error):
                conn.execute("PRAGMA optimize")  # refresh the planner's statistics if needed
            with suppress(sqlite3.Error):
                conn.close()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _guard(self, func: Callable[..., _R], *args: Any) -> _R:
        try:
            return func(*args)
        except sqlite3.Error as exc:
            raise StoreDatabaseError(f"{self.path}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that also bumps the generation; rolled back on any error."""
        conn = self._conn()
        with self._write_lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreDatabaseError(f"{self.path}: {exc}") from exc
            try:
                yield conn
                conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
                conn.execute("COMMIT")
            except BaseException as exc:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreDatabaseError(f"{self.path}: {exc}") from exc
                raise

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreDatabaseError(f"{self.path}: {exc}") from exc

    # -- collections ----------------------------------------------------------------------

    def create_collection(self, collection: dict[str, Any]) -> None:
        cid, content = collection_json(collection)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM collections WHERE id = ?", (cid,)).fetchone():
                raise ConflictError(f"collection {cid!r} already exists")
            conn.execute("INSERT INTO collections (id, content) VALUES (?, ?)", (cid, content))

    def update_collection(self, collection: dict[str, Any]) -> None:
        """Replace the collection; its extent is widened to cover the items it holds."""
        cid, content = collection_json(collection)
        with self._write() as conn:
            cur = conn.execute("UPDATE collections SET content = ? WHERE id = ?", (content, cid))
            if cur.rowcount == 0:
                raise NotFoundError(f"collection {cid!r} not found")
            row = conn.execute(
                "SELECT min(r.minx), min(r.miny), max(r.maxx), max(r.maxy), "
                "min(items.start_dt), max(items.end_dt) "
                "FROM items JOIN items_rtree AS r ON r.id = items.rowid WHERE items.collection = ?",
                (cid,),
            ).fetchone()
            if row is not None and row[0] is not None:
                self._widen(conn, cid, (tuple(row[:4]), row[4], row[5]))

    def delete_collection(self, collection_id: str) -> None:
        """Delete the collection and all its items (and their codes)."""
        with self._write() as conn:
            if not conn.execute(
                "SELECT 1 FROM collections WHERE id = ?", (collection_id,)
            ).fetchone():
                raise NotFoundError(f"collection {collection_id!r} not found")
            conn.execute(
                "DELETE FROM items_rtree WHERE id IN "
                "(SELECT rowid FROM items WHERE collection = ?)",
                (collection_id,),
            )
            conn.execute("DELETE FROM collections WHERE id = ?", (collection_id,))

    def get_collection(self, collection_id: str) -> dict[str, Any]:
        rows = self._read("SELECT content FROM collections WHERE id = ?", (collection_id,))
        if not rows:
            raise NotFoundError(f"collection {collection_id!r} not found")
        return json.loads(rows[0][0])

    def all_collections(self) -> list[dict[str, Any]]:
        """All collections, by id."""
        return [json.loads(r[0]) for r in self._read("SELECT content FROM collections ORDER BY id")]

    # -- items --------------------------------------------------------------------------

    @staticmethod
    def _require_collections(conn: sqlite3.Connection, items: Sequence[PreparedItem]) -> None:
        for cid in dict.fromkeys(p.collection for p in items):
            if not conn.execute("SELECT 1 FROM collections WHERE id = ?", (cid,)).fetchone():
                raise NotFoundError(f"collection {cid!r} not found")

    @staticmethod
    def _widen(conn: sqlite3.Connection, collection_id: str, cover: Coverage) -> None:
        """Grow the collection's extent to ``cover`` (:func:`widen_extent`), in this transaction."""
        row = conn.execute(
            "SELECT content FROM collections WHERE id = ?", (collection_id,)
        ).fetchone()
        widened = widen_extent(json.loads(row[0]), cover) if row else None
        if widened is not None:
            conn.execute(
                "UPDATE collections SET content = ? WHERE id = ?",
                (collection_json(widened)[1], collection_id),
            )

    @classmethod
    def _store(cls, conn: sqlite3.Connection, items: Sequence[PreparedItem]) -> None:
        """Insert or replace the rows of ``items`` (the rowid of an existing item is kept) and
        widen their collections' extents to cover them."""
        items = list({(p.collection, p.id): p for p in items}.values())  # the last one wins
        for cid, cover in coverages(items).items():
            cls._widen(conn, cid, cover)
        conn.executemany(
            "INSERT INTO items (collection, id, dt, start_dt, end_dt, geom, content) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (collection, id) DO UPDATE SET "
            "dt = excluded.dt, start_dt = excluded.start_dt, end_dt = excluded.end_dt, "
            "geom = excluded.geom, content = excluded.content",
            [(p.collection, p.id, p.dt, p.start, p.end, p.geom, p.content) for p in items],
        )
        rowids = [
            r[0]
            for r in conn.execute(
                "SELECT items.rowid FROM json_each(?) AS k JOIN items "
                "ON items.collection = json_extract(k.value, '$[0]') "
                "AND items.id = json_extract(k.value, '$[1]') ORDER BY k.key",
                (json.dumps([[p.collection, p.id] for p in items]),),
            )
        ]
        conn.executemany(
            "INSERT OR REPLACE INTO items_rtree (id, minx, maxx, miny, maxy) "
            "VALUES (?, ?, ?, ?, ?)",
            [(r, *p.rtree) for r, p in zip(rowids, items, strict=True)],
        )
        conn.executemany("DELETE FROM codes WHERE item_rowid = ?", [(r,) for r in rowids])
        conn.executemany(
            "INSERT INTO codes (item_rowid, model, version, code, descriptor) "
            "VALUES (?, ?, ?, ?, ?)",
            [(r, *c) for r, p in zip(rowids, items, strict=True) for c in p.codes],
        )

    @staticmethod
    def _exists(conn: sqlite3.Connection, collection_id: str, item_id: str) -> bool:
        row = conn.execute(
            "SELECT 1 FROM items WHERE collection = ? AND id = ?", (collection_id, item_id)
        ).fetchone()
        return row is not None

    def create_item(self, item: dict[str, Any]) -> None:
        """Add a new item (ConflictError if it exists, NotFoundError without its collection)."""
        p = PreparedItem(item)
        with self._write() as conn:
            self._require_collections(conn, [p])
            if self._exists(conn, p.collection, p.id):
                raise ConflictError(f"item {p.id!r} already exists in collection {p.collection!r}")
            self._store(conn, [p])

    def update_item(self, item: dict[str, Any]) -> None:
        """Replace an existing item (NotFoundError if it does not exist)."""
        p = PreparedItem(item)
        with self._write() as conn:
            self._require_collections(conn, [p])
            if not self._exists(conn, p.collection, p.id):
                raise NotFoundError(f"item {p.id!r} not found in collection {p.collection!r}")
            self._store(conn, [p])

    def upsert_items(self, items: Sequence[dict[str, Any]]) -> None:
        """Create or replace all ``items`` in one transaction (all or nothing).

        Raises ValueError (InvalidItemError, naming the item and field) before writing anything
        if any item is invalid, NotFoundError if a collection is missing. When an item appears
        twice, the last one wins.
        """
        prepared: list[PreparedItem] = []
        geoms = geometries([it.get("geometry") if isinstance(it, dict) else None for it in items])
        for i, (item, geom) in enumerate(zip(items, geoms, strict=True)):
            try:
                prepared.append(PreparedItem(item, geom))
            except InvalidItemError as exc:
                if exc.item_id is None:
                    raise InvalidItemError(f"items[{i}]", exc.field, exc.problem) from exc
                raise
        if not prepared:
            return
        with self._write() as conn:
            self._require_collections(conn, prepared)
            self._store(conn, prepared)

    def delete_item(self, collection_id: str, item_id: str) -> None:
        with self._write() as conn:
            row = conn.execute(
                "SELECT rowid FROM items WHERE collection = ? AND id = ?", (collection_id, item_id)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"item {item_id!r} not found in collection {collection_id!r}")
            conn.execute("DELETE FROM items_rtree WHERE id = ?", (row[0],))
            conn.execute("DELETE FROM items WHERE rowid = ?", (row[0],))

    def get_item(self, collection_id: str, item_id: str) -> dict[str, Any]:
        rows = self._read(
            "SELECT content FROM items WHERE collection = ? AND id = ?", (collection_id, item_id)
        )
        if not rows:
            if not self._read("SELECT 1 FROM collections WHERE id = ?", (collection_id,)):
                raise NotFoundError(f"collection {collection_id!r} not found")
            raise NotFoundError(f"item {item_id!r} not found in collection {collection_id!r}")
        return json.loads(rows[0][0])

    def get_items(self, keys: Sequence[ItemKey]) -> list[dict[str, Any]]:
        """The items of ``keys``, in that order; keys without an item are skipped."""
        if not keys:
            return []
        rows = self._read(
            "SELECT items.content FROM json_each(?) AS k JOIN items "
            "ON items.collection = json_extract(k.value, '$[0]') "
            "AND items.id = json_extract(k.value, '$[1]') ORDER BY k.key",
            (json.dumps([list(k) for k in keys]),),
        )
        return [json.loads(r[0]) for r in rows]

    # -- search -------------------------------------------------------------------------

    def _candidates(
        self, plan: _Plan, columns: str, keys: Sequence[ItemKey] | None = None
    ) -> list[tuple[Any, ...]]:
        if keys is None:
            sql = f"SELECT {columns} FROM items WHERE {plan.where} {plan.order}"
            return self._read(sql, [*plan.params, *plan.order_params])
        sql = (
            f"SELECT {columns} FROM json_each(?) AS k JOIN items "
            "ON items.collection = json_extract(k.value, '$[0]') "
            "AND items.id = json_extract(k.value, '$[1]') "
            f"WHERE {plan.where} ORDER BY k.key"
        )
        return self._read(sql, [json.dumps([list(k) for k in keys]), *plan.params])

    def search(self, query: SearchQuery) -> SearchPage:
        """One page of the STAC API item search (see the module docstring for the semantics)."""
        limit = query.limit
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidQueryError(f"limit: expected a non-negative integer, got {limit!r}")
        plan = _Plan(query, sort=True)
        qhash = _query_hash(query)
        offset = _read_token(query.token, qhash) if query.token else 0
        if not plan.exact:
            matched = self._read(f"SELECT count(*) FROM items WHERE {plan.where}", plan.params)[0][
                0
            ]
            rows = self._read(
                # literal LIMIT/OFFSET (checked ints): the planner then picks the filter's index
                f"SELECT content FROM items WHERE {plan.where} {plan.order} "
                f"LIMIT {int(limit)} OFFSET {int(offset)}",
                [*plan.params, *plan.order_params],
            )
            contents = [r[0] for r in rows]
        else:
            cols = "items.rowid, items.geom" + (", items.content" if plan.expr else "")
            rows = self._candidates(plan, cols)
            mask = plan.keep([r[1] for r in rows], [r[2] for r in rows] if plan.expr else None)
            hits = [rows[i] for i in np.flatnonzero(mask)]
            matched = len(hits)
            page = hits[offset : offset + limit]
            if plan.expr:
                contents = [r[2] for r in page]
            else:
                by_rowid = dict(
                    self._read(
                        "SELECT rowid, content FROM items WHERE rowid IN "
                        "(SELECT value FROM json_each(?))",
                        (json.dumps([r[0] for r in page]),),
                    )
                )
                contents = [by_rowid[r[0]] for r in page if r[0] in by_rowid]
        items = [json.loads(c) for c in contents]
        end = offset + len(items)
        next_token = _make_token(end, qhash) if limit > 0 and end < matched else None
        return SearchPage(items=items, next_token=next_token, matched=matched)

    def filter_keys(
        self, query: SearchQuery, keys: Sequence[ItemKey] | None = None
    ) -> list[ItemKey]:
        """The keys of the items matching the query's filters (limit, token, sortby ignored).

        With ``keys``: the matching subset, in the order given (repeats kept). Without: every
        matching item, in insertion (rowid) order.
        """
        plan = _Plan(query, sort=False)
        if keys is not None and not keys:
            return []
        if keys is None:
            plan.order = "ORDER BY items.rowid"
        cols = "items.collection, items.id" + (", items.geom" if plan.shapes else "")
        cols += ", items.content" if plan.expr else ""
        rows = self._candidates(plan, cols, keys)
        if not plan.exact:
            return [(r[0], r[1]) for r in rows]
        gi = 2 if plan.shapes else None
        ci = (3 if plan.shapes else 2) if plan.expr else None
        geoms = [r[gi] for r in rows] if gi is not None else [b""] * len(rows)
        mask = plan.keep(geoms, [r[ci] for r in rows] if ci is not None else None)
        return [(rows[i][0], rows[i][1]) for i in np.flatnonzero(mask)]

    def property_types(self, collection_id: str | None = None) -> dict[str, set[str]]:
        """Each property name of the items (of ``collection_id``, or of all) -> the JSON types
        (``string``, ``integer``, ``number``, ``boolean``, ``array``, ``object``, ``null``) of its
        values. Scans the items."""
        rows = self._read(
            "SELECT p.key, p.type FROM items, json_each(items.content, '$.properties') AS p "
            "WHERE ? IS NULL OR items.collection = ? GROUP BY p.key, p.type",
            (collection_id, collection_id),
        )
        names = {"text": "string", "real": "number", "true": "boolean", "false": "boolean"}
        out: dict[str, set[str]] = {}
        for key, kind in rows:
            out.setdefault(key, set()).add(names.get(kind, kind))
        return out

    # -- codes ---------------------------------------------------------------------------

    def iter_codes(self, model: str, version: str | None = None) -> Iterator[StoredCode]:
        """Of each item having one, its code of ``model`` (of ``version`` when given), in item
        rowid order: the one :func:`~stac_rscbir.extension.cbir.code_of` picks.

        The ``codes`` table holds one row per model and version of an item, each a valid
        entry (the store's writes check them), so an item with one row of the model has that
        code; an item with several (versions, when ``version`` is None) has its ``cbir:codes``
        read to apply the rule. Rows are read in chunks, so a long iteration does not hold a
        read snapshot throughout.
        """
        for rowid, group in itertools.groupby(self._code_rows(model, version), lambda r: r[0]):
            rows = list(group)
            if len(rows) == 1:
                _, coll, iid, code, desc = rows[0]
                yield StoredCode((coll, iid), bytes(code), None if desc is None else bytes(desc))
                continue
            sql = "SELECT collection, id, content FROM items WHERE rowid = ?"
            found = self._read(sql, (rowid,))
            if not found:
                continue  # deleted since the chunk was read
            coll, iid, content = found[0]
            picked = code_of(json.loads(content), model, version)
            if picked is not None:
                yield StoredCode.of((coll, iid), picked)

    def _code_rows(self, model: str, version: str | None) -> Iterator[tuple[Any, ...]]:
        """The ``codes`` rows of ``model`` (of ``version``, or all) as (item rowid, collection,
        id, code, descriptor), by item rowid and version, read in chunks."""
        sql = (
            "SELECT codes.item_rowid, codes.version, items.collection, items.id, codes.code, "
            "codes.descriptor FROM codes JOIN items ON items.rowid = codes.item_rowid "
            "WHERE codes.model = ? AND (? IS NULL OR codes.version = ?) "
            "AND (codes.item_rowid > ? OR (codes.item_rowid = ? AND codes.version > ?)) "
            f"ORDER BY codes.item_rowid, codes.version LIMIT {_CODES_CHUNK}"
        )
        last_rowid, last_version = -1, ""
        while True:
            rows = self._read(sql, (model, version, version, last_rowid, last_rowid, last_version))
            for rowid, ver, *rest in rows:
                yield (rowid, *rest)
                last_rowid, last_version = rowid, ver
            if len(rows) < _CODES_CHUNK:
                return

    def code_models(self) -> list[str]:
        """The models some item has a code of (for the API's error messages)."""
        return [row[0] for row in self._read("SELECT DISTINCT model FROM codes ORDER BY model")]

    def generation(self) -> int:
        """Bumped by every write transaction: an index built at g is stale if g < this."""
        return int(self._read("SELECT value FROM meta WHERE key = 'generation'")[0][0])

    def changes_since(self, generation: int) -> tuple[int, list[ItemKey]] | None:
        """(present generation, the keys written after ``generation``), from the change log;
        None when the log no longer reaches back that far (the contract:
        :data:`~stac_rscbir.store.base.CHANGES_KEPT`)."""
        present, horizon, keys = self._read(_CHANGES_SQL, (generation,))[0]
        if generation < horizon:
            return None
        return int(present), [(c, i) for c, i in json.loads(keys)]

    def count(self) -> int:
        """The number of items in the store."""
        return int(self._read("SELECT count(*) FROM items")[0][0])
