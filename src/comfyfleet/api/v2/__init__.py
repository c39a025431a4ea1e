"""The Comfy API v2 (DESIGN §4): the public contract of Comfy's official SDKs, so an SDK user
changes only COMFY_BASE_URL to run on the fleet. An app of its own at /api/v2, sharing the
service's state, so that every error there keeps the spec's envelope."""

from __future__ import annotations

from fastapi import Depends, FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from comfyfleet.api import telemetry
from comfyfleet.api.job_poll import JobPoll, app_path, is_job_poll
from comfyfleet.api.job_submit import SubmitRoute
from comfyfleet.api.json_text import refuse_lone_surrogates
from comfyfleet.api.security import authenticate
from comfyfleet.api.v2 import assets, jobs
from comfyfleet.api.v2.errors import install_v2_error_handlers
from comfyfleet.api.v2.idempotency import IDEMPOTENCY_KEY_LENGTH

MOUNT = "/api/v2"


class V2Routes:
    """Pure ASGI middleware: a request under MOUNT goes straight to the v2 app, as a mount
    would pass it (MOUNT becomes its root path), but past the service app's exception
    middleware and its router, which would first try every route of its own (GET
    /api/v2/health: 1.18 ms of CPU through the mount, 1.04 past it); and a status poll (GET
    /jobs/{job_id}) past the v2 app's stack too, to `job_poll` (api/job_poll.py), unless it
    has a JSON body, which the v2 app checks first. The middlewares outside this one (CORS,
    the body limits) wrap both as they wrap the service app."""

    def __init__(self, app: ASGIApp, *, v2: ASGIApp, job_poll: ASGIApp) -> None:
        self.app = app
        self.v2 = v2
        self.job_poll = job_poll

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path = app_path(scope)
            if path.startswith(MOUNT + "/"):
                root_path = scope.get("root_path", "")
                inner = {**scope, "app_root_path": scope.get("app_root_path", root_path),
                         "root_path": root_path + MOUNT}
                poll = is_job_poll(scope, path, MOUNT + "/jobs/")
                await (self.job_poll if poll else self.v2)(inner, receive, send)
                return
        await self.app(scope, receive, send)


def mount_v2(app: FastAPI) -> None:
    """The v2 app under MOUNT. Called before the middlewares that must wrap it too are added
    (each is added outside those before it)."""
    v2 = FastAPI(title="comfyfleet: Comfy API v2", version="2.0.0",
                 dependencies=[Depends(refuse_lone_surrogates)], telemetry=telemetry())
    v2.state = app.state  # the running services, the keys
    install_v2_error_handlers(v2)
    v2.include_router(jobs.public)
    secured = [Depends(authenticate)]
    v2.include_router(jobs.router, dependencies=secured)
    v2.include_router(assets.router, dependencies=secured)
    # A job's submit past the v2 app's router and dependency solving too, for a body the
    # route would take as it is (api/job_submit.py).
    submit = SubmitRoute[jobs.JobRequest](
        v2, jobs="/jobs", errors=v2, body=jobs.JobRequest, key_length=IDEMPOTENCY_KEY_LENGTH,
        answer=jobs.submit_answer)
    app.add_middleware(V2Routes, v2=submit, job_poll=JobPoll(v2, jobs.job_answer))
