"""What the API serves of items' links and assets: only hrefs a client can follow.

Stored items carry what their catalog had: relative links (``./<scene>.json``,
``../collection.json``) and asset hrefs that are server file paths. Served as they are, they
point nowhere. The rule
(:class:`Hrefs`, applied to every item and collection the API serves):

* links: the API's own (self, parent, collection, root, items) are made by the API; a chip's
  ``derived_from`` link points at the API's URL of its scene (and a chip collection's at its
  scene collection); other ``http(s)`` links are kept; any other link (relative, ``file:``) is
  dropped, since nothing on the API answers it.
* assets: ``http(s)`` hrefs are kept (the source's own URLs); a local file under one of the
  allowed ``asset_roots`` (symlinks resolved) is served by the API at
  ``/collections/{c}/items/{i}/assets/{key}``; any other asset is dropped. Nothing outside the
  roots is ever served: the file is found from the stored item, never from the request path.
* a chip item gets a ``thumbnail`` asset: the one ingestion wrote (``roles: ["thumbnail"]``, a
  PNG under the asset roots, served as above, stretched per scene by
  :mod:`stac_rscbir.data.render`); a chip without one gets
  ``/collections/{c}/items/{i}/thumbnail``, a PNG of the scene's red, green and blue bands (or
  VV and VH) under the chip, rendered on request by the same renderer from the scene's files
  under the asset roots (so only when roots are configured) over the chip's bbox only (so
  stretched over the chip, not the scene: ``stac-rscbir thumbnails`` writes the per-scene ones).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import attr
import numpy as np
from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse, Response
from stac_fastapi.types.extension import ApiExtension

from stac_rscbir.data.chiplinks import CHIP_SUFFIX, DERIVED_FROM, chip_source
from stac_rscbir.data.render import Look, chip_slices, png_bytes
from stac_rscbir.extras import require
from stac_rscbir.store.base import ItemStore, NotFoundError

THUMBNAIL = "thumbnail"
_API_RELS = {"self", "parent", "collection", "root", "items"}


def _is_url(href: object) -> bool:
    return isinstance(href, str) and href.startswith(("http://", "https://"))


def _item_url(base: str, collection_id: str, item_id: str) -> str:
    return f"{base}collections/{quote(collection_id, safe='')}/items/{quote(item_id, safe='')}"


@attr.s(frozen=True)
class Hrefs:
    """The serving rule for links and asset hrefs (see the module doc)."""

    asset_roots: tuple[Path, ...] = attr.ib(
        default=(), converter=lambda roots: tuple(Path(r).resolve() for r in roots)
    )

    def local_file(self, href: object) -> Path | None:
        """The file an asset href names when it lies under an allowed root, else None."""
        if not self.asset_roots or not isinstance(href, str) or _is_url(href):
            return None
        path = unquote(href[len("file://") :]) if href.startswith("file://") else href
        if not Path(path).is_absolute():
            return None
        try:
            resolved = Path(path).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not resolved.is_file():
            return None
        return resolved if any(resolved.is_relative_to(r) for r in self.asset_roots) else None

    def _links(self, links: Any, derived_from: str | None) -> list[dict[str, Any]]:
        out = []
        for link in links if isinstance(links, list) else []:
            if not isinstance(link, dict) or link.get("rel") in _API_RELS:
                continue
            if link.get("rel") == DERIVED_FROM and derived_from is not None:
                out.append({**link, "href": derived_from})
            elif _is_url(link.get("href")):
                out.append(link)
        return out

    def item(self, item: dict[str, Any], base: str) -> dict[str, Any]:
        """The item's stored links and assets as served (the API's own links not included)."""
        url = _item_url(base, str(item.get("collection")), str(item.get("id")))
        scene = chip_source(item)
        item["links"] = self._links(
            item.get("links"), _item_url(base, *scene) if scene is not None else None
        )
        assets: dict[str, Any] = {}
        stored = item.get("assets")
        for key, asset in (stored if isinstance(stored, dict) else {}).items():
            if not isinstance(asset, dict):
                continue
            if _is_url(asset.get("href")):
                assets[key] = asset
            elif self.local_file(asset.get("href")) is not None:
                assets[key] = {**asset, "href": f"{url}/assets/{quote(str(key), safe='')}"}
        if scene is not None and self.asset_roots:  # rendered from scene files under the roots
            assets.setdefault(
                THUMBNAIL,
                {
                    "href": f"{url}/{THUMBNAIL}",
                    "type": "image/png",
                    "title": "The chip's window of its scene (RGB, 2-98 % stretch)",
                    "roles": [THUMBNAIL],
                },
            )
        item["assets"] = assets
        return item

    def taken_back(
        self, item: dict[str, Any], base: str, stored: Callable[[], dict[str, Any] | None]
    ) -> dict[str, Any]:
        """An item written through the API with what :meth:`item` made of it undone, so that
        an item read from the API and written back (``ApiSink``) keeps its stored hrefs: the
        API's URL of one of its assets becomes that asset's stored href again (``stored()``:
        the item as stored, None when new), the generated thumbnail is dropped."""
        assets = item.get("assets")
        if not isinstance(assets, dict):
            return item
        url = _item_url(base, str(item.get("collection")), str(item.get("id")))
        served = f"{url}/assets/"
        kept: dict[str, Any] = {}
        before: dict[str, Any] | None = None
        for key, asset in assets.items():
            href = asset.get("href") if isinstance(asset, dict) else None
            if href == f"{url}/{THUMBNAIL}":
                continue
            if isinstance(href, str) and href.startswith(served):
                if before is None:
                    before = (stored() or {}).get("assets") or {}
                old = before.get(unquote(href[len(served) :]))
                if isinstance(old, dict) and isinstance(old.get("href"), str):
                    asset = {**asset, "href": old["href"]}
            kept[key] = asset
        item["assets"] = kept
        return item

    def collection(self, collection: dict[str, Any], base: str) -> dict[str, Any]:
        """The collection's stored links and assets as served (the API's own not included)."""
        cid = str(collection.get("id"))
        scenes = cid.removesuffix(CHIP_SUFFIX) if cid.endswith(CHIP_SUFFIX) else None
        derived = f"{base}collections/{quote(scenes, safe='')}" if scenes else None
        collection["links"] = self._links(collection.get("links"), derived)
        if isinstance(collection.get("assets"), dict):
            collection["assets"] = {
                k: a
                for k, a in collection["assets"].items()
                if isinstance(a, dict) and _is_url(a.get("href"))
            }
        return collection


@attr.s
class AssetsExtension(ApiExtension):
    """The endpoints behind served hrefs: chip thumbnails and files under the asset roots."""

    store: ItemStore = attr.ib(kw_only=True)
    hrefs: Hrefs = attr.ib(factory=Hrefs, kw_only=True)
    conformance_classes: list[str] = attr.ib(factory=list)
    router: APIRouter = attr.ib(factory=APIRouter)

    def register(self, app: FastAPI) -> None:
        """Add GET .../items/{item_id}/thumbnail and .../items/{item_id}/assets/{key}."""
        self.router.prefix = app.state.router_prefix
        item = "/collections/{collection_id}/items/{item_id}"
        self.router.add_api_route(
            f"{item}/{THUMBNAIL}",
            self.thumbnail,
            methods=["GET"],
            name="Chip thumbnail",
            response_class=Response,
            responses={200: {"content": {"image/png": {}}}},
        )
        self.router.add_api_route(
            f"{item}/assets/{{asset_key}}",
            self.asset,
            methods=["GET"],
            name="Item asset file",
            response_class=FileResponse,
        )
        app.include_router(self.router, tags=["Assets"])

    def _item(self, collection_id: str, item_id: str) -> dict[str, Any]:
        try:
            return self.store.get_item(collection_id, item_id)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from exc

    def asset(self, collection_id: str, item_id: str, asset_key: str) -> FileResponse:
        """The file of a local asset under the asset roots (404 for anything else)."""
        asset = (self._item(collection_id, item_id).get("assets") or {}).get(asset_key)
        path = self.hrefs.local_file(asset.get("href") if isinstance(asset, dict) else None)
        if path is None:
            raise HTTPException(
                404, f"item {item_id!r} has no asset {asset_key!r} that this server serves"
            )
        media = asset.get("type") if isinstance(asset.get("type"), str) else None
        return FileResponse(path, media_type=media, filename=path.name)

    def thumbnail(self, collection_id: str, item_id: str) -> Response:
        """A PNG of a chip: the scene's red, green and blue bands (or VV and VH) over the chip's
        footprint."""
        chip = self._item(collection_id, item_id)
        scene_key = chip_source(chip)
        if scene_key is None:
            raise HTTPException(404, f"item {item_id!r} is not a chip: it has no thumbnail")
        scene = self._item(*scene_key)
        try:
            require("rendering a chip thumbnail", "ingest")  # the scene reader (odc-stac)
            data, valid, bands = chip_window(chip, scene, self.hrefs)
            look = Look.of(data, valid, bands)
            if look is None:
                raise ValueError("it has neither red, green and blue nor VV and VH bands")
        except Exception as exc:  # unreadable rasters, no RGB bands: the reader says which
            raise HTTPException(
                404, f"the thumbnail of {item_id!r} cannot be rendered: {exc}"
            ) from exc
        return Response(png_bytes(look.rgba(data, valid)), media_type="image/png")


def chip_window(
    chip: dict[str, Any], scene: dict[str, Any], hrefs: Hrefs
) -> tuple[np.ndarray, np.ndarray, tuple[Any, ...]]:
    """The scene's display bands (red, green, blue, or VV and VH:
    :func:`~stac_rscbir.data.reader.display_profile`), their validity and specs, under the chip:
    read over the chip's bbox only, then cut to its grid (``proj:transform``, ``proj:shape``)
    when it has one. Only the scene's files under ``hrefs``' roots are read: never another
    server file, never a remote URL."""
    import pystac

    from stac_rscbir.data.reader import display_profile, read_item

    scene = dict(scene)
    assets = scene.get("assets") if isinstance(scene.get("assets"), dict) else {}
    scene["assets"] = {
        k: a for k, a in assets.items() if isinstance(a, dict) and hrefs.local_file(a.get("href"))
    }
    item = pystac.Item.from_dict(scene)
    profile = display_profile(item)
    pixels = read_item(item, profile, bbox=tuple(chip["bbox"]))
    data, valid = pixels.data, pixels.valid
    window = chip_slices(chip["properties"], pixels.transform, valid.shape)
    if window is not None:  # the chip's own grid, cut from the bbox read
        data, valid = data[(slice(None), *window)], valid[window]
    return data, valid, profile.bands
