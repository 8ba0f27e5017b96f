"""Thumbnails as STAC assets: where their files go, the asset that names them, and the backfill
of a store or catalog whose chips were ingested without them (``stac-rscbir thumbnails``).

Files: ``<folder>/<collection>/<item id>.png`` under one thumbnails folder (the ``--thumbnails``
folder of ``stac-rscbir ingest``; ``<catalog>/thumbnails`` for a catalog sink), written
atomically before the item that names them. The asset: key ``thumbnail``, ``roles:
["thumbnail"]``, ``type: image/png``, the file's absolute path as href; the API serves it when the
folder is one of its asset roots (``stac-rscbir serve --asset-root``). A chip's thumbnail is its
window of the scene rendered with the scene's :class:`~stac_rscbir.data.render.Look`; a scene's
quicklook is the whole scene, at most :data:`~stac_rscbir.data.render.QUICKLOOK_SIZE` px.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pystac
from tqdm.auto import tqdm

from stac_rscbir.data.chiplinks import chip_source
from stac_rscbir.data.render import Look, chip_slices, png_bytes
from stac_rscbir.fsutil import atomic_write, atomic_write_text

THUMBNAIL = "thumbnail"  # the asset key and role (stac_rscbir.api.assets.THUMBNAIL)
MEDIA_TYPE = "image/png"


def thumbnail_path(folder: Path, collection: str | None, item_id: str) -> Path:
    """Where the thumbnail of an item goes under ``folder``."""
    return Path(folder).resolve() / (collection or "items") / f"{item_id}.png"


def thumbnail_asset(path: Path, title: str) -> dict[str, Any]:
    """The asset of a thumbnail file."""
    return {"href": str(path), "type": MEDIA_TYPE, "title": title, "roles": [THUMBNAIL]}


def has_thumbnail(item: dict[str, Any]) -> bool:
    """Whether an item dict names a thumbnail asset that is a URL or a file that exists."""
    asset = (item.get("assets") or {}).get(THUMBNAIL)
    href = asset.get("href") if isinstance(asset, dict) else None
    if not isinstance(href, str):
        return False
    return href.startswith(("http://", "https://")) or Path(href).is_file()


def save_png(folder: Path, collection: str | None, item_id: str, png: bytes) -> Path:
    """Write an item's thumbnail file (atomically); its path."""
    path = thumbnail_path(folder, collection, item_id)
    atomic_write(path, lambda tmp: tmp.write_bytes(png))
    return path


def write_thumbnail(folder: Path, item: pystac.Item, png: bytes, title: str) -> None:
    """Write ``png`` as ``item``'s thumbnail file and give the item its asset (a thumbnail the
    item already has, e.g. a provider's preview URL, is kept: nothing is written)."""
    if THUMBNAIL in item.assets:
        return
    path = save_png(folder, item.collection_id, item.id, png)
    item.add_asset(THUMBNAIL, pystac.Asset.from_dict(thumbnail_asset(path, title)))


CHIP_TITLE = "The chip (its scene's stretch)"
SCENE_TITLE = "Quicklook of the scene"


@dataclass
class ThumbnailReport:
    """What a backfill run did."""

    scenes_seen: int = 0
    scenes_done: int = 0
    files_written: int = 0
    errors: list[str] = field(default_factory=list)


def render_scene(scene: pystac.Item, chips: Iterable[dict[str, Any]]) -> tuple[bytes, list[bytes]]:
    """The quicklook of a scene and the thumbnails of ``chips`` (their ``proj:`` grid located in
    the grid read), all with one look: the scene is read once."""
    from stac_rscbir.data.reader import display_profile, read_item

    profile = display_profile(scene)
    pixels = read_item(scene, profile)
    look = Look.of(pixels.data, pixels.valid, profile.bands)
    if look is None:
        raise ValueError(f"{scene.id}: no band to show")
    pngs = []
    for chip in chips:
        window = chip_slices(chip["properties"], pixels.transform, pixels.valid.shape)
        if window is None:
            raise ValueError(f"{chip['id']}: its grid does not lie on its scene's")
        image = look.rgba(pixels.data[(slice(None), *window)], pixels.valid[window])
        pngs.append(png_bytes(image))
    return png_bytes(look.quicklook(pixels.data, pixels.valid)), pngs


class _StoreItems:
    """The items of an ItemStore; a thumbnail is added by upserting the item."""

    def __init__(self, store: Any, collections: list[str] | None) -> None:
        self.store = store
        self.collections = None if collections is None else [f"{c}-chips" for c in collections]

    def chips(self) -> Iterator[dict[str, Any]]:
        from stac_rscbir.ingest.sources import items_from_store

        for item in items_from_store(self.store, self.collections):
            yield item.to_dict(include_self_link=False, transform_hrefs=False)

    def scene(self, collection: str, item_id: str) -> tuple[dict[str, Any], pystac.Item]:
        stored = self.store.get_item(collection, item_id)
        return stored, pystac.Item.from_dict(stored)

    def save(self, items: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        self.store.upsert_items([{**d, "assets": {**d["assets"], THUMBNAIL: a}} for d, a in items])


class _CatalogItems:
    """The items of a static catalog on disk; a thumbnail is added to the item's file (the rest
    of the file as it was)."""

    def __init__(self, catalog: Path, collections: list[str] | None) -> None:
        from stac_rscbir.ingest.sources import items_from_file

        wanted = None if collections is None else {f"{c}-chips" for c in collections}
        self.items: dict[tuple[str, str], pystac.Item] = {}
        self.wanted = wanted
        for item in items_from_file(Path(catalog)):
            self.items[(item.collection_id or "", item.id)] = item

    def chips(self) -> Iterator[dict[str, Any]]:
        for (collection, _), item in self.items.items():
            if self.wanted is None or collection in self.wanted:
                yield _as_dict(item)

    def scene(self, collection: str, item_id: str) -> tuple[dict[str, Any], pystac.Item]:
        item = self.items[(collection, item_id)]
        return _as_dict(item), item

    def save(self, items: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
        for d, asset in items:
            path = Path(str(self.items[(d["collection"], d["id"])].get_self_href()))
            stored = json.loads(path.read_text())
            stored["assets"] = {**(stored.get("assets") or {}), THUMBNAIL: asset}
            atomic_write_text(path, json.dumps(stored, indent=2) + "\n")


def _as_dict(item: pystac.Item) -> dict[str, Any]:
    d = item.to_dict(include_self_link=False, transform_hrefs=False)
    d["collection"] = item.collection_id
    return d


def backfill(
    source: Any,
    folder: Path,
    collections: list[str] | None = None,
    progress: bool = True,
) -> ThumbnailReport:
    """Give every chip of ``source`` (an ItemStore, or the path of a static catalog; of
    ``collections``' chips, or all) that lacks one a thumbnail, and its scene a quicklook.
    Scene by scene (read once): the files first, then the chips and the scene written, so a
    killed run resumes where it stopped and a second run writes nothing."""

    items = (
        _CatalogItems(source, collections)
        if isinstance(source, str | Path)
        else _StoreItems(source, collections)
    )
    todo: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for chip in items.chips():
        key = chip_source(chip)
        if key is not None:
            todo[key].append(chip)
    report = ThumbnailReport()
    bar = tqdm(total=len(todo), disable=not progress, unit="scene", desc="thumbnails")
    for (cid, sid), chips in sorted(todo.items()):
        report.scenes_seen += 1
        bar.update(1)
        scene, scene_item = items.scene(cid, sid)
        missing = [c for c in chips if not has_thumbnail(c)]
        if not missing and has_thumbnail(scene):
            continue
        try:
            quicklook, pngs = render_scene(scene_item, missing)
        except Exception as exc:  # one unreadable scene must not stop the run
            report.errors.append(f"{cid}/{sid}: {exc}")
            continue
        written = [
            (c, _file(folder, c, png, CHIP_TITLE)) for c, png in zip(missing, pngs, strict=True)
        ]
        if not has_thumbnail(scene):
            written.append((scene, _file(folder, scene, quicklook, SCENE_TITLE)))
        items.save(written)
        report.files_written += len(written)
        report.scenes_done += 1
    bar.close()
    return report


def _file(folder: Path, item: dict[str, Any], png: bytes, title: str) -> dict[str, Any]:
    """Write ``item``'s thumbnail file; its asset."""
    return thumbnail_asset(save_png(folder, item.get("collection"), str(item["id"]), png), title)
