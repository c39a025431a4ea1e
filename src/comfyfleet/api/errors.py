"""Every error is JSON in the envelope of the API surface it concerns, with the right status
code: `{"error": {"type", "message", ...}}` for the service's own API, the Comfy API v2's
`{"error": {"code", "message", "details"}}` under /api/v2 (api/v2/errors.py). One set of
handlers answers for both; an `Envelope` holds what differs between them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
    """An error a route answers with: `type` says what it is, `extra` adds what the client
    needs to act on it."""

    def __init__(
        self, status: int, type_: str, message: str, *,
        headers: dict[str, str] | None = None, **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.extra = extra
        self.headers = headers


@dataclass(frozen=True)
class Answer:
    """An error as it is sent: `code` is the service API's `type` and v2's `code`, `details`
    the service API's further members and v2's `details`."""

    status: int
    code: str
    message: str
    details: dict[str, Any] | None = None
    headers: dict[str, str] | None = None


def _own_body(answer: Answer) -> dict[str, Any]:
    return {"type": answer.code, "message": answer.message, **(answer.details or {})}


def _own_answer(error: ApiError) -> Answer:
    return Answer(error.status, error.type, str(error), error.extra, error.headers)


@dataclass(frozen=True)
class Envelope:
    """What differs between the error bodies of two API surfaces."""

    body: Callable[[Answer], dict[str, Any]]  # the `error` member
    api_error: Callable[[ApiError], Answer]  # the shared parts' errors (keys, rate limit, ...)
    http_codes: Mapping[int, str] = field(default_factory=dict)  # else "http_error"
    # The job's columns that this surface's requests name otherwise.
    field_names: Mapping[str, str] = field(default_factory=dict)


OWN = Envelope(_own_body, _own_answer)


def error_response(
    status: int, type_: str, message: str, *, headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """An error of the service's own API, as middleware outside the routes sends it."""
    return respond(OWN, Answer(status, type_, message, extra, headers))


def respond(envelope: Envelope, answer: Answer) -> JSONResponse:
    return JSONResponse(jsonable_encoder({"error": envelope.body(answer)}),
                        status_code=answer.status, headers=answer.headers)


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


class _Handlers:
    """The exception handlers of one API surface."""

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope

    def _respond(self, answer: Answer) -> JSONResponse:
        return respond(self.envelope, answer)

    async def api_error(self, _: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return self._respond(self.envelope.api_error(exc))

    async def validation_error(self, _: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = [
            {
                "field": ".".join(str(part) for part in error["loc"] if part != "body"),
                "message": error["msg"],
            }
            for error in exc.errors()
        ]
        summary = "; ".join(f"{p['field'] or 'body'}: {p['message']}" for p in problems)
        return self._respond(Answer(422, "invalid_request", summary, {"problems": problems}))

    async def not_storable(self, _: Request, exc: Exception) -> JSONResponse:
        """A value the database refuses (a NUL character): the client's input, named as the
        surface's requests name it."""
        assert isinstance(exc, NotStorable)
        column, dot, rest = exc.field.partition(".")
        name = self.envelope.field_names.get(column, column) + dot + rest
        return self._respond(Answer(422, "invalid_request", f"{name}: {exc.problem}",
                                    {"problems": [{"field": name, "message": exc.problem}]}))

    async def http_error(self, _: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = self.envelope.http_codes.get(exc.status_code, "http_error")
        return self._respond(Answer(exc.status_code, code, str(exc.detail)))

    async def unexpected(self, _: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return self._respond(Answer(500, "internal_error", "internal error; see the service log"))

    async def database_error(self, request: Request, exc: Exception) -> JSONResponse:
        error = database_unavailable(request, exc)
        return await (self.unexpected(request, exc) if error is None
                      else self.api_error(request, error))


def install_error_handlers(app: FastAPI, envelope: Envelope = OWN) -> None:
    handlers = _Handlers(envelope)
    app.add_exception_handler(ApiError, handlers.api_error)
    app.add_exception_handler(RequestValidationError, handlers.validation_error)
    app.add_exception_handler(NotStorable, handlers.not_storable)
    app.add_exception_handler(HTTPException, handlers.http_error)
    # By class, so they are answered inside the app: the catch-all's 500 is sent by the
    # outermost middleware, which re-raises, and the server then closes the connection.
    for database_error in DATABASE_ERRORS:
        app.add_exception_handler(database_error, handlers.database_error)
    app.add_exception_handler(Exception, handlers.unexpected)
