"""Checking STAC items, collections and search parameters for storage, whatever the store.

Both stores (embedded SQLite, pgstac) accept the same items and refuse the same with the same
errors: :class:`InvalidItemError` names the item and the offending field, query parameters
raise :class:`~stac_rscbir.store.base.InvalidQueryError`. :class:`PreparedItem` is an item
checked and reduced to what stores index: its times as sortable UTC text, its geometry (made
valid) as WKB with its bounds, its codes as packed bytes.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import cql2
import numpy as np
import shapely
import shapely.geometry
from shapely.errors import GEOSException

from stac_rscbir.extension.cbir import CODES_PROP, HashCode, check_unique_codes
from stac_rscbir.extension.codec import CBIRFieldError
from stac_rscbir.store.base import InvalidQueryError, StoredCode

__all__ = [
    "Coverage",
    "Geom",
    "InvalidItemError",
    "PreparedItem",
    "collection_json",
    "coverages",
    "geometries",
    "geometry",
    "parse_bbox",
    "parse_datetime_query",
    "parse_filter",
    "parse_rfc3339",
    "widen_extent",
]


class InvalidItemError(ValueError):
    """An item (or collection) that cannot be stored; ``field`` names the offending field."""

    def __init__(self, item_id: object, field: str, problem: str) -> None:
        self.item_id = item_id
        self.field = field
        self.problem = problem
        where = f"item {item_id!r}: " if item_id is not None else ""
        super().__init__(f"{where}{field}: {problem}")


_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:?\d{2})?$"
)


def parse_rfc3339(text: object, field: str) -> datetime:
    """An aware UTC datetime from RFC 3339 text (a missing offset is read as UTC).

    Raises ValueError naming ``field`` for anything else (dates without a time included).
    """
    if not isinstance(text, str):
        raise ValueError(f"{field}: expected an RFC 3339 date-time string, got {text!r}")
    m = _RFC3339.match(text.strip())
    if m is None:
        raise ValueError(f"{field}: {text!r} is not an RFC 3339 date-time")
    frac = (m.group(7) or "")[:7]  # '.' + at most 6 digits
    tz = m.group(8) or "Z"
    tz = "+00:00" if tz in ("Z", "z") else (tz if ":" in tz else tz[:3] + ":" + tz[3:])
    iso = "{}-{}-{}T{}:{}:{}{}{}".format(*m.groups()[:6], frac, tz)
    try:
        return datetime.fromisoformat(iso).astimezone(UTC)
    except (ValueError, OverflowError) as exc:
        raise ValueError(f"{field}: {text!r} is not an RFC 3339 date-time ({exc})") from exc


def _dt_text(value: datetime) -> str:
    """Sortable UTC text: fixed width, so text order is time order."""
    return (
        f"{value.year:04d}-{value.month:02d}-{value.day:02d}T"
        f"{value.hour:02d}:{value.minute:02d}:{value.second:02d}.{value.microsecond:06d}Z"
    )


def parse_datetime_query(text: str) -> tuple[str | None, str | None]:
    """(start, end) as sortable UTC text for an instant (start == end) or an interval.

    ``..`` or an empty string is an open end; raises InvalidQueryError with the reason.
    """
    if not isinstance(text, str) or not text.strip():
        raise InvalidQueryError(f"datetime: expected an RFC 3339 instant or interval, got {text!r}")
    parts = text.strip().split("/")
    try:
        if len(parts) == 1:
            if parts[0] == "..":
                raise ValueError("datetime: '..' is only allowed as an end of an interval")
            t = _dt_text(parse_rfc3339(parts[0], "datetime"))
            return t, t
        if len(parts) != 2:
            raise ValueError(f"datetime: {text!r} is not an instant or a 'start/end' interval")
        ends = [None if p.strip() in ("", "..") else parse_rfc3339(p, "datetime") for p in parts]
    except ValueError as exc:
        raise InvalidQueryError(str(exc)) from exc
    start, end = ends
    if start is not None and end is not None and start > end:
        raise InvalidQueryError(f"datetime: interval {text!r} starts after it ends")
    return (
        None if start is None else _dt_text(start),
        None if end is None else _dt_text(end),
    )


def parse_bbox(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    """(minx, miny, maxx, maxy) from a 4- or 6-number bbox (the 2D part of the latter)."""
    if isinstance(bbox, str | bytes) or not isinstance(bbox, Sequence):
        raise InvalidQueryError(f"bbox: expected 4 or 6 numbers, got {bbox!r}")
    values = list(bbox)
    if len(values) not in (4, 6):
        raise InvalidQueryError(f"bbox: expected 4 or 6 numbers, got {len(values)}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise InvalidQueryError(f"bbox: {v!r} is not a finite number")
    if len(values) == 6:
        minx, miny, _, maxx, maxy, _ = values
        if values[2] > values[5]:
            raise InvalidQueryError(f"bbox: minimum elevation {values[2]} > maximum {values[5]}")
    else:
        minx, miny, maxx, maxy = values
    if minx > maxx:
        raise InvalidQueryError(
            f"bbox: west {minx} > east {maxx} (antimeridian-crossing boxes are not supported: "
            "search both sides separately)"
        )
    if miny > maxy:
        raise InvalidQueryError(f"bbox: south {miny} > north {maxy}")
    return float(minx), float(miny), float(maxx), float(maxy)


Geom = tuple[shapely.Geometry, bytes, tuple[float, float, float, float]]  # geometry, WKB, bounds


def geometries(values: Sequence[object]) -> list[Geom | str]:
    """Valid, non-empty shapely geometries from GeoJSON objects, parsed in one GEOS call.

    Each entry is (geometry made valid if it was not, its WKB, its bounds) or the problem with
    that value.
    """
    out: list[Geom | str] = ["expected a GeoJSON geometry object"] * len(values)
    texts: list[str] = []
    where: list[int] = []
    for i, value in enumerate(values):
        if isinstance(value, dict) and isinstance(value.get("type"), str):
            try:
                texts.append(json.dumps(value, allow_nan=False))
                where.append(i)
            except (TypeError, ValueError):
                out[i] = "coordinates must be finite numbers"
    if not texts:
        return out
    arr = shapely.from_geojson(texts, on_invalid="ignore")
    if arr.size and arr.ndim == 0:
        arr = arr.reshape(1)
    for j in np.flatnonzero(shapely.is_missing(arr)):  # tell why, one by one
        try:
            shapely.from_geojson(texts[j], on_invalid="raise")
            out[where[j]] = "not a valid GeoJSON geometry"
        except (GEOSException, ValueError) as exc:
            out[where[j]] = f"not a valid GeoJSON geometry ({exc})"
    ok = ~shapely.is_missing(arr)
    empty = ok & shapely.is_empty(arr)
    bounds = shapely.bounds(arr)
    finite = np.isfinite(bounds).all(axis=1)
    invalid = ok & ~empty & finite & ~shapely.is_valid(arr)
    if invalid.any():
        arr[invalid] = shapely.make_valid(arr[invalid])
        bounds = shapely.bounds(arr)
    wkb = shapely.to_wkb(arr)
    for j, i in enumerate(where):
        if not ok[j]:
            continue
        if empty[j]:
            out[i] = "the geometry is empty"
        elif not finite[j]:
            out[i] = "coordinates must be finite numbers"
        else:
            out[i] = (arr[j], wkb[j], tuple(float(b) for b in bounds[j]))  # type: ignore[assignment]
    return out


def geometry(value: object, field: str) -> shapely.Geometry:
    """A valid, non-empty shapely geometry from GeoJSON (raises ValueError naming ``field``)."""
    geom = geometries([value])[0]
    if isinstance(geom, str):
        raise ValueError(f"{field}: {geom}")
    return geom[0]


# The operators and functions of CQL2 (OGC 21-065), lower case. cql2 parses any other name as a
# call of a custom function, which no store here has: evaluated, it matched nothing (a silent
# empty answer), so an unknown name is refused instead.
CQL2_OPERATORS = frozenset(
    {"and", "or", "not", "=", "<>", "<", "<=", ">", ">=", "like", "between", "in", "isnull"}
    | {"casei", "accenti", "+", "-", "*", "/", "%", "^", "div"}
    | {f"s_{op}" for op in ("intersects", "equals", "disjoint", "touches", "within")}
    | {f"s_{op}" for op in ("overlaps", "crosses", "contains")}
    | {f"a_{op}" for op in ("equals", "contains", "containedby", "overlaps")}
    | {f"t_{op}" for op in ("after", "before", "contains", "disjoint", "during", "equals")}
    | {f"t_{op}" for op in ("finishedby", "finishes", "intersects", "meets", "metby")}
    | {f"t_{op}" for op in ("overlappedby", "overlaps", "startedby", "starts")}
)


def _check_operators(node: Any) -> None:
    """ValueError naming the first operator of a CQL2 JSON tree that CQL2 does not define."""
    if isinstance(node, list):
        for value in node:
            _check_operators(value)
    elif isinstance(node, dict):
        op = node.get("op")
        if isinstance(op, str) and op.lower() not in CQL2_OPERATORS:
            raise ValueError(
                f"unknown operator or function {op!r} (this server has the CQL2 operators and "
                "functions only, no custom functions)"
            )
        _check_operators(node.get("args"))


@functools.lru_cache(maxsize=256)
def _cached_filter(key: str, is_json: bool) -> cql2.Expr:
    expr = cql2.Expr(json.loads(key) if is_json else key)
    expr.validate()  # JSON-schema validation: ~20 ms, hence the cache
    _check_operators(expr.to_json())
    return expr


def collection_json(collection: dict[str, Any]) -> tuple[str, str]:
    """(id, compact JSON) of a collection to store; InvalidItemError naming what is wrong."""
    if not isinstance(collection, dict):
        raise InvalidItemError(None, "collection", "expected a STAC Collection object")
    cid = collection.get("id")
    if not isinstance(cid, str) or not cid:
        raise InvalidItemError(None, "id", "a collection needs an id (a non-empty string)")
    try:
        return cid, json.dumps(collection, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidItemError(None, "collection", f"is not JSON-serialisable ({exc})") from exc


def _one_operand_logic(node: Any) -> Any:
    """CQL2 JSON with each ``and`` / ``or`` of a single operand replaced by that operand. CQL2's
    schema wants two or more, but clients build the list from a form (STAC Browser sends
    ``{"op": "and", "args": [<its one condition>]}``) and the meaning is not in doubt."""
    if isinstance(node, list):
        return [_one_operand_logic(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _one_operand_logic(v) for k, v in node.items()}
    op, args = node.get("op"), node.get("args")
    one = isinstance(args, list) and len(args) == 1
    return args[0] if one and isinstance(op, str) and op.lower() in ("and", "or") else node


def parse_filter(value: dict[str, Any] | str) -> cql2.Expr:
    """A validated CQL2 expression from text or JSON (raises InvalidQueryError with the cause)."""
    try:
        if isinstance(value, str):
            return _cached_filter(value, False)
        return _cached_filter(json.dumps(_one_operand_logic(value), sort_keys=True), True)
    except Exception as exc:  # cql2 raises ParseError, ValidationError or plain Exception
        raise InvalidQueryError(f"filter: invalid CQL2: {exc}".strip()) from exc


class PreparedItem:
    """An item checked and reduced to the columns it is stored in."""

    __slots__ = ("codes", "collection", "content", "dt", "end", "geom", "id", "rtree", "start")

    def __init__(self, item: dict[str, Any], geom: Geom | str | None = None) -> None:
        if not isinstance(item, dict):
            raise InvalidItemError(None, "item", "expected a STAC Item object")
        item_id = item.get("id")
        if not isinstance(item_id, str) or not item_id:
            raise InvalidItemError(None, "id", "is required (a non-empty string)")
        coll = item.get("collection")
        if not isinstance(coll, str) or not coll:
            raise InvalidItemError(item_id, "collection", "is required (a non-empty string)")
        if item.get("type", "Feature") != "Feature":
            raise InvalidItemError(item_id, "type", f"must be 'Feature', got {item['type']!r}")
        if item.get("geometry") is None:
            raise InvalidItemError(item_id, "geometry", "is required")
        if geom is None:
            geom = geometries([item["geometry"]])[0]
        if isinstance(geom, str):
            raise InvalidItemError(item_id, "geometry", geom)
        props = item.get("properties")
        if not isinstance(props, dict):
            raise InvalidItemError(item_id, "properties", "is required (an object)")
        self.id, self.collection = item_id, coll
        self._times(props)
        self.codes = self._codes(props)
        content = dict(item)
        content["type"] = "Feature"
        content["collection"] = coll
        _, wkb, bounds = geom
        if "bbox" in content and content["bbox"] is not None:
            self._check_bbox(content["bbox"])
        else:
            content["bbox"] = [float(b) for b in bounds]
        self.geom = wkb
        self.rtree = (bounds[0], bounds[2], bounds[1], bounds[3])
        try:
            self.content = json.dumps(content, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidItemError(item_id, "item", f"is not JSON-serialisable ({exc})") from exc

    def _times(self, props: dict[str, Any]) -> None:
        def parse(name: str) -> datetime | None:
            value = props.get(name)
            if value is None:
                return None
            try:
                return parse_rfc3339(value, f"properties.{name}")
            except ValueError as exc:
                raise InvalidItemError(
                    self.id, f"properties.{name}", str(exc).split(": ", 1)[-1]
                ) from exc

        dt, start, end = parse("datetime"), parse("start_datetime"), parse("end_datetime")
        if dt is None and (start is None or end is None):
            raise InvalidItemError(
                self.id,
                "properties.datetime",
                "is required (or null with both start_datetime and end_datetime)",
            )
        start = start or dt
        end = end or dt
        assert start is not None and end is not None
        if start > end:
            raise InvalidItemError(
                self.id, "properties.start_datetime", "is after properties.end_datetime"
            )
        self.dt = _dt_text(dt if dt is not None else start)
        self.start, self.end = _dt_text(start), _dt_text(end)

    def _codes(self, props: dict[str, Any]) -> list[tuple[str, str, bytes, bytes | None]]:
        raw = props.get(CODES_PROP)
        if raw is None:
            return []
        field = f"properties.{CODES_PROP}"
        if not isinstance(raw, list):
            raise InvalidItemError(self.id, field, "must be a list of code objects")
        try:
            codes = [HashCode.from_dict(entry, f"{field}[{i}]") for i, entry in enumerate(raw)]
            check_unique_codes(codes, field)
            stored = [StoredCode.of((self.collection, self.id), code) for code in codes]
        except CBIRFieldError as exc:
            raise InvalidItemError(self.id, exc.field, exc.problem) from exc
        return [
            (code.model, code.model_version, sc.code, sc.descriptor)
            for code, sc in zip(codes, stored, strict=True)
        ]

    def _check_bbox(self, bbox: object) -> None:
        try:
            parse_bbox(bbox)  # type: ignore[arg-type]
        except InvalidQueryError as exc:
            raise InvalidItemError(self.id, "bbox", str(exc).split(": ", 1)[-1]) from exc


# ((minx, miny, maxx, maxy), start, end): what items span, times as sortable UTC text
Coverage = tuple[tuple[float, float, float, float], str, str]


def coverages(items: Sequence[PreparedItem]) -> dict[str, Coverage]:
    """What ``items`` span in each of their collections: the union of their geometries' bounds
    and their time range, by collection id (the extents a write must widen)."""
    by_collection: dict[str, list[PreparedItem]] = {}
    for p in items:
        by_collection.setdefault(p.collection, []).append(p)
    return {
        cid: (
            (
                min(p.rtree[0] for p in group),
                min(p.rtree[2] for p in group),
                max(p.rtree[1] for p in group),
                max(p.rtree[3] for p in group),
            ),
            min(p.start for p in group),
            max(p.end for p in group),
        )
        for cid, group in by_collection.items()
    }


def _rfc3339(sortable: str) -> str:
    """RFC 3339 text of a sortable UTC time, without a zero fraction."""
    return sortable.removesuffix(".000000Z").removesuffix("Z") + "Z"


def _time(value: object) -> str | None:
    """Sortable UTC text of an extent end (None: open, or not a time and so replaced)."""
    try:
        return _dt_text(parse_rfc3339(value, "interval"))
    except ValueError:
        return None


def widen_extent(collection: dict[str, Any], cover: Coverage) -> dict[str, Any] | None:
    """``collection`` with its overall extent (the first bbox and the first interval) grown to
    cover ``cover``; None when it already does.

    The rule every store applies in the transaction of each item write, so a collection's
    extent always covers its items (it never shrinks: deleting items leaves it as wide). An
    open (null) end of the interval already covers everything on its side; an extent that is
    missing or malformed is replaced by one covering ``cover``.
    """
    (minx, miny, maxx, maxy), start, end = cover
    extent = collection.get("extent")
    spatial = extent.get("spatial") if isinstance(extent, dict) else None
    temporal = extent.get("temporal") if isinstance(extent, dict) else None
    boxes = spatial.get("bbox") if isinstance(spatial, dict) else None
    intervals = temporal.get("interval") if isinstance(temporal, dict) else None
    box = list(boxes[0]) if isinstance(boxes, list) and boxes else None
    try:
        x0, y0, x1, y1 = parse_bbox(box)  # type: ignore[arg-type]
    except InvalidQueryError:
        x0, y0, x1, y1, box = minx, miny, maxx, maxy, None
    new_box = [min(x0, minx), min(y0, miny), max(x1, maxx), max(y1, maxy)]
    if box is not None and len(box) == 6:  # keep the elevations
        new_box = [*new_box[:2], box[2], *new_box[2:], box[5]]
    first = intervals[0] if isinstance(intervals, list) and intervals else None
    rest = intervals[1:] if isinstance(first, list) and len(first) == 2 else []
    if not (isinstance(first, list) and len(first) == 2):
        first = [_rfc3339(start), _rfc3339(end)]
    lo, hi = (None if t is None else _time(t) for t in first)
    new_first = [
        None if first[0] is None else _rfc3339(min(lo or start, start)),
        None if first[1] is None else _rfc3339(max(hi or end, end)),
    ]
    if new_box == box and new_first == first:
        return None
    out = dict(collection)
    out["extent"] = {
        **(extent if isinstance(extent, dict) else {}),
        "spatial": {
            **(spatial if isinstance(spatial, dict) else {}),
            "bbox": [new_box, *(boxes[1:] if box is not None else [])],
        },
        "temporal": {
            **(temporal if isinstance(temporal, dict) else {}),
            "interval": [new_first, *rest],
        },
    }
    return out
