"""STAC Browser (radiantearth's, from npm) against our API, as README "Browse with STAC Browser"
runs it: ``scripts/stac-browser serve`` on one origin, our app over chips with thumbnail assets
(tests/api_builders) on another.

Two layers: what a cross-origin client needs from the API (CORS on GET, POST and its preflight,
on thumbnails and on errors; the links STAC Browser follows), checked with an HTTP client and
no browser; then STAC Browser itself in headless Chromium (the ``browser`` marker): built once
per machine by the script (npm install + build, 2.5 minutes, cached under
~/.cache/stac-rscbir), it shows the landing page's collections, a collection's items with their
thumbnails, an item with its thumbnail, and item search (POST /search) results, with no request
to the API failing."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from stac_rscbir.api.app import create_api
from stac_rscbir.api.server import BackgroundServer
from stac_rscbir.store.sqlite import SQLiteStore

from .api_builders import OTHER, serving, thumbnail_archive
from .conftest import ROOT, require

SCRIPT = ROOT / "scripts" / "stac-browser"
ORIGIN = "http://stac-browser.example:8081"  # any other origin than the API's
THUMB = "/collections/scenes/items/item-007/assets/thumbnail"
# Console errors that are STAC Browser's or the offline machine's, not the API's: the filter
# form resolves the `$ref` of the queryables' geometry (https://geojson.org/schema/...).
NOT_OURS = ("https://geojson.org/schema/",)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return thumbnail_archive(tmp_path_factory.mktemp("stac-browser"))


@pytest.fixture(scope="module")
def client(archive: Path) -> Iterator[TestClient]:
    store = SQLiteStore(archive / "archive.db")
    try:
        thumbs = [archive / "thumbs"]
        api = create_api(store, archive / "index", max_body_bytes=1024, asset_roots=thumbs)
        with TestClient(api.app) as c:
            yield c
    finally:
        store.close()


def _cors(response: httpx.Response) -> None:
    assert response.headers.get("access-control-allow-origin") == "*", response.headers


def test_cross_origin_get_and_post_are_allowed(client: TestClient) -> None:
    """The simple requests STAC Browser makes from its own origin, and the thumbnail it shows."""
    for path in ("/", "/conformance", "/collections", "/collections/scenes/items", "/queryables"):
        r = client.get(path, headers={"Origin": ORIGIN})
        assert r.status_code == 200, (path, r.text)
        _cors(r)
    r = client.post("/search", json={"limit": 2}, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.json()["features"]
    _cors(r)
    r = client.get(THUMB, headers={"Origin": ORIGIN})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    _cors(r)  # loadable with crossorigin="anonymous" (STAC Browser's crossOriginMedia, maps)


def test_the_preflight_of_a_json_post_is_answered(client: TestClient) -> None:
    """POST /search with a JSON body is not a simple request: the browser asks first."""
    r = client.options(
        "/search",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert r.status_code == 200, r.text
    _cors(r)
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "content-type" in r.headers["access-control-allow-headers"].lower()


def test_refusals_reach_a_cross_origin_page(client: TestClient) -> None:
    """A 4xx a foreign page gets carries CORS headers, so it reads the message, not a CORS
    error: a bad search, an unknown item, a body over the cap (the 413 of the outer limit)."""
    cases = [
        client.post("/search", json={"bbox": "x"}, headers={"Origin": ORIGIN}),
        client.get("/collections/scenes/items/nope", headers={"Origin": ORIGIN}),
        client.post("/search", json={"ids": ["x" * 2000]}, headers={"Origin": ORIGIN}),
    ]
    assert [r.status_code for r in cases] == [400, 404, 413]
    for r in cases:
        _cors(r)
        assert r.json()["description"]


def test_a_one_condition_filter_as_stac_browser_sends_it(client: TestClient) -> None:
    """STAC Browser's search form wraps its conditions in an ``and``, one condition too; CQL2's
    schema wants two operands, the server takes one as that condition (not a 400)."""
    condition = {"op": "=", "args": [{"property": "platform"}, "sentinel-2a"]}
    wrapped = {"filter-lang": "cql2-json", "filter": {"op": "and", "args": [condition]}}
    r = client.post("/search", json={**wrapped, "limit": 100})
    assert r.status_code == 200, r.text
    bare = client.post("/search", json={"filter": condition, "limit": 100}).json()
    ids = [f["id"] for f in r.json()["features"]]
    assert ids and ids == [f["id"] for f in bare["features"]]
    assert {f["properties"]["platform"] for f in r.json()["features"]} == {"sentinel-2a"}
    r = client.post("/search", json={"filter": {"op": "and", "args": []}})
    assert r.status_code == 400  # no operand is still no expression


def test_the_links_stac_browser_follows(client: TestClient) -> None:
    """The landing page is its own catalog URL (`self` with the trailing slash STAC Browser
    matches exactly), links its collections and both search methods, and claims what the
    browsing and search views look for; items link their collection and carry a thumbnail the
    API serves."""
    landing = client.get("/").json()
    rels = {(link["rel"], link.get("method")) for link in landing["links"]}
    assert {("self", None), ("root", None), ("data", None), ("conformance", None)} <= rels
    assert {("search", "GET"), ("search", "POST")} <= rels
    self_href = next(link["href"] for link in landing["links"] if link["rel"] == "self")
    assert self_href == "http://testserver/"
    conforms = set(landing["conformsTo"])
    assert {
        "https://api.stacspec.org/v1.0.0/core",
        "https://api.stacspec.org/v1.0.0/collections",
        "https://api.stacspec.org/v1.0.0/item-search",
    } <= conforms
    collections = client.get("/collections").json()["collections"]
    assert sorted(c["id"] for c in collections) == ["scenes", OTHER]
    for c in collections:
        assert {"self", "items", "root", "parent"} <= {link["rel"] for link in c["links"]}
    item = client.get("/collections/scenes/items/item-007").json()
    assert {"self", "collection", "parent", "root"} <= {link["rel"] for link in item["links"]}
    thumbnail = item["assets"]["thumbnail"]
    assert thumbnail["roles"] == ["thumbnail"] and thumbnail["type"] == "image/png"
    assert thumbnail["href"] == f"http://testserver{THUMB}"


# -- STAC Browser itself -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def stac_browser_build() -> Path:
    """STAC Browser's built site: `scripts/stac-browser build` (npm; cached between runs)."""
    require(shutil.which("npm") is not None, "npm not found (STAC Browser is built from npm)")
    done = subprocess.run([SCRIPT, "build"], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    dist = Path(done.stdout.strip().splitlines()[-1])
    assert (dist / "index.html").is_file()
    return dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def api(archive: Path) -> Iterator[BackgroundServer]:
    with serving(archive) as running:
        yield running


@pytest.fixture(scope="module")
def stac_browser(stac_browser_build: Path, api: BackgroundServer) -> Iterator[str]:
    """`scripts/stac-browser serve` for our API, on a free port: its URL once it answers."""
    port = _free_port()
    proc = subprocess.Popen(
        [SCRIPT, "serve", f"{api.url}/", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # readiness: the first answer of the static server
            try:
                if httpx.get(f"{url}/config.js").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, "scripts/stac-browser serve exited"
            assert time.monotonic() < deadline, "STAC Browser's server did not start"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class Browsing:
    """A Chromium page on STAC Browser that records console errors and every request to the
    API (method, URL, status; failed ones with status 0)."""

    def __init__(self, browser: Any, site: str, api: BackgroundServer) -> None:
        # tall enough for a page of cards: STAC Browser draws images as they scroll into view
        self.context = browser.new_context(viewport={"width": 1400, "height": 4000})
        self.page = self.context.new_page()
        self.site = site
        self.api = api.url
        self.errors: list[str] = []
        self.requests: list[tuple[str, str, int]] = []
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("response", self._response)
        self.page.on("requestfailed", self._failed)

    def _console(self, message: Any) -> None:
        if message.type != "error":
            return
        where = message.location.get("url", "")
        if message.text.startswith("Failed to load resource") and not where.startswith(self.api):
            return  # STAC Browser's own files (its missing favicon) or its basemap tiles
        if not any(known in message.text for known in NOT_OURS):
            self.errors.append(f"{message.text} ({where})")

    def _response(self, response: Any) -> None:
        if response.url.startswith(self.api):
            self.requests.append((response.request.method, response.url, response.status))

    def _failed(self, request: Any) -> None:
        if request.url.startswith(self.api):
            self.requests.append((request.method, request.url, 0))

    def open(self, route: str) -> None:
        self.page.goto(f"{self.site}/#{route}")

    def thumbnails(self, count: int) -> list[tuple[str, int]]:
        """The src of each thumbnail image on the page, with the pixel width it decoded to,
        once ``count`` of them have loaded."""
        self.page.wait_for_function(
            "n => { const s = [...document.images].filter(i => i.src.includes('/thumbnail'));"
            " return s.length >= n && s.every(i => i.complete); }",
            arg=count,
        )
        return self.page.evaluate(
            "[...document.images].filter(i => i.src.includes('/thumbnail'))"
            ".map(i => [i.src, i.naturalWidth])"
        )

    def check(self) -> None:
        """No console error of ours, every API request answered 2xx (CORS included: a blocked
        response is a failed request)."""
        assert self.errors == []
        bad = [r for r in self.requests if not 200 <= r[2] < 300]
        assert self.requests and bad == []


@pytest.fixture
def browsing(browser: Any, stac_browser: str, api: BackgroundServer) -> Iterator[Browsing]:
    b = Browsing(browser, stac_browser, api)
    try:
        yield b
    finally:
        b.context.close()


@pytest.mark.browser
def test_the_landing_page_lists_the_collections(browsing: Browsing) -> None:
    browsing.open("/")
    for cid in ("scenes", OTHER):
        browsing.page.get_by_role("link", name=cid, exact=True).first.wait_for()
    assert ("GET", f"{browsing.api}/collections", 200) in browsing.requests
    browsing.check()


@pytest.mark.browser
def test_a_collection_shows_its_items_with_thumbnails(browsing: Browsing, tmp_path: Path) -> None:
    """The first page of items, as GET .../items answers it, each with its thumbnail drawn."""
    browsing.open("/collections/scenes")
    page = httpx.get(f"{browsing.api}/collections/scenes/items").json()["features"]
    shown = browsing.thumbnails(len(page))
    assert sorted(src for src, _ in shown) == sorted(f["assets"]["thumbnail"]["href"] for f in page)
    assert {width for _, width in shown} == {32}  # decoded: the PNGs are 32 x 32
    browsing.page.screenshot(path=tmp_path / "stac-browser-collection.png")
    browsing.check()


@pytest.mark.browser
def test_an_item_page_shows_its_thumbnail(browsing: Browsing) -> None:
    browsing.open("/collections/scenes/items/item-007")
    browsing.page.get_by_role("heading", name="item-007").wait_for()
    assert (f"{browsing.api}{THUMB}", 32) in [tuple(t) for t in browsing.thumbnails(1)]
    browsing.check()


@pytest.mark.browser
def test_item_search_shows_the_results_of_post_search(browsing: Browsing, tmp_path: Path) -> None:
    """STAC Browser's search form, submitted as it opens: it POSTs /search (cross-origin, so
    after a preflight) and lists the results the API returns for that body."""
    browsing.open("/search")
    with browsing.page.expect_request(
        lambda r: r.url == f"{browsing.api}/search" and r.method == "POST"
    ) as posted:
        browsing.page.get_by_role("button", name="Submit").click()
    body = posted.value.post_data_json
    expected = httpx.post(f"{browsing.api}/search", json=body).json()["features"]
    thumbnails = [f["assets"]["thumbnail"]["href"] for f in expected if f["assets"]]
    assert thumbnails
    shown = browsing.thumbnails(len(thumbnails))
    assert sorted(src for src, _ in shown) == sorted(thumbnails)
    browsing.page.screenshot(path=tmp_path / "stac-browser-search.png")
    browsing.check()


@pytest.mark.browser
def test_a_filter_from_the_search_form(browsing: Browsing) -> None:
    """A condition added in the form (a queryable from /queryables) filters the results as
    ``POST /search`` does with the body STAC Browser sent."""
    browsing.open("/search")
    browsing.page.get_by_role("button", name="Add filter").click()
    browsing.page.get_by_role("menuitem", name="Platform").click()
    browsing.page.locator("input.value").fill("sentinel-2a")
    with browsing.page.expect_request(
        lambda r: r.url == f"{browsing.api}/search" and r.method == "POST"
    ) as posted:
        browsing.page.get_by_role("button", name="Submit").click()
    body = posted.value.post_data_json
    assert "sentinel-2a" in str(body["filter"])
    expected = httpx.post(f"{browsing.api}/search", json=body).json()["features"]
    assert expected and {f["properties"]["platform"] for f in expected} == {"sentinel-2a"}
    thumbnails = [f["assets"]["thumbnail"]["href"] for f in expected if f["assets"]]
    shown = browsing.thumbnails(len(thumbnails))
    assert sorted(src for src, _ in shown) == sorted(thumbnails)
    browsing.check()
