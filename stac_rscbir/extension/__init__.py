"""The STAC ``cbir`` extension: pystac extension classes, codecs and offline validation."""

from stac_rscbir.extension.cbir import (
    CHIP_PROP,
    CODES_PROP,
    MODEL_REL,
    MODELS_PROP,
    SCHEMA_URI,
    CBIRExtension,
    CBIRModel,
    ChipWindow,
    Descriptor,
    HashCode,
    check_unique_codes,
    code_of,
)
from stac_rscbir.extension.codec import SUPPORTED_BITS, CBIRFieldError

__all__ = [
    "CHIP_PROP",
    "CODES_PROP",
    "MODELS_PROP",
    "MODEL_REL",
    "SCHEMA_URI",
    "SUPPORTED_BITS",
    "CBIRExtension",
    "CBIRFieldError",
    "CBIRModel",
    "ChipWindow",
    "Descriptor",
    "HashCode",
    "check_unique_codes",
    "code_of",
]
