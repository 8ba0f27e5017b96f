"""Ingestion throughput: items/s and chips/s, split into read, preprocess, model and write time.

Two inputs: a real Landsat-8 scene clip (1860x2041 px, 3 bands, 30 m) cut into 120 px chips,
and BigEarthNet Sentinel-2 patches (12 bands at 10/20/60 m, 120x120 after resampling), each
encoded whole; two backbones: the small CNN and ImageNet EfficientNet-Lite0 (its first
convolution adapted to the bands). The models have untrained hash heads: throughput does not
depend on the weights. Items are repeated under distinct ids to give the pipeline enough work.
Writes benchmarks/results/ingest/ingest_throughput.json and .png.

    .venv/bin/python benchmarks/ingest_throughput.py
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import pystac
import rasterio
import torch
from pystac.extensions.eo import Band, EOExtension
from pystac.extensions.projection import ProjectionExtension
from rasterio.warp import transform_bounds

from stac_rscbir.data.bigearthnet import S2_BANDS
from stac_rscbir.ingest.sinks import GeoParquetSink
from stac_rscbir.ingest.worker import IngestOptions, Ingestor
from stac_rscbir.models.config import ModelConfig
from stac_rscbir.models.encoder import HashEncoder

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"
LANDSAT = SHARED / "rasters" / "landsat8" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
BEN_S2 = SHARED / "bigearthnet" / "georeferenced" / "BigEarthNet-S2-Example"
OUT = ROOT / "benchmarks" / "results" / "ingest"


def _item(item_id: str, assets: dict[str, tuple[Path, list[Band]]]) -> pystac.Item:
    """An item over local GeoTIFFs: footprint and projection from the first file."""
    first = next(iter(assets.values()))[0]
    with rasterio.open(first) as src:
        bbox = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
        crs = src.crs.to_string()
    west, south, east, north = bbox
    ring = [[west, south], [east, south], [east, north], [west, north], [west, south]]
    item = pystac.Item(
        item_id,
        {"type": "Polygon", "coordinates": [ring]},
        list(bbox),
        pystac.utils.str_to_datetime("2020-05-18T13:30:00Z"),
        {},
        collection="bench",
    )
    ProjectionExtension.ext(item, add_if_missing=True).code = crs
    for key, (href, bands) in assets.items():
        asset = pystac.Asset(str(href), media_type=pystac.MediaType.GEOTIFF, roles=["data"])
        item.add_asset(key, asset)
        with rasterio.open(href) as src:  # the asset's own grid, so no resampling is guessed
            proj = ProjectionExtension.ext(asset, add_if_missing=True)
            proj.shape = [src.height, src.width]
            proj.transform = list(src.transform)[:6]
        if bands:
            EOExtension.ext(asset, add_if_missing=True).bands = bands
    return item


def landsat_items(copies: int) -> list[pystac.Item]:
    eo = [
        Band.create(name=f"B{n}", common_name=c) for n, c in ((2, "blue"), (3, "green"), (4, "red"))
    ]
    return [_item(f"landsat-{i}", {"image": (LANDSAT, eo)}) for i in range(copies)]


def ben_items(copies: int) -> list[pystac.Item]:
    patches = sorted(BEN_S2.iterdir())
    return [
        _item(f"{p.name}-{i}", {b: (p / f"{p.name}_{b}.tif", []) for b in S2_BANDS})
        for i in range(copies)
        for p in patches
    ]


def encoder(backbone: str, bands: list[str], folder: Path) -> Path:
    """A checkpoint with the chosen backbone (ImageNet weights for EfficientNet-Lite0)."""
    config = ModelConfig(
        method="dhnn",
        bits=64,
        bands=bands,
        backbone=backbone,
        mean=[0.0] * len(bands),
        std=[1000.0] * len(bands),
        model_id=f"bench-{backbone}-{len(bands)}b",
        input_size=120,
        head={"n_classes": 1},
    )
    torch.manual_seed(0)
    pretrained = backbone != "smallcnn"
    return HashEncoder.build(config, pretrained=pretrained).save(folder / config.model_id)


def run_one(name: str, items: list[pystac.Item], ckpt: Path, args: argparse.Namespace) -> dict:
    options = IngestOptions(
        chip_size=120, batch_size=args.batch_size, readers=args.readers, progress=True
    )
    ingestor = Ingestor.from_checkpoint(ckpt, options)
    with tempfile.TemporaryDirectory() as out:
        report = ingestor.run(items, GeoParquetSink(Path(out)))
    d = report.to_dict()
    chips = report.chips_encoded or report.items_encoded  # patches: one model input per item
    stages = {k: round(v, 3) for k, v in report.seconds.items()}
    busy = {k: stages[k] for k in ("read", "preprocess", "model", "write")}
    limit = max(busy, key=busy.get)  # type: ignore[arg-type]
    return {
        "name": name,
        "backbone": ingestor.encoder.config.backbone,
        "bands": len(ingestor.encoder.config.bands),
        "items": report.items_encoded,
        "model_inputs": chips,
        "errors": d["errors_by_kind"],
        "wall_seconds": report.wall_seconds,
        "items_per_second": round(report.items_encoded / report.wall_seconds, 2),
        "inputs_per_second": round(chips / report.wall_seconds, 2),
        "model_inputs_per_model_second": round(chips / max(stages["model"], 1e-9), 2),
        "seconds": stages,
        "limiting_stage": limit,
        "device": report.device,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Stacked stage seconds per run, with end-to-end model inputs per second."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [f"{r['name']}\n{r['backbone']}" for r in rows]
    left = [0.0] * len(rows)
    for stage in ("read", "preprocess", "model", "write"):
        values = [r["seconds"][stage] for r in rows]
        ax.barh(labels, values, left=left, label=stage)
        left = [a + b for a, b in zip(left, values, strict=True)]
    for y, r in enumerate(rows):
        ax.text(
            left[y],
            y,
            f"  {r['inputs_per_second']:.0f} inputs/s (wall {r['wall_seconds']:.0f} s)",
            va="center",
        )
    ax.set_xlabel("seconds (read and preprocess summed over reader threads, overlapping the model)")
    ax.set_xlim(0, max(left) * 1.6)
    ax.legend(loc="lower right")
    ax.set_title("Ingestion throughput on 2 CPU cores")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--landsat-copies", type=int, default=3)
    parser.add_argument("--ben-copies", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    for path in (LANDSAT, BEN_S2):
        if not path.exists():
            parser.error(f"{path} not found: this benchmark reads ../shared/datasets")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in ("smallcnn", "efficientnet-lite0"):
            rgb = encoder(backbone, ["red", "green", "blue"], Path(tmp))
            s2 = encoder(backbone, list(S2_BANDS), Path(tmp))
            rows.append(
                run_one(
                    "landsat-8 scene, 120 px chips", landsat_items(args.landsat_copies), rgb, args
                )
            )
            rows.append(
                run_one("BigEarthNet S2 patches (12 bands)", ben_items(args.ben_copies), s2, args)
            )
            print(json.dumps(rows[-2]), json.dumps(rows[-1]), sep="\n", flush=True)
    report = {
        "rows": rows,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads",
        "date": time.strftime("%Y-%m-%d"),
    }
    (args.out / "ingest_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.out / "ingest_throughput.png")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
