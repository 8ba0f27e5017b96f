"""Query decoding: the hash code (and descriptor) a similarity object asks for, from an item of
the store, a given code or descriptor, or an uploaded image encoded by the model's checkpoint.

Uploads are decoded strictly (every pixel read, GDAL's warnings are errors) and checked against
what the model takes (its ``input``: bands, pixel type, value range, size). The model library
(torch) is imported only when a request needs a checkpoint; without the ``ml`` extra such a
request is a 400 that names it.
"""

import base64
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import attr
import numpy as np
from fastapi import HTTPException

from stac_rscbir.api.similarity.request import SimilarityQuery
from stac_rscbir.extension.cbir import code_of
from stac_rscbir.extension.codec import CBIRFieldError, decode_code, decode_descriptor
from stac_rscbir.extras import MissingExtraError, require
from stac_rscbir.index.hashindex import HashIndex
from stac_rscbir.store.base import InvalidQueryError, ItemStore

MAX_IMAGE_BYTES = 20 * 1024 * 1024  # default cap on an uploaded image, decoded
MAX_IMAGE_PIXELS = 50_000_000  # default cap on width * height * bands of an uploaded image
IMAGE_DRIVERS = ["PNG", "GTiff"]  # the formats an uploaded image may have (no VRT & co.)
_HEX = re.compile(r"[0-9a-fA-F]+")


class QueryCode(NamedTuple):
    """What a query decodes to: the packed code, its descriptor (None for a code query), and
    the query item's key (None unless the query names an item)."""

    code: bytes
    descriptor: np.ndarray | None
    item: tuple[str, str] | None


class QueryDecoder:
    """Decodes similarity objects into query codes, with the checkpoints of ``model_dirs``."""

    def __init__(
        self,
        store: ItemStore,
        model_dirs: dict[str, Path],
        encoder_loader: Callable[[Path], Any] | None = None,
        *,
        max_image_bytes: int = MAX_IMAGE_BYTES,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.store = store
        self.model_dirs = model_dirs
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self._encoder_loader = encoder_loader
        self._encoders: dict[str, Any] = {}
        self._lock = threading.Lock()

    def decode(self, sim: SimilarityQuery, model: str, idx: HashIndex) -> QueryCode:
        """The query code of ``sim`` for ``model``, whose index is ``idx`` (its bits, version)."""
        if sim.item is not None:
            item = self.store.get_item(sim.item.collection, sim.item.id)  # 404
            code = code_of(item, model, idx.version)
            version = "" if idx.version is None else f" version {idx.version!r}"
            if code is None or idx.bits not in (None, code.bits):
                raise InvalidQueryError(
                    f"item {sim.item.collection}/{sim.item.id} has no code of model {model!r}"
                    f"{version}" + ("" if idx.bits is None else f" with {idx.bits} bits")
                )
            desc = code.descriptor.array() if code.descriptor else None
            return QueryCode(code.packed().tobytes(), desc, (sim.item.collection, sim.item.id))
        bits = idx.bits
        if bits is None and (sim.code is not None or sim.descriptor is not None):
            raise InvalidQueryError(
                f"similarity.model: model {model!r} has no codes in this store yet, so the "
                "length of its codes is unknown"
            )
        if sim.code is not None:
            return QueryCode(_given_code(sim, bits), None, None)
        if sim.descriptor is not None:
            try:
                desc = decode_descriptor(
                    sim.descriptor,
                    "float32",
                    idx.descriptor_dim or bits,
                    "little",
                    "similarity.descriptor",
                )
            except CBIRFieldError as exc:
                raise InvalidQueryError(str(exc)) from exc
            return QueryCode(self.binarize(model, desc, idx), desc, None)
        bits_arr, desc = self._encode_image(model, sim.image or "")
        return QueryCode(np.packbits(bits_arr).tobytes(), desc, None)

    def binarize(
        self, model: str, desc: np.ndarray, idx: HashIndex, *, infer: bool = False
    ) -> bytes:
        """A descriptor (the model's relaxed code) to its code, with the model's threshold.

        With ``infer`` and no checkpoint of the model here, the threshold (0 or 0.5) is the
        one that turns the stored descriptors into the stored codes (at least 95 % of the
        bits), see :meth:`HashIndex.descriptor_binarization`.
        """
        if infer and model not in self.model_dirs:
            found = idx.descriptor_binarization()
            if found is None or found[1] < 0.95:
                raise InvalidQueryError(
                    f"similarity.feedback: model {model!r} has no checkpoint on this server and "
                    "its stored descriptors are not relaxed codes of its stored codes, so the "
                    "refined query cannot be binarised"
                )
            bits = desc >= 0 if found[0] == 0.0 else desc > found[0]
            return np.packbits(bits.astype(np.uint8)).tobytes()
        encoder = self._encoder(model, "a descriptor query")
        import torch

        bits = encoder.binarize(torch.from_numpy(np.asarray(desc, np.float32))[None])[0].numpy()
        return np.packbits(bits.astype(np.uint8)).tobytes()

    def _encoder(self, model: str, what: str) -> Any:
        """The model's encoder (loaded once); 400 when it has no checkpoint here, or when the
        model library is not installed."""
        if model not in self.model_dirs:
            raise InvalidQueryError(
                f"model {model!r} has no checkpoint on this server: {what} needs one "
                f"(known: {sorted(self.model_dirs)})"
            )
        with self._lock:
            if model not in self._encoders:
                loader = self._encoder_loader
                if loader is None:
                    try:
                        require(what, "ml")
                    except MissingExtraError as exc:
                        raise InvalidQueryError(str(exc)) from exc
                    from stac_rscbir.models.loader import load_encoder

                    loader = load_encoder
                self._encoders[model] = loader(self.model_dirs[model])
            return self._encoders[model]

    def _encode_image(self, model: str, data: str) -> tuple[np.ndarray, np.ndarray]:
        """Bits and relaxed code of an uploaded image (PNG or GeoTIFF, base64), checked against
        what the model takes (bands, pixel values, size: see :class:`InputSpec`)."""
        if len(data) > (self.max_image_bytes + 2) // 3 * 4:  # checked before decoding
            raise HTTPException(
                413,
                f"similarity.image is too large: {len(data) * 3 // 4} bytes, this server takes "
                f"at most {self.max_image_bytes}",
            )
        encoder = self._encoder(model, "an image query")
        import torch
        import torch.nn.functional as F

        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError as exc:
            raise InvalidQueryError(f"similarity.image is not valid base64: {exc}") from exc
        image = _read_image(raw, self.max_image_pixels)
        try:  # a cross-modal model encodes the image with the branch of its sensor
            source = encoder.config.source_for_band_count(image.pixels.shape[0])
            encoder.config.input_of(source).check(
                model, image.what, image.dtype, image.pixels.shape[1:], image.values
            )
        except ValueError as exc:
            raise InvalidQueryError(f"similarity.image: {exc}") from exc
        x = torch.from_numpy(image.pixels)[None]
        size = encoder.config.input_size
        if size and x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear")
        bits, relaxed = encoder(x, source)
        return bits[0].numpy().astype(np.uint8), relaxed[0].numpy()


def _given_code(sim: SimilarityQuery, bits: int | None) -> bytes:
    """The packed code of ``similarity.code`` (big-endian bit order)."""
    assert sim.code is not None
    try:
        packed = decode_code(sim.code, bits, sim.encoding, field="similarity.code")
    except CBIRFieldError as exc:
        hint = ""
        if sim.encoding == "base64" and len(sim.code) * 4 == bits and _HEX.fullmatch(sim.code):
            hint = (
                f"; it looks like a {bits}-bit hex code: give encoding 'hex' "
                "(GET: similarity_encoding=hex)"
            )
        raise InvalidQueryError(f"{exc}{hint}") from exc
    if sim.bit_order == "little":
        packed = np.packbits(np.unpackbits(packed, bitorder="little"))
    return packed.tobytes()


@attr.s(auto_attribs=True, frozen=True)
class UploadedImage:
    """An uploaded image, decoded: its pixels and what they are."""

    pixels: np.ndarray  # (bands, rows, cols) float32, GeoTIFF scale/offset applied
    dtype: str  # the pixel type of the values (float32 once a scale/offset was applied)
    what: str  # e.g. "8-bit PNG", for messages
    values: tuple[float, float]  # finite min, max


@contextmanager
def _gdal_warnings() -> Iterator[list[str]]:
    """The warnings GDAL reports in this thread while the block runs (rasterio logs them)."""
    seen: list[str] = []
    me = threading.get_ident()

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.thread == me and record.levelno >= logging.WARNING:
                seen.append(record.getMessage())

    handler = _Collect()
    logger = logging.getLogger("rasterio")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


def _root_cause(exc: BaseException) -> BaseException:
    """The first error of a chain (GDAL's own message under rasterio's 'Read failed')."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def _read_image(raw: bytes, max_pixels: int) -> UploadedImage:
    """Decode an upload strictly: every pixel is read, and a GDAL error or warning on the way
    (a truncated or corrupt file) is a 400; more than ``max_pixels`` values a 413, before any
    pixel is read. GDAL's whole-image PNG path is off: it fills a truncated PNG with garbage
    without a word; the row by row path reports libpng's read errors."""
    import rasterio
    from rasterio.io import MemoryFile

    def unreadable(exc: BaseException) -> InvalidQueryError:
        return InvalidQueryError(
            f"similarity.image is not a readable PNG or GeoTIFF image (truncated or corrupt?): "
            f"{_root_cause(exc)}"
        )

    try:
        with (
            rasterio.Env(GDAL_PNG_WHOLE_IMAGE_OPTIM="NO"),
            MemoryFile(raw) as mem,
            mem.open(driver=IMAGE_DRIVERS) as src,
        ):
            # the header only: a decompression bomb is refused before any pixel is read
            size = src.width * src.height * src.count
            if size > max_pixels:
                raise HTTPException(
                    413,
                    f"similarity.image is too large: {src.width} x {src.height} pixels x "
                    f"{src.count} band(s) = {size} values, this server takes at most "
                    f"{max_pixels}",
                )
            with _gdal_warnings() as warnings:
                pixels = src.read()
            if warnings:
                raise InvalidQueryError(
                    f"similarity.image is damaged (truncated or corrupt?): GDAL: {warnings[0]}"
                )
            dtype, driver = src.dtypes[0], src.driver
            scales, offsets = src.scales, src.offsets
    except (HTTPException, InvalidQueryError):
        raise
    except Exception as exc:  # GDAL's errors on a file it cannot read are many: all are 400s
        raise unreadable(exc) from exc
    kind = "bit float" if np.dtype(dtype).kind == "f" else "bit"
    what = f"{np.dtype(dtype).itemsize * 8}-{kind} {'GeoTIFF' if driver == 'GTiff' else driver}"
    values = pixels.astype(np.float32)
    if any(sc != 1 for sc in scales) or any(off != 0 for off in offsets):  # physical units
        scale = np.asarray(scales, np.float32)[:, None, None]
        values = values * scale + np.asarray(offsets, np.float32)[:, None, None]
        dtype = "float32"
    finite = np.isfinite(values)
    if not finite.all():
        raise InvalidQueryError(
            f"similarity.image: {what} has {int((~finite).sum())} NaN or infinite value(s); "
            "the model takes finite values only"
        )
    return UploadedImage(values, dtype, what, (float(values.min()), float(values.max())))
