"""Comfy API v2 assets: uploads (blake3 computed here, deduplicated, idempotent under a key),
mints over bytes already kept, existence by hash, records with fresh URLs and the bytes (local
storage: served, with Range; S3: a redirect to a presigned URL), deletion of records.
Job outputs are assets too."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from comfyfleet.api.depends import ServicesDep
from comfyfleet.api.outputs import stored_file
from comfyfleet.api.security import Caller, CallerDep
from comfyfleet.api.v2 import render
from comfyfleet.api.v2.errors import V2Error
from comfyfleet.api.v2.idempotency import IdempotencyKey
from comfyfleet.intake import in_flight
from comfyfleet.intake.assets import (
    Asset,
    AssetInUse,
    AssetStore,
    HashMismatch,
    Uploaded,
    UploadKeyReuse,
    output_ref,
    parse_hash,
)
from comfyfleet.intake.errors import KeyInFlight
from comfyfleet.jobs.models import Job, utcnow
from comfyfleet.services import Services
from comfyfleet.storage import LocalStorage, StorageError

router = APIRouter(tags=["assets"])
# The uploads' idempotency keys, apart from the jobs'.
UPLOADS = "uploads"


def asset_store(svc: Services) -> AssetStore:
    return AssetStore(svc.engine, svc.storage, svc.settings.s3_prefix)


async def _asset_json(svc: Services, asset: Asset, origin: str,
                      created_new: bool | None = None) -> dict[str, Any]:
    signed = await svc.storage.signed_url(asset_store(svc).key(asset))
    # A URL of the API's own (/content) signs afresh when it is fetched.
    expires = (signed.expires_at if signed is not None
               else utcnow() + timedelta(seconds=svc.settings.s3_url_ttl))
    rendered = {
        "id": str(asset.id), "hash": asset.tagged_hash, "size_bytes": asset.size_bytes,
        "content_type": asset.content_type, "file_path": asset.file_path,
        "created_at": asset.created_at.isoformat(),
        "url": signed.url if signed is not None
        else f"{origin}{render.PREFIX}/assets/{asset.id}/content",
        "url_expires_at": expires.isoformat(), "expires_at": None, "job_id": None,
    }
    if created_new is not None:
        rendered["created_new"] = created_new
    return rendered


@router.post("/assets", summary="Upload an asset (multipart)", status_code=201)
async def post_asset(request: Request, svc: ServicesDep, caller: CallerDep,
                     idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Fields: `file`, `content_type`, `file_path`, optional `expected_hash` and `tags`.
    201: new bytes stored; 200: the bytes were kept already (deduplicated), or a retry under
    the `Idempotency-Key` of an earlier upload (its asset, with `Idempotency-Replayed: true`);
    the same key for other bytes, name, type or tags within 24 hours is a 422; while an
    upload under the key is still being received or stored, another is a 409."""
    try:
        async with in_flight.holding(svc.repository, UPLOADS, caller.key_hash,
                                     idempotency_key):
            return await _upload(request, svc, caller, idempotency_key)
    except KeyInFlight as exc:
        raise V2Error(409, "idempotency_conflict", str(exc),
                      headers={"Retry-After": str(exc.retry_after)}) from exc


async def _upload(request: Request, svc: Services, caller: Caller,
                  idempotency_key: str | None) -> JSONResponse:
    try:
        form = await request.form(max_part_size=svc.settings.max_upload_bytes)
    except MultiPartException as exc:
        raise V2Error(422, "invalid_request", f"expected a multipart/form-data body: {exc}"
                      ) from exc
    file = form.get("file")
    content_type, file_path = form.get("content_type"), form.get("file_path")
    expected_hash = form.get("expected_hash")
    if not isinstance(file, UploadFile):
        raise V2Error(422, "invalid_request", "the file part is missing",
                      details={"field": "file"})
    for name, value in (("content_type", content_type), ("file_path", file_path)):
        if not isinstance(value, str) or not value:
            raise V2Error(422, "invalid_request", f"the {name} field is missing",
                          details={"field": name})
    assert isinstance(content_type, str) and isinstance(file_path, str)
    tags = [tag for tag in form.getlist("tags") if isinstance(tag, str)]
    try:
        asset, uploaded = await asset_store(svc).add(
            file, content_type=content_type, file_path=file_path, tags=tags,
            expected_hash=expected_hash if isinstance(expected_hash, str) else None,
            api_key_hash=caller.key_hash, idempotency_key=idempotency_key)
    except HashMismatch as exc:
        raise V2Error(409, "hash_mismatch", str(exc)) from exc
    except UploadKeyReuse as exc:
        raise V2Error(422, "idempotency_key_reuse", str(exc)) from exc
    except StorageError as exc:
        raise _storage_unavailable(exc) from exc
    finally:
        await form.close()
    new = uploaded is Uploaded.STORED
    headers = {"Idempotency-Replayed": "true"} if uploaded is Uploaded.REPLAYED else None
    return JSONResponse(await _asset_json(svc, asset, render.origin(request), new),
                        status_code=201 if new else 200, headers=headers)


def _storage_unavailable(exc: StorageError) -> V2Error:
    return V2Error(503, "storage_unavailable", f"the asset store cannot be used now: {exc}")


class FromHash(BaseModel):
    hash: str
    file_path: str | None = Field(default=None, max_length=1000)
    tags: list[str] | None = None


@router.post("/assets/from-hash", summary="Mint an asset over bytes already kept")
async def asset_from_hash(body: FromHash, request: Request, svc: ServicesDep,
                          caller: CallerDep) -> JSONResponse:
    digest = parse_hash(body.hash)
    minted = None if digest is None else await asset_store(svc).mint(
        digest, file_path=body.file_path, tags=body.tags, api_key_hash=caller.key_hash)
    if minted is None:
        raise V2Error(404, "blob_not_found", f"no blob {body.hash} this caller may use")
    asset, new = minted
    return JSONResponse(await _asset_json(svc, asset, render.origin(request)),
                        status_code=201 if new else 200)


@router.head("/assets/by-hash/{tagged_hash}", summary="Whether the caller may mint from a blob")
async def head_asset_by_hash(tagged_hash: str, svc: ServicesDep, caller: CallerDep
                             ) -> Response:
    digest = parse_hash(tagged_hash)
    found = digest is not None and await asset_store(svc).has(digest, caller.key_hash)
    return Response(status_code=200 if found else 404)


async def _uploaded(svc: Services, caller: Caller, asset_id: uuid.UUID) -> Asset:
    asset = await asset_store(svc).get(asset_id)
    if asset is None or not (caller.sees_all or asset.api_key_hash == caller.key_hash):
        raise V2Error(404, "not_found", f"no asset {asset_id}")
    return asset


async def _output(svc: Services, caller: Caller, asset_id: str) -> tuple[Job, int]:
    """The job and output index an output's asset id names."""
    ref = output_ref(asset_id)
    job = await svc.repository.get(ref[0]) if ref is not None else None
    if ref is None or job is None or not caller.sees(job) or ref[1] >= len(job.outputs):
        raise V2Error(404, "not_found", f"no asset {asset_id}")
    return job, ref[1]


def _uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


@router.get("/assets/{asset_id}", summary="An asset's record, with a fresh URL")
async def get_asset(asset_id: str, request: Request, svc: ServicesDep, caller: CallerDep
                    ) -> dict[str, Any]:
    uploaded = _uuid(asset_id)
    if uploaded is not None:
        return await _asset_json(svc, await _uploaded(svc, caller, uploaded),
                                 render.origin(request))
    job, index = await _output(svc, caller, asset_id)
    output = (await render.outputs(svc, job, render.origin(request)))[index]
    return {"id": asset_id, "hash": output["hash"], "size_bytes": output["size_bytes"],
            "content_type": output["content_type"], "file_path": output["name"],
            "created_at": (job.finished_at or job.created_at).isoformat(),
            "url": output["url"], "url_expires_at": output["url_expires_at"],
            "expires_at": None, "job_id": str(job.id)}


@router.delete("/assets/{asset_id}", summary="Delete an asset record", status_code=204,
               response_class=Response)
async def delete_asset(asset_id: str, svc: ServicesDep, caller: CallerDep) -> Response:
    """The record goes; its bytes go with the last record over them. 409 `asset_in_use`
    while a job that has not ended is to load it, and for a job's output (it goes with its
    job). A second delete is a 404, like an id that never was or is another key's."""
    uploaded = _uuid(asset_id)
    if uploaded is None:
        await _output(svc, caller, asset_id)  # a 404 unless the caller may see it
        raise V2Error(409, "asset_in_use", f"asset {asset_id} cannot be deleted now")
    asset = await _uploaded(svc, caller, uploaded)
    try:
        await asset_store(svc).delete(asset)
    except AssetInUse as exc:
        raise V2Error(409, "asset_in_use", f"asset {asset_id} cannot be deleted now") from exc
    except StorageError as exc:
        raise _storage_unavailable(exc) from exc
    return Response(status_code=204)


@router.get("/assets/{asset_id}/content", summary="An asset's bytes",
            response_class=Response)
async def get_asset_content(asset_id: str, svc: ServicesDep, caller: CallerDep) -> Response:
    uploaded = _uuid(asset_id)
    if uploaded is not None:
        asset = await _uploaded(svc, caller, uploaded)
        key: object = asset_store(svc).key(asset)
        content_type: object = asset.content_type
        name: object = asset.file_path
    else:
        job, index = await _output(svc, caller, asset_id)
        output = job.outputs[index]
        key, content_type, name = output.get("key"), output.get("content_type"), \
            output.get("filename")
        if not isinstance(key, str):
            return PlainTextResponse(str(output.get("text", "")))
    assert isinstance(key, str)
    if isinstance(svc.storage, LocalStorage):
        return await stored_file(svc.storage, key, content_type,
                                 name.rsplit("/", 1)[-1] if isinstance(name, str) else None)
    url = await svc.storage.url(key)
    assert url is not None
    return RedirectResponse(url, status_code=302)
