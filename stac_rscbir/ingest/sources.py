"""Where items to encode come from: a static catalog, an ItemCollection file, a STAC API search."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pystac


class SourceError(ValueError):
    """A source that cannot be read at all (not one bad item: those go to the run report)."""


def items_from_file(path: Path) -> Iterator[pystac.Item]:
    """Items of a local STAC file: a catalog or collection (walked, with self hrefs kept so a
    catalog sink can write each item back in place), an ItemCollection, or a single item."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"STAC source not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: not a readable JSON file: {exc}") from exc
    kind = data.get("type") if isinstance(data, dict) else None
    if kind in ("Catalog", "Collection"):
        catalog = pystac.read_file(str(path))
        assert isinstance(catalog, pystac.Catalog)
        yield from catalog.get_items(recursive=True)
    elif kind == "FeatureCollection":
        collection = pystac.ItemCollection.from_file(str(path))
        for item in collection:
            item.make_asset_hrefs_absolute()
            yield item
    elif kind == "Feature":
        yield pystac.Item.from_file(str(path))
    else:
        raise SourceError(
            f"{path}: expected a STAC Catalog, Collection, ItemCollection or Item, "
            f"got type {kind!r}"
        )


def items_from_api(
    url: str, search: Mapping[str, Any] | None = None, max_items: int | None = None
) -> Iterator[pystac.Item]:
    """Items of a STAC API search (any pystac-client ``search`` argument: bbox, datetime,
    collections, query, filter, ...), page by page."""
    from pystac_client import Client

    client = Client.open(url)
    results = client.search(**dict(search or {}), max_items=max_items)
    yield from results.items()


def open_source(spec: str, search: Mapping[str, Any] | None = None) -> Iterator[pystac.Item]:
    """Items from ``spec``: an ``http(s)://`` STAC API root (searched with ``search``) or a file."""
    if spec.startswith(("http://", "https://")):
        return items_from_api(spec, search)
    if search:
        raise SourceError("search parameters apply to a STAC API source, not to a file")
    return items_from_file(Path(spec))


def items_from_store(
    store: Any, collections: list[str] | None = None, page_size: int = 500
) -> Iterator[pystac.Item]:
    """Items of the search service's store (any ItemStore, e.g. the embedded SQLite one)."""
    from stac_rscbir.store.base import SearchQuery

    token = None
    while True:
        page = store.search(SearchQuery(collections=collections, limit=page_size, token=token))
        for d in page.items:
            yield pystac.Item.from_dict(d)
        token = page.next_token
        if not token:
            return
