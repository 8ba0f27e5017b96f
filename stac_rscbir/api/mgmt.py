"""Management routes, for operators and the replica tests (not part of the STAC API):
``GET /_mgmt/indexes`` answers ``{"store_generation": int, "models": ...}``, the store's present
generation and :meth:`~stac_rscbir.index.live.LiveIndexes.stats` of the process answering (its
loaded hash indexes: generation, count, rebuilds, loads, followed changes). Served by our app
(:func:`stac_rscbir.api.app.create_api`) and by the stac-fastapi-pgstac plugin app.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, HTTPException

from stac_rscbir.index.live import LiveIndexes

MGMT_INDEXES_PATH = "/_mgmt/indexes"


def install_mgmt(app: FastAPI, indexes: Callable[[], LiveIndexes | None]) -> None:
    """Add the management routes to ``app``; ``indexes`` gives the live indexes (None while
    the app has not started them: 503)."""

    def index_stats() -> dict[str, Any]:  # sync: FastAPI runs it in its thread pool
        live = indexes()
        if live is None:
            raise HTTPException(503, "similarity search is not started (the app's lifespan)")
        return {"store_generation": live.store.generation(), "models": live.stats()}

    app.add_api_route(MGMT_INDEXES_PATH, index_stats, methods=["GET"], include_in_schema=False)
