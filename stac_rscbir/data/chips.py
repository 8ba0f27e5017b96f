"""Cutting scenes into model-sized chips, and the STAC Items of a derived chip collection.

A scene read onto one pixel grid (``data`` (bands, H, W), ``valid`` (H, W), ``transform``, ``crs``,
as :mod:`stac_rscbir.data.reader` returns it) is tiled into ``size`` x ``size`` windows:

>>> kept, dropped = make_chips(pixels.valid, pixels.transform, pixels.crs, size=120)
>>> batch = np.stack([chip_pixels(pixels.data, c) for c in kept])
>>> items = [chip_item(scene_item, c, source_asset="visual") for c in kept]

Conventions:

* Windows are in pixels of the grid the chips are cut from (the reader's output grid); with
  ``source_asset`` the chip item says which asset of the scene has that grid. Offsets and sizes
  follow rasterio's :class:`~rasterio.windows.Window` (``col_off``, ``row_off``, ``width``,
  ``height``).
* Tiling is row-major with ``stride`` (default ``size``, no overlap). When a dimension is not a
  multiple of the stride, the last row/column of windows is shifted back to end at the scene edge,
  so every pixel is covered and every chip is full-size (the last two overlap a little).
* A chip's transform is ``scene_transform @ Affine.translation(col_off, row_off)``; its pixel
  (0, 0) corner is the scene's pixel (col_off, row_off) corner.
* Items patch-sized for the model (:func:`is_patch`, e.g. a 120x120 BigEarthNet patch for a
  120 px model) are encoded whole and never chipped.
* A chip Item (:func:`chip_item`) has id ``<scene>-chip-r<row_off>-c<col_off>``, the chip's
  WGS84 footprint, the scene's datetime and common metadata, ``proj:`` fields of the chip grid,
  ``cbir:chip`` with its window, a ``derived_from`` link to the scene and no assets of its own:
  its pixels are read from the scene through the window (the API serves the link as its URL of
  the scene and adds a rendered ``thumbnail`` asset: :mod:`stac_rscbir.api.assets`). Chip Items
  live in the collection ``<scene collection>-chips`` (:func:`chip_collection`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt
import pystac
import shapely.affinity
from affine import Affine
from pyproj import CRS, Transformer
from pystac.extensions.projection import ProjectionExtension
from rasterio.windows import Window
from shapely.geometry import MultiPolygon, Polygon, box, mapping
from shapely.geometry.polygon import orient

from stac_rscbir.data.chiplinks import CHIP_SUFFIX, DERIVED_FROM
from stac_rscbir.extension.cbir import CBIRExtension, CBIRModel, ChipWindow

__all__ = [
    "CHIP_SUFFIX",
    "DERIVED_FROM",
    "Chip",
    "chip_collection",
    "chip_id",
    "chip_item",
    "chip_pixels",
    "chip_windows",
    "is_patch",
    "make_chips",
    "scene_chip_collection_id",
]

#: Common metadata copied from the scene to its chips (eo:cloud_cover and the like describe the
#: whole scene, not the chip, and are left out).
COMMON_METADATA: tuple[str, ...] = ("platform", "constellation", "mission", "instruments", "gsd")
#: Decimal places kept in chip footprints (1e-8 degree is about 1 mm).
COORD_DECIMALS: int = 8


@lru_cache(maxsize=64)
def _to_wgs84(crs: str) -> Transformer:
    return Transformer.from_crs(CRS.from_user_input(crs), "EPSG:4326", always_xy=True)


@dataclass(frozen=True)
class Chip:
    """One window of a scene grid: where it lies, its own georeferencing and how valid it is."""

    row_off: int
    col_off: int
    height: int
    width: int
    #: The chip's own transform: ``scene_transform @ Affine.translation(col_off, row_off)``.
    transform: Affine
    crs: str
    #: Fraction of the chip's pixels that are valid (not nodata, not masked as cloud).
    valid_fraction: float = 1.0
    #: (rows, cols) of the scene grid the window was cut from, when known.
    scene_shape: tuple[int, int] | None = None

    @classmethod
    def from_scene(
        cls,
        scene_transform: Affine,
        crs: str,
        row_off: int,
        col_off: int,
        height: int,
        width: int,
        valid_fraction: float = 1.0,
        scene_shape: tuple[int, int] | None = None,
    ) -> Chip:
        """The chip at (row_off, col_off) of a scene grid; its transform is derived."""
        transform = scene_transform @ Affine.translation(col_off, row_off)
        return cls(
            row_off, col_off, height, width, transform, crs, float(valid_fraction), scene_shape
        )

    @property
    def window(self) -> Window:
        """The rasterio window of the chip in the scene grid."""
        return Window(self.col_off, self.row_off, self.width, self.height)

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the chip."""
        return (self.height, self.width)

    def corners_native(self) -> list[tuple[float, float]]:
        """(x, y) of the chip's outer pixel corners in the scene CRS: UL, UR, LR, LL."""
        t, w, h = self.transform, self.width, self.height
        return [t @ (0, 0), t @ (w, 0), t @ (w, h), t @ (0, h)]

    def geometry_native(self) -> Polygon:
        """The chip footprint in the scene CRS (a box for north-up grids), counter-clockwise."""
        return orient(Polygon(self.corners_native()), 1.0)

    def _ring_wgs84(self, densify_pts: int) -> tuple[npt.NDArray[np.float64], ...]:
        """Lon/lat of the boundary, ``densify_pts`` extra points on each edge, in pixel order."""
        n = densify_pts + 1
        f = np.arange(n) / n
        w, h = self.width, self.height
        cols = np.concatenate([f * w, np.full(n, w), (1 - f) * w, np.zeros(n)])
        rows = np.concatenate([np.zeros(n), f * h, np.full(n, h), (1 - f) * h])
        xs, ys = self.transform @ (cols, rows)
        lon, lat = _to_wgs84(self.crs).transform(xs, ys)
        return np.asarray(lon, dtype=float), np.asarray(lat, dtype=float)

    def geometry_wgs84(self, densify_pts: int = 4) -> Polygon | MultiPolygon:
        """The footprint in EPSG:4326 (lon, lat), counter-clockwise.

        Each edge is densified with ``densify_pts`` points before reprojection, so the curved
        image of a grid line is followed (corners alone are off by up to ~0.5 m for a 256 px
        30 m UTM chip and ~300 m for a whole S2 tile; 4 points cut that ~25-fold). A chip across
        the antimeridian is split into a MultiPolygon at +-180 (RFC 7946, 3.1.9).
        """
        if densify_pts < 0:
            raise ValueError(f"densify_pts must be >= 0, got {densify_pts}")
        lon, lat = self._ring_wgs84(densify_pts)
        if np.ptp(lon) <= 180.0:
            return orient(Polygon(zip(lon, lat, strict=True)), 1.0)
        unwrapped = Polygon(zip(np.where(lon < 0, lon + 360.0, lon), lat, strict=True))
        west = unwrapped.intersection(box(-180.0, -90.0, 180.0, 90.0))
        east = shapely.affinity.translate(
            unwrapped.intersection(box(180.0, -90.0, 540.0, 90.0)), xoff=-360.0
        )
        parts = [orient(p, 1.0) for g in (west, east) for p in getattr(g, "geoms", [g])]
        return MultiPolygon([p for p in parts if isinstance(p, Polygon) and not p.is_empty])

    @property
    def bbox_wgs84(self) -> list[float]:
        """[west, south, east, north] in degrees; west > east when crossing the antimeridian."""
        geom = self.geometry_wgs84()
        if isinstance(geom, Polygon):
            return list(geom.bounds)
        # parts on the east of +180 (wrapped to negative lon) and on the west of it
        lon, lat = self._ring_wgs84(4)
        return [
            float(lon[lon > 0].min()),
            float(lat.min()),
            float(lon[lon < 0].max()),
            float(lat.max()),
        ]


def chip_id(scene_id: str, chip: Chip) -> str:
    """The id of a chip Item: ``<scene>-chip-r<row_off>-c<col_off>``."""
    return f"{scene_id}-chip-r{chip.row_off}-c{chip.col_off}"


def _offsets(n: int, size: int, stride: int, dim: str) -> list[int]:
    if n < size:
        raise ValueError(
            f"scene {dim} of {n} px is smaller than the chip size of {size} px; "
            "encode it whole (is_patch) or resample it"
        )
    offs = list(range(0, n - size + 1, stride))
    if offs[-1] + size < n:
        offs.append(n - size)
    return offs


def chip_windows(
    height: int, width: int, size: int, stride: int | None = None
) -> list[tuple[int, int]]:
    """(row_off, col_off) of ``size`` x ``size`` windows covering a height x width grid.

    Row-major; ``stride`` defaults to ``size`` and must lie in [1, size] so every pixel is
    covered. Where the grid is not a multiple, the last row/column is shifted back to the edge.
    """
    stride = size if stride is None else stride
    if size < 1:
        raise ValueError(f"chip size must be >= 1, got {size}")
    if not 1 <= stride <= size:
        raise ValueError(f"stride must be in [1, size={size}] to cover every pixel, got {stride}")
    rows = _offsets(height, size, stride, "height")
    cols = _offsets(width, size, stride, "width")
    return [(r, c) for r in rows for c in cols]


def make_chips(
    valid: npt.ArrayLike,
    transform: Affine,
    crs: str,
    size: int,
    stride: int | None = None,
    min_valid: float = 0.9,
) -> tuple[list[Chip], list[Chip]]:
    """Tile the grid of the (H, W) ``valid`` mask into chips: (kept, dropped).

    Dropped chips have a valid fraction below ``min_valid`` (mostly nodata or cloud); both lists
    are in :func:`chip_windows` order.
    """
    mask = np.asarray(valid)
    if mask.ndim != 2:
        raise ValueError(f"valid must be an (H, W) mask, got shape {mask.shape}")
    if not 0.0 <= min_valid <= 1.0:
        raise ValueError(f"min_valid must be in [0, 1], got {min_valid}")
    height, width = mask.shape
    # summed-area table: the valid count of any window in O(1)
    sat = np.zeros((height + 1, width + 1), dtype=np.int64)
    sat[1:, 1:] = mask.astype(bool).cumsum(0).cumsum(1)
    kept: list[Chip] = []
    dropped: list[Chip] = []
    for r, c in chip_windows(height, width, size, stride):
        count = sat[r + size, c + size] - sat[r, c + size] - sat[r + size, c] + sat[r, c]
        chip = Chip.from_scene(
            transform, crs, r, c, size, size, int(count) / (size * size), (height, width)
        )
        (kept if chip.valid_fraction >= min_valid else dropped).append(chip)
    return kept, dropped


def chip_pixels(data: np.ndarray, chip: Chip) -> np.ndarray:
    """The chip's pixels of ``data`` (..., H, W) as a view: (bands, height, width) for a scene."""
    rows, cols = data.shape[-2:]
    if chip.row_off + chip.height > rows or chip.col_off + chip.width > cols:
        raise ValueError(f"chip window {chip.window} lies outside the data's grid {(rows, cols)}")
    return data[
        ..., chip.row_off : chip.row_off + chip.height, chip.col_off : chip.col_off + chip.width
    ]


def is_patch(height: int, width: int, size: int, tolerance: float = 0.1) -> bool:
    """Whether a height x width item is model-sized (within ``tolerance`` of ``size`` each way).

    Such items (a 120x120 BigEarthNet patch for a 120 px model) are encoded whole, not chipped.
    """
    return all(abs(n - size) <= tolerance * size for n in (height, width))


def scene_chip_collection_id(collection_id: str) -> str:
    """The id of the collection holding the chips of ``collection_id``'s scenes."""
    return f"{collection_id}{CHIP_SUFFIX}"


def _round(obj: Any, decimals: int) -> Any:
    if isinstance(obj, float):
        return round(obj, decimals)
    if isinstance(obj, list | tuple):
        return [_round(v, decimals) for v in obj]
    if isinstance(obj, dict):
        return {k: _round(v, decimals) for k, v in obj.items()}
    return obj


def _scene_href(scene: pystac.Item, href_base: str | None) -> str:
    self_href = scene.get_self_href()
    if self_href:
        return self_href
    if href_base:
        if "{" in href_base:
            if "{collection}" in href_base and not scene.collection_id:
                raise ValueError(f"href_base {href_base!r} needs the scene's collection id")
            return href_base.format(id=scene.id, collection=scene.collection_id)
        return f"{href_base.rstrip('/')}/{scene.id}"
    return f"./{scene.id}.json"


def _proj_code(crs: str) -> tuple[str | None, str | None]:
    """(proj:code, proj:wkt2) for ``crs``: the authority code when it has one, else WKT2."""
    parsed = CRS.from_user_input(crs)
    auth = parsed.to_authority(min_confidence=100)
    if auth is not None:
        return f"{auth[0]}:{auth[1]}", None
    return None, parsed.to_wkt()


def chip_item(
    scene: pystac.Item,
    chip: Chip,
    source_asset: str | None = None,
    href_base: str | None = None,
) -> pystac.Item:
    """A new Item for ``chip`` of ``scene``, for the derived chip collection.

    The ``derived_from`` link points at the scene's self href; without one, at ``href_base``
    (``"{href_base}/{scene id}"``, or ``href_base.format(id=..., collection=...)`` when it is a
    template, e.g. ``"https://api/collections/{collection}/items/{id}"``); without either, at
    ``./<scene id>.json`` (a sibling file, as in the extension's chip example), to be rewritten
    when the catalog is saved. ``source_shape`` is the chip's scene grid, else the scene's (or
    ``source_asset``'s) ``proj:shape``. The scene's assets are not copied. The Item belongs to no
    collection yet: add it to :func:`chip_collection`'s collection (``Collection.add_item``).
    """
    geom = chip.geometry_wgs84()
    props: dict[str, Any] = {
        k: copy.deepcopy(scene.properties[k]) for k in COMMON_METADATA if k in scene.properties
    }
    for key in ("start_datetime", "end_datetime"):
        if key in scene.properties:
            props[key] = scene.properties[key]
    item = pystac.Item(
        id=chip_id(scene.id, chip),
        geometry=_round(mapping(geom), COORD_DECIMALS),
        bbox=_round(chip.bbox_wgs84, COORD_DECIMALS),
        datetime=scene.datetime,
        properties=props,
    )
    code, wkt2 = _proj_code(chip.crs)
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        code=code,
        wkt2=wkt2,
        shape=[chip.height, chip.width],
        transform=[float(v) for v in list(chip.transform)[:6]],
    )
    source_shape = chip.scene_shape or _scene_shape(scene, source_asset)
    CBIRExtension.ext(item, add_if_missing=True).chip = ChipWindow.create(
        chip.col_off,
        chip.row_off,
        chip.width,
        chip.height,
        source_asset=source_asset,
        source_shape=source_shape,
    )
    item.add_link(
        pystac.Link(
            DERIVED_FROM, _scene_href(scene, href_base), pystac.MediaType.GEOJSON, "Source scene"
        )
    )
    return item


def _scene_shape(scene: pystac.Item, source_asset: str | None) -> tuple[int, int] | None:
    shape = None
    if source_asset is not None and source_asset in scene.assets:
        shape = scene.assets[source_asset].extra_fields.get("proj:shape")
    shape = shape or scene.properties.get("proj:shape")
    return (int(shape[0]), int(shape[1])) if shape else None


def chip_collection(
    scene_collection: pystac.Collection,
    *,
    chip_size: int | None = None,
    stride: int | None = None,
    models: Sequence[CBIRModel] | None = None,
    description: str | None = None,
    href: str | None = None,
) -> pystac.Collection:
    """The derived collection ``<scene collection>-chips`` for the chips of its scenes.

    Its extent, license, providers and keywords are the scene collection's; a ``derived_from``
    link points at the scene collection (its self href, else ``href``, else the pystac
    default layout's sibling ``../<id>/collection.json``). The ``cbir`` extension is declared
    with ``cbir:models`` when ``models`` are given (a declared extension with no ``cbir:``
    field would not validate; the ingestion worker adds the models or code summaries later).
    """
    cid = scene_chip_collection_id(scene_collection.id)
    if description is None:
        how = f" of {chip_size}x{chip_size} px" if chip_size else ""
        step = f", stride {stride} px" if stride else ""
        description = (
            f"Chips{how}{step} cut from the scenes of {scene_collection.id} for content-based "
            "image retrieval; each chip Item links its scene (derived_from) and gives its pixel "
            "window (cbir:chip)."
        )
    collection = pystac.Collection(
        id=cid,
        description=description,
        extent=scene_collection.extent.clone(),
        title=f"{scene_collection.title or scene_collection.id} chips",
        license=scene_collection.license,
        keywords=list(scene_collection.keywords or []) or None,
        providers=list(scene_collection.providers or []) or None,
    )
    if models:
        CBIRExtension.ext(collection, add_if_missing=True).models = list(models)
    scene_href = (
        scene_collection.get_self_href() or href or f"../{scene_collection.id}/collection.json"
    )
    collection.add_link(
        pystac.Link(DERIVED_FROM, scene_href, pystac.MediaType.JSON, "Scene collection")
    )
    return collection
