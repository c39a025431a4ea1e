"""Comfy API v2 assets. Every job output is an asset, named by its job and its place among the
job's outputs: its record, and its bytes (local storage: served, with Range; S3: a redirect
to a fresh presigned URL)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, RedirectResponse, Response

from comfyfleet.api.outputs import stored_file
from comfyfleet.api.security import Caller, CallerDep
from comfyfleet.api.v2 import render
from comfyfleet.api.v2.errors import V2Error
from comfyfleet.jobs.models import Job
from comfyfleet.services import Services, ServicesDep
from comfyfleet.storage import LocalStorage

router = APIRouter(tags=["assets"])


async def _output(svc: Services, caller: Caller, asset_id: str) -> tuple[Job, int]:
    """The job and output index an output's asset id names; 404 for anything else."""
    job_part, _, index_part = asset_id.partition(".")
    try:
        job_id, index = uuid.UUID(job_part), int(index_part)
    except ValueError:
        raise V2Error(404, "not_found", f"no asset {asset_id}") from None
    job = await svc.repository.get(job_id)
    if job is None or not caller.sees(job) or not 0 <= index < len(job.outputs):
        raise V2Error(404, "not_found", f"no asset {asset_id}")
    return job, index


@router.get("/assets/{asset_id}", summary="An asset's record, with a fresh URL")
async def get_asset(asset_id: str, request: Request, svc: ServicesDep, caller: CallerDep
                    ) -> dict[str, Any]:
    job, index = await _output(svc, caller, asset_id)
    output = (await render.outputs(svc, job, render.origin(request)))[index]
    return {"id": asset_id, "hash": output["hash"], "size_bytes": output["size_bytes"],
            "content_type": output["content_type"], "file_path": output["name"],
            "created_at": (job.finished_at or job.created_at).isoformat(),
            "url": output["url"], "url_expires_at": output["url_expires_at"],
            "expires_at": None, "job_id": str(job.id)}


@router.get("/assets/{asset_id}/content", summary="An asset's bytes",
            response_class=Response)
async def get_asset_content(asset_id: str, svc: ServicesDep, caller: CallerDep) -> Response:
    job, index = await _output(svc, caller, asset_id)
    output = job.outputs[index]
    key = output.get("key")
    if not isinstance(key, str):
        return PlainTextResponse(str(output.get("text", "")))
    if isinstance(svc.storage, LocalStorage):
        return await stored_file(svc.storage, key, output.get("content_type"),
                                 output.get("filename"))
    url = await svc.storage.url(key)
    assert url is not None
    return RedirectResponse(url, status_code=302)
