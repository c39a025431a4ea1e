"""Job outputs: one file by index, and the signed `/files/` URLs of local storage (DESIGN §6)."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response

from comfyfleet.api.depends import ServicesDep
from comfyfleet.api.errors import ApiError
from comfyfleet.api.security import CallerDep, visible_job
from comfyfleet.storage import LocalStorage, StorageError

router = APIRouter(tags=["jobs"])
files_router = APIRouter(tags=["files"])


@router.get("/jobs/{job_id}/outputs/{index}", summary="One output of a job",
            response_class=Response)
async def get_output(
    job_id: uuid.UUID, index: int, svc: ServicesDep, caller: CallerDep
) -> Response:
    """S3: a redirect to a presigned URL with at least half of S3_URL_TTL left. Local
    storage: the file itself. A text output (e.g. from PreviewAny): the text."""
    job = await visible_job(svc, caller, job_id)
    if not 0 <= index < len(job.outputs):
        raise ApiError(404, "output_not_found",
                       f"job {job_id} has {len(job.outputs)} outputs (status {job.status})")
    output = job.outputs[index]
    key = output.get("key")
    if not isinstance(key, str):
        return PlainTextResponse(str(output.get("text", "")))
    if isinstance(svc.storage, LocalStorage):
        return await stored_file(svc.storage, key, output.get("content_type"),
                                 output.get("filename"))
    url = await svc.storage.url(key)
    assert url is not None
    return RedirectResponse(url, status_code=307)


@files_router.get("/files/{key:path}", summary="A stored output, through a signed URL",
                  response_class=Response)
async def get_file(
    key: str, svc: ServicesDep, expires: int = Query(...), signature: str = Query(...)
) -> Response:
    storage = svc.storage
    if not isinstance(storage, LocalStorage) or not storage.verify(key, expires, signature):
        raise ApiError(403, "bad_signature", "this URL is not valid or has expired")
    return await stored_file(storage, key, None, None)


async def stored_file(
    storage: LocalStorage, key: str, content_type: object, filename: object
) -> Response:
    """A file of local storage, with Range requests answered (206)."""
    try:
        path = storage.path_of(key)
    except StorageError as exc:
        raise ApiError(404, "output_not_found", str(exc)) from exc
    if not await asyncio.to_thread(path.is_file):
        raise ApiError(404, "output_not_found", f"{key} is not in storage")
    return FileResponse(
        path,
        media_type=content_type if isinstance(content_type, str) else None,
        filename=filename if isinstance(filename, str) else None,
        content_disposition_type="inline",
    )
