"""The production item store: pgstac (PostgreSQL + PostGIS), through pgstac's SQL API.

Items and collections are written with pgstac's functions (``create_item``, ``update_item``,
``upsert_items``, ``delete_item``, ``create_collection``...), so the database stays exactly what
stac-fastapi-pgstac and ``pypgstac load`` expect; items are checked first with the same rules as
the SQLite store (invalid ``cbir:codes`` are refused with the field named, nothing written).

Search: ``pgstac.search(jsonb)`` with the STAC body built from :class:`SearchQuery` (a CQL2-text
filter is converted to CQL2 JSON), ``conf.context = on`` for an exact ``numberMatched`` and
pgstac's own ``next:`` paging tokens. The store's connections set ``pgstac.readonly``, which only
turns off pgstac's caches of searches (``pgstac.searches``, ``search_wheres``): every distinct
search would otherwise add a row there. :meth:`PgstacStore.keys_matching` asks pgstac for the
WHERE clause of a search body (``stac_search_to_where``, a pure function) and selects the keys
itself, so the similarity layer's candidate queries neither page nor cache anything.

Codes: ``pgstac.items.content`` is *dehydrated* (what equals the collection's base item is
stripped), but the base item holds only ``type``, ``stac_version``, ``assets`` and
``collection``: ``content->'properties'->'cbir:codes'`` is the item's own, read without
hydrating.

Generation: a one-row table ``rscbir.generation`` bumped once per transaction that writes items
or collections, by ``rscbir.bump_generation()`` (a transaction-local setting remembers that the
transaction already bumped it). Every store write calls it, and AFTER ... FOR EACH ROW triggers
on ``pgstac.items`` and ``pgstac.collections`` call it too, so writes behind the API's back
(``pypgstac load``, SQL) count. The items trigger is a *row* trigger because PostgreSQL clones
row triggers of a partitioned table onto every present and future partition, and ``pypgstac
load`` writes into the partitions directly (a statement trigger on the parent would not fire). A
collection's items leave with its partitions (DROP TABLE fires no row trigger): the
``collections`` trigger counts that. The counter is transactional, so a reader never sees a
generation whose writes it cannot see yet. Not counted: TRUNCATE of a partition by hand.

Change log: the same triggers record which items (and collections) each generation wrote in
``rscbir.changes`` (the retention and the contract: :data:`~stac_rscbir.store.base.CHANGES_KEPT`;
``rscbir.changes_horizon`` says where the pruned part ends), read by
:meth:`PgstacStore.changes_since`, so that a hash index follows writes made anywhere instead of
being rebuilt from every code.

Needs the ``pgstac`` extra (psycopg 3, psycopg-pool, pypgstac-migrated database).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg_pool import ConnectionPool

from stac_rscbir.extension.cbir import CODES_PROP, code_of
from stac_rscbir.store.base import (
    CHANGES_KEPT,
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
    parse_bbox,
    parse_datetime_query,
    parse_filter,
    widen_extent,
)

__all__ = ["PgstacStore", "PgstacStoreError", "install_generation"]


_CODES_BATCH = 5000

_GENERATION_DDL = """
CREATE SCHEMA IF NOT EXISTS rscbir;
GRANT USAGE ON SCHEMA rscbir TO PUBLIC;
CREATE TABLE IF NOT EXISTS rscbir.generation (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    value bigint NOT NULL
);
GRANT SELECT ON rscbir.generation TO PUBLIC;
-- starts at the creation time in microseconds, not 0: an index saved for an earlier database
-- of the same name can never look current to a new one
INSERT INTO rscbir.generation (value)
    VALUES ((extract(epoch FROM clock_timestamp()) * 1000000)::bigint) ON CONFLICT DO NOTHING;
CREATE OR REPLACE FUNCTION rscbir.bump_generation() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF current_setting('rscbir.generation_xact', true) IS DISTINCT FROM txid_current()::text THEN
        UPDATE rscbir.generation SET value = value + 1;
        PERFORM set_config('rscbir.generation_xact', txid_current()::text, true);
    END IF;
END $$;
-- the change log: which items (id '') or collections (id '' written, '*' deleted) each
-- generation wrote, so that a hash index follows writes made behind its back instead of being
-- rebuilt; generations at or below the horizon were pruned (an index that old is rebuilt)
CREATE TABLE IF NOT EXISTS rscbir.changes (
    generation bigint NOT NULL,
    collection text NOT NULL,
    id text NOT NULL,
    PRIMARY KEY (generation, collection, id)
);
GRANT SELECT ON rscbir.changes TO PUBLIC;
CREATE TABLE IF NOT EXISTS rscbir.changes_horizon (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    horizon bigint NOT NULL
);
GRANT SELECT ON rscbir.changes_horizon TO PUBLIC;
INSERT INTO rscbir.changes_horizon (horizon)
    SELECT value FROM rscbir.generation ON CONFLICT DO NOTHING;
CREATE OR REPLACE FUNCTION rscbir.log_change(coll text, item text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE g bigint;
BEGIN
    PERFORM rscbir.bump_generation();
    SELECT value INTO g FROM rscbir.generation;
    INSERT INTO rscbir.changes VALUES (g, coll, item) ON CONFLICT DO NOTHING;
    -- every %(every)sth generation, keep the last %(keep)s generations of the log
    IF g %% %(every)s = 0 AND (SELECT horizon FROM rscbir.changes_horizon) < g - %(keep)s THEN
        DELETE FROM rscbir.changes WHERE generation <= g - %(keep)s;
        UPDATE rscbir.changes_horizon SET horizon = g - %(keep)s;
    END IF;
END $$;
CREATE OR REPLACE FUNCTION rscbir.generation_trigger() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_TABLE_NAME = 'collections' THEN
        PERFORM rscbir.log_change(
            coalesce(NEW.id, OLD.id), CASE TG_OP WHEN 'DELETE' THEN '*' ELSE '' END
        );
        RETURN NULL;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        PERFORM rscbir.log_change(OLD.collection, OLD.id);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        PERFORM rscbir.log_change(NEW.collection, NEW.id);
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS rscbir_generation ON pgstac.items;
CREATE TRIGGER rscbir_generation AFTER INSERT OR UPDATE OR DELETE ON pgstac.items
    FOR EACH ROW EXECUTE FUNCTION rscbir.generation_trigger();
DROP TRIGGER IF EXISTS rscbir_generation ON pgstac.collections;
CREATE TRIGGER rscbir_generation AFTER INSERT OR UPDATE OR DELETE ON pgstac.collections
    FOR EACH ROW EXECUTE FUNCTION rscbir.generation_trigger();
"""

_GENERATION_INSTALLED = """
SELECT to_regprocedure('rscbir.bump_generation()') IS NOT NULL
   AND to_regprocedure('rscbir.log_change(text, text)') IS NOT NULL
   AND to_regclass('rscbir.generation') IS NOT NULL
   AND (SELECT count(*) FROM pg_trigger
        WHERE tgname = 'rscbir_generation'
          AND tgrelid IN ('pgstac.items'::regclass, 'pgstac.collections'::regclass)) = 2
"""

_CODES_SQL = """
SELECT i.collection, i.id, i.content->'properties'->'cbir:codes'
FROM pgstac.items i
WHERE i.content->'properties'->'cbir:codes' @> %(probe)s::jsonb
ORDER BY i.collection, i.id
"""


_CODE_MODELS_SQL = """
SELECT DISTINCT c.value->>'model'
FROM pgstac.items i
CROSS JOIN LATERAL jsonb_array_elements(
    CASE jsonb_typeof(i.content->'properties'->'cbir:codes')
    WHEN 'array' THEN i.content->'properties'->'cbir:codes' ELSE '[]'::jsonb END
) AS c(value)
WHERE jsonb_typeof(c.value) = 'object' AND c.value->>'model' IS NOT NULL
ORDER BY 1
"""


# the one-row tables are read as scalar subqueries: joined as tables (never analyzed, so
# estimated at 2,200 rows each) the plan's cost passed jit_above_cost and every call paid
# ~40 ms of JIT compilation for a ~1 ms query
_CHANGES_SQL = """
SELECT g.value, g.horizon, (
    SELECT coalesce(jsonb_agg(DISTINCT jsonb_build_array(c.collection, c.id)), '[]'::jsonb)
    FROM rscbir.changes c WHERE c.generation > %(since)s AND c.generation <= g.value
)
FROM (
    SELECT (SELECT value FROM rscbir.generation) AS value,
           (SELECT horizon FROM rscbir.changes_horizon) AS horizon
) g
"""


class PgstacStoreError(StoreError):
    """PostgreSQL failed, or the database is not a migrated pgstac database."""


def _redact(dsn: str) -> str:
    """``dsn`` without its password (for messages)."""
    dsn = re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", dsn)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn)


def install_generation(conn: psycopg.Connection[Any]) -> None:
    """Create the ``rscbir`` generation counter and its triggers, unless they exist.

    Idempotent and safe to run from several processes at once (an advisory lock serialises it);
    rerun it after a pgstac migration that recreates ``pgstac.items``.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('rscbir.install_generation'))")
        row = conn.execute(_GENERATION_INSTALLED).fetchone()
        if row is None or not row[0]:
            conn.execute(_GENERATION_DDL % {"keep": CHANGES_KEPT, "every": PRUNE_EVERY})


def _query_error(exc: psycopg.Error) -> StoreError:
    """The store error for a failed search: the request's fault (400) or the database's."""
    state = exc.sqlstate or ""
    if state.startswith(("22", "42")) or state == "P0001":
        diag = exc.diag.message_primary or str(exc)
        return InvalidQueryError(f"pgstac refused the search: {diag}")
    return PgstacStoreError(f"pgstac search failed: {exc}")


def _null_datetime(item: dict[str, Any]) -> dict[str, Any]:
    """The item with ``properties.datetime`` present: pgstac strips JSON nulls when it stores
    an item, so an item of a datetime range (``"datetime": null``, ``start_datetime`` and
    ``end_datetime``) comes back without the field STAC requires."""
    properties = item.get("properties")
    if isinstance(properties, dict) and "datetime" not in properties:
        properties["datetime"] = None
    return item


def _json_array(texts: Sequence[str]) -> str:
    return "[" + ",".join(texts) + "]"


def _keys_params(keys: Sequence[ItemKey]) -> tuple[list[str], list[str]]:
    return [k[0] for k in keys], [k[1] for k in keys]


class PgstacStore:
    """:class:`~stac_rscbir.store.base.ItemStore` over a pgstac database (see the module doc).

    ``dsn`` names a database migrated by ``pypgstac migrate``; the generation counter is
    installed on first use. ``pool_size`` connections at most are opened (psycopg-pool), shared
    by the threads of the web app; :meth:`close` closes them.
    """

    def __init__(self, dsn: str, *, pool_size: int = 4, timeout: float = 30.0) -> None:
        self.dsn = dsn
        try:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
                conn.execute("SELECT pgstac.get_version()")
                install_generation(conn)
        except psycopg.OperationalError as exc:
            raise PgstacStoreError(f"cannot connect to pgstac at {_redact(dsn)}: {exc}") from exc
        except psycopg.Error as exc:
            raise PgstacStoreError(
                f"{_redact(dsn)} is not a pgstac database (run `pypgstac migrate`): {exc}"
            ) from exc
        self._pool = ConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            timeout=timeout,
            kwargs={"autocommit": True},
            configure=self._configure,
            name="rscbir-pgstac",
            open=True,
        )

    @staticmethod
    def _configure(conn: psycopg.Connection[Any]) -> None:
        conn.execute("SET search_path TO pgstac, public")  # pgstac's functions expect it
        conn.execute("SET pgstac.readonly TO 'true'")  # no search caches (see the module doc)

    def close(self) -> None:
        """Close the connections; the store cannot be used afterwards."""
        self._pool.close()

    def __enter__(self) -> PgstacStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- connections ----------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection() as conn:
                yield conn
        except psycopg.Error as exc:
            raise PgstacStoreError(f"pgstac at {_redact(self.dsn)}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[psycopg.Connection[Any]]:
        """One transaction that also bumps the generation; rolled back on any error.

        The bump comes first: it locks the generation row until the commit, so the store's
        writers queue there instead of deadlocking inside pgstac's staging triggers (two
        concurrent ``upsert_items`` into one collection otherwise do: each holds what the other
        waits for, the row included)."""
        try:
            with self._pool.connection() as conn, conn.transaction():
                conn.execute("SELECT rscbir.bump_generation()")
                yield conn
        except StoreError:
            raise
        except errors.UniqueViolation as exc:
            raise ConflictError(f"already exists: {exc.diag.message_detail or exc}") from exc
        except psycopg.Error as exc:
            raise PgstacStoreError(f"pgstac at {_redact(self.dsn)}: {exc}") from exc

    @staticmethod
    def _require_collections(conn: psycopg.Connection[Any], ids: Sequence[str]) -> None:
        wanted = list(dict.fromkeys(ids))
        rows = conn.execute("SELECT id FROM pgstac.collections WHERE id = ANY(%s)", (wanted,))
        present = {r[0] for r in rows}
        for cid in wanted:
            if cid not in present:
                raise NotFoundError(f"collection {cid!r} not found")

    @staticmethod
    def _exists(conn: psycopg.Connection[Any], collection_id: str, item_id: str) -> bool:
        row = conn.execute(
            "SELECT 1 FROM pgstac.items WHERE collection = %s AND id = %s",
            (collection_id, item_id),
        ).fetchone()
        return row is not None

    @staticmethod
    def _widen(conn: psycopg.Connection[Any], items: Sequence[PreparedItem]) -> None:
        """Grow the extents of the items' collections to cover them (:func:`widen_extent`), in
        the write's transaction (the row lock orders concurrent writers)."""
        for cid, cover in coverages(items).items():
            PgstacStore._widen_to(conn, cid, cover)

    @staticmethod
    def _widen_to(conn: psycopg.Connection[Any], collection_id: str, cover: Coverage) -> None:
        row = conn.execute(
            "SELECT content FROM pgstac.collections WHERE id = %s FOR UPDATE", (collection_id,)
        ).fetchone()
        widened = widen_extent(row[0], cover) if row else None
        if widened is not None:
            conn.execute(
                "SELECT pgstac.update_collection(%s::jsonb)", (collection_json(widened)[1],)
            )

    # -- collections ----------------------------------------------------------------------

    def create_collection(self, collection: dict[str, Any]) -> None:
        cid, content = collection_json(collection)
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM pgstac.collections WHERE id = %s", (cid,)).fetchone():
                raise ConflictError(f"collection {cid!r} already exists")
            conn.execute("SELECT pgstac.create_collection(%s::jsonb)", (content,))

    def update_collection(self, collection: dict[str, Any]) -> None:
        """Replace the collection; its extent is widened to cover the items it holds."""
        cid, content = collection_json(collection)
        with self._write() as conn:
            self._require_collections(conn, [cid])
            conn.execute("SELECT pgstac.update_collection(%s::jsonb)", (content,))
            row = conn.execute(
                "SELECT st_xmin(e), st_ymin(e), st_xmax(e), st_ymax(e), lo, hi FROM ("
                "SELECT st_extent(geometry) AS e, min(datetime) AS lo, max(end_datetime) AS hi "
                "FROM pgstac.items WHERE collection = %s) AS a",
                (cid,),
            ).fetchone()
            if row is not None and row[0] is not None:
                times = [t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ") for t in row[4:]]
                self._widen_to(conn, cid, (tuple(row[:4]), times[0], times[1]))

    def delete_collection(self, collection_id: str) -> None:
        """Delete the collection and all its items."""
        with self._write() as conn:
            self._require_collections(conn, [collection_id])
            conn.execute("SELECT pgstac.delete_collection(%s)", (collection_id,))

    def get_collection(self, collection_id: str) -> dict[str, Any]:
        with self._read() as conn:
            row = conn.execute(
                "SELECT content FROM pgstac.collections WHERE id = %s", (collection_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"collection {collection_id!r} not found")
        return row[0]

    def all_collections(self) -> list[dict[str, Any]]:
        """All collections, by id."""
        with self._read() as conn:
            rows = conn.execute("SELECT content FROM pgstac.collections ORDER BY id").fetchall()
        return [r[0] for r in rows]

    # -- items --------------------------------------------------------------------------

    def create_item(self, item: dict[str, Any]) -> None:
        """Add a new item (ConflictError if it exists, NotFoundError without its collection)."""
        p = PreparedItem(item)
        with self._write() as conn:
            self._require_collections(conn, [p.collection])
            if self._exists(conn, p.collection, p.id):
                raise ConflictError(f"item {p.id!r} already exists in collection {p.collection!r}")
            conn.execute("SELECT pgstac.create_item(%s::jsonb)", (p.content,))
            self._widen(conn, [p])

    def update_item(self, item: dict[str, Any]) -> None:
        """Replace an existing item (NotFoundError if it does not exist)."""
        p = PreparedItem(item)
        with self._write() as conn:
            self._require_collections(conn, [p.collection])
            if not self._exists(conn, p.collection, p.id):
                raise NotFoundError(f"item {p.id!r} not found in collection {p.collection!r}")
            conn.execute("SELECT pgstac.update_item(%s::jsonb)", (p.content,))
            self._widen(conn, [p])

    def upsert_items(self, items: Sequence[dict[str, Any]]) -> None:
        """Create or replace all ``items`` in one transaction (all or nothing).

        Raises ValueError (InvalidItemError, naming the item and field) before writing anything
        if any item is invalid, NotFoundError if a collection is missing. When an item appears
        twice, the last one wins.
        """
        prepared: dict[ItemKey, PreparedItem] = {}
        geoms = geometries([it.get("geometry") if isinstance(it, dict) else None for it in items])
        for i, (item, geom) in enumerate(zip(items, geoms, strict=True)):
            try:
                p = PreparedItem(item, geom)
            except InvalidItemError as exc:
                if exc.item_id is None:
                    raise InvalidItemError(f"items[{i}]", exc.field, exc.problem) from exc
                raise
            prepared.pop((p.collection, p.id), None)
            prepared[(p.collection, p.id)] = p
        if not prepared:
            return
        with self._write() as conn:
            self._require_collections(conn, [c for c, _ in prepared])
            conn.execute(
                "SELECT pgstac.upsert_items(%s::jsonb)",
                (_json_array([p.content for p in prepared.values()]),),
            )
            self._widen(conn, list(prepared.values()))

    def delete_item(self, collection_id: str, item_id: str) -> None:
        with self._write() as conn:
            deleted = conn.execute(
                "DELETE FROM pgstac.items WHERE collection = %s AND id = %s",
                (collection_id, item_id),
            ).rowcount
            if not deleted:
                raise NotFoundError(f"item {item_id!r} not found in collection {collection_id!r}")

    def get_item(self, collection_id: str, item_id: str) -> dict[str, Any]:
        with self._read() as conn:
            row = conn.execute(
                "SELECT pgstac.content_hydrate(i) FROM pgstac.items i "
                "WHERE i.collection = %s AND i.id = %s",
                (collection_id, item_id),
            ).fetchone()
            if row is None:
                self._require_collections(conn, [collection_id])
                raise NotFoundError(f"item {item_id!r} not found in collection {collection_id!r}")
        return _null_datetime(row[0])

    def get_items(self, keys: Sequence[ItemKey]) -> list[dict[str, Any]]:
        """The items of ``keys``, in that order; keys without an item are skipped."""
        if not keys:
            return []
        with self._read() as conn:
            rows = conn.execute(
                "SELECT pgstac.content_hydrate(i) "
                "FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS k(collection, id, n) "
                "JOIN pgstac.items i ON i.collection = k.collection AND i.id = k.id "
                "ORDER BY k.n",
                _keys_params(keys),
            ).fetchall()
        return [_null_datetime(r[0]) for r in rows]

    # -- search -------------------------------------------------------------------------

    @staticmethod
    def _body(query: SearchQuery) -> dict[str, Any]:
        """The pgstac search body of the query's filters (no sortby, limit or token)."""
        body: dict[str, Any] = {}
        if query.collections:
            body["collections"] = list(query.collections)
        if query.ids:
            body["ids"] = list(query.ids)
        if query.datetime is not None:
            parse_datetime_query(query.datetime)  # the same 400s as the SQLite store
            body["datetime"] = query.datetime
        filters: list[dict[str, Any]] = []
        if query.filter is not None:
            filters.append(parse_filter(query.filter).to_json())
        if query.bbox is not None:
            minx, miny, maxx, maxy = parse_bbox(query.bbox)
            if query.intersects is None:
                body["bbox"] = [minx, miny, maxx, maxy]
            else:  # pgstac reads one geometry: the box joins the filter
                ring = [[minx, miny], [maxx, miny], [maxx, maxy], [minx, maxy], [minx, miny]]
                polygon = {"type": "Polygon", "coordinates": [ring]}
                filters.append({"op": "s_intersects", "args": [{"property": "geometry"}, polygon]})
        if query.intersects is not None:
            if not isinstance(query.intersects, dict) or "type" not in query.intersects:
                raise InvalidQueryError("intersects: expected a GeoJSON geometry object")
            body["intersects"] = query.intersects
        if filters:
            body["filter"] = filters[0] if len(filters) == 1 else {"op": "and", "args": filters}
            body["filter-lang"] = "cql2-json"
        return body

    def search(self, query: SearchQuery) -> SearchPage:
        """One page of the STAC API item search, by ``pgstac.search``."""
        limit = query.limit
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise InvalidQueryError(f"limit: expected a non-negative integer, got {limit!r}")
        body = self._body(query)
        body["limit"] = limit
        if query.sortby:
            body["sortby"] = list(query.sortby)
        if query.token:
            body["token"] = query.token
        body["conf"] = {"context": "on", "context_stats_ttl": "0 seconds"}
        with self._read() as conn:
            try:
                row = conn.execute("SELECT pgstac.search(%s::jsonb)", (json.dumps(body),))
                result = row.fetchone()[0]  # type: ignore[index]
            except psycopg.Error as exc:
                raise _query_error(exc) from exc
        next_token = None
        for link in result.get("links", []):
            if link.get("rel") == "next":
                next_token = link["href"].split("token=", 1)[1]
        return SearchPage(
            items=[_null_datetime(i) for i in result.get("features") or []],
            next_token=next_token,
            matched=result.get("numberMatched"),
        )

    def filter_keys(
        self, query: SearchQuery, keys: Sequence[ItemKey] | None = None
    ) -> list[ItemKey]:
        """The keys of the items matching the query's filters (limit, token, sortby ignored);
        :meth:`keys_matching` of the query's pgstac search body."""
        return self.keys_matching(self._body(query), keys)

    def keys_matching(
        self, body: dict[str, Any], keys: Sequence[ItemKey] | None = None
    ) -> list[ItemKey]:
        """The keys of the items a pgstac search body selects (its filters: collections, ids,
        bbox, intersects, datetime, filter, query...; paging and sorting fields are ignored).

        With ``keys``: the matching subset, in the order given (repeats kept). Without: every
        matching item, by (collection, id). pgstac's own WHERE clause of the body
        (``stac_search_to_where``), run here: no ``pgstac.searches`` row, no paging. A body
        pgstac refuses is an InvalidQueryError naming pgstac's reason.
        """
        if keys is not None and not keys:
            return []
        with self._read() as conn:
            try:
                where = conn.execute(
                    "SELECT pgstac.stac_search_to_where(%s::jsonb)", (json.dumps(body),)
                )
                clause = sql.SQL(where.fetchone()[0].replace("%", "%%"))  # type: ignore[index]
                if keys is None:
                    stmt = sql.SQL(
                        "SELECT collection, id FROM pgstac.items WHERE {} ORDER BY collection, id"
                    ).format(clause)
                    rows = conn.execute(stmt).fetchall()
                else:
                    # the clause names items' columns unqualified: keep other names apart
                    stmt = sql.SQL(
                        "SELECT k.key_c, k.key_i "
                        "FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY "
                        "AS k(key_c, key_i, key_n) "
                        "WHERE EXISTS (SELECT 1 FROM pgstac.items "
                        "WHERE collection = k.key_c AND id = k.key_i AND {}) ORDER BY k.key_n"
                    ).format(clause)
                    rows = conn.execute(stmt, _keys_params(keys)).fetchall()
            except psycopg.Error as exc:
                raise _query_error(exc) from exc
        return [(r[0], r[1]) for r in rows]

    def property_types(self, collection_id: str | None = None) -> dict[str, set[str]]:
        """Each property name of the items (of ``collection_id``, or of all) -> the JSON types
        (``string``, ``integer``, ``number``, ``boolean``, ``array``, ``object``, ``null``) of its
        values. Scans the items (their own properties: never dehydrated)."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT p.key, CASE WHEN jsonb_typeof(p.value) = 'number' "
                "AND p.value::text ~ '^-?[0-9]+$' THEN 'integer' "  # as JSON wrote it
                "ELSE jsonb_typeof(p.value) END "
                "FROM pgstac.items i, jsonb_each(i.content->'properties') AS p(key, value) "
                "WHERE jsonb_typeof(i.content->'properties') = 'object' "
                "AND (%(c)s::text IS NULL OR i.collection = %(c)s) GROUP BY 1, 2",
                {"c": collection_id},
            ).fetchall()
        out: dict[str, set[str]] = {}
        for key, kind in rows:
            out.setdefault(key, set()).add(kind)
        return out

    # -- codes ---------------------------------------------------------------------------

    def iter_codes(self, model: str, version: str | None = None) -> Iterator[StoredCode]:
        """Of each item having one, its code of ``model`` (of ``version`` when given), by
        (collection, id): the one :func:`~stac_rscbir.extension.cbir.code_of` picks from the
        item's ``cbir:codes`` (SQL selects the items holding an entry of the model; an entry
        that does not decode, written behind the store's back, is skipped with a warning).

        Streamed by a server-side cursor, in one snapshot.
        """
        probe = {"model": model} if version is None else {"model": model, "model_version": version}
        with self._read() as conn, conn.transaction():
            cur = conn.cursor(name="rscbir_codes")
            cur.itersize = _CODES_BATCH
            cur.execute(_CODES_SQL, {"probe": json.dumps([probe])})
            for collection, item_id, codes in cur:
                item = {"collection": collection, "id": item_id, "properties": {CODES_PROP: codes}}
                code = code_of(item, model, version)
                if code is not None:
                    yield StoredCode.of((collection, item_id), code)
            cur.close()

    def code_models(self) -> list[str]:
        """The models some item has a code of (for the API's error messages; scans the items)."""
        with self._read() as conn:
            rows = conn.execute(_CODE_MODELS_SQL).fetchall()
        return [row[0] for row in rows]

    def generation(self) -> int:
        """Bumped by every transaction that writes items or collections (see the module doc)."""
        with self._read() as conn:
            row = conn.execute("SELECT value FROM rscbir.generation").fetchone()
        return int(row[0]) if row else 0

    def changes_since(self, generation: int) -> tuple[int, list[ItemKey]] | None:
        """(present generation, the keys written after ``generation``), from the change log;
        None when the log no longer reaches back that far (the contract:
        :data:`~stac_rscbir.store.base.CHANGES_KEPT`)."""
        with self._read() as conn:  # one statement: one snapshot of the counter and the log
            row = conn.execute(_CHANGES_SQL, {"since": generation}).fetchone()
        if row is None or generation < row[1]:
            return None
        return int(row[0]), [(c, i) for c, i in row[2]]

    def count(self) -> int:
        """The number of items in the store."""
        with self._read() as conn:
            row = conn.execute("SELECT count(*) FROM pgstac.items").fetchone()
        return int(row[0]) if row else 0
