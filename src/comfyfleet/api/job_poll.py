"""A job's status poll (GET .../jobs/{job_id}: what a client sends every few milliseconds while
it waits for a job) answered past its app's router and FastAPI's dependency solving, which
took about a third of the poll's CPU: the same key check and rate limit (`caller_of`), the
same answer in the same bytes, and every error answered by the app's own handlers. Shared by
the service app's v1 route and the v2 app's (api/v2)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request, Response
from pydantic import TypeAdapter
from starlette.types import ASGIApp, Receive, Scope, Send

from comfyfleet.api.depends import services
from comfyfleet.api.security import Caller, caller_of
from comfyfleet.services import Services

# What a poll answers: the job object of `job_id` (the path's last segment, as sent) for the
# caller, built as the route builds it. Raises what the route's body raises.
Answer = Callable[[Request, Services, Caller, str], Awaitable[dict[str, Any]]]

# How the route's answer is written: FastAPI serializes a route's `dict[str, Any]` with
# pydantic's JSON serializer.
_JOB_JSON = TypeAdapter(dict[str, Any])
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def app_path(scope: Scope) -> str:
    """The request's path within the app, as a router matches it (behind a root path too)."""
    root_path = scope.get("root_path", "")
    path: str = scope["path"]
    return path[len(root_path):] if root_path and path.startswith(root_path + "/") else path


def is_job_poll(scope: Scope, path: str, jobs: str) -> bool:
    """Whether the request is a GET of `path` = `jobs` + one segment (as the app's router
    would match /jobs/{job_id}) without a JSON content type (the apps read such a body for
    `refuse_lone_surrogates`, a dependency of every route)."""
    if scope.get("method") != "GET" or not path.startswith(jobs) or "/" in path[len(jobs):] \
            or len(path) == len(jobs):
        return False
    content_type = next((value for name, value in scope["headers"] if name == b"content-type"),
                        b"")
    return b"json" not in content_type.lower()


class JobPoll:
    """A job's status poll as an ASGI app of its own, answered by `answer`; an error by the
    handlers of `app`, the app whose route it stands in for."""

    def __init__(self, app: FastAPI, answer: Answer) -> None:
        self._app = app
        self._answer = answer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            caller = await caller_of(request)  # first, as the route's dependencies go
            svc = await services(request)
            job = await self._answer(request, svc, caller, scope["path"].rpartition("/")[2])
        except Exception as exc:
            await answer_error(self._app, request, exc, send)
            return
        await job_response(job)(scope, receive, send)


def job_response(job: dict[str, Any], status_code: int = 200) -> Response:
    """A route's answer of `job`, in the bytes FastAPI writes for a route's `dict[str, Any]`
    (pydantic's JSON): orjson's where it writes it (the same bytes, numbers that are not
    finite as null too, in a tenth of the time), else pydantic's (an integer beyond 64 bits,
    a key that is not a string)."""
    try:
        body = orjson.dumps(job)
    except orjson.JSONEncodeError:
        body = _JOB_JSON.dump_json(job)
    return Response(body, status_code=status_code, media_type="application/json")


async def answer_error(app: FastAPI, request: Request, exc: Exception, send: Send) -> None:
    """As `app` answers `exc`: by its handler for the nearest class; the catch-all's (an
    unexpected error) answers and raises it again, as Starlette's does."""
    handlers = app.exception_handlers
    handled = next((cls for cls in type(exc).__mro__ if cls in handlers), None)
    if handled is None:
        raise exc
    response = handlers[handled](request, exc)
    if inspect.isawaitable(response):
        response = await response
    await response(request.scope, request.receive, send)
    if handled is Exception:
        raise exc


class JobPollRoute:
    """Pure ASGI middleware: a status poll of `jobs` + a job id goes to `poll`; every other
    request to `app`. Only a job id in the canonical form of a UUID (the route's parameter):
    any other goes to the route, which answers it (422) as FastAPI validates it."""

    def __init__(self, app: ASGIApp, *, jobs: str, poll: ASGIApp) -> None:
        self.app = app
        self.jobs = jobs
        self.poll = poll

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = app_path(scope)
            if is_job_poll(scope, path, self.jobs) and _UUID.fullmatch(path[len(self.jobs):]):
                await self.poll(scope, receive, send)
                return
        await self.app(scope, receive, send)
