"""A job's submit (POST .../jobs with a JSON body: one for every job) answered past the app's
router and FastAPI's dependency solving, as a status poll is (api/job_poll): the same key
check and rate limit (`caller_of`), the same answer in the same bytes, every error answered
by the app's own handlers. Only a submit the route would accept as it is: a body that is
not JSON, not a valid request, or may hold a lone surrogate, a query (`wait`) or headers it
would look at twice go to the route, the body read here handed on as it came."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comfyfleet.api.job_poll import answer_error, app_path

Submitted = TypeVar("Submitted")
# The request the route would validate from a JSON body and an Idempotency-Key header, or
# None for the route to answer. Pure: nothing is done for a body the route will see.
Parse = Callable[[bytes, str | None], Submitted | None]
# The route's answer to a parsed request; raises what the route's body raises.
Answer = Callable[[Request, Submitted], Awaitable[Response]]

IDEMPOTENCY_KEY = b"idempotency-key"
CONTENT_TYPE = b"content-type"


class SubmitRoute(Generic[Submitted]):
    """Pure ASGI middleware: a POST of `jobs` (no query) with a body of `application/json`
    that `parse` takes is answered by `answer`; every other request goes to `app`."""

    def __init__(self, app: ASGIApp, *, jobs: str, errors: FastAPI,
                 parse: Parse[Submitted], answer: Answer[Submitted]) -> None:
        self.app = app
        self.jobs = jobs
        self.errors = errors
        self.parse = parse
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

        key = headers.get(IDEMPOTENCY_KEY)
        submitted = self.parse(bytes(body), None if key is None else key.decode("latin-1")) \
            if message["type"] == "http.request" else None
        if submitted is None:
            await self.app(scope, replay, send)
            return
        request = Request(scope, replay)
        try:
            response = await self.answer(request, submitted)
        except Exception as exc:
            await answer_error(self.errors, request, exc, send)
            return
        await response(scope, replay, send)

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
