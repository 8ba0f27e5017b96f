"""The backend-facing similarity client: ranked pages of a similarity search over a candidate set.

A core client (ours over an :class:`~stac_rscbir.store.base.ItemStore`, or stac-fastapi-pgstac's
through :mod:`stac_rscbir.api.pgstac_plugin`) makes the candidate set from the request's filters
(:class:`Candidates`), asks :meth:`SimilarityClient.page` for a page of the ranked list, and
fetches and links the page's items its own way (:func:`~.ranking.annotate` adds the distances).

The model's hash index (:class:`~stac_rscbir.index.live.LiveIndexes`) ranks the candidates by
Hamming distance (ties by collection and id), optionally re-ranked by float descriptor or refined
by relevance feedback; pages slice that ranked list, the list of the first page even when the
store changes between pages (paging tokens name the first page's store generation).
"""

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi import HTTPException

from stac_rscbir.api.similarity.feedback import FEEDBACK_POOL, refine
from stac_rscbir.api.similarity.queries import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    QueryDecoder,
)
from stac_rscbir.api.similarity.ranking import (
    PAGING_CACHE_HITS,
    Ranked,
    RankedHit,
    RankedLists,
    RankedPage,
    fingerprint,
    finite_score,
    token_position,
)
from stac_rscbir.api.similarity.request import MAX_K, SimilarityQuery
from stac_rscbir.index.live import LiveIndexes
from stac_rscbir.store.base import InvalidQueryError, ItemKey, ItemStore, SearchQuery


class Candidates(Protocol):
    """The candidate set of a similarity search: what the search's filters select."""

    @property
    def fingerprint(self) -> Any:
        """The filters as a JSON value (a paging token belongs to one search)."""
        ...

    def keys(self) -> Collection[ItemKey] | None:
        """The keys the filters select, each once; None when there is no filter (every item).
        Not turned into a set: the index looks each key up once anyway, and hashing 10^4-10^5
        (collection, id) tuples twice was a sixth of a filtered search (RESULTS.md, issue 18)."""
        ...


@dataclass(frozen=True)
class StoreCandidates:
    """The candidates of a :class:`SearchQuery` over a store (its ``filter_keys``)."""

    store: ItemStore
    query: SearchQuery

    @property
    def fingerprint(self) -> dict[str, Any]:
        return {k: v for k, v in self.query.__dict__.items() if k not in ("limit", "token")}

    def keys(self) -> list[ItemKey] | None:
        q = self.query
        filtered = q.filter is not None or any(
            v is not None for v in (q.collections, q.ids, q.bbox, q.intersects, q.datetime)
        )
        return self.store.filter_keys(q) if filtered else None


class SimilarityClient:
    """Ranked similarity searches over a store's hash indexes (one per model)."""

    def __init__(
        self,
        store: ItemStore,
        index_dir: Path,
        models: dict[str, Path] | None = None,
        encoder_loader: Any = None,
        *,
        max_k: int = MAX_K,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        save_delay: float = 1.0,
        paging_cache_hits: int = PAGING_CACHE_HITS,
    ) -> None:
        self.store = store
        self.max_k = max_k
        self.model_dirs = dict(models or {})
        self.indexes = LiveIndexes(store, Path(index_dir), save_delay=save_delay)
        self.queries = QueryDecoder(
            store,
            self.model_dirs,
            encoder_loader,
            max_image_bytes=max_image_bytes,
            max_image_pixels=max_image_pixels,
        )
        self._ranked_lists = RankedLists(paging_cache_hits)
        self._coded: tuple[int, set[str]] | None = None  # (generation, models with codes)

    def page(
        self,
        sim: SimilarityQuery,
        candidates: Candidates,
        limit: int,
        token: str | None = None,
    ) -> RankedPage:
        """One page of the ranked list of ``sim`` over ``candidates``.

        A ``next`` token names the store generation of the first page: later pages slice the
        list that page 1 sliced (kept in a bounded cache), whatever was written since; when
        the list is gone (evicted, another replica) and the store has changed, 410 (rerun the
        search) rather than a page that may repeat or skip items.
        """
        if "k" not in sim.model_fields_set and sim.k > self.max_k:  # the default, over the cap
            sim = sim.model_copy(update={"k": self.max_k})
        fp = fingerprint(candidates.fingerprint, sim.model_dump(mode="json"))
        ranked = None
        if token:
            generation, offset = token_position(token, fp)
            ranked = self._ranked_lists.get((fp, generation))
            if ranked is None and generation != self.store.generation():
                raise HTTPException(
                    410,
                    "token: the store has changed since the first page of this similarity "
                    "search and its ranked list is no longer held here; run the search again",
                )
        else:
            generation, offset = self.store.generation(), 0  # before ranking: see above
        if ranked is None:
            ranked = self._rank(sim, candidates)
        return self._ranked_lists.page(ranked, fp, generation, offset, limit)

    def _rank(self, sim: SimilarityQuery, candidates: Candidates) -> Ranked:
        """The ranked list of ``sim`` over ``candidates``, and what made it."""
        model = sim.model or self._default_model()
        self._check_model(model)
        self._check_limits(sim, model, None)
        idx = self.indexes.index(model)
        self._check_limits(sim, model, idx.bits)
        query = self.queries.decode(sim, model, idx)
        feedback_info = None
        if sim.feedback is not None:
            query, feedback_info = refine(sim.feedback, query, model, idx, self.store, self.queries)
        pool = sim.k if feedback_info is None else max(4 * sim.k, FEEDBACK_POOL)
        result = idx.search(
            query.code, pool, max_distance=sim.max_distance, candidates=candidates.keys()
        )
        hits = [RankedHit(h.key, int(h.distance), None) for h in result]
        order = "hamming"
        if (sim.rerank or feedback_info is not None) and query.descriptor is not None:
            order = "descriptor"
            hits = [
                RankedHit(h.key, int(h.distance), finite_score(h.descriptor_distance))
                for h in idx.rerank(query.descriptor, [(h.key, h.distance) for h in hits])
            ]
        info: dict[str, Any] = {
            "model": model,
            "exact": bool(result.exact),
            "k": sim.k,
            "order": order,
        }
        if feedback_info is not None:
            info["feedback"] = feedback_info
        return Ranked(hits[: sim.k], info)

    def _default_model(self) -> str:
        """The model of a query that names none: the one checkpoint served, or else the one
        model the store has codes of (as the field's description promises)."""
        if len(self.model_dirs) == 1:
            return next(iter(self.model_dirs))
        known = self.known_models()
        if not self.model_dirs and len(known) == 1:
            return known[0]
        raise InvalidQueryError(
            "similarity.model is required" + (f": one of {known}" if known else "")
        )

    def _models_with_codes(self) -> set[str]:
        """The models some item of the store has a code of (cached per store generation)."""
        generation = self.store.generation()
        if self._coded is None or self._coded[0] != generation:
            lister = getattr(self.store, "code_models", None)
            models = set(lister()) if lister is not None else set()
            self._coded = (generation, models)
        return self._coded[1]

    def known_models(self) -> list[str]:
        """The models a query may name: those with codes in the store or a checkpoint here."""
        return sorted(
            self.indexes.models_with_codes() | set(self.model_dirs) | self._models_with_codes()
        )

    def _check_model(self, model: str) -> None:
        """400 naming the known models unless ``model`` has codes here or a checkpoint."""
        if model in self.model_dirs or model in self.indexes.models_with_codes():
            return
        if model not in self._models_with_codes():
            known = self.known_models()
            raise InvalidQueryError(
                f"similarity.model: unknown model {model!r}: no item of this server has a code "
                f"of it and it has no checkpoint here (known models: {known or 'none'})"
            )

    def _check_limits(self, sim: SimilarityQuery, model: str, bits: int | None) -> None:
        if sim.k > self.max_k:
            raise InvalidQueryError(
                f"similarity.k: {sim.k} is more than this server's maximum, {self.max_k}"
            )
        if sim.max_distance is not None and bits is not None and sim.max_distance > bits:
            raise InvalidQueryError(
                f"similarity.max_distance: {sim.max_distance} is out of range: the codes of "
                f"model {model!r} have {bits} bits (0 to {bits})"
            )
