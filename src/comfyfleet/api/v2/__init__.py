"""The Comfy API v2 (DESIGN §4): the public contract of Comfy's official SDKs, so an SDK user
changes only COMFY_BASE_URL to run on the fleet. An app of its own, mounted at /api/v2 and
sharing the service's state, so that every error there keeps the spec's envelope."""

from __future__ import annotations

from fastapi import Depends, FastAPI

from comfyfleet.api.json_text import refuse_lone_surrogates
from comfyfleet.api.security import authenticate
from comfyfleet.api.v2 import assets, jobs
from comfyfleet.api.v2.errors import install_v2_error_handlers

MOUNT = "/api/v2"


def mount_v2(app: FastAPI) -> None:
    v2 = FastAPI(title="comfyfleet: Comfy API v2", version="2.0.0",
                 dependencies=[Depends(refuse_lone_surrogates)])
    v2.state = app.state  # the running services, the keys
    install_v2_error_handlers(v2)
    v2.include_router(jobs.public)
    secured = [Depends(authenticate)]
    v2.include_router(jobs.router, dependencies=secured)
    v2.include_router(assets.router, dependencies=secured)
    app.mount(MOUNT, v2)
