"""How a client's own API-format graph becomes a job (Comfy API v2): checked against the fleet,
stored once however often the request is repeated under one idempotency key (within its 24
hours), and then run by the same dispatcher, tracker and collector as every other job."""

from __future__ import annotations

import mimetypes
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from comfyfleet.comfy.capabilities import Capabilities
from comfyfleet.intake import admission, in_flight, inputs
from comfyfleet.intake.assets import IDEMPOTENCY_WINDOW, AssetStore, output_ref
from comfyfleet.intake.errors import IdempotencyConflict, InvalidLabels, MissingAsset
from comfyfleet.intake.graphs import ASSET_TYPE, check_graph, is_asset_reference, shape_label
from comfyfleet.jobs.extra_data import ExtraData, HeldExtraData
from comfyfleet.jobs.models import Job, JobSource, new_job, utcnow
from comfyfleet.jobs.repository import (
    BacklogLimits,
    Dispatch,
    JobRepository,
    KeyClaim,
    Store,
)

_SAFE_EXTENSION = re.compile(r"^\.[a-z0-9]{1,10}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# The label rules of the v2 contract (as comfy-sdk documents them).
_LABEL_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
_LABEL_VALUE_BAD = re.compile("[\u0000-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]")
MAX_LABELS = 16

# The dispatcher's claim of a job as its insert (the Store given) stores it
# (Dispatcher.claim_on_submit): what the store returned.
ClaimOnSubmit = Callable[[Job, Store], Awaitable[tuple[Job, bool]]]


@dataclass(frozen=True)
class GraphRequest:
    graph: Any  # checked here
    metadata: dict[str, Any] | None  # the job's labels; checked here
    idempotency_key: str | None
    api_key_hash: str | None  # of the caller's API key; None without keys
    callback_url: str | None = None  # the caller's key's default: its webhook
    extra_data: ExtraData | None = None  # held in memory, never stored (jobs/extra_data.py)


async def accept_graph(
    repository: JobRepository, assets: AssetStore, fleet: Sequence[Capabilities],
    request: GraphRequest, *, backlog: BacklogLimits | None, held: HeldExtraData,
    claim_on_submit: ClaimOnSubmit | None = None,
) -> tuple[Job, bool]:
    """Check the graph against `fleet` (the capabilities of the backends known so far),
    resolve its asset references, and store the job, or find the earlier one with the same
    key; returns it and whether it was created. The request's extra_data is `held` for the
    job it created, from before the job can be claimed (nothing for a repeat: the job it
    finds runs, or ran, with the first request's). Raises the checks' errors (InvalidLabels,
    UiFormatGraph, InvalidGraph, MissingAsset), IdempotencyConflict, and BacklogFull (the
    `backlog` of the key or of the service is full), and KeyInFlight while another request
    under the same idempotency key is being answered. A job created is dispatched in its
    insert's commit when `claim_on_submit` can (returned as taken, dispatched)."""
    async with in_flight.holding(repository, JobSource.GRAPH, request.api_key_hash,
                                 request.idempotency_key) as claim:
        return await _accept(repository, assets, fleet, request, backlog, claim, held,
                             claim_on_submit)


async def _accept(
    repository: JobRepository, assets: AssetStore, fleet: Sequence[Capabilities],
    request: GraphRequest, backlog: BacklogLimits | None, claim: KeyClaim | None,
    held: HeldExtraData, claim_on_submit: ClaimOnSubmit | None,
) -> tuple[Job, bool]:
    labels = checked_labels(request.metadata)
    graph = check_graph(request.graph, fleet)
    job_id = uuid.uuid4()
    prompt, files = await _resolve_assets(repository, assets, graph, job_id,
                                          request.api_key_hash)
    # Built as the repository builds jobs from its rows (jobs/repository.py `_job`): the
    # values are the intake's own, and Job(...) would only set them more slowly.
    job = new_job(
        id=job_id,
        created_at=utcnow(),
        source=JobSource.GRAPH,
        workflow=shape_label(graph),
        params=files,
        prompt=prompt,
        labels=labels,
        client_task_id=request.idempotency_key,
        api_key_hash=request.api_key_hash,
        callback_url=request.callback_url,
        extra_data_holder=held.holder if request.extra_data is not None else None,
    )
    if request.extra_data is not None:
        held.hold(job_id, request.extra_data)  # the job may be claimed as its insert commits
    created = False
    def store(dispatch: Dispatch | None) -> Awaitable[tuple[Job, bool]]:
        return admission.insert(repository, job, backlog, claim, dispatch)

    try:
        stored, created = await (claim_on_submit(job, store) if claim_on_submit is not None
                                 else store(None))
        if (not created and stored.source == JobSource.GRAPH
                and stored.created_at <= utcnow() - IDEMPOTENCY_WINDOW):
            await repository.release_client_task_id(stored)  # the key expired: a new request
            stored, created = await admission.insert(repository, job, backlog, claim)
    finally:
        if not created:
            held.forget(job_id)
    if not created and not _same_request(stored, job):
        raise IdempotencyConflict(f"Idempotency-Key {request.idempotency_key!r} was used "
                                  f"before for a different request")
    return stored, created


def checked_labels(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    """The submission's metadata as the job's labels, or InvalidLabels."""
    if not metadata:
        return None
    if len(metadata) > MAX_LABELS:
        raise InvalidLabels(f"metadata has {len(metadata)} labels; at most {MAX_LABELS} are "
                            f"allowed")
    for key, value in metadata.items():
        if not _LABEL_KEY.match(key):
            raise InvalidLabels(f"metadata key {key!r} must be 1 to 40 of A-Z a-z 0-9 _ - .",
                                key)
        if (not isinstance(value, str) or len(value.encode()) > 256
                or _LABEL_VALUE_BAD.search(value)):
            raise InvalidLabels(f"metadata {key!r} must be a string of at most 256 bytes "
                                f"without control characters", key)
    return dict(metadata)


def _same_request(stored: Job, asked: Job) -> bool:
    """A repeat: the same graph (the same assets) and labels. (The stored job is the same
    caller's, from the same API: that is what its key is unique among.)"""
    return _as_asked(stored) == _as_asked(asked) and stored.labels == asked.labels


def _as_asked(job: Job) -> dict[str, Any]:
    """The job's graph with each input that an asset fills naming that asset again (the
    file name it has on a backend differs from job to job)."""
    graph = dict(job.prompt)
    for record in job.params.values():
        if isinstance(record, dict) and "asset" in record:
            node = graph[record["node_id"]]
            graph[record["node_id"]] = {**node, "inputs": {
                **node["inputs"], record["field"]: {"__type": ASSET_TYPE,
                                                    "info": {"id": record["asset"]}}}}
    return graph


async def _resolve_assets(
    repository: JobRepository, assets: AssetStore, graph: dict[str, Any], job_id: uuid.UUID,
    api_key_hash: str | None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The prompt with each asset reference replaced by the file the dispatcher uploads to
    the backend before it queues the prompt (as image parameters are), and those files."""
    prompt = dict(graph)
    files: dict[str, dict[str, Any]] = {}
    for node_id, node in graph.items():
        for name, value in node.get("inputs", {}).items():
            if not is_asset_reference(value):
                continue
            record = await _asset_file(repository, assets, value, str(node_id), name, job_id,
                                       api_key_hash)
            files[f"{node_id}.{name}"] = record
            prompt[node_id] = {**prompt[node_id], "inputs": {
                **prompt[node_id]["inputs"], name: inputs.in_prompt(record)}}
    return prompt, files


async def _asset_file(
    repository: JobRepository, assets: AssetStore, reference: dict[str, Any], node_id: str,
    name: str, job_id: uuid.UUID, api_key_hash: str | None,
) -> dict[str, Any]:
    info = reference.get("info")
    asset_id = info.get("id") if isinstance(info, dict) else None
    if not isinstance(asset_id, str):
        raise MissingAsset(f"node {node_id} input {name!r}: an asset reference needs info.id",
                           node_id, name)
    missing = MissingAsset(f"node {node_id} input {name!r}: no asset {asset_id}", node_id, name)
    ref = output_ref(asset_id)
    if ref is not None:  # an output of an earlier job
        source = await repository.get(ref[0])
        if source is None or source.api_key_hash != api_key_hash or ref[1] >= len(
                source.outputs) or not isinstance(source.outputs[ref[1]].get("key"), str):
            raise missing
        output = source.outputs[ref[1]]
        key, content_type, size = output["key"], output["content_type"], output["size"]
        file_name = str(output.get("filename") or "")
    else:
        try:
            asset = await assets.get(uuid.UUID(asset_id))
        except ValueError:
            asset = None
        if asset is None or asset.api_key_hash != api_key_hash:
            raise missing
        key, content_type, size = assets.key(asset), asset.content_type, asset.size_bytes
        file_name = asset.file_path or ""
    extension = PurePosixPath(file_name).suffix.lower()
    if not _SAFE_EXTENSION.match(extension):
        extension = mimetypes.guess_extension(content_type.split(";")[0]) or ""
    return {"input": key, "asset": asset_id, "node_id": node_id, "field": name,
            "name": inputs.backend_name(str(job_id), _UNSAFE.sub("_", f"{node_id}_{name}"),
                                        extension),
            "subfolder": inputs.BACKEND_SUBFOLDER, "content_type": content_type, "size": size}
