"""Request models of the similarity extension: the ``similarity`` object of POST /search, its flat
GET form (``similarity_<field>`` on /search, ``<field>`` on /similar), and their parsing."""

from typing import Annotated, Any, Literal

import attr
from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from stac_fastapi.api.models import ItemUri
from stac_fastapi.types.search import APIRequest, Limit

from stac_rscbir.extension.cbir import DEFAULT_K
from stac_rscbir.index.feedback import ALPHA, BETA, GAMMA
from stac_rscbir.store.base import InvalidQueryError

MAX_K = 10_000  # default cap on ``similarity.k`` (create_api(max_k=...))
MAX_FEEDBACK = 1000  # most items in each of feedback.relevant / feedback.not_relevant


class ItemRef(BaseModel):
    """An item of the store, as a query example."""

    model_config = ConfigDict(extra="forbid")
    collection: str
    id: str


class FeedbackQuery(BaseModel):
    """Relevance feedback: items the user judged, and the Rocchio weights.

    The query descriptor ``q`` (of the query item, the given descriptor or the image) becomes
    ``q' = alpha q + beta mean(relevant) - gamma mean(not_relevant)``; the candidates are the
    Hamming neighbours of the binarised ``q'``, re-ranked by Euclidean distance to ``q'``.
    """

    model_config = ConfigDict(extra="forbid")
    relevant: list[ItemRef] = Field(
        default_factory=list, max_length=MAX_FEEDBACK, description="Items judged relevant."
    )
    not_relevant: list[ItemRef] = Field(
        default_factory=list, max_length=MAX_FEEDBACK, description="Items judged not relevant."
    )
    alpha: float = Field(ALPHA, description="Weight of the query descriptor.")
    beta: float = Field(BETA, description="Weight of the mean relevant descriptor.")
    gamma: float = Field(GAMMA, description="Weight of the mean not relevant descriptor.")


class SimilarityQuery(BaseModel):
    """The ``similarity`` object of POST /search: one query kind, the model, the list length."""

    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 400, not silently ignored
    model: str | None = Field(None, description="Model id (default: the only indexed model).")
    item: ItemRef | None = Field(None, description="Query by an item of the store.")
    code: str | None = Field(None, description="Query by a hash code (packed bits).")
    encoding: Literal["base64", "hex"] = Field("base64", description="Encoding of `code`.")
    bit_order: Literal["big", "little"] = Field("big", description="Bit order of `code`.")
    descriptor: str | None = Field(
        None, description="Query by a float32 little-endian descriptor, base64."
    )
    image: str | None = Field(
        None,
        description="Query by an image (base64 PNG or GeoTIFF), encoded with `model`. It must "
        "fit the model's `input` (checkpoint config and `cbir:models` entry): a band count the "
        "model (or one of its branches) takes, at least `min_size` pixels a side, values in the "
        "model's units (an integer type that holds `value_range`, values within one range "
        "width of it, no NaN); else 400 naming the mismatch, e.g. an 8-bit PNG for a model of "
        "uint16 reflectance. Truncated or corrupt files are a 400. Conversions: GeoTIFF "
        "scale/offset tags are applied; the image is resized (bilinear) to the model's input "
        "size. An 8-bit rendering is not stretched back to reflectance: send the chip's values.",
    )
    k: StrictInt = Field(  # strict: `true` or `2.0` is a 400 naming the field, not k=1 or 2
        DEFAULT_K,
        ge=1,
        description=f"Length of the ranked list to page through (at most the server's max_k, "
        f"{MAX_K} by default).",
    )
    max_distance: StrictInt | None = Field(None, ge=0, description="Hamming radius.")
    rerank: bool = Field(False, description="Re-rank the Hamming candidates by descriptor.")
    feedback: FeedbackQuery | None = Field(
        None,
        description="Relevance feedback (Rocchio): refine the query with items judged relevant "
        "and not relevant; needs a query with a descriptor.",
    )

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


# GET feedback parameters, shared by /search and /similar
RelevantParam = Annotated[
    str | None,
    Query(description="Feedback: items judged relevant, comma list of `<collection>/<id>`."),
]
NotRelevantParam = Annotated[
    str | None,
    Query(description="Feedback: items judged not relevant, comma list of `<collection>/<id>`."),
]
AlphaParam = Annotated[float | None, Query(description=f"Feedback: query weight ({ALPHA}).")]
BetaParam = Annotated[float | None, Query(description=f"Feedback: relevant weight ({BETA}).")]
GammaParam = Annotated[float | None, Query(description=f"Feedback: not relevant weight ({GAMMA}).")]
KParam = Annotated[int | None, Query(ge=1, description=f"List length (default {DEFAULT_K}).")]
MaxDistanceParam = Annotated[int | None, Query(ge=0, description="Hamming radius.")]

# fields of the similarity object that GET takes as flat parameters (`similarity_<field>` on
# /search, `<field>` on /similar); the image query is POST only (too large for a URL)
_FLAT_FIELDS = (
    "model",
    "code",
    "encoding",
    "bit_order",
    "descriptor",
    "k",
    "max_distance",
    "rerank",
)
_FLAT_WEIGHTS = ("alpha", "beta", "gamma")  # of similarity.feedback


@attr.s
class SimilarityGetRequest(APIRequest):
    """Merged into GET /search: the similarity object as flat query parameters (all of its
    fields but ``image``, which is too large for a URL: POST it)."""

    similarity_item: Annotated[
        str | None, Query(description="Query item as `<collection>/<item id>`.")
    ] = attr.ib(default=None)
    similarity_code: Annotated[
        str | None, Query(description="Query code (packed bits, see similarity_encoding).")
    ] = attr.ib(default=None)
    similarity_encoding: Annotated[
        Literal["base64", "hex"] | None, Query(description="Encoding of the code (base64).")
    ] = attr.ib(default=None)
    similarity_bit_order: Annotated[
        Literal["big", "little"] | None, Query(description="Bit order of the code (big).")
    ] = attr.ib(default=None)
    similarity_descriptor: Annotated[
        str | None, Query(description="Query descriptor: float32 little-endian, base64.")
    ] = attr.ib(default=None)
    similarity_model: Annotated[str | None, Query(description="Model id.")] = attr.ib(default=None)
    similarity_k: KParam = attr.ib(default=None)
    similarity_max_distance: MaxDistanceParam = attr.ib(default=None)
    similarity_rerank: Annotated[bool | None, Query(description="Re-rank by descriptor.")] = (
        attr.ib(default=None)
    )
    similarity_relevant: RelevantParam = attr.ib(default=None)
    similarity_not_relevant: NotRelevantParam = attr.ib(default=None)
    similarity_alpha: AlphaParam = attr.ib(default=None)
    similarity_beta: BetaParam = attr.ib(default=None)
    similarity_gamma: GammaParam = attr.ib(default=None)


@attr.s
class SimilarItemsRequest(ItemUri):
    """GET /collections/{collection_id}/items/{item_id}/similar."""

    model: Annotated[str | None, Query(description="Model id.")] = attr.ib(default=None)
    k: KParam = attr.ib(default=None)
    max_distance: MaxDistanceParam = attr.ib(default=None)
    collections: Annotated[
        str | None,
        Query(
            description="Only items of these collections (comma list): with a cross-modal "
            "model, e.g. the Sentinel-1 items like this Sentinel-2 item."
        ),
    ] = attr.ib(default=None)
    rerank: Annotated[bool, Query(description="Re-rank by descriptor.")] = attr.ib(default=False)
    relevant: RelevantParam = attr.ib(default=None)
    not_relevant: NotRelevantParam = attr.ib(default=None)
    alpha: AlphaParam = attr.ib(default=None)
    beta: BetaParam = attr.ib(default=None)
    gamma: GammaParam = attr.ib(default=None)
    limit: Annotated[
        Limit | None, Query(description="Items per page (10); pages follow `next` links up to k.")
    ] = attr.ib(default=10)
    token: Annotated[str | None, Query(description="Paging token of a `next` link.")] = attr.ib(
        default=None
    )


def similarity_from_flat(
    params: dict[str, Any], prefix: str, item: ItemRef | None = None
) -> SimilarityQuery | None:
    """The similarity object of flat GET parameters ``<prefix><field>`` (None when none is
    given): one owner for GET /search and /similar, so both take what POST takes."""
    given = {f: params[prefix + f] for f in _FLAT_FIELDS if params.get(prefix + f) is not None}
    judged = (
        _refs(params.get(prefix + "relevant"), prefix + "relevant"),
        _refs(params.get(prefix + "not_relevant"), prefix + "not_relevant"),
    )
    weights = {w: params[prefix + w] for w in _FLAT_WEIGHTS if params.get(prefix + w) is not None}
    if any(judged) or weights:
        given["feedback"] = FeedbackQuery(relevant=judged[0], not_relevant=judged[1], **weights)
    if item is None and not given:
        return None
    try:
        return SimilarityQuery(item=item, **given)
    except ValueError as exc:
        raise InvalidQueryError(str(exc)) from exc


def similarity_from_get(params: dict[str, Any]) -> SimilarityQuery | None:
    """The similarity object of GET /search flat parameters (None when absent)."""
    item = params.get("similarity_item")
    ref = None
    if item is not None:
        ref = _ref(item, "similarity_item must be `<collection>/<item id>`")
    return similarity_from_flat(params, "similarity_", ref)


def _ref(text: str, problem: str) -> ItemRef:
    """The item reference ``<collection>/<item id>`` (a GET parameter); 400 saying ``problem``
    when it is not one."""
    collection, sep, item_id = text.partition("/")
    if not sep or not collection or not item_id:
        raise InvalidQueryError(problem)
    return ItemRef(collection=collection, id=item_id)


def _refs(value: str | None, name: str) -> list[ItemRef]:
    """Item references of a comma list of ``<collection>/<item id>`` (GET parameters)."""
    problem = f"{name} must be a comma list of `<collection>/<item id>`"
    return [_ref(part.strip(), problem) for part in (value or "").split(",") if part.strip()]
