"""The visual search page (/viewer) in a real browser: headless Chromium from Debian through
Playwright, against our app over a store of 80 coded chips with thumbnail assets
(tests/api_builders items). What the page shows is compared with what POST /search answers."""

from __future__ import annotations

import base64
import importlib.util
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from shapely.geometry import box, shape

from stac_rscbir.api.app import create_api
from stac_rscbir.api.server import BackgroundServer
from stac_rscbir.store.sqlite import SQLiteStore

from .api_builders import MODEL, OTHER, N, _item, rgb_checkpoint, serving, thumbnail_archive
from .conftest import ROOT, require


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return thumbnail_archive(tmp_path_factory.mktemp("viewer"))


@pytest.fixture(scope="module")
def server(archive: Path) -> Iterator[BackgroundServer]:
    with serving(archive) as running:
        yield running


class Page:
    """A browser page on the viewer that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any, server: BackgroundServer) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.server = server
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, **params: str) -> None:
        """Load /viewer/ with ``params`` and wait until it has drawn the chips (and searched)."""
        query = f"?{urlencode(params)}" if params else ""
        self.page.goto(f"{self.server.url}/viewer/{query}")
        self.page.wait_for_selector("body[data-ready=true]")

    def searches(self) -> int:
        return int(self.page.evaluate("Number(document.body.dataset.searches || 0)"))

    def wait_searches(self, n: int) -> None:
        self.page.wait_for_function(f"Number(document.body.dataset.searches || 0) >= {n}")

    def results(self) -> list[tuple[str, int]]:
        """The grid: (collection/id, distance) of each card, in order."""
        cards = self.page.locator(".card")
        return [
            (c.get_attribute("data-key"), int(c.get_attribute("data-distance")))
            for c in cards.all()
        ]

    def state(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(urlsplit(self.page.url).query).items()}

    def click_chip(self, key: str) -> None:
        self.page.locator(f'path[data-key="{key}"]').last.click()


@pytest.fixture
def viewer(browser: Any, server: BackgroundServer) -> Iterator[Page]:
    page = Page(browser, server)
    yield page
    page.context.close()


def api_ranking(server: BackgroundServer, **state: Any) -> list[tuple[str, int]]:
    """What POST /search answers for the page's state (the same body, built here)."""
    similarity: dict[str, Any] = {"model": MODEL, "item": state["item"], "k": state["k"]}
    if "feedback" in state:
        similarity["feedback"] = state["feedback"]
    body: dict[str, Any] = {
        "collections": ["scenes"],
        "limit": state["k"],
        "similarity": similarity,
    }
    if "bbox" in state:
        body["bbox"] = state["bbox"]
    r = httpx.post(f"{server.url}/search", json=body)
    assert r.status_code == 200, r.text
    return [
        (f"{f['collection']}/{f['id']}", f["properties"]["cbir:distance"])
        for f in r.json()["features"]
    ]


def _ref(key: str) -> dict[str, str]:
    collection, item = key.split("/", 1)
    return {"collection": collection, "id": item}


@pytest.mark.browser
def test_page_loads_without_console_errors(viewer: Page, tmp_path: Path) -> None:
    viewer.open()
    page = viewer.page
    assert page.locator("path.chip").count() == N
    page.wait_for_function(
        "[...document.querySelectorAll('img.leaflet-image-layer')]"
        f".filter(i => i.complete && i.naturalWidth > 0).length === {N}"
    )
    assert page.locator("#collection").input_value() == "scenes"
    assert page.locator("#model").input_value() == MODEL
    assert viewer.state()["collection"] == "scenes"
    page.screenshot(path=tmp_path / "viewer-loaded.png")
    assert viewer.errors == []


@pytest.mark.browser
def test_clicking_a_chip_ranks_as_post_search(
    viewer: Page, tmp_path: Path, record_property: Any
) -> None:
    viewer.open()
    start = time.perf_counter()
    viewer.click_chip("scenes/item-045")
    viewer.page.wait_for_selector(".card")
    clicked_ms = (time.perf_counter() - start) * 1000
    viewer.wait_searches(1)
    in_page_ms = float(viewer.page.evaluate("document.body.dataset.searchMs"))
    print(
        f"click to first result: {clicked_ms:.0f} ms "
        f"(fetch + render in the page {in_page_ms:.0f} ms)"
    )
    record_property("click_to_first_result_ms", round(clicked_ms, 1))

    shown = viewer.results()
    assert shown[0] == ("scenes/item-045", 0)
    assert shown == api_ranking(viewer.server, item=_ref("scenes/item-045"), k=20)
    assert viewer.state()["item"] == "scenes/item-045"
    assert viewer.page.locator("path.result").count() == len(shown)
    second = shown[1][0]
    viewer.page.locator(".card").nth(1).hover()  # a card highlights its footprint ...
    assert viewer.page.locator(".card.hl").count() == 1
    assert (
        viewer.page.locator(f'path.result[data-key="{second}"]').get_attribute("stroke-width")
        == "6"
    )
    third = shown[2][0]  # ... and a footprint its card
    viewer.page.locator(f'path.result[data-key="{third}"]').hover()
    assert [c.get_attribute("data-key") for c in viewer.page.locator(".card.hl").all()] == [third]
    viewer.page.screenshot(path=tmp_path / "viewer-search.png")
    assert viewer.errors == []


@pytest.mark.browser
def test_a_drawn_box_restricts_every_result(viewer: Page, tmp_path: Path) -> None:
    viewer.open(item="scenes/item-044", k="30")
    viewer.wait_searches(1)
    everywhere = viewer.results()
    page = viewer.page
    page.click("#draw-bbox")
    # a box from the centre of item-000 to that of item-033: chips of columns 0-3, rows 0-3
    a = page.locator('path.chip[data-key="scenes/item-000"]').bounding_box()
    b = page.locator('path.chip[data-key="scenes/item-033"]').bounding_box()
    page.mouse.move(a["x"] + a["width"] / 2, a["y"] + a["height"] / 2)
    page.mouse.down()
    page.mouse.move(b["x"] + b["width"] / 2, b["y"] + b["height"] / 2, steps=8)
    page.mouse.up()
    viewer.wait_searches(2)

    bbox = [float(v) for v in viewer.state()["bbox"].split(",")]
    shown = viewer.results()
    assert shown and shown != everywhere
    area = box(*bbox)
    items = {f"scenes/{i['id']}": i for i in _items_by_id()}
    assert all(shape(items[key]["geometry"]).intersects(area) for key, _ in shown)
    assert shown == api_ranking(viewer.server, item=_ref("scenes/item-044"), k=30, bbox=bbox)
    page.screenshot(path=tmp_path / "viewer-bbox.png")
    assert viewer.errors == []


def _items_by_id() -> list[dict[str, Any]]:
    return [_item(i) for i in range(N)]


@pytest.mark.browser
def test_marks_rerank_as_the_api_does(viewer: Page, tmp_path: Path) -> None:
    viewer.open(item="scenes/item-020", k="12")
    viewer.wait_searches(1)
    before = viewer.results()
    page = viewer.page
    relevant = [key for key, _ in before[-3:]]
    not_relevant = [key for key, _ in before[1:3]]
    for key in relevant:
        page.locator(f'.card[data-key="{key}"] .mark-relevant').click()
    for key in not_relevant:
        page.locator(f'.card[data-key="{key}"] .mark-not-relevant').click()
    page.click("#refine")
    viewer.wait_searches(2)

    after = viewer.results()
    feedback = {
        "relevant": [_ref(k) for k in relevant],
        "not_relevant": [_ref(k) for k in not_relevant],
    }
    assert after == api_ranking(
        viewer.server, item=_ref("scenes/item-020"), k=12, feedback=feedback
    )
    assert [k for k, _ in after] != [k for k, _ in before]
    state = viewer.state()
    assert state["relevant"].split(",") == relevant
    assert state["not_relevant"].split(",") == not_relevant
    assert page.locator(".card.relevant").count() == sum(k in relevant for k, _ in after)
    page.screenshot(path=tmp_path / "viewer-feedback.png")
    assert viewer.errors == []


@pytest.mark.browser
def test_searching_another_collection(viewer: Page) -> None:
    """A query chip of one collection, results from another (the cross-modal case)."""
    viewer.open(collection="scenes")
    viewer.page.select_option("#within", [OTHER])
    viewer.click_chip("scenes/item-045")
    viewer.wait_searches(1)
    shown = viewer.results()
    assert shown and all(key.startswith(f"{OTHER}/") for key, _ in shown)
    body = {
        "collections": [OTHER],
        "limit": 20,
        "similarity": {"model": MODEL, "item": _ref("scenes/item-045"), "k": 20},
    }
    r = httpx.post(f"{viewer.server.url}/search", json=body)
    assert shown == [
        (f"{f['collection']}/{f['id']}", f["properties"]["cbir:distance"])
        for f in r.json()["features"]
    ]
    assert viewer.state()["within"] == OTHER
    assert viewer.errors == []


@pytest.mark.browser
def test_the_url_round_trips_the_state(viewer: Page, browser: Any) -> None:
    state = {
        "collection": "scenes",
        "model": MODEL,
        "within": "scenes",
        "k": "9",
        "max_distance": "30",
        "from": "2021-01-05",
        "to": "2021-03-01",
        "bbox": "10,45,10.75,45.55",
        "item": "scenes/item-036",
        "relevant": "scenes/item-040",
        "not_relevant": "scenes/item-012",
    }
    viewer.open(**state)
    viewer.wait_searches(1)
    assert viewer.state() == state
    page = viewer.page
    assert page.locator("#k").input_value() == "9"
    assert page.locator("#max-distance").input_value() == "30"
    assert page.locator("#date-from").input_value() == "2021-01-05"
    assert page.locator("#date-to").input_value() == "2021-03-01"
    shown = viewer.results()
    assert shown and all(d <= 30 for _, d in shown)

    again = Page(browser, viewer.server)  # the link, opened elsewhere
    try:
        again.page.goto(page.url)
        again.page.wait_for_selector("body[data-ready=true]")
        again.wait_searches(1)
        assert again.state() == state
        assert again.results() == shown
        assert again.errors == []
    finally:
        again.context.close()
    assert viewer.errors == []


@pytest.mark.browser
def test_refusals_and_empty_results_are_messages(viewer: Page) -> None:
    viewer.open(item="scenes/item-001", k="100000")  # over the server's max_k
    viewer.wait_searches(1)
    message = viewer.page.locator("#message.error")
    assert "400" in message.inner_text() and "k" in message.inner_text()
    assert viewer.results() == []

    viewer.open(item="scenes/item-001", **{"from": "1990-01-01", "to": "1990-01-02"})
    viewer.wait_searches(1)
    assert viewer.results() == []
    assert "No results" in viewer.page.locator("#message").inner_text()
    assert viewer.page.locator("#message.error").count() == 0
    unexpected = [e for e in viewer.errors if "status of 400" not in e]  # the refused fetch
    assert unexpected == []


@pytest.mark.browser
@pytest.mark.shared
def test_a_search_on_the_demo_data(browser: Any, tmp_path: Path, record_property: Any) -> None:
    """The demo's real Landsat chips, thumbnails rendered by the API: the query chip the demo
    documents (a third into the chips by id) finds itself first, ranked as POST /search."""
    from .test_demo import SHARED, run_small_demo

    run_small_demo(tmp_path)
    workdir = tmp_path / "demo"
    store = SQLiteStore(workdir / "archive.db")
    try:
        api = create_api(store, workdir / "index", asset_roots=[SHARED])
        with BackgroundServer(api.app) as server:
            viewer = Page(browser, server)
            viewer.open(collection="landsat-8-chips")
            chips = viewer.page.locator("path.chip")
            keys = sorted(chips.evaluate_all("paths => paths.map(p => p.dataset.key)"))
            query = keys[len(keys) // 3]
            # the map's thumbnails first: rendered on the fly (from the scene's rasters) they
            # would hold the search behind them (8.7 s measured) and the timing with them
            viewer.page.wait_for_function(
                "[...document.querySelectorAll('img.leaflet-image-layer')].every(i => i.complete)",
                timeout=300_000,
            )
            start = time.perf_counter()
            viewer.click_chip(query)
            viewer.page.wait_for_selector(".card")
            clicked_ms = (time.perf_counter() - start) * 1000
            viewer.wait_searches(1)
            print(
                f"demo data ({len(keys)} Landsat chips): click to first result {clicked_ms:.0f} ms"
            )
            record_property("demo_click_to_first_result_ms", round(clicked_ms, 1))
            shown = viewer.results()
            assert shown[0] == (query, 0)
            model = viewer.state()["model"]
            r = httpx.post(
                f"{server.url}/search",
                json={
                    "collections": ["landsat-8-chips"],
                    "limit": 20,
                    "similarity": {"model": model, "item": _ref(query), "k": 20},
                },
            )
            assert shown == [
                (f"{f['collection']}/{f['id']}", f["properties"]["cbir:distance"])
                for f in r.json()["features"]
            ]
            viewer.page.wait_for_function(
                "[...document.querySelectorAll('.card img')].every(i => i.complete)"
            )
            viewer.page.mouse.move(1, 1)  # no hover highlight in the picture
            viewer.page.screenshot(path=tmp_path / "viewer-demo.png")
            assert viewer.errors == []
            viewer.context.close()
    finally:
        store.close()


@pytest.mark.browser
def test_an_uploaded_image_ranks_as_post_search(
    browser: Any, archive: Path, tmp_path: Path
) -> None:
    """An image file chosen on the page is the query (encoded by the server's model)."""
    require(importlib.util.find_spec("torch") is not None, "torch (the ml extra) is not installed")
    checkpoint = rgb_checkpoint(tmp_path / "model", MODEL)  # random weights: any ranking will do
    image = archive / "thumbs" / "item-007.png"
    with serving(archive, {MODEL: checkpoint}) as server:
        viewer = Page(browser, server)
        try:
            viewer.open()
            viewer.page.set_input_files("#upload", image)
            viewer.wait_searches(1)
            body = {
                "collections": ["scenes"],
                "limit": 20,
                "similarity": {
                    "model": MODEL,
                    "image": base64.b64encode(image.read_bytes()).decode(),
                    "k": 20,
                },
            }
            r = httpx.post(f"{server.url}/search", json=body, timeout=60)
            assert r.status_code == 200, r.text
            expected = [
                (f"{f['collection']}/{f['id']}", f["properties"]["cbir:distance"])
                for f in r.json()["features"]
            ]
            assert expected and viewer.results() == expected
            assert "item" not in viewer.state()  # an upload is not kept in the URL
            assert "uploaded item-007.png" in viewer.page.locator("#query").inner_text()
            viewer.page.screenshot(path=tmp_path / "viewer-upload.png")
            assert viewer.errors == []
        finally:
            viewer.context.close()


@pytest.mark.browser
def test_a_basemap_setting_draws_its_tiles(viewer: Page) -> None:
    """The optional basemap (an XYZ URL template, here tiles our own server answers)."""
    asset = "/collections/scenes/items/item-000/assets/thumbnail"
    tile = f"{viewer.server.url}{asset}?z={{z}}&x={{x}}&y={{y}}"
    viewer.open(basemap=tile)
    viewer.page.wait_for_function(
        "[...document.querySelectorAll('img.leaflet-tile')].some(i => i.complete && i.naturalWidth)"
    )
    assert viewer.state()["basemap"] == tile
    assert viewer.errors == []


def test_the_page_and_its_settings_are_served(tmp_path: Path) -> None:
    """/viewer/ is the page (and /viewer leads there); /viewer/config.json the basemap setting
    given to create_api (none by default)."""
    from fastapi.testclient import TestClient

    store = SQLiteStore(tmp_path / "archive.db")
    try:
        plain = TestClient(create_api(store, tmp_path / "index").app)
        assert plain.get("/viewer/config.json").json() == {"basemap": None}
        r = plain.get("/viewer", follow_redirects=True)
        assert r.status_code == 200 and r.url.path == "/viewer/"
        assert "viewer.js" in r.text
        assert plain.get("/viewer/vendor/leaflet/leaflet.js").status_code == 200
        tiles = "https://tiles.example/{z}/{x}/{y}.png"
        app = create_api(store, tmp_path / "index", viewer_basemap=tiles).app
        assert TestClient(app).get("/viewer/config.json").json() == {"basemap": tiles}
    finally:
        store.close()


def test_the_page_mounts_on_the_pgstac_plugin_app(tmp_path: Path) -> None:
    """mount_viewer on stac-fastapi-pgstac + the plugin (no database needed to serve the page;
    the page's requests are the plugin's /collections and /search)."""
    require(
        importlib.util.find_spec("stac_fastapi.pgstac") is not None,
        "stac-fastapi-pgstac (the pgstac extra) is not installed",
    )
    from fastapi.testclient import TestClient

    from stac_rscbir.api.pgstac_plugin import instantiate_similarity_api
    from stac_rscbir.api.viewer import mount_viewer

    app = instantiate_similarity_api(index_dir=tmp_path / "index").app
    mount_viewer(app)
    client = TestClient(app)  # no lifespan: no pools, which the page files do not need
    assert "viewer.js" in client.get("/viewer/").text
    assert client.get("/viewer/config.json").json() == {"basemap": None}


def test_the_viewer_is_packaged_with_its_map_library() -> None:
    static = ROOT / "stac_rscbir" / "viewer" / "static"
    files = [p for p in static.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 5 * 1024 * 1024
    html = (static / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # no CDN: everything is local
    assert (static / "vendor" / "leaflet" / "leaflet.js").exists()
