"""The published JSON schema, the examples and the Python class agree; bad input is rejected."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from typing import Any

import jsonschema
import numpy as np
import pystac
import pytest

from stac_rscbir.extension import SCHEMA_URI, SUPPORTED_BITS, CBIRExtension, HashCode
from stac_rscbir.extension.codec import BIT_ORDERS, CODE_ENCODINGS, DESCRIPTOR_DTYPES
from stac_rscbir.extension.validation import (
    CBIRValidationError,
    cbir_errors,
    cbir_schema,
    models_of,
    schema_errors,
    validate,
)

from .conftest import EXAMPLES, SCHEMA_FILE, load_json

SCHEMA = load_json(SCHEMA_FILE)
S2 = load_json(EXAMPLES / "item-sentinel2-l2a.json")
MODELS = {
    **models_of(load_json(EXAMPLES / "collection.json")),
    **models_of(load_json(EXAMPLES / "model-item-mlm.json")),
}


def cbir_only(doc: dict[str, Any]) -> list[str]:
    """Every message of the cbir schema alone, down to the leaves that oneOf/anyOf hide."""
    messages = []
    stack = list(jsonschema.Draft7Validator(SCHEMA).iter_errors(doc))
    while stack:
        error = stack.pop()
        messages.append(error.message)
        stack.extend(error.context or [])
    return messages


def test_schema_is_draft07_and_matches_python_constants() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    assert SCHEMA["$id"] == SCHEMA_URI + "#"
    assert cbir_schema() == SCHEMA
    d = SCHEMA["definitions"]
    assert tuple(d["bits"]["enum"]) == SUPPORTED_BITS
    assert tuple(d["bit_order"]["enum"]) == BIT_ORDERS
    assert tuple(d["code_encoding"]["enum"]) == CODE_ENCODINGS
    assert tuple(d["descriptor_format"]["properties"]["dtype"]["enum"]) == DESCRIPTOR_DTYPES


def test_required_examples_exist() -> None:
    names = {p.name for p in EXAMPLES.glob("*.json")}
    assert {
        "item-sentinel2-l2a.json",
        "item-sentinel1-grd.json",
        "item-two-models.json",
        "collection.json",
        "model-item-mlm.json",
        "item-chip.json",
    } <= names
    two = load_json(EXAMPLES / "item-two-models.json")
    assert len({c["model"] for c in two["properties"]["cbir:codes"]}) == 2


def test_example_validates_offline_against_everything_it_declares(example: dict[str, Any]) -> None:
    assert SCHEMA_URI in example["stac_extensions"]
    assert schema_errors(example) == []
    assert cbir_errors(example, MODELS) == []
    validate(example, MODELS)


def test_every_example_code_comes_from_a_described_model() -> None:
    coded = [load_json(p) for p in sorted(EXAMPLES.glob("item-*.json"))]
    assert len(coded) >= 4
    for doc in coded:
        for code in doc["properties"]["cbir:codes"]:
            assert (code["model"], code["model_version"]) in MODELS, (doc["id"], code["model"])


def test_example_roundtrips_through_pystac(example: dict[str, Any]) -> None:
    obj = pystac.read_dict(copy.deepcopy(example))
    assert obj.to_dict(include_self_link=False, transform_hrefs=False) == example
    ext = CBIRExtension.ext(obj)  # type: ignore[type-var]
    for code in ext.codes or []:
        again = HashCode.create(
            code.model,
            code.model_version,
            code.packed(),
            code.bits,
            bit_order=code.bit_order,
            encoding=code.encoding,
            descriptor=code.descriptor,
            bands=code.bands,
        )
        assert again.to_dict() == code.to_dict()


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("encoding", CODE_ENCODINGS)
def test_schema_code_length_rule_agrees_with_codec(bits: int, encoding: str) -> None:
    rng = np.random.default_rng(bits)
    doc = copy.deepcopy(S2)
    entry = HashCode.from_bits("m", "1", rng.integers(0, 2, bits), encoding=encoding).to_dict()
    doc["properties"]["cbir:codes"] = [entry]
    assert cbir_only(doc) == []
    for delta in (-1, 1):
        raw = bytes(bits // 8 + delta)
        entry["code"] = base64.b64encode(raw).decode() if encoding == "base64" else raw.hex()
        messages = cbir_only(doc)
        # the code's length pattern for these bits rejects it
        assert any(m.startswith(f"{entry['code']!r} does not match") for m in messages), messages
        with pytest.raises(CBIRValidationError, match=r"cbir:codes\[0\]\.code: decodes to"):
            validate(doc)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node: Any = doc
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


_DELETE = object()
CODE0 = "properties/cbir:codes/0"
NAN_DESC = base64.b64encode(np.array([1, np.nan] * 64, "<f2").tobytes()).decode()
SHORT_DESC = base64.b64encode(np.ones(127, "<f2").tobytes()).decode()

# (case, mutation, what the schema says or None where JSON Schema cannot see it, python message)
BAD_CASES = [
    (
        "wrong code length",
        _set(f"{CODE0}/code", "AAAAAAAAAA=="),
        "does not match",
        r"cbir:codes\[0\]\.code: decodes to 56 bits but the entry declares bits=64",
    ),
    (
        "invalid base64",
        _set(f"{CODE0}/code", "AAAA*AAAAAA="),
        "does not match",
        r"cbir:codes\[0\]\.code: invalid base64",
    ),
    (
        "non-canonical base64",
        _set(f"{CODE0}/code", "AAAAAAAAAAB="),
        "does not match",
        r"cbir:codes\[0\]\.code: non-canonical base64",
    ),
    (
        "unknown encoding",
        _set(f"{CODE0}/encoding", "base32"),
        "is not one of",
        r"cbir:codes\[0\]\.encoding: unknown value 'base32'",
    ),
    (
        "unknown bit order",
        _set(f"{CODE0}/bit_order", "msb"),
        "is not one of",
        r"cbir:codes\[0\]\.bit_order: unknown value 'msb'",
    ),
    (
        "unsupported bits",
        _set(f"{CODE0}/bits", 63),
        "is not one of",
        r"cbir:codes\[0\]\.bits: unsupported bit length 63",
    ),
    (
        "missing model",
        _set(f"{CODE0}/model", _DELETE),
        "'model' is a required property",
        r"cbir:codes\[0\]\.model: is required",
    ),
    (
        "unknown descriptor dtype",
        _set(f"{CODE0}/descriptor/dtype", "int8"),
        "is not one of",
        r"cbir:codes\[0\]\.descriptor\.dtype: unknown value 'int8'",
    ),
    (
        "descriptor not base64",
        _set(f"{CODE0}/descriptor/value", "not base64!"),
        "does not match",
        r"cbir:codes\[0\]\.descriptor\.value: invalid base64",
    ),
    (
        "descriptor dimension mismatch",
        _set(f"{CODE0}/descriptor/value", SHORT_DESC),
        None,
        r"cbir:codes\[0\]\.descriptor\.value: holds 254 bytes = 127 float16 values, but dim=128",
    ),
    (
        "NaN in descriptor",
        _set(f"{CODE0}/descriptor/value", NAN_DESC),
        None,
        r"cbir:codes\[0\]\.descriptor\.value: non-finite value \(NaN or inf\) at index 1",
    ),
    (
        "empty code list",
        _set("properties/cbir:codes", []),
        "should be non-empty",
        r"cbir:codes: .*",
    ),
    (
        "unknown cbir field",
        _set("properties/cbir:hash", "x"),
        "does not match any of the regexes",
        None,
    ),
    (
        "extension not declared",
        _set("stac_extensions", []),
        "are valid under the given schema",
        r"stac_extensions: cbir fields are used but .* is not declared",
    ),
    (
        "chip window beyond source",
        _set(
            "properties/cbir:chip",
            {
                "window": {"col_off": 100, "row_off": 0, "width": 64, "height": 64},
                "source_shape": [120, 120],
            },
        ),
        None,
        r"cbir:chip\.window: extends beyond source_shape",
    ),
    (
        "chip window negative",
        _set(
            "properties/cbir:chip",
            {"window": {"col_off": -1, "row_off": 0, "width": 64, "height": 64}},
        ),
        "less than the minimum",
        r"cbir:chip\.window\.col_off: must be an integer >= 0",
    ),
]


@pytest.mark.parametrize(
    ("case", "mutate", "schema_msg", "python_msg"), BAD_CASES, ids=[c[0] for c in BAD_CASES]
)
def test_bad_input_is_rejected_naming_the_field(
    case: str,
    mutate: Callable[[dict[str, Any]], None],
    schema_msg: str | None,
    python_msg: str | None,
) -> None:
    doc = copy.deepcopy(S2)
    mutate(doc)
    messages = cbir_only(doc)
    if schema_msg is not None:
        assert any(schema_msg in m for m in messages), messages
    if python_msg is not None:
        with pytest.raises(CBIRValidationError, match=python_msg):
            validate(doc, MODELS)
    else:
        with pytest.raises(CBIRValidationError):
            validate(doc, MODELS)


def test_code_that_disagrees_with_its_model_description() -> None:
    doc = copy.deepcopy(S2)
    entry = HashCode.from_bits("ben-s2-milan-64", "1.0.0", np.ones(128, np.uint8)).to_dict()
    doc["properties"]["cbir:codes"] = [entry]
    assert schema_errors(doc) == []
    with pytest.raises(CBIRValidationError, match=r"cbir:codes\[0\]\.bits: 128 differs from model"):
        validate(doc, MODELS)


def test_validation_never_touches_the_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(pystac.StacIO, "read_text", no_network)
    doc = copy.deepcopy(S2)
    doc["stac_extensions"].append("https://stac-extensions.github.io/unknown/v9.9.9/schema.json")
    problems = schema_errors(doc)
    assert len(problems) == 1 and "not available offline" in problems[0]
    assert schema_errors(json.loads(json.dumps(S2))) == []
