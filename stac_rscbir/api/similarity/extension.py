"""The similarity search extension: its request fields on /search, its conformance class, and the
``/collections/{collection_id}/items/{item_id}/similar`` route.

The extension holds no search logic: /search requests reach the core client with their
``similarity`` field (POST) or ``similarity_*`` parameters (GET), and the /similar route calls
the core client's one method of :class:`SimilarItemsClient`. Any stac-fastapi core client that
has it can serve the extension: ours (:class:`~stac_rscbir.api.core.StoreCoreClient`) or
stac-fastapi-pgstac's (:mod:`stac_rscbir.api.pgstac_plugin`).
"""

import inspect
from typing import Any, Protocol

import attr
from fastapi import APIRouter, FastAPI, HTTPException, Request
from stac_fastapi.api.routes import create_async_endpoint
from stac_fastapi.types.extension import ApiExtension
from starlette.concurrency import run_in_threadpool

from stac_rscbir.api.similarity.request import (
    ItemRef,
    SimilarItemsRequest,
    SimilarityGetRequest,
    SimilarityPostRequest,
    SimilarityQuery,
    similarity_from_flat,
)
from stac_rscbir.store.base import InvalidQueryError

CONFORMANCE = "https://stac-extensions.github.io/cbir/v1.0.0/similarity-search"


class SimilarItemsClient(Protocol):
    """What the /similar route needs of a core client (its method may be ``async``)."""

    def similar_items(
        self,
        request: Request,
        collection_id: str,
        item_id: str,
        sim: SimilarityQuery,
        collections: list[str] | None,
        limit: int,
        token: str | None,
    ) -> Any: ...


@attr.s
class SimilarityExtension(ApiExtension):
    """The extension: request fields on /search, the /similar endpoint, a conformance class."""

    GET = SimilarityGetRequest
    POST = SimilarityPostRequest
    client: SimilarItemsClient | None = attr.ib(default=None)
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

    async def _similar_items(
        self,
        request: Request,
        collection_id: str,
        item_id: str,
        collections: str | None = None,
        limit: int | None = 10,
        token: str | None = None,
        **params: Any,
    ) -> Any:
        """The ranked list of the item, paged like /search (``limit``, ``next`` links up to k)."""
        if self.client is None:
            raise RuntimeError("SimilarityExtension has no client: give it the core client")
        try:
            sim = similarity_from_flat(params, "", ItemRef(collection=collection_id, id=item_id))
        except InvalidQueryError as exc:
            raise HTTPException(400, str(exc)) from exc
        wanted = [c.strip() for c in (collections or "").split(",") if c.strip()] or None
        args = (request, collection_id, item_id, sim, wanted, limit or 10, token)
        method = self.client.similar_items
        if inspect.iscoroutinefunction(method):
            return await method(*args)
        return await run_in_threadpool(method, *args)
