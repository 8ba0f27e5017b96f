"""The store interface the API and the similarity layer talk to, whatever the backend.

A store holds STAC collections and items (the source of truth; indexes are derived from it)
and answers searches with the STAC API filters. The similarity layer needs one extra verb:
the same search restricted to a set of item keys, which is how "filters make the candidate set,
similarity orders it" is carried out in both stores.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from stac_rscbir.extension.cbir import HashCode

ItemKey = tuple[str, str]  # (collection id, item id)

# The change log both stores keep (SQLite: the ``changes`` table; pgstac: ``rscbir.changes``),
# filled by triggers, so writes of any process are logged. ``changes_since(g)`` answers
# (the present generation, the keys written after ``g``, each once, sorted); an item id of
# COLLECTION_WRITTEN says the collection itself was written, COLLECTION_DELETED that it was
# deleted (with its items). Retention: every PRUNE_EVERY-th generation drops the rows of all but
# the last CHANGES_KEPT generations and moves the horizon there; ``changes_since(g)`` for a ``g``
# below the horizon answers None (the log no longer reaches back: the reader rebuilds).
CHANGES_KEPT = 10_000
PRUNE_EVERY = 100
COLLECTION_WRITTEN = ""
COLLECTION_DELETED = "*"


class StoreError(Exception):
    """Base of store errors; the API maps each subclass to an HTTP status."""


class NotFoundError(StoreError):
    """A collection or item that does not exist (404)."""


class ConflictError(StoreError):
    """Creating something that already exists (409)."""


class InvalidQueryError(StoreError):
    """A search the store cannot run: bad bbox, datetime, CQL2, sortby, token (400)."""


@dataclass(frozen=True)
class SearchQuery:
    """STAC API item-search parameters, already parsed from GET or POST."""

    collections: Sequence[str] | None = None
    ids: Sequence[str] | None = None
    bbox: Sequence[float] | None = None  # 4 or 6 numbers, WGS84
    intersects: dict[str, Any] | None = None  # GeoJSON geometry
    datetime: str | None = None  # RFC 3339 instant or interval "a/b" with ".." for open ends
    filter: dict[str, Any] | str | None = None  # CQL2 JSON (dict) or CQL2 text (str)
    sortby: Sequence[dict[str, str]] | None = None  # [{"field": ..., "direction": "asc"|"desc"}]
    limit: int = 10
    token: str | None = None  # opaque paging token returned by a previous page


@dataclass
class SearchPage:
    """One page of a search: items (dicts), the token of the next page, the match count."""

    items: list[dict[str, Any]]
    next_token: str | None = None
    matched: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredCode:
    """One item's code of one model, as the index needs it."""

    key: ItemKey
    code: bytes  # packed bits, the extension's byte and bit order
    descriptor: bytes | None = None  # float32 little-endian, when the item has one

    @classmethod
    def of(cls, key: ItemKey, code: HashCode) -> StoredCode:
        """What the index takes of the item's ``code``."""
        desc = code.descriptor
        le32 = None if desc is None else desc.array().astype("<f4").tobytes()
        return cls(key, code.packed().tobytes(), le32)


class ItemStore(Protocol):
    """What the API, the ingestion hooks and the index rebuild use of a store."""

    # collections
    def create_collection(self, collection: dict[str, Any]) -> None: ...
    def update_collection(self, collection: dict[str, Any]) -> None: ...
    def delete_collection(self, collection_id: str) -> None: ...
    def get_collection(self, collection_id: str) -> dict[str, Any]: ...
    def all_collections(self) -> list[dict[str, Any]]: ...

    # items (dicts in STAC JSON; ``collection`` names the collection)
    def create_item(self, item: dict[str, Any]) -> None: ...
    def update_item(self, item: dict[str, Any]) -> None: ...
    def upsert_items(self, items: Sequence[dict[str, Any]]) -> None: ...
    def delete_item(self, collection_id: str, item_id: str) -> None: ...
    def get_item(self, collection_id: str, item_id: str) -> dict[str, Any]: ...

    # search
    def search(self, query: SearchQuery) -> SearchPage: ...
    def filter_keys(
        self, query: SearchQuery, keys: Sequence[ItemKey] | None = None
    ) -> list[ItemKey]: ...  # keys matching the query's filters (all matches when keys is None)
    def get_items(self, keys: Sequence[ItemKey]) -> list[dict[str, Any]]: ...  # in keys order

    def property_types(
        self, collection_id: str | None = None
    ) -> dict[str, set[str]]: ...  # property -> JSON types its items hold (for /queryables)

    # codes, for the hash index: of each item having one, its code of ``model`` (at
    # ``version``, when given) as stac_rscbir.extension.cbir.code_of chooses it
    def iter_codes(self, model: str, version: str | None = None) -> Iterator[StoredCode]: ...
    def generation(
        self,
    ) -> int: ...  # grows with every write: an index built at g is stale if g < this
    def changes_since(
        self, generation: int
    ) -> tuple[int, list[ItemKey]] | None: ...  # the change log (CHANGES_KEPT, above)
