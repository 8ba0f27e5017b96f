"""Similarity search from pystac-client: one call, pystac items back, each with its distance.

Built on pystac-client's own request machinery (an :class:`~pystac_client.ItemSearch` whose
POST body carries the ``similarity`` object), so paging, ``max_items`` and the usual filters
work as for any search::

    from pystac_client import Client
    from stac_rscbir.client import search_similar, distances

    client = Client.open("http://localhost:8080")
    search = search_similar(client, item=("sentinel-2-l2a", "S2A_..."), model="s2-milan-64",
                            k=50, bbox=[13.0, 52.3, 13.8, 52.7], datetime="2024-06/2024-08")
    for item, distance in distances(search.items()):
        print(item.id, distance)
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pystac
from pystac_client import Client, ItemSearch

DISTANCE = "cbir:distance"


class SimilaritySearch(ItemSearch):
    """An item search (POST) whose body also holds a ``similarity`` query."""

    def __init__(self, url: str, *, similarity: dict[str, Any], **kwargs: Any) -> None:
        kwargs["method"] = "POST"  # the similarity object travels in the JSON body
        super().__init__(url, **kwargs)
        self._parameters["similarity"] = similarity


def search_similar(
    client: Client,
    *,
    item: tuple[str, str] | pystac.Item | None = None,
    code: str | None = None,
    descriptor: str | None = None,
    image: bytes | Path | None = None,
    model: str | None = None,
    k: int = 10,
    max_distance: int | None = None,
    rerank: bool = False,
    relevant: Iterable[tuple[str, str] | pystac.Item] | None = None,
    not_relevant: Iterable[tuple[str, str] | pystac.Item] | None = None,
    **search: Any,
) -> SimilaritySearch:
    """Items like the example (an item or ``(collection, id)``, a code, a descriptor, or image
    bytes / a PNG or GeoTIFF file), ranked by Hamming distance, with any search filters.

    ``relevant`` / ``not_relevant``: relevance feedback, items (or ``(collection, id)``) the
    user judged; the server refines the query descriptor with them (Rocchio) and ranks by the
    refined query (the query needs a descriptor: an item with one, a descriptor or an image).
    """
    similarity: dict[str, Any] = {"k": k, "rerank": rerank}
    if relevant is not None or not_relevant is not None:
        similarity["feedback"] = {
            "relevant": [_ref(r) for r in relevant or ()],
            "not_relevant": [_ref(r) for r in not_relevant or ()],
        }
    if model:
        similarity["model"] = model
    if max_distance is not None:
        similarity["max_distance"] = max_distance
    if isinstance(item, pystac.Item):
        item = (item.collection_id or "", item.id)
    if item is not None:
        similarity["item"] = {"collection": item[0], "id": item[1]}
    if code is not None:
        similarity["code"] = code
    if descriptor is not None:
        similarity["descriptor"] = descriptor
    if image is not None:
        raw = Path(image).read_bytes() if isinstance(image, Path) else image
        similarity["image"] = base64.b64encode(raw).decode()
    search.setdefault("limit", min(k, 100))
    search.setdefault("max_items", k)
    return SimilaritySearch(
        client.get_search_link().href,  # type: ignore[union-attr]
        similarity=similarity,
        stac_io=client._stac_io,
        client=client,
        **search,
    )


def _ref(item: tuple[str, str] | pystac.Item) -> dict[str, str]:
    if isinstance(item, pystac.Item):
        return {"collection": item.collection_id or "", "id": item.id}
    return {"collection": item[0], "id": item[1]}


def distances(items: Iterable[pystac.Item]) -> Iterator[tuple[pystac.Item, float]]:
    """Each item with the distance the server put in its properties."""
    for item in items:
        yield item, item.properties[DISTANCE]
