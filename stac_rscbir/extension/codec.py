"""Codecs between in-memory hash codes / descriptors and the strings stored in `cbir:` fields.

A code of ``bits`` bits is stored as its packed bytes (``bits // 8`` bytes, bit ``i`` in byte
``i // 8``). ``bit_order`` says where bit ``i`` sits inside its byte: ``"big"`` puts it at the most
significant position ``7 - i % 8`` (``numpy.packbits``' default), ``"little"`` at ``i % 8``.
The bytes are then written as canonical RFC 4648 base64 (standard alphabet, padded) or lowercase
hex. As uint64 words, word ``w`` holds bytes ``8w .. 8w+7`` read big-endian for ``"big"`` and
little-endian for ``"little"``, so bit ``i`` is bit ``63 - i % 64`` resp. ``i % 64`` of word
``i // 64`` in both cases. Descriptors are the raw bytes of ``dim`` floats of ``dtype`` in
``byte_order``, base64-encoded. Every decoder is strict: anything that would not re-encode to the
same string is rejected with a :class:`CBIRFieldError` that names the field.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Literal

import numpy as np
import numpy.typing as npt

#: Bit lengths a code may have; the JSON schema enumerates the same list.
SUPPORTED_BITS: tuple[int, ...] = (
    8,
    16,
    24,
    32,
    48,
    64,
    96,
    128,
    192,
    256,
    384,
    512,
    1024,
    2048,
    4096,
)
BIT_ORDERS: tuple[str, ...] = ("big", "little")
CODE_ENCODINGS: tuple[str, ...] = ("base64", "hex")
DESCRIPTOR_DTYPES: tuple[str, ...] = ("float16", "float32", "float64")
DESCRIPTOR_ENCODINGS: tuple[str, ...] = ("base64",)
BYTE_ORDERS: tuple[str, ...] = ("little", "big")

BitOrder = Literal["big", "little"]
CodeEncoding = Literal["base64", "hex"]
ByteOrder = Literal["little", "big"]

_B64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_HEX = re.compile(r"(?:[0-9a-f]{2})*")


class CBIRFieldError(ValueError):
    """A code or descriptor that cannot be stored or read; ``field`` names where it was found."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


def check_choice(value: object, choices: tuple[str, ...], field: str) -> str:
    """Return ``value`` if it is one of ``choices``, else raise CBIRFieldError naming ``field``."""
    if value not in choices:
        raise CBIRFieldError(field, f"unknown value {value!r}, expected one of {list(choices)}")
    return str(value)


def check_bits(bits: object, field: str = "bits") -> int:
    """Return ``bits`` if it is a supported code length."""
    if (
        isinstance(bits, bool)
        or not isinstance(bits, int | np.integer)
        or bits not in SUPPORTED_BITS
    ):
        raise CBIRFieldError(
            field, f"unsupported bit length {bits!r}, expected one of {list(SUPPORTED_BITS)}"
        )
    return int(bits)


def pack_bits(bits: npt.ArrayLike, bit_order: BitOrder = "big") -> npt.NDArray[np.uint8]:
    """Pack 0/1 (or bool) values along the last axis into bytes: shape (..., n) -> (..., n // 8)."""
    check_choice(bit_order, BIT_ORDERS, "bit_order")
    arr = np.asarray(bits)
    if arr.ndim == 0 or arr.shape[-1] % 8:
        raise CBIRFieldError(
            "bits", f"last axis must be a multiple of 8 bits, got shape {arr.shape}"
        )
    if arr.dtype != np.bool_ and not np.isin(arr, (0, 1)).all():
        raise CBIRFieldError(
            "bits", "values must be 0 or 1 (or bool); binarise first, e.g. code > 0"
        )
    return np.packbits(arr.astype(np.uint8), axis=-1, bitorder=bit_order)


def unpack_bits(packed: npt.ArrayLike, bit_order: BitOrder = "big") -> npt.NDArray[np.uint8]:
    """Unpack bytes along the last axis into 0/1 values: shape (..., m) -> (..., 8 m)."""
    check_choice(bit_order, BIT_ORDERS, "bit_order")
    return np.unpackbits(_as_bytes_array(packed), axis=-1, bitorder=bit_order)


def packed_to_words(packed: npt.ArrayLike, bit_order: BitOrder = "big") -> npt.NDArray[np.uint64]:
    """View packed codes (..., m) as uint64 words (..., m // 8) in the documented word layout."""
    check_choice(bit_order, BIT_ORDERS, "bit_order")
    arr = np.ascontiguousarray(_as_bytes_array(packed))
    if arr.shape[-1] % 8:
        raise CBIRFieldError("code", f"{arr.shape[-1] * 8} bits do not fill whole 64-bit words")
    dtype = np.dtype(">u8" if bit_order == "big" else "<u8")
    return arr.view(dtype).astype(np.uint64)


def words_to_packed(words: npt.ArrayLike, bit_order: BitOrder = "big") -> npt.NDArray[np.uint8]:
    """Inverse of :func:`packed_to_words`: uint64 words (..., w) -> packed bytes (..., 8 w)."""
    check_choice(bit_order, BIT_ORDERS, "bit_order")
    arr = np.asarray(words)
    if arr.dtype.kind not in "ui":
        raise CBIRFieldError("code", f"words must be unsigned 64-bit integers, got {arr.dtype}")
    dtype = np.dtype(">u8" if bit_order == "big" else "<u8")
    return np.ascontiguousarray(arr.astype(np.uint64).astype(dtype)).view(np.uint8)


def encode_code(
    packed: bytes | npt.ArrayLike, bits: int, encoding: CodeEncoding = "base64", field: str = "code"
) -> str:
    """Encode the packed bytes of one code of ``bits`` bits as stored text."""
    check_bits(bits, "bits")
    check_choice(encoding, CODE_ENCODINGS, "encoding")
    raw = _as_bytes_array(packed, field).tobytes()
    if len(raw) != bits // 8:
        raise CBIRFieldError(
            field, f"{len(raw)} bytes given for a {bits}-bit code ({bits // 8} expected)"
        )
    return base64.b64encode(raw).decode("ascii") if encoding == "base64" else raw.hex()


def decode_code(
    text: object, bits: int, encoding: CodeEncoding = "base64", field: str = "code"
) -> npt.NDArray[np.uint8]:
    """Decode stored text into the packed bytes of one code, checking its length vs ``bits``."""
    check_bits(bits, "bits")
    check_choice(encoding, CODE_ENCODINGS, "encoding")
    raw = _decode_text(text, encoding, field)
    if len(raw) != bits // 8:
        raise CBIRFieldError(
            field, f"decodes to {len(raw) * 8} bits but the entry declares bits={bits}"
        )
    return np.frombuffer(raw, dtype=np.uint8).copy()


def encode_descriptor(
    values: npt.ArrayLike,
    dtype: str = "float32",
    byte_order: ByteOrder = "little",
    field: str = "descriptor",
) -> str:
    """Encode a 1-D float vector as base64 of its raw ``dtype`` bytes in ``byte_order``."""
    np_dtype = _descriptor_dtype(dtype, byte_order)
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0:
        raise CBIRFieldError(
            field, f"a descriptor is a non-empty 1-D vector, got shape {arr.shape}"
        )
    if arr.dtype.kind not in "fiu":
        raise CBIRFieldError(field, f"a descriptor holds numbers, got dtype {arr.dtype}")
    with np.errstate(over="ignore"):  # an overflow becomes inf, reported just below
        cast = arr.astype(np_dtype)
    bad = ~np.isfinite(cast)
    if bad.any():
        raise CBIRFieldError(field, f"non-finite value (NaN or inf) at index {int(np.argmax(bad))}")
    return base64.b64encode(cast.tobytes()).decode("ascii")


def decode_descriptor(
    text: object,
    dtype: str,
    dim: int,
    byte_order: ByteOrder = "little",
    field: str = "descriptor.value",
) -> npt.NDArray[np.floating]:
    """Decode a stored descriptor into a native-endian vector, checking length and finiteness."""
    np_dtype = _descriptor_dtype(dtype, byte_order)
    if isinstance(dim, bool) or not isinstance(dim, int | np.integer) or dim < 1:
        raise CBIRFieldError(
            field.rsplit(".", 1)[0] + ".dim", f"must be a positive integer, got {dim!r}"
        )
    raw = _decode_text(text, "base64", field)
    if len(raw) != dim * np_dtype.itemsize:
        raise CBIRFieldError(
            field,
            f"holds {len(raw)} bytes = {len(raw) / np_dtype.itemsize:g} {dtype} values, "
            f"but dim={dim}",
        )
    arr = np.frombuffer(raw, dtype=np_dtype).astype(np_dtype.newbyteorder("="))
    bad = ~np.isfinite(arr)
    if bad.any():
        raise CBIRFieldError(field, f"non-finite value (NaN or inf) at index {int(np.argmax(bad))}")
    return arr


def _descriptor_dtype(dtype: str, byte_order: str) -> np.dtype:
    check_choice(dtype, DESCRIPTOR_DTYPES, "dtype")
    check_choice(byte_order, BYTE_ORDERS, "byte_order")
    return np.dtype(dtype).newbyteorder("<" if byte_order == "little" else ">")


def _decode_text(text: object, encoding: str, field: str) -> bytes:
    if not isinstance(text, str):
        raise CBIRFieldError(field, f"must be a string, got {type(text).__name__}")
    if encoding == "base64":
        if not _B64.fullmatch(text):
            raise CBIRFieldError(
                field, "invalid base64 (standard alphabet with '=' padding expected)"
            )
        try:
            raw = base64.b64decode(text, validate=True)
        except binascii.Error as err:  # pragma: no cover - the pattern already excludes these
            raise CBIRFieldError(field, f"invalid base64: {err}") from err
        if base64.b64encode(raw).decode("ascii") != text:
            raise CBIRFieldError(field, "non-canonical base64 (padding bits must be zero)")
        return raw
    if not _HEX.fullmatch(text):
        raise CBIRFieldError(field, "invalid hex (an even number of lowercase hex digits expected)")
    return bytes.fromhex(text)


def _as_bytes_array(packed: bytes | npt.ArrayLike, field: str = "code") -> npt.NDArray[np.uint8]:
    if isinstance(packed, bytes | bytearray | memoryview):
        return np.frombuffer(bytes(packed), dtype=np.uint8)
    arr = np.asarray(packed)
    if arr.dtype != np.uint8:
        raise CBIRFieldError(field, f"packed codes must be uint8 bytes, got dtype {arr.dtype}")
    return arr
