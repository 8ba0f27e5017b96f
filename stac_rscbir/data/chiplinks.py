"""How a chip item names its scene: the chip collection's id suffix, the ``derived_from`` link,
and its inverse (:func:`chip_source`). Standard library only, so that the API (no rasterio in
a light install) and ingestion share one owner with :mod:`stac_rscbir.data.chips`, which writes
the links."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

#: Suffix of the derived chip collection's id.
CHIP_SUFFIX: str = "-chips"
#: Link relation from a chip (collection) to its scene (collection).
DERIVED_FROM: str = "derived_from"


def chip_source(item: dict[str, Any]) -> tuple[str, str] | None:
    """(collection, id) of the scene a chip item was cut from; None for other items.

    The scene is the chip's ``derived_from`` link: an API URL ``.../collections/{c}/items/{i}``,
    or a file ``[...]/<scene id>[.json]`` in the chip collection's scene collection
    (``<scene collection>-chips``, as :func:`stac_rscbir.data.chips.chip_item` writes it).
    """
    props = item.get("properties")
    if not isinstance(props, dict) or "cbir:chip" not in props:
        return None
    for link in item.get("links") or []:
        if not isinstance(link, dict) or link.get("rel") != DERIVED_FROM:
            continue
        href = link.get("href")
        if not isinstance(href, str) or not href:
            continue
        parts = [unquote(p) for p in urlsplit(href).path.split("/") if p]
        if len(parts) >= 4 and parts[-4] == "collections" and parts[-2] == "items":
            return parts[-3], parts[-1]
        collection = str(item.get("collection") or "")
        if parts and collection.endswith(CHIP_SUFFIX):
            return collection.removesuffix(CHIP_SUFFIX), parts[-1].removesuffix(".json")
    return None
