"""Offline validation of STAC objects that carry ``cbir`` fields.

Two layers: JSON Schema (STAC core 1.1 from pystac, the ``cbir`` schema and the vendored schemas of
the other extensions, never the network) and the checks JSON Schema cannot express (decoding each
code and descriptor, one code per model, codes that match the model described in the Collection).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pyproj
import pystac
import pystac.validation
from pystac.validation.stac_validator import GetSchemaError, JsonSchemaSTACValidator

from stac_rscbir.extension.cbir import (
    CODES_PROP,
    PREFIX,
    SCHEMA_URI,
    CBIRExtension,
    CBIRFieldError,
    CBIRModel,
)

_PACKAGE_SCHEMAS = resources.files("stac_rscbir.extension") / "schemas"
# In a source checkout (editable install) the published schema is read where it is maintained.
_SOURCE_SCHEMA = Path(__file__).resolve().parents[2] / "extension-schema/json-schema/schema.json"


class CBIRValidationError(ValueError):
    """A STAC object failed validation; ``problems`` lists every message found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@cache
def cbir_schema() -> dict[str, Any]:
    """The ``cbir`` extension's JSON schema (the file published in extension-schema/)."""
    packaged = _PACKAGE_SCHEMAS / "cbir" / "schema.json"
    source = packaged if packaged.is_file() else _SOURCE_SCHEMA
    return json.loads(source.read_text())


@cache
def local_schemas() -> dict[str, dict[str, Any]]:
    """Every schema available offline besides pystac's core ones, keyed by URI."""
    found = {SCHEMA_URI: cbir_schema()}
    # projection v2 refers to PROJJSON's schema, which pyproj ships with PROJ's data files
    projjson = json.loads(
        (Path(pyproj.datadir.get_data_dir()) / "projjson.schema.json").read_text()
    )
    found[projjson["$id"]] = projjson
    for entry in (_PACKAGE_SCHEMAS / "vendor").iterdir():
        if entry.name.endswith(".json"):
            found[vendored_uri(entry.name)] = json.loads(entry.read_text())
    return found


def vendored_uri(filename: str) -> str:
    """The URL a vendored schema was published at, from its file name ``<ext>-v<version>.json``.

    Keyed by URL, not by ``$id``: some published schemas carry a stale ``$id``.
    """
    name, version = filename.removesuffix(".json").rsplit("-v", 1)
    return f"https://stac-extensions.github.io/{name}/v{version}/schema.json"


class OfflineSTACValidator(JsonSchemaSTACValidator):
    """pystac's JSON Schema validator restricted to local schemas: unknown URIs fail, no HTTP."""

    def __init__(self, extra: Mapping[str, dict[str, Any]] | None = None) -> None:
        super().__init__()
        self.schema_cache.update(local_schemas())
        self.schema_cache.update(extra or {})

    def _get_schema(self, schema_uri: str) -> dict[str, Any]:
        if schema_uri not in self.schema_cache:
            raise GetSchemaError(
                schema_uri, LookupError("schema not available offline; vendor it to validate")
            )
        return self.schema_cache[schema_uri]


def schema_errors(stac_dict: dict[str, Any]) -> list[str]:
    """JSON Schema problems of ``stac_dict`` (core + every extension it declares), [] if valid."""
    try:
        pystac.validation.validate_dict(stac_dict, validator=OfflineSTACValidator())
    except pystac.STACValidationError as err:
        source = err.source if isinstance(err.source, list) else []
        if not source:
            return [str(err)]
        return [_describe(e) for e in sorted(source, key=lambda e: list(e.absolute_path))]
    except GetSchemaError as err:
        return [str(err)]
    return []


def cbir_errors(
    stac_dict: dict[str, Any], models: Mapping[tuple[str, str], CBIRModel] | None = None
) -> list[str]:
    """Problems JSON Schema cannot see: decoded code/descriptor checks, duplicates, model match.

    ``models`` maps (model id, version) to the descriptions the codes must agree with.
    """
    problems: list[str] = []
    scopes = list(_cbir_scopes(stac_dict))
    used = any(k.startswith(PREFIX) for _, props in scopes for k in props)
    if used and SCHEMA_URI not in (stac_dict.get("stac_extensions") or []):
        problems.append(f"stac_extensions: cbir fields are used but {SCHEMA_URI} is not declared")
    for where, props in scopes:
        try:
            ext = _PropertiesView(props)
            codes = ext.codes or []
            ext.models  # noqa: B018 - reading validates the descriptions
            ext.chip  # noqa: B018
        except CBIRFieldError as err:
            problems.append(f"{where}{err}")
            continue
        for i, code in enumerate(codes):
            model = (models or {}).get((code.model, code.model_version))
            if model is None:
                continue
            try:
                model.check_code(code, f"{CODES_PROP}[{i}]")
            except CBIRFieldError as err:
                problems.append(f"{where}{err}")
    return problems


def models_of(obj: pystac.STACObject | dict[str, Any]) -> dict[tuple[str, str], CBIRModel]:
    """The model descriptions a Collection (or model Item) holds, keyed by (id, version)."""
    stac_dict = obj.to_dict(include_self_link=False) if isinstance(obj, pystac.STACObject) else obj
    fields = next(_cbir_scopes(stac_dict))[1]
    return {(m.id, m.version): m for m in _PropertiesView(fields).models or []}


def validate(
    obj: pystac.STACObject | dict[str, Any],
    models: Mapping[tuple[str, str], CBIRModel] | None = None,
) -> None:
    """Raise :class:`CBIRValidationError` listing all schema and ``cbir`` problems of ``obj``."""
    stac_dict = obj.to_dict(include_self_link=False) if isinstance(obj, pystac.STACObject) else obj
    problems = schema_errors(stac_dict) + cbir_errors(stac_dict, models)
    if problems:
        raise CBIRValidationError(problems)


class _PropertiesView(CBIRExtension[Any]):
    """The extension's accessors over a plain dict (for validating JSON without pystac objects)."""

    def __init__(self, properties: dict[str, Any]) -> None:
        self.properties = properties


def _cbir_scopes(stac_dict: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The dicts that may hold ``cbir:`` fields, with a prefix naming where they are."""
    if stac_dict.get("type") == "Feature":
        props = stac_dict.get("properties")
        yield "properties.", props if isinstance(props, dict) else {}
    else:
        yield "", stac_dict
    for group in ("assets", "item_assets"):
        assets = stac_dict.get(group)
        for key, asset in assets.items() if isinstance(assets, dict) else ():
            if isinstance(asset, dict):
                yield f"{group}.{key}.", asset


def _describe(error: jsonschema.ValidationError) -> str:
    """One line per schema error: the JSON path and the deepest useful message."""
    best = jsonschema.exceptions.best_match([error])
    path = ".".join(str(p) for p in best.absolute_path) or "(root)"
    return f"{path}: {best.message}"
