"""The OpenAPI document says what the API answers: its error responses and similarity results.

FastAPI documents a 200 and a 422 per operation; the API answers validation errors with 400
(see :mod:`stac_rscbir.api.errors`) and also 401, 404, 405, 409, 410 and 413. This adds each
where it applies, with the ``{code, description}`` body, and the ``cbir:`` fields of a
similarity search's ItemCollection, so that clients and schemathesis can check
responses against the document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from stac_rscbir.api.errors import ErrorResponse

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
RESULTS_REF = {"$ref": "#/components/schemas/SimilarityItemCollection"}
TRANSACTIONS_TAG = "Transaction Extension"
# operations that answer a similarity search (GET /search and POST /search may, /similar does)
SIMILARITY_PATHS = ("/search", "/collections/{collection_id}/items/{item_id}/similar")
CREATE_PATHS = ("/collections", "/collections/{collection_id}/items")

ERRORS = {
    400: "Bad request: a parameter or the body is invalid (the description names it).",
    401: "The write token is missing or wrong (this server protects its Transactions).",
    404: "No such collection or item.",
    405: "Not supported here (PATCH: PUT the whole document).",
    409: "It exists already.",
    410: "The paging token's ranked list is gone and the catalog changed since: search again.",
    413: "The body (or the uploaded image) is over this server's limit.",
}

SIMILARITY_INFO = {
    "type": "object",
    "description": "How a similarity search ranked its results.",
    "required": ["model", "exact", "k", "ranked"],
    "properties": {
        "model": {"type": "string", "description": "The model whose codes were compared."},
        "exact": {"type": "boolean", "description": "Whether the Hamming ranking is exact."},
        "k": {"type": "integer", "minimum": 1, "description": "Length of the ranked list."},
        "ranked": {
            "type": "integer",
            "minimum": 0,
            "description": "Items in the ranked list (at most k).",
        },
        "order": {
            "type": "string",
            "description": "Which score orders the results (`cbir:distance` unless re-ranked).",
        },
        "feedback": {"type": "object", "description": "The relevance feedback used, if any."},
    },
}

SIMILARITY_RESULTS = {
    "description": "An ItemCollection; from a similarity search, ranked, with `cbir:` fields.",
    "allOf": [
        {"$ref": "#/components/schemas/ItemCollection-Output"},
        {
            "type": "object",
            "properties": {
                "features": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "properties": {
                                "type": "object",
                                "properties": {
                                    "cbir:distance": {
                                        "type": "integer",
                                        "minimum": 0,
                                        "description": "Hamming distance to the query code.",
                                    },
                                    "cbir:score": {
                                        "type": "number",
                                        "description": "The score that orders the results "
                                        "when it is not cbir:distance (see cbir:similarity).",
                                    },
                                },
                            }
                        },
                    },
                },
                "cbir:similarity": SIMILARITY_INFO,
            },
        },
    ],
}


def _statuses(path: str, method: str, operation: dict[str, Any], protected: bool) -> list[int]:
    """The error statuses an operation may answer."""
    statuses = []
    if operation.get("parameters") or operation.get("requestBody"):
        statuses.append(400)
    writes = TRANSACTIONS_TAG in operation.get("tags", [])
    if writes and protected:
        statuses.append(401)
    if "{" in path or path in SIMILARITY_PATHS:  # /search: a similarity query item may be gone
        statuses.append(404)
    if method == "patch" and writes:
        statuses.append(405)
    if method == "post" and path in CREATE_PATHS:
        statuses.append(409)
    if path in SIMILARITY_PATHS:  # a similarity paging token outlived its ranked list
        statuses.append(410)
    if operation.get("requestBody"):
        statuses.append(413)
    return statuses


def _document_no_content(path: str, method: str, responses: dict[str, Any]) -> None:
    """Transactions that answer 204 without a body: DELETE, and POST of a FeatureCollection."""
    if method == "delete":
        responses.pop("200", None)
        responses["204"] = {"description": "Deleted."}
    elif method == "post" and path == "/collections/{collection_id}/items":
        responses["204"] = {"description": "The items of a FeatureCollection were added."}


def document(schema: dict[str, Any], *, write_protected: bool) -> dict[str, Any]:
    """Add the error responses and the similarity results to an OpenAPI document (in place)."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema()
    schemas["SimilarityItemCollection"] = SIMILARITY_RESULTS
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            if operation.get("tags") == [TRANSACTIONS_TAG]:
                _document_no_content(path, method, responses)
            for status in _statuses(path, method, operation, write_protected):
                responses[str(status)] = {
                    "description": ERRORS[status],
                    "content": {"application/json": {"schema": ERROR_REF}},
                }
            if path in SIMILARITY_PATHS:
                for content in responses.get("200", {}).get("content", {}).values():
                    content["schema"] = RESULTS_REF
    return schema


def install_openapi(app: FastAPI, *, write_protected: bool) -> None:
    """Make ``app`` serve its OpenAPI document with :func:`document` applied."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(build(), write_protected=write_protected)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
