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
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pystac
from pystac_client import Client, ItemSearch

from stac_rscbir.extension.cbir import DEFAULT_K
from stac_rscbir.extras import require

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
    image: bytes | str | os.PathLike[str] | np.ndarray | None = None,
    model: str | None = None,
    k: int = DEFAULT_K,
    max_distance: int | None = None,
    rerank: bool = False,
    relevant: Iterable[tuple[str, str] | pystac.Item] | None = None,
    not_relevant: Iterable[tuple[str, str] | pystac.Item] | None = None,
    **search: Any,
) -> SimilaritySearch:
    """Items like the example (an item or ``(collection, id)``, a code, a descriptor, or an
    image), ranked by Hamming distance, with any search filters.

    ``image``: a PNG or GeoTIFF file (a path, as ``str`` or ``Path``), its content (``bytes``),
    or pixels (a numpy array, ``(bands, height, width)`` or ``(height, width)``, sent as a
    GeoTIFF of its dtype); the server encodes it with ``model``. ``k`` (the length of the
    ranked list, the server's default when not given) also caps the items the search yields.

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
        similarity["image"] = base64.b64encode(_image_bytes(image)).decode()
    search.setdefault("limit", min(k, 100))
    search.setdefault("max_items", k)
    return SimilaritySearch(
        client.get_search_link().href,  # type: ignore[union-attr]
        similarity=similarity,
        stac_io=client._stac_io,
        client=client,
        **search,
    )


def _image_bytes(image: bytes | str | os.PathLike[str] | np.ndarray) -> bytes:
    """The file content of a query image given as bytes, a path or a pixel array."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, np.ndarray):
        require("a query image given as a pixel array (written as a GeoTIFF)", "ml")
        from rasterio.io import MemoryFile

        pixels = image[None] if image.ndim == 2 else image
        if pixels.ndim != 3:
            raise ValueError(
                f"image: a pixel array must be (bands, height, width) or (height, width), "
                f"got shape {image.shape}"
            )
        count, height, width = pixels.shape
        with MemoryFile() as mem:
            with mem.open(
                driver="GTiff", width=width, height=height, count=count, dtype=pixels.dtype
            ) as dst:
                dst.write(pixels)
            return bytes(mem.read())
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    raise TypeError(
        f"image must be a file path, bytes or a numpy array, not {type(image).__name__}"
    )


def _ref(item: tuple[str, str] | pystac.Item) -> dict[str, str]:
    if isinstance(item, pystac.Item):
        return {"collection": item.collection_id or "", "id": item.id}
    return {"collection": item[0], "id": item[1]}


def distances(items: Iterable[pystac.Item]) -> Iterator[tuple[pystac.Item, float]]:
    """Each item with the distance the server put in its properties."""
    for item in items:
        yield item, item.properties[DISTANCE]
