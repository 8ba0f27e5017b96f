"""Which optional extra a feature needs, and the error that says so.

The base install is the API and the CLI's validate / codes / serve; models (``ml``) and
ingestion (``ingest``) are extras (pyproject.toml). A feature whose extra is not installed is
refused with :class:`MissingExtraError`, whose message names the extra and the command that
installs it; the API answers it with a 4xx, the CLI with exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib.util

#: The modules each extra brings (import names; pyproject.toml lists the distributions).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "ml": ("torch", "safetensors", "efficientnet_lite_pytorch", "rasterio"),
    "ingest": ("odc.stac", "stac_geoparquet"),
}


class MissingExtraError(RuntimeError):
    """A feature was asked for whose optional extra is not installed."""


def installed(extra: str) -> bool:
    """Whether every module of ``extra`` can be imported (found, not imported)."""
    for name in EXTRA_MODULES[extra]:
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError):  # a missing parent package, a blocked module
            return False
    return True


def missing_extra_message(feature: str, extras: tuple[str, ...]) -> str:
    """E.g. "image queries need the `ml` extra: pip install 'stac-rscbir[ml]'"."""
    names = " and ".join(f"`{e}`" for e in extras)
    noun = "extra" if len(extras) == 1 else "extras"
    return f"{feature} needs the {names} {noun}: pip install 'stac-rscbir[{','.join(extras)}]'"


def require(feature: str, *extras: str) -> None:
    """Raise :class:`MissingExtraError` naming the extras of ``extras`` that are missing."""
    missing = tuple(e for e in extras if not installed(e))
    if missing:
        raise MissingExtraError(missing_extra_message(feature, missing))
