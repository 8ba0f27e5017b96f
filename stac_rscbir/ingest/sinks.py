"""Where encoded items go: a static catalog (in place), stac-geoparquet, a Transactions API.

Every sink commits one scene at a time (its chip items first, the scene item last), with writes
that a kill cannot leave half done, and answers "is this item already encoded by this model
version?", which is what makes a rerun skip finished work and never write an item twice.
Sinks are plain picklable objects so Dask workers can each hold one.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import pystac

from stac_rscbir.extension.cbir import CBIRExtension, CBIRModel
from stac_rscbir.fsutil import atomic_write, atomic_write_text, host_name, process_alive


class Sink(Protocol):
    """The interface of every sink."""

    def is_encoded(self, item: pystac.Item, model: str, version: str) -> bool:
        """True when this sink already holds ``item`` encoded by ``model`` ``version``."""
        ...

    def begin(self, model: CBIRModel) -> None:
        """Called before the first write of a run: a sink whose target checks codes against
        the declared models (a Transactions API) declares ``model`` where it writes."""
        ...

    def write(self, scene: pystac.Item, chips: Sequence[pystac.Item]) -> None:
        """Commit one encoded scene (or patch) and its chip items."""
        ...

    def finalize(self, model: CBIRModel) -> None:
        """Flush buffers and describe ``model`` in the collections that were written."""
        ...


def has_code(properties: dict[str, Any], model: str, version: str) -> bool:
    """Whether item properties carry a ``cbir:codes`` entry of ``model`` at ``version``."""
    return any(
        isinstance(c, dict) and c.get("model") == model and c.get("model_version") == version
        for c in properties.get("cbir:codes") or []
    )


def _dump(d: dict[str, Any]) -> str:
    return json.dumps(d, indent=2) + "\n"


def _add_model(collection: dict[str, Any], model: CBIRModel) -> dict[str, Any]:
    """``collection`` with ``model`` in its ``cbir:models`` (replacing the same id+version)."""
    coll = pystac.Collection.from_dict(collection, preserve_dict=True, migrate=False)
    ext = CBIRExtension.ext(coll, add_if_missing=True)
    kept = [m for m in ext.models or [] if (m.id, m.version) != (model.id, model.version)]
    ext.models = [*kept, model]
    out = dict(collection)
    out["stac_extensions"] = coll.stac_extensions
    out["cbir:models"] = [m.to_dict() for m in ext.models]
    return out


MANAGED = ".stac-rscbir"  # marks a collection folder whose collection.json this sink maintains
DESCRIBED = ".stac-rscbir-models"  # marks an existing collection that only gets cbir:models


class CatalogSink:
    """A static catalog on disk, written back in place.

    Items that live under ``root`` (read from this catalog) are rewritten where they are, with
    only ``properties`` and ``stac_extensions`` replaced so links and asset hrefs stay as they
    were (assets the run added, a quicklook, are added). Items from elsewhere (an API, an
    ItemCollection) go to ``<collection>/<id>/<id>.json`` with absolute asset hrefs; chip items
    to ``<collection>-chips/<id>/<id>.json``. ``finalize`` writes or refreshes each new
    collection's ``collection.json`` (item links, extent, model) and links it from
    ``catalog.json``.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, item: pystac.Item) -> Path:
        href = item.get_self_href()
        if href and not href.startswith(("http://", "https://")):
            path = Path(href).resolve()
            if path.is_relative_to(self.root):
                return path
        return self.root / (item.collection_id or "items") / item.id / f"{item.id}.json"

    def is_encoded(self, item: pystac.Item, model: str, version: str) -> bool:
        path = self._path(item)
        if not path.is_file():
            return False
        return has_code(json.loads(path.read_text()).get("properties", {}), model, version)

    def _write_new(self, item: pystac.Item, path: Path) -> None:
        """An item that this catalog did not hold: relative links to its collection and root."""
        item = item.clone()
        item.make_asset_hrefs_absolute()
        d = item.to_dict(include_self_link=False, transform_hrefs=False)
        depth = len(path.relative_to(self.root).parts) - 1
        up = "../" * depth
        d["links"] = [
            link
            for link in d.get("links", [])
            if link.get("rel") not in ("self", "root", "parent", "collection")
        ] + [
            {"rel": "root", "href": f"{up}catalog.json", "type": "application/json"},
            {"rel": "parent", "href": "../collection.json", "type": "application/json"},
            {"rel": "collection", "href": "../collection.json", "type": "application/json"},
        ]
        path.parent.parent.mkdir(parents=True, exist_ok=True)
        (path.parent.parent / MANAGED).touch()
        atomic_write_text(path, _dump(d))

    def write(self, scene: pystac.Item, chips: Sequence[pystac.Item]) -> None:
        for chip in chips:
            self._write_new(chip, self._path(chip))
        path = self._path(scene)
        if path.is_file() and path.is_relative_to(self.root) and scene.get_self_href():
            stored = json.loads(path.read_text())
            new = scene.to_dict(include_self_link=False, transform_hrefs=False)
            stored["properties"] = new["properties"]
            stored["stac_extensions"] = new["stac_extensions"]
            # assets the run added (the scene's quicklook); the stored ones stay as they were
            stored["assets"] = {**new.get("assets", {}), **stored.get("assets", {})}
            atomic_write_text(path, _dump(stored))
            collection = scene.get_single_link("collection")
            href = collection.get_absolute_href() if collection else None
            if href and Path(href).is_file() and Path(href).resolve().is_relative_to(self.root):
                (Path(href).parent / DESCRIBED).touch()
        else:
            self._write_new(scene, path)

    def _managed(self) -> list[Path]:
        """Collection folders this sink created (in any process: Dask workers share the disk)."""
        return sorted(p.parent for p in self.root.glob(f"*/{MANAGED}"))

    def begin(self, model: CBIRModel) -> None:
        """Nothing to declare up front: ``finalize`` describes the model."""

    def finalize(self, model: CBIRModel) -> None:
        for folder in self._managed():
            self._write_collection(folder, model)
        for marker in self.root.rglob(DESCRIBED):
            path = marker.parent / "collection.json"
            atomic_write_text(path, _dump(_add_model(json.loads(path.read_text()), model)))
        self._link_collections()

    def _write_collection(self, folder: Path, model: CBIRModel) -> None:
        """Create or refresh ``folder/collection.json`` from the item files below it."""
        items = [json.loads(p.read_text()) for p in sorted(folder.glob("*/*.json"))]
        path = folder / "collection.json"
        if path.is_file():
            coll = json.loads(path.read_text())
        else:
            coll = pystac.Collection(
                id=folder.name,
                description=f"Items encoded by stac-rscbir ({folder.name})",
                extent=_extent(items),
                license="other",
            ).to_dict(include_self_link=False)
            coll["links"] = [
                {"rel": "root", "href": "../catalog.json", "type": "application/json"},
                {"rel": "parent", "href": "../catalog.json", "type": "application/json"},
            ]
        coll["links"] = [link for link in coll["links"] if link.get("rel") != "item"] + [
            {"rel": "item", "href": f"./{i['id']}/{i['id']}.json", "type": "application/geo+json"}
            for i in items
        ]
        coll["extent"] = _extent(items).to_dict()
        atomic_write_text(path, _dump(_add_model(coll, model)))

    def _link_collections(self) -> None:
        """Make sure ``catalog.json`` lists every collection folder this sink created."""
        path = self.root / "catalog.json"
        if path.is_file():
            cat = json.loads(path.read_text())
        else:
            cat = pystac.Catalog(
                id="stac-rscbir", description="Items encoded by stac-rscbir"
            ).to_dict(include_self_link=False)
            cat["links"] = []
        linked = {link.get("href") for link in cat["links"] if link.get("rel") == "child"}
        for folder in self._managed():
            name = folder.name
            href = f"./{name}/collection.json"
            if href not in linked and f"{name}/collection.json" not in linked:
                cat["links"].append({"rel": "child", "href": href, "type": "application/json"})
        if not any(link.get("rel") == "root" for link in cat["links"]):
            cat["links"].insert(0, {"rel": "root", "href": "./catalog.json"})
        atomic_write_text(path, _dump(cat))


def _extent(items: Sequence[dict[str, Any]]) -> pystac.Extent:
    """The spatial and temporal extent covering item dicts (global/now when empty)."""
    boxes = [i["bbox"] for i in items if i.get("bbox")]
    bbox = (
        [
            min(b[0] for b in boxes),
            min(b[1] for b in boxes),
            max(b[2] for b in boxes),
            max(b[3] for b in boxes),
        ]
        if boxes
        else [-180.0, -90.0, 180.0, 90.0]
    )
    times = sorted(
        pystac.utils.str_to_datetime(t)
        for i in items
        for t in (
            i["properties"].get("datetime"),
            i["properties"].get("start_datetime"),
            i["properties"].get("end_datetime"),
        )
        if t
    )
    interval = [times[0], times[-1]] if times else [datetime.now(UTC), None]
    return pystac.Extent(pystac.SpatialExtent([bbox]), pystac.TemporalExtent([interval]))


class GeoParquetSink:
    """stac-geoparquet files in a folder: one part file per flush, each written atomically.

    A part holds complete scenes only (their chips and the scene item together), so a kill
    loses at most the unflushed scenes, which a rerun encodes again. Part names carry the model
    and version, and the host and process that wrote them; the scene ids in a model's parts are
    what counts as encoded. A process killed while writing a part leaves its temporary file:
    the next sink on the same host removes those of processes that are gone (never those of
    live writers, e.g. other Dask workers sharing the folder).
    """

    def __init__(self, folder: Path, flush_every: int = 64) -> None:
        self.folder = Path(folder)
        self.flush_every = flush_every
        self._buffer: list[dict[str, Any]] = []
        self._scenes_buffered = 0
        self._done: dict[str, set[tuple[str | None, str]]] = {}
        self._writer = f"{host_name()}-{os.getpid()}"
        self._remove_abandoned_parts()

    def _remove_abandoned_parts(self) -> None:
        """Delete temporary part files that writers on this host left when they died."""
        host = host_name()
        for tmp in self.folder.glob(f".part-*-{host}-*.parquet.*"):
            pid = tmp.name.split(f"-{host}-", 1)[1].split("-", 1)[0]
            if pid.isdigit() and not process_alive(int(pid)):
                tmp.unlink(missing_ok=True)

    @staticmethod
    def _tag(model: str, version: str) -> str:
        return f"{model}@{version}".replace("/", "_")

    def _encoded(self, model: str, version: str) -> set[tuple[str | None, str]]:
        tag = self._tag(model, version)
        if tag not in self._done:
            import pyarrow.parquet as pq

            done: set[tuple[str | None, str]] = set()
            for part in sorted(self.folder.glob(f"part-{tag}-*.parquet")):
                table = pq.read_table(part)
                cols = table.column_names
                ids = table.column("id").to_pylist()
                colls = (
                    table.column("collection").to_pylist()
                    if "collection" in cols
                    else [None] * len(ids)
                )
                chip = (
                    table.column("cbir:chip").to_pylist()
                    if "cbir:chip" in cols
                    else [None] * len(ids)
                )
                done.update((c, i) for c, i, ch in zip(colls, ids, chip, strict=True) if ch is None)
            self._done[tag] = done
        return self._done[tag]

    def is_encoded(self, item: pystac.Item, model: str, version: str) -> bool:
        return (item.collection_id, item.id) in self._encoded(model, version)

    def write(self, scene: pystac.Item, chips: Sequence[pystac.Item]) -> None:
        for it in [*chips, scene]:
            it = it.clone()
            it.make_asset_hrefs_absolute()
            self._buffer.append(it.to_dict(include_self_link=False, transform_hrefs=False))
        self._scenes_buffered += 1
        self._model = next(
            (c["model"], c["model_version"]) for c in scene.properties["cbir:codes"][-1:]
        )
        if self._scenes_buffered >= self.flush_every:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        import stac_geoparquet.arrow as sga

        model, version = self._model
        tag = self._tag(model, version)
        table = sga.parse_stac_items_to_arrow(self._buffer).read_all()
        target = self.folder / f"part-{tag}-{self._writer}-{uuid.uuid4().hex[:12]}.parquet"
        atomic_write(target, lambda p: sga.to_parquet(table, p))
        done = self._encoded(model, version)
        done.update(
            (d.get("collection"), d["id"])
            for d in self._buffer
            if "cbir:chip" not in d["properties"]
        )
        self._buffer, self._scenes_buffered = [], 0

    def begin(self, model: CBIRModel) -> None:
        """Nothing to declare: the files carry the codes, not the model descriptions."""

    def finalize(self, model: CBIRModel) -> None:
        self._flush()


class ApiSink:
    """A STAC API with the Transactions extension: each item is upserted (PUT, else POST).

    ``token`` (default: the ``RSCBIR_WRITE_TOKEN`` environment variable) is sent as a bearer
    token, for a server whose writes need one (``stac-rscbir serve --write-token``).
    """

    def __init__(self, url: str, timeout: float = 30.0, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.token = token if token is not None else os.environ.get("RSCBIR_WRITE_TOKEN") or None
        self._collections: set[str] = set()
        self._model: CBIRModel | None = None

    def _client(self) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url, timeout=self.timeout, headers=headers)

    def is_encoded(self, item: pystac.Item, model: str, version: str) -> bool:
        with self._client() as client:
            r = client.get(f"/collections/{item.collection_id}/items/{item.id}")
        if r.status_code == 404:
            return False
        r.raise_for_status()
        return has_code(r.json().get("properties", {}), model, version)

    def _ensure_collection(self, client: Any, collection_id: str, example: pystac.Item) -> None:
        if collection_id in self._collections:
            return
        r = client.get(f"/collections/{collection_id}")
        if r.status_code == 404:
            coll = pystac.Collection(
                id=collection_id,
                description=f"Chips encoded by stac-rscbir ({collection_id})",
                extent=_extent([example.to_dict()]),
                license="other",
            ).to_dict(include_self_link=False)
            body = coll if self._model is None else _add_model(coll, self._model)
            client.post("/collections", json=body).raise_for_status()
        else:
            r.raise_for_status()
            current = r.json()
            described = current if self._model is None else _add_model(current, self._model)
            if described != current:  # the API adds its own links again
                described["links"] = [
                    link
                    for link in described.get("links", [])
                    if link.get("rel") not in ("self", "root", "parent", "items")
                ]
                client.put(f"/collections/{collection_id}", json=described).raise_for_status()
        self._collections.add(collection_id)

    def write(self, scene: pystac.Item, chips: Sequence[pystac.Item]) -> None:
        with self._client() as client:
            for it in [*chips, scene]:
                self._ensure_collection(client, it.collection_id or "", it)
                body = it.to_dict(include_self_link=False, transform_hrefs=False)
                path = f"/collections/{it.collection_id}/items"
                r = client.put(f"{path}/{it.id}", json=body)
                if r.status_code == 404:
                    r = client.post(path, json=body)
                r.raise_for_status()

    def begin(self, model: CBIRModel) -> None:
        """Remember ``model``: every collection written to gets it in ``cbir:models`` before
        its first item (the API refuses codes of a model the collection does not declare)."""
        self._model = model

    def finalize(self, model: CBIRModel) -> None:
        """Nothing buffered; the model was declared before the first write."""


def open_sink(spec: str, source: str | None = None) -> Sink:
    """A sink from its command-line spelling: ``catalog[:DIR]`` (default DIR: the source
    catalog's folder), ``geoparquet:DIR`` or an ``http(s)://`` Transactions API root."""
    kind, _, arg = spec.partition(":")
    if spec.startswith(("http://", "https://")):
        return ApiSink(spec)
    if kind == "catalog":
        if not arg and not source:
            raise ValueError("catalog sink needs a folder: catalog:DIR")
        return CatalogSink(Path(arg) if arg else Path(source or ".").parent)
    if kind == "geoparquet" and arg:
        return GeoParquetSink(Path(arg))
    raise ValueError(
        f"unknown sink {spec!r}: use catalog[:DIR], geoparquet:DIR or an http(s):// STAC API root"
    )


class StoreSink:
    """The search service's own store (any :class:`~stac_rscbir.store.base.ItemStore`):
    chips and scene upserted in one call, the chip collection created on first use."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._written: set[str] = set()

    def is_encoded(self, item: pystac.Item, model: str, version: str) -> bool:
        from stac_rscbir.store.base import NotFoundError

        try:
            stored = self.store.get_item(item.collection_id or "", item.id)
        except NotFoundError:
            return False
        return has_code(stored.get("properties", {}), model, version)

    def write(self, scene: pystac.Item, chips: Sequence[pystac.Item]) -> None:
        from stac_rscbir.store.base import NotFoundError

        dicts = [it.to_dict(include_self_link=False, transform_hrefs=False) for it in chips]
        for cid in {d["collection"] for d in dicts}:
            try:
                self.store.get_collection(cid)
            except NotFoundError:
                coll = pystac.Collection(
                    id=cid,
                    description=f"Chips encoded by stac-rscbir ({cid})",
                    extent=_extent(dicts),
                    license="other",
                )
                self.store.create_collection(coll.to_dict(include_self_link=False))
        scene_dict = scene.to_dict(include_self_link=False, transform_hrefs=False)
        self.store.upsert_items([*dicts, scene_dict])
        self._written.update(d["collection"] for d in [*dicts, scene_dict])

    def begin(self, model: CBIRModel) -> None:
        """Nothing to declare up front: the store takes items as they are and ``finalize``
        describes the model; the hash index is rebuilt when that changes what it serves."""

    def finalize(self, model: CBIRModel) -> None:
        """Describe the model in the collections this sink wrote to."""
        for cid in sorted(self._written):
            current = self.store.get_collection(cid)
            described = _add_model(current, model)
            if described != current:  # no write (and no new store generation) when unchanged
                self.store.update_collection(described)
