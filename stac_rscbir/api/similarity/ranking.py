"""Ranked lists and their pages: the hits of a similarity search, the paging tokens that point
into them, and the bounded cache that keeps every page of a search slicing the list of its first
page (whatever the store does between pages)."""

import base64
import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

from stac_rscbir.store.base import InvalidQueryError

PAGING_CACHE_HITS = 200_000  # default cap on the hits of the ranked lists kept for paging


class RankedHit(NamedTuple):
    """One ranked item: its key, Hamming distance, and descriptor distance when the order is by
    descriptor (``cbir:score``)."""

    key: tuple[str, str]
    distance: int
    score: float | None


@dataclass(frozen=True)
class Ranked:
    """A ranked list and the ``cbir:similarity`` facts of how it was made."""

    hits: list[RankedHit]
    info: dict[str, Any]


@dataclass(frozen=True)
class RankedPage:
    """One page of a ranked list: its hits in rank order, the token of the next page (None on
    the last), the list's length (``numberMatched``) and the response's ``cbir:similarity``."""

    hits: list[RankedHit]
    next_token: str | None
    matched: int
    info: dict[str, Any]


def annotate(item: dict[str, Any], hit: RankedHit) -> dict[str, Any]:
    """The item with its rank facts in ``properties``: ``cbir:distance`` and, when the order
    follows the descriptors, ``cbir:score``."""
    properties = item.setdefault("properties", {})
    properties["cbir:distance"] = hit.distance
    if hit.score is not None:
        properties["cbir:score"] = hit.score
    return item


def finite_score(value: float) -> float | None:
    """A descriptor distance for ``cbir:score``; None (no field) for an item without one."""
    return float(value) if math.isfinite(value) else None


def fingerprint(filters: Any, similarity: dict[str, Any]) -> str:
    """What identifies a search across its pages: its filters and its similarity object."""
    body = {"q": filters, "s": similarity}
    return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]


def make_token(fingerprint: str, generation: int, offset: int) -> str:
    """The paging token: the search, the store generation of its first page, the offset."""
    raw = f"sim:{fingerprint}:{generation}:{offset}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def token_position(token: str, fingerprint: str) -> tuple[int, int]:
    """(generation of the first page, offset) of a paging token of this search; 400 if the
    token is not one, or belongs to another search."""
    try:
        kind, fp, generation, offset = base64.urlsafe_b64decode(token).decode().split(":")
        if kind != "sim":
            raise ValueError(kind)
        position = int(generation), int(offset)
    except Exception as exc:
        raise InvalidQueryError("token is not a similarity paging token") from exc
    if fp != fingerprint:
        raise InvalidQueryError("token belongs to a different similarity search")
    return position


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

    def page(
        self, ranked: Ranked, fingerprint: str, generation: int, offset: int, limit: int
    ) -> RankedPage:
        """The page of ``ranked`` at ``offset``; the list is held while a next page exists."""
        end = offset + limit
        token = None
        if end < len(ranked.hits):
            token = make_token(fingerprint, generation, end)
            self.put((fingerprint, generation), ranked)
        info = {**ranked.info, "ranked": len(ranked.hits)}
        return RankedPage(ranked.hits[offset:end], token, len(ranked.hits), info)
