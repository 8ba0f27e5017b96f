"""BigEarthNet benchmark patch folders as model inputs: S2 bands on one grid, S1 VV/VH, labels.

This reader is for the benchmark's patch folders only. In the product, STAC items are read
through odc-stac elsewhere in :mod:`stac_rscbir.data`; both must hand the models the same band
order and the same normalisation (:class:`BandStats`, stored in the checkpoint config).

A patch is a folder holding one single-band TIFF per band, named ``<patch>/<patch>_<band>.tif``
(BigEarthNet v1 and v2, Sentinel-2 and Sentinel-1 alike; georeferenced or not).

* Sentinel-2 L2A: the 12 bands in the fixed order :data:`S2_BANDS` (B01, B02, B03, B04, B05,
  B06, B07, B08, B8A, B09, B11, B12; B10 is not an L2A product), as float32 digital numbers
  (reflectance x 10000). The 20 m (60x60 px) and 60 m (20x20 px) bands are resampled
  bilinearly onto the 10 m 120x120 grid by GDAL on read (``out_shape``), with half-pixel-centred
  alignment since every band covers the same footprint; GDAL rounds the interpolated values to
  whole DN, the source's own quantisation step.
* Sentinel-1: VV and VH backscatter in dB, float32 as stored, 120x120.
* Labels: multi-hot uint8 rows in the official class order of :data:`LABELS_19` or
  :data:`LABELS_43` (the CORINE Land Cover code order).
"""

from __future__ import annotations

import csv
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import rasterio
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

__all__ = [
    "LABELS_19",
    "LABELS_43",
    "PATCH_SIZE",
    "S1_BANDS",
    "S2_BANDS",
    "S2_RESOLUTION_M",
    "BandStats",
    "BenPatches",
    "Sensor",
    "band_file",
    "concat",
    "load_ben",
    "load_ben_v1",
    "load_ben_v2",
    "multi_hot",
    "read_patch",
    "read_s1_patch",
    "read_s2_patch",
]

Sensor = Literal["s2", "s1"]

#: Pixels per side of a BigEarthNet patch on the 10 m grid (1.2 km).
PATCH_SIZE = 120
#: Sentinel-2 L2A bands in model-input order, with their ground sampling distance in metres.
S2_RESOLUTION_M: dict[str, int] = {
    "B01": 60,
    "B02": 10,
    "B03": 10,
    "B04": 10,
    "B05": 20,
    "B06": 20,
    "B07": 20,
    "B08": 10,
    "B8A": 20,
    "B09": 60,
    "B11": 20,
    "B12": 20,
}
S2_BANDS: tuple[str, ...] = tuple(S2_RESOLUTION_M)
S1_BANDS: tuple[str, ...] = ("VV", "VH")

#: BigEarthNet's 19-class nomenclature (Sumbul et al. 2021), official order.
LABELS_19: tuple[str, ...] = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)
#: The original 43 CORINE Land Cover level-3 classes of BigEarthNet v1, in CLC code order.
LABELS_43: tuple[str, ...] = (
    "Continuous urban fabric",
    "Discontinuous urban fabric",
    "Industrial or commercial units",
    "Road and rail networks and associated land",
    "Port areas",
    "Airports",
    "Mineral extraction sites",
    "Dump sites",
    "Construction sites",
    "Green urban areas",
    "Sport and leisure facilities",
    "Non-irrigated arable land",
    "Permanently irrigated land",
    "Rice fields",
    "Vineyards",
    "Fruit trees and berry plantations",
    "Olive groves",
    "Pastures",
    "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland",
    "Moors and heathland",
    "Sclerophyllous vegetation",
    "Transitional woodland/shrub",
    "Beaches, dunes, sands",
    "Bare rock",
    "Sparsely vegetated areas",
    "Burnt areas",
    "Inland marshes",
    "Peatbogs",
    "Salt marshes",
    "Salines",
    "Intertidal flats",
    "Water courses",
    "Water bodies",
    "Coastal lagoons",
    "Estuaries",
    "Sea and ocean",
)
_LABEL_SETS: dict[int, tuple[str, ...]] = {19: LABELS_19, 43: LABELS_43}
_SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- one patch


def band_file(folder: Path, band: str) -> Path:
    """The TIFF of ``band`` in a patch folder: ``<folder>/<folder name>_<band>.tif``."""
    folder = Path(folder)
    return folder / f"{folder.name}_{band}.tif"


def _read_band(folder: Path, band: str, resolution_m: int) -> npt.NDArray[np.float32]:
    """One band on the 10 m grid (bilinear when coarser), float32; errors name patch and band."""
    path = band_file(folder, band)
    if not path.is_file():
        raise FileNotFoundError(f"patch {folder.name}: band {band} is missing (expected {path})")
    native = PATCH_SIZE * 10 // resolution_m
    # the benchmark's TIFFs carry no CRS: every band covers the same patch footprint anyway
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with rasterio.open(path) as src:
                if (src.count, src.height, src.width) != (1, native, native):
                    raise ValueError(
                        f"patch {folder.name}: band {band} ({resolution_m} m) should be one "
                        f"{native}x{native} band, got {src.count} band(s) of "
                        f"{src.height}x{src.width} in {path}"
                    )
                pixels = src.read(
                    1,
                    out_shape=(PATCH_SIZE, PATCH_SIZE),
                    resampling=Resampling.bilinear,
                    out_dtype="float32",
                )
        except RasterioIOError as exc:
            raise ValueError(
                f"patch {folder.name}: cannot read band {band} from {path}: {exc}"
            ) from exc
    return pixels


def read_s2_patch(folder: Path) -> npt.NDArray[np.float32]:
    """The 12 Sentinel-2 bands of a patch in :data:`S2_BANDS` order, (12, 120, 120) float32 DN."""
    return np.stack([_read_band(Path(folder), b, r) for b, r in S2_RESOLUTION_M.items()])


def read_s1_patch(folder: Path) -> npt.NDArray[np.float32]:
    """Sentinel-1 VV and VH backscatter of a patch in dB as stored, (2, 120, 120) float32."""
    return np.stack([_read_band(Path(folder), b, 10) for b in S1_BANDS])


def read_patch(folder: Path, sensor: Sensor) -> npt.NDArray[np.float32]:
    """The model-input bands of one patch folder for ``sensor`` ("s2" or "s1")."""
    if sensor == "s2":
        return read_s2_patch(folder)
    if sensor == "s1":
        return read_s1_patch(folder)
    raise ValueError(f"sensor must be 's2' or 's1', got {sensor!r}")


# --------------------------------------------------------------------------- labels


def multi_hot(
    label_lists: Sequence[Sequence[str]], classes: Sequence[str]
) -> npt.NDArray[np.uint8]:
    """Multi-hot rows (N, len(classes)) of label-name lists; an unknown name is an error."""
    index = {name: i for i, name in enumerate(classes)}
    out = np.zeros((len(label_lists), len(classes)), dtype=np.uint8)
    for row, names in enumerate(label_lists):
        unknown = [n for n in names if n not in index]
        if unknown:
            raise ValueError(f"row {row}: unknown label(s) {unknown}; known: {list(classes)}")
        out[row, [index[n] for n in names]] = 1
    return out


# --------------------------------------------------------------------------- data sets


@dataclass(frozen=True)
class BenPatches:
    """Patches of one sensor as model inputs, with multi-hot labels and their official split."""

    images: npt.NDArray[np.float32]  # (N, bands, 120, 120), physical units (DN or dB)
    labels: npt.NDArray[np.uint8]  # (N, classes) multi-hot
    names: tuple[str, ...]
    split: tuple[str, ...]  # "train", "val", "test" or "" (in no split list)
    sensor: Sensor
    bands: tuple[str, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    def select(self, indices: npt.ArrayLike) -> BenPatches:
        """The patches at ``indices`` (integer positions), in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return BenPatches(
            images=self.images[idx],
            labels=self.labels[idx],
            names=tuple(self.names[i] for i in idx),
            split=tuple(self.split[i] for i in idx),
            sensor=self.sensor,
            bands=self.bands,
            classes=self.classes,
        )

    def in_split(self, *splits: str) -> BenPatches:
        """The patches of the given official split(s), e.g. ``in_split("train", "val")``."""
        return self.select([i for i, s in enumerate(self.split) if s in splits])


def _load(
    folders: Sequence[Path],
    names: Sequence[str],
    label_lists: Sequence[Sequence[str]],
    split: Sequence[str],
    sensor: Sensor,
    classes: tuple[str, ...],
) -> BenPatches:
    """Read every patch folder and assemble a :class:`BenPatches`."""
    if not folders:
        raise ValueError("no patches to load")
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"patch folder not found: {folder}")
    return BenPatches(
        images=np.stack([read_patch(f, sensor) for f in folders]),
        labels=multi_hot(label_lists, classes),
        names=tuple(names),
        split=tuple(split),
        sensor=sensor,
        bands=S2_BANDS if sensor == "s2" else S1_BANDS,
        classes=classes,
    )


def _read_split_list(path: Path) -> list[str]:
    """Patch names of a one-column split CSV (no header; CRLF or LF)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_ben_v1(root: Path, sensor: Sensor = "s2", label_set: int = 19) -> BenPatches:
    """All patches of a BigEarthNet v1 folder (``labels.json``, ``split_{train,val,test}.csv``).

    Each patch folder holds both its S2 bands and its paired S1 VV/VH files, so ``sensor``
    picks which are read; ``label_set`` is 19 or 43. Patches come in ``labels.json`` order.
    """
    root = Path(root)
    if label_set not in _LABEL_SETS:
        raise ValueError(f"label_set must be 19 or 43, got {label_set!r}")
    labels_path = root / "labels.json"
    if not labels_path.is_file():
        raise FileNotFoundError(f"BigEarthNet v1 labels not found: {labels_path}")
    records: dict[str, dict[str, list[str]]] = json.loads(labels_path.read_text())
    split_of: dict[str, str] = {}
    for split in _SPLITS:
        path = root / f"split_{split}.csv"
        if path.is_file():
            for name in _read_split_list(path):
                if name not in records:
                    raise ValueError(f"{path}: patch {name} has no entry in {labels_path}")
                split_of[name] = split
    names = list(records)
    key = f"labels_{label_set}"
    missing = [n for n in names if key not in records[n]]
    if missing:
        raise ValueError(f"{labels_path}: no {key!r} for patch(es) {missing[:3]}")
    return _load(
        [root / n for n in names],
        names,
        [records[n][key] for n in names],
        [split_of.get(n, "") for n in names],
        sensor,
        _LABEL_SETS[label_set],
    )


def load_ben_v2(root: Path, sensor: Sensor = "s2") -> BenPatches:
    """The labelled patches of a BigEarthNet v2 folder (``metadata.csv``: 19-class labels).

    Patches are named by their S2 ``patch_id``; with ``sensor="s1"`` the paired S1 folder
    (``s1_name``) is read. The metadata's ``validation`` split is reported as ``"val"``.
    """
    root = Path(root)
    meta = root / "metadata.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"BigEarthNet v2 metadata not found: {meta}")
    with meta.open(newline="") as f:
        rows = list(csv.DictReader(f))
    needed = {"patch_id", "labels", "split", "s1_name"}
    if not rows or not needed <= set(rows[0]):
        raise ValueError(f"{meta}: expected rows with columns {sorted(needed)}")
    folder_key = "patch_id" if sensor == "s2" else "s1_name"
    return _load(
        [root / r[folder_key] for r in rows],
        [r["patch_id"] for r in rows],
        [r["labels"].split(";") for r in rows],
        ["val" if r["split"] == "validation" else r["split"] for r in rows],
        sensor,
        LABELS_19,
    )


def concat(*parts: BenPatches) -> BenPatches:
    """Several loaded sets (e.g. BENv1 and BENv2) as one; sensor, bands and classes must match."""
    if not parts:
        raise ValueError("nothing to concatenate")
    first = parts[0]
    for p in parts[1:]:
        if (p.sensor, p.bands, p.classes) != (first.sensor, first.bands, first.classes):
            raise ValueError("cannot concatenate patches of different sensors or label sets")
    return BenPatches(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        names=tuple(n for p in parts for n in p.names),
        split=tuple(s for p in parts for s in p.split),
        sensor=first.sensor,
        bands=first.bands,
        classes=first.classes,
    )


# --------------------------------------------------------------------------- normalisation


@dataclass(frozen=True)
class BandStats:
    """Per-band mean and standard deviation for z-scoring, kept in a checkpoint's config."""

    bands: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, images: npt.ArrayLike, bands: Sequence[str]) -> BandStats:
        """Statistics over all pixels of ``images`` (N, C, H, W): pass the training patches only.

        A constant band gets std 1 (it is then only centred) instead of a division by zero.
        """
        x = np.asarray(images, dtype=np.float64)
        if x.ndim != 4 or x.shape[1] != len(bands) or len(x) == 0:
            raise ValueError(f"need images (N>0, {len(bands)}, H, W), got shape {x.shape}")
        mean = x.mean(axis=(0, 2, 3))
        std = x.std(axis=(0, 2, 3))
        std = np.where(std > 0, std, 1.0)
        return cls(tuple(bands), tuple(map(float, mean)), tuple(map(float, std)))

    def normalise(self, images: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """``(x - mean) / std`` per band of (N, C, H, W) or (C, H, W) images, float32."""
        x = np.asarray(images, dtype=np.float32)
        if x.ndim not in (3, 4) or x.shape[-3] != len(self.bands):
            raise ValueError(f"need {len(self.bands)} bands on axis -3, got shape {x.shape}")
        mean = np.asarray(self.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None, None]
        return (x - mean) / std

    def to_config(self) -> dict[str, list[Any]]:
        """JSON-ready ``{"bands", "mean", "std"}`` for a checkpoint config."""
        return {"bands": list(self.bands), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_config(cls, config: Mapping[str, Sequence[Any]]) -> BandStats:
        """Inverse of :meth:`to_config`; the three lists must have one entry per band."""
        bands, mean, std = (tuple(config[k]) for k in ("bands", "mean", "std"))
        if not len(bands) == len(mean) == len(std):
            raise ValueError(f"bands, mean and std differ in length: {config}")
        return cls(tuple(map(str, bands)), tuple(map(float, mean)), tuple(map(float, std)))


def load_ben(
    root: Path, sensor: Sensor = "s2", sources: Sequence[str] = ("v1", "v2")
) -> BenPatches:
    """The labelled patches of ``root/BENv1`` and/or ``root/BENv2`` for one sensor, as one set
    with 19-class labels (v1 first); the same patch order for "s2" and "s1"."""
    loaders = {
        "v1": lambda: load_ben_v1(Path(root) / "BENv1", sensor, label_set=19),
        "v2": lambda: load_ben_v2(Path(root) / "BENv2", sensor),
    }
    unknown = [s for s in sources if s not in loaders]
    if unknown or not sources:
        raise ValueError(f"sources must be among {sorted(loaders)}, got {list(sources)}")
    return concat(*(loaders[s]() for s in sources))
