"""stac-fastapi-pgstac with similarity search, assembled in Python (for those who build their
own app, e.g. inside eoAPI, instead of ``uvicorn stac_rscbir.api.pgstac_plugin:create_app
--factory``).

stac-fastapi-pgstac's own ``Settings`` and ``Extensions`` are built as usual and handed to
:func:`~stac_rscbir.api.pgstac_plugin.instantiate_similarity_api`, which calls
stac-fastapi-pgstac's ``instantiate_api`` with the similarity extension added and a lifespan
that opens stac-fastapi-pgstac's pools plus the hash indexes. The database comes from
stac-fastapi-pgstac's environment (PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE)::

    PGHOST=localhost PGUSER=username PGPASSWORD=password PGDATABASE=postgis PGPORT=5432 \\
    RSCBIR_INDEX_DIR=/var/lib/rscbir/index \\
        .venv/bin/uvicorn examples.pgstac_plugin:app --port 8080

    curl -s 'localhost:8080/collections/scenes/items/item-005/similar?k=10'
"""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import FastAPI
from stac_fastapi.pgstac.config import Settings
from stac_fastapi.pgstac.models.extensions import Extensions

from stac_rscbir.api.pgstac_plugin import instantiate_similarity_api


def build_app(index_dir: Path, models: dict[str, Path] | None = None) -> FastAPI:
    """stac-fastapi-pgstac (transactions on, its other settings from the environment) with
    similarity search; ``models`` maps model ids to checkpoints, for image queries."""
    settings = Settings(
        enable_transactions_extensions=True,
        stac_fastapi_title="My STAC API, with similarity search",
    )
    api = instantiate_similarity_api(
        index_dir=index_dir,
        models=models,
        settings=settings,
        extensions=Extensions(settings=settings),  # stac-fastapi-pgstac's default extensions
        max_k=1000,
    )
    return api.app


app = build_app(Path(os.environ.get("RSCBIR_INDEX_DIR", "rscbir-index")))
