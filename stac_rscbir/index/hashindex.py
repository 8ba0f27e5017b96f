"""A FAISS Hamming index over the hash codes of one model, with filtered search and re-ranking.

FAISS's phases, made explicit::

    index = HashIndex("s2-dhcnn-64")              # configure (kind, thresholds, nprobe)
    index.build(store.iter_codes(model), generation=store.generation())   # train + add
    index.add(key, code); index.update(key, code); index.remove(key)      # transactions
    hits = index.search(code, k=10, candidates=keys)                      # query
    index.save(directory); HashIndex.load(directory)                      # persist

Which FAISS index
    ``kind="auto"`` builds an exact ``IndexBinaryFlat`` (inside ``IndexBinaryIDMap2``) up to
    ``flat_max`` codes (default 200,000: an exact scan of that many costs ~0.3 ms) and an
    ``IndexBinaryIVF`` above, trained on a sample of the codes, ``nlist ~ sqrt(n)``, ``nprobe``
    configurable. ``kind="hnsw"`` (``IndexBinaryHNSW``) is available but ~20x slower than IVF at
    the same recall and cannot remove vectors (removals become tombstones, filtered out).
    The index never switches kind by itself as it grows: :attr:`HashIndex.preferred_kind`
    says when a rebuild would pick another one, and :meth:`HashIndex.reshaped` builds that
    from the index's own codes (the live indexes' follower thread swaps it in).
    Besides the FAISS index, the codes are kept as a numpy array by id (``bits / 8`` bytes per
    item, 160 MB for 10^7 x 128 bit) for ``gather`` and exact scans of approximate indexes.

Distances, ties and exactness
    Hits are ``(key, hamming distance)`` sorted by ``(distance, key)``. Ties at the k-th distance
    are resolved by key, never by FAISS's internal order: the top-k' loop keeps fetching until the
    k-th accepted distance is strictly below the last fetched one, so exact results are exactly
    the brute-force ranking and pages are stable. A search reports whether its ranking was exact
    (``result.exact``, also :attr:`HashIndex.last_exact`). ``exact=True`` on an approximate index
    scans all codes with FAISS's Hamming kernel (``faiss.knn_hamming`` over the code array kept
    beside the index), so an exact answer is always available.

Filtered search (``candidates``: the keys that pass the store's bbox/datetime/CQL2 filters)
    Three strategies, chosen by a cost model whose constants come from
    ``benchmarks/index_bench.py`` (see :data:`COSTS`):

    ``gather``     take the candidates' codes (``np.take``) and scan them exactly with
                   ``faiss.knn_hamming``: cost ~ m (candidates), exact. At 10^6 x 64 bit: 0.05 ms
                   at 0.1 %, 0.12 ms at 1 %, 0.55 ms at 10 %, 2.4 ms at 50 % of the codes.
    ``overfetch``  search the index for the top k' (k' ~ 3 k n / m, grown until k candidates
                   are found with no tie cut at the boundary, or the index is exhausted) and keep
                   the candidates: cost ~ one index search (+ more rounds when ties or few
                   candidates force a larger k'). Exact on a flat index, approximate on IVF/HNSW
                   (falls back to ``gather`` if the probed lists hold fewer than k candidates).
    ``auto``       flat: ``gather`` while m < ~20 % of n (its cost equals one flat scan there),
                   ``overfetch`` above. IVF/HNSW: ``gather`` (exact) unless ``overfetch`` is
                   estimated ``Costs.exact_bonus`` (2x) cheaper: an exact answer is worth a little
                   time, and overfetch recall collapses on selective filters.
    ``selector``   flat index + ``IDSelectorBitmap`` in ``SearchParameters``: exact, but it never
                   beat the better of the two above in the benchmark; available on request
                   (``strategy="selector"``). ``IDSelectorArray`` is linear per lookup and
                   ``IDSelector`` is unsupported by ``IndexBinaryIVF`` (faiss 1.15), so neither is
                   used.

``max_distance`` is an inclusive Hamming radius: with ``k`` it is applied to the top-k (the k-NN
search stops as soon as the fetched distances pass the radius); with ``k=None`` all codes within the
radius are returned via FAISS ``range_search`` (flat and IVF; HNSW filters a k-NN search).

Threads
    A :class:`HashIndex` may be searched by many threads while one thread updates it: searches
    (and ``save``, ``rerank``, ``code``...) share a read lock, ``add``/``remove``/``update``/
    ``build`` take it exclusively (writer-preferring, re-entrant). ``save`` only holds the read
    lock while it copies the state (a memcpy-sized snapshot); the files are written outside it,
    so neither readers nor writers wait for the disk.

Persistence
    ``save`` writes a new version folder and switches to it atomically (``index/snapshots.py``):
    a reader in any process (a restart, another API replica on the same folder) loads the
    previous complete version or the new one, never a missing or torn set. Saves from several
    threads or processes into one folder each write their own version; the last switch wins.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import faiss
import numpy as np
import numpy.typing as npt

from stac_rscbir.index.snapshots import VERSION_PREFIX, NoSnapshotError, SnapshotDir
from stac_rscbir.store.base import ItemKey, StoredCode

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KINDS = ("auto", "flat", "ivf", "hnsw")
STRATEGIES = ("auto", "gather", "overfetch", "selector")

INDEX_FILE = "index.faiss"
CODES_FILE = "codes.npy"
KEYS_FILE = "keys.json"
DESCRIPTORS_FILE = "descriptors.npy"
META_FILE = "meta.json"


@dataclass(frozen=True)
class Costs:
    """Per-code costs (ns, one thread) of the search paths, for the strategy choice.

    Measured by ``benchmarks/index_bench.py`` on the 2-core x86_64 machines (faiss-cpu 1.15.1,
    10^6 codes, median over queries, 1 thread); only the ratios matter for the choice:
    flat scan 1.12 ms / 10^6 codes for 64 and 128 bits alike; gather (id checks + ``np.take`` +
    ``knn_hamming``) 0.55 ms / 10^5 candidates at 64 bits, 0.7-1.0 ms at 128 bits; building the
    candidate mask of ``overfetch`` ~2 ns per candidate; IVF ~1.5 ns per probed code.
    """

    scan: float = 1.15  # flat index search, per indexed code
    gather: float = 4.0  # per candidate, plus gather_per_byte per code byte
    gather_per_byte: float = 0.25
    mask: float = 2.0  # overfetch: building the candidate mask, per candidate
    heap: float = 25.0  # extra per requested result k' of a k-NN search (heap maintenance)
    ivf_probe: float = 1.5  # IVF search, per code in the probed lists
    exact_bonus: float = 2.0  # on an approximate index, gather (exact) wins unless this much dearer


COSTS = Costs()


class Hit(NamedTuple):
    """One search hit: the item and its Hamming distance to the query."""

    key: ItemKey
    distance: int


class RerankedHit(NamedTuple):
    """A hit re-ranked by the Euclidean distance of float descriptors (inf when it has none)."""

    key: ItemKey
    distance: int
    descriptor_distance: float


class SearchResult(list[Hit]):
    """The hits of a search (a list of ``Hit``) with how they were found.

    ``exact`` is True when the ranking equals a brute-force ranking of the candidate set;
    ``strategy`` names the path taken (``scan``, ``ann``, ``range``, ``gather``, ``overfetch``,
    ``selector``, ``empty``).
    """

    def __init__(self, hits: Iterable[Hit] = (), *, exact: bool, strategy: str) -> None:
        super().__init__(hits)
        self.exact = exact
        self.strategy = strategy

    def __repr__(self) -> str:
        return (
            f"SearchResult({list.__repr__(self)}, exact={self.exact}, strategy={self.strategy!r})"
        )


class IndexLoadError(Exception):
    """A persisted index that cannot be used (missing, half-written, corrupt or inconsistent)."""


class CodeStore:
    """What :func:`open_or_rebuild` needs of a store (``ItemStore`` satisfies it)."""

    def iter_codes(self, model: str, version: str | None = None) -> Iterable[StoredCode]:
        raise NotImplementedError  # pragma: no cover

    def generation(self) -> int:
        raise NotImplementedError  # pragma: no cover


def _as_code(code: bytes | npt.ArrayLike) -> npt.NDArray[np.uint8]:
    if isinstance(code, bytes | bytearray | memoryview):
        return np.frombuffer(bytes(code), dtype=np.uint8)
    arr = np.asarray(code)
    if arr.dtype != np.uint8 or arr.ndim != 1:
        raise ValueError(f"a code is packed bytes (1-D uint8), got {arr.dtype} {arr.shape}")
    return arr


def _as_descriptor(value: bytes | npt.ArrayLike) -> npt.NDArray[np.float32]:
    if isinstance(value, bytes | bytearray | memoryview):
        arr = np.frombuffer(bytes(value), dtype="<f4").astype(np.float32)
    else:
        arr = np.asarray(value, dtype=np.float32)
    if arr.ndim != 1 or arr.size == 0 or not np.isfinite(arr).all():
        raise ValueError("a descriptor is a non-empty 1-D vector of finite floats")
    return arr


class _RWLock:
    """Many readers or one writer; writer-preferring; re-entrant in one thread (a writer may
    also read). A reader cannot become a writer (RuntimeError instead of a deadlock)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._writer_depth = 0
        self._waiting_writers = 0
        self._local = threading.local()

    @contextmanager
    def read(self) -> Iterator[None]:
        me = threading.get_ident()
        depth = getattr(self._local, "reads", 0)
        if depth or self._writer == me:  # re-entry: already inside this lock
            self._local.reads = depth + 1
            try:
                yield
            finally:
                self._local.reads = depth
            return
        with self._cond:
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        self._local.reads = 1
        try:
            yield
        finally:
            self._local.reads = 0
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._writer == me:
            self._writer_depth += 1
            try:
                yield
            finally:
                self._writer_depth -= 1
            return
        if getattr(self._local, "reads", 0):
            raise RuntimeError("a HashIndex reader cannot update it (read lock held)")
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer, self._writer_depth = me, 1
        try:
            yield
        finally:
            with self._cond:
                self._writer_depth -= 1
                if not self._writer_depth:
                    self._writer = None
                    self._cond.notify_all()


_F = TypeVar("_F", bound=Callable[..., Any])


def _reads(method: _F) -> _F:
    @functools.wraps(method)
    def locked(self: HashIndex, *args: Any, **kwargs: Any) -> Any:
        with self._rw.read():
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


def _writes(method: _F) -> _F:
    @functools.wraps(method)
    def locked(self: HashIndex, *args: Any, **kwargs: Any) -> Any:
        with self._rw.write():
            return method(self, *args, **kwargs)

    return locked  # type: ignore[return-value]


class HashIndex:
    """A Hamming index over the codes of one model, keyed by STAC item (collection, id).

    ``generation`` is the store generation the content reflects: every write the store had
    committed by then is in the index.
    """

    def __init__(
        self,
        model: str,
        bits: int | None = None,
        *,
        version: str | None = None,
        kind: str = "auto",
        flat_max: int = 200_000,
        nlist: int | None = None,
        nprobe: int = 8,
        train_size: int | None = None,
        hnsw_m: int = 32,
        ef_search: int = 256,
        costs: Costs = COSTS,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if bits is not None and (bits <= 0 or bits % 8):
            raise ValueError(f"bits must be a positive multiple of 8, got {bits}")
        self.model = model
        self.version = version
        self.bits = bits
        self.requested_kind = kind
        self.kind = "flat"
        self.flat_max = flat_max
        self.nlist_option = nlist  # None: ~sqrt(n) at each build
        self.nlist = nlist  # the value of the current IVF index
        self.nprobe = nprobe
        self.train_size = train_size
        self.hnsw_m = hnsw_m
        self.ef_search = ef_search
        self.costs = costs
        self.generation = -1
        self.last_exact = True
        self.last_strategy = "empty"
        self._index: Any = None
        self._rw = _RWLock()
        self._reset(0)

    # ------------------------------------------------------------------ state

    def _reset(self, capacity: int) -> None:
        nbytes = (self.bits or 8) // 8
        self._codes = np.zeros((capacity, nbytes), dtype=np.uint8)  # row = id
        self._alive = np.zeros(capacity, dtype=bool)
        self._keys: list[ItemKey | None] = []
        self._ids: dict[ItemKey, int] = {}
        self._desc: npt.NDArray[np.float32] | None = None  # NaN rows: no descriptor
        self._next_id = 0

    @property
    def nbytes(self) -> int:
        return (self.bits or 0) // 8

    @property
    def descriptor_dim(self) -> int | None:
        """The length of the stored float descriptors (None before any): the relaxed code's
        bits for a network model, the descriptor's own size for a descriptor model."""
        return None if self._desc is None else int(self._desc.shape[1])

    @property
    def count(self) -> int:
        """Number of live codes."""
        return len(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return key in self._ids

    @_reads
    def keys(self) -> list[ItemKey]:
        return list(self._ids)

    @_reads
    def code(self, key: ItemKey) -> bytes:
        """The stored packed code of ``key`` (KeyError when absent)."""
        return self._codes[self._ids[key]].tobytes()

    @_reads
    def descriptor(self, key: ItemKey) -> npt.NDArray[np.float32] | None:
        i = self._ids[key]
        if self._desc is None or i >= len(self._desc) or np.isnan(self._desc[i, 0]):
            return None
        return self._desc[i].copy()

    @_reads
    def descriptor_binarization(self, sample: int = 4096) -> tuple[float, float] | None:
        """The threshold that turns the stored descriptors into the stored codes, inferred.

        Tries the two binarisations of relaxed codes (``h >= 0``, the +-1 space, threshold
        0.0; ``h > 0.5``, the 0/1 space, threshold 0.5) on up to ``sample`` live items with a
        descriptor of the code's length; returns ``(threshold, fraction of bits matched)`` of
        the better one, or None when no such item exists. For servers without the model's
        checkpoint (relevance feedback binarises a refined descriptor with it).
        """
        if self._desc is None or self._desc.shape[1] != (self.bits or 0):
            return None
        n = self._next_id
        rows = np.flatnonzero(self._alive[:n] & ~np.isnan(self._desc[:n, 0]))[:sample]
        if not len(rows):
            return None
        bits = np.unpackbits(self._codes[rows], axis=1).astype(bool)
        desc = self._desc[rows]
        pm1 = float(np.mean((desc >= 0) == bits))
        zero_one = float(np.mean((desc > 0.5) == bits))
        return (0.0, pm1) if pm1 >= zero_one else (0.5, zero_one)

    @property
    def preferred_kind(self) -> str:
        """The kind a rebuild would choose now (differs from ``kind`` after much growth)."""
        if self.requested_kind != "auto":
            return self.requested_kind
        return "flat" if self.count <= self.flat_max else "ivf"

    def _default_nlist(self, n: int) -> int:
        if self.nlist_option:
            return max(1, min(self.nlist_option, n))
        return max(1, min(round(math.sqrt(n)), n // 39 or 1))

    def _new_faiss(self, kind: str, train: npt.NDArray[np.uint8] | None, nlist: int = 1) -> Any:
        d = self.bits or 8
        if kind == "flat":
            return faiss.IndexBinaryIDMap2(faiss.IndexBinaryFlat(d))
        if kind == "hnsw":
            hnsw = faiss.IndexBinaryHNSW(d, self.hnsw_m)
            hnsw.hnsw.efSearch = self.ef_search
            return faiss.IndexBinaryIDMap2(hnsw)
        assert train is not None
        quantizer = faiss.IndexBinaryFlat(d)
        ivf = faiss.IndexBinaryIVF(quantizer, d, nlist)
        ivf.cp.niter = 10
        ivf.nprobe = self.nprobe
        ivf.train(train)
        self.nlist = nlist
        return ivf

    def _grow(self, needed: int) -> None:
        cap = len(self._codes)
        if needed <= cap:
            return
        new_cap = max(needed, cap * 2, 1024)
        codes = np.zeros((new_cap, self.nbytes), dtype=np.uint8)
        codes[:cap] = self._codes
        self._codes = codes
        alive = np.zeros(new_cap, dtype=bool)
        alive[:cap] = self._alive
        self._alive = alive
        if self._desc is not None:
            desc = np.full((new_cap, self._desc.shape[1]), np.nan, dtype=np.float32)
            desc[: len(self._desc)] = self._desc
            self._desc = desc

    def _set_descriptor(self, i: int, value: bytes | npt.ArrayLike | None) -> None:
        if value is None:
            if self._desc is not None and i < len(self._desc):
                self._desc[i] = np.nan
            return
        vec = _as_descriptor(value)
        if self._desc is None:
            self._desc = np.full((len(self._codes), vec.size), np.nan, dtype=np.float32)
        if vec.size != self._desc.shape[1]:
            raise ValueError(f"descriptor of dim {vec.size}, the index holds {self._desc.shape[1]}")
        self._desc[i] = vec

    # ------------------------------------------------------------------ build + transactions

    @_writes
    def build(self, codes: Iterable[StoredCode], generation: int) -> HashIndex:
        """Replace the content with ``codes`` (a later duplicate key wins), train and add.

        Codes of another bit length than the index's (the most common one when ``bits`` is not
        set) and descriptors of another dimension than the most common one are left out with a
        warning: data written behind the API's checks must not make every search fail.
        """
        rows: dict[ItemKey, tuple[bytes, bytes | None]] = {}
        for sc in codes:
            rows[sc.key] = (bytes(sc.code), sc.descriptor)
        if rows and self.bits is None:
            self.bits = Counter(len(c) for c, _ in rows.values()).most_common(1)[0][0] * 8
        bad = [k for k, (c, _) in rows.items() if len(c) != self.nbytes]
        if bad:
            log.warning(
                "hash index of %s: %d codes are not %d bits long, left out (first: %s/%s)",
                self.model,
                len(bad),
                self.bits,
                *bad[0],
            )
            for key in bad:
                del rows[key]
        dims = Counter(len(d) for _, d in rows.values() if d is not None)
        if len(dims) > 1:
            size = dims.most_common(1)[0][0]
            odd = [k for k, (_, d) in rows.items() if d is not None and len(d) != size]
            log.warning(
                "hash index of %s: %d descriptors are not of dim %d, left out (first: %s/%s)",
                self.model,
                len(odd),
                size // 4,
                *odd[0],
            )
            for key in odd:
                rows[key] = (rows[key][0], None)
        nbytes = self.nbytes
        arr = np.frombuffer(b"".join(c for c, _ in rows.values()), dtype=np.uint8)
        descs = [d for _, d in rows.values()]
        return self.build_arrays(
            list(rows), arr.reshape(len(rows), nbytes), generation, descs if any(descs) else None
        )

    @_writes
    def build_arrays(
        self,
        keys: Sequence[ItemKey],
        codes: npt.ArrayLike,
        generation: int,
        descriptors: Sequence[bytes | npt.ArrayLike | None] | npt.ArrayLike | None = None,
    ) -> HashIndex:
        """Like :meth:`build` from unique ``keys`` and a (n, bits / 8) uint8 code array."""
        arr = np.asarray(codes, dtype=np.uint8)
        n = len(keys)
        if n and self.bits is None:
            self.bits = arr.shape[1] * 8
        if arr.shape != (n, self.nbytes) and n:
            raise ValueError(f"codes of shape {arr.shape} for {n} keys of {self.bits} bits")
        self._reset(0)
        self._codes = np.array(arr.reshape(n, self.nbytes), dtype=np.uint8)  # own, writable
        self._alive = np.ones(n, dtype=bool)
        self._keys = list(keys)
        self._ids = {k: i for i, k in enumerate(self._keys)}
        if len(self._ids) != n:
            raise ValueError("duplicate keys")
        self._next_id = n
        if descriptors is not None:
            for i, desc in enumerate(descriptors):
                if desc is not None:
                    self._set_descriptor(i, desc)
        kind = self.preferred_kind
        if kind == "ivf" and n == 0:
            kind = "flat"
        self.kind = kind
        train = None
        nlist = 1
        if kind == "ivf":
            nlist = self._default_nlist(n)
            size = min(n, self.train_size or max(64 * nlist, 10_000))
            rng = np.random.default_rng(0)
            sample = rng.choice(n, size, replace=False) if size < n else np.arange(n)
            train = self._codes[np.sort(sample)]
        self._index = self._new_faiss(kind, train, nlist)
        if n:
            self._index.add_with_ids(self._codes, np.arange(n, dtype=np.int64))
        self.generation = generation
        return self

    @_writes
    def add(
        self,
        key: ItemKey,
        code: bytes | npt.ArrayLike,
        descriptor: bytes | npt.ArrayLike | None = None,
        *,
        generation: int | None = None,
    ) -> None:
        """Add a new item (ValueError if the key is present: use :meth:`update`)."""
        if key in self._ids:
            raise ValueError(f"{key!r} is already indexed; use update()")
        arr = _as_code(code)
        if self.bits is None:
            self.bits = arr.size * 8
            self._reset(0)
            self._index = self._new_faiss("flat", None)
            self.kind = "flat"
        elif self._index is None:
            self._index = self._new_faiss("flat", None)
        if arr.size != self.nbytes:
            raise ValueError(f"{key!r}: a {arr.size * 8}-bit code for a {self.bits}-bit index")
        i = self._next_id
        self._grow(i + 1)
        self._codes[i] = arr
        self._alive[i] = True
        if descriptor is not None or self._desc is not None:
            self._set_descriptor(i, descriptor)
        self._keys.append(key)
        self._ids[key] = i
        self._next_id += 1
        self._index.add_with_ids(arr.reshape(1, -1), np.array([i], dtype=np.int64))
        if generation is not None:
            self.generation = generation

    @_writes
    def remove(self, key: ItemKey, *, generation: int | None = None) -> bool:
        """Remove ``key``; returns False when it was not indexed."""
        i = self._ids.pop(key, None)
        if i is None:
            if generation is not None:
                self.generation = generation
            return False
        self._keys[i] = None
        self._alive[i] = False
        if self._desc is not None:
            self._desc[i] = np.nan
        if self.kind != "hnsw":  # HNSW cannot remove: the id stays a filtered-out tombstone
            self._index.remove_ids(np.array([i], dtype=np.int64))
        if generation is not None:
            self.generation = generation
        return True

    @_writes
    def apply(
        self,
        changes: Mapping[ItemKey, tuple[bytes, bytes | npt.ArrayLike | None] | None],
        *,
        generation: int,
    ) -> None:
        """Apply a batch of writes at ``generation``: each key's new (code, descriptor), or
        None to take it out. One FAISS removal for the whole batch: ``remove_ids`` scans every
        id, so removing key by key costs ~2.6 ms each at 10^5 codes (benchmarks/RESULTS.md)."""
        gone = [self._ids.pop(key) for key in changes if key in self._ids]
        for i in gone:
            self._keys[i] = None
            self._alive[i] = False
            if self._desc is not None:
                self._desc[i] = np.nan
        if gone and self.kind != "hnsw":  # HNSW cannot remove: filtered-out tombstones
            self._index.remove_ids(np.asarray(gone, dtype=np.int64))
        for key, entry in changes.items():
            if entry is not None:
                self.add(key, entry[0], entry[1])
        self.generation = generation

    @_writes
    def drop_collections(self, collections: Collection[str]) -> int:
        """Take out every key of ``collections`` (deleted collections), in one batch; returns
        how many there were. The generation is left as it is."""
        gone = [key for key in self._ids if key[0] in collections]
        self.apply(dict.fromkeys(gone), generation=self.generation)
        return len(gone)

    @_writes
    def update(
        self,
        key: ItemKey,
        code: bytes | npt.ArrayLike,
        descriptor: bytes | npt.ArrayLike | None = None,
        *,
        generation: int | None = None,
    ) -> None:
        """Replace (or insert) the code and descriptor of ``key``."""
        self.remove(key)
        self.add(key, code, descriptor, generation=generation)

    @_writes
    def advance(self, generation: int) -> None:
        """Mark the index current at ``generation`` (a store write that changed no code)."""
        self.generation = generation

    # ------------------------------------------------------------------ search

    @_reads
    def ids_of(self, candidates: Iterable[ItemKey]) -> npt.NDArray[np.int64]:
        """Internal ids of the indexed ``candidates`` (unknown keys dropped), for ``candidate_ids``.

        Valid until the next add/remove/update/build; costs ~0.1 us per key (a dict lookup).
        """
        get = self._ids.get
        ids = np.fromiter((get(c, -1) for c in candidates), dtype=np.int64)
        return _sorted_unique(ids[ids >= 0])

    def choose_strategy(self, m: int, k: int, exact: bool, n: int | None = None) -> str:
        """The cheapest filtered-search path for ``m`` of ``n`` codes (see :class:`Costs`).

        Flat index (or ``exact``): ``gather`` while ``m`` x gather cost stays below one scan of
        the index plus the mask, i.e. up to ~20 % of the codes at 64 bits (benchmark crossover
        between 10 % and 50 %). IVF/HNSW: ``gather`` (exact) unless ``overfetch`` is more than
        ``exact_bonus`` times cheaper, and always when the probed lists would not hold k' codes.
        """
        n = self.count if n is None else n
        c = self.costs
        kk = min(n, self._first_fetch(k, n, m))
        gather = (c.gather + c.gather_per_byte * self.nbytes) * m
        if self.kind == "flat" or exact:
            overfetch = c.scan * n + c.mask * m + c.heap * kk
            return "gather" if gather <= overfetch else "overfetch"
        if self.kind == "ivf":
            probed = n * min(1.0, self.nprobe / max(self.nlist or 1, 1))
            if kk > probed / 2:  # the probed lists would not hold k candidates
                return "gather"
            overfetch = c.ivf_probe * probed + c.mask * m + c.heap * kk
        else:  # hnsw: cost grows with efSearch ~ k'
            if kk > 4 * self.ef_search:
                return "gather"
            overfetch = c.heap * 40 * kk + c.mask * m
        return "gather" if gather <= c.exact_bonus * overfetch else "overfetch"

    @staticmethod
    def _first_fetch(k: int, n: int, m: int) -> int:
        """k' of the first overfetch round: 3x the expected need, as Hamming ties are common."""
        return int(3 * k * n / max(m, 1)) + 2 * k + 32

    @_reads
    def search(
        self,
        code: bytes | npt.ArrayLike,
        k: int | None = 10,
        max_distance: int | None = None,
        candidates: Iterable[ItemKey] | None = None,
        exact: bool | None = None,
        *,
        strategy: str = "auto",
        candidate_ids: npt.NDArray[np.int64] | None = None,
    ) -> SearchResult:
        """The ``k`` nearest codes (within ``max_distance``, among ``candidates``).

        ``exact=None`` uses the index as built (exact when flat); ``True`` forces an exact
        ranking; ``False`` allows an approximate one. ``strategy`` overrides the filtered-search
        choice (``gather``, ``overfetch``, ``selector``). ``k=None`` needs ``max_distance`` and
        returns everything within it. ``candidate_ids`` (from :meth:`ids_of`) may replace
        ``candidates`` when one candidate set serves several queries.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if k is None and max_distance is None:
            raise ValueError("k=None needs a max_distance")
        if k is not None and k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        cids = None
        if candidate_ids is not None:
            cids = _sorted_unique(np.asarray(candidate_ids, dtype=np.int64).reshape(-1))
            cids = cids[(cids >= 0) & (cids < self._next_id)]
            cids = cids[self._alive[cids]]
        elif candidates is not None:
            cids = self.ids_of(candidates)
        result = self._search(code, k, max_distance, cids, exact, strategy)
        self.last_exact = result.exact
        self.last_strategy = result.strategy
        return result

    def _search(
        self,
        code: bytes | npt.ArrayLike,
        k: int | None,
        max_distance: int | None,
        cids: npt.NDArray[np.int64] | None,
        exact: bool | None,
        strategy: str,
    ) -> SearchResult:
        if self.bits is None or self.count == 0 or k == 0:
            return SearchResult(exact=True, strategy="empty")
        q = _as_code(code)
        if q.size != self.nbytes:
            raise ValueError(f"a {q.size * 8}-bit query for a {self.bits}-bit index")
        q = q.reshape(1, -1)
        approx_index = self.kind != "flat"
        want_exact = bool(exact) if exact is not None else not approx_index
        limit = k if k is not None else self.count

        if cids is None:
            if k is None and self.kind != "hnsw" and not (approx_index and want_exact):
                return self._range(q, max_distance, exact=not approx_index)
            if not approx_index or not want_exact:
                dead = self._alive_rows if self.kind == "hnsw" else None
                d, i = self._topk(self._index_searcher(q), limit, max_distance, dead, self._ntotal)
                return self._hits(d, i, limit, exact=not approx_index, strategy="scan")
            d, i = self._topk(
                self._mirror_searcher(q), limit, max_distance, self._alive_rows, self._next_id
            )
            return self._hits(d, i, limit, exact=True, strategy="scan")

        m = len(cids)
        if m == 0:
            return SearchResult(exact=True, strategy="empty")
        limit = min(limit, m)
        if strategy == "auto":
            strategy = self.choose_strategy(m, limit, want_exact)
        if strategy == "selector" and self.kind != "flat":
            strategy = "gather"  # IDSelector is unsupported by IndexBinaryIVF / lossy with HNSW
        if strategy == "gather":
            d, i = self._topk(self._gather_searcher(q, cids), limit, max_distance, None, m)
            return self._hits(d, i, limit, exact=True, strategy="gather")
        if strategy == "selector":
            bitmap = np.zeros((self._next_id + 7) // 8, dtype=np.uint8)
            np.bitwise_or.at(bitmap, cids >> 3, (1 << (cids & 7)).astype(np.uint8))
            sel = faiss.IDSelectorBitmap(self._next_id, faiss.swig_ptr(bitmap))
            params = faiss.SearchParameters()
            params.sel = sel
            searcher = self._index_searcher(q, params)
            d, i = self._topk(searcher, limit, max_distance, None, m)
            return self._hits(d, i, limit, exact=True, strategy="selector")
        # overfetch
        mask = np.zeros(self._next_id, dtype=bool)
        mask[cids] = True
        first = min(self._ntotal, self._first_fetch(limit, self.count, m))
        if approx_index and want_exact:
            d, i = self._topk(
                self._mirror_searcher(q), limit, max_distance, mask, self._next_id, first
            )
            return self._hits(d, i, limit, exact=True, strategy="overfetch")
        d, i = self._topk(self._index_searcher(q), limit, max_distance, mask, self._ntotal, first)
        if approx_index and len(i) < limit:
            # the probed lists did not hold enough candidates: scan them exactly instead
            d, i = self._topk(self._gather_searcher(q, cids), limit, max_distance, None, m)
            return self._hits(d, i, limit, exact=True, strategy="gather")
        return self._hits(d, i, limit, exact=not approx_index, strategy="overfetch")

    @property
    def _ntotal(self) -> int:
        return int(self._index.ntotal)

    def _alive_rows(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        return self._alive[ids]

    def _index_searcher(
        self, q: npt.NDArray[np.uint8], params: Any = None
    ) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        def run(kk: int) -> tuple[np.ndarray, np.ndarray]:
            p = params
            if self.kind == "hnsw" and p is None:
                p = faiss.SearchParametersHNSW()
                p.efSearch = max(self.ef_search, kk)
            d, i = (
                self._index.search(q, kk, params=p) if p is not None else self._index.search(q, kk)
            )
            return d[0], i[0]

        return run

    def _mirror_searcher(
        self, q: npt.NDArray[np.uint8]
    ) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        codes = self._codes[: self._next_id]

        def run(kk: int) -> tuple[np.ndarray, np.ndarray]:
            d, i = faiss.knn_hamming(q, codes, kk)
            return d[0].astype(np.int32), i[0]

        return run

    def _gather_searcher(
        self, q: npt.NDArray[np.uint8], cids: npt.NDArray[np.int64]
    ) -> Callable[[int], tuple[np.ndarray, np.ndarray]]:
        sub = np.take(self._codes, cids, axis=0)

        def run(kk: int) -> tuple[np.ndarray, np.ndarray]:
            d, i = faiss.knn_hamming(q, sub, kk)
            rows = i[0]
            ok = rows >= 0
            return d[0][ok].astype(np.int32), cids[rows[ok]]

        return run

    def _topk(
        self,
        searcher: Callable[[int], tuple[np.ndarray, np.ndarray]],
        k: int,
        max_distance: int | None,
        accept: npt.NDArray[np.bool_] | Callable[[np.ndarray], np.ndarray] | None,
        total: int,
        first: int | None = None,
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int64]]:
        """Fetch top-k' until the k-th accepted distance is below the last fetched one.

        Returns the accepted (distance, id) pairs fetched, sorted by distance; every accepted
        code with a distance <= the k-th returned one is among them (no tie is cut).
        """
        if total <= 0:
            return np.empty(0, np.int32), np.empty(0, np.int64)
        kk = max(1, min(total, first or max(2 * k, k + 16)))
        while True:
            d, i = searcher(kk)
            ok = i >= 0
            d, i = d[ok], i[ok]
            if accept is not None:
                keep = accept[i] if isinstance(accept, np.ndarray) else accept(i)
                dm, im = d[keep], i[keep]
            else:
                dm, im = d, i
            exhausted = len(i) < kk or kk >= total
            if exhausted or (len(im) >= k and dm[k - 1] < d[-1]):
                break
            if max_distance is not None and len(d) and d[-1] > max_distance:
                break
            found = len(im)
            growth = 8.0 if found == 0 else max(2.0, 1.5 * k / found)
            kk = int(min(total, kk * growth))
        if max_distance is not None:
            within = dm <= max_distance
            dm, im = dm[within], im[within]
        return dm, im

    def _range(
        self, q: npt.NDArray[np.uint8], max_distance: int | None, exact: bool
    ) -> SearchResult:
        assert max_distance is not None
        lims, d, i = self._index.range_search(q, int(max_distance) + 1)  # FAISS: dis < radius
        d = d[lims[0] : lims[1]].astype(np.int32)
        i = i[lims[0] : lims[1]]
        order = np.argsort(d, kind="stable")
        return self._hits(d[order], i[order], len(d), exact=exact, strategy="range")

    def _hits(
        self,
        d: npt.NDArray[np.integer],
        ids: npt.NDArray[np.int64],
        k: int,
        *,
        exact: bool,
        strategy: str,
    ) -> SearchResult:
        """Sort by (distance, key) and keep k (the whole tie group at the k-th distance is seen)."""
        if len(d) > k:
            order = np.argsort(d, kind="stable")
            d, ids = d[order], ids[order]
            cut = np.searchsorted(d, d[k - 1], side="right")
            d, ids = d[:cut], ids[:cut]
        keys = self._keys
        hits = sorted(
            (int(dist), keys[i]) for dist, i in zip(d.tolist(), ids.tolist(), strict=True)
        )
        return SearchResult(
            (Hit(key, dist) for dist, key in hits[:k] if key is not None),
            exact=exact,
            strategy=strategy,
        )

    # ------------------------------------------------------------------ re-ranking

    @_reads
    def rerank(
        self,
        query_descriptor: npt.ArrayLike,
        hits: Iterable[Hit | tuple[ItemKey, int]],
        descriptors: Mapping[ItemKey, npt.ArrayLike | bytes] | None = None,
    ) -> list[RerankedHit]:
        """Order ``hits`` by Euclidean distance of float descriptors (then Hamming, then key).

        Descriptors come from ``descriptors`` when given, else from those stored in the index;
        hits without one keep their Hamming order after all the others (distance ``inf``).
        """
        qd = _as_descriptor(query_descriptor)
        out: list[tuple[float, int, ItemKey]] = []
        for key, dist in hits:
            vec: npt.NDArray[np.float32] | None
            if descriptors is not None:
                raw = descriptors.get(key)
                vec = None if raw is None else _as_descriptor(raw)
            else:
                vec = self.descriptor(key) if key in self._ids else None
            if vec is None or vec.size != qd.size:
                out.append((math.inf, int(dist), key))
            else:
                out.append((float(np.linalg.norm(vec - qd)), int(dist), key))
        out.sort(key=lambda t: (t[0], t[1], t[2]))
        return [RerankedHit(key, dist, e) for e, dist, key in out]

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Save a new version of the index files in ``directory`` and make it current.

        The version is written beside the current one and switched to with one atomic rename
        (:class:`~stac_rscbir.index.snapshots.SnapshotDir`): a reader in any process, or a
        restart after a crash at any point, finds the previous complete set or the new one,
        whose sizes and sha256 match its ``meta.json``. The state is copied under the read
        lock, the files written outside it. Raises OSError when the folder cannot be written
        (read-only, disk full); the previous version then stays current.
        """
        path = Path(directory)
        with self._rw.read():
            n = self._next_id
            index_bytes = faiss.serialize_index_binary(self._index)
            codes = self._codes[:n].copy()
            keys = list(self._keys)
            desc = None if self._desc is None else self._desc[:n].copy()
            meta: dict[str, Any] = {
                "format": FORMAT_VERSION,
                "model": self.model,
                "version": self.version,
                "bits": self.bits,
                "kind": self.kind,
                "requested_kind": self.requested_kind,
                "generation": self.generation,
                "count": self.count,
                "next_id": n,
                "flat_max": self.flat_max,
                "nlist": self.nlist,
                "nlist_option": self.nlist_option,
                "nprobe": self.nprobe,
                "hnsw_m": self.hnsw_m,
                "ef_search": self.ef_search,
                "descriptor_dim": None if desc is None else int(desc.shape[1]),
            }
        files: dict[str, Callable[[Path], object]] = {
            INDEX_FILE: lambda p: p.write_bytes(index_bytes.tobytes()),
            CODES_FILE: lambda p: _save_npy(p, codes),
            KEYS_FILE: lambda p: p.write_text(json.dumps([list(k) if k else None for k in keys])),
        }
        if desc is not None:
            files[DESCRIPTORS_FILE] = lambda p: _save_npy(p, desc)

        def fill(folder: Path) -> None:
            for name, write in files.items():
                write(folder / name)
            meta["files"] = {name: _file_check(folder / name) for name in files}
            (folder / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")

        SnapshotDir(path).write(fill)
        _remove_legacy_files(path)

    @staticmethod
    def discard_saved(directory: str | os.PathLike[str]) -> None:
        """Make the saved copy in ``directory`` unloadable: the next open rebuilds it from the
        store (for a saved copy that may name the present generation without every write)."""
        SnapshotDir(directory).invalidate()

    @staticmethod
    def read_meta(directory: str | os.PathLike[str]) -> dict[str, Any]:
        """The ``meta.json`` of the current saved version (IndexLoadError when there is none
        or it is unreadable)."""
        return _read_saved(Path(directory), _read_meta)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> HashIndex:
        """Load the current saved version; IndexLoadError when there is none, or its files are
        missing, corrupt or inconsistent."""
        return _read_saved(Path(directory), lambda folder: cls._load(folder, _read_meta(folder)))

    @classmethod
    def _load(cls, path: Path, meta: dict[str, Any]) -> HashIndex:
        for name, check in meta["files"].items():
            if _file_check(path / name) != check:
                raise IndexLoadError(f"{name}: size or checksum differs from {META_FILE}")
        self = cls(
            meta["model"],
            meta["bits"],
            version=meta["version"],
            kind=meta["requested_kind"],
            flat_max=meta["flat_max"],
            nlist=meta["nlist_option"],
            nprobe=meta["nprobe"],
            hnsw_m=meta["hnsw_m"],
            ef_search=meta["ef_search"],
        )
        self.kind = meta["kind"]
        self.nlist = meta["nlist"]
        self.generation = int(meta["generation"])
        n = int(meta["next_id"])
        codes = np.load(path / CODES_FILE, allow_pickle=False)
        raw_keys = json.loads((path / KEYS_FILE).read_text(encoding="utf-8"))
        if codes.shape != (n, self.nbytes) or codes.dtype != np.uint8 or len(raw_keys) != n:
            raise IndexLoadError("codes or keys do not match meta.json")
        self._codes = np.array(codes)  # writable copy
        self._keys = [None if k is None else (str(k[0]), str(k[1])) for k in raw_keys]
        self._alive = np.array([k is not None for k in self._keys], dtype=bool)
        self._ids = {k: i for i, k in enumerate(self._keys) if k is not None}
        self._next_id = n
        if len(self._ids) != meta["count"]:
            raise IndexLoadError("the key list does not match meta.json count")
        if meta["descriptor_dim"] is not None:
            desc = np.load(path / DESCRIPTORS_FILE, allow_pickle=False)
            if desc.shape != (n, meta["descriptor_dim"]) or desc.dtype != np.float32:
                raise IndexLoadError("descriptors do not match meta.json")
            self._desc = np.array(desc)
        index = faiss.read_index_binary(str(path / INDEX_FILE))
        expected = n if self.kind == "hnsw" else self.count
        if index.ntotal != expected:
            raise IndexLoadError(f"{INDEX_FILE} holds {index.ntotal} codes, expected {expected}")
        if index.d != (self.bits or 8):  # an empty index of unknown length has 8 (_new_faiss)
            raise IndexLoadError(f"{INDEX_FILE} has {index.d} bits, expected {self.bits}")
        if self.kind == "ivf":
            index.nprobe = self.nprobe  # read_index_binary returns the concrete class
        self._index = index
        return self

    @_reads
    def reshaped(self) -> HashIndex:
        """A compact copy of the live codes (and descriptors), built the way a rebuild would
        build it now (:attr:`preferred_kind`: a flat index grown past ``flat_max`` becomes
        IVF, trained on its own codes), at the same generation. The store is not read: this
        is how an index that only ever follows the change log changes kind as it grows."""
        rows = np.flatnonzero(self._alive[: self._next_id])
        keys = [self._keys[i] for i in rows]
        desc = None
        if self._desc is not None:
            desc = [None if np.isnan(d[0]) else d for d in self._desc[rows]]
        copy = HashIndex(
            self.model,
            self.bits,
            version=self.version,
            kind=self.requested_kind,
            flat_max=self.flat_max,
            nlist=self.nlist_option,
            nprobe=self.nprobe,
            train_size=self.train_size,
            hnsw_m=self.hnsw_m,
            ef_search=self.ef_search,
            costs=self.costs,
        )
        return copy.build_arrays(keys, self._codes[rows], self.generation, desc)  # type: ignore[arg-type]

    @_writes
    def set_nprobe(self, nprobe: int) -> None:
        """Lists probed per IVF query (recall/latency trade-off)."""
        self.nprobe = nprobe
        if self.kind == "ivf":
            self._index.nprobe = nprobe


def _sorted_unique(ids: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Sorted unique ids; a no-op check on already sorted input (np.unique hashes: slower)."""
    if len(ids) < 2 or bool((ids[1:] > ids[:-1]).all()):
        return ids
    ids = np.sort(ids)
    return ids[np.concatenate(([True], ids[1:] != ids[:-1]))]


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def _read_meta(folder: Path) -> dict[str, Any]:
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise IndexLoadError(f"{META_FILE}: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        raise IndexLoadError(f"{META_FILE}: unknown format")
    return meta


_R = TypeVar("_R")


def _read_saved(path: Path, read: Callable[[Path], _R]) -> _R:
    """``read`` on the current saved version in ``path``, every failure an IndexLoadError."""
    try:
        return SnapshotDir(path).read(read)
    except IndexLoadError:
        raise
    except Exception as err:  # no version, faiss RuntimeError, numpy ValueError, KeyError...
        raise IndexLoadError(f"{path}: {type(err).__name__}: {err}") from err


def _remove_legacy_files(path: Path) -> None:
    """The files of the unversioned layout (before snapshots), once a version is saved."""
    for name in (INDEX_FILE, CODES_FILE, KEYS_FILE, DESCRIPTORS_FILE, META_FILE):
        for old in (path / name, *path.glob(f".{name}.*")):
            old.unlink(missing_ok=True)


def _file_check(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def open_or_rebuild(
    directory: str | os.PathLike[str],
    store: CodeStore,
    model: str,
    version: str | None = None,
    bits: int | None = None,
    *,
    catch_up: Callable[[HashIndex], bool] | None = None,
    **options: Any,
) -> HashIndex:
    """The index saved in ``directory`` brought up to the store, else one rebuilt from it.

    A saved index is used when it is readable, consistent, of the same model/version/bit length
    (``bits`` None: any) and not ahead of the store's ``generation()``, and then either
    ``catch_up(index)`` (given) brings it up to the store (it applies the writes since the
    index's generation and returns False when it cannot, e.g. the store's change log no longer
    reaches back), or (without ``catch_up``) it was saved at the store's present generation.
    Otherwise the codes of ``version`` (every version when None) are read again from
    ``store.iter_codes`` and the new index saved; a corrupt or half-written set only costs a
    logged warning and the rebuild. ``options`` go to :class:`HashIndex` on rebuild.
    """
    path = Path(directory)
    generation = int(store.generation())  # read before the codes: a write during the rebuild
    # leaves the index marked older than the store, hence caught up at its next use
    try:
        index = HashIndex.load(path)
    except IndexLoadError as err:
        if not isinstance(err.__cause__, NoSnapshotError):
            log.warning("hash index in %s unusable (%s): rebuilding from the store", path, err)
        elif any(path.glob(f"{VERSION_PREFIX}*")):
            log.warning("hash index in %s has no current version (invalidated): rebuilding", path)
    else:
        if index.model == model and index.version == version and bits in (None, index.bits):
            if catch_up is not None and index.generation <= generation and catch_up(index):
                return index
            if catch_up is None and index.generation == generation:
                return index
        log.info(
            "hash index in %s is stale (model %s/%s generation %s, store %s): rebuilding",
            path,
            index.model,
            index.version,
            index.generation,
            generation,
        )
    index = HashIndex(model, bits, version=version, **options)
    index.build(store.iter_codes(model, version), generation=generation)
    try:
        index.save(path)
    except OSError as err:  # the index still serves; the next open rebuilds again
        log.warning("could not save the hash index to %s: %s", path, err)
    return index


def measure_recall(
    index: HashIndex,
    queries: npt.ArrayLike,
    k: int = 10,
    candidates: Sequence[ItemKey] | None = None,
) -> float:
    """Mean tie-aware recall@k of the index's approximate search against an exact search.

    A returned hit counts when its Hamming distance is <= the k-th exact distance (any such item
    belongs to some valid exact top-k, since Hamming distances tie a lot).
    """
    qs = np.asarray(queries, dtype=np.uint8)
    if qs.ndim == 1:
        qs = qs.reshape(1, -1)
    total = 0.0
    for q in qs:
        truth = index.search(q, k, candidates=candidates, exact=True)
        if not truth:
            total += 1.0
            continue
        approx = index.search(q, k, candidates=candidates, exact=False)
        bound = truth[-1].distance
        total += sum(1 for h in approx if h.distance <= bound) / len(truth)
    return total / len(qs)
