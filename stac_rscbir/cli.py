"""The ``stac-rscbir`` command line."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from stac_rscbir.extension import CODES_PROP, CBIRFieldError, HashCode
from stac_rscbir.extension.validation import cbir_errors, models_of, schema_errors

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
    table = Table("file", "type", "id", "cbir codes", "result")
    failed = 0
    for path, doc in docs:
        if not isinstance(doc, dict):
            problems = [f"not a JSON object: {doc}"]
        else:
            problems = schema_errors(doc) + cbir_errors(doc, models)
        failed += bool(problems)
        codes = _fields(doc).get(CODES_PROP) if isinstance(doc, dict) else None
        table.add_row(
            str(path),
            str(doc.get("type", "?")) if isinstance(doc, dict) else "?",
            str(doc.get("id", "?")) if isinstance(doc, dict) else "?",
            str(len(codes)) if isinstance(codes, list) else "-",
            "[green]valid[/]" if not problems else "[red]" + "\n".join(problems) + "[/]",
        )
    console.print(table)
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
