"""The app factory: stac-fastapi core + filter, sort, fields, pagination, transactions and the
similarity extension, over the embedded SQLite store (default).

Writes: ``create_api`` keeps the Transactions endpoints open unless given ``write_token`` (then
each one needs ``Authorization: Bearer <token>`` or ``X-API-Key: <token>``, else 401) or
``transactions=False`` (no Transactions endpoints at all). The ``stac-rscbir serve`` command is
stricter: without ``--write-token`` or ``--allow-anonymous-writes`` it serves read-only.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attr
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import model_validator
from stac_fastapi.api.app import StacApi
from stac_fastapi.api.models import (
    ItemCollectionUri,
    create_get_request_model,
    create_post_request_model,
    create_request_model,
)
from stac_fastapi.extensions import (
    FieldsExtension,
    FilterExtension,
    SortExtension,
    TokenPaginationExtension,
    TransactionExtension,
)
from stac_fastapi.types.config import ApiSettings
from stac_fastapi.types.search import BaseSearchPostRequest
from starlette.middleware import Middleware

from stac_rscbir import __version__
from stac_rscbir.api.assets import AssetsExtension, Hrefs
from stac_rscbir.api.core import StoreCoreClient, StoreTransactionsClient
from stac_rscbir.api.errors import error_response, install_error_handlers
from stac_rscbir.api.mgmt import install_mgmt
from stac_rscbir.api.openapi import install_openapi
from stac_rscbir.api.queryables import StoreFiltersClient
from stac_rscbir.api.similarity import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_K,
    SimilarityClient,
    SimilarityExtension,
)
from stac_rscbir.api.viewer import mount_viewer
from stac_rscbir.extras import require
from stac_rscbir.index.live import LiveIndexes
from stac_rscbir.store.base import ItemStore


class SearchPostBody(BaseSearchPostRequest):
    """The POST /search body; stac-pydantic's own validators assume a JSON object."""

    @model_validator(mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("the search body must be a JSON object")
        return value


DESCRIPTION = "STAC API with query-by-example over deep hash codes (cbir extension)"


def _out_of_range(request: Request, exc: Exception) -> JSONResponse:
    """400 for values the parsers cannot represent (e.g. year 1 at UTC+14), not a 500."""
    return error_response(400, f"a value in the request is out of range: {exc}", "OutOfRange")


MAX_BODY_BYTES = 64 * 1024 * 1024  # default cap on a request body (create_api(max_body_bytes=))


def write_guard(token: str) -> Callable[..., Awaitable[None]]:
    """A dependency that lets a request through only with ``token``, as a bearer token or an
    ``X-API-Key`` header (compared in constant time); 401 otherwise."""
    if not token:
        raise ValueError("the write token must not be empty")
    expected = token.encode()
    bearer = HTTPBearer(
        auto_error=False,
        scheme_name="WriteToken",
        description="Transactions need the server's write token: `Authorization: Bearer <token>`.",
    )
    api_key = APIKeyHeader(
        name="X-API-Key",
        auto_error=False,
        scheme_name="WriteApiKey",
        description="Or the write token in the `X-API-Key` header.",
    )

    async def require_write_token(
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),  # noqa: B008
        key: str | None = Depends(api_key),
    ) -> None:
        given = credentials.credentials if credentials is not None else key
        if given is None or not hmac.compare_digest(given.encode(), expected):
            raise HTTPException(
                401,
                "this server needs its write token for Transactions: send "
                "`Authorization: Bearer <token>` or `X-API-Key: <token>`"
                if given is None
                else "the write token is wrong",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_write_token


class BodySizeLimit:
    """ASGI middleware: 413 for a request body over ``max_bytes``, declared (Content-Length) or
    streamed (chunked: reading stops at the cap and the app's answer is replaced by the 413)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _response(self) -> JSONResponse:
        return error_response(
            413, f"the request body is over this server's limit, {self.max_bytes} bytes"
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._response()(scope, receive, send)
            return
        seen = 0
        over = False

        async def counted_receive() -> Any:
            nonlocal seen, over
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    over = True
                    raise ValueError("request body too large")
            return message

        async def guarded_send(message: Any) -> None:
            if not over:
                await send(message)
            elif message["type"] == "http.response.start":
                response = self._response()
                await send(
                    {"type": "http.response.start", "status": 413, "headers": response.raw_headers}
                )
                await send({"type": "http.response.body", "body": response.body})

        await self.app(scope, counted_receive, guarded_send)


def create_api(
    store: ItemStore,
    index_dir: Path,
    models: dict[str, Path] | None = None,
    title: str = "stac-rscbir",
    encode_with: Path | None = None,
    *,
    write_token: str | None = None,
    transactions: bool = True,
    max_k: int = MAX_K,
    max_image_bytes: int = MAX_IMAGE_BYTES,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    max_body_bytes: int = MAX_BODY_BYTES,
    asset_roots: Sequence[Path] = (),
    viewer_basemap: str | None = None,
) -> StacApi:
    """A STAC API over ``store`` whose /search also ranks by similarity (hash codes).

    ``models`` maps model ids to checkpoints (for image queries); with ``encode_with`` (a
    checkpoint), items added through the Transactions endpoints are encoded in the background
    (``app.state.encode_queue``) and the hash index follows (that needs the ``ml`` and
    ``ingest`` extras: :class:`~stac_rscbir.extras.MissingExtraError` without them).

    Writes: with ``write_token``, every Transactions endpoint needs ``Authorization: Bearer
    <token>`` or ``X-API-Key: <token>`` (401 otherwise; reads stay open); with
    ``transactions=False`` there are no Transactions endpoints (nor their conformance class).
    The defaults keep them open to anyone, as a library embedded in a trusted process wants;
    ``stac-rscbir serve`` instead starts read-only unless given a token or told otherwise.

    Limits (400/413 beyond them): ``max_k`` on ``similarity.k``, ``max_image_bytes`` and
    ``max_image_pixels`` (width x height x bands, from the header, before reading pixels) on an
    uploaded query image, ``max_body_bytes`` on any request body.

    Served items and collections only carry hrefs a client can follow
    (:mod:`stac_rscbir.api.assets`): local asset files under ``asset_roots`` are served by the
    API (and chip thumbnails rendered from them), other local assets and relative links are
    left out.

    The visual search page is served at ``/viewer/`` (:mod:`stac_rscbir.api.viewer`), over the
    XYZ tiles of ``viewer_basemap`` when given.
    """
    settings = ApiSettings(
        enable_response_models=False,
        stac_fastapi_title=title,
        stac_fastapi_description=DESCRIPTION,
        stac_fastapi_landing_id="stac-rscbir",
        stac_fastapi_version=__version__,
    )
    similarity = SimilarityClient(
        store,
        index_dir,
        models,
        max_k=max_k,
        max_image_bytes=max_image_bytes,
        max_image_pixels=max_image_pixels,
    )
    indexes = similarity.indexes
    hooks: list = [indexes.on_item]
    encode_queue = None
    if encode_with is not None and transactions:
        require("encoding items as they are written (encode_with)", "ml", "ingest")
        from stac_rscbir.ingest.hooks import EncodeQueue
        from stac_rscbir.ingest.worker import IngestOptions, Ingestor

        ingestor = Ingestor.from_checkpoint(Path(encode_with), IngestOptions(progress=False))
        similarity.model_dirs.setdefault(ingestor.model_id, Path(encode_with))
        encode_queue = EncodeQueue(ingestor, store, after_write=[indexes.on_item])
        hooks.append(encode_queue.submit)
    extension = SimilarityExtension()
    hrefs = Hrefs(asset_roots)
    search_extensions = [
        FilterExtension(client=StoreFiltersClient(store=store)),
        SortExtension(),
        FieldsExtension(),
        TokenPaginationExtension(),
        extension,
    ]
    write_extensions = []
    if transactions:
        guard = [Depends(write_guard(write_token))] if write_token is not None else None
        write_extensions.append(
            TransactionExtension(
                client=StoreTransactionsClient(store=store, on_item=hooks, hrefs=hrefs),
                settings=settings,
                route_dependencies=guard,
            )
        )
    client = StoreCoreClient(
        store=store,
        similarity=similarity,
        hrefs=hrefs,
        landing_page_id=settings.stac_fastapi_landing_id,
        title=title,
        description=DESCRIPTION,
    )
    api = StacApi(
        settings=settings,
        title=title,
        description=DESCRIPTION,
        app=FastAPI(
            openapi_url=settings.openapi_url,
            docs_url=settings.docs_url,
            redoc_url=None,
            root_path=settings.root_path,
            title=title,
            version=settings.stac_fastapi_version,
            description=DESCRIPTION,
            lifespan=indexes_lifespan(indexes),
        ),
        middlewares=[
            *attr.fields(StacApi).middlewares.default.factory(),  # stac-fastapi's own
            Middleware(BodySizeLimit, max_bytes=max_body_bytes),  # outermost
        ],
        client=client,
        extensions=[
            *search_extensions,
            *write_extensions,
            AssetsExtension(store=store, hrefs=hrefs),
        ],
        search_get_request_model=create_get_request_model(search_extensions),
        search_post_request_model=create_post_request_model(
            search_extensions, base_model=SearchPostBody
        ),
        items_get_request_model=create_request_model(
            "ItemCollectionUri",
            base_model=ItemCollectionUri,
            extensions=[TokenPaginationExtension()],
            request_type="GET",
        ),
    )
    extension.client = client
    api.app.add_exception_handler(OverflowError, _out_of_range)
    api.app.state.encode_queue = encode_queue
    api.app.state.write_protected = transactions and write_token is not None
    install_error_handlers(api.app)
    install_openapi(api.app, write_protected=api.app.state.write_protected)
    mount_viewer(api.app, viewer_basemap)
    install_mgmt(api.app, lambda: indexes)
    return api


def indexes_lifespan(indexes: LiveIndexes) -> Callable[[FastAPI], Any]:
    """The app's lifespan: while it serves, the indexes follow the store's change log in the
    background and take background saves; shutting down stops that and saves what is pending."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        indexes.open()
        try:
            yield
        finally:
            indexes.close()

    return lifespan


def create_app(
    db: Path, index_dir: Path | None = None, models: dict[str, Path] | None = None
) -> FastAPI:
    """The FastAPI app over the SQLite file ``db`` (created if missing)."""
    from stac_rscbir.store.sqlite import SQLiteStore

    db = Path(db)
    return create_api(SQLiteStore(db), index_dir or db.with_suffix(".index"), models).app
