"""The job row (DESIGN §2) and its states."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import Column, DateTime, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import configure_mappers
from sqlmodel import Field, SQLModel

from comfyfleet.db import storable


class JobStatus(StrEnum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    RUNNING = "running"
    UPLOADING = "uploading"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


class JobSource(StrEnum):
    """Where a job's prompt came from."""

    CATALOG = "catalog"  # a catalog workflow filled with the request's parameters
    GRAPH = "graph"  # the client's own API-format graph, run as sent (Comfy API v2)


TERMINAL_STATES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
# States in which a prompt may exist on a backend, i.e. what a backend loss or restart affects.
ON_BACKEND_STATES = frozenset({JobStatus.DISPATCHED, JobStatus.RUNNING, JobStatus.UPLOADING})


def utcnow() -> datetime:
    return datetime.now(UTC)


_Model = TypeVar("_Model", bound=SQLModel)


def constructed(model: type[_Model], values: dict[str, Any],
                fields_set: set[str] | None = None) -> _Model:
    """`model.model_construct(fields_set, **values)` for `values` that are every field of
    `model`, in the order of its fields (which its JSON keeps): the same model, `values` its
    `__dict__` and `fields_set` (every field unless given) set, without pydantic's walk over
    each field for an alias or a default (a job's took 0.012 ms, three quarters of building
    it). The instance is made as SQLModel's `__new__` makes it, without its call (a third of
    the time left): pydantic's extra and private values none."""
    instance: _Model = object.__new__(model)
    object.__setattr__(instance, "__dict__", values)
    object.__setattr__(instance, "__pydantic_fields_set__",
                       set(values) if fields_set is None else fields_set)
    object.__setattr__(instance, "__pydantic_extra__", None)
    object.__setattr__(instance, "__pydantic_private__", None)
    return instance


def _timestamp(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(DateTime(timezone=True), nullable=nullable))


class Job(SQLModel, table=True):
    __tablename__ = "jobs"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    # The caller's idempotency key: unique per API key and source (one caller's, one API's).
    client_task_id: str | None = None
    workflow: str
    # Empty containers are plain defaults, which pydantic copies for each job, not factories:
    # building a job calls inspect.signature on each factory it uses, a tenth of a millisecond.
    params: dict[str, Any] = Field(default={}, sa_column=Column(JSONB, nullable=False))
    # The filled API-format prompt, fixed at submit so a retry runs exactly what was accepted.
    prompt: dict[str, Any] = Field(default={}, sa_column=Column(JSONB, nullable=False))
    # Plain text in the database (a CHECK constraint guards the values); compare with JobStatus.
    status: str = Field(default=JobStatus.QUEUED, sa_column=Column(String(16), nullable=False))
    progress: float = 0.0
    # While it runs: {node, class_type, step, steps} of the node running (step and steps
    # null until the node reports its own progress); null otherwise.
    progress_detail: dict[str, Any] | None = Field(
        default=None, sa_column=Column(JSONB, nullable=True))
    priority: int = 0
    callback_url: str | None = None
    backend: str | None = None
    prompt_id: str | None = None
    attempts: int = 0
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False)
    )
    dispatched_at: datetime | None = _timestamp()
    # The gateway process following the job on its backend (jobs.owners.ProcessLease.id).
    dispatched_by: int | None = None
    started_at: datetime | None = _timestamp()
    # When its prompt had finished on the backend and its outputs began to upload.
    uploading_at: datetime | None = _timestamp()
    finished_at: datetime | None = _timestamp()
    outputs: list[dict[str, Any]] = Field(default=[], sa_column=Column(JSONB, nullable=False))
    error: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONB, nullable=True))
    # Non-terminal webhook events the client asked for ("job.started", "job.progress").
    webhook_events: list[str] | None = Field(
        default=None, sa_column=Column(JSONB, nullable=True)
    )
    # SHA-256 (hex) of the API key that submitted the job, never the key; null without keys.
    api_key_hash: str | None = None
    # SHA-256 (hex) of the work asked for (Workflow.fingerprint): the key of result reuse.
    fingerprint: str | None = None
    # The job whose outputs this one reused instead of running (DESIGN §3).
    reused_from: uuid.UUID | None = None
    # Plain text in the database (a CHECK constraint guards the values); compare with JobSource.
    source: str = Field(default=JobSource.CATALOG, sa_column=Column(String(16), nullable=False))
    # String labels the client gave the job (Comfy API v2 `metadata`); null: none.
    labels: dict[str, str] | None = Field(default=None, sa_column=Column(JSONB, nullable=True))
    # What was accepted with a caveat, e.g. a parameter ignored: [{type, message, ...}].
    warnings: list[dict[str, Any]] | None = Field(
        default=None, sa_column=Column(JSONB, nullable=True)
    )
    # The webhook body: null, Standard Webhooks' event; "comfyui-server", ComfyUI-server's
    # record (jobs/comfyui_server.py).
    webhook_format: str | None = None
    # How many jobs queued after it were dispatched first (cache-aware placement), at most
    # AFFINITY_WINDOW.
    overtaken: int = 0
    # The gateway process holding the job's v2 extra_data in its memory (its ProcessLease
    # id), the only one that may send it; null: none (jobs/extra_data.py).
    extra_data_holder: int | None = None


# The hot path builds jobs with `constructed` (jobs/repository.py, intake), past the ORM's
# constructor, which is what configures the mappers on a first use; and a job's fields cannot
# be read before they are. A process may build one before any ORM work (a restart reading back
# the jobs on its backends), so they are configured once here.
configure_mappers()


def reused_outputs(source: Job) -> dict[str, Any]:
    """The fields of a new job that ends as it is stored, with the outputs `source` made
    (result reuse): succeeded, never on a backend."""
    return {"status": JobStatus.SUCCEEDED, "progress": 1.0, "outputs": source.outputs,
            "reused_from": source.id, "finished_at": utcnow()}


def job_error(
    type_: str,
    message: str,
    *,
    node_id: str | None = None,
    node_type: str | None = None,
    details: Any = None,
) -> dict[str, Any]:
    """The `error` object of DESIGN §2. Its values may be a backend's: made storable, as
    jsonb holds neither NUL nor a number that is not finite."""
    error: dict[str, Any] = storable({
        "type": type_,
        "message": message,
        "node_id": node_id,
        "node_type": node_type,
        "details": details,
    })
    return error

# Each field's default as Job.model_construct resolves it for a field not given (`new_job`):
# the value itself, or a call making it (a factory; a copy of an empty container, as
# pydantic copies it for each job).
_FIELDS = tuple(Job.model_fields)
_DEFAULTS = {name: info.default for name, info in Job.model_fields.items()
             if info.default_factory is None and not info.is_required()
             and not isinstance(info.default, dict | list)}
_FACTORIES: dict[str, Callable[[], Any]] = {
    name: info.default.copy if isinstance(info.default, dict | list)
    else info.default_factory  # type: ignore[misc]
    for name, info in Job.model_fields.items()
    if info.default_factory is not None or isinstance(info.default, dict | list)}


def new_job(**values: Any) -> Job:
    """`Job.model_construct(**values)`, each field not given its default, without pydantic
    resolving each field's default for every job (`constructed`)."""
    given = _DEFAULTS | values
    for name, factory in _FACTORIES.items():
        if name not in values:
            given[name] = factory()
    return constructed(Job, {name: given[name] for name in _FIELDS}, set(values))
