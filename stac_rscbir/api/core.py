"""stac-fastapi clients over an :class:`~stac_rscbir.store.base.ItemStore`.

The core client answers the STAC API core, collections, features and item search (with the
filter, sort, fields and token pagination extensions); the transactions client writes through
the store and tells its hooks (the live hash indexes), so the index follows every change.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlencode

import attr
from fastapi import HTTPException, Request
from stac_fastapi.extensions.transaction.client import BaseTransactionsClient
from stac_fastapi.types.core import BaseCoreClient
from stac_fastapi.types.errors import NotFoundError as ApiNotFoundError
from stac_fastapi.types.links import CollectionLinks, ItemLinks
from stac_fastapi.types.requests import get_base_url

from stac_rscbir.api.assets import Hrefs
from stac_rscbir.api.similarity import (
    SORTBY_REFUSED,
    SimilarityClient,
    SimilarityQuery,
    StoreCandidates,
    annotate,
    similarity_from_get,
)
from stac_rscbir.store.base import (
    ConflictError,
    InvalidQueryError,
    ItemStore,
    NotFoundError,
    SearchPage,
    SearchQuery,
)
from stac_rscbir.store.items import parse_bbox
from stac_rscbir.store.models import check_item_codes

# (collection, item or None when deleted, item id; "*": the collection was deleted, "": the
# collection itself was written and no item changed)
ItemHook = Callable[[str, dict[str, Any] | None, str], None]


def store_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Map store errors to HTTP errors: 404, 409, 400 with the store's message."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except NotFoundError as exc:
            raise ApiNotFoundError(str(exc)) from exc
        except ConflictError as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from exc
        except (InvalidQueryError, ValueError) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc

    return wrapper


def _dump(value: Any) -> Any:
    """Pydantic models (geometries, sort models, items) to plain JSON values."""
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", exclude_none=True, by_alias=True)
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    return value


def _body(value: Any, what: str) -> dict[str, Any]:
    """A request body as a dict; 400 naming what it should be when missing or not an object."""
    data = _dump(value)
    if not isinstance(data, dict):
        raise HTTPException(400, f"the request body must be {what} (a JSON object)")
    return data


def _check_rings(geometry: Any) -> None:
    """Polygon rings closed and of 4+ positions (shapely closes an open ring without a word)."""
    if not isinstance(geometry, dict):
        return
    kind, coords = geometry.get("type"), geometry.get("coordinates")
    if kind == "GeometryCollection":
        for part in geometry.get("geometries") or []:
            _check_rings(part)
        return
    polygons = {"Polygon": [coords], "MultiPolygon": coords}.get(kind) or []
    for polygon in polygons if isinstance(polygons, list) else []:
        for ring in polygon if isinstance(polygon, list) else []:
            if isinstance(ring, list) and (len(ring) < 4 or ring[0] != ring[-1]):
                raise InvalidQueryError(
                    "intersects is not a valid geometry: a polygon ring must have at least 4 "
                    f"positions and the same start and end, got {json.dumps(ring)[:200]}"
                )


def _check_lonlat(bounds: tuple[float, float, float, float], field: str) -> None:
    """400 unless the bounds (minx, miny, maxx, maxy) are WGS84 longitudes and latitudes: a
    longitude of 1e308 is finite, and matched nothing without a word."""
    minx, miny, maxx, maxy = bounds
    for name, value, limit in (
        ("longitude", minx, 180),
        ("latitude", miny, 90),
        ("longitude", maxx, 180),
        ("latitude", maxy, 90),
    ):
        if not -limit <= value <= limit:
            raise InvalidQueryError(
                f"{field}: {name} {value!r} is outside [-{limit}, {limit}] (WGS84 degrees)"
            )


def _check_geometry(geometry: Any) -> None:
    """400 naming the problem when ``intersects`` is not a valid (OGC simple features) geometry:
    a self-intersecting ring, an unclosed or too short ring, a NaN coordinate..."""
    from shapely.geometry import shape
    from shapely.validation import explain_validity

    if not isinstance(geometry, dict):
        raise InvalidQueryError("intersects must be a GeoJSON geometry object")
    _check_rings(geometry)
    try:
        geom = shape(geometry)
    except Exception as exc:  # shapely's errors on malformed GeoJSON vary by geometry type
        raise InvalidQueryError(f"intersects is not a valid GeoJSON geometry: {exc}") from exc
    if geom.is_empty:
        raise InvalidQueryError("intersects is an empty geometry")
    if not geom.is_valid:
        raise InvalidQueryError(f"intersects is not a valid geometry: {explain_validity(geom)}")
    _check_lonlat(geom.bounds, "intersects")


def query_from_request(search: Any) -> SearchQuery:
    """A :class:`SearchQuery` from a POST search model (pydantic) or a dict of GET params."""
    get = search.get if isinstance(search, dict) else lambda k, d=None: getattr(search, k, d)
    filt = get("filter_expr") if get("filter_expr") is not None else get("filter")
    if isinstance(filt, str) and get("filter_lang") == "cql2-json":
        try:
            filt = json.loads(filt)
        except json.JSONDecodeError as exc:
            raise InvalidQueryError(f"filter is not valid CQL2 JSON: {exc}") from exc
    intersects = get("intersects")
    if isinstance(intersects, str):  # GET: the geometry as GeoJSON text
        try:
            intersects = json.loads(intersects)
        except json.JSONDecodeError as exc:
            raise InvalidQueryError(f"intersects is not valid GeoJSON: {exc}") from exc
    intersects = _dump(intersects)
    if intersects is not None:
        _check_geometry(intersects)
    if intersects is not None and get("bbox"):
        raise InvalidQueryError("bbox and intersects cannot be used together: give one of them")
    if get("bbox"):
        _check_lonlat(parse_bbox(get("bbox")), "bbox")
    sortby = get("sortby")
    if sortby and isinstance(sortby[0], str):  # GET: "+field,-field"
        sortby = [
            {"field": s.lstrip("+-"), "direction": "desc" if s.startswith("-") else "asc"}
            for s in sortby
        ]
    return SearchQuery(
        collections=get("collections"),
        ids=get("ids"),
        bbox=list(get("bbox")) if get("bbox") else None,
        intersects=intersects,
        datetime=get("datetime"),
        filter=_dump(filt),
        sortby=_dump(sortby),
        limit=int(get("limit") or 10),
        token=get("token"),
    )


def apply_fields(item: dict[str, Any], fields: Any) -> dict[str, Any]:
    """The fields extension: keep ``include`` (dotted paths) and drop ``exclude``."""
    if not fields:
        return item
    include = set(getattr(fields, "include", None) or [])
    exclude = set(getattr(fields, "exclude", None) or [])
    if isinstance(fields, list):  # GET: ["a", "-b"]
        include = {f.lstrip("+") for f in fields if not f.startswith("-")}
        exclude = {f[1:] for f in fields if f.startswith("-")}
    out = item
    if include:
        out = {k: item[k] for k in ("type", "stac_version", "id", "links") if k in item}
        for path in include | {"collection"}:
            _copy_path(item, out, path.split("."))
    for path in exclude - include:
        _drop_path(out, path.split("."))
    return out


def _copy_path(src: dict[str, Any], dst: dict[str, Any], parts: list[str]) -> None:
    if parts[0] not in src:
        return
    if len(parts) == 1:
        dst[parts[0]] = src[parts[0]]
    elif isinstance(src[parts[0]], dict):
        _copy_path(src[parts[0]], dst.setdefault(parts[0], {}), parts[1:])


def _drop_path(d: dict[str, Any], parts: list[str]) -> None:
    if len(parts) == 1:
        d.pop(parts[0], None)
    elif isinstance(d.get(parts[0]), dict):
        _drop_path(d[parts[0]], parts[1:])


def item_links(item: dict[str, Any], base_url: str, hrefs: Hrefs) -> dict[str, Any]:
    """The item with the API's own links (self, parent, collection, root), and its other
    links and assets as ``hrefs`` serves them (only hrefs a client can follow)."""
    inferred = ItemLinks(item["collection"], base_url, item["id"]).create_links()
    item = hrefs.item(item, base_url)
    item["links"] = inferred + item["links"]
    return item


@attr.s
class StoreCoreClient(BaseCoreClient):
    """Core, collections, features and item search over a store."""

    store: ItemStore = attr.ib(kw_only=True)
    similarity: SimilarityClient | None = attr.ib(default=None, kw_only=True)
    hrefs: Hrefs = attr.ib(factory=Hrefs, kw_only=True)  # which stored links/assets are served

    @store_errors
    def all_collections(self, request: Request, **kwargs: Any) -> dict[str, Any]:
        base = get_base_url(request)
        collections = [self._collection(c, base) for c in self.store.all_collections()]
        links = [
            {"rel": "root", "type": "application/json", "href": base},
            {"rel": "parent", "type": "application/json", "href": base},
            {"rel": "self", "type": "application/json", "href": f"{base}collections"},
        ]
        return {"collections": collections, "links": links}

    def _collection(self, collection: dict[str, Any], base: str) -> dict[str, Any]:
        collection = dict(collection)
        cid = collection["id"]
        inferred = CollectionLinks(cid, base).create_links()
        titles = {
            "self": f"Collection {cid}",
            "parent": "Landing page",
            "root": "Landing page",
            "items": f"Items of collection {cid}",
        }
        for link in inferred:  # best practice (stac-check): every collection link has a title
            link.setdefault("title", titles.get(link["rel"], link["rel"]))
        collection = self.hrefs.collection(collection, base)
        collection["links"] = inferred + collection["links"]
        return collection

    @store_errors
    def get_collection(self, collection_id: str, request: Request, **kwargs: Any) -> dict:
        return self._collection(self.store.get_collection(collection_id), get_base_url(request))

    @store_errors
    def get_item(self, item_id: str, collection_id: str, request: Request, **kwargs: Any) -> dict:
        item = self.store.get_item(collection_id, item_id)
        return item_links(item, get_base_url(request), self.hrefs)

    @store_errors
    def item_collection(
        self,
        collection_id: str,
        request: Request,
        bbox: list[float] | None = None,
        datetime: str | None = None,
        limit: int = 10,
        token: str | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        self.store.get_collection(collection_id)  # 404 for an unknown collection
        params = {"bbox": bbox, "datetime": datetime, "limit": limit, "token": token, **kwargs}
        query = query_from_request({**params, "collections": [collection_id]})
        return self._page(self.store.search(query), request, "GET", params, query)

    @store_errors
    def post_search(self, search_request: Any, request: Request, **kwargs: Any) -> dict:
        query = query_from_request(search_request)
        body = search_request.model_dump(mode="json", exclude_none=True, by_alias=True)
        page = self._search(query, getattr(search_request, "similarity", None))
        return self._page(
            page, request, "POST", body, query, getattr(search_request, "fields", None)
        )

    @store_errors
    def get_search(self, request: Request, **kwargs: Any) -> dict[str, Any]:
        params = {k: v for k, v in kwargs.items() if v is not None}
        query = query_from_request(params)
        page = self._search(query, similarity_from_get(params))
        return self._page(page, request, "GET", params, query, params.get("fields"))

    @store_errors
    def similar_items(
        self,
        request: Request,
        collection_id: str,
        item_id: str,
        sim: SimilarityQuery,
        collections: list[str] | None,
        limit: int,
        token: str | None,
    ) -> dict[str, Any]:
        """The /similar route of the similarity extension: /search's ranked pages."""
        query = SearchQuery(limit=limit, token=token, collections=collections)
        return self._page(self._search(query, sim), request, "GET", {}, query)

    def _search(self, query: SearchQuery, sim: SimilarityQuery | None) -> SearchPage:
        """The store's page of ``query``, or with ``sim`` a page of its ranked list over the
        candidates ``query`` selects, each item annotated with its distance."""
        if sim is None:
            return self.store.search(query)
        if self.similarity is None:
            raise InvalidQueryError("this server has no similarity search")
        if query.sortby:
            raise InvalidQueryError(SORTBY_REFUSED)
        ranked = self.similarity.page(
            sim, StoreCandidates(self.store, query), query.limit, query.token
        )
        found = {
            (i["collection"], i["id"]): i
            for i in self.store.get_items([hit.key for hit in ranked.hits])
        }
        items = [annotate(found[hit.key], hit) for hit in ranked.hits if hit.key in found]
        return SearchPage(
            items, ranked.next_token, ranked.matched, extra={"cbir:similarity": ranked.info}
        )

    def _page(
        self,
        page: SearchPage,
        request: Request,
        method: str,
        params: dict[str, Any],
        query: SearchQuery,
        fields: Any = None,
    ) -> dict[str, Any]:
        """An ItemCollection with self/root and, when there is more, a next link."""
        base = get_base_url(request)
        features = [apply_fields(item_links(i, base, self.hrefs), fields) for i in page.items]
        url = str(request.url).split("?")[0]
        links: list[dict[str, Any]] = [
            {"rel": "root", "type": "application/json", "href": base},
            {"rel": "self", "type": "application/geo+json", "href": str(request.url)},
        ]
        if page.next_token:
            if method == "POST":
                body = {**params, "token": page.next_token}
                links.append(
                    {
                        "rel": "next",
                        "type": "application/geo+json",
                        "href": url,
                        "method": "POST",
                        "body": body,
                    }
                )
            else:
                args = {**_flat(request.query_params.multi_items()), "token": page.next_token}
                links.append(
                    {
                        "rel": "next",
                        "type": "application/geo+json",
                        "href": f"{url}?{urlencode(args)}",
                    }
                )
        out: dict[str, Any] = {"type": "FeatureCollection", "features": features, "links": links}
        out["numberReturned"] = len(features)
        if page.matched is not None:
            out["numberMatched"] = page.matched
        out.update(page.extra)
        return out


def _flat(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in pairs:
        out[k] = f"{out[k]},{v}" if k in out and k != "token" else v
    return out


@attr.s
class StoreTransactionsClient(BaseTransactionsClient):
    """Transactions through the store; ``on_item`` hooks run after each committed write,
    before it is acknowledged (the live indexes follow the store's change log there, so a
    search after the answer sees the write)."""

    store: ItemStore = attr.ib(kw_only=True)
    on_item: list[ItemHook] = attr.ib(factory=list, kw_only=True)
    hrefs: Hrefs = attr.ib(factory=Hrefs, kw_only=True)  # the serving rule, undone on writes

    def _notify(self, collection_id: str, item: dict[str, Any] | None, item_id: str) -> None:
        for hook in self.on_item:
            hook(collection_id, item, item_id)

    def _items(
        self, collection_id: str, item: Any, request: Request | None
    ) -> list[dict[str, Any]]:
        data = _body(item, "a STAC Item or an ItemCollection")
        items = data["features"] if data.get("type") == "FeatureCollection" else [data]
        declared: dict[str, Any] = {}  # the collection's cbir:models, read once
        for i in items:
            if i.get("collection", collection_id) != collection_id:
                raise HTTPException(
                    400,
                    f"item {i.get('id')!r} names collection {i['collection']!r}, "
                    f"the path says {collection_id!r}",
                )
            i["collection"] = collection_id
            check_item_codes(self.store, i, declared)
            if request is not None:  # an item read from this API keeps its stored hrefs
                self.hrefs.taken_back(i, get_base_url(request), functools.partial(self._stored, i))
        return items

    def _stored(self, item: dict[str, Any]) -> dict[str, Any] | None:
        try:
            return self.store.get_item(str(item["collection"]), str(item.get("id")))
        except NotFoundError:
            return None

    @store_errors
    def create_item(self, collection_id: str, item: Any, **kwargs: Any) -> dict | None:
        items = self._items(collection_id, item, kwargs.get("request"))
        if len(items) == 1:
            self.store.create_item(items[0])
        else:
            self.store.upsert_items(items)
        for i in items:
            self._notify(collection_id, i, i["id"])
        return items[0] if len(items) == 1 else None

    @store_errors
    def update_item(self, collection_id: str, item_id: str, item: Any, **kwargs: Any) -> dict:
        (data,) = self._items(collection_id, item, kwargs.get("request"))
        if data.get("id", item_id) != item_id:
            raise HTTPException(400, f"item id {data['id']!r} differs from the path's {item_id!r}")
        self.store.update_item(data)
        self._notify(collection_id, data, item_id)
        return data

    def patch_item(self, collection_id: str, item_id: str, patch: Any, **kwargs: Any) -> Any:
        raise HTTPException(405, "PATCH is not supported: PUT the whole item")

    @store_errors
    def delete_item(self, item_id: str, collection_id: str, **kwargs: Any) -> None:
        self.store.delete_item(collection_id, item_id)
        self._notify(collection_id, None, item_id)

    @store_errors
    def create_collection(self, collection: Any, **kwargs: Any) -> dict:
        data = _body(collection, "a STAC Collection")
        self.store.create_collection(data)
        self._notify(data["id"], None, "")
        return data

    @store_errors
    def update_collection(self, collection_id: str, collection: Any, **kwargs: Any) -> dict:
        data = _body(collection, "a STAC Collection")
        if data.get("id") != collection_id:
            raise HTTPException(400, f"collection id {data.get('id')!r} differs from the path's")
        self.store.update_collection(data)
        self._notify(collection_id, None, "")
        return data

    def patch_collection(self, collection_id: str, patch: Any, **kwargs: Any) -> Any:
        raise HTTPException(405, "PATCH is not supported: PUT the whole collection")

    @store_errors
    def delete_collection(self, collection_id: str, **kwargs: Any) -> None:
        self.store.delete_collection(collection_id)
        self._notify(collection_id, None, "*")
