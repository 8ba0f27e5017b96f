"""The similarity search extension, laid out as stac-fastapi lays out an extension.

* :mod:`.request`: the request models (the ``similarity`` object, its GET forms);
* :mod:`.extension`: :class:`SimilarityExtension` (conformance class, the /similar route);
* :mod:`.client`: :class:`SimilarityClient`, the backend-facing client that ranks a candidate
  set, built from :mod:`.queries` (query decoding), :mod:`.ranking` (ranked lists, paging) and
  :mod:`.feedback` (Rocchio), over :class:`~stac_rscbir.index.live.LiveIndexes`.
"""

from stac_rscbir.api.similarity.client import Candidates, SimilarityClient, StoreCandidates
from stac_rscbir.api.similarity.extension import (
    CONFORMANCE,
    SimilarItemsClient,
    SimilarityExtension,
)
from stac_rscbir.api.similarity.queries import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS
from stac_rscbir.api.similarity.ranking import RankedHit, RankedPage, annotate
from stac_rscbir.api.similarity.request import (
    MAX_K,
    ItemRef,
    SimilarityQuery,
    similarity_from_get,
)

__all__ = [
    "CONFORMANCE",
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_PIXELS",
    "MAX_K",
    "Candidates",
    "ItemRef",
    "RankedHit",
    "RankedPage",
    "SimilarItemsClient",
    "SimilarityClient",
    "SimilarityExtension",
    "SimilarityQuery",
    "StoreCandidates",
    "annotate",
    "similarity_from_get",
]
