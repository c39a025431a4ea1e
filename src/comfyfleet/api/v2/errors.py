"""The Comfy API v2 error envelope, `{"error": {"code", "message", "details"}}`, for every
error under /api/v2: its own, the shared security's, FastAPI's and any unexpected one."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from comfyfleet.api.errors import DATABASE_ERRORS, ApiError, database_unavailable
from comfyfleet.db import NotStorable

log = logging.getLogger(__name__)

# The spec's codes for the statuses the shared parts (keys, rate limit) answer with.
_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found"}


class V2Error(Exception):
    def __init__(self, status: int, code: str, message: str, *,
                 details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details
        self.headers = headers


def envelope(status: int, code: str, message: str, details: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "details": details}}
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers)


async def _v2_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, V2Error)
    return envelope(exc.status, exc.code, str(exc), exc.details,
                    exc.headers)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    extra = {k: v for k, v in exc.body.items() if k not in ("type", "message")}
    details = {"reason": exc.body["type"], **extra}
    return envelope(exc.status, _CODES.get(exc.status, exc.body["type"]), str(exc), details,
                    exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [{"field": ".".join(str(part) for part in error["loc"] if part != "body"),
                 "message": error["msg"]} for error in exc.errors()]
    summary = "; ".join(f"{p['field'] or 'body'}: {p['message']}" for p in problems)
    return envelope(422, "invalid_request", summary, {"problems": problems})


# The job's columns that v2 requests name otherwise.
_V2_FIELDS = {"prompt": "workflow", "labels": "metadata"}


async def _not_storable(_: Request, exc: Exception) -> JSONResponse:
    """A value the database refuses (a NUL character), named as the v2 request has it."""
    assert isinstance(exc, NotStorable)
    column, dot, rest = exc.field.partition(".")
    field = _V2_FIELDS.get(column, column) + dot + rest
    return envelope(422, "invalid_request", f"{field}: {exc.problem}",
                    {"problems": [{"field": field, "message": exc.problem}]})


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    code = _CODES.get(exc.status_code, "method_not_allowed" if exc.status_code == 405
                      else "http_error")
    return envelope(exc.status_code, code, str(exc.detail))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return envelope(500, "internal_error", "internal error; see the service log")


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    error = database_unavailable(request, exc)
    return await (_unexpected(request, exc) if error is None else _api_error(request, error))


def install_v2_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(V2Error, _v2_error)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(NotStorable, _not_storable)
    app.add_exception_handler(HTTPException, _http_error)
    for database_error in DATABASE_ERRORS:  # a 503 in this envelope while it is away
        app.add_exception_handler(database_error, _database_error)
    app.add_exception_handler(Exception, _unexpected)
