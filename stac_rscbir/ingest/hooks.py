"""Encode items as they are added: a queue fed by the API's transaction hooks.

The Transactions endpoints commit the item first (the client gets its answer at once) and then
hand it to :class:`EncodeQueue`; one background thread encodes queued items with the loaded
model and upserts them (and their chips) into the same store, then tells ``after_write``
listeners (the similarity index). Items already carrying the model's code are left alone, so
the queue's own writes never loop. Items queued but not yet encoded when the server stops are
found again by a catch-up ingest run (``stac-rscbir ingest`` over the store), which skips what
is done.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

import pystac

from stac_rscbir.ingest.report import RunReport
from stac_rscbir.ingest.sinks import StoreSink, has_code
from stac_rscbir.ingest.worker import Ingestor

log = logging.getLogger(__name__)
AfterWrite = Callable[[str, dict[str, Any] | None, str], None]


class EncodeQueue:
    """A background encoder for items written through the API."""

    def __init__(
        self,
        ingestor: Ingestor,
        store: Any,
        after_write: list[AfterWrite] | None = None,
    ) -> None:
        self.ingestor = ingestor
        self.sink = StoreSink(store)
        self.store = store
        self.after_write = list(after_write or [])
        self.report = RunReport(ingestor.model_id, ingestor.version)
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="encode-queue", daemon=True)
        self._thread.start()

    def submit(self, collection: str, item: dict[str, Any] | None, item_id: str) -> None:
        """Transaction hook: queue a created or updated item that lacks this model's code."""
        if item is None or "cbir:chip" in item.get("properties", {}):
            return
        if has_code(item.get("properties", {}), self.ingestor.model_id, self.ingestor.version):
            return
        self._queue.put((collection, item_id))

    def join(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is encoded (True) or ``timeout`` passes."""
        done = threading.Event()

        def wait() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(timeout)

    def close(self) -> None:
        """Stop the thread after the queued items."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            key = self._queue.get()
            try:
                if key is None:
                    return
                self._encode(*key)
            except Exception:  # the server must keep running; the item stays unencoded
                log.exception("encoding %s/%s failed", *(key or ("?", "?")))
            finally:
                self._queue.task_done()

    def _encode(self, collection: str, item_id: str) -> None:
        from stac_rscbir.store.base import NotFoundError

        try:
            item = pystac.Item.from_dict(self.store.get_item(collection, item_id))
        except NotFoundError:
            return  # deleted meanwhile
        run = self.ingestor.run([item], _Notifying(self.sink, self.after_write))
        self.report.merge(run)
        for e in run.errors:
            log.warning(
                "item %s/%s not encoded: %s (%s)", e.collection, e.item_id, e.kind, e.message
            )


class _Notifying:
    """A sink wrapper that tells the after-write listeners of each write."""

    def __init__(self, sink: StoreSink, listeners: list[AfterWrite]) -> None:
        self.sink, self.listeners = sink, listeners

    def is_encoded(self, item: pystac.Item, model: str, version: str) -> bool:
        return self.sink.is_encoded(item, model, version)

    def begin(self, model: Any) -> None:
        self.sink.begin(model)

    def write(self, scene: pystac.Item, chips: Any) -> None:
        self.sink.write(scene, chips)
        for it in [*chips, scene]:
            d = it.to_dict(include_self_link=False, transform_hrefs=False)
            for listener in self.listeners:
                listener(d["collection"], d, d["id"])

    def finalize(self, model: Any) -> None:
        self.sink.finalize(model)
