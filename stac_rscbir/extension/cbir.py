"""The STAC ``cbir`` extension in pystac's style: hash codes, descriptors, models and chip windows.

``CBIRExtension.ext(item, add_if_missing=True).add_code(HashCode.from_bits(...))`` stores a code;
``CBIRExtension.ext(collection).models`` describes the models once per collection. Everything read
back is decoded strictly, so a bad field raises :class:`CBIRFieldError` naming it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Generic, Literal, TypeVar, cast

import numpy as np
import numpy.typing as npt
import pystac
from pystac.extensions.base import ExtensionManagementMixin, PropertiesExtension, SummariesExtension
from pystac.extensions.hooks import ExtensionHooks

from stac_rscbir.extension.codec import (
    BIT_ORDERS,
    BYTE_ORDERS,
    CODE_ENCODINGS,
    DESCRIPTOR_DTYPES,
    DESCRIPTOR_ENCODINGS,
    BitOrder,
    ByteOrder,
    CBIRFieldError,
    CodeEncoding,
    check_bits,
    check_choice,
    decode_code,
    decode_descriptor,
    encode_code,
    encode_descriptor,
    pack_bits,
    packed_to_words,
    unpack_bits,
    words_to_packed,
)

log = logging.getLogger(__name__)

T = TypeVar("T", pystac.Item, pystac.Asset, pystac.ItemAssetDefinition, pystac.Collection)

SCHEMA_URI: str = "https://stac-extensions.github.io/cbir/v1.0.0/schema.json"
PREFIX: str = "cbir:"
CODES_PROP: str = PREFIX + "codes"
MODELS_PROP: str = PREFIX + "models"
CHIP_PROP: str = PREFIX + "chip"
#: Link relation from an Item to the Collection or MLM model Item that describes a model.
MODEL_REL: str = "cbir:model"
#: Length of the ranked list of a similarity search that gives no ``k``: one default for
#: ``POST /search``, ``GET /search``, ``/similar`` and :func:`stac_rscbir.client.search_similar`.
DEFAULT_K: int = 100

_MODEL_ID_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")


def _require(d: dict[str, Any], key: str, field: str) -> Any:
    if key not in d or d[key] is None:
        raise CBIRFieldError(f"{field}.{key}", "is required")
    return d[key]


def _check_str(value: object, field: str, max_len: int = 200) -> str:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise CBIRFieldError(field, f"must be a non-empty string of at most {max_len} characters")
    return value


def _check_model_id(value: object, field: str) -> str:
    text = _check_str(value, field)
    if not text[0].isalnum() or not set(text) <= _MODEL_ID_CHARS:
        raise CBIRFieldError(
            field, f"{text!r} is not a model identifier ([A-Za-z0-9._:-], alnum first)"
        )
    return text


def _check_bands(value: object, field: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(b, str) and b for b in value):
        raise CBIRFieldError(field, "must be a non-empty list of band or polarisation names")
    return value


def _check_int(value: object, field: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise CBIRFieldError(field, f"must be an integer >= {minimum}, got {value!r}")
    return int(value)


class Descriptor:
    """A float descriptor stored beside a hash code (for re-ranking and float kNN)."""

    properties: dict[str, Any]

    def __init__(self, properties: dict[str, Any]) -> None:
        self.properties = properties

    @classmethod
    def create(
        cls, values: npt.ArrayLike, dtype: str = "float32", byte_order: ByteOrder = "little"
    ) -> Descriptor:
        """Encode ``values`` (1-D, finite) as a descriptor of ``dtype``."""
        value = encode_descriptor(values, dtype, byte_order)
        return cls(
            {
                "dtype": dtype,
                "dim": int(np.asarray(values).shape[0]),
                "byte_order": byte_order,
                "encoding": "base64",
                "value": value,
            }
        )

    @classmethod
    def from_dict(cls, d: object, field: str = "descriptor") -> Descriptor:
        """Wrap and validate a stored descriptor object."""
        if not isinstance(d, dict):
            raise CBIRFieldError(field, "must be an object")
        desc = cls(d)
        desc.array(field)
        return desc

    @property
    def dtype(self) -> str:
        return cast(str, self.properties["dtype"])

    @property
    def dim(self) -> int:
        return cast(int, self.properties["dim"])

    @property
    def byte_order(self) -> ByteOrder:
        return cast(ByteOrder, self.properties.get("byte_order", "little"))

    @property
    def encoding(self) -> str:
        return cast(str, self.properties.get("encoding", "base64"))

    def array(self, field: str = "descriptor") -> npt.NDArray[np.floating]:
        """The decoded, native-endian vector (raises CBIRFieldError on any inconsistency)."""
        d = self.properties
        check_choice(_require(d, "dtype", field), DESCRIPTOR_DTYPES, f"{field}.dtype")
        dim = _check_int(_require(d, "dim", field), f"{field}.dim", 1)
        check_choice(self.byte_order, BYTE_ORDERS, f"{field}.byte_order")
        check_choice(self.encoding, DESCRIPTOR_ENCODINGS, f"{field}.encoding")
        return decode_descriptor(
            _require(d, "value", field), self.dtype, dim, self.byte_order, f"{field}.value"
        )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.properties)


class HashCode:
    """One model's binary code of an Item (or Asset): one entry of ``cbir:codes``."""

    properties: dict[str, Any]

    def __init__(self, properties: dict[str, Any]) -> None:
        self.properties = properties

    @classmethod
    def create(
        cls,
        model: str,
        model_version: str,
        packed: bytes | npt.ArrayLike,
        bits: int,
        *,
        bit_order: BitOrder = "big",
        encoding: CodeEncoding = "base64",
        descriptor: Descriptor | None = None,
        bands: list[str] | None = None,
    ) -> HashCode:
        """Build an entry from the packed bytes of the code (``bits // 8`` uint8 values)."""
        check_choice(bit_order, BIT_ORDERS, "bit_order")
        props: dict[str, Any] = {
            "model": _check_model_id(model, "model"),
            "model_version": _check_str(model_version, "model_version", 100),
            "bits": check_bits(bits),
            "bit_order": bit_order,
            "encoding": encoding,
            "code": encode_code(packed, bits, encoding),
        }
        if bands is not None:
            props["bands"] = _check_bands(bands, "bands")
        if descriptor is not None:
            props["descriptor"] = descriptor.to_dict()
        return cls(props)

    @classmethod
    def from_bits(
        cls, model: str, model_version: str, bits: npt.ArrayLike, **kwargs: Any
    ) -> HashCode:
        """Build an entry from a 0/1 (or bool) vector; its length is the bit length."""
        arr = np.asarray(bits)
        if arr.ndim != 1:
            raise CBIRFieldError("bits", f"one code is a 1-D bit vector, got shape {arr.shape}")
        packed = pack_bits(arr, kwargs.get("bit_order", "big"))
        return cls.create(model, model_version, packed, arr.shape[0], **kwargs)

    @classmethod
    def from_words(
        cls, model: str, model_version: str, words: npt.ArrayLike, **kwargs: Any
    ) -> HashCode:
        """Build an entry from uint64 words (64 bits each) in the documented word layout."""
        packed = words_to_packed(np.atleast_1d(np.asarray(words)), kwargs.get("bit_order", "big"))
        return cls.create(model, model_version, packed, packed.shape[-1] * 8, **kwargs)

    @classmethod
    def from_dict(cls, d: object, field: str = "code") -> HashCode:
        """Wrap a stored entry and validate all of it (code length, encodings, descriptor)."""
        if not isinstance(d, dict):
            raise CBIRFieldError(field, "must be an object")
        code = cls(d)
        code.validate(field)
        return code

    def validate(self, field: str = "code") -> None:
        """Raise CBIRFieldError naming the first invalid part of this entry."""
        d = self.properties
        _check_model_id(_require(d, "model", field), f"{field}.model")
        _check_str(_require(d, "model_version", field), f"{field}.model_version", 100)
        check_choice(_require(d, "bit_order", field), BIT_ORDERS, f"{field}.bit_order")
        self.packed(field)
        if "bands" in d:
            _check_bands(d["bands"], f"{field}.bands")
        if d.get("descriptor") is not None:
            Descriptor.from_dict(d["descriptor"], f"{field}.descriptor")

    @property
    def model(self) -> str:
        return cast(str, self.properties["model"])

    @property
    def model_version(self) -> str:
        return cast(str, self.properties["model_version"])

    @property
    def bits(self) -> int:
        return cast(int, self.properties["bits"])

    @property
    def bit_order(self) -> BitOrder:
        return cast(BitOrder, self.properties["bit_order"])

    @property
    def encoding(self) -> CodeEncoding:
        return cast(CodeEncoding, self.properties["encoding"])

    @property
    def code(self) -> str:
        """The stored text of the code."""
        return cast(str, self.properties["code"])

    @property
    def bands(self) -> list[str] | None:
        return self.properties.get("bands")

    @property
    def descriptor(self) -> Descriptor | None:
        d = self.properties.get("descriptor")
        return None if d is None else Descriptor(d)

    def packed(self, field: str = "code") -> npt.NDArray[np.uint8]:
        """The code's packed bytes (the layout FAISS binary indexes take)."""
        d = self.properties
        bits = check_bits(_require(d, "bits", field), f"{field}.bits")
        encoding = check_choice(_require(d, "encoding", field), CODE_ENCODINGS, f"{field}.encoding")
        return decode_code(_require(d, "code", field), bits, encoding, f"{field}.code")  # type: ignore[arg-type]

    def bit_array(self) -> npt.NDArray[np.uint8]:
        """The code as a 0/1 vector of length ``bits``."""
        return unpack_bits(self.packed(), self.bit_order)

    def words(self) -> npt.NDArray[np.uint64]:
        """The code as uint64 words (bit lengths that are multiples of 64)."""
        return packed_to_words(self.packed(), self.bit_order)

    def format(self) -> dict[str, Any]:
        """The entry without its values: what a Collection summary lists."""
        fmt = {k: v for k, v in self.properties.items() if k not in ("code", "descriptor")}
        if self.descriptor is not None:
            fmt["descriptor"] = {
                k: v for k, v in self.descriptor.properties.items() if k != "value"
            }
        return fmt

    def to_dict(self) -> dict[str, Any]:
        return dict(self.properties)

    def __repr__(self) -> str:
        return f"<HashCode model={self.model}@{self.model_version} bits={self.bits}>"


def code_of(obj: dict[str, Any] | None, model: str, version: str | None = None) -> HashCode | None:
    """The code of ``model`` on an item: the one rule that the index following the store's
    change log, its rebuild from either store and :meth:`CBIRExtension.get_code` apply.

    ``obj`` is an Item (dict), its ``properties``, or any object whose fields hold
    ``cbir:codes`` (an Asset's). The candidates are the entries of ``model`` (of ``version``
    when given: the index passes the version it serves,
    :func:`stac_rscbir.store.models.served_model`) that decode; an entry that does not is
    skipped with a warning naming it. Of several candidates, the one listed last is the code:
    without ``version``, several versions of the model (legitimate while re-encoding) give the
    current one, which ingestion appends after the older (as a Collection's current model is the
    one its ``cbir:models`` lists last); with it, two codes of one version, which the stores and
    the API refuse (:func:`check_unique_codes`) but ``pypgstac load`` or SQL can still store,
    give the later one, as a later duplicate key does in JSON. None when no candidate decodes
    (or ``obj`` is None: a deleted item).
    """
    if obj is None:
        return None
    props = obj.get("properties")
    scope = props if CODES_PROP not in obj and isinstance(props, dict) else obj
    raw = scope.get(CODES_PROP)
    if not isinstance(raw, list):
        return None
    for i in reversed(range(len(raw))):
        entry = raw[i]
        if not (
            isinstance(entry, dict)
            and entry.get("model") == model
            and version in (None, entry.get("model_version"))
        ):
            continue
        try:
            return HashCode.from_dict(entry, f"{CODES_PROP}[{i}]")
        except CBIRFieldError as exc:
            where = f"item {obj.get('collection')}/{obj.get('id')}" if scope is props else "code"
            log.warning("%s: code of model %s skipped: %s", where, model, exc)
    return None


def check_unique_codes(codes: Sequence[HashCode], field: str = CODES_PROP) -> None:
    """Raise CBIRFieldError naming the second code of one model and one version in ``codes``
    (the entries of ``field``, in order): an index could not tell which of the two is the item's.
    Codes of several versions of one model are fine (re-encoding writes the new beside the old).
    """
    first: dict[tuple[str, str], int] = {}
    for i, code in enumerate(codes):
        j = first.setdefault((code.model, code.model_version), i)
        if j != i:
            raise CBIRFieldError(
                f"{field}[{i}]",
                f"a second code of model {code.model!r} version {code.model_version!r} "
                f"(first at [{j}])",
            )


#: Pixel types a model's ``input.dtype`` may name.
INPUT_DTYPES: tuple[str, ...] = ("uint8", "uint16", "int16", "float32")


def _check_input(value: object, field: str) -> None:
    """A model's (or branch's) ``input``: chip size, resolution and the pixel values it takes."""
    if not isinstance(value, dict):
        raise CBIRFieldError(field, "must be an object")
    if "dtype" in value:
        check_choice(value["dtype"], INPUT_DTYPES, f"{field}.dtype")
    if "min_size" in value:
        _check_int(value["min_size"], f"{field}.min_size", 1)
    if "units" in value:
        _check_str(value["units"], f"{field}.units", 200)
    if "value_range" in value:
        vr = value["value_range"]
        ok = (
            isinstance(vr, list)
            and len(vr) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in vr)
            and all(math.isfinite(v) for v in vr)
            and vr[0] <= vr[1]
        )
        if not ok:
            raise CBIRFieldError(f"{field}.value_range", f"must be finite [min, max], got {vr!r}")


class CBIRModel:
    """A model described once (Collection or model Item): what its codes look like and consume."""

    properties: dict[str, Any]

    def __init__(self, properties: dict[str, Any]) -> None:
        self.properties = properties

    @classmethod
    def create(
        cls,
        id: str,
        version: str,
        bits: int,
        bands: list[str],
        *,
        branches: list[dict[str, Any]] | None = None,
        bit_order: BitOrder = "big",
        encoding: CodeEncoding = "base64",
        method: str | None = None,
        backbone: str | None = None,
        descriptor_dtype: str | None = None,
        descriptor_dim: int | None = None,
        chip_size: tuple[int, int] | None = None,
        resolution: float | None = None,
        href: str | None = None,
        description: str | None = None,
        tta: bool = False,
        values: dict[str, Any] | None = None,
    ) -> CBIRModel:
        """Describe a model; optional parts are left out of the stored object.

        ``branches`` (cross-modal models) lists every input branch as ``{"bands": [...],
        "backbone": ..., "input": {...}}``, the first reading ``bands``. ``tta``: the codes are
        the model's binarisation of the mean relaxed code over the 8 dihedral views (stored
        only when true). ``values``: the pixel values the (first branch of the) model takes,
        ``{"dtype", "value_range", "units", "min_size"}``, stored in ``input``.
        """
        props: dict[str, Any] = {
            "id": id,
            "version": version,
            "bits": bits,
            "bit_order": bit_order,
            "encoding": encoding,
            "bands": list(bands),
        }
        if branches is not None:
            props["branches"] = [dict(b) for b in branches]
        optional = {
            "method": method,
            "backbone": backbone,
            "href": href,
            "description": description,
        }
        props.update({k: v for k, v in optional.items() if v is not None})
        if tta:
            props["tta"] = True
        if descriptor_dtype is not None or descriptor_dim is not None:
            props["descriptor"] = {"dtype": descriptor_dtype or "float32", "dim": descriptor_dim}
        model_input = {
            "chip_size": list(chip_size) if chip_size else None,
            "resolution": resolution,
            **(values or {}),
        }
        if any(v is not None for v in model_input.values()):
            props["input"] = {k: v for k, v in model_input.items() if v is not None}
        model = cls(props)
        model.validate("model")
        return model

    @classmethod
    def from_dict(cls, d: object, field: str = "model") -> CBIRModel:
        if not isinstance(d, dict):
            raise CBIRFieldError(field, "must be an object")
        model = cls(d)
        model.validate(field)
        return model

    def validate(self, field: str = "model") -> None:
        """Raise CBIRFieldError naming the first invalid part of this description."""
        d = self.properties
        _check_model_id(_require(d, "id", field), f"{field}.id")
        _check_str(_require(d, "version", field), f"{field}.version", 100)
        check_bits(_require(d, "bits", field), f"{field}.bits")
        check_choice(_require(d, "bit_order", field), BIT_ORDERS, f"{field}.bit_order")
        check_choice(_require(d, "encoding", field), CODE_ENCODINGS, f"{field}.encoding")
        bands = _check_bands(_require(d, "bands", field), f"{field}.bands")
        branches = d.get("branches")
        if branches is not None:
            if not isinstance(branches, list) or len(branches) < 2:
                raise CBIRFieldError(f"{field}.branches", "must list at least two input branches")
            for i, branch in enumerate(branches):
                where = f"{field}.branches[{i}]"
                if not isinstance(branch, dict):
                    raise CBIRFieldError(where, "must be an object")
                _check_bands(_require(branch, "bands", where), f"{where}.bands")
                if "input" in branch:
                    _check_input(branch["input"], f"{where}.input")
            if branches[0]["bands"] != bands:
                raise CBIRFieldError(
                    f"{field}.branches[0].bands",
                    f"{branches[0]['bands']} differs from the model's bands {bands}",
                )
        if "input" in d:
            _check_input(d["input"], f"{field}.input")
        if not isinstance(d.get("tta", False), bool):
            raise CBIRFieldError(f"{field}.tta", f"must be true or false, got {d['tta']!r}")
        desc = d.get("descriptor")
        if desc is not None:
            check_choice(
                _require(desc, "dtype", f"{field}.descriptor"),
                DESCRIPTOR_DTYPES,
                f"{field}.descriptor.dtype",
            )
            _check_int(_require(desc, "dim", f"{field}.descriptor"), f"{field}.descriptor.dim", 1)

    @property
    def id(self) -> str:
        return cast(str, self.properties["id"])

    @property
    def version(self) -> str:
        return cast(str, self.properties["version"])

    @property
    def bits(self) -> int:
        return cast(int, self.properties["bits"])

    @property
    def bit_order(self) -> BitOrder:
        return cast(BitOrder, self.properties["bit_order"])

    @property
    def encoding(self) -> CodeEncoding:
        return cast(CodeEncoding, self.properties["encoding"])

    @property
    def bands(self) -> list[str]:
        return cast(list[str], self.properties["bands"])

    @property
    def branches(self) -> list[dict[str, Any]]:
        """The input branches; a single-branch model has one, reading :attr:`bands`."""
        return cast(
            list[dict[str, Any]], self.properties.get("branches") or [{"bands": self.bands}]
        )

    @property
    def tta(self) -> bool:
        """Whether the codes come from test-time augmentation (8 dihedral views)."""
        return bool(self.properties.get("tta", False))

    @property
    def descriptor_dim(self) -> int | None:
        desc = self.properties.get("descriptor")
        return None if desc is None else desc.get("dim")

    def check_code(self, code: HashCode, field: str = "code") -> None:
        """Raise CBIRFieldError if ``code`` does not have the format this model produces."""
        expected = {"bits": self.bits, "bit_order": self.bit_order, "encoding": self.encoding}
        for key, value in expected.items():
            if code.properties.get(key) != value:
                raise CBIRFieldError(
                    f"{field}.{key}",
                    f"{code.properties.get(key)!r} differs from model {self.id}@{self.version} "
                    f"({value!r})",
                )
        desc = code.descriptor
        if desc is not None and self.descriptor_dim is not None and desc.dim != self.descriptor_dim:
            raise CBIRFieldError(
                f"{field}.descriptor.dim",
                f"{desc.dim} differs from model {self.id}@{self.version} ({self.descriptor_dim})",
            )

    def to_dict(self) -> dict[str, Any]:
        return dict(self.properties)

    def __repr__(self) -> str:
        return f"<CBIRModel {self.id}@{self.version} bits={self.bits} bands={self.bands}>"


class ChipWindow:
    """Where a chip Item lies in its source Item: a pixel window of the source asset's grid."""

    properties: dict[str, Any]

    def __init__(self, properties: dict[str, Any]) -> None:
        self.properties = properties

    @classmethod
    def create(
        cls,
        col_off: int,
        row_off: int,
        width: int,
        height: int,
        *,
        source_asset: str | None = None,
        source_shape: tuple[int, int] | None = None,
    ) -> ChipWindow:
        """Describe the window (rasterio's ``Window`` order: col_off, row_off, width, height)."""
        props: dict[str, Any] = {
            "window": {"col_off": col_off, "row_off": row_off, "width": width, "height": height}
        }
        if source_asset is not None:
            props["source_asset"] = source_asset
        if source_shape is not None:
            props["source_shape"] = list(source_shape)
        chip = cls(props)
        chip.validate(CHIP_PROP)
        return chip

    @classmethod
    def from_dict(cls, d: object, field: str = CHIP_PROP) -> ChipWindow:
        if not isinstance(d, dict):
            raise CBIRFieldError(field, "must be an object")
        chip = cls(d)
        chip.validate(field)
        return chip

    def validate(self, field: str = CHIP_PROP) -> None:
        """Raise CBIRFieldError if the window is malformed or leaves the source shape."""
        window = _require(self.properties, "window", field)
        if not isinstance(window, dict):
            raise CBIRFieldError(f"{field}.window", "must be an object")
        for key, minimum in (("col_off", 0), ("row_off", 0), ("width", 1), ("height", 1)):
            _check_int(_require(window, key, f"{field}.window"), f"{field}.window.{key}", minimum)
        shape = self.properties.get("source_shape")
        if shape is not None:
            if not (isinstance(shape, list) and len(shape) == 2):
                raise CBIRFieldError(f"{field}.source_shape", "must be [rows, cols]")
            rows = _check_int(shape[0], f"{field}.source_shape[0]", 1)
            cols = _check_int(shape[1], f"{field}.source_shape[1]", 1)
            if (
                window["row_off"] + window["height"] > rows
                or window["col_off"] + window["width"] > cols
            ):
                raise CBIRFieldError(f"{field}.window", f"extends beyond source_shape {shape}")

    @property
    def window(self) -> tuple[int, int, int, int]:
        """(col_off, row_off, width, height), ready for ``rasterio.windows.Window(*w)``."""
        w = self.properties["window"]
        return (w["col_off"], w["row_off"], w["width"], w["height"])

    @property
    def source_asset(self) -> str | None:
        return self.properties.get("source_asset")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.properties)


class CBIRExtension(
    Generic[T],
    PropertiesExtension,
    ExtensionManagementMixin[pystac.Item | pystac.Collection],
):
    """Access to ``cbir:`` fields of an Item, Asset, item-asset definition or Collection.

    Use :meth:`CBIRExtension.ext`, e.g. ``CBIRExtension.ext(item, add_if_missing=True)``.
    """

    name: Literal["cbir"] = "cbir"

    def apply(
        self,
        codes: Sequence[HashCode] | None = None,
        chip: ChipWindow | None = None,
        models: Sequence[CBIRModel] | None = None,
    ) -> None:
        """Set the extension's fields (None removes a field)."""
        self.codes = list(codes) if codes is not None else None
        self.chip = chip
        self.models = list(models) if models is not None else None

    @property
    def codes(self) -> list[HashCode] | None:
        """The codes, one per model; each is validated as it is read."""
        raw = self._get_property(CODES_PROP, list)
        if raw is None:
            return None
        if not isinstance(raw, list):
            raise CBIRFieldError(CODES_PROP, "must be a list of code objects")
        codes = [HashCode.from_dict(d, f"{CODES_PROP}[{i}]") for i, d in enumerate(raw)]
        check_unique_codes(codes)
        return codes

    @codes.setter
    def codes(self, v: Sequence[HashCode] | None) -> None:
        if v is not None:
            if not v:
                raise CBIRFieldError(CODES_PROP, "needs at least one code (use None to remove)")
            for i, code in enumerate(v):
                code.validate(f"{CODES_PROP}[{i}]")
            check_unique_codes(v)
        self._set_property(CODES_PROP, list(v) if v is not None else None)

    def get_code(self, model: str, model_version: str | None = None) -> HashCode | None:
        """The code of ``model`` (of any version unless ``model_version`` is given), chosen by
        :func:`code_of`: the code a hash index of the model serves for this object."""
        return code_of(self.properties, model, model_version)

    def add_code(self, code: HashCode) -> None:
        """Store ``code``, replacing the entry of the same model (one version per model)."""
        others = [c for c in self.codes or [] if c.model != code.model]
        self.codes = [*others, code]

    def remove_code(self, model: str) -> None:
        """Drop the code of ``model``; the field goes when no code is left."""
        left = [c for c in self.codes or [] if c.model != model]
        self.codes = left or None

    @property
    def chip(self) -> ChipWindow | None:
        """The chip's window in its source Item, for chip Items."""
        raw = self._get_property(CHIP_PROP, dict)
        return None if raw is None else ChipWindow.from_dict(raw)

    @chip.setter
    def chip(self, v: ChipWindow | None) -> None:
        if v is not None:
            v.validate()
        self._set_property(CHIP_PROP, v.to_dict() if v is not None else None)

    @property
    def models(self) -> list[CBIRModel] | None:
        """Model descriptions (in a Collection or a model Item)."""
        raw = self._get_property(MODELS_PROP, list)
        if raw is None:
            return None
        if not isinstance(raw, list):
            raise CBIRFieldError(MODELS_PROP, "must be a list of model objects")
        models = [CBIRModel.from_dict(d, f"{MODELS_PROP}[{i}]") for i, d in enumerate(raw)]
        _check_unique_models(models)
        return models

    @models.setter
    def models(self, v: Sequence[CBIRModel] | None) -> None:
        if v is not None:
            for i, model in enumerate(v):
                model.validate(f"{MODELS_PROP}[{i}]")
            _check_unique_models(v)
        self._set_property(MODELS_PROP, list(v) if v else None)

    def get_model(self, model_id: str, version: str | None = None) -> CBIRModel | None:
        """The description of ``model_id`` (latest listed if no version is given)."""
        found = [m for m in self.models or [] if m.id == model_id and version in (None, m.version)]
        return found[-1] if found else None

    @classmethod
    def get_schema_uri(cls) -> str:
        return SCHEMA_URI

    @classmethod
    def ext(cls, obj: T, add_if_missing: bool = False) -> CBIRExtension[T]:
        """Extend ``obj`` (Item, Asset, ItemAssetDefinition or Collection) with ``cbir`` fields."""
        if isinstance(obj, pystac.Item):
            cls.ensure_has_extension(obj, add_if_missing)
            return cast(CBIRExtension[T], ItemCBIRExtension(obj))
        if isinstance(obj, pystac.Collection):
            cls.ensure_has_extension(obj, add_if_missing)
            return cast(CBIRExtension[T], CollectionCBIRExtension(obj))
        if isinstance(obj, pystac.Asset):
            cls.ensure_owner_has_extension(obj, add_if_missing)
            return cast(CBIRExtension[T], AssetCBIRExtension(obj))
        if isinstance(obj, pystac.ItemAssetDefinition):
            cls.ensure_owner_has_extension(obj, add_if_missing)
            return cast(CBIRExtension[T], ItemAssetsCBIRExtension(obj))
        raise pystac.ExtensionTypeError(cls._ext_error_message(obj))

    @classmethod
    def summaries(
        cls, obj: pystac.Collection, add_if_missing: bool = False
    ) -> SummariesCBIRExtension:
        """The Collection's summaries of ``cbir`` fields."""
        cls.ensure_has_extension(obj, add_if_missing)
        return SummariesCBIRExtension(obj)


class ItemCBIRExtension(CBIRExtension[pystac.Item]):
    """``cbir`` fields in an Item's properties, plus links to the models that made its codes."""

    item: pystac.Item
    properties: dict[str, Any]

    def __init__(self, item: pystac.Item) -> None:
        self.item = item
        self.properties = item.properties

    def add_model_link(self, href: str, model_id: str, title: str | None = None) -> pystac.Link:
        """Link the Collection or MLM Item that describes ``model_id`` (rel ``cbir:model``)."""
        link = pystac.Link(
            MODEL_REL,
            href,
            media_type=pystac.MediaType.JSON,
            title=title,
            extra_fields={"cbir:model": _check_model_id(model_id, "model")},
        )
        self.item.add_link(link)
        return link

    def model_links(self) -> list[pystac.Link]:
        return self.item.get_links(MODEL_REL)

    def __repr__(self) -> str:
        return f"<ItemCBIRExtension Item id={self.item.id}>"


class AssetCBIRExtension(CBIRExtension[pystac.Asset]):
    """``cbir`` fields of one Asset (e.g. codes per asset when an Item holds several sensors)."""

    asset_href: str
    properties: dict[str, Any]

    def __init__(self, asset: pystac.Asset) -> None:
        self.asset_href = asset.href
        self.properties = asset.extra_fields

    def __repr__(self) -> str:
        return f"<AssetCBIRExtension Asset href={self.asset_href}>"


class ItemAssetsCBIRExtension(CBIRExtension[pystac.ItemAssetDefinition]):
    """``cbir`` fields of an item-asset definition in a Collection."""

    properties: dict[str, Any]
    asset_defn: pystac.ItemAssetDefinition

    def __init__(self, item_asset: pystac.ItemAssetDefinition) -> None:
        self.asset_defn = item_asset
        self.properties = item_asset.properties


class CollectionCBIRExtension(CBIRExtension[pystac.Collection]):
    """``cbir`` fields at the top level of a Collection, chiefly ``cbir:models``."""

    collection: pystac.Collection
    properties: dict[str, Any]

    def __init__(self, collection: pystac.Collection) -> None:
        self.collection = collection
        self.properties = collection.extra_fields

    def __repr__(self) -> str:
        return f"<CollectionCBIRExtension Collection id={self.collection.id}>"


class SummariesCBIRExtension(SummariesExtension):
    """Summaries of ``cbir:codes``: the distinct code formats (no values) the Items carry."""

    @property
    def codes(self) -> list[dict[str, Any]] | None:
        return self.summaries.get_list(CODES_PROP)

    @codes.setter
    def codes(self, v: list[dict[str, Any]] | None) -> None:
        self._set_summary(CODES_PROP, v)

    def summarize(self, items: Iterable[pystac.Item]) -> list[dict[str, Any]]:
        """Set the summary from the codes of ``items`` and return it."""
        formats: list[dict[str, Any]] = []
        for item in items:
            if not CBIRExtension.has_extension(item):
                continue
            for code in CBIRExtension.ext(item).codes or []:
                if code.format() not in formats:
                    formats.append(code.format())
        self.codes = formats or None
        return formats


def _check_unique_models(models: Iterable[CBIRModel]) -> None:
    seen: set[tuple[str, str]] = set()
    for model in models:
        key = (model.id, model.version)
        if key in seen:
            raise CBIRFieldError(MODELS_PROP, f"id {key[0]!r} version {key[1]!r} appears twice")
        seen.add(key)


class CBIRExtensionHooks(ExtensionHooks):
    schema_uri = SCHEMA_URI
    prev_extension_ids: ClassVar[set[str]] = set()
    stac_object_types: ClassVar[set[pystac.STACObjectType]] = {
        pystac.STACObjectType.ITEM,
        pystac.STACObjectType.COLLECTION,
    }


CBIR_EXTENSION_HOOKS: ExtensionHooks = CBIRExtensionHooks()
