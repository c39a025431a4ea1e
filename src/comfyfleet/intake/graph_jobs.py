"""How a client's own API-format graph becomes a job (Comfy API v2): checked against the fleet,
stored once however often the request is repeated under one idempotency key, and then run by
the same dispatcher, tracker and collector as every other job."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from comfyfleet.comfy.capabilities import Capabilities
from comfyfleet.intake.graphs import check_graph, is_asset_reference, shape_label
from comfyfleet.jobs.models import Job, JobSource
from comfyfleet.jobs.repository import JobRepository


class MissingAsset(ValueError):
    """The graph names an asset that cannot be used."""

    def __init__(self, message: str, node_id: str, field: str) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.field = field


class IdempotencyKeyReuse(ValueError):
    """The idempotency key was used before for a different request."""


@dataclass(frozen=True)
class GraphRequest:
    graph: Any  # checked here
    labels: dict[str, str] | None
    idempotency_key: str | None
    api_key_hash: str | None  # of the caller's API key; None without keys


async def accept_graph(
    repository: JobRepository, fleet: Sequence[Capabilities], request: GraphRequest, *,
    max_unfinished: int | None,
) -> tuple[Job, bool]:
    """Check the graph against `fleet` (the capabilities of the backends known so far) and
    store the job, or find the earlier one with the same key; returns it and whether it was
    created. Raises the checks' errors (UiFormatGraph, InvalidGraph, MissingAsset),
    IdempotencyKeyReuse, and the repository's QueueFull (`max_unfinished` jobs of this key
    are unfinished)."""
    prompt = check_graph(request.graph, fleet)
    _refuse_assets(prompt)
    job = Job(
        id=uuid.uuid4(),
        source=JobSource.GRAPH,
        workflow=shape_label(prompt),
        prompt=prompt,
        labels=request.labels or None,
        client_task_id=request.idempotency_key,
        api_key_hash=request.api_key_hash,
    )
    stored, created = await repository.insert(job, max_unfinished=max_unfinished)
    if not created and not _same_request(stored, job):
        raise IdempotencyKeyReuse(f"Idempotency-Key {request.idempotency_key!r} was used "
                                  f"before for a different request")
    return stored, created


def _same_request(stored: Job, asked: Job) -> bool:
    """A repeat: the same caller sent the same graph and labels (another key's job under the
    same idempotency key is reported as reuse, without showing it)."""
    return (stored.api_key_hash == asked.api_key_hash and stored.source == asked.source
            and stored.prompt == asked.prompt and stored.labels == asked.labels)


def _refuse_assets(prompt: dict[str, Any]) -> None:
    for node_id, node in prompt.items():
        for name, value in node.get("inputs", {}).items():
            if is_asset_reference(value):
                raise MissingAsset(f"node {node_id} input {name!r} names an asset, and this "
                                   f"gateway stores no assets yet", str(node_id), name)
