"""The visual search page at ``/viewer``: static files of the package (stac_rscbir/viewer/static,
Leaflet vendored by scripts/vendor-viewer) and ``/viewer/config.json`` (the optional basemap).

The page talks to the API it is served by (``/collections``, ``/search``), so it works on any
app that answers those: our app (:func:`stac_rscbir.api.app.create_api` mounts it) and the
stac-fastapi-pgstac plugin app (``mount_viewer(api.app)``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "viewer" / "static"
VIEWER_PATH = "/viewer"


def mount_viewer(app: FastAPI, basemap: str | None = None) -> None:
    """Serve the page at ``/viewer/`` on ``app``; ``basemap`` is an XYZ tile URL template
    (``https://.../{z}/{x}/{y}.png``) drawn under the chips, for deployments that reach one
    (none by default: the page draws the chips' own thumbnails)."""

    async def viewer_config() -> JSONResponse:
        return JSONResponse({"basemap": basemap})

    app.add_api_route(
        f"{VIEWER_PATH}/config.json", viewer_config, methods=["GET"], include_in_schema=False
    )
    app.mount(VIEWER_PATH, StaticFiles(directory=STATIC, html=True), name="viewer")
