"""Why a submission makes no job. Each error names the field of the request it concerns, so
that `api/` can answer it over HTTP (and any other caller as it needs) without knowing how the
intake came to refuse."""

from __future__ import annotations

import uuid
from typing import Any

from comfyfleet.jobs.repository import QueueFull


class Refused(Exception):
    """A submission that makes no job; `field` is the request's field concerned, None when it
    is the request as a whole."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class IdempotencyConflict(Refused):
    """The idempotency key is taken by another request: `job_id` is that request's job when the
    caller may see it."""

    def __init__(self, message: str, job_id: uuid.UUID | None = None) -> None:
        super().__init__(message, "idempotency_key")
        self.job_id = job_id


class KeyInFlight(Refused):
    """Another request under the same idempotency key is still being answered; worth trying
    again after `retry_after` seconds, when it has its answer."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message, "idempotency_key")
        self.retry_after = retry_after


class MissingAsset(Refused):
    """The graph names an asset that does not exist or is not the caller's: `field` is the
    input of node `node_id` that names it."""

    def __init__(self, message: str, node_id: str, field: str) -> None:
        super().__init__(message, field)
        self.node_id = node_id


class InvalidParams(Refused):
    """Parameters the workflow cannot take: `problems` maps each one to what is wrong."""

    def __init__(self, problems: dict[str, str]) -> None:
        summary = "; ".join(f"{name}: {problem}" for name, problem in problems.items())
        super().__init__(f"invalid parameters: {summary}", "params")
        self.problems = problems


class InvalidLabels(Refused):
    """Metadata labels the v2 contract does not allow: `key` is the label concerned, None
    when it is their number."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message, "metadata")
        self.key = key


class ImageTooLarge(Refused):
    """An image parameter over MAX_UPLOAD_BYTES; `field` names the parameter."""


class CallbackNotAllowed(Refused):
    """A callback URL the outbound guard refuses."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "callback_url")


class BuildFailed(Refused):
    """The workflow's own code could not build the prompt: the operator's fault, not the
    request's."""

    def __init__(self, message: str, workflow: str) -> None:
        super().__init__(message, "workflow")
        self.workflow = workflow


class NoCapableBackend(Refused):
    """Every backend lacks something the job needs: `missing` says what, per backend."""

    def __init__(self, missing: dict[str, list[str]]) -> None:
        everything = sorted({piece for pieces in missing.values() for piece in pieces})
        super().__init__(f"no backend can run this job; missing: {', '.join(everything)}")
        self.missing = missing


class StorageUnavailable(Refused):
    """Storage cannot keep an input now; worth trying again after `retry_after` seconds."""

    def __init__(self, message: str, field: str, retry_after: int) -> None:
        super().__init__(message, field)
        self.retry_after = retry_after


class BacklogFull(Refused):
    """The backlog (the key's or the service's, `scope`) is full; the submit may well be taken
    after `retry_after` seconds."""

    def __init__(self, message: str, full: QueueFull, retry_after: int) -> None:
        super().__init__(message)
        self.scope = full.scope
        self.queued = full.queued
        self.limit = full.limit
        self.retry_after = retry_after

    def details(self) -> dict[str, Any]:
        return {"scope": self.scope, "queued": self.queued, "limit": self.limit}
