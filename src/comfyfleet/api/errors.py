"""Every error is JSON `{"error": {"type", "message", ...}}` with the right status code."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException

from comfyfleet.db import DatabaseUnreachable, NotStorable, unavailable

log = logging.getLogger(__name__)

# What a request the database could not serve tells the client to wait.
DATABASE_RETRY_SECONDS = 5
# What the database layer raises; `database_unavailable` says which of them are an outage.
DATABASE_ERRORS = (SQLAlchemyError, DatabaseUnreachable, asyncpg.PostgresError)


class ApiError(Exception):
    def __init__(
        self, status: int, type_: str, message: str, *,
        headers: dict[str, str] | None = None, **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers
        self.body = {"type": type_, "message": message, **extra}


def error_response(
    status: int, type_: str, message: str, *, headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body = {"error": {"type": type_, "message": message, **extra}}
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(jsonable_encoder({"error": exc.body}), status_code=exc.status,
                        headers=exc.headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [
        {
            "field": ".".join(str(part) for part in error["loc"] if part != "body"),
            "message": error["msg"],
        }
        for error in exc.errors()
    ]
    summary = "; ".join(f"{p['field'] or 'body'}: {p['message']}" for p in problems)
    return error_response(422, "invalid_request", summary, problems=problems)


async def _not_storable(_: Request, exc: Exception) -> JSONResponse:
    """A value the database refuses (a NUL character): the client's input, named."""
    assert isinstance(exc, NotStorable)
    return error_response(422, "invalid_request", str(exc),
                          problems=[{"field": exc.field, "message": exc.problem}])


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, "http_error", str(exc.detail))


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "internal error; see the service log")


def database_unavailable(request: Request, exc: Exception) -> ApiError | None:
    """The answer to a request that needed the database while it is away (down, restarting,
    every connection busy), whichever route and API surface it is: a 503 to retry. None when
    `exc` is another database error, a bug."""
    if not unavailable(exc):
        return None
    log.warning("%s %s: database unavailable: %s", request.method, request.url.path,
                str(exc).partition("\n")[0])  # not the statement and its parameters
    return ApiError(
        503, "database_unavailable",
        f"the database is not available right now; retry in {DATABASE_RETRY_SECONDS} s",
        retry_after=DATABASE_RETRY_SECONDS,
        headers={"Retry-After": str(DATABASE_RETRY_SECONDS)})


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    error = database_unavailable(request, exc)
    return await (_unexpected(request, exc) if error is None else _api_error(request, error))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(NotStorable, _not_storable)
    app.add_exception_handler(HTTPException, _http_error)
    # By class, so they are answered inside the app: the catch-all's 500 is sent by the
    # outermost middleware, which re-raises, and the server then closes the connection.
    for database_error in DATABASE_ERRORS:
        app.add_exception_handler(database_error, _database_error)
    app.add_exception_handler(Exception, _unexpected)
