"""Relevance feedback: the query refined by Rocchio from the items a user judged.

``q' = alpha q + beta mean(relevant) - gamma mean(not_relevant)`` over descriptors
(:func:`stac_rscbir.index.feedback.rocchio`); the judged items' descriptors come from the index
(or from the store for items the index does not hold), and ``q'`` is binarised with the model's
threshold to find its Hamming neighbours.
"""

from typing import Any

import numpy as np

from stac_rscbir.api.similarity.queries import QueryCode, QueryDecoder
from stac_rscbir.api.similarity.request import FeedbackQuery
from stac_rscbir.extension.cbir import code_of
from stac_rscbir.index.feedback import rocchio
from stac_rscbir.index.hashindex import HashIndex
from stac_rscbir.store.base import InvalidQueryError, ItemStore

FEEDBACK_POOL = 100  # feedback re-ranks the top max(4 k, FEEDBACK_POOL) Hamming candidates


def refine(
    fb: FeedbackQuery,
    query: QueryCode,
    model: str,
    idx: HashIndex,
    store: ItemStore,
    decoder: QueryDecoder,
) -> tuple[QueryCode, dict[str, Any]]:
    """The refined query (code of q', q') and what refined it (the response's ``feedback``)."""
    desc = query.descriptor
    if desc is None:
        what = (
            f"the query item {query.item[0]}/{query.item[1]} has no descriptor of model {model!r}"
            if query.item is not None
            else "a code query has no descriptor"
        )
        raise InvalidQueryError(
            f"similarity.feedback needs a query descriptor (Rocchio refines it): {what}; "
            "query by an item with a descriptor, a descriptor or an image"
        )
    groups = []
    for name, refs in (("relevant", fb.relevant), ("not_relevant", fb.not_relevant)):
        vectors = []
        for i, ref in enumerate(refs):
            where = f"similarity.feedback.{name}[{i}] {ref.collection}/{ref.id}"
            key = (ref.collection, ref.id)
            if key in idx:
                vec = idx.descriptor(key)
            else:
                code = code_of(store.get_item(ref.collection, ref.id), model, idx.version)  # 404
                if code is None:
                    raise InvalidQueryError(f"{where} has no code of model {model!r}")
                vec = code.descriptor.array() if code.descriptor else None
            if vec is None:
                raise InvalidQueryError(f"{where} has no descriptor of model {model!r}")
            if vec.size != desc.size:
                raise InvalidQueryError(
                    f"{where} has a descriptor of {vec.size} values, the query {desc.size}"
                )
            vectors.append(vec)
        groups.append(np.asarray(vectors, np.float32).reshape(-1, desc.size))
    refined = rocchio(desc, groups[0], groups[1], fb.alpha, fb.beta, fb.gamma)
    if not np.isfinite(refined).all():
        raise InvalidQueryError("similarity.feedback: the refined query is not finite")
    info = {
        "relevant": len(fb.relevant),
        "not_relevant": len(fb.not_relevant),
        "alpha": fb.alpha,
        "beta": fb.beta,
        "gamma": fb.gamma,
    }
    code = decoder.binarize(model, refined, idx, infer=True)
    return QueryCode(code, refined, query.item), info
