"""Encode STAC items with a hash model: read (prefetched), chip, batch through the model, write.

One :class:`Ingestor` holds one model for a worker's lifetime. Reading and chipping run on a
small thread pool ahead of the model (GDAL releases the GIL), so I/O overlaps compute; chips of
several items share a batch. A scene is committed to the sink only when all its chips are
encoded: its chip items first, then the scene item with its scene-level code (the model's own
binarisation of the mean of its chips' relaxed codes, i.e. a per-bit soft majority), so a kill
at any point leaves no scene marked encoded without its chips.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pystac
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stac_rscbir.data.chips import (
    Chip,
    chip_item,
    chip_pixels,
    is_patch,
    make_chips,
    scene_chip_collection_id,
)
from stac_rscbir.data.profiles import SensorProfile, profile_for_bands
from stac_rscbir.data.reader import ItemReadError, Pixels, missing_bands, read_item
from stac_rscbir.data.render import Look, png_bytes
from stac_rscbir.extension.cbir import CBIRExtension, CBIRModel, Descriptor, HashCode
from stac_rscbir.ingest.report import ItemError, RunReport
from stac_rscbir.ingest.sinks import Sink, has_code
from stac_rscbir.ingest.thumbnails import CHIP_TITLE, SCENE_TITLE, write_thumbnail
from stac_rscbir.models.loader import Encoder, load_encoder
from stac_rscbir.models.training import pick_device

DEFAULT_CHIP_SIZE = 120


@dataclass(frozen=True)
class IngestOptions:
    """How items are cut and batched; defaults follow the model's checkpoint."""

    chip_size: int | None = None  # default: the model's input size, else 120 px
    stride: int | None = None  # default: chip_size (no overlap)
    min_valid: float = 0.9  # chips (and patches) with less valid (no nodata, no cloud) are skipped
    batch_size: int = 64
    readers: int = 2  # prefetching reader threads
    resolution: float | None = None  # default: the sensor profile's
    device: str | None = None  # default: CUDA when present, else CPU
    descriptors: bool = True  # store the relaxed codes as float descriptors (for re-ranking)
    progress: bool = True
    #: write a thumbnail per chip and a quicklook per scene here (stac_rscbir.ingest.thumbnails)
    thumbnails: Path | None = None


@dataclass(frozen=True)
class _Branch:
    """One input branch of the model: the sensor it reads and how invalid pixels are filled."""

    source: int
    bands: list[str]
    profile: SensorProfile
    fill: npt.NDArray[np.float32]  # (bands, 1, 1): the normalisation means


@dataclass
class _Prepared:
    """One item read and cut: its model inputs (raw units, nodata filled) and its chips."""

    item: pystac.Item
    inputs: npt.NDArray[np.float32]  # (n, bands, size, size)
    chips: list[Chip] | None  # None: the item is a patch, encoded whole
    source: int = 0  # the model branch that encodes it
    dropped: int = 0
    outputs: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    #: PNGs of the chips (in ``chips`` order) and of the scene, when thumbnails are written
    thumbnails: list[bytes] = field(default_factory=list)
    quicklook: bytes | None = None

    @property
    def complete(self) -> bool:
        return len(self.outputs) == len(self.inputs)


class Ingestor:
    """A loaded model and the pipeline that encodes items with it.

    A cross-modal model (one branch per sensor) encodes each item with the first branch whose
    bands the item has, so Sentinel-1 and Sentinel-2 items get codes in one Hamming space.
    """

    def __init__(self, encoder: Encoder, options: IngestOptions | None = None) -> None:
        self.options = options or IngestOptions()
        config = encoder.config
        if not config.model_id:
            raise ValueError("the checkpoint has no model_id: codes must name their model")
        self.device = pick_device(self.options.device)
        self.encoder = encoder.to(self.device).eval()
        self.branches = [
            _Branch(
                i,
                list(source.bands),
                profile_for_bands(source.bands),
                np.asarray(source.mean, dtype=np.float32)[:, None, None],
            )
            for i, source in enumerate(config.sources)
        ]
        self.chip_size = self.options.chip_size or config.input_size or DEFAULT_CHIP_SIZE
        self.input_size = config.input_size or self.chip_size
        self.model_id, self.version = config.model_id, config.version

    @classmethod
    def from_checkpoint(cls, directory: Path, options: IngestOptions | None = None) -> Ingestor:
        """Load the model once (on the chosen device) for a whole run."""
        device = pick_device((options or IngestOptions()).device)
        return cls(load_encoder(Path(directory), device=device), options)

    def model_description(self) -> CBIRModel:
        """The ``cbir:models`` entry that collections get for this model."""
        c = self.encoder.config
        return CBIRModel.create(
            c.model_id,
            c.version,
            c.bits,
            list(c.bands),
            branches=(
                [
                    {
                        "bands": list(s.bands),
                        "backbone": s.backbone,
                        "input": c.input_of(i).to_stac(),
                    }
                    for i, s in enumerate(c.sources)
                ]
                if len(c.sources) > 1
                else None
            ),
            method=c.method,
            backbone=c.backbone,
            descriptor_dtype="float32" if self.options.descriptors else None,
            descriptor_dim=(c.descriptor_dim or c.bits) if self.options.descriptors else None,
            chip_size=(self.chip_size, self.chip_size),
            resolution=self.options.resolution or self.branches[0].profile.resolution,
            tta=c.tta,
            values=c.input_of(0).to_stac(),
        )

    # ------------------------------------------------------------------ stages

    def _prepare(self, item: pystac.Item) -> tuple[_Prepared | ItemError, float, float]:
        """Read and cut one item on a reader thread: (result, read seconds, cut seconds)."""
        start = time.perf_counter()
        try:
            branch = self._branch_for(item)
            if isinstance(branch, ItemError):
                return branch, time.perf_counter() - start, 0.0
            pixels = read_item(item, branch.profile, resolution=self.options.resolution)
        except ItemReadError as exc:
            error = ItemError(item.id, item.collection_id, exc.kind, str(exc))
            return error, time.perf_counter() - start, 0.0
        except Exception as exc:  # one broken item must not stop the run
            error = ItemError(item.id, item.collection_id, "unreadable-asset", f"{item.id}: {exc}")
            return error, time.perf_counter() - start, 0.0
        read = time.perf_counter() - start
        result = self._cut(item, pixels, branch)
        return result, read, time.perf_counter() - start - read

    def _branch_for(self, item: pystac.Item) -> _Branch | ItemError:
        """The first branch whose bands the item has (one branch: always that one, and a missing
        band is reported by the reader)."""
        if len(self.branches) == 1:
            return self.branches[0]
        missing = {}
        for branch in self.branches:
            missing[branch.profile.name] = missing_bands(item, branch.profile)
            if not missing[branch.profile.name]:
                return branch
        detail = "; ".join(f"{name} lacks {', '.join(m)}" for name, m in missing.items())
        return ItemError(
            item.id,
            item.collection_id,
            "missing-band",
            f"{item.id}: no branch of model {self.model_id!r} finds its bands ({detail}); "
            f"assets: {', '.join(item.assets) or 'none'}",
        )

    def _cut(self, item: pystac.Item, pixels: Pixels, branch: _Branch) -> _Prepared | ItemError:
        """Fill invalid pixels with the band means and cut the item into model inputs."""
        _, height, width = pixels.data.shape
        data = np.where(pixels.valid[None], pixels.data, branch.fill).astype(np.float32)
        if is_patch(height, width, self.chip_size):
            valid = float(pixels.valid.mean())
            if valid < self.options.min_valid:
                return self._too_empty(item, f"valid fraction {valid:.2f}")
            if (height, width) != (self.chip_size, self.chip_size):  # near-patch-sized: resample
                size = (self.chip_size, self.chip_size)
                data = F.interpolate(torch.from_numpy(data)[None], size=size, mode="bilinear")[0]
                data = data.numpy()
            prep = _Prepared(item, data[None], None, branch.source)
            self._render(prep, pixels, branch)
            return prep
        try:
            kept, dropped = make_chips(
                pixels.valid,
                pixels.transform,
                pixels.crs,
                self.chip_size,
                self.options.stride,
                self.options.min_valid,
            )
        except ValueError as exc:
            return ItemError(item.id, item.collection_id, "too-small", str(exc))
        if not kept:
            return self._too_empty(item, f"all {len(dropped)} chips")
        inputs = np.stack([chip_pixels(data, c) for c in kept])
        prep = _Prepared(item, inputs, kept, branch.source, dropped=len(dropped))
        self._render(prep, pixels, branch)
        return prep

    def _render(self, prep: _Prepared, pixels: Pixels, branch: _Branch) -> None:
        """The scene's quicklook and its chips' thumbnails, with one look for the scene (a
        model whose bands show nothing, e.g. NIR only, gets none)."""
        if self.options.thumbnails is None:
            return
        look = Look.of(pixels.data, pixels.valid, branch.profile.bands)
        if look is None:
            return
        prep.quicklook = png_bytes(look.quicklook(pixels.data, pixels.valid))
        prep.thumbnails = [
            png_bytes(look.rgba(chip_pixels(pixels.data, c), chip_pixels(pixels.valid, c)))
            for c in prep.chips or []
        ]

    def _too_empty(self, item: pystac.Item, what: str) -> ItemError:
        return ItemError(
            item.id,
            item.collection_id,
            "mostly-nodata",
            f"{item.id}: {what} below the valid-pixel threshold {self.options.min_valid} "
            "(nodata or cloud)",
        )

    @torch.inference_mode()
    def encode_array(
        self, inputs: npt.NDArray[np.float32], source: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """({0,1} codes, relaxed codes) of raw-unit inputs (n, bands, h, w) in model batches,
        through the model branch ``source``."""
        bits, relaxed = [], []
        for start in range(0, len(inputs), self.options.batch_size):
            x = torch.from_numpy(inputs[start : start + self.options.batch_size]).to(self.device)
            if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
                x = F.interpolate(x, size=(self.input_size,) * 2, mode="bilinear")
            with torch.autocast(
                self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"
            ):
                b, h = self.encoder(x, source)
            bits.append(b.cpu().numpy())
            relaxed.append(h.float().cpu().numpy())
        return np.concatenate(bits).astype(np.uint8), np.concatenate(relaxed)

    def _code(self, bits: np.ndarray, relaxed: np.ndarray, source: int) -> HashCode:
        descriptor = Descriptor.create(relaxed) if self.options.descriptors else None
        # a cross-modal model's codes say which branch (sensor bands) made them
        bands = self.branches[source].bands if len(self.branches) > 1 else None
        return HashCode.from_bits(
            self.model_id, self.version, bits, descriptor=descriptor, bands=bands
        )

    def _items(self, prep: _Prepared) -> tuple[pystac.Item, list[pystac.Item]]:
        """The encoded scene item and its chip items."""
        bits = np.stack([b for b, _ in prep.outputs])
        relaxed = np.stack([h for _, h in prep.outputs])
        chips = []
        for chip, b, h in zip(prep.chips or [], bits, relaxed, strict=False):
            chip_it = chip_item(prep.item, chip)
            chip_it.collection_id = scene_chip_collection_id(prep.item.collection_id or "items")
            CBIRExtension.ext(chip_it, add_if_missing=True).add_code(self._code(b, h, prep.source))
            chips.append(chip_it)
        folder = self.options.thumbnails
        if folder is not None:  # the files first: no item names a file not yet written
            for chip_it, png in zip(chips, prep.thumbnails, strict=False):
                write_thumbnail(folder, chip_it, png, CHIP_TITLE)
        if prep.chips is None:
            scene_bits, scene_relaxed = bits[0], relaxed[0]
        else:  # scene-level code: the model's binarisation of the chips' mean relaxed code
            scene_relaxed = relaxed.mean(axis=0)
            mean = torch.from_numpy(scene_relaxed)[None]
            scene_bits = self.encoder.binarize(mean, prep.source)[0].numpy()
        scene = prep.item.clone()
        CBIRExtension.ext(scene, add_if_missing=True).add_code(
            self._code(scene_bits, scene_relaxed, prep.source)
        )
        if folder is not None and prep.quicklook is not None:
            write_thumbnail(folder, scene, prep.quicklook, SCENE_TITLE)
        return scene, chips

    # ------------------------------------------------------------------ the run

    def _todo(
        self, items: Iterable[pystac.Item], sink: Sink, report: RunReport
    ) -> Iterator[pystac.Item]:
        """Items not yet encoded by this model version (in the item itself or in the sink).

        Chip items (``cbir:chip``) are outputs of an earlier run, not inputs: they are passed
        over, so a catalog that now links its chip collection can be ingested again.
        """
        seen: set[tuple[str | None, str]] = set()
        for item in items:
            key = (item.collection_id, item.id)
            if key in seen or "cbir:chip" in item.properties:
                continue
            seen.add(key)
            report.items_seen += 1
            if has_code(item.properties, self.model_id, self.version) or sink.is_encoded(
                item, self.model_id, self.version
            ):
                report.items_skipped += 1
                continue
            yield item

    def run(self, items: Iterable[pystac.Item], sink: Sink) -> RunReport:
        """Encode every item not yet encoded, commit each to ``sink``, report what happened."""
        report = RunReport(self.model_id, self.version, device=str(self.device))
        start = time.perf_counter()
        bar = tqdm(disable=not self.options.progress, unit="item", desc=f"ingest {self.model_id}")
        pending: deque[_Prepared] = deque()  # prepared, waiting for model outputs, in order
        lookahead = max(2, 2 * self.options.readers)
        # multi-branch models: items read and waiting before the oldest forces a partial batch
        max_pending = max(lookahead + 2, 16) if len(self.branches) > 1 else None
        # (owner, chip index) not yet through the model, one queue per model branch
        queues: list[list[tuple[_Prepared, int]]] = [[] for _ in self.branches]

        def run_batches(source: int, final: bool) -> None:
            queue, size = queues[source], self.options.batch_size
            while queue and (final or len(queue) >= size):
                batch, queue[:] = queue[:size], queue[size:]
                t0 = time.perf_counter()
                inputs = np.stack([p.inputs[i] for p, i in batch])
                bits, relaxed = self.encode_array(inputs, source)
                report.add_time("model", time.perf_counter() - t0)
                for (owner, _), b, h in zip(batch, bits, relaxed, strict=True):
                    owner.outputs.append((b, h))

        def run_model(final: bool) -> None:
            for source in range(len(queues)):
                run_batches(source, final)
            while pending:
                if not pending[0].complete and max_pending and len(pending) > max_pending:
                    # mixed sensors: the oldest item's branch gets a partial batch rather
                    # than holding every later item in memory until its batch fills
                    run_batches(pending[0].source, final=True)
                if not pending[0].complete:
                    break
                commit(pending.popleft())

        def commit(prep: _Prepared) -> None:
            t0 = time.perf_counter()
            scene, chips = self._items(prep)
            sink.write(scene, chips)
            report.add_time("write", time.perf_counter() - t0)
            report.items_encoded += 1
            report.chips_encoded += len(chips)
            report.chips_dropped += prep.dropped
            bar.update(1)
            wall = time.perf_counter() - start
            bar.set_postfix(chips_s=f"{report.chips_encoded / wall:.1f}", errors=len(report.errors))

        sink.begin(self.model_description())
        with ThreadPoolExecutor(self.options.readers, thread_name_prefix="reader") as pool:
            inflight: deque[Future[tuple[_Prepared | ItemError, float, float]]] = deque()
            todo = self._todo(items, sink, report)
            exhausted = False
            while True:
                while not exhausted and len(inflight) < lookahead:
                    item = next(todo, None)
                    if item is None:
                        exhausted = True
                    else:
                        inflight.append(pool.submit(self._prepare, item))
                if not inflight:
                    break
                t0 = time.perf_counter()
                result, read_s, cut_s = inflight.popleft().result()
                report.add_time("wait_for_readers", time.perf_counter() - t0)
                report.add_time("read", read_s)
                report.add_time("preprocess", cut_s)
                if isinstance(result, ItemError):
                    report.errors.append(result)
                    bar.update(1)
                    continue
                pending.append(result)
                queues[result.source].extend((result, i) for i in range(len(result.inputs)))
                run_model(final=False)
            run_model(final=True)
        sink.finalize(self.model_description())
        bar.close()
        report.wall_seconds = round(time.perf_counter() - start, 3)
        return report
