"""pgstac (PostgreSQL + PostGIS) as a source and a sink of the ingestion worker, and the hook
that encodes items bulk-loaded behind the API's back.

The hook is a row trigger on ``pgstac.items`` that sends ``pg_notify(channel,
'{"collection": ..., "id": ...}')`` after every insert or update of a scene item, and a
consumer (:func:`listen_and_encode`) that LISTENs on the channel and encodes what it hears about.
``pgstac.items`` is partitioned by collection (and, per collection, optionally by time): a row
trigger created on the partitioned parent is cloned by PostgreSQL onto every existing partition
and every partition created or attached later, so it also fires for ``pypgstac load``, which
writes into the partitions directly. (A statement-level trigger on the parent would not: it
fires only for statements that name the parent.)

Needs the ``pgstac`` extra (psycopg 3).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import pystac
from psycopg import sql
from psycopg.types.json import Jsonb

from stac_rscbir.extension.cbir import CBIRModel
from stac_rscbir.ingest.report import RunReport
from stac_rscbir.ingest.sinks import _add_model, _extent, has_code
from stac_rscbir.ingest.worker import Ingestor

DEFAULT_CHANNEL = "cbir_items"
TRIGGER_SCHEMA = "rscbir"  # our trigger function lives outside pgstac's schema (migrations own it)


class PgstacError(RuntimeError):
    """pgstac cannot be used as asked: no connection, no pgstac schema, a missing collection."""


def _redact(dsn: str) -> str:
    """``dsn`` without its password (for error messages)."""
    dsn = re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", dsn)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn)


def connect(dsn: str) -> psycopg.Connection[Any]:
    """An autocommit connection to a migrated pgstac database (clear errors when it is not)."""
    try:
        conn = psycopg.connect(dsn, autocommit=True)
    except psycopg.Error as exc:
        raise PgstacError(f"cannot connect to pgstac at {_redact(dsn)}: {exc}") from exc
    try:
        conn.execute("SELECT pgstac.get_version()")
        conn.execute("SET search_path TO pgstac, public")  # pgstac's functions expect it
    except psycopg.Error as exc:
        conn.close()
        raise PgstacError(
            f"{_redact(dsn)} has no pgstac schema (run `pypgstac migrate`): {exc}"
        ) from exc
    return conn


def _missing_collections(conn: psycopg.Connection[Any], ids: Sequence[str]) -> list[str]:
    rows = conn.execute("SELECT id FROM pgstac.collections WHERE id = ANY(%s)", (list(ids),))
    present = {r[0] for r in rows}
    return [c for c in ids if c not in present]


# ----------------------------------------------------------------------------- source

_ITEMS_PAGE = sql.SQL(
    """
    SELECT i.collection, i.id, pgstac.content_hydrate(i)
    FROM pgstac.items i
    WHERE (%(after_collection)s::text IS NULL
           OR (i.collection, i.id) > (%(after_collection)s, %(after_id)s))
      AND (%(collections)s::text[] IS NULL OR i.collection = ANY(%(collections)s))
      AND (%(ids)s::text[] IS NULL
           OR (i.collection, i.id) IN (SELECT * FROM unnest(%(colls_of_ids)s::text[], %(ids)s)))
      AND NOT coalesce(i.content->'properties' ? 'cbir:chip', false)
      AND (%(model)s::text IS NULL OR NOT EXISTS (
            SELECT 1
            FROM jsonb_array_elements(CASE jsonb_typeof(i.content->'properties'->'cbir:codes')
                                      WHEN 'array' THEN i.content->'properties'->'cbir:codes'
                                      ELSE '[]'::jsonb END) AS c
            WHERE c->>'model' = %(model)s
              AND (%(version)s::text IS NULL OR c->>'model_version' = %(version)s)))
    ORDER BY i.collection, i.id
    LIMIT %(limit)s
    """
)


def _item_pages(
    conn: psycopg.Connection[Any],
    params: dict[str, Any],
    page_size: int,
) -> Iterator[pystac.Item]:
    after: tuple[str | None, str | None] = (None, None)
    while True:
        rows = conn.execute(
            _ITEMS_PAGE,
            {
                **params,
                "after_collection": after[0],
                "after_id": after[1],
                "limit": page_size,
            },
        ).fetchall()
        for _, _, content in rows:
            yield pystac.Item.from_dict(content, migrate=False)
        if len(rows) < page_size:
            return
        after = (rows[-1][0], rows[-1][1])


def items_from_pgstac(
    dsn: str,
    collections: Sequence[str] | None = None,
    missing_model: str | None = None,
    missing_version: str | None = None,
    page_size: int = 500,
) -> Iterator[pystac.Item]:
    """Scene items of a pgstac database (chip items, ``cbir:chip``, are left out), paged in
    (collection, id) order; with ``missing_model``, only those without a code of that model
    (at ``missing_version``, when given)."""
    with connect(dsn) as conn:
        if collections is not None:
            absent = _missing_collections(conn, list(collections))
            if absent:
                raise PgstacError(f"no such collection in pgstac at {_redact(dsn)}: {absent}")
        params = {
            "collections": list(collections) if collections is not None else None,
            "ids": None,
            "colls_of_ids": None,
            "model": missing_model,
            "version": missing_version,
        }
        yield from _item_pages(conn, params, page_size)


# ----------------------------------------------------------------------------- sink


class PgstacSink:
    """Upserts encoded items into pgstac: a scene's chip items and the scene in one transaction,
    the chip collection (``<collection>-chips``) created on first use.

    Picklable (Dask workers each hold one): only the DSN travels, the connection is opened lazily.
    """

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None
        self._known: set[str] = set()  # collections known to exist
        self._written: set[str] = set()  # collections written since the last finalize
        self._chip_collections: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_conn"] = None
        return state

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn)
        return self._conn

    def close(self) -> None:
        """Close the connection (it reopens on the next use)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def is_encoded(self, item: pystac.Item, model: str, version: str) -> bool:
        """Whether the stored item carries a code of ``model`` ``version``."""
        row = (
            self._connection()
            .execute("SELECT pgstac.get_item(%s, %s)", (item.id, item.collection_id))
            .fetchone()
        )
        stored = row[0] if row else None
        return stored is not None and has_code(stored.get("properties") or {}, model, version)

    def write(self, scene: pystac.Item, chips: Sequence[pystac.Item]) -> None:
        """Upsert the chip items, then the scene, in one transaction."""
        collection = scene.collection_id
        if not collection:
            raise PgstacError(f"item {scene.id!r} has no collection: pgstac stores items in one")
        conn = self._connection()
        chip_collections = sorted({c.collection_id or "" for c in chips})
        with conn.transaction():
            if collection not in self._known and _missing_collections(conn, [collection]):
                raise PgstacError(
                    f"collection {collection!r} of item {scene.id!r} does not exist in pgstac "
                    f"at {_redact(self.dsn)}"
                )
            for cid in chip_collections:
                if cid not in self._known:
                    self._create_chip_collection(conn, cid, chips)
            items = [
                it.to_dict(include_self_link=False, transform_hrefs=False) for it in [*chips, scene]
            ]
            conn.execute("SELECT pgstac.upsert_items(%s)", (Jsonb(items),))
        self._known.update([collection, *chip_collections])
        self._chip_collections.update(chip_collections)
        self._written.update([collection, *chip_collections])

    @staticmethod
    def _create_chip_collection(
        conn: psycopg.Connection[Any], cid: str, chips: Sequence[pystac.Item]
    ) -> None:
        coll = pystac.Collection(
            id=cid,
            description=f"Chips encoded by stac-rscbir ({cid})",
            extent=_extent(
                [c.to_dict(transform_hrefs=False) for c in chips if c.collection_id == cid]
            ),
            license="other",
        ).to_dict(include_self_link=False)
        coll["links"] = []
        conn.execute(
            "INSERT INTO pgstac.collections (content) VALUES (%s) ON CONFLICT (id) DO NOTHING",
            (Jsonb(coll),),
        )

    def begin(self, model: CBIRModel) -> None:
        """Nothing to declare up front: ``finalize`` describes the model."""

    def finalize(self, model: CBIRModel) -> None:
        """Describe ``model`` in ``cbir:models`` of every collection written; chip collections
        also get their extent from pgstac's partition statistics."""
        if not self._written:
            return
        conn = self._connection()
        with conn.transaction():
            for cid in sorted(self._written):
                row = conn.execute(
                    "SELECT content FROM pgstac.collections WHERE id = %s FOR UPDATE", (cid,)
                ).fetchone()
                if row is None:
                    raise PgstacError(f"collection {cid!r} disappeared from pgstac during the run")
                content = _add_model(row[0], model)
                if cid in self._chip_collections:
                    (extent,) = conn.execute(
                        "SELECT pgstac.collection_extent(%s, true)", (cid,)
                    ).fetchone() or (None,)
                    if extent:
                        content["extent"] = extent
                if content != row[0]:
                    conn.execute("SELECT pgstac.update_collection(%s)", (Jsonb(content),))
        self._written.clear()


# ----------------------------------------------------------------------------- hook


def install_notify_trigger(dsn: str, channel: str = DEFAULT_CHANNEL) -> None:
    """Create (or replace) the trigger on ``pgstac.items`` that notifies ``channel`` with
    ``{"collection", "id"}`` after each insert or update of a scene item (chip items are not
    announced). Idempotent; cloned by PostgreSQL onto every present and future partition."""
    trigger = sql.Identifier(f"rscbir_notify_{channel}"[:63])
    with connect(dsn) as conn, conn.transaction():
        conn.execute(
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(TRIGGER_SCHEMA))
        )
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO PUBLIC").format(sql.Identifier(TRIGGER_SCHEMA))
        )
        conn.execute(
            sql.SQL(
                """
                CREATE OR REPLACE FUNCTION {}.notify_item() RETURNS trigger
                LANGUAGE plpgsql AS $$
                BEGIN
                    PERFORM pg_notify(
                        TG_ARGV[0],
                        json_build_object('collection', NEW.collection, 'id', NEW.id)::text
                    );
                    RETURN NULL;
                END $$
                """
            ).format(sql.Identifier(TRIGGER_SCHEMA))
        )
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON pgstac.items").format(trigger))
        conn.execute(
            sql.SQL(
                """
                CREATE TRIGGER {} AFTER INSERT OR UPDATE ON pgstac.items
                FOR EACH ROW
                WHEN (NOT coalesce(NEW.content->'properties' ? 'cbir:chip', false))
                EXECUTE FUNCTION {}.notify_item({})
                """
            ).format(trigger, sql.Identifier(TRIGGER_SCHEMA), sql.Literal(channel))
        )


def _fetch_unencoded(
    conn: psycopg.Connection[Any], keys: set[tuple[str, str]], ingestor: Ingestor
) -> list[pystac.Item]:
    """The items named by ``keys`` that still lack a code of the ingestor's model version."""
    ordered = sorted(keys)
    params = {
        "collections": None,
        "colls_of_ids": [c for c, _ in ordered],
        "ids": [i for _, i in ordered],
        "model": ingestor.model_id,
        "version": ingestor.version,
    }
    return list(_item_pages(conn, params, page_size=max(len(ordered), 1)))


def listen_and_encode(
    dsn: str,
    ingestor: Ingestor,
    channel: str = DEFAULT_CHANNEL,
    idle_timeout: float | None = None,
    stop: threading.Event | None = None,
    collections: Sequence[str] | None = None,
    poll: float = 0.5,
    max_batch: int = 512,
    on_batch: Callable[[list[tuple[str, str]]], None] | None = None,
) -> RunReport:
    """Encode items announced on ``channel`` (see :func:`install_notify_trigger`) until ``stop``
    is set or ``idle_timeout`` seconds pass without a notification; with ``collections``, only
    items of those collections.

    LISTENs first, then encodes every item still lacking this model version's code (what was
    loaded while no consumer listened: those notifications are lost), then each batch of
    notifications (gathered for up to ``poll`` seconds). The consumer's own upserts are announced
    too; they are recognised as encoded and cost one lookup, never a second write.

    ``on_batch`` (progress, for monitoring and tests) is called on the consumer's thread after
    each batch of notifications is handled (its items encoded and written, or found encoded
    already), with the sorted ``(collection, id)`` keys it named (those of ``collections``).
    PostgreSQL delivers notifications in commit order: once a batch naming some notification has
    been reported, the notifications of every transaction that committed before it are handled.
    """
    sink = PgstacSink(dsn)
    report = RunReport(ingestor.model_id, ingestor.version, device=str(ingestor.device))
    start = time.monotonic()
    with connect(dsn) as listener, connect(dsn) as reader:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        try:
            report.merge(
                ingestor.run(
                    items_from_pgstac(
                        dsn,
                        collections,
                        missing_model=ingestor.model_id,
                        missing_version=ingestor.version,
                    ),
                    sink,
                )
            )
            last_heard = time.monotonic()
            while not (stop is not None and stop.is_set()):
                wait = poll
                if idle_timeout is not None:
                    left = idle_timeout - (time.monotonic() - last_heard)
                    if left <= 0:
                        break
                    wait = min(poll, left)
                keys: set[tuple[str, str]] = set()
                for note in listener.notifies(timeout=wait, stop_after=max_batch):
                    payload = json.loads(note.payload)
                    if collections is None or payload["collection"] in collections:
                        keys.add((payload["collection"], payload["id"]))
                if not keys:
                    continue
                last_heard = time.monotonic()
                items = _fetch_unencoded(reader, keys, ingestor)
                if items:
                    report.merge(ingestor.run(items, sink))
                if on_batch is not None:
                    on_batch(sorted(keys))
        finally:
            sink.close()
    report.wall_seconds = round(time.monotonic() - start, 3)
    return report
