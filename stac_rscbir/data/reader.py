"""Read one STAC item's pixels for a sensor profile: one grid, physical units, a validity mask.

:func:`read_item` is the pixel reader of the ingestion worker. It

1. resolves each band of the :class:`~stac_rscbir.data.profiles.SensorProfile` to an asset (and a
   band inside it) of the item, trying in order: an asset key equal to the band's name or one of
   its aliases (case-insensitive, single-band assets); an ``eo:bands`` entry whose ``name`` is the
   name or an alias; an ``eo:bands`` entry whose ``common_name`` is the band's, when that common
   name is unique in the profile and names one band of the item, or one single-band asset (so
   ``rededge`` never picks one of three S2 bands, ``red`` picks ``B04`` over a ``visual`` stack);
   ``sar:polarizations`` of an asset (or of the item, when it has a single data asset);
2. fills in what odc-stac needs and the item lacks (``raster:bands`` data type and nodata, the band
   count of multi-band assets) from the file's header, on a copy of the item;
3. loads every band with :func:`odc.stac.load` onto one grid: the item's native CRS
   (``proj:code``/``proj:epsg``/``proj:wkt2``) unless ``crs`` is given, the profile's resolution
   unless ``resolution`` is given, pixel edges aligned with the item's own ``proj:transform``;
   bilinear resampling for the bands, nearest for the cloud-mask layer; only ``bbox`` when given;
4. turns the stored numbers into physical units (``raster:bands`` ``scale``/``offset``; SAR to dB
   when the profile says so) and builds ``valid``: every band has data (not the nodata value, not
   NaN) and, when the profile names a cloud-mask layer and the item has it, the pixel's class is
   not a cloud class.

SAR decibels: a band's ``raster:bands[].unit`` decides (``dB``/``decibel`` -> as is,
``amplitude`` -> ``20 log10``, any other unit -> linear power, ``10 log10``). Without a unit, the
values decide: linear power is never negative, so any negative valid value means the source
already is in dB (BigEarthNet's S1 patches), otherwise it is taken as linear power. Non-positive
linear values have no dB value and become invalid. Uncalibrated integer amplitude DN (e.g. Earth
Search ``sentinel-1-grd``) needs ``unit: "amplitude"`` in the item to be converted correctly.

Pixels without data are NaN in :attr:`Pixels.data`; cloudy pixels keep their values and are only
marked invalid. A bad item raises :class:`ItemReadError`, whose ``kind`` tells the worker why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import odc.stac
import pystac
import rasterio
from affine import Affine
from odc.geo import xy_
from pystac.extensions.raster import RasterExtension
from rasterio.crs import CRS
from rasterio.errors import CRSError, RasterioError

from stac_rscbir.data.profiles import PROFILES, BandSpec, SensorProfile

__all__ = ["ErrorKind", "ItemReadError", "Pixels", "display_profile", "read_item"]

ErrorKind = Literal["unreadable-asset", "missing-band", "all-nodata", "bad-crs"]

_SKIP_ROLES = frozenset({"thumbnail", "overview", "metadata"})
_RASTER_MEDIA = ("tiff", "jp2")
_DB_UNITS = frozenset({"db", "decibel", "decibels"})


@dataclass
class Pixels:
    """One item's bands on one grid: ``data`` (bands, H, W) float32, ``valid`` (H, W) bool."""

    data: npt.NDArray[np.float32]
    valid: npt.NDArray[np.bool_]
    crs: str
    transform: Affine
    bands: tuple[str, ...]
    item_id: str


class ItemReadError(Exception):
    """An item that cannot be read; ``kind`` is one of :data:`ErrorKind`."""

    def __init__(self, item_id: str, kind: ErrorKind, message: str) -> None:
        super().__init__(f"item {item_id!r}: {message}")
        self.item_id = item_id
        self.kind = kind


@dataclass(frozen=True)
class _Source:
    asset: str
    index: int  # 0-based band inside the asset


def _data_assets(item: pystac.Item) -> dict[str, pystac.Asset]:
    """Assets that may hold bands: no thumbnail/overview/metadata role, a raster media type."""
    out = {}
    for key, asset in item.assets.items():
        if _SKIP_ROLES & set(asset.roles or ()):
            continue
        media = (asset.media_type or "").lower()
        if media and not any(m in media for m in _RASTER_MEDIA):
            continue
        out[key] = asset
    return out


def _band_list(asset: pystac.Asset, field: str) -> list[dict[str, Any]]:
    value = asset.extra_fields.get(field)
    return [b if isinstance(b, dict) else {} for b in value] if isinstance(value, list) else []


def _band_count(asset: pystac.Asset) -> int | None:
    n = max(len(_band_list(asset, "eo:bands")), len(_band_list(asset, "raster:bands")))
    return n or None


def _resolve(item: pystac.Item, spec: BandSpec, profile: SensorProfile) -> _Source | None:
    assets = _data_assets(item)
    keys = {k.lower() for k in spec.keys}
    for key, asset in assets.items():
        if key.lower() in keys and _band_count(asset) in (None, 1):
            return _Source(key, 0)
    for key, asset in assets.items():
        for i, band in enumerate(_band_list(asset, "eo:bands")):
            if str(band.get("name", "")).lower() in keys:
                return _Source(key, i)
    common = spec.common_name
    if common and sum(b.common_name == common for b in profile.bands) == 1:
        hits = [
            _Source(key, i)
            for key, asset in assets.items()
            for i, band in enumerate(_band_list(asset, "eo:bands"))
            if band.get("common_name") == common
        ]
        if len(hits) > 1:  # e.g. B04 and the 3-band "visual" asset: prefer single-band assets
            hits = [h for h in hits if _band_count(assets[h.asset]) == 1]
        if len(hits) == 1:
            return hits[0]
    if spec.polarization:
        pol = spec.polarization.upper()
        for key, asset in assets.items():
            pols = [str(p).upper() for p in asset.extra_fields.get("sar:polarizations") or ()]
            if pol in pols and _band_count(asset) in (None, len(pols)):
                return _Source(key, pols.index(pol) if len(pols) > 1 else 0)
        pols = [str(p).upper() for p in item.properties.get("sar:polarizations") or ()]
        if pol in pols and len(assets) == 1:
            return _Source(next(iter(assets)), pols.index(pol))
    return None


def _href(item: pystac.Item, key: str) -> str:
    asset = item.assets[key]
    return asset.get_absolute_href() or asset.href


def _probe(item: pystac.Item, key: str) -> dict[str, Any]:
    """Header of an asset's file (band count, dtypes, nodata, transform), or unreadable-asset."""
    href = _href(item, key)
    try:
        with rasterio.open(href) as src:
            return {
                "count": src.count,
                "dtypes": src.dtypes,
                "nodata": src.nodata,
                "transform": src.transform,
            }
    except Exception as err:
        raise ItemReadError(
            item.id, "unreadable-asset", f"asset {key!r} ({href}) cannot be read: {err}"
        ) from err


def _complete_raster_bands(
    item: pystac.Item, key: str, needed: int, probes: dict[str, dict[str, Any]]
) -> None:
    """Give the asset ``raster:bands`` with data type and nodata for every band (from the file)."""
    asset = item.assets[key]
    bands = _band_list(asset, "raster:bands")
    if len(bands) >= needed and all("data_type" in b and "nodata" in b for b in bands[:needed]):
        return
    probes[key] = head = _probe(item, key)
    if needed > head["count"]:
        raise ItemReadError(
            item.id,
            "missing-band",
            f"asset {key!r} has {head['count']} band(s), band {needed} was asked for",
        )
    merged = []
    for i in range(head["count"]):
        band = dict(bands[i]) if i < len(bands) else {}
        band.setdefault("data_type", head["dtypes"][i])
        if "nodata" not in band and head["nodata"] is not None:
            band["nodata"] = head["nodata"]
        merged.append(band)
    RasterExtension.ext(asset, add_if_missing=True)
    asset.extra_fields["raster:bands"] = merged


def _crs_of(obj: dict[str, Any]) -> str | None:
    if obj.get("proj:code"):
        return str(obj["proj:code"])
    if obj.get("proj:epsg"):
        return f"EPSG:{obj['proj:epsg']}"
    if obj.get("proj:wkt2"):
        return str(obj["proj:wkt2"])
    return None


def _transform_of(item: pystac.Item, key: str) -> Affine | None:
    t = item.assets[key].extra_fields.get("proj:transform") or item.properties.get("proj:transform")
    return Affine(*t[:6]) if isinstance(t, list) and len(t) >= 6 else None


def _anchor(transforms: list[Affine], res: float) -> Any:
    """Pixel-edge alignment of the native (finest) grid, as odc-geo's fractional anchor."""
    grid = min(
        (t for t in transforms if t.b == 0 and t.d == 0), key=lambda t: abs(t.a), default=None
    )
    if grid is None:
        return None

    def frac(v: float) -> float:
        f = (v / res) % 1.0
        return 0.0 if math.isclose(f, 0, abs_tol=1e-6) or math.isclose(f, 1, abs_tol=1e-6) else f

    return xy_(frac(grid.c), frac(grid.f))


def _has_data(raw: np.ndarray, nodata: Any) -> npt.NDArray[np.bool_]:
    ok = np.isfinite(raw) if raw.dtype.kind == "f" else np.ones(raw.shape, bool)
    if nodata is not None:
        nd = float(nodata)
        if not math.isnan(nd):
            ok &= raw != nd
    return ok


def _to_db(x: np.ndarray, unit: str | None, negatives_seen: bool) -> np.ndarray:
    unit = (unit or "").strip().lower()
    if unit in _DB_UNITS or (not unit and negatives_seen):
        return x
    with np.errstate(divide="ignore", invalid="ignore"):
        db = (20.0 if unit == "amplitude" else 10.0) * np.log10(x)
    db[~np.isfinite(db)] = np.nan
    return db


def missing_bands(item: pystac.Item, profile: SensorProfile) -> list[str]:
    """The profile's bands that ``item`` has no asset for (nothing is read); [] if it has all."""
    return [spec.name for spec in profile.bands if _resolve(item, spec, profile) is None]


def display_profile(item: pystac.Item) -> SensorProfile:
    """The bands a picture of ``item`` shows (:mod:`stac_rscbir.data.render`): Sentinel-1 VV and
    VH when it has both, else its red, green and blue."""
    sar = PROFILES["sentinel1-grd"]
    return sar if not missing_bands(item, sar) else PROFILES["rgb"]


def read_item(
    item: pystac.Item,
    profile: SensorProfile,
    resolution: float | None = None,
    bbox: tuple[float, float, float, float] | None = None,
    crs: str | None = None,
) -> Pixels:
    """Load the profile's bands of ``item`` onto one grid, in physical units, with a validity mask.

    ``bbox`` is (west, south, east, north) in EPSG:4326 and restricts the read to that area;
    ``resolution`` is in units of the output CRS. Raises :class:`ItemReadError`.
    """
    iid = item.id
    sources: list[_Source] = []
    for spec in profile.bands:
        src = _resolve(item, spec, profile)
        if src is None:
            names = ", ".join(spec.keys)
            extra = f"; common name {spec.common_name}" if spec.common_name else ""
            raise ItemReadError(
                iid,
                "missing-band",
                f"band {spec.name!r} (looked for {names}{extra}) not found; "
                f"assets: {', '.join(item.assets) or 'none'}",
            )
        sources.append(src)
    mask_key = None
    if profile.cloud_mask:
        mask_key = next(
            (k for k in _data_assets(item) if k.lower() == profile.cloud_mask.lower()), None
        )

    native = next(
        (c for s in sources if (c := _crs_of(item.assets[s.asset].extra_fields))),
        _crs_of(item.properties),
    )
    if crs is None and native is None:
        raise ItemReadError(iid, "bad-crs", "no proj:code/proj:epsg/proj:wkt2 and no crs given")
    try:
        native_crs = CRS.from_user_input(native) if native else None
        out_crs = CRS.from_user_input(crs) if crs else native_crs
    except CRSError as err:
        raise ItemReadError(iid, "bad-crs", f"unusable CRS {crs or native!r}: {err}") from err
    assert out_crs is not None

    work = item.clone()
    if native is None:  # grid fields without a CRS would stop odc-stac; the footprint comes
        for obj in [work.properties, *(a.extra_fields for a in work.assets.values())]:
            for field in ("proj:shape", "proj:transform", "proj:bbox"):  # from the geometry
                obj.pop(field, None)
    probes: dict[str, dict[str, Any]] = {}
    used = sorted({s.asset for s in sources})
    for key in used:
        needed = 1 + max(s.index for s in sources if s.asset == key)
        _complete_raster_bands(work, key, needed, probes)
    if mask_key:
        _complete_raster_bands(work, mask_key, 1, probes)

    def odc_name(s: _Source) -> str:
        return s.asset if _band_count(work.assets[s.asset]) == 1 else f"{s.asset}.{s.index + 1}"

    transforms = [t for k in used if (t := _transform_of(work, k)) is not None]
    transforms += [p["transform"] for k, p in probes.items() if k in used]
    res = resolution or profile.resolution
    if res is None:
        if not transforms:
            transforms = [_probe(work, used[0])["transform"]]
        res = min(abs(t.a) for t in transforms)
    anchor = _anchor(transforms, res) if native_crs is not None and out_crs == native_crs else None

    names = list(dict.fromkeys(odc_name(s) for s in sources))
    resampling = dict.fromkeys(names, "bilinear")
    if mask_key:
        resampling[mask_key] = "nearest"
    kwargs: dict[str, Any] = {"anchor": anchor} if anchor is not None else {}
    if bbox is not None:
        kwargs["bbox"] = tuple(bbox)
    load_kw: dict[str, Any] = {
        "groupby": "id",
        "crs": out_crs.to_string(),
        "resolution": res,
        "resampling": resampling,
        "stac_cfg": {"*": {"warnings": "ignore"}},
        **kwargs,
    }
    bands = [*names, mask_key] if mask_key else names
    try:
        ds = odc.stac.load([work], bands=bands, **load_kw)
    except (RasterioError, OSError) as err:
        # Find the culprit: a header that does not open, else pixels that do not read.
        keys = [*used, *([mask_key] if mask_key else [])]
        for key in keys:
            if key not in probes:
                _probe(work, key)  # raises unreadable-asset naming the asset
        for key in keys:
            one = [b for b in bands if b == key or b.startswith(f"{key}.")]
            try:
                odc.stac.load([work], bands=one, **load_kw)
            except (RasterioError, OSError) as again:
                raise ItemReadError(
                    iid, "unreadable-asset", f"asset {key!r} ({_href(work, key)}): {again}"
                ) from err
        raise ItemReadError(
            iid, "unreadable-asset", f"loading assets {', '.join(keys)} failed: {err}"
        ) from err

    geobox = ds.odc.geobox
    h, w = geobox.shape
    data = np.empty((len(sources), h, w), np.float32)
    empty = []
    sar: list[tuple[int, str | None]] = []
    for i, (spec, src) in enumerate(zip(profile.bands, sources, strict=True)):
        rb = _band_list(work.assets[src.asset], "raster:bands")[src.index]
        raw = ds[odc_name(src)].values[0]
        ok = _has_data(raw, rb.get("nodata"))
        scale, offset = rb.get("scale"), rb.get("offset")
        x = raw.astype(np.float64) * (1.0 if scale is None else float(scale))
        x += 0.0 if offset is None else float(offset)
        x[~ok] = np.nan
        data[i] = x
        if not ok.any():
            empty.append(spec.name)
        if profile.sar_db and spec.polarization:
            sar.append((i, rb.get("unit")))
    if sar:
        negatives = any(bool(np.nanmin(data[i], initial=np.inf) < 0) for i, u in sar if not u)
        for i, unit in sar:
            data[i] = _to_db(data[i], unit, negatives)
    has = np.isfinite(data).all(axis=0)
    if empty or not has.any():
        why = f"bands {empty} have no data" if empty else "no pixel has data in every band"
        raise ItemReadError(iid, "all-nodata", f"{why} ({h}x{w} px at resolution {res})")
    valid = has
    if mask_key:
        classes = ds[mask_key].values[0]
        valid = has & ~np.isin(classes, profile.cloud_classes)
    return Pixels(
        data=data,
        valid=valid,
        crs=out_crs.to_string(),
        transform=Affine(*geobox.affine[:6]),
        bands=profile.band_names,
        item_id=iid,
    )
