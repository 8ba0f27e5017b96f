"""Which models a store declares, and whether an item's codes fit them: the one owner of that rule.

A code entry (``cbir:codes[i]``) names its model and version; the model is described once, in the
``cbir:models`` of the item's Collection or of a model Item the item links with rel
``cbir:model``. :func:`check_item_codes` is what the API's write paths run before storing an
item: each code must be of a declared model, of a declared version, and in that declaration's
format (bits, bit order, encoding, descriptor dim), else :class:`InvalidItemError` (a 400)
names the field. :func:`served_model` is what index building uses for data that reached the
store without that check (``pypgstac load``, direct SQL, an older store file): the declaration
whose version and bit length a model's hash index serves, so other codes are left out of the
index with a warning instead of breaking its searches.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from stac_rscbir.extension.cbir import (
    CODES_PROP,
    MODEL_REL,
    MODELS_PROP,
    CBIRModel,
    HashCode,
    check_unique_codes,
)
from stac_rscbir.extension.codec import CBIRFieldError
from stac_rscbir.store.base import ItemStore, NotFoundError
from stac_rscbir.store.items import InvalidItemError

__all__ = ["check_item_codes", "declared_models", "served_model"]

log = logging.getLogger(__name__)

# the path of a Collection or Item of this API, whatever the host or prefix
_API_PATH = re.compile(r"(?:^|/)collections/([^/]+)(?:/items/([^/]+))?/?$")

Declared = dict[tuple[str, str], CBIRModel]  # (model id, version) -> description


def declared_models(doc: dict[str, Any]) -> Declared:
    """The valid ``cbir:models`` entries of a Collection or a model Item (invalid ones skipped:
    a Collection written before the extension was checked must not block its items' writes
    of other models)."""
    scope = doc.get("properties") if doc.get("type") == "Feature" else doc
    raw = scope.get(MODELS_PROP) if isinstance(scope, dict) else None
    out: Declared = {}
    for i, entry in enumerate(raw if isinstance(raw, list) else []):
        try:
            model = CBIRModel.from_dict(entry, f"{MODELS_PROP}[{i}]")
        except CBIRFieldError as exc:
            log.warning("%s %r: model description skipped: %s", doc.get("type"), doc.get("id"), exc)
            continue
        out[(model.id, model.version)] = model
    return out


def _linked_models(store: ItemStore, item: dict[str, Any]) -> Declared:
    """The models described by the Collections or model Items the item links (rel cbir:model).

    A link that does not point to a Collection or Item of this store is refused: the server
    cannot check codes against a description it cannot read.
    """
    out: Declared = {}
    links = item.get("links")
    for j, link in enumerate(links if isinstance(links, list) else []):
        if not isinstance(link, dict) or link.get("rel") != MODEL_REL:
            continue
        href = link.get("href")
        path = urlsplit(href).path if isinstance(href, str) else ""
        match = _API_PATH.search(path)
        try:
            if match is None:
                raise NotFoundError(href)
            cid, iid = match.groups()
            target = store.get_collection(cid) if iid is None else store.get_item(cid, iid)
        except NotFoundError as exc:
            raise InvalidItemError(
                item.get("id"),
                f"links[{j}].href",
                f"{href!r} is not a Collection or model Item of this API (a {MODEL_REL} link "
                "must point to /collections/{id} or /collections/{id}/items/{id} here)",
            ) from exc
        out.update(declared_models(target))
    return out


def check_item_codes(
    store: ItemStore, item: dict[str, Any], collections: dict[str, Declared] | None = None
) -> None:
    """Raise InvalidItemError naming the first code entry that does not decode, the second
    code of one model and one version (:func:`~stac_rscbir.extension.cbir.check_unique_codes`),
    or the first code entry whose model is not declared for ``item`` (its Collection's
    ``cbir:models`` or a model Item it links), whose version is not a declared one, or that
    does not have the declared format (bits, bit order, encoding, descriptor dim).
    ``collections`` caches the Collections' declarations across the items of one write."""
    props = item.get("properties")
    raw = props.get(CODES_PROP) if isinstance(props, dict) else None
    if not isinstance(raw, list) or not raw:
        return  # no codes (or a malformed field, which the store refuses with its reason)
    cid = item.get("collection")
    cache = {} if collections is None else collections
    if isinstance(cid, str) and cid not in cache:
        try:
            cache[cid] = declared_models(store.get_collection(cid))
        except NotFoundError:
            return  # the store answers 404 for the collection
    declared = dict(cache.get(cid, {}) if isinstance(cid, str) else {})
    declared.update(_linked_models(store, item))
    prop = f"properties.{CODES_PROP}"
    try:
        codes = [HashCode.from_dict(entry, f"{prop}[{i}]") for i, entry in enumerate(raw)]
        check_unique_codes(codes, prop)
    except CBIRFieldError as exc:
        raise InvalidItemError(item.get("id"), exc.field, exc.problem) from exc
    for i, code in enumerate(codes):
        field = f"{prop}[{i}]"
        versions = [v for (m, v) in declared if m == code.model]
        if not versions:
            raise InvalidItemError(
                item.get("id"),
                f"{field}.model",
                f"model {code.model!r} is not declared: describe it in {MODELS_PROP} of "
                f"collection {cid!r} or link a model Item with rel {MODEL_REL}",
            )
        if code.model_version not in versions:
            raise InvalidItemError(
                item.get("id"),
                f"{field}.model_version",
                f"{code.model_version!r}, but model {code.model!r} is declared in version(s) "
                f"{versions} (codes of different versions are not comparable)",
            )
        try:
            declared[(code.model, code.model_version)].check_code(code, field)
        except CBIRFieldError as exc:
            raise InvalidItemError(item.get("id"), exc.field, exc.problem) from exc


def served_model(store: ItemStore, model: str) -> CBIRModel | None:
    """The declaration of ``model`` whose version and bit length its hash index serves.

    Each Collection's current version of a model is the one it lists last in ``cbir:models``
    (ingestion appends a new version after the old ones); the index serves the current version
    of the most Collections, ties going to the Collection whose id sorts last. None when no
    Collection declares the model (e.g. only model Items do).
    """
    current: dict[str, CBIRModel] = {}  # collection id -> its last-listed entry of the model
    for collection in sorted(store.all_collections(), key=lambda c: str(c.get("id"))):
        for (mid, _), description in declared_models(collection).items():
            if mid == model:
                current[str(collection.get("id"))] = description
    if not current:
        return None
    votes = Counter(d.version for d in current.values())
    best = max(votes.values())
    chosen = [d for d in current.values() if votes[d.version] == best][-1]
    if len(votes) > 1:
        log.warning(
            "collections declare model %s in different current versions %s: the index serves %s",
            model,
            dict(votes),
            chosen.version,
        )
    return chosen
