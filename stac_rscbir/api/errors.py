"""One JSON error shape, ``{"code": ..., "description": ...}``, for every error the API answers.

FastAPI answers its own errors (unknown routes, 405, ``HTTPException``) as ``{"detail": ...}``
and request validation errors as a list that echoes the request body (a 5 MiB image came back
in the error); stac-fastapi answers its own exceptions as ``{code, description}``. The handlers
here give every one of them the STAC API shape, and a validation error becomes a 400 (as STAC
API expects) that names each field and its problem, with inputs truncated.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from stac_fastapi.types.errors import ConflictError, InvalidQueryParameter, NotFoundError
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_DESCRIPTION = 2000  # characters of an error description, at most
MAX_INPUT = 40  # characters of an offending input quoted in a validation error
MAX_PROBLEMS = 5  # validation problems listed in one error
# ``code`` by status where the HTTP phrase is not the name clients know (413 is "Content Too
# Large" since RFC 9110, "Request Entity Too Large" before)
CODES = {413: "PayloadTooLarge"}


class ErrorResponse(BaseModel):
    """The body of every 4xx (and 5xx) answer, as the STAC API specifies."""

    code: str = Field(description="What kind of error, e.g. `BadRequest`, `NotFound`.")
    description: str = Field(description="What is wrong with the request, in words.")


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def error_response(
    status: int, description: str, code: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """A ``{code, description}`` answer; ``code`` defaults to the status's name (``NotFound``)."""
    if code is None:
        code = CODES.get(status) or HTTPStatus(status).phrase.title().replace(" ", "")
    body = ErrorResponse(code=code, description=_truncate(description, MAX_DESCRIPTION))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def describe_validation(errors: Sequence[Any]) -> str:
    """Pydantic/FastAPI validation errors in words: the field (dotted path) and the problem of
    each, a short scalar input quoted, no bodies; at most MAX_PROBLEMS distinct problems, those
    of the API's own validators first (of a union, e.g. a GeoJSON geometry, pydantic reports
    every member's mismatch: the one that says what is wrong comes from a validator)."""
    problems: list[str] = []
    for error in sorted(errors, key=lambda e: e.get("type") != "value_error"):
        where = ".".join(str(part) for part in error.get("loc", ())[1:]) or "request body"
        if error.get("type") == "json_invalid":
            where = "request body"
        text = f"{where}: {error.get('msg', 'invalid')}"
        value = error.get("input")
        if isinstance(value, str | int | float | bool) and error.get("type") != "json_invalid":
            text += f" (got {_truncate(json.dumps(value), MAX_INPUT)})"
        if text not in problems:
            problems.append(text)
    shown = problems[:MAX_PROBLEMS]
    more = len(problems) - len(shown)
    return "invalid request: " + "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(400, describe_validation(exc.errors()))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail, default=str)
    return error_response(exc.status_code, detail, headers=exc.headers)


def _stac_error(status: int) -> Any:
    """stac-fastapi's own exceptions, in the same shape (and without its error-level log with
    a traceback for every 404)."""

    async def handler(request: Request, exc: Exception) -> JSONResponse:
        return error_response(status, str(exc))

    return handler


def install_error_handlers(app: FastAPI) -> None:
    """Answer every HTTP error, validation error and stac-fastapi error as ``{code,
    description}`` (replacing the handlers FastAPI and stac-fastapi installed)."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for exc, status in ((NotFoundError, 404), (ConflictError, 409), (InvalidQueryParameter, 400)):
        app.add_exception_handler(exc, _stac_error(status))
