"""pystac-client drives a real server over HTTP (uvicorn on a free loopback port)."""

from __future__ import annotations

from pathlib import Path

from pystac_client import Client

from stac_rscbir.client import distances, search_similar

from .api_builders import MODEL, N, _bits, _collection, _ranking


def test_pystac_client_similarity_search_pages_over_http(server: str) -> None:
    client = Client.open(server)
    search = search_similar(client, item=("scenes", "item-005"), model=MODEL, k=12, limit=5)
    got = [(int(d), item.id) for item, d in distances(search.items())]
    assert got == _ranking(_bits(5))[:12]  # three pages of 5, 5, 2, followed by pystac-client


def test_pystac_client_similarity_with_filters(server: str) -> None:
    client = Client.open(server)
    search = search_similar(
        client,
        item=("scenes", "item-020"),
        model=MODEL,
        k=30,
        datetime="2021-01-01/2021-02-10",
        filter={"op": "=", "args": [{"property": "platform"}, "sentinel-2a"]},
        filter_lang="cql2-json",
    )
    got = [(int(d), item.id) for item, d in distances(search.items())]
    keep = {i for i in range(N) if i <= 40 and i % 2 == 1}
    assert got == _ranking(_bits(20), keep)[:30]
    # the plain search still works through the same server
    plain = list(client.search(collections=["scenes"], max_items=7).items())
    assert len(plain) == 7


def test_ingest_from_and_into_the_api(checkpoint: Path, tmp_path: Path) -> None:
    """The ingestion worker reads a STAC API search (the scenes' files served by the API from
    its asset root, read over HTTP) and writes back through Transactions, which keeps the
    stored hrefs."""
    import httpx

    from stac_rscbir.api.app import create_api
    from stac_rscbir.api.server import BackgroundServer
    from stac_rscbir.ingest.sinks import ApiSink
    from stac_rscbir.ingest.sources import items_from_api
    from stac_rscbir.ingest.worker import Ingestor
    from stac_rscbir.store.sqlite import SQLiteStore

    from .api_builders import _item
    from .ingest_builders import CHIP, OPTIONS, _scene
    from .ingest_builders import MODEL as RGB_MODEL
    from .stac_builders import raster_item

    store = SQLiteStore(tmp_path / "stac.db")
    store.create_collection(_collection())
    store.upsert_items([_item(i) for i in range(N)])
    api = create_api(store, tmp_path / "index", asset_roots=[tmp_path])
    with BackgroundServer(api.app) as srv:
        server = srv.url
        assert len(list(items_from_api(server, {"collections": ["scenes"]}))) == N
        coll = {**_collection("posted"), "id": "posted"}
        assert httpx.post(f"{server}/collections", json=coll).status_code in (200, 201)
        scenes = [
            raster_item(
                f"api-{i}",
                _scene(tmp_path, f"api{i}", 2 * CHIP, CHIP, seed=30 + i),
                collection="posted",
            )
            for i in range(3)
        ]
        for scene in scenes:  # file:// hrefs: a path would resolve against the API's URL
            scene.assets["image"].href = Path(scene.assets["image"].href).as_uri()
            r = httpx.post(f"{server}/collections/posted/items", json=scene.to_dict())
            assert r.status_code in (200, 201), r.text
        ckpt = checkpoint
        source = list(items_from_api(server, {"collections": ["posted"]}))
        assert source[0].assets["image"].href.startswith(f"{server}/collections/posted/items/")
        report = Ingestor.from_checkpoint(ckpt, OPTIONS).run(source, ApiSink(server))
        assert (report.items_encoded, report.chips_encoded, report.errors) == (3, 6, [])
        for scene in scenes:
            stored = httpx.get(f"{server}/collections/posted/items/{scene.id}").json()
            assert [c["model"] for c in stored["properties"]["cbir:codes"]] == [RGB_MODEL]
            # written back through the API, the scene keeps its file href in the store
            href = store.get_item("posted", scene.id)["assets"]["image"]["href"]
            assert href == scene.assets["image"].href
        chips = httpx.get(f"{server}/collections/posted-chips/items", params={"limit": 50})
        assert len(chips.json()["features"]) == 6
        assert not store.get_item("posted-chips", chips.json()["features"][0]["id"])["assets"]
        again = Ingestor.from_checkpoint(ckpt, OPTIONS).run(
            items_from_api(server, {"collections": ["posted"]}), ApiSink(server)
        )
        assert (again.items_skipped, again.items_encoded) == (3, 0)
    store.close()
