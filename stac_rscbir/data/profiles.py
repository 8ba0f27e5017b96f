"""Sensor band profiles: the bands a model reads, their names in real catalogs, the target grid.

A :class:`SensorProfile` is the contract between a checkpoint (``ModelConfig.bands``, in model-input
order) and the STAC items it encodes. Each :class:`BandSpec` carries the model's band name plus the
names the same band goes by in real catalogs, so that :func:`stac_rscbir.data.reader.read_item`
can find it whatever the catalog's naming:

* Planetary Computer ``sentinel-2-l2a``: asset keys ``B01`` ... ``B12``, ``SCL``;
* Earth Search ``sentinel-2-l2a`` (v1): asset keys ``coastal``, ``blue``, ``rededge1``, ``nir08``,
  ``swir16``, ``scl``, ...;
* Sentinel-1 (Planetary Computer ``sentinel-1-rtc``, Earth Search ``sentinel-1-grd``): ``vv``,
  ``vh``;
* Landsat Collection 2 (both): ``coastal``, ``blue``, ..., ``swir22``; USGS file names ``SR_B1`` ...

SAR and decibels: ``SensorProfile.sar_db`` says the model wants backscatter in dB. The reader
decides per item whether the source already is in dB (see :mod:`stac_rscbir.data.reader`):
first from ``raster:bands[].unit`` (``"dB"`` -> as is; ``"amplitude"`` -> ``20 log10``; any other
unit -> linear power, ``10 log10``), and only when no unit is given from the values themselves
(linear power is never negative, so a negative valid value means dB).

Cloud masks: ``SensorProfile.cloud_mask`` names the asset of a classification layer (matched
case-insensitively, so ``scl`` finds Planetary Computer's ``SCL`` too) and ``cloud_classes`` the
class values that make a pixel invalid; for the Sentinel-2 scene classification these are
3 (cloud shadow), 8 (cloud, medium probability), 9 (cloud, high probability), 10 (thin cirrus).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

__all__ = [
    "PROFILES",
    "S2_SCL_CLOUD_CLASSES",
    "BandSpec",
    "SensorProfile",
    "profile_for_bands",
]

#: Sentinel-2 scene classification (SCL) values treated as invalid: cloud shadow, cloud medium and
#: high probability, thin cirrus.
S2_SCL_CLOUD_CLASSES: tuple[int, ...] = (3, 8, 9, 10)


@dataclass(frozen=True)
class BandSpec:
    """One model input band and the names it goes by in STAC catalogs."""

    name: str
    common_name: str | None = None
    polarization: str | None = None
    aliases: tuple[str, ...] = ()

    @property
    def keys(self) -> tuple[str, ...]:
        """Names to look for as asset keys or ``eo:bands`` names: the model name, then aliases."""
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class SensorProfile:
    """The bands of one sensor in model-input order, the target grid and the masking rules.

    ``resolution`` is the target pixel size in metres (CRS units); ``None`` means the item's own
    finest resolution (for sensor-agnostic profiles such as ``rgb``).
    """

    name: str
    bands: tuple[BandSpec, ...]
    resolution: float | None
    sar_db: bool = False
    cloud_mask: str | None = None
    cloud_classes: tuple[int, ...] = ()

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    def __post_init__(self) -> None:
        names = self.band_names
        if len(set(names)) != len(names):
            raise ValueError(f"profile {self.name!r} repeats a band name: {names}")
        if self.resolution is not None and not self.resolution > 0:
            raise ValueError(
                f"profile {self.name!r}: resolution must be > 0, got {self.resolution}"
            )


def _s2(name: str, common: str, *aliases: str) -> BandSpec:
    return BandSpec(name, common_name=common, aliases=aliases)


def _sar(pol: str) -> BandSpec:
    return BandSpec(pol, polarization=pol, aliases=(pol.lower(),))


def _oli(name: str, number: int) -> BandSpec:
    return BandSpec(name, common_name=name, aliases=(f"B{number}", f"SR_B{number}"))


PROFILES: dict[str, SensorProfile] = {
    "sentinel2-l2a": SensorProfile(
        name="sentinel2-l2a",
        # Same order and names as stac_rscbir.data.bigearthnet.S2_BANDS.
        bands=(
            _s2("B01", "coastal", "coastal", "B1"),
            _s2("B02", "blue", "blue", "B2"),
            _s2("B03", "green", "green", "B3"),
            _s2("B04", "red", "red", "B4"),
            _s2("B05", "rededge", "rededge1", "B5"),
            _s2("B06", "rededge", "rededge2", "B6"),
            _s2("B07", "rededge", "rededge3", "B7"),
            _s2("B08", "nir", "nir", "B8"),
            _s2("B8A", "nir08", "nir08"),
            _s2("B09", "nir09", "nir09", "B9"),
            _s2("B11", "swir16", "swir16"),
            _s2("B12", "swir22", "swir22"),
        ),
        resolution=10.0,
        cloud_mask="scl",
        cloud_classes=S2_SCL_CLOUD_CLASSES,
    ),
    "sentinel1-grd": SensorProfile(
        name="sentinel1-grd",
        bands=(_sar("VV"), _sar("VH")),
        resolution=10.0,
        sar_db=True,
    ),
    "landsat-8-9": SensorProfile(
        name="landsat-8-9",
        bands=(
            _oli("coastal", 1),
            _oli("blue", 2),
            _oli("green", 3),
            _oli("red", 4),
            _oli("nir08", 5),
            _oli("swir16", 6),
            _oli("swir22", 7),
        ),
        resolution=30.0,
    ),
    "rgb": SensorProfile(
        name="rgb",
        bands=(
            BandSpec("red", common_name="red"),
            BandSpec("green", common_name="green"),
            BandSpec("blue", common_name="blue"),
        ),
        resolution=None,
    ),
}


def profile_for_bands(bands: Sequence[str]) -> SensorProfile:
    """The profile whose band names equal ``bands`` (a checkpoint's ``config.bands``).

    Otherwise a sub-selection, in the order given, of the smallest profile holding all of them;
    ``ValueError`` naming the unknown bands when no profile does.
    """
    wanted = tuple(bands)
    if not wanted:
        raise ValueError("no bands given")
    for profile in PROFILES.values():
        if profile.band_names == wanted:
            return profile
    holders = [p for p in PROFILES.values() if set(wanted) <= set(p.band_names)]
    if not holders:
        known = {n for p in PROFILES.values() for n in p.band_names}
        unknown = [n for n in wanted if n not in known]
        listing = "; ".join(f"{k}: {', '.join(p.band_names)}" for k, p in PROFILES.items())
        if unknown:
            raise ValueError(f"unknown bands {unknown} (in no sensor profile; {listing})")
        raise ValueError(f"bands {list(wanted)} are not all in one sensor profile ({listing})")
    base = min(holders, key=lambda p: len(p.bands))  # first (dict order) among the smallest
    by_name = {b.name: b for b in base.bands}
    return replace(
        base,
        name=f"{base.name}[{','.join(wanted)}]",
        bands=tuple(by_name[n] for n in wanted),
    )
