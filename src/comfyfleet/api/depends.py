"""The running service's parts (services.py), as FastAPI hands them to a route."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from comfyfleet.services import Services


async def services(request: Request) -> Services:
    """FastAPI dependency: the running service's parts. A coroutine, though it never waits:
    FastAPI runs a plain function dependency in a worker thread, a thread hop per request."""
    found = request.app.state.services
    assert isinstance(found, Services)
    return found


ServicesDep = Annotated[Services, Depends(services)]
