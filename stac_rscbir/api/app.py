"""The app factory: stac-fastapi core + filter, sort, fields, pagination, transactions and the
similarity extension, over the embedded SQLite store (default)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
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
from stac_fastapi.extensions.filter.client import BaseFiltersClient
from stac_fastapi.types.config import ApiSettings
from stac_fastapi.types.search import BaseSearchPostRequest

from stac_rscbir import __version__
from stac_rscbir.api.core import StoreCoreClient, StoreTransactionsClient
from stac_rscbir.api.similarity import SimilarityExtension, SimilarityService
from stac_rscbir.store.base import ItemStore


class SearchPostBody(BaseSearchPostRequest):
    """The POST /search body; stac-pydantic's own validators assume a JSON object."""

    @model_validator(mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("the search body must be a JSON object")
        return value


def _out_of_range(request: Request, exc: Exception) -> JSONResponse:
    """400 for values the parsers cannot represent (e.g. year 1 at UTC+14), not a 500."""
    return JSONResponse(
        {"code": "OutOfRange", "description": f"a value in the request is out of range: {exc}"},
        status_code=400,
    )


def create_api(
    store: ItemStore,
    index_dir: Path,
    models: dict[str, Path] | None = None,
    title: str = "stac-rscbir",
    encode_with: Path | None = None,
) -> StacApi:
    """A STAC API over ``store`` whose /search also ranks by similarity (hash codes).

    ``models`` maps model ids to checkpoints (for image queries); with ``encode_with`` (a
    checkpoint), items added through the Transactions endpoints are encoded in the background
    (``app.state.encode_queue``) and the hash index follows.
    """
    settings = ApiSettings(
        enable_response_models=False,
        stac_fastapi_title=title,
        stac_fastapi_description="STAC API with query-by-example over deep hash codes",
        stac_fastapi_landing_id="stac-rscbir",
        stac_fastapi_version=__version__,
    )
    service = SimilarityService(store, index_dir, models)
    hooks: list = [service.on_item]
    encode_queue = None
    if encode_with is not None:
        from stac_rscbir.ingest.hooks import EncodeQueue
        from stac_rscbir.ingest.worker import IngestOptions, Ingestor

        ingestor = Ingestor.from_checkpoint(Path(encode_with), IngestOptions(progress=False))
        service.model_dirs.setdefault(ingestor.model_id, Path(encode_with))
        encode_queue = EncodeQueue(ingestor, store, after_write=[service.on_item])
        hooks.append(encode_queue.submit)
    similarity = SimilarityExtension(service=service)
    search_extensions = [
        FilterExtension(client=BaseFiltersClient()),
        SortExtension(),
        FieldsExtension(),
        TokenPaginationExtension(),
        similarity,
    ]
    transactions = TransactionExtension(
        client=StoreTransactionsClient(store=store, on_item=hooks),
        settings=settings,
    )
    client = StoreCoreClient(store=store, similarity=service)
    api = StacApi(
        settings=settings,
        title=title,
        description="STAC API with query-by-example over deep hash codes (cbir extension)",
        client=client,
        extensions=[*search_extensions, transactions],
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
    similarity.client = client
    api.app.add_exception_handler(OverflowError, _out_of_range)
    api.app.state.encode_queue = encode_queue
    return api


def create_app(
    db: Path, index_dir: Path | None = None, models: dict[str, Path] | None = None
) -> FastAPI:
    """The FastAPI app over the SQLite file ``db`` (created if missing)."""
    from stac_rscbir.store.sqlite import SQLiteStore

    db = Path(db)
    return create_api(SQLiteStore(db), index_dir or db.with_suffix(".index"), models).app
