"""The live hash indexes of a store: one per model, opened from their saved copies or rebuilt
from the store, kept in step with every write by following the store's change log, saved in the
background.

The lifecycle, in explicit phases:

* **open**: :meth:`LiveIndexes.index` loads the model's saved index and catches it up from the
  store's change log (:meth:`~stac_rscbir.store.base.ItemStore.changes_since`: the items
  written since the saved generation are read again and applied), or rebuilds it from every
  code in the store when there is no usable saved copy (missing, corrupt, of another model
  version or bit length) or the log no longer reaches back to it (the retention:
  :data:`~stac_rscbir.store.base.CHANGES_KEPT` generations). One open per model at a time,
  outside the service lock, so searches of other indexes and writes never wait for it;
* **follow**: both stores log every write (triggers: writes of this process, of another
  replica, of stac-fastapi-pgstac's Transactions, of ``pypgstac load``), and a loaded index
  found behind the store reads the log and applies what changed, in chunks of
  :data:`FOLLOW_CHUNK` items, whatever their number; a deleted collection drops its keys. It
  happens on a search that finds the store ahead, in the transaction hook
  (:meth:`LiveIndexes.on_item`, so a write acknowledged by this process is seen by its next
  search), and on the follower thread every ``follow_interval`` seconds (started by
  :meth:`LiveIndexes.open`, the app's startup; it first opens every index saved under
  ``index_dir``), so an idle replica is caught up before a search comes. An index is rebuilt,
  never followed, only when the log no longer reaches back to it, when the collections'
  declaration of the model changes the version or bit length it serves, or when applying the
  log failed;
* **save**: a followed index schedules a coalesced background save (one per model at most every
  ``save_delay`` seconds); :meth:`flush` saves what is pending, :meth:`close` stops the
  threads and flushes (the app's shutdown). A lost save costs a longer catch-up at the next
  start (a saved copy names its generation).

:meth:`LiveIndexes.stats` counts, per model, the full rebuilds from the store, the loads of saved
copies and the changes followed since the process started (``GET /_mgmt/indexes``).

Which version and bit length a model's index serves is the model's declaration
(:func:`~stac_rscbir.store.models.served_model`); codes of another version or length are left out.
"""

import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from stac_rscbir.extension.cbir import code_of
from stac_rscbir.index.hashindex import HashIndex, IndexLoadError, open_or_rebuild
from stac_rscbir.store.base import COLLECTION_DELETED, COLLECTION_WRITTEN, ItemStore
from stac_rscbir.store.models import served_model

log = logging.getLogger(__name__)

FOLLOW_CHUNK = 2000  # items read from the store and applied at a time when following the log


class LiveIndexes:
    """The hash indexes of ``store``'s models, saved under ``index_dir``."""

    def __init__(
        self,
        store: ItemStore,
        index_dir: Path,
        *,
        save_delay: float = 1.0,
        follow_interval: float = 0.5,
    ) -> None:
        self.store = store
        self.index_dir = Path(index_dir)
        self._indexes: dict[str, HashIndex] = {}
        self._lock = threading.RLock()  # guards _indexes, _disk_stale, _saved, _counts, locks
        self._build_locks: dict[str, threading.Lock] = {}  # one open per model at a time
        self._follow_locks: dict[str, threading.Lock] = {}  # one follow of the log per model
        self._save_locks: dict[str, threading.Lock] = {}
        self._disk_stale: set[str] = set()  # models whose saved index must not be loaded
        self._saved: dict[str, tuple[HashIndex, int]] = {}  # what was saved last, at which gen
        self._counts: dict[str, dict[str, int]] = {}  # model -> rebuilds, loads, followed
        # saves after writes are coalesced: one background save per model at most every
        # save_delay seconds, not one full save per write (a lost save only lengthens the
        # catch-up at the next start: the saved copy names its generation)
        self.save_delay = save_delay
        self._pending_saves: set[str] = set()
        self._saver: threading.Thread | None = None
        self._saver_wake = threading.Condition(self._lock)
        # the follower thread keeps loaded indexes caught up when no search or write comes
        self.follow_interval = follow_interval
        self._follower: threading.Thread | None = None
        self._follower_stop = threading.Event()
        self._closed = False

    def index_path(self, model: str) -> Path:
        """The folder the model's index is saved in (under ``index_dir``)."""
        return self.index_dir / hashlib.sha1(model.encode()).hexdigest()[:16]

    def _model_lock(self, locks: dict[str, threading.Lock], model: str) -> threading.Lock:
        with self._lock:
            return locks.setdefault(model, threading.Lock())

    def _count(self, model: str, what: str, n: int = 1) -> None:
        with self._lock:
            counts = self._counts.setdefault(
                model, {"rebuilds": 0, "loads": 0, "followed_changes": 0}
            )
            counts[what] += n

    def stats(self) -> dict[str, dict[str, int]]:
        """Per loaded model: the generation and number of codes of its index, and since the
        process started: ``rebuilds`` (full builds from the store's codes), ``loads`` (saved
        copies loaded and caught up) and ``followed_changes`` (keys applied from the change
        log: items written, and items of deleted collections taken out)."""
        with self._lock:
            loaded = dict(self._indexes)
            counts = {m: dict(c) for m, c in self._counts.items()}
        return {
            model: {
                "generation": idx.generation,
                "count": idx.count,
                **counts.get(model, {"rebuilds": 0, "loads": 0, "followed_changes": 0}),
            }
            for model, idx in sorted(loaded.items())
        }

    def index(self, model: str) -> HashIndex:
        """The model's index, caught up with the store.

        Lock-free when the loaded index is current; otherwise it follows the store's change
        log, and a model not loaded yet (or whose index cannot follow) is opened: loaded and
        caught up, or rebuilt. An open runs outside the service lock (one per model at a time,
        other threads wanting the same model wait for it), so searches of current indexes and
        transactions never wait for it.
        """
        idx = self._indexes.get(model)
        if idx is not None:
            if idx.generation >= self.store.generation():
                return idx
            followed = self._follow_safely(model)
            if followed is not None:
                return followed
        with self._model_lock(self._build_locks, model):
            idx = self._indexes.get(model)
            if idx is not None:  # another thread opened it meanwhile
                return idx
            fresh = self._open(model)
            with self._lock:
                idx = self._indexes.setdefault(model, fresh)
            if idx is fresh:
                self._schedule_save(model)  # a no-op when the saved copy is this state
            return idx

    def _served(self, model: str) -> tuple[str | None, int | None]:
        """(version, bits) the model's index serves: its declaration in the collections
        (:func:`~stac_rscbir.store.models.served_model`), or (None, None) when none declares
        it: every version, the most common bit length."""
        spec = served_model(self.store, model)
        return (None, None) if spec is None else (spec.version, spec.bits)

    def _open(self, model: str) -> HashIndex:
        """Load the saved index and catch it up from the log, else build it from the store
        (no service lock); counted in :meth:`stats`."""
        with self._lock:
            stale_on_disk = model in self._disk_stale
        version, bits = self._served(model)
        if stale_on_disk:  # dropped: its saved copy (if it could not be invalidated) is not used
            generation = self.store.generation()  # before the codes, as in open_or_rebuild
            index = HashIndex(model, bits, version=version)
            index.build(self.store.iter_codes(model, version), generation=generation)
            self._count(model, "rebuilds")
            return index
        loaded: list[tuple[HashIndex, int]] = []  # the saved copy caught up, at its generation

        def catch_up(saved: HashIndex) -> bool:
            generation = saved.generation
            if self._apply_log(saved) is None:
                return False
            loaded.append((saved, generation))
            return True

        index = open_or_rebuild(
            self.index_path(model), self.store, model, version, bits, catch_up=catch_up
        )
        if loaded and loaded[0][0] is index:
            self._count(model, "loads")
            with self._lock:
                self._saved[model] = loaded[0]
        else:
            self._count(model, "rebuilds")
            with self._lock:
                self._saved[model] = (index, index.generation)
        return index

    def _drop(self, model: str) -> None:
        """Forget the model's index (opened again at its next use, by a rebuild) and its saved
        copy. Under ``self._lock``."""
        self._indexes.pop(model, None)
        self._saved.pop(model, None)
        self._disk_stale.add(model)
        try:
            HashIndex.discard_saved(self.index_path(model))
        except OSError as err:  # read-only: _disk_stale keeps it from being loaded here
            log.warning("could not invalidate the saved hash index of %s: %s", model, err)

    def _save(self, model: str) -> None:
        """Save the model's loaded index unless a save of this state is done; a failure is
        logged (the index keeps serving from memory; the saved copy stays at an older
        generation, which the next start catches up from the log, or rebuilds)."""
        with self._model_lock(self._save_locks, model):
            idx = self._indexes.get(model)
            if idx is None:
                return
            generation = idx.generation
            last = self._saved.get(model)
            if last is not None and last[0] is idx and last[1] >= generation:
                return
            path = self.index_path(model)
            try:
                idx.save(path)
            except Exception as err:
                log.warning(
                    "could not save the hash index of model %s to %s (%s: %s): serving it from "
                    "memory; the store is unaffected and the next start catches the saved "
                    "copy up from the store (or rebuilds it)",
                    model,
                    path,
                    type(err).__name__,
                    err,
                )
                with self._lock:
                    self._saved.pop(model, None)
                return
            with self._lock:
                if self._indexes.get(model) is idx:
                    self._saved[model] = (idx, generation)
                    self._disk_stale.discard(model)
                elif model in self._disk_stale:  # dropped while we wrote: invalidate again
                    HashIndex.discard_saved(path)

    def _schedule_save(self, model: str) -> None:
        """Save the model's index soon, on the saver thread (coalescing later writes)."""
        with self._lock:
            if self._closed:
                return
            self._pending_saves.add(model)
            if self._saver is None:
                self._saver = threading.Thread(
                    target=self._save_loop, name="hash-index-saver", daemon=True
                )
                self._saver.start()
            self._saver_wake.notify_all()

    def _save_loop(self) -> None:
        """Wait for saves, let writes arriving within ``save_delay`` join them, save."""
        while True:
            with self._lock:
                while not self._pending_saves and not self._closed:
                    self._saver_wake.wait()
                if self._closed:
                    return
                deadline = time.monotonic() + self.save_delay
                while not self._closed and (left := deadline - time.monotonic()) > 0:
                    self._saver_wake.wait(left)
                if self._closed:
                    return  # close() saves what is pending
                models, self._pending_saves = self._pending_saves, set()
            for model in models:
                self._save(model)

    def flush(self) -> None:
        """Save now every index whose save is pending."""
        with self._lock:
            models, self._pending_saves = self._pending_saves, set()
        for model in models:
            self._save(model)

    def open(self) -> None:
        """Accept background saves (again, after :meth:`close`) and start the follower thread
        (unless ``follow_interval`` is 0): the app's startup calls this."""
        with self._lock:
            self._closed = False
            if self.follow_interval > 0 and self._follower is None:
                self._follower_stop.clear()
                self._follower = threading.Thread(
                    target=self._follow_loop, name="hash-index-follower", daemon=True
                )
                self._follower.start()

    def close(self) -> None:
        """Stop the follower and saver threads and save what is pending (the app's shutdown
        calls this)."""
        with self._lock:
            self._closed = True
            self._saver_wake.notify_all()
            saver, self._saver = self._saver, None
            follower, self._follower = self._follower, None
            self._follower_stop.set()
        for thread in (follower, saver):
            if thread is not None:
                thread.join()
        self.flush()

    def on_item(self, collection: str, item: dict[str, Any] | None, item_id: str) -> None:
        """Transaction hook, after a write of this process committed: every loaded index
        follows the change log (:meth:`follow`), so the write's acknowledgement comes after the
        indexes hold it. The arguments (the written key) are not needed: the log says what
        changed, this write and any other. Never raises (the write is committed)."""
        self.follow()

    def follow(self) -> None:
        """Bring every loaded index up to the store (the hook, the follower thread): by the
        change log, or by a rebuild when it cannot follow. Never raises: a failure is logged
        and the next search tries again."""
        for model in list(self._indexes):
            try:
                self.index(model)
            except Exception:
                log.exception("hash index of %s: could not catch up with the store", model)

    def saved_models(self) -> list[str]:
        """The models whose index has a saved copy under ``index_dir`` (read from its meta)."""
        found = []
        for folder in sorted(self.index_dir.glob("*")):
            try:
                model = HashIndex.read_meta(folder)["model"]
            except (IndexLoadError, KeyError, TypeError):
                continue
            if isinstance(model, str) and folder == self.index_path(model):
                found.append(model)
        return found

    def _follow_loop(self) -> None:
        """The follower thread: first opens the saved indexes (loaded and caught up before a
        search needs them), then :meth:`follow` every ``follow_interval`` seconds until close."""
        for model in self.saved_models():
            if self._follower_stop.is_set():
                return
            try:
                self.index(model)
            except Exception:
                log.exception("hash index of %s: could not open it", model)
        while not self._follower_stop.wait(self.follow_interval):
            self.follow()

    def _follow_safely(self, model: str) -> HashIndex | None:
        """Bring the model's loaded index up to the store by the change log (:meth:`_apply_log`),
        one follow per model at a time. None when it is not loaded, or cannot follow (a
        failure is logged): then it is dropped, to be rebuilt at its next use."""
        with self._model_lock(self._follow_locks, model):
            idx = self._indexes.get(model)
            if idx is None:
                return None
            before = idx.generation
            try:
                applied = self._apply_log(idx)
            except Exception:
                log.exception("hash index of %s: could not follow the store's change log", model)
                applied = None
            if applied is None:
                log.info("hash index of %s cannot follow the change log: rebuilding it", model)
                with self._lock:
                    if self._indexes.get(model) is idx:
                        self._drop(model)
                return None
        if idx.generation > before:
            self._schedule_save(model)
        return idx

    def _apply_log(self, idx: HashIndex) -> int | None:
        """Apply to ``idx`` what the store's change log says was written since its generation:
        the items written are read again (:data:`FOLLOW_CHUNK` at a time) and their codes put
        in or taken out, a deleted collection's keys taken out; the index is then at the
        log's generation. Returns the number of keys applied (added to ``followed_changes``),
        None when it cannot follow: the log does not reach back to the index's generation, or
        the model's declaration no longer names the version and bits the index serves."""
        found = self.store.changes_since(idx.generation)
        if found is None:
            return None
        generation, keys = found
        if generation <= idx.generation:
            return 0
        if any(i == COLLECTION_WRITTEN for _, i in keys) and not self._still_served(idx.model, idx):
            return None
        deleted = {c for c, i in keys if i == COLLECTION_DELETED}
        applied = idx.drop_collections(deleted) if deleted else 0
        items = [k for k in keys if k[1] not in (COLLECTION_WRITTEN, COLLECTION_DELETED)]
        for start in range(0, len(items), FOLLOW_CHUNK):
            chunk = items[start : start + FOLLOW_CHUNK]
            stored = {(i["collection"], i["id"]): i for i in self.store.get_items(chunk)}
            idx.apply(
                {key: self._entry(idx, key, stored.get(key)) for key in chunk},
                generation=idx.generation,  # the log's generation once every chunk is in
            )
        idx.advance(generation)
        applied += len(items)
        self._count(idx.model, "followed_changes", applied)
        return applied

    def _still_served(self, model: str, idx: HashIndex) -> bool:
        """Whether the model's declaration still names the version and bits ``idx`` serves."""
        version, bits = self._served(model)
        return version == idx.version and bits in (None, idx.bits)

    @staticmethod
    def _entry(
        idx: HashIndex, key: tuple[str, str], item: dict[str, Any] | None
    ) -> tuple[bytes, np.ndarray | None] | None:
        """What ``idx`` holds of the item: its code of the index's model (by the extension's
        rule, :func:`~stac_rscbir.extension.cbir.code_of`) and descriptor; None when the item
        is gone or has no code of the index's version and bit length."""
        code = code_of(item, idx.model, idx.version) if item else None
        if code is not None and idx.bits not in (None, code.bits):
            log.warning(
                "hash index of %s: %s/%s has a %d-bit code, the index serves %d bits: left out",
                idx.model,
                *key,
                code.bits,
                idx.bits,
            )
            code = None
        if code is None:
            return None
        return code.packed().tobytes(), code.descriptor.array() if code.descriptor else None

    def models_with_codes(self) -> set[str]:
        """The models whose loaded index holds codes (its bit length is known)."""
        return {m for m, idx in list(self._indexes.items()) if idx.bits is not None}
