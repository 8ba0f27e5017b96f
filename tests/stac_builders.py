"""Small real rasters and the STAC items that describe them, written by the tests themselves."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pystac
import rasterio
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from pystac.extensions.sar import Polarization, SarExtension
from rasterio.transform import Affine, from_origin
from rasterio.warp import transform_bounds

RGB = ("red", "green", "blue")
CRS = "EPSG:32633"
X0, Y0 = 500_000.0, 5_300_000.0


def write_cog(
    path: Path,
    pixels: np.ndarray,
    transform: Affine,
    crs: str | None = "EPSG:32633",
    nodata: float | None = 0,
) -> Path:
    """A (bands, H, W) array as a Cloud-Optimized GeoTIFF."""
    count, height, width = pixels.shape
    with rasterio.open(
        path,
        "w",
        driver="COG",
        width=width,
        height=height,
        count=count,
        dtype=pixels.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
        blocksize=256,
    ) as dst:
        dst.write(pixels)
    return path


def raster_item(
    item_id: str,
    path: Path,
    band_names: Sequence[str] = RGB,
    collection: str | None = "scenes",
    asset_key: str = "image",
    with_proj: bool = True,
) -> pystac.Item:
    """An item with one multi-band asset (eo:bands common names, raster:bands from the file)."""
    with rasterio.open(path) as src:
        crs, dtype, nodata = src.crs, src.dtypes[0], src.nodata
    raster = [RasterBand.create(data_type=DataType(dtype), nodata=nodata) for _ in band_names]
    eo = [Band.create(name=n, common_name=n) for n in band_names]
    item = make_item(
        item_id,
        {asset_key: {"href": path, "eo": eo, "raster": raster}},
        crs=crs.to_string() if with_proj and crs else None,
        properties={"platform": "test-sat"},
    )
    item.collection_id = collection
    return item


def static_catalog(root: Path, items: Sequence[pystac.Item], collection_id: str = "scenes") -> Path:
    """A self-contained static catalog (catalog -> collection -> items); returns catalog.json."""
    catalog = pystac.Catalog(id="test-catalog", description="test scenes")
    collection = pystac.Collection(
        id=collection_id,
        description="test scenes",
        extent=pystac.Extent(
            pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
            pystac.TemporalExtent([[datetime(2020, 1, 1, tzinfo=UTC), None]]),
        ),
        license="other",
    )
    catalog.add_child(collection)
    for item in items:
        collection.add_item(item)
    catalog.normalize_hrefs(str(root))
    catalog.save(catalog_type=pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json"


def write_cog_at(
    path: Path,
    arr: np.ndarray,
    res: float,
    *,
    nodata: float | None = None,
    crs: str = CRS,
    x0: float = X0,
    y0: float = Y0,
) -> Path:
    """A (bands, H, W) or (H, W) array as a COG with square ``res`` pixels from (x0, y0)."""
    arr = arr if arr.ndim == 3 else arr[None]
    return write_cog(path, arr, from_origin(x0, y0, res, res), crs, nodata)


def make_item(
    item_id: str,
    assets: dict[str, dict[str, Any]],
    *,
    crs: str | None = CRS,
    properties: dict[str, Any] | None = None,
) -> pystac.Item:
    """An item over local rasters; ``assets[key]``: href, eo (list of Band), raster (RasterBand)."""
    first = next(iter(assets.values()))["href"]
    with rasterio.open(first) as src:
        bounds, src_crs = src.bounds, src.crs
    # a file without a CRS gets a placeholder footprint (the reader must refuse it anyway)
    west, south, east, north = (
        transform_bounds(src_crs, "EPSG:4326", *bounds) if src_crs else (10.0, 45.0, 10.01, 45.01)
    )
    geometry = {
        "type": "Polygon",
        "coordinates": [
            [[west, south], [east, south], [east, north], [west, north], [west, south]]
        ],
    }
    item = pystac.Item(
        item_id, geometry, [west, south, east, north], dt.datetime(2020, 6, 1), properties or {}
    )
    if crs is not None:
        ProjectionExtension.ext(item, add_if_missing=True).code = crs
    for key, spec in assets.items():
        asset = pystac.Asset(str(spec["href"]), media_type=pystac.MediaType.COG, roles=["data"])
        item.add_asset(key, asset)
        with rasterio.open(spec["href"]) as src:
            proj = ProjectionExtension.ext(asset, add_if_missing=True)
            proj.shape = [src.height, src.width]
            proj.transform = list(src.transform)[:6]
        if spec.get("eo"):
            EOExtension.ext(asset, add_if_missing=True).bands = spec["eo"]
        if spec.get("raster"):
            RasterExtension.ext(asset, add_if_missing=True).bands = spec["raster"]
        if spec.get("sar"):
            SarExtension.ext(asset, add_if_missing=True).polarizations = [
                Polarization(p) for p in spec["sar"]
            ]
    return item


def ben_item(patch: Path, bands: tuple[str, ...]) -> pystac.Item:
    """An item referencing the patch's GeoTIFFs directly: proj from the files, no raster:bands."""
    with rasterio.open(patch / f"{patch.name}_{bands[0]}.tif") as src:
        crs = src.crs.to_string()
    assets = {b: {"href": patch / f"{patch.name}_{b}.tif"} for b in bands}
    item = make_item(patch.name, assets, crs=crs)
    for asset in item.assets.values():
        asset.media_type = pystac.MediaType.GEOTIFF
    return item
