"""The similarity search extension: query by item, code, descriptor or image, ranked by Hamming.

Filters (bbox, intersects, datetime, collections, ids, CQL2) make the candidate set in the
store; the model's hash index ranks the candidates by Hamming distance (ties by collection and
id), optionally re-ranked by float descriptor; pages slice that ranked list, the list of the
first page even when the store changes between pages (paging tokens name the first page's
store generation). Each returned item carries ``cbir:distance`` (and ``cbir:score`` when the
order follows the descriptors); the response says whether the ranking was exact and which
order applies. POST, GET /search and /similar take the same fields. The index is derived
data: opened or rebuilt from the store, kept in step with every transaction, rebuilt when the
store moved on behind its back (another process wrote to it).
"""

import base64
import hashlib
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import attr
import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from stac_fastapi.api.models import ItemUri
from stac_fastapi.api.routes import create_async_endpoint
from stac_fastapi.types.extension import ApiExtension
from stac_fastapi.types.search import APIRequest, Limit

from stac_rscbir.api.core import store_errors
from stac_rscbir.extension.cbir import DEFAULT_K, HashCode, code_of
from stac_rscbir.extension.codec import CBIRFieldError, decode_code, decode_descriptor
from stac_rscbir.index.feedback import ALPHA, BETA, GAMMA, rocchio
from stac_rscbir.index.hashindex import HashIndex, open_or_rebuild
from stac_rscbir.store.base import InvalidQueryError, ItemStore, SearchPage, SearchQuery
from stac_rscbir.store.models import served_model

log = logging.getLogger(__name__)

CONFORMANCE = "https://stac-extensions.github.io/cbir/v1.0.0/similarity-search"
MAX_K = 10_000  # default cap on ``similarity.k`` (create_api(max_k=...))
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # default cap on an uploaded image, decoded
MAX_IMAGE_PIXELS = 50_000_000  # default cap on width * height * bands of an uploaded image
IMAGE_DRIVERS = ["PNG", "GTiff"]  # the formats an uploaded image may have (no VRT & co.)
MAX_FEEDBACK = 1000  # most items in each of feedback.relevant / feedback.not_relevant
FEEDBACK_POOL = 100  # feedback re-ranks the top max(4 k, FEEDBACK_POOL) Hamming candidates
_HEX = re.compile(r"[0-9a-fA-F]+")
PAGING_CACHE_HITS = 200_000  # default cap on the hits of the ranked lists kept for paging


class ItemRef(BaseModel):
    """An item of the store, as a query example."""

    model_config = ConfigDict(extra="forbid")
    collection: str
    id: str


class FeedbackQuery(BaseModel):
    """Relevance feedback: items the user judged, and the Rocchio weights.

    The query descriptor ``q`` (of the query item, the given descriptor or the image) becomes
    ``q' = alpha q + beta mean(relevant) - gamma mean(not_relevant)``; the candidates are the
    Hamming neighbours of the binarised ``q'``, re-ranked by Euclidean distance to ``q'``.
    """

    model_config = ConfigDict(extra="forbid")
    relevant: list[ItemRef] = Field(
        default_factory=list, max_length=MAX_FEEDBACK, description="Items judged relevant."
    )
    not_relevant: list[ItemRef] = Field(
        default_factory=list, max_length=MAX_FEEDBACK, description="Items judged not relevant."
    )
    alpha: float = Field(ALPHA, description="Weight of the query descriptor.")
    beta: float = Field(BETA, description="Weight of the mean relevant descriptor.")
    gamma: float = Field(GAMMA, description="Weight of the mean not relevant descriptor.")


class SimilarityQuery(BaseModel):
    """The ``similarity`` object of POST /search: one query kind, the model, the list length."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 400, not silently ignored
    model: str | None = Field(None, description="Model id (default: the only indexed model).")
    item: ItemRef | None = Field(None, description="Query by an item of the store.")
    code: str | None = Field(None, description="Query by a hash code (packed bits).")
    encoding: Literal["base64", "hex"] = Field("base64", description="Encoding of `code`.")
    bit_order: Literal["big", "little"] = Field("big", description="Bit order of `code`.")
    descriptor: str | None = Field(
        None, description="Query by a float32 little-endian descriptor, base64."
    )
    image: str | None = Field(
        None,
        description="Query by an image (base64 PNG or GeoTIFF), encoded with `model`. It must "
        "fit the model's `input` (checkpoint config and `cbir:models` entry): a band count the "
        "model (or one of its branches) takes, at least `min_size` pixels a side, values in the "
        "model's units (an integer type that holds `value_range`, values within one range "
        "width of it, no NaN); else 400 naming the mismatch, e.g. an 8-bit PNG for a model of "
        "uint16 reflectance. Truncated or corrupt files are a 400. Conversions: GeoTIFF "
        "scale/offset tags are applied; the image is resized (bilinear) to the model's input "
        "size. An 8-bit rendering is not stretched back to reflectance: send the chip's values.",
    )
    k: StrictInt = Field(  # strict: `true` or `2.0` is a 400 naming the field, not k=1 or 2
        DEFAULT_K,
        ge=1,
        description=f"Length of the ranked list to page through (at most the server's max_k, "
        f"{MAX_K} by default).",
    )
    max_distance: StrictInt | None = Field(None, ge=0, description="Hamming radius.")
    rerank: bool = Field(False, description="Re-rank the Hamming candidates by descriptor.")
    feedback: FeedbackQuery | None = Field(
        None,
        description="Relevance feedback (Rocchio): refine the query with items judged relevant "
        "and not relevant; needs a query with a descriptor.",
    )

    @model_validator(mode="after")
    def _one_query(self) -> "SimilarityQuery":
        given = [n for n in ("item", "code", "descriptor", "image") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(
                "similarity needs exactly one of item, code, descriptor, image; "
                f"got {given or 'none'}"
            )
        return self


class SimilarityPostRequest(BaseModel):
    """Merged into the POST /search body model."""

    similarity: SimilarityQuery | None = Field(None, description="Query by example.")


# GET feedback parameters, shared by /search and /similar
RelevantParam = Annotated[
    str | None,
    Query(description="Feedback: items judged relevant, comma list of `<collection>/<id>`."),
]
NotRelevantParam = Annotated[
    str | None,
    Query(description="Feedback: items judged not relevant, comma list of `<collection>/<id>`."),
]
AlphaParam = Annotated[float | None, Query(description=f"Feedback: query weight ({ALPHA}).")]
BetaParam = Annotated[float | None, Query(description=f"Feedback: relevant weight ({BETA}).")]
GammaParam = Annotated[float | None, Query(description=f"Feedback: not relevant weight ({GAMMA}).")]
KParam = Annotated[int | None, Query(ge=1, description=f"List length (default {DEFAULT_K}).")]
MaxDistanceParam = Annotated[int | None, Query(ge=0, description="Hamming radius.")]

# fields of the similarity object that GET takes as flat parameters (`similarity_<field>` on
# /search, `<field>` on /similar); the image query is POST only (too large for a URL)
_FLAT_FIELDS = (
    "model",
    "code",
    "encoding",
    "bit_order",
    "descriptor",
    "k",
    "max_distance",
    "rerank",
)
_FLAT_WEIGHTS = ("alpha", "beta", "gamma")  # of similarity.feedback


@attr.s
class SimilarityGetRequest(APIRequest):
    """Merged into GET /search: the similarity object as flat query parameters (all of its
    fields but ``image``, which is too large for a URL: POST it)."""

    similarity_item: Annotated[
        str | None, Query(description="Query item as `<collection>/<item id>`.")
    ] = attr.ib(default=None)
    similarity_code: Annotated[
        str | None, Query(description="Query code (packed bits, see similarity_encoding).")
    ] = attr.ib(default=None)
    similarity_encoding: Annotated[
        Literal["base64", "hex"] | None, Query(description="Encoding of the code (base64).")
    ] = attr.ib(default=None)
    similarity_bit_order: Annotated[
        Literal["big", "little"] | None, Query(description="Bit order of the code (big).")
    ] = attr.ib(default=None)
    similarity_descriptor: Annotated[
        str | None, Query(description="Query descriptor: float32 little-endian, base64.")
    ] = attr.ib(default=None)
    similarity_model: Annotated[str | None, Query(description="Model id.")] = attr.ib(default=None)
    similarity_k: KParam = attr.ib(default=None)
    similarity_max_distance: MaxDistanceParam = attr.ib(default=None)
    similarity_rerank: Annotated[bool | None, Query(description="Re-rank by descriptor.")] = (
        attr.ib(default=None)
    )
    similarity_relevant: RelevantParam = attr.ib(default=None)
    similarity_not_relevant: NotRelevantParam = attr.ib(default=None)
    similarity_alpha: AlphaParam = attr.ib(default=None)
    similarity_beta: BetaParam = attr.ib(default=None)
    similarity_gamma: GammaParam = attr.ib(default=None)


@attr.s
class SimilarItemsRequest(ItemUri):
    """GET /collections/{collection_id}/items/{item_id}/similar."""

    model: Annotated[str | None, Query(description="Model id.")] = attr.ib(default=None)
    k: KParam = attr.ib(default=None)
    max_distance: MaxDistanceParam = attr.ib(default=None)
    collections: Annotated[
        str | None,
        Query(
            description="Only items of these collections (comma list): with a cross-modal "
            "model, e.g. the Sentinel-1 items like this Sentinel-2 item."
        ),
    ] = attr.ib(default=None)
    rerank: Annotated[bool, Query(description="Re-rank by descriptor.")] = attr.ib(default=False)
    relevant: RelevantParam = attr.ib(default=None)
    not_relevant: NotRelevantParam = attr.ib(default=None)
    alpha: AlphaParam = attr.ib(default=None)
    beta: BetaParam = attr.ib(default=None)
    gamma: GammaParam = attr.ib(default=None)
    limit: Annotated[
        Limit | None, Query(description="Items per page (10); pages follow `next` links up to k.")
    ] = attr.ib(default=10)
    token: Annotated[str | None, Query(description="Paging token of a `next` link.")] = attr.ib(
        default=None
    )


class SimilarityService:
    """Hash indexes per model over a store, and the ranked searches that use them."""

    def __init__(
        self,
        store: ItemStore,
        index_dir: Path,
        models: dict[str, Path] | None = None,
        encoder_loader: Callable[[Path], Any] | None = None,
        *,
        max_k: int = MAX_K,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        save_delay: float = 1.0,
        paging_cache_hits: int = PAGING_CACHE_HITS,
    ) -> None:
        self.store = store
        self._ranked_lists = RankedLists(paging_cache_hits)
        self.max_k = max_k
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self._coded: tuple[int, set[str]] | None = None  # (generation, models with codes)
        self.index_dir = Path(index_dir)
        self.model_dirs = dict(models or {})
        self._indexes: dict[str, HashIndex] = {}
        self._encoders: dict[str, Any] = {}
        self._encoder_loader = encoder_loader
        self._lock = threading.RLock()  # guards _indexes, _disk_stale, _saved and the locks
        self._build_locks: dict[str, threading.Lock] = {}  # one (re)build per model at a time
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

    # ------------------------------------------------------------------ indexes

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
        if idx is not None:  # most likely a write of this process whose hook is under way
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
        Never raises: the write is committed, the store is the source of truth. An index that
        cannot follow (another writer came between, a collection went, an update failed) is
        dropped and rebuilt at its next use; a failed save is logged and the index keeps
        serving from memory.
        """
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
                        version, bits = self._served(model)
                        if version != idx.version or bits not in (None, idx.bits):
                            self._drop(model)
                            continue
                        idx.advance(generation)
                        changed.append(model)
                        continue
                    try:
                        key = (collection, item_id)
                        code = _code_of(item, model, idx.version) if item else None
                        if code is not None and idx.bits not in (None, code.bits):
                            log.warning(
                                "hash index of %s: %s/%s has a %d-bit code, the index serves %d "
                                "bits: left out",
                                model,
                                collection,
                                item_id,
                                code.bits,
                                idx.bits,
                            )
                            code = None
                        if code is None:
                            idx.remove(key, generation=generation)
                        else:
                            desc = code.descriptor.array() if code.descriptor else None
                            idx.update(key, code.packed().tobytes(), desc, generation=generation)
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

    def _default_model(self) -> str:
        """The model of a query that names none: the one checkpoint served, or else the one
        model the store has codes of (as the field's description promises)."""
        if len(self.model_dirs) == 1:
            return next(iter(self.model_dirs))
        known = self.known_models()
        if not self.model_dirs and len(known) == 1:
            return known[0]
        raise InvalidQueryError(
            "similarity.model is required" + (f": one of {known}" if known else "")
        )

    def _models_with_codes(self) -> set[str]:
        """The models some item of the store has a code of (cached per store generation)."""
        generation = self.store.generation()
        if self._coded is None or self._coded[0] != generation:
            lister = getattr(self.store, "code_models", None)
            models = set(lister()) if lister is not None else set()
            self._coded = (generation, models)
        return self._coded[1]

    def known_models(self) -> list[str]:
        """The models a query may name: those with codes in the store or a checkpoint here."""
        loaded = {m for m, idx in list(self._indexes.items()) if idx.bits is not None}
        return sorted(loaded | set(self.model_dirs) | self._models_with_codes())

    def _check_model(self, model: str) -> None:
        """400 naming the known models unless ``model`` has codes here or a checkpoint."""
        idx = self._indexes.get(model)
        if model in self.model_dirs or (idx is not None and idx.bits is not None):
            return
        if model not in self._models_with_codes():
            known = self.known_models()
            raise InvalidQueryError(
                f"similarity.model: unknown model {model!r}: no item of this server has a code "
                f"of it and it has no checkpoint here (known models: {known or 'none'})"
            )

    def _check_limits(self, sim: SimilarityQuery, bits: int | None) -> None:
        if sim.k > self.max_k:
            raise InvalidQueryError(
                f"similarity.k: {sim.k} is more than this server's maximum, {self.max_k}"
            )
        if sim.max_distance is not None and bits is not None and sim.max_distance > bits:
            raise InvalidQueryError(
                f"similarity.max_distance: {sim.max_distance} is out of range: the codes of "
                f"model {sim.model!r} have {bits} bits (0 to {bits})"
            )

    # ------------------------------------------------------------------ queries

    def from_get(self, params: dict[str, Any]) -> SimilarityQuery | None:
        """The similarity object of GET /search flat parameters (None when absent)."""
        item = params.get("similarity_item")
        ref = None
        if item is not None:
            ref = _ref(item, "similarity_item must be `<collection>/<item id>`")
        return similarity_from_flat(params, "similarity_", ref)

    def _query_code(
        self, sim: SimilarityQuery, model: str
    ) -> tuple[bytes, np.ndarray | None, tuple[str, str] | None]:
        """(packed code, descriptor or None, the query item's key or None)."""
        if sim.item is not None:
            item = self.store.get_item(sim.item.collection, sim.item.id)
            idx = self.index(model)
            code = _code_of(item, model, idx.version)
            version = "" if idx.version is None else f" version {idx.version!r}"
            if code is None or idx.bits not in (None, code.bits):
                raise InvalidQueryError(
                    f"item {sim.item.collection}/{sim.item.id} has no code of model {model!r}"
                    f"{version}" + ("" if idx.bits is None else f" with {idx.bits} bits")
                )
            desc = code.descriptor.array() if code.descriptor else None
            return code.packed().tobytes(), desc, (sim.item.collection, sim.item.id)
        bits = self.index(model).bits
        if bits is None and (sim.code is not None or sim.descriptor is not None):
            raise InvalidQueryError(
                f"similarity.model: model {model!r} has no codes in this store yet, so the "
                f"length of its codes is unknown (known models: {self.known_models()})"
            )
        if sim.code is not None:
            try:
                packed = decode_code(sim.code, bits, sim.encoding, field="similarity.code")
            except CBIRFieldError as exc:
                hint = ""
                if (
                    sim.encoding == "base64"
                    and len(sim.code) * 4 == bits
                    and _HEX.fullmatch(sim.code)
                ):
                    hint = (
                        f"; it looks like a {bits}-bit hex code: give encoding 'hex' "
                        "(GET: similarity_encoding=hex)"
                    )
                raise InvalidQueryError(f"{exc}{hint}") from exc
            if sim.bit_order == "little":
                packed = np.packbits(np.unpackbits(packed, bitorder="little"))
            return packed.tobytes(), None, None
        if sim.descriptor is not None:
            try:
                desc = decode_descriptor(
                    sim.descriptor, "float32", bits, "little", "similarity.descriptor"
                )
            except CBIRFieldError as exc:
                raise InvalidQueryError(str(exc)) from exc
            return self._binarize(model, desc), desc, None
        bits_arr, desc = self._encode_image(model, sim.image or "")
        return np.packbits(bits_arr).tobytes(), desc, None

    def _encoder(self, model: str) -> Any:
        if model not in self.model_dirs:
            raise InvalidQueryError(
                f"model {model!r} has no checkpoint on this server: image queries need one "
                f"(known: {sorted(self.model_dirs)})"
            )
        if model not in self._encoders:
            from stac_rscbir.models.encoder import HashEncoder

            loader = self._encoder_loader or HashEncoder.load
            self._encoders[model] = loader(self.model_dirs[model])
        return self._encoders[model]

    def _binarize(self, model: str, desc: np.ndarray, *, infer: bool = False) -> bytes:
        """A descriptor (the model's relaxed code) to its code, with the model's threshold.

        With ``infer`` and no checkpoint of the model here, the threshold (0 or 0.5) is the
        one that turns the stored descriptors into the stored codes (at least 95 % of the
        bits), see :meth:`HashIndex.descriptor_binarization`.
        """
        import torch

        if infer and model not in self.model_dirs:
            found = self.index(model).descriptor_binarization()
            if found is None or found[1] < 0.95:
                raise InvalidQueryError(
                    f"similarity.feedback: model {model!r} has no checkpoint on this server and "
                    "its stored descriptors are not relaxed codes of its stored codes, so the "
                    "refined query cannot be binarised"
                )
            bits = desc >= 0 if found[0] == 0.0 else desc > found[0]
            return np.packbits(bits.astype(np.uint8)).tobytes()
        head = self._encoder(model).net.head
        bits = head.binarize(torch.from_numpy(np.asarray(desc, np.float32))[None])[0].numpy()
        return np.packbits(bits.astype(np.uint8)).tobytes()

    def _encode_image(self, model: str, data: str) -> tuple[np.ndarray, np.ndarray]:
        """Bits and relaxed code of an uploaded image (PNG or GeoTIFF, base64), checked against
        what the model takes (bands, pixel values, size: see :class:`InputSpec`)."""
        import torch
        import torch.nn.functional as F

        if len(data) > (self.max_image_bytes + 2) // 3 * 4:  # checked before decoding
            raise HTTPException(
                413,
                f"similarity.image is too large: {len(data) * 3 // 4} bytes, this server takes "
                f"at most {self.max_image_bytes}",
            )
        encoder = self._encoder(model)
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError as exc:
            raise InvalidQueryError(f"similarity.image is not valid base64: {exc}") from exc
        image = _read_image(raw, self.max_image_pixels)
        try:  # a cross-modal model encodes the image with the branch of its sensor
            source = encoder.config.source_for_band_count(image.pixels.shape[0])
            encoder.config.input_of(source).check(
                model, image.what, image.dtype, image.pixels.shape[1:], image.values
            )
        except ValueError as exc:
            raise InvalidQueryError(f"similarity.image: {exc}") from exc
        x = torch.from_numpy(image.pixels)[None]
        size = encoder.config.input_size
        if size and x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear")
        bits, relaxed = encoder(x, source)
        return bits[0].numpy().astype(np.uint8), relaxed[0].numpy()

    def search(self, query: SearchQuery, sim: SimilarityQuery) -> SearchPage:
        """One page of the ranked list of ``sim`` over the candidates of ``query``.

        A ``next`` token names the store generation of the first page: later pages slice the
        list that page 1 sliced (kept in a bounded cache), whatever was written since; when
        the list is gone (evicted, another replica) and the store has changed, 410 (rerun the
        search) rather than a page that may repeat or skip items.
        """
        if query.sortby:
            raise InvalidQueryError(
                "sortby cannot be combined with similarity: a similarity search is ordered by "
                "its ranking (cbir:similarity.order); drop sortby, or filter instead"
            )
        if "k" not in sim.model_fields_set and sim.k > self.max_k:  # the default, over the cap
            sim = sim.model_copy(update={"k": self.max_k})
        fingerprint = self._fingerprint(query, sim)
        ranked = None
        if query.token:
            generation, offset = self._position(query.token, fingerprint)
            ranked = self._ranked_lists.get((fingerprint, generation))
            if ranked is None and generation != self.store.generation():
                raise HTTPException(
                    410,
                    "token: the store has changed since the first page of this similarity "
                    "search and its ranked list is no longer held here; run the search again",
                )
        else:
            generation, offset = self.store.generation(), 0  # before ranking: see _position
        if ranked is None:
            ranked = self._rank(query, sim)
        page_hits = ranked.hits[offset : offset + query.limit]
        items = self.store.get_items([key for key, _, _ in page_hits])
        by_key = {(i["collection"], i["id"]): i for i in items}
        out = []
        for key, distance, score in page_hits:
            item = by_key.get(key)
            if item is not None:
                item["properties"]["cbir:distance"] = distance
                if score is not None:
                    item["properties"]["cbir:score"] = score
                out.append(item)
        end = offset + query.limit
        token = None
        if end < len(ranked.hits):
            token = self._token(fingerprint, generation, end)
            self._ranked_lists.put((fingerprint, generation), ranked)
        info = {**ranked.info, "ranked": len(ranked.hits)}
        return SearchPage(out, token, len(ranked.hits), extra={"cbir:similarity": info})

    def _rank(self, query: SearchQuery, sim: SimilarityQuery) -> "Ranked":
        """The ranked list of ``sim`` over the candidates of ``query``, and what made it."""
        model = sim.model or self._default_model()
        self._check_model(model)
        self._check_limits(sim, None)
        idx = self.index(model)
        self._check_limits(sim.model_copy(update={"model": model}), idx.bits)
        code, desc, query_key = self._query_code(sim, model)
        feedback_info = None
        if sim.feedback is not None:
            code, desc, feedback_info = self._refine(model, idx, sim, desc, query_key)
        filtered = (
            any(
                v is not None
                for v in (
                    query.collections,
                    query.ids,
                    query.bbox,
                    query.intersects,
                    query.datetime,
                )
            )
            or query.filter is not None
        )
        candidates = self.store.filter_keys(query) if filtered else None
        pool = sim.k if feedback_info is None else max(4 * sim.k, FEEDBACK_POOL)
        result = idx.search(code, pool, max_distance=sim.max_distance, candidates=candidates)
        hits: list[RankedHitOut] = [(h.key, int(h.distance), None) for h in result]
        order = "hamming"
        if (sim.rerank or feedback_info is not None) and desc is not None:
            order = "descriptor"
            hits = [
                (h.key, int(h.distance), _finite(h.descriptor_distance))
                for h in idx.rerank(desc, [(key, d) for key, d, _ in hits])
            ]
        info: dict[str, Any] = {
            "model": model,
            "exact": bool(result.exact),
            "k": sim.k,
            "order": order,
        }
        if feedback_info is not None:
            info["feedback"] = feedback_info
        return Ranked(hits[: sim.k], info)

    def _refine(
        self,
        model: str,
        idx: HashIndex,
        sim: SimilarityQuery,
        desc: np.ndarray | None,
        query_key: tuple[str, str] | None,
    ) -> tuple[bytes, np.ndarray, dict[str, Any]]:
        """Rocchio: (code of q', q', what was used) from the query descriptor and feedback."""
        fb = sim.feedback
        assert fb is not None
        if desc is None:
            what = (
                f"the query item {query_key[0]}/{query_key[1]} has no descriptor of model {model!r}"
                if query_key is not None
                else "a code query has no descriptor"
            )
            raise InvalidQueryError(
                f"similarity.feedback needs a query descriptor (Rocchio refines it): {what}; "
                "query by an item with a descriptor, a descriptor or an image"
            )
        groups = []
        for name, refs in (("relevant", fb.relevant), ("not_relevant", fb.not_relevant)):
            vectors = []
            for i, ref in enumerate(refs):
                where = f"similarity.feedback.{name}[{i}] {ref.collection}/{ref.id}"
                key = (ref.collection, ref.id)
                vec = idx.descriptor(key) if key in idx else None
                if key not in idx:
                    code = _code_of(
                        self.store.get_item(ref.collection, ref.id), model, idx.version
                    )  # 404
                    if code is None:
                        raise InvalidQueryError(f"{where} has no code of model {model!r}")
                    vec = code.descriptor.array() if code.descriptor else None
                if vec is None:
                    raise InvalidQueryError(f"{where} has no descriptor of model {model!r}")
                if vec.size != desc.size:
                    raise InvalidQueryError(
                        f"{where} has a descriptor of {vec.size} values, the query {desc.size}"
                    )
                vectors.append(vec)
            groups.append(np.asarray(vectors, np.float32).reshape(-1, desc.size))
        refined = rocchio(desc, groups[0], groups[1], fb.alpha, fb.beta, fb.gamma)
        if not np.isfinite(refined).all():
            raise InvalidQueryError("similarity.feedback: the refined query is not finite")
        info = {
            "relevant": len(fb.relevant),
            "not_relevant": len(fb.not_relevant),
            "alpha": fb.alpha,
            "beta": fb.beta,
            "gamma": fb.gamma,
        }
        return self._binarize(model, refined, infer=True), refined, info

    @staticmethod
    def _fingerprint(query: SearchQuery, sim: SimilarityQuery) -> str:
        body = {
            "q": {k: v for k, v in query.__dict__.items() if k not in ("limit", "token")},
            "s": sim.model_dump(mode="json"),
        }
        return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @staticmethod
    def _token(fingerprint: str, generation: int, offset: int) -> str:
        """The paging token: the search, the store generation of its first page, the offset."""
        raw = f"sim:{fingerprint}:{generation}:{offset}"
        return base64.urlsafe_b64encode(raw.encode()).decode()

    @staticmethod
    def _position(token: str, fingerprint: str) -> tuple[int, int]:
        """(generation of the first page, offset) of a paging token of this search; 400 if the
        token is not one, or belongs to another search."""
        try:
            kind, fp, generation, offset = base64.urlsafe_b64decode(token).decode().split(":")
            assert kind == "sim"
            position = int(generation), int(offset)
        except Exception as exc:
            raise InvalidQueryError("token is not a similarity paging token") from exc
        if fp != fingerprint:
            raise InvalidQueryError("token belongs to a different similarity search")
        return position


RankedHitOut = tuple[tuple[str, str], int, float | None]  # key, Hamming distance, score


@dataclass(frozen=True)
class Ranked:
    """A ranked list: (key, Hamming distance, descriptor distance when the order is by
    descriptor) per hit, and the ``cbir:similarity`` facts of how it was made."""

    hits: list[RankedHitOut]
    info: dict[str, Any]


class RankedLists:
    """The ranked lists that paging tokens point into, so that every page of a search slices
    the list of its first page; bounded by their total hits, least recently used go first."""

    def __init__(self, max_hits: int) -> None:
        self.max_hits = max_hits
        self._lists: OrderedDict[tuple[str, int], Ranked] = OrderedDict()
        self._hits = 0
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int]) -> Ranked | None:
        """The list of ``(fingerprint, generation)``, if still held."""
        with self._lock:
            ranked = self._lists.get(key)
            if ranked is not None:
                self._lists.move_to_end(key)
            return ranked

    def put(self, key: tuple[str, int], ranked: Ranked) -> None:
        """Hold ``ranked`` (a list longer than the whole cache is not held)."""
        with self._lock:
            old = self._lists.pop(key, None)
            self._hits -= len(old.hits) if old is not None else 0
            if len(ranked.hits) > self.max_hits:
                return
            self._lists[key] = ranked
            self._hits += len(ranked.hits)
            while self._hits > self.max_hits:
                _, dropped = self._lists.popitem(last=False)
                self._hits -= len(dropped.hits)


def _finite(value: float) -> float | None:
    """A descriptor distance for ``cbir:score``; None (no field) for an item without one."""
    return float(value) if math.isfinite(value) else None


def similarity_from_flat(
    params: dict[str, Any], prefix: str, item: ItemRef | None = None
) -> SimilarityQuery | None:
    """The similarity object of flat GET parameters ``<prefix><field>`` (None when none is
    given): one owner for GET /search and /similar, so both take what POST takes."""
    given = {f: params[prefix + f] for f in _FLAT_FIELDS if params.get(prefix + f) is not None}
    judged = (
        _refs(params.get(prefix + "relevant"), prefix + "relevant"),
        _refs(params.get(prefix + "not_relevant"), prefix + "not_relevant"),
    )
    weights = {w: params[prefix + w] for w in _FLAT_WEIGHTS if params.get(prefix + w) is not None}
    if any(judged) or weights:
        given["feedback"] = FeedbackQuery(relevant=judged[0], not_relevant=judged[1], **weights)
    if item is None and not given:
        return None
    try:
        return SimilarityQuery(item=item, **given)
    except ValueError as exc:
        raise InvalidQueryError(str(exc)) from exc


@attr.s(auto_attribs=True, frozen=True)
class UploadedImage:
    """An uploaded image, decoded: its pixels and what they are."""

    pixels: np.ndarray  # (bands, rows, cols) float32, GeoTIFF scale/offset applied
    dtype: str  # the pixel type of the values (float32 once a scale/offset was applied)
    what: str  # e.g. "8-bit PNG", for messages
    values: tuple[float, float]  # finite min, max


@contextmanager
def _gdal_warnings() -> Iterator[list[str]]:
    """The warnings GDAL reports in this thread while the block runs (rasterio logs them)."""
    seen: list[str] = []
    me = threading.get_ident()

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == me and record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    handler = _Collect()
    logger = logging.getLogger("rasterio")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def _root_cause(exc: BaseException) -> BaseException:
    """The first error of a chain (GDAL's own message under rasterio's 'Read failed')."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _read_image(raw: bytes, max_pixels: int) -> UploadedImage:
    """Decode an upload strictly: every pixel is read, and a GDAL error or warning on the way
    (a truncated or corrupt file) is a 400; more than ``max_pixels`` values a 413, before any
    pixel is read. GDAL's whole-image PNG path is off: it fills a truncated PNG with garbage
    without a word; the row by row path reports libpng's read errors."""
    import rasterio
    from rasterio.io import MemoryFile

    def unreadable(exc: BaseException) -> InvalidQueryError:
        return InvalidQueryError(
            f"similarity.image is not a readable PNG or GeoTIFF image (truncated or corrupt?): "
            f"{_root_cause(exc)}"
        )

    try:
        with (
            rasterio.Env(GDAL_PNG_WHOLE_IMAGE_OPTIM="NO"),
            MemoryFile(raw) as mem,
            mem.open(driver=IMAGE_DRIVERS) as src,
        ):
            # the header only: a decompression bomb is refused before any pixel is read
            size = src.width * src.height * src.count
            if size > max_pixels:
                raise HTTPException(
                    413,
                    f"similarity.image is too large: {src.width} x {src.height} pixels x "
                    f"{src.count} band(s) = {size} values, this server takes at most "
                    f"{max_pixels}",
                )
            with _gdal_warnings() as warnings:
                pixels = src.read()
            if warnings:
                raise InvalidQueryError(
                    f"similarity.image is damaged (truncated or corrupt?): GDAL: {warnings[0]}"
                )
            dtype, driver = src.dtypes[0], src.driver
            scales, offsets = src.scales, src.offsets
    except (HTTPException, InvalidQueryError):
        raise
    except Exception as exc:  # GDAL's errors on a file it cannot read are many: all are 400s
        raise unreadable(exc) from exc
    kind = "bit float" if np.dtype(dtype).kind == "f" else "bit"
    what = f"{np.dtype(dtype).itemsize * 8}-{kind} {'GeoTIFF' if driver == 'GTiff' else driver}"
    values = pixels.astype(np.float32)
    if any(sc != 1 for sc in scales) or any(off != 0 for off in offsets):  # physical units
        scale = np.asarray(scales, np.float32)[:, None, None]
        values = values * scale + np.asarray(offsets, np.float32)[:, None, None]
        dtype = "float32"
    finite = np.isfinite(values)
    if not finite.all():
        raise InvalidQueryError(
            f"similarity.image: {what} has {int((~finite).sum())} NaN or infinite value(s); "
            "the model takes finite values only"
        )
    return UploadedImage(values, dtype, what, (float(values.min()), float(values.max())))


def _ref(text: str, problem: str) -> ItemRef:
    """The item reference ``<collection>/<item id>`` (a GET parameter); 400 saying ``problem``
    when it is not one."""
    collection, sep, item_id = text.partition("/")
    if not sep or not collection or not item_id:
        raise InvalidQueryError(problem)
    return ItemRef(collection=collection, id=item_id)


def _refs(value: str | None, name: str) -> list[ItemRef]:
    """Item references of a comma list of ``<collection>/<item id>`` (GET parameters)."""
    problem = f"{name} must be a comma list of `<collection>/<item id>`"
    return [_ref(part.strip(), problem) for part in (value or "").split(",") if part.strip()]


def _code_of(
    item: dict[str, Any] | None, model: str, version: str | None = None
) -> HashCode | None:
    """The item's code of ``model`` at ``version`` (any version when None), validated: the
    extension's rule (:func:`~stac_rscbir.extension.cbir.code_of`), as the index rebuild
    applies it."""
    return None if item is None else code_of(item, model, version)


@attr.s
class SimilarityExtension(ApiExtension):
    """The extension: request fields on /search, the /similar endpoint, a conformance class."""

    GET = SimilarityGetRequest
    POST = SimilarityPostRequest
    service: SimilarityService | None = attr.ib(default=None)
    client: Any = attr.ib(default=None)
    conformance_classes: list[str] = attr.ib(factory=lambda: [CONFORMANCE])
    schema_href: str | None = attr.ib(default=None)
    router: APIRouter = attr.ib(factory=APIRouter)

    def register(self, app: FastAPI) -> None:
        """Add GET /collections/{collection_id}/items/{item_id}/similar."""
        self.router.prefix = app.state.router_prefix
        self.router.add_api_route(
            name="Similar Items",
            path="/collections/{collection_id}/items/{item_id}/similar",
            response_model=None,
            response_class=app.router.default_response_class,
            methods=["GET"],
            endpoint=create_async_endpoint(self._similar_items, SimilarItemsRequest),
            summary="Items like this one, ranked by Hamming distance of their hash codes.",
        )
        app.include_router(self.router, tags=["Similarity Extension"])

    @store_errors
    def _similar_items(
        self,
        request: Request,
        collection_id: str,
        item_id: str,
        collections: str | None = None,
        limit: int | None = 10,
        token: str | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """The ranked list of the item, paged like /search (``limit``, ``next`` links up to k)."""
        sim = similarity_from_flat(params, "", ItemRef(collection=collection_id, id=item_id))
        wanted = [c.strip() for c in (collections or "").split(",") if c.strip()]
        query = SearchQuery(limit=limit or 10, token=token, collections=wanted or None)
        page = self.service.search(query, sim)  # type: ignore[union-attr,arg-type]
        return self.client._page(page, request, "GET", params, query)
