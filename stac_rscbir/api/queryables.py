"""The filter extension's queryables: the fields a CQL2 ``filter`` can test, from the items.

``/queryables`` (every collection) and ``/collections/{id}/queryables`` list ``id``,
``collection``, ``geometry`` and the item properties the store holds with scalar values
(string, number, integer, boolean; times as ``date-time`` strings), each with its JSON Schema
type: exactly what both stores' CQL2 evaluation can compare. Object and array properties
(``cbir:codes``, ``cbir:chip``, ``proj:transform``...) are left out: ``=``/``<`` on them means
nothing. The answer is cached per store generation, since building it scans the items.
"""

from __future__ import annotations

import threading
from typing import Any

import attr
from fastapi import Request
from stac_fastapi.extensions.filter.client import BaseFiltersClient
from stac_fastapi.types.requests import get_base_url

from stac_rscbir.api.core import store_errors
from stac_rscbir.store.base import ItemStore

#: Properties whose values are RFC 3339 times (compared as timestamps, not text).
TIME_PROPERTIES = frozenset({"datetime", "start_datetime", "end_datetime", "created", "updated"})
_SCALARS = ("string", "integer", "number", "boolean")
_CORE: dict[str, dict[str, Any]] = {
    "id": {"title": "Item ID", "type": "string"},
    "collection": {"title": "Collection ID", "type": "string"},
    "geometry": {"title": "Item geometry", "$ref": "https://geojson.org/schema/Geometry.json"},
    "datetime": {"title": "Acquired", "type": "string", "format": "date-time"},
}


def property_schema(name: str, types: set[str]) -> dict[str, Any] | None:
    """The JSON Schema of a property holding values of ``types``; None when it holds no scalar
    (a filter cannot compare it)."""
    kinds = [t for t in _SCALARS if t in types]
    if "number" in kinds and "integer" in kinds:
        kinds.remove("integer")
    if not kinds:
        return None
    schema: dict[str, Any] = {"type": kinds[0] if len(kinds) == 1 else kinds}
    if name in TIME_PROPERTIES and kinds == ["string"]:
        schema["format"] = "date-time"
    return schema


@attr.s
class StoreFiltersClient(BaseFiltersClient):
    """Queryables of a store's items (see the module doc)."""

    store: ItemStore = attr.ib(kw_only=True)
    _cache: dict[str | None, tuple[int, dict[str, Any]]] = attr.ib(factory=dict, init=False)
    _lock: threading.Lock = attr.ib(factory=threading.Lock, init=False)

    def properties(self, collection_id: str | None) -> dict[str, Any]:
        """The queryable fields (name -> JSON Schema) of one collection's items, or all items."""
        generation = self.store.generation()
        with self._lock:
            cached = self._cache.get(collection_id)
        if cached is not None and cached[0] == generation:
            return cached[1]
        props = dict(_CORE)
        for name, types in sorted(self.store.property_types(collection_id).items()):
            schema = property_schema(name, types)
            if schema is not None:
                props[name] = {**props.get(name, {}), **schema}
        with self._lock:
            self._cache[collection_id] = (generation, props)
        return props

    @store_errors
    def get_queryables(
        self, collection_id: str | None = None, request: Request | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """The queryables document (JSON Schema) of ``collection_id``, or of every collection."""
        if collection_id is not None:
            self.store.get_collection(collection_id)  # 404 for an unknown collection
        base = get_base_url(request) if request is not None else "/"
        path = f"collections/{collection_id}/queryables" if collection_id else "queryables"
        where = f"collection {collection_id}" if collection_id else "all collections"
        return {
            "$schema": "https://json-schema.org/draft/2019-09/schema",
            "$id": f"{base}{path}",
            "type": "object",
            "title": f"Queryables of {where}",
            "description": "Fields a CQL2 filter can test in item search, from the items held",
            "properties": self.properties(collection_id),
            "additionalProperties": True,
        }
