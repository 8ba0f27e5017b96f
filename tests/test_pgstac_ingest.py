"""pgstac as source and sink of the ingestion worker, and the bulk-load hook, on a real
PostgreSQL 15 + PostGIS cluster (the ``pgstac_dsn`` fixture) with rasters written here."""

from __future__ import annotations

import json
import os
import pickle
import threading
import time
from collections.abc import Callable, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pystac
import pytest

from stac_rscbir.ingest.report import RunReport
from stac_rscbir.ingest.worker import Ingestor

from . import ingest_builders as base

if find_spec("psycopg") is None:  # the pgstac extra: skipped locally, required in CI
    if os.environ.get("RSCBIR_REQUIRE_ALL") == "1":
        raise ImportError("required in CI: psycopg (install the pgstac extra)")
    pytest.skip("psycopg not installed (the pgstac extra)", allow_module_level=True)

import psycopg

from stac_rscbir.ingest.pgstac import (
    DEFAULT_CHANNEL,
    PgstacError,
    PgstacSink,
    install_notify_trigger,
    items_from_pgstac,
    listen_and_encode,
)

from .pgcluster import pypgstac_load
from .pgstac_builders import (
    MODEL,
    _assert_encoded_once,
    _chips_of,
    _collection,
    _insert,
    _model_codes,
    _scenes,
    _stored,
)


def _ndjson(path: Path, items: Sequence[pystac.Item]) -> Path:
    lines = [json.dumps(i.to_dict(include_self_link=False, transform_hrefs=False)) for i in items]
    path.write_text("\n".join(lines) + "\n")
    return path


def _collection_content(dsn: str, cid: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT content FROM pgstac.collections WHERE id = %s", (cid,)
        ).fetchone()
    assert row is not None, cid
    return row[0]


def _wait_until(condition: Callable[[], bool], worker: _Consumer, what: str) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        worker.check()
        assert time.monotonic() < deadline, f"timed out waiting for {what} to be encoded"
        time.sleep(0.2)


def _all_encoded(dsn: str, cid: str, n: int) -> bool:
    stored = _stored(dsn, cid)
    return len(stored) == n and all(_model_codes(i) for i in stored.values())


class _Consumer:
    """``listen_and_encode`` on a thread, restricted to one collection, until :meth:`stop`;
    ``batches`` are the keys of each batch of notifications it has handled, in order."""

    def __init__(self, dsn: str, checkpoint: Path, cid: str) -> None:
        self._stop = threading.Event()
        self.report: RunReport | None = None
        self.error: BaseException | None = None
        self.batches: list[list[tuple[str, str]]] = []
        self._handled = threading.Condition()
        ingestor = Ingestor.from_checkpoint(checkpoint, base.OPTIONS)

        def on_batch(keys: list[tuple[str, str]]) -> None:
            with self._handled:
                self.batches.append(keys)
                self._handled.notify_all()

        def run() -> None:
            try:
                self.report = listen_and_encode(
                    dsn, ingestor, stop=self._stop, collections=[cid], poll=0.2, on_batch=on_batch
                )
            except BaseException as exc:
                self.error = exc
            finally:
                with self._handled:
                    self._handled.notify_all()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def check(self) -> None:
        if self.error is not None:
            raise self.error
        assert self.thread.is_alive(), "the consumer stopped on its own"

    def wait_handled(self, key: tuple[str, str], timeout: float = 120) -> None:
        """Until a batch naming ``key`` has been handled."""
        with self._handled:
            self._handled.wait_for(
                lambda: any(key in b for b in self.batches) or not self.thread.is_alive(), timeout
            )
            handled = any(key in b for b in self.batches)
        self.check()
        assert handled, f"timed out waiting for the consumer to handle the notification of {key}"

    def stop(self) -> RunReport:
        self._stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "the consumer did not stop"
        if self.error is not None:
            raise self.error
        assert self.report is not None
        return self.report


def test_pgstac_round_trip_source_and_sink(
    pgstac_dsn: str, checkpoint: Path, tmp_path: Path
) -> None:
    cid = "rt-scenes"
    items = _scenes(tmp_path, cid, seed=100)
    _insert(pgstac_dsn, cid, items)
    sink = PgstacSink(pgstac_dsn)
    ingestor = Ingestor.from_checkpoint(checkpoint, base.OPTIONS)
    report = ingestor.run(items_from_pgstac(pgstac_dsn, [cid]), sink)
    assert (report.items_encoded, report.chips_encoded, report.errors) == (3, 6, [])
    _assert_encoded_once(pgstac_dsn, cid, items)
    # the scene's own fields survive the round trip, next to the code
    scene = _stored(pgstac_dsn, cid)[f"{cid}-06-0"]
    assert scene["properties"]["platform"] == "test-sat" and "image" in scene["assets"]
    # both collections describe the model; the chip collection has the chips' extent
    for c in (cid, f"{cid}-chips"):
        assert [m["id"] for m in _collection_content(pgstac_dsn, c)["cbir:models"]] == [MODEL]
    chip_bbox = _collection_content(pgstac_dsn, f"{cid}-chips")["extent"]["spatial"]["bbox"][0]
    assert chip_bbox[0] > 0 and chip_bbox[2] - chip_bbox[0] < 1  # not the global placeholder

    # rerun: every item already carries the code; nothing is written
    again = ingestor.run(items_from_pgstac(pgstac_dsn, [cid]), pickle.loads(pickle.dumps(sink)))
    assert (again.items_seen, again.items_skipped, again.items_encoded) == (3, 3, 0)
    assert list(items_from_pgstac(pgstac_dsn, [cid], missing_model=MODEL)) == []
    # chip items are outputs, never inputs, even when their collection is listed
    both = [cid, f"{cid}-chips"]
    assert len(list(items_from_pgstac(pgstac_dsn, both, missing_model="other-model"))) == 3
    sink.close()


def test_pgstac_errors_name_the_problem(pgstac_dsn: str, tmp_path: Path) -> None:
    with pytest.raises(PgstacError, match=r"no such collection.*nope"):
        list(items_from_pgstac(pgstac_dsn, ["nope"]))
    item = _scenes(tmp_path, "absent", seed=1)[0]
    with pytest.raises(PgstacError, match=r"collection 'absent' .* does not exist"):
        PgstacSink(pgstac_dsn).write(item, [])
    dead = "postgresql://postgres:secret@127.0.0.1:1/pgstac"
    with pytest.raises(PgstacError, match="cannot connect") as info:
        PgstacSink(dead).is_encoded(item, MODEL, "1")
    assert "secret" not in str(info.value)
    no_schema = pgstac_dsn.rsplit("/", 1)[0] + "/postgres"
    with pytest.raises(PgstacError, match="no pgstac schema"):
        list(items_from_pgstac(no_schema))


def test_bulk_loaded_items_are_encoded_exactly_once(
    pgstac_dsn: str, checkpoint: Path, tmp_path: Path
) -> None:
    cid = "bulk-scenes"
    install_notify_trigger(pgstac_dsn)
    install_notify_trigger(pgstac_dsn)  # idempotent
    pypgstac_load(pgstac_dsn, "collections", _ndjson_collection(tmp_path, cid), "insert_ignore")
    with psycopg.connect(pgstac_dsn, autocommit=True) as conn:  # monthly sub-partitions
        conn.execute(
            "UPDATE pgstac.collections SET partition_trunc = 'month' WHERE id = %s", (cid,)
        )
    worker = _Consumer(pgstac_dsn, checkpoint, cid)
    try:
        first = _scenes(tmp_path / "a", cid, seed=200, months=(6,))
        pypgstac_load(pgstac_dsn, "items", _ndjson(tmp_path / "a.ndjson", first), "insert_ignore")
        _wait_until(lambda: _all_encoded(pgstac_dsn, cid, 3), worker, "the first load")
        # a second load, into partitions that did not exist when the trigger was made, after
        # the consumer's catch-up pass is certainly over: only notifications can bring it in
        second = _scenes(tmp_path / "b", cid, seed=300, months=(7, 8))
        pypgstac_load(pgstac_dsn, "items", _ndjson(tmp_path / "b.ndjson", second), "insert_ignore")
        _wait_until(lambda: _all_encoded(pgstac_dsn, cid, 9), worker, "the second load")
        # The consumer hears its own upserts, which must not write again. They are committed
        # (read above), and notifications arrive in commit order: once a notification sent now
        # is handled, so are they.
        marker = (cid, "marker-not-an-item")
        _notify(pgstac_dsn, *marker)
        worker.wait_handled(marker)
    finally:
        report = worker.stop()
    with psycopg.connect(pgstac_dsn, autocommit=True) as conn:
        (triggers,) = conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgname = 'rscbir_notify_cbir_items'"
        ).fetchone() or (0,)
    assert triggers >= 1 + 1 + 3  # on items, on the collection's partition, on its 3 months
    _assert_encoded_once(pgstac_dsn, cid, [*first, *second])
    assert (report.items_encoded, report.chips_encoded) == (9, _chips_of([*first, *second]))
    # not vacuous: the second load's items were each heard twice, from the load and from the
    # consumer's own upsert, before the consumer stopped
    heard = [key for batch in worker.batches for key in batch]
    assert all(heard.count((cid, item.id)) >= 2 for item in second), heard


def _notify(dsn: str, collection: str, item_id: str) -> None:
    """A notification on the consumer's channel, as the trigger sends them."""
    payload = json.dumps({"collection": collection, "id": item_id})
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (DEFAULT_CHANNEL, payload))


def _ndjson_collection(folder: Path, cid: str) -> Path:
    path = folder / f"{cid}.json"
    path.write_text(json.dumps(_collection(cid)) + "\n")
    return path


def test_items_loaded_without_a_consumer_are_caught_up(
    pgstac_dsn: str, checkpoint: Path, tmp_path: Path
) -> None:
    cid = "late-scenes"
    install_notify_trigger(pgstac_dsn)
    pypgstac_load(pgstac_dsn, "collections", _ndjson_collection(tmp_path, cid), "insert_ignore")
    items = _scenes(tmp_path, cid, seed=400)
    pypgstac_load(pgstac_dsn, "items", _ndjson(tmp_path / "items.ndjson", items), "insert_ignore")
    ingestor = Ingestor.from_checkpoint(checkpoint, base.OPTIONS)
    report = listen_and_encode(pgstac_dsn, ingestor, idle_timeout=1.0, collections=[cid])
    assert (report.items_encoded, report.chips_encoded, report.errors) == (3, 6, [])
    _assert_encoded_once(pgstac_dsn, cid, items)
    # a second consumer finds nothing left to do
    again = listen_and_encode(pgstac_dsn, ingestor, idle_timeout=0.5, collections=[cid])
    assert (again.items_seen, again.items_encoded) == (0, 0)
