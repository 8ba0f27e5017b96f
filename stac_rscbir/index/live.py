"""The live hash indexes of a store: one per model, opened or rebuilt from the store, kept in step
with every write, saved in the background.

The lifecycle, in explicit phases:

* **open**: :meth:`LiveIndexes.index` loads the saved index when it names the store's present
  generation, else rebuilds it from the store (one rebuild per model at a time, outside the
  lock, so searches of current indexes and writes never wait for it);
* **catch up**: with a store that logs what each generation wrote (pgstac:
  ``rscbir.changes``), the index follows the log, whoever wrote (this process, another replica,
  stac-fastapi-pgstac's Transactions, ``pypgstac load``): the items written since its generation
  are read again and applied; it is rebuilt only when the log does not reach back far enough,
  a collection was deleted, the model's declaration changed, or more than a twentieth of the items
  changed. Without a log (SQLite), :meth:`LiveIndexes.on_item` (the transaction hook) applies
  each committed write of this process, and a search that finds the store ahead (another
  process wrote) waits a moment for a hook under way, then rebuilds;
* **save**: writes schedule a coalesced background save (one per model at most every
  ``save_delay`` seconds); :meth:`flush` saves what is pending, :meth:`close` stops the saver
  and flushes (the app's shutdown). A lost save costs a rebuild at the next start: a saved copy
  names its generation.

Which version and bit length a model's index serves is the model's declaration
(:func:`~stac_rscbir.store.models.served_model`); codes of another version or length are left out.
"""

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from stac_rscbir.extension.cbir import code_of
from stac_rscbir.index.hashindex import HashIndex, open_or_rebuild
from stac_rscbir.store.base import ItemStore
from stac_rscbir.store.models import served_model

log = logging.getLogger(__name__)


class LiveIndexes:
    """The hash indexes of ``store``'s models, saved under ``index_dir``."""

    def __init__(self, store: ItemStore, index_dir: Path, *, save_delay: float = 1.0) -> None:
        self.store = store
        self.index_dir = Path(index_dir)
        self._indexes: dict[str, HashIndex] = {}
        self._lock = threading.RLock()  # guards _indexes, _disk_stale, _saved and the locks
        self._build_locks: dict[str, threading.Lock] = {}  # one (re)build per model at a time
        self._follow_locks: dict[str, threading.Lock] = {}  # one follow of the log per model
        # a store with a change log (pgstac) says what each generation wrote: indexes follow
        # it (writes of other processes included) instead of being rebuilt
        self._logged = callable(getattr(store, "changes_since", None))
        self._save_locks: dict[str, threading.Lock] = {}
        self._disk_stale: set[str] = set()  # models whose saved index must not be loaded
        self._saved: dict[str, tuple[HashIndex, int]] = {}  # what was saved last, at which gen
        # a search that finds the store ahead of the index first waits this long for the
        # transaction hook (which follows the commit by a moment) before rebuilding
        self.catch_up_wait = 0.25
        self._caught_up = threading.Condition(self._lock)
        # saves after writes are coalesced: one background save per model at most every
        # save_delay seconds, not one full save per write (a lost save only costs a rebuild
        # from the store at the next start: the saved copy names its generation)
        self.save_delay = save_delay
        self._pending_saves: set[str] = set()
        # in-process writes run one at a time with their hooks (writing()); a search that finds
        # the store one generation ahead while one is under way serves the current index: that
        # write is not acknowledged yet, and its hook brings the index along
        self._write_lock = threading.Lock()
        self._writing = 0
        self._saver: threading.Thread | None = None
        self._saver_wake = threading.Condition(self._lock)
        self._closed = False

    def index_path(self, model: str) -> Path:
        """The folder the model's index is saved in (under ``index_dir``)."""
        return self.index_dir / hashlib.sha1(model.encode()).hexdigest()[:16]

    def _model_lock(self, locks: dict[str, threading.Lock], model: str) -> threading.Lock:
        with self._lock:
            return locks.setdefault(model, threading.Lock())

    def index(self, model: str) -> HashIndex:
        """The model's index, rebuilt from the store when missing or stale.

        Lock-free when the loaded index is current; a rebuild runs outside the service lock
        (one per model at a time, other threads wanting the same model wait for it), so
        searches of current indexes and transactions never wait for a rebuild.
        """
        idx = self._indexes.get(model)
        wanted = self.store.generation()
        if idx is not None and idx.generation >= wanted:
            return idx
        if idx is not None and self._writing and wanted - idx.generation <= 1:
            return idx  # the write under way is not acknowledged: its hook catches up
        if idx is not None and self._logged:  # another process wrote: read what it wrote
            followed = self._follow_safely(model)
            if followed is not None:
                self._schedule_save(model)
                return followed
        elif idx is not None:  # most likely a write of this process whose hook is under way
            deadline = time.monotonic() + self.catch_up_wait
            with self._caught_up:
                while (idx := self._indexes.get(model)) is not None:
                    if idx.generation >= wanted:
                        return idx
                    if self._writing and wanted - idx.generation <= 1:
                        return idx  # as above: a write began (and committed) since the check
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._caught_up.wait(left)
        with self._model_lock(self._build_locks, model):
            idx = self._indexes.get(model)
            if idx is not None and idx.generation >= wanted:
                return idx  # another thread rebuilt it, or a transaction caught it up
            fresh = self._open(model)
            with self._lock:
                idx = self._indexes.get(model)
                if idx is None or idx.generation < fresh.generation:
                    self._indexes[model] = idx = fresh
                stale_on_disk = model in self._disk_stale
            if stale_on_disk:
                self._save(model)
            return idx

    def _served(self, model: str) -> tuple[str | None, int | None]:
        """(version, bits) the model's index serves: its declaration in the collections
        (:func:`~stac_rscbir.store.models.served_model`), or (None, None) when none declares
        it: every version, the most common bit length."""
        spec = served_model(self.store, model)
        return (None, None) if spec is None else (spec.version, spec.bits)

    def _open(self, model: str) -> HashIndex:
        """Load the saved index if current, else build it from the store (no service lock)."""
        with self._lock:
            stale_on_disk = model in self._disk_stale
        version, bits = self._served(model)
        if not stale_on_disk:
            return open_or_rebuild(self.index_path(model), self.store, model, version, bits)
        generation = self.store.generation()  # before the codes, as in open_or_rebuild
        index = HashIndex(model, bits, version=version)
        return index.build(self.store.iter_codes(model, version), generation=generation)

    def _drop(self, model: str) -> None:
        """Forget the model's index (rebuilt at its next use) and its saved copy, which may
        name the present generation without holding every write. Under ``self._lock``."""
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
        generation, so the next start rebuilds it from the store)."""
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
                    "memory; the store is unaffected and the index will be rebuilt from it at "
                    "the next start",
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
        """Accept background saves again after :meth:`close` (the app's startup calls this)."""
        with self._lock:
            self._closed = False

    def close(self) -> None:
        """Stop the saver thread and save what is pending (the app's shutdown calls this)."""
        with self._lock:
            self._closed = True
            self._saver_wake.notify_all()
            saver, self._saver = self._saver, None
        if saver is not None:
            saver.join()
        self.flush()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Scope of one write of this process and its hooks: writes run one at a time, so each
        hook sees the store generation of its own write and the index follows it exactly."""
        with self._write_lock:
            with self._lock:
                self._writing += 1
            try:
                yield
            finally:
                with self._lock:
                    self._writing -= 1

    def on_item(self, collection: str, item: dict[str, Any] | None, item_id: str) -> None:
        """Transaction hook: keep every loaded index in step with a committed write.

        ``item_id`` "*" means the collection was deleted, "" that only the collection itself
        was written. Several items of one transaction each get a call at the same generation.
        With a store that logs its changes, each index follows the log (:meth:`_follow`);
        otherwise the hook applies ``item`` itself. Never raises: the write is committed, the
        store is the source of truth. An index that cannot follow (another writer came
        between, a collection went, an update failed) is dropped and rebuilt at its next use;
        a failed save is logged and the index keeps serving from memory.
        """
        if self._logged:
            loaded = list(self._indexes)
            changed = [m for m in loaded if self._follow_safely(m) is not None]
            with self._lock:
                for model in set(loaded) - set(changed):
                    self._drop(model)
                self._caught_up.notify_all()
            for model in changed:
                self._schedule_save(model)
            return
        changed = []
        try:
            with self._lock:
                generation = self.store.generation()
                for model, idx in list(self._indexes.items()):
                    if item_id != "*" and idx.built_generation >= generation:
                        continue  # built after this write committed: it holds it already
                    if item_id == "*" or idx.generation not in (generation - 1, generation):
                        self._drop(model)  # a collection went, or another writer: rebuild
                        continue
                    if not item_id:  # the collection was written: no codes changed, but
                        # its cbir:models may change the version or bit length the index serves
                        if not self._still_served(model, idx):
                            self._drop(model)
                            continue
                        idx.advance(generation)
                        changed.append(model)
                        continue
                    try:
                        key = (collection, item_id)
                        idx.apply({key: self._entry(idx, key, item)}, generation=generation)
                    except Exception:
                        log.exception(
                            "hash index of %s: could not apply %s/%s; rebuilding it from the store",
                            model,
                            collection,
                            item_id,
                        )
                        self._drop(model)
                        continue
                    changed.append(model)
                self._caught_up.notify_all()
        except Exception:  # the store's generation() failed: rebuild everything later
            log.exception("hash indexes: could not follow the write of %s/%s", collection, item_id)
            with self._lock:
                for model in list(self._indexes):
                    self._drop(model)
            return
        for model in changed:
            self._schedule_save(model)

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

    def _follow_safely(self, model: str) -> HashIndex | None:
        """:meth:`_follow`, a failure logged (None: rebuild)."""
        try:
            return self._follow(model)
        except Exception:
            log.exception("hash index of %s: could not follow the store's change log", model)
            return None

    def _follow(self, model: str) -> HashIndex | None:
        """Bring the model's loaded index up to the store by the store's change log: the items
        written since the index's generation are read again and applied. None when it cannot:
        the log does not reach back that far, a collection was deleted, the model's
        declaration changed, or so many items changed that a rebuild is cheaper."""
        with self._model_lock(self._follow_locks, model):
            idx = self._indexes.get(model)
            if idx is None:
                return None
            found = self.store.changes_since(idx.generation)  # type: ignore[attr-defined]
            if found is None:
                return None
            generation, keys = found
            if generation <= idx.generation:
                return idx
            items = [k for k in keys if k[1] not in ("", "*")]
            # at 10^5 codes following 1000 changed items took 0.35 s, a rebuild 1.8 s
            # (benchmarks/RESULTS.md, the plugin at 10^5 items): past a twentieth, rebuild
            if any(k[1] == "*" for k in keys) or len(items) > max(1000, idx.count // 20):
                return None
            if any(k[1] == "" for k in keys) and not self._still_served(model, idx):
                return None
            stored = {(i["collection"], i["id"]): i for i in self.store.get_items(items)}
            idx.apply(
                {key: self._entry(idx, key, stored.get(key)) for key in items},
                generation=generation,
            )
            return idx

    def models_with_codes(self) -> set[str]:
        """The models whose loaded index holds codes (its bit length is known)."""
        return {m for m, idx in list(self._indexes.items()) if idx.bits is not None}
