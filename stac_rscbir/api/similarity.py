"""The similarity search extension: query by item, code, descriptor or image, ranked by Hamming.

Filters (bbox, intersects, datetime, collections, ids, CQL2) make the candidate set in the
store; the model's hash index ranks the candidates by Hamming distance (ties by collection and
id), optionally re-ranked by float descriptor; pages slice that ranked list, so paging is
stable. Each returned item carries ``cbir:distance``; the response says whether the ranking was
exact. The index is derived data: opened or rebuilt from the store, kept in step with every
transaction, rebuilt when the store moved on behind its back (another process wrote to it).
"""

import base64
import hashlib
import io
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import attr
import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request
from pydantic import BaseModel, Field, model_validator
from stac_fastapi.api.models import ItemUri
from stac_fastapi.api.routes import create_async_endpoint
from stac_fastapi.types.extension import ApiExtension
from stac_fastapi.types.search import APIRequest

from stac_rscbir.api.core import store_errors
from stac_rscbir.extension.cbir import HashCode
from stac_rscbir.extension.codec import CBIRFieldError, decode_code, decode_descriptor
from stac_rscbir.index.hashindex import HashIndex, open_or_rebuild
from stac_rscbir.store.base import InvalidQueryError, ItemStore, SearchPage, SearchQuery

CONFORMANCE = "https://stac-extensions.github.io/cbir/v1.0.0/similarity-search"
MAX_K = 10_000


class ItemRef(BaseModel):
    """An item of the store, as a query example."""

    collection: str
    id: str


class SimilarityQuery(BaseModel):
    """The ``similarity`` object of POST /search: one query kind, the model, the list length."""

    model: str | None = Field(None, description="Model id (default: the only indexed model).")
    item: ItemRef | None = Field(None, description="Query by an item of the store.")
    code: str | None = Field(None, description="Query by a hash code (packed bits).")
    encoding: Literal["base64", "hex"] = Field("base64", description="Encoding of `code`.")
    bit_order: Literal["big", "little"] = Field("big", description="Bit order of `code`.")
    descriptor: str | None = Field(
        None, description="Query by a float32 little-endian descriptor, base64."
    )
    image: str | None = Field(
        None, description="Query by an image (base64 PNG or GeoTIFF), encoded with `model`."
    )
    k: int = Field(100, ge=1, le=MAX_K, description="Length of the ranked list to page through.")
    max_distance: int | None = Field(None, ge=0, description="Hamming radius.")
    rerank: bool = Field(False, description="Re-rank the Hamming candidates by descriptor.")

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


@attr.s
class SimilarityGetRequest(APIRequest):
    """Merged into GET /search: the similarity object as flat query parameters."""

    similarity_item: Annotated[
        str | None, Query(description="Query item as `<collection>/<item id>`.")
    ] = attr.ib(default=None)
    similarity_code: Annotated[str | None, Query(description="Query code, base64.")] = attr.ib(
        default=None
    )
    similarity_model: Annotated[str | None, Query(description="Model id.")] = attr.ib(default=None)
    similarity_k: Annotated[int | None, Query(ge=1, le=MAX_K, description="List length.")] = (
        attr.ib(default=None)
    )
    similarity_max_distance: Annotated[int | None, Query(ge=0, description="Hamming radius.")] = (
        attr.ib(default=None)
    )
    similarity_rerank: Annotated[bool | None, Query(description="Re-rank by descriptor.")] = (
        attr.ib(default=None)
    )


@attr.s
class SimilarItemsRequest(ItemUri):
    """GET /collections/{collection_id}/items/{item_id}/similar."""

    model: Annotated[str | None, Query(description="Model id.")] = attr.ib(default=None)
    k: Annotated[int, Query(ge=1, le=MAX_K, description="Number of similar items.")] = attr.ib(
        default=10
    )
    max_distance: Annotated[int | None, Query(ge=0, description="Hamming radius.")] = attr.ib(
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
    ) -> None:
        self.store = store
        self.index_dir = Path(index_dir)
        self.model_dirs = dict(models or {})
        self._indexes: dict[str, HashIndex] = {}
        self._encoders: dict[str, Any] = {}
        self._encoder_loader = encoder_loader
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ indexes

    def _dir(self, model: str) -> Path:
        return self.index_dir / hashlib.sha1(model.encode()).hexdigest()[:16]

    def index(self, model: str) -> HashIndex:
        """The model's index, rebuilt from the store when missing or stale."""
        with self._lock:
            idx = self._indexes.get(model)
            if idx is None or idx.generation < self.store.generation():
                idx = open_or_rebuild(self._dir(model), self.store, model)
                self._indexes[model] = idx
            return idx

    def on_item(self, collection: str, item: dict[str, Any] | None, item_id: str) -> None:
        """Transaction hook: keep every loaded index in step with a committed write."""
        with self._lock:
            generation = self.store.generation()
            for model, idx in list(self._indexes.items()):
                if item_id == "*" or idx.generation + 1 != generation:
                    self._indexes.pop(model)  # a collection went, or another writer: rebuild
                    continue
                key = (collection, item_id)
                idx.remove(key)
                code = _code_of(item, model) if item else None
                if code is not None:
                    desc = code.descriptor.array() if code.descriptor else None
                    idx.add(key, code.packed().tobytes(), desc)
                idx.generation = generation
                idx.save(self._dir(model))

    def _default_model(self) -> str:
        if len(self.model_dirs) == 1:
            return next(iter(self.model_dirs))
        raise InvalidQueryError(
            "similarity.model is required"
            + (f": one of {sorted(self.model_dirs)}" if self.model_dirs else "")
        )

    # ------------------------------------------------------------------ queries

    def from_get(self, params: dict[str, Any]) -> SimilarityQuery | None:
        """The similarity object of GET /search flat parameters (None when absent)."""
        item, code = params.get("similarity_item"), params.get("similarity_code")
        if not item and not code:
            return None
        ref = None
        if item:
            collection, sep, item_id = item.partition("/")
            if not sep or not item_id:
                raise InvalidQueryError("similarity_item must be `<collection>/<item id>`")
            ref = ItemRef(collection=collection, id=item_id)
        try:
            return SimilarityQuery(
                model=params.get("similarity_model"),
                item=ref,
                code=code,
                k=params.get("similarity_k") or 100,
                max_distance=params.get("similarity_max_distance"),
                rerank=bool(params.get("similarity_rerank")),
            )
        except ValueError as exc:
            raise InvalidQueryError(str(exc)) from exc

    def _query_code(
        self, sim: SimilarityQuery, model: str
    ) -> tuple[bytes, np.ndarray | None, tuple[str, str] | None]:
        """(packed code, descriptor or None, the query item's key or None)."""
        if sim.item is not None:
            item = self.store.get_item(sim.item.collection, sim.item.id)
            code = _code_of(item, model)
            if code is None:
                raise InvalidQueryError(
                    f"item {sim.item.collection}/{sim.item.id} has no code of model {model!r}"
                )
            desc = code.descriptor.array() if code.descriptor else None
            return code.packed().tobytes(), desc, (sim.item.collection, sim.item.id)
        bits = self.index(model).bits
        if sim.code is not None:
            try:
                packed = decode_code(sim.code, bits, sim.encoding, field="similarity.code")
            except CBIRFieldError as exc:
                raise InvalidQueryError(str(exc)) from exc
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

    def _binarize(self, model: str, desc: np.ndarray) -> bytes:
        """A descriptor (the model's relaxed code) to its code, with the model's threshold."""
        import torch

        head = self._encoder(model).net.head
        bits = head.binarize(torch.from_numpy(np.asarray(desc, np.float32))[None])[0].numpy()
        return np.packbits(bits.astype(np.uint8)).tobytes()

    def _encode_image(self, model: str, data: str) -> tuple[np.ndarray, np.ndarray]:
        """Bits and relaxed code of an uploaded image (PNG or GeoTIFF, base64)."""
        import rasterio
        import torch
        import torch.nn.functional as F
        from rasterio.io import MemoryFile

        encoder = self._encoder(model)
        try:
            raw = base64.b64decode(data, validate=True)
            with MemoryFile(io.BytesIO(raw)) as mem, mem.open() as src:
                pixels = src.read().astype(np.float32)
        except (ValueError, rasterio.errors.RasterioIOError) as exc:
            raise InvalidQueryError(
                f"similarity.image is not a base64 PNG or GeoTIFF: {exc}"
            ) from exc
        bands = len(encoder.config.bands)
        if pixels.shape[0] != bands:
            raise InvalidQueryError(
                f"similarity.image has {pixels.shape[0]} band(s); model {model!r} takes {bands} "
                f"({', '.join(encoder.config.bands)})"
            )
        x = torch.from_numpy(pixels)[None]
        size = encoder.config.input_size
        if size and x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear")
        bits, relaxed = encoder(x)
        return bits[0].numpy().astype(np.uint8), relaxed[0].numpy()

    def search(self, query: SearchQuery, sim: SimilarityQuery) -> SearchPage:
        """One page of the ranked list of ``sim`` over the candidates of ``query``."""
        model = sim.model or self._default_model()
        code, desc, _ = self._query_code(sim, model)
        idx = self.index(model)
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
        result = idx.search(code, sim.k, max_distance=sim.max_distance, candidates=candidates)
        hits = [(h.key, h.distance) for h in result]
        if sim.rerank and desc is not None:
            hits = [(h.key, h.distance) for h in idx.rerank(desc, hits)]
        offset = self._offset(query, sim)
        page_hits = hits[offset : offset + query.limit]
        items = self.store.get_items([key for key, _ in page_hits])
        by_key = {(i["collection"], i["id"]): i for i in items}
        out = []
        for key, distance in page_hits:
            item = by_key.get(key)
            if item is not None:
                item["properties"]["cbir:distance"] = int(distance)
                out.append(item)
        end = offset + query.limit
        token = self._token(query, sim, end) if end < len(hits) else None
        info = {"model": model, "exact": bool(result.exact), "k": sim.k, "ranked": len(hits)}
        return SearchPage(out, token, len(hits), extra={"cbir:similarity": info})

    @staticmethod
    def _fingerprint(query: SearchQuery, sim: SimilarityQuery) -> str:
        body = {
            "q": {k: v for k, v in query.__dict__.items() if k not in ("limit", "token")},
            "s": sim.model_dump(mode="json"),
        }
        return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:12]

    def _token(self, query: SearchQuery, sim: SimilarityQuery, offset: int) -> str:
        raw = f"sim:{self._fingerprint(query, sim)}:{offset}"
        return base64.urlsafe_b64encode(raw.encode()).decode()

    def _offset(self, query: SearchQuery, sim: SimilarityQuery) -> int:
        if not query.token:
            return 0
        try:
            kind, fp, offset = base64.urlsafe_b64decode(query.token).decode().split(":")
            assert kind == "sim"
            value = int(offset)
        except Exception as exc:
            raise InvalidQueryError("token is not a similarity paging token") from exc
        if fp != self._fingerprint(query, sim):
            raise InvalidQueryError("token belongs to a different similarity search")
        return value


def _code_of(item: dict[str, Any] | None, model: str) -> HashCode | None:
    """The item's code of ``model`` (the last entry if several versions), validated."""
    found = None
    for i, entry in enumerate((item or {}).get("properties", {}).get("cbir:codes") or []):
        if isinstance(entry, dict) and entry.get("model") == model:
            found = HashCode.from_dict(entry, f"cbir:codes[{i}]")
    return found


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
        model: str | None = None,
        k: int = 10,
        max_distance: int | None = None,
    ) -> dict[str, Any]:
        sim = SimilarityQuery(
            model=model,
            item=ItemRef(collection=collection_id, id=item_id),
            k=k,
            max_distance=max_distance,
        )
        query = SearchQuery(limit=k)
        page = self.service.search(query, sim)  # type: ignore[union-attr]
        return self.client._page(page, request, "GET", {"k": k}, query)
