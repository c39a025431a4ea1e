"""Workflow catalog routes: list, describe, reload (DESIGN §3, §4)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from comfyfleet.api.depends import ServicesDep
from comfyfleet.api.errors import ApiError
from comfyfleet.api.security import AdminDep
from comfyfleet.services import Services
from comfyfleet.workflows.catalog import BrokenWorkflow, UnknownWorkflow, Workflow

router = APIRouter(tags=["workflows"])


def _describe(svc: Services, workflow: Workflow) -> dict[str, Any]:
    prompt = workflow.preview()
    runs_on = [
        session.name for session in svc.fleet.sessions
        if session.capabilities is not None and session.capabilities.can_run(prompt)
    ]
    return {**workflow.to_json(), "backends": runs_on}


def _catalog(svc: Services) -> dict[str, Any]:
    return {
        "workflows": [_describe(svc, w) for _, w in sorted(svc.catalog.workflows.items())],
        "errors": svc.catalog.errors,
    }


@router.get("/workflows", summary="Every workflow, and the files that could not be loaded")
async def list_workflows(svc: ServicesDep) -> dict[str, Any]:
    return _catalog(svc)


def workflow_at(svc: Services, name: str) -> Workflow:
    """The workflow a path names; 404 saying why there is none (its file's load error)."""
    try:
        return svc.catalog.find(name)
    except BrokenWorkflow as exc:
        raise ApiError(404, "workflow_broken", str(exc)) from exc
    except UnknownWorkflow as exc:
        raise ApiError(404, "workflow_not_found", str(exc)) from exc


@router.get("/workflows/{name}", summary="One workflow's parameters and where it can run")
async def get_workflow(name: str, svc: ServicesDep) -> dict[str, Any]:
    return _describe(svc, workflow_at(svc, name))


@router.post("/workflows/reload", summary="Read the workflows directory again now",
             dependencies=[AdminDep])
async def reload_workflows(svc: ServicesDep) -> dict[str, Any]:
    await svc.reload_catalog()
    return _catalog(svc)
