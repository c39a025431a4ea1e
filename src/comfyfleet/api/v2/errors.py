"""The Comfy API v2 error envelope, `{"error": {"code", "message", "details"}}`, for every
error under /api/v2: its own, the shared security's, FastAPI's and any unexpected one (the
handlers are api/errors.py's, in this envelope)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from comfyfleet.api.errors import Answer, ApiError, Envelope, install_error_handlers, respond

# The spec's codes for the statuses the shared parts (keys, rate limit) answer with.
_CODES = {401: "unauthorized", 403: "forbidden", 404: "not_found"}


class V2Error(Exception):
    def __init__(self, status: int, code: str, message: str, *,
                 details: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.answer = Answer(status, code, message, details, headers)


def _body(answer: Answer) -> dict[str, Any]:
    return {"code": answer.code, "message": answer.message, "details": answer.details}


def _shared(error: ApiError) -> Answer:
    """A shared part's error: its type is the reason, under the spec's code for its status."""
    return Answer(error.status, _CODES.get(error.status, error.type), str(error),
                  {"reason": error.type, **error.extra}, error.headers)


V2 = Envelope(
    _body, _shared, http_codes={**_CODES, 405: "method_not_allowed"},
    # The job's columns that v2 requests name otherwise.
    field_names={"prompt": "workflow", "labels": "metadata"})


async def _v2_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, V2Error)
    return respond(V2, exc.answer)


def install_v2_error_handlers(app: FastAPI) -> None:
    install_error_handlers(app, V2)
    app.add_exception_handler(V2Error, _v2_error)
