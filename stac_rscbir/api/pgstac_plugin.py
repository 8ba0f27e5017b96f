"""Similarity search as a plugin of the stock stac-fastapi-pgstac application (the eoAPI way).

stac-fastapi-pgstac keeps answering everything: its ``CoreCrudClient``, settings, lifespan and
pools, middlewares and extensions are left as they are. The plugin adds

- :class:`SimilarityCoreClient`, a ``CoreCrudClient`` whose searches without ``similarity`` run
  stac-fastapi-pgstac's own code untouched (byte-for-byte the same responses). With
  ``similarity`` (POST body, GET ``similarity_*`` parameters, the /similar route) the request's
  filters are given to pgstac as the request's own search body (``pgstac.stac_search_to_where``:
  pgstac's semantics of bbox, intersects, datetime, CQL2, ``query``, collections, ids), the hash
  index ranks those candidates, and the page's items come from stac-fastapi-pgstac's own search
  path (``_search_base``: hydration, ``fields``, item links), in rank order, with
  ``cbir:distance``;
- :class:`~stac_rscbir.api.similarity.SimilarityExtension` among the search extensions (its
  conformance class, the ``similarity`` request fields, the /similar route);
- a lifespan doing what stac-fastapi-pgstac's does (its connection pools) plus opening the
  similarity indexes over a :class:`~stac_rscbir.store.pgstac.PgstacStore` on the same database
  (with their follower thread), and saving their pending writes on shutdown;
- ``GET /_mgmt/indexes`` (:mod:`stac_rscbir.api.mgmt`).

Index upkeep: writes through stac-fastapi-pgstac's Transactions (or ``pypgstac load``, or SQL)
fire the store's generation triggers (installed by ``PgstacStore`` on first use), which log the
items each write touched; the follower thread, and a search that finds the store ahead of its
index, apply those items to it (:class:`~stac_rscbir.index.live.LiveIndexes`, rebuilding only
when the log does not reach back).

Run it with stac-fastapi-pgstac's environment (PGHOST, PGUSER, PGPASSWORD, PGDATABASE, PGPORT,
ENABLED_EXTENSIONS, ENABLE_TRANSACTIONS_EXTENSIONS...) plus RSCBIR_INDEX_DIR, RSCBIR_MODELS
(``model-id=/checkpoint,...``, for image queries) and RSCBIR_MAX_K::

    uvicorn stac_rscbir.api.pgstac_plugin:create_app --factory

Importing this module does not import torch (only an image query loads a model).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import attr
from fastapi import FastAPI, HTTPException, Request
from pydantic import BeforeValidator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from stac_fastapi.api.app import StacApi
from stac_fastapi.pgstac.app import instantiate_api
from stac_fastapi.pgstac.config import PostgresSettings, Settings
from stac_fastapi.pgstac.core import CoreCrudClient
from stac_fastapi.pgstac.db import close_db_connection, connect_to_db
from stac_fastapi.pgstac.models.extensions import Extensions
from stac_fastapi.pgstac.models.links import PagingLinks, merge_params
from stac_fastapi.pgstac.types.search import PgstacSearch
from stac_pydantic.links import Relations
from stac_pydantic.shared import MimeTypes
from starlette.concurrency import run_in_threadpool

from stac_rscbir.api.core import store_errors
from stac_rscbir.api.mgmt import install_mgmt
from stac_rscbir.api.similarity import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_K,
    SORTBY_REFUSED,
    RankedHit,
    SimilarityClient,
    SimilarityExtension,
    SimilarityQuery,
    annotate,
    similarity_from_get,
)
from stac_rscbir.index.live import LiveIndexes
from stac_rscbir.store.base import ItemKey

if TYPE_CHECKING:
    from stac_rscbir.store.pgstac import PgstacStore

__all__ = [
    "PgstacCandidates",
    "PluginSettings",
    "SimilarityCoreClient",
    "create_app",
    "instantiate_similarity_api",
    "search_filters",
]

EXTENSION_KEY = "similarity"  # the plugin's name in ENABLED_EXTENSIONS
# what a search body holds besides its filters: paging, presentation, pgstac's run settings
NOT_FILTERS = ("limit", "token", "fields", "sortby", "conf", "similarity")
# the body fields that select items (without any, every item is a candidate)
SELECTING = ("collections", "ids", "bbox", "intersects", "datetime", "filter", "query", "q")


def search_filters(search: PgstacSearch) -> dict[str, Any]:
    """The filters of a search request as a pgstac search body: the request dumped as
    stac-fastapi-pgstac dumps it for ``pgstac.search``, without paging and presentation."""
    body = json.loads(search.model_dump_json(exclude_none=True, by_alias=True))
    return {k: v for k, v in body.items() if k not in NOT_FILTERS}


@dataclass(frozen=True)
class PgstacCandidates:
    """The candidates of a similarity search: the items pgstac's WHERE clause of the request's
    filters selects (:meth:`~stac_rscbir.store.pgstac.PgstacStore.keys_matching`)."""

    store: PgstacStore
    body: dict[str, Any]

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.body

    def keys(self) -> list[ItemKey] | None:
        if not any(self.body.get(k) not in (None, [], "") for k in SELECTING):
            return None
        return self.store.keys_matching(self.body)


@attr.s
class SimilarityPagingLinks(PagingLinks):
    """stac-fastapi-pgstac's paging links (self, root), with a ``next`` link that carries the
    similarity paging token as it is (pgstac's own tokens get a ``next:`` prefix)."""

    def link_next(self) -> dict[str, Any] | None:
        if self.next is None:
            return None
        link = {"rel": Relations.next.value, "type": MimeTypes.geojson.value}
        if self.request.method == "POST":
            return {
                **link,
                "method": "POST",
                "href": self.url,
                "body": {**self._body, "token": self.next},
            }
        return {**link, "method": "GET", "href": merge_params(self.url, {"token": self.next})}


@attr.s
class SimilarityCoreClient(CoreCrudClient):
    """stac-fastapi-pgstac's core client, with similarity search.

    Its own methods answer every request; only the pgstac search of a request carrying
    ``similarity`` (``_search_base``) is replaced by a ranked page, and GET ``similarity_*``
    parameters become the request's ``similarity`` object (``_clean_search_args``). So /search
    and the /similar route keep stac-fastapi-pgstac's links, ``fields`` and responses.
    ``similarity`` is set by the app's lifespan (:func:`instantiate_similarity_api`).
    """

    similarity: SimilarityClient | None = attr.ib(default=None, kw_only=True)

    def _similarity(self) -> SimilarityClient:
        if self.similarity is None:
            raise HTTPException(503, "similarity search is not started (the app's lifespan)")
        return self.similarity

    def _clean_search_args(self, base_args: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        """stac-fastapi-pgstac's GET arguments, plus ``similarity`` from ``similarity_*``."""
        clean = super()._clean_search_args(base_args, **kwargs)
        if any(k.startswith("similarity_") and v is not None for k, v in kwargs.items()):
            params = {k: v for k, v in kwargs.items() if v is not None}
            clean["similarity"] = store_errors(similarity_from_get)(params)
        return clean

    async def _search_base(self, search_request: PgstacSearch, request: Request) -> Any:
        """pgstac's search; a ranked page when the request carries ``similarity``."""
        sim = getattr(search_request, "similarity", None)
        if sim is None:
            return await super()._search_base(search_request, request)
        if getattr(search_request, "sortby", None):
            raise HTTPException(400, SORTBY_REFUSED)
        client = self._similarity()
        candidates = PgstacCandidates(client.store, search_filters(search_request))
        limit = search_request.limit or 10
        page = await run_in_threadpool(
            store_errors(client.page), sim, candidates, limit, search_request.token
        )
        features = await self._hydrate(search_request, page.hits, request)
        links = await SimilarityPagingLinks(request=request, next=page.next_token).get_links()
        return {
            "type": "FeatureCollection",
            "features": features,
            "links": links,
            "numberMatched": page.matched,
            "numberReturned": len(features),
            "cbir:similarity": page.info,
        }

    async def _hydrate(
        self, search_request: PgstacSearch, hits: list[RankedHit], request: Request
    ) -> list[dict[str, Any]]:
        """The hits' items through stac-fastapi-pgstac's own search (one per collection, the
        request's ``fields`` kept), in rank order and annotated; items gone since are left
        out. ``id`` and ``collection`` are fetched even when ``fields`` excludes them (to
        match the hits), then removed."""
        fields = getattr(search_request, "fields", None)
        hidden: set[str] = set()
        if fields is not None and fields.exclude:
            hidden = {"id", "collection"} & set(fields.exclude)
            fields = fields.model_copy(update={"exclude": set(fields.exclude) - hidden})
        by_collection: dict[str, list[str]] = {}
        for hit in hits:
            by_collection.setdefault(hit.key[0], []).append(hit.key[1])
        found: dict[ItemKey, dict[str, Any]] = {}
        for collection, ids in by_collection.items():
            args: dict[str, Any] = {"collections": [collection], "ids": ids, "limit": len(ids)}
            if fields is not None:
                args["fields"] = fields
            page = await super()._search_base(self.pgstac_search_model(**args), request)
            for item in page["features"]:
                found[(item.get("collection") or collection, item["id"])] = item
        out = []
        for hit in hits:
            item = found.get(hit.key)
            if item is not None:
                for key in hidden:
                    item.pop(key, None)
                out.append(annotate(item, hit))
        return out

    async def similar_items(
        self,
        request: Request,
        collection_id: str,
        item_id: str,
        sim: SimilarityQuery,
        collections: list[str] | None,
        limit: int,
        token: str | None,
    ) -> dict[str, Any]:
        """GET /collections/{c}/items/{i}/similar: the item's ranked list over ``collections``
        (all when None), paged like /search (``next`` links carry the token)."""
        args: dict[str, Any] = {"limit": limit, "token": token, "similarity": sim}
        if collections:
            args["collections"] = collections
        return await self._search_base(self.pgstac_search_model(**args), request)


def _with_similarity(settings: Settings) -> Settings:
    """``settings`` whose ENABLED_EXTENSIONS (when given) also names the plugin."""
    enabled = settings.enabled_extensions
    if enabled is None or EXTENSION_KEY in enabled:
        return settings
    return settings.model_copy(update={"enabled_extensions": [*enabled, EXTENSION_KEY]})


def instantiate_similarity_api(
    *,
    index_dir: Path,
    models: dict[str, Path] | None = None,
    settings: Settings | None = None,
    extensions: Extensions | None = None,
    postgres_settings: PostgresSettings | None = None,
    client: Callable[..., SimilarityCoreClient] = SimilarityCoreClient,
    max_k: int = MAX_K,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> StacApi:
    """stac-fastapi-pgstac's API (``instantiate_api``) with similarity search.

    ``settings`` and ``extensions`` are stac-fastapi-pgstac's (from its environment when None);
    the similarity extension joins the search extensions (and ENABLED_EXTENSIONS, when that
    lists them). ``postgres_settings`` (PGHOST, PGUSER... when None) serve both
    stac-fastapi-pgstac's pools and the store the indexes are built from. ``index_dir`` holds
    the hash indexes (derived data: rebuilt from the database when missing), ``models`` maps
    model ids to checkpoints for image queries; ``max_k``, ``max_image_bytes`` and
    ``max_image_pixels`` cap ``similarity.k`` and uploaded images (400/413 beyond).
    """
    settings = _with_similarity(settings or Settings())
    similarity = SimilarityExtension()
    if extensions is None:
        extensions = Extensions(settings=settings, search_map={EXTENSION_KEY: similarity})
    else:
        extensions = dataclasses.replace(
            extensions,
            search_map={**extensions.search_map, EXTENSION_KEY: similarity},
            settings=_with_similarity(extensions.settings),
        )
    writes = bool(extensions.transaction)
    api: StacApi | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """stac-fastapi-pgstac's pools, and the similarity indexes over the same database."""
        pg = postgres_settings or PostgresSettings()  # type: ignore[call-arg]
        await connect_to_db(app, postgres_settings=pg, add_write_connection_pool=writes)
        try:
            service = await run_in_threadpool(
                _similarity_client,
                pg.connection_string,
                index_dir,
                models,
                max_k=max_k,
                max_image_bytes=max_image_bytes,
                max_image_pixels=max_image_pixels,
            )
            assert api is not None
            api.client.similarity = service  # type: ignore[attr-defined]
            try:
                yield
            finally:
                api.client.similarity = None  # type: ignore[attr-defined]
                await run_in_threadpool(service.indexes.close)  # saves pending index writes
                service.store.close()
        finally:
            await close_db_connection(app)

    api = instantiate_api(
        client=client,  # type: ignore[arg-type]
        extensions=extensions,
        lifespan=lifespan,
        settings=settings,
    )
    similarity.client = api.client
    install_mgmt(api.app, lambda: _indexes_of(api))
    return api


def _indexes_of(api: StacApi | None) -> LiveIndexes | None:
    """The live indexes of the plugin app (None before its lifespan started them)."""
    service = getattr(api.client, "similarity", None) if api is not None else None
    return None if service is None else service.indexes


def _similarity_client(
    dsn: str, index_dir: Path, models: dict[str, Path] | None, **limits: Any
) -> SimilarityClient:
    """A similarity client over a PgstacStore on ``dsn``, its indexes open."""
    from stac_rscbir.store.pgstac import PgstacStore

    service = SimilarityClient(PgstacStore(dsn), Path(index_dir), models, **limits)
    service.indexes.open()
    return service


def _models(value: Any) -> Any:
    """RSCBIR_MODELS: ``id=/path,id2=/path2`` to a dict (a dict is kept)."""
    if not isinstance(value, str):
        return value
    out = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        model, sep, path = part.partition("=")
        if not sep or not model.strip() or not path.strip():
            raise ValueError(f"RSCBIR_MODELS: expected `model-id=/checkpoint,...`, got {part!r}")
        out[model.strip()] = path.strip()
    return out


class PluginSettings(BaseSettings):
    """The plugin's environment: RSCBIR_INDEX_DIR, RSCBIR_MODELS, RSCBIR_MAX_K."""

    model_config = SettingsConfigDict(env_prefix="RSCBIR_", extra="ignore")

    index_dir: Path
    models: Annotated[dict[str, Path], NoDecode, BeforeValidator(_models)] = {}
    max_k: int = MAX_K


def create_app() -> FastAPI:
    """The app of ``uvicorn stac_rscbir.api.pgstac_plugin:create_app --factory``, configured by
    stac-fastapi-pgstac's environment and the plugin's (:class:`PluginSettings`)."""
    plugin = PluginSettings()  # type: ignore[call-arg]
    return instantiate_similarity_api(
        index_dir=plugin.index_dir, models=plugin.models, max_k=plugin.max_k
    ).app
