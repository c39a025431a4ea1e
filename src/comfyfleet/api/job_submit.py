"""A job's submit (POST .../jobs with a JSON body: one for every job) answered past the app's
router and FastAPI's dependency solving, as a status poll is (api/job_poll): the same key
check and rate limit (`caller_of`), the same answer in the same bytes, every error answered
by the app's own handlers. Only a submit the route would accept as it is: a body that is
not JSON, not a valid request, or may hold a lone surrogate, a query (`wait`) or headers it
would look at twice go to the route, the body read here handed on as it came. Shared by the
service app's v1 route and the v2 app's (api/v2)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comfyfleet import json_codec
from comfyfleet.api.job_poll import answer_error, app_path
from comfyfleet.api.json_text import may_hold_lone_surrogate

Submitted = TypeVar("Submitted", bound=BaseModel)
# The route's answer to its body parameter and Idempotency-Key header as it would read them;
# raises what the route's body raises.
Answer = Callable[[Request, Submitted, str | None], Awaitable[Response]]

IDEMPOTENCY_KEY = b"idempotency-key"
CONTENT_TYPE = b"content-type"


class SubmitRoute(Generic[Submitted]):
    """Pure ASGI middleware: a POST of `jobs` (no query) with a body of `application/json`
    that the route would take as its `body` parameter, and an Idempotency-Key header (if any)
    of at most `key_length` characters, is answered by `answer`, its errors by the handlers
    of `errors` (the app whose route it stands in for); every other request goes to `app`."""

    def __init__(self, app: ASGIApp, *, jobs: str, errors: FastAPI, body: type[Submitted],
                 key_length: int, answer: Answer[Submitted]) -> None:
        self.app = app
        self.jobs = jobs
        self.errors = errors
        self.body = body
        self.key_length = key_length
        self.answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = self._headers(scope)
        if headers is None or headers.get(CONTENT_TYPE) != b"application/json":
            await self.app(scope, receive, send)
            return
        received: list[Message] = []
        body = bytearray()
        while True:  # as Starlette reads it (over MAX_REQUEST_BYTES: BodyLimitMiddleware's)
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return received.pop(0) if received else await receive()

        sent_key = headers.get(IDEMPOTENCY_KEY)
        key = None if sent_key is None else sent_key.decode("latin-1")  # as Starlette reads it
        submitted = self._submitted(bytes(body), key) \
            if message["type"] == "http.request" else None
        if submitted is None:
            await self.app(scope, replay, send)
            return
        request = Request(scope, replay)
        try:
            response = await self.answer(request, submitted, key)
        except Exception as exc:
            await answer_error(self.errors, request, exc, send)
            return
        await response(scope, replay, send)

    def _submitted(self, body: bytes, key: str | None) -> Submitted | None:
        """The route's body parameter read from a JSON `body`, or None when the route would
        refuse it or the Idempotency-Key `key` (or `refuse_lone_surrogates` must look: rarely),
        for the route to answer."""
        if key is not None and not 1 <= len(key) <= self.key_length:
            return None
        if may_hold_lone_surrogate(body):
            return None
        try:  # as FastAPI reads a JSON body (faster), then validates the route's body parameter
            return self.body.model_validate(json_codec.loads(body))
        except Exception:  # whatever it is, the route answers it
            return None

    def _headers(self, scope: Scope) -> dict[bytes, bytes] | None:
        """The content type and idempotency key of a POST of `jobs` without a query; None for
        any other request, or one sending either header twice."""
        if scope["type"] != "http" or scope.get("method") != "POST" \
                or scope.get("query_string") or app_path(scope) != self.jobs:
            return None
        found: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in (CONTENT_TYPE, IDEMPOTENCY_KEY):
                if name in found:
                    return None
                found[name] = value
        return found
