"""Items added through the API's Transactions endpoints get encoded (SQLite store)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from stac_rscbir.api.app import create_api
from stac_rscbir.store.sqlite import SQLiteStore

from .ingest_builders import CHIP, MODEL, _scene
from .stac_builders import raster_item


def test_items_posted_through_the_api_are_encoded_and_searchable(
    checkpoint: Path,
    tmp_path: Path,
) -> None:
    store = SQLiteStore(tmp_path / "stac.db")
    api = create_api(store, tmp_path / "index", encode_with=checkpoint)
    scenes = [
        raster_item("posted-a", _scene(tmp_path, "a", 2 * CHIP, 2 * CHIP, seed=21)),
        raster_item("posted-b", _scene(tmp_path, "b", CHIP, CHIP, seed=22)),
    ]
    collection = {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": "scenes",
        "description": "posted scenes",
        "license": "other",
        "extent": {
            "spatial": {"bbox": [[-180, -90, 180, 90]]},
            "temporal": {"interval": [["2020-01-01T00:00:00Z", None]]},
        },
        "links": [],
    }
    with TestClient(api.app) as client:
        assert client.post("/collections", json=collection).status_code in (200, 201)
        for scene in scenes:
            r = client.post("/collections/scenes/items", json=scene.to_dict())
            assert r.status_code in (200, 201), r.text
        queue = api.app.state.encode_queue
        assert queue.join(timeout=120), "the encode queue did not drain"
        assert not queue.report.errors
        for scene in scenes:
            stored = client.get(f"/collections/scenes/items/{scene.id}").json()
            (code,) = stored["properties"]["cbir:codes"]
            assert code["model"] == MODEL
        chips = client.get("/collections/scenes-chips/items", params={"limit": 100}).json()
        assert len(chips["features"]) == 4  # the 2x2-chip scene; the patch-sized one is whole
        assert client.get("/collections/scenes-chips").json()["cbir:models"][0]["id"] == MODEL
        # the index followed the background writes: the scene finds itself first
        page = client.post(
            "/search",
            json={
                "similarity": {"model": MODEL, "item": {"collection": "scenes", "id": "posted-b"}},
                "collections": ["scenes"],
            },
        ).json()
        assert page["features"][0]["id"] == "posted-b"
        assert page["features"][0]["properties"]["cbir:distance"] == 0
        # an item that already carries the code is not queued again
        again = client.put(
            "/collections/scenes/items/posted-b",
            json=client.get("/collections/scenes/items/posted-b").json(),
        )
        assert again.status_code == 200
        assert queue.join(timeout=30) and queue.report.items_encoded == 2
