"""All SQL for jobs. Every state change is fenced on (id, attempts, current states), so a stale
actor (an old attempt, another process) can never overwrite what a newer one decided."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import partial
from types import EllipsisType
from typing import Any, Literal, NamedTuple

import asyncpg
import sqlalchemy
from sqlalchemy import func, literal, text, tuple_, union_all, update
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col, select
from sqlmodel.sql.expression import SelectOfScalar

from comfyfleet import json_codec, sql
from comfyfleet.db import (
    check_storable,
    driver_connection,
    single_statements,
    storable_json,
    unavailable,
)
from comfyfleet.jobs import deliveries
from comfyfleet.jobs.models import ON_BACKEND_STATES, Job, JobStatus, constructed, utcnow
from comfyfleet.jobs.positions import Backlog, Share, fair_position
from comfyfleet.jobs.recent import Recent

_table = Job.__table__  # type: ignore[attr-defined]
_CLAIM = sql.queries("claim")
UNFINISHED_STATES = ON_BACKEND_STATES | {JobStatus.QUEUED}
# Their condition with literal values, not bound ones: with bound values the generic plan
# guesses that most jobs match, and reads them all; with these, it counts the unfinished jobs
# from the partial indexes that hold only them.
UNFINISHED = text("jobs.status IN ({})".format(
    ", ".join(f"'{state}'" for state in sorted(UNFINISHED_STATES))))
# The columns a job's transitions may change; the others are fixed when it is stored, so an
# UPDATE returns only these and the rest is taken from the job the caller holds (sparing the
# decoding of its JSONB prompt and params at every step).
_CHANGING = frozenset({
    "status", "progress", "progress_detail", "backend", "prompt_id", "attempts", "dispatched_at",
    "dispatched_by", "started_at", "uploading_at", "finished_at", "outputs", "error"})
# The job's fields in order, each with whether a change's row has it (`_changed`).
_FIELDS_CHANGING = tuple((name, name in _CHANGING) for name in Job.model_fields)
# Storing a job and its transitions (not the claim): fixed SQL on asyncpg.
_SQL = sql.queries("jobs")
# The API's reads of one job: fixed SQL on asyncpg too.
_READS = sql.queries("reads")
# Queued jobs a claim looks at to find one the backend can run (capability routing), shared
# among the tenants first in virtual time.
CLAIM_BATCH = 50
# Takes a claim makes when its take loses a race with another claim's (the job it chose
# taken, or one it passes passed to the window meanwhile), each on the read the one before
# made: each lost race is another claim's progress.
CLAIM_TAKES = 4
# The jobs a repository keeps as its own statements ended them (`JobRepository.ended_here`).
ENDED_KEPT = 256
# The longest `ended_here` waits for an end of the job this process is writing (`finish`): a
# statement that long waits on another's locks, and its caller had better read the job.
FINISH_WAIT_SECONDS = 0.5
# The most job ends one statement writes (`JobRepository.finish`): those that came while the
# statement before was in flight.
FINISH_BATCH = 64
# The job's columns as the model has them (the claim's RETURNING has charged_seconds too).
_JOB_FIELDS = tuple(Job.model_fields)
# The job's fields in order, each with whether a claim's take returns it (sql/claim.sql
# `claim`, `_taken`): the others, its read gave.
_FIELDS_TAKEN = tuple((name, name not in {"id", "workflow", "prompt", "priority", "created_at"})
                      for name in _JOB_FIELDS)
# What a job of a workflow never seen to run is taken to last, in GPU-seconds.
UNKNOWN_RUN_SECONDS = 1.0
# A workflow's latest successful runs averaged into its learned run time.
RUN_TIME_SAMPLE = 20
# The workflows (on a backend, or fleet-wide) whose learned run time a repository keeps for
# jobs' ETAs (`JobRepository.recent_run_seconds`), most recently asked about.
RUN_TIMES_KEPT = 1000
# Queue positions are counted exactly (every queued job, for each ask) while the backlog has
# fewer jobs than this (at 1,000 jobs under a millisecond an ask), from a snapshot of it (one
# read shared by every ask) once it is deeper: read again in the background after the jobs
# change, at most once per POSITION_MAX_AGE seconds and only while asked for, the asks
# meanwhile counting in the one before (`Recent`), so that none waits for a read (about 50 ms
# at 100,000 jobs) but those before the first snapshot of a backlog found deep (`place` says
# so without counting it). A queued job's ETA rests on run times and the work on the backends
# read as seldom, whatever the backlog's depth.
EXACT_POSITIONS_BELOW = 1000
POSITION_MAX_AGE = 2.0
# The jobs stored first in line a repository keeps for their first position asked: those of
# the v1 API, whose submit does not ask, are let go of, the oldest first.
FIRST_IN_LINE_KEPT = 64


@dataclass(frozen=True)
class Tenant:
    """The jobs of one API key (by its digest); None: those submitted without keys."""

    api_key_hash: str | None


@dataclass
class KeyClaim:
    """A request's claim on an idempotency key (`claim_key`): `held` until let go of
    (`release_key`), or until the job stored under the key took it along (`insert`)."""

    tenant: str  # the API key's digest, '' without keys
    scope: str
    key: str
    token: str
    held: bool = True


class QueuedJob(NamedTuple):
    """What a claim looks at to choose a job."""

    id: uuid.UUID
    workflow: str
    prompt: dict[str, Any]
    priority: int = 0
    overtaken: int = 0  # later jobs dispatched before it
    created_at: datetime = datetime.min.replace(tzinfo=UTC)
    tenant: str = ""  # its API key's digest; '' without a key


class TenantHead(NamedTuple):
    """A tenant whose jobs a claim read: its values once, not with each of its jobs (they
    move with every charge, and the jobs stay as they were: `_claim_statement`)."""

    start: float = 0.0  # its place in virtual time (GPU-seconds over weight)
    weight: int = 1
    limited: bool = False  # it has a max_concurrent: the take locks it


class Choice(NamedTuple):
    """The job a claim takes, the queued jobs it passes (each overtaken once more), and the
    GPU-seconds its run is expected to take: what its tenant is charged until it ends."""

    job_id: uuid.UUID
    passed: tuple[uuid.UUID, ...] = ()
    charge: float = 0.0


class Refusal(StrEnum):
    """Why a claim did not take the job a backend chose, counted again under the locks after
    the read (sql/claim.sql `claim`, whose words these are)."""

    TENANT_LIMIT = "tenant_limit"  # the job's key at its max_concurrent, or given one since
    NOT_ACCEPTING = "not_accepting"  # the backend drained or gone since
    NO_SLOT = "no_slot"  # the backend's slots full by every process's count
    # Jobs queued: a take chosen before its job was stored yields to them (`insert_taken`).
    QUEUED = "queued"
    # Another claim took the job since the read, or passed one it passes to the window: picked
    # again on the take's read (`claim_next`), and given as the outcome only after CLAIM_TAKES
    # takes.
    RACED = "raced"


class BacklogRead(NamedTuple):
    """The backlog as a claim's statement read it (sql/claim.sql `claim`), for it to pick
    from, or for the claim after it."""

    queued: list[QueuedJob]  # the head of each tenant's backlog
    tenants: dict[str, TenantHead]  # theirs, by QueuedJob.tenant
    # Whether a tenant's backlog goes on past the jobs read: deep enough for every backend.
    beyond: bool = False
    # How many jobs were queued, locked by other claims or not: 0, 1, or 2 for more.
    backlog: int = 0
    # The ids of `queued` as the statement gave them (a uuid[] literal), for the next to name
    # the jobs the caller holds.
    ids: str = "{}"

    def lock_of(self, job_id: uuid.UUID) -> str | None:
        """The tenant whose lock the take of `job_id` takes: its job's, when it has a
        max_concurrent (None: no lock, or a job not read)."""
        job = next((job for job in self.queued if job.id == job_id), None)
        return job.tenant if job is not None and self.tenants[job.tenant].limited else None


class Claim(NamedTuple):
    """What a claim (`claim_next`) came to."""

    job: Job | None  # the job taken, dispatched
    # The backends it counts an outcome for: its first (whose slots its read counted, when it
    # read), and the one after it that chose a job.
    counted: tuple[str, ...]
    # How many jobs were queued once it was done, locked by other claims or not: 0, 1, or 2
    # for more (None: nothing was read, the first backend having no free slot).
    backlog: int | None
    next: int  # the index of the first of its backends not asked
    # Why the backend that chose a job did not take it (None: it took it, or none chose one).
    refusal: Refusal | None = None
    # The backlog as its take left it: the next claim may pick on it without reading (None:
    # it took nothing, nor tried).
    read: BacklogRead | None = None


class ProgressReport(NamedTuple):
    """How far a running job has come: the fraction done and the detail of the node running
    (`Job.progress`, `Job.progress_detail`)."""

    job: Job
    progress: float
    detail: dict[str, Any] | None


class TenantActivity(NamedTuple):
    """One API key's jobs now, and the GPU time they took in a recent window."""

    api_key_hash: str | None
    queued: int
    on_backend: int  # dispatched, running or uploading: what max_concurrent counts
    gpu_seconds: float  # from start to end (or now), within the window


class BacklogLimits(NamedTuple):
    """How many queued jobs a submit may find before its own: of its key, of the service.
    None: no limit."""

    per_key: int | None
    total: int | None


class Take(NamedTuple):
    """A claim's take chosen before its job is stored (Dispatcher.claim_on_submit): `insert`
    stores the job already taken by it, or nothing when it is refused (sql/claim.sql
    `insert_taken`)."""

    backend: str
    prompt_id: str
    charge: float  # the GPU-seconds its tenant is charged until it ends
    owner: int | None  # the process that follows it
    max_inflight: int
    ended: list[str]  # the caller's prompts whose end it has read, not recorded yet


@dataclass(frozen=True)
class Dispatch:
    """What `insert` offers a job it stores to: `take`, in the insert's statement; then, when
    that is refused (told why: its Refusal, or the database's error), `claim`, on the
    insert's connection in its transaction, which returns the job as taken, or None."""

    take: Take
    claim: Callable[[Refusal | asyncpg.PostgresError, asyncpg.Connection],
                    Awaitable[Job | None]]


# How a submit stores its job (`insert`, offered a Dispatch or None): the job as stored, or
# the earlier one under its idempotency key, and whether it was created.
Store = Callable[[Dispatch | None], Awaitable[tuple[Job, bool]]]


@dataclass(frozen=True)
class _End:
    """A job's end waiting for its statement (`JobRepository.finish`): the job, its element of
    each of sql/jobs.sql `finish`'s arrays, the JSON documents among them (`_documents`), its
    webhook, and its caller's answer."""

    job: Job
    values: tuple[Any, ...]
    written: dict[str, Any]
    delivery: deliveries.OutgoingDelivery | None
    outcome: asyncio.Future[Job | None]


class _Undispatched(Exception):
    """`insert`'s `dispatch` failed, which undid the insert's transaction."""


class QueueFull(Exception):
    """The backlog is as long as it may be: the submitting key's (`scope` "key") or the whole
    service's ("service")."""

    def __init__(self, scope: Literal["key", "service"], queued: int, limit: int) -> None:
        super().__init__(f"{queued} jobs queued ({scope} limit {limit})")
        self.scope = scope
        self.queued = queued
        self.limit = limit


class JobRepository:
    def __init__(
        self, engine: AsyncEngine, on_change: Callable[[uuid.UUID], None] | None = None,
        *, reads: AsyncEngine | None = None, max_concurrent_per_key: int | None = None,
        fair_share: bool = True, webhook_slots: deliveries.DeliverySlots | None = None,
        exact_positions_below: int = EXACT_POSITIONS_BELOW,
        position_max_age: float = POSITION_MAX_AGE,
    ) -> None:
        """`on_change` hears of every job this process changes, once it is committed. The
        API's reads (a job, a page, a queue position, run times) go through `reads` when
        given: with hundreds of prompts in flight the fleet's writes queue for `engine`'s
        connections, and a status request would wait behind them. A claim skips the jobs of
        keys with as many jobs on backends as their `max_concurrent` (in the keys table), or
        `max_concurrent_per_key` for keys without their own. `fair_share`: queue positions
        count as the dispatcher serves tenants (FAIR_SHARE). `webhook_slots`: this process's
        webhook worker's, to which a job change's webhook is leased as it is written when the
        worker has room for it (without: every delivery is written for any worker's pass)."""
        self.engine = engine
        self._read_engine = reads or engine
        self._fair_share = fair_share
        self._max_concurrent = max_concurrent_per_key
        self._statements = single_statements(engine)
        self._reads = single_statements(reads or engine)
        self._tell_change = on_change or (lambda _: None)
        self._webhook_slots = webhook_slots
        # Its latest claim's read (`_claim_statement`).
        self._latest_read: BacklogRead | None = None
        self._exact_positions_below = exact_positions_below
        self._position_max_age = position_max_age
        # The queued jobs the latest count of positions saw (none until one has counted: the
        # first asks count exactly, and one finding the backlog deep begins a snapshot), and
        # the snapshot, told of the jobs' changes while the backlog is deep.
        self._backlog_seen = 0
        # PostgreSQL's estimate of the queued jobs when `look_for_deep_backlog` last counted.
        self._estimate_looked_at: int | None = None
        # The jobs it stored with no other queued (the latest FIRST_IN_LINE_KEPT), and when:
        # position 1 for their first ask within position_max_age (a submit's answer), not read.
        self._first_in_line: OrderedDict[uuid.UUID, float] = OrderedDict()
        # The jobs its statements ended (the latest ENDED_KEPT), as they left them; and the
        # jobs whose end it is writing (`finish`), each with what is done once it is written.
        self._ended: OrderedDict[uuid.UUID, Job] = OrderedDict()
        self._finishing: dict[uuid.UUID, asyncio.Future[None]] = {}
        self._backlog = Recent(self._read_backlog, position_max_age)
        # What a job's position and ETA rest on besides the backlog, as recent as its
        # snapshot: each workflow's learned run time, fleet-wide (a queued job's) or on a
        # backend (a dispatched one's; those least recently asked about first), the work on
        # the backends.
        self._run_seconds: OrderedDict[tuple[str, str | None], Recent[float | None]] = \
            OrderedDict()
        self._work_on_backends = Recent(self.work_on_backends_seconds, position_max_age)
        # Whether a statement writing job ends is in flight (`finish`), the ends waiting for
        # it, and the task that writes those once it is done, while any wait.
        self._writing_ends = False
        self._ends: list[_End] = []
        self._ending: asyncio.Task[None] | None = None

    async def read_backlog(self) -> None:
        """Read the backlog's snapshot now (as a service starts): the first asks for
        positions behind a deep backlog find it read."""
        await self._backlog.fresh()

    async def look_for_deep_backlog(self) -> None:
        """While the backlog last seen was shallow: whether it has grown deep behind this
        process's back (written by a process that did not tell, a restore), and if so its
        snapshot begun, so that the first asks for positions find it read rather than wait
        for it. The tracker's watch calls this every second (nothing tells of such writes):
        it reads PostgreSQL's estimate of the queued jobs (ANALYZE's, autovacuum's), not the
        jobs table, which it counts only when that estimate changes to a deep one."""
        if self._backlog_seen >= self._exact_positions_below:
            return
        async with driver_connection(self._read_engine) as connection:
            estimate = await connection.fetchval(_CLAIM["queued_estimate"])
            if estimate < self._exact_positions_below or estimate == self._estimate_looked_at:
                return
            self._estimate_looked_at = estimate
            deep = await connection.fetchval(_CLAIM["deep"], self._exact_positions_below)
        if deep and self._backlog_seen < self._exact_positions_below:
            self._backlog_seen = self._exact_positions_below
            self._backlog.forget()  # a shallow one's, if any
            self._backlog.refresh()

    def _on_change(self, job_id: uuid.UUID) -> None:
        """A change of the job `job_id` committed by this process."""
        self._tell_change(job_id)
        self.jobs_changed()

    def jobs_changed(self) -> None:
        """Jobs changed (here, or in another process: peers.py): a deep backlog's snapshot is
        read again (`Recent.changed`)."""
        if self._backlog_seen >= self._exact_positions_below:
            self._backlog.changed()

    async def close(self) -> None:
        """Stop the reads running in the background."""
        await self._backlog.close()
        await self._work_on_backends.close()
        for run_seconds in self._run_seconds.values():
            await run_seconds.close()

    async def insert(
        self, job: Job, *, backlog: BacklogLimits | None = None, claim: KeyClaim | None = None,
        dispatch: Dispatch | None = None,
    ) -> tuple[Job, bool]:
        """Store a new job; with a `client_task_id` already taken (by a job of the same API key
        and source), the existing job instead. A job stored lets go of `claim`, the request's
        on its idempotency key, in the same statement (no round trip of its own). With
        `dispatch`, the job is stored already taken by its `take`, in one statement (no
        backlog to count: none is queued); that refused, nothing is written, and the job,
        stored as without it, is offered to its `claim` in the insert's transaction (a
        `claim_next` on its connection): the job it takes is committed with the insert.

        Returns the job (as `dispatch` took it) and whether it was created. With `backlog`,
        raises QueueFull when the job's API key, or the service, already has that many jobs
        queued (a repeat of an existing job is still answered with it). A job stored already
        ended (reused outputs) has its webhook in the outbox, written by the same statement.
        NotStorable when a value cannot be stored.
        """
        document = _document(job)
        status = JobStatus(job.status)
        delivery = await deliveries.delivery_row(job, f"job.{status}") if status.terminal \
            else None
        row = _delivery_json(delivery)
        held = (claim.tenant, claim.scope, claim.key, claim.token) if claim is not None \
            else (None, None, None, None)
        # Behind a shallow backlog, whether it is first in line: then its position is known.
        shallow = status == JobStatus.QUEUED and self._backlog_seen < self._exact_positions_below
        async with driver_connection(self.engine) as connection:
            claim_taken = None
            if dispatch is not None:
                why, taken = await self._insert_taken(connection, job, document, held,
                                                      dispatch.take)
                if why is None:
                    if taken is None:  # a repeat
                        return await _by_client_task_id(connection, job), False
                    if claim is not None:
                        claim.held = False  # committed with the job
                    self._on_change(job.id)
                    return taken, True
                claim_taken = partial(dispatch.claim, why)
            try:
                stored, taken = await _store(connection, job, document, row, held, shallow,
                                             backlog, claim_taken)
            except _Undispatched:
                # Its claim failed (the dispatcher says why) and undid the insert: a job the
                # service could store is not refused for it, but stored queued, for the
                # dispatcher's own passes.
                stored, taken = await _store(connection, job, document, row, held, shallow,
                                             backlog, None)
            created = None if stored is None else stored["id"]
            if stored is not None and stored["alone"]:
                self._first_in_line[job.id] = time.monotonic()
                while len(self._first_in_line) > FIRST_IN_LINE_KEPT:
                    self._first_in_line.popitem(last=False)
            if created is not None and claim is not None:
                claim.held = False  # committed with the job
            if created is None:
                return await _by_client_task_id(connection, job), False
        self._on_change(job.id)  # committed: a new job is a change the job lists show
        return taken or job, True

    async def _insert_taken(
        self, connection: asyncpg.Connection, job: Job, document: str, held: tuple[Any, ...],
        take: Take,
    ) -> tuple[Refusal | asyncpg.PostgresError | None, Job | None]:
        """sql/claim.sql `insert_taken` of `job`, its row `document` (`_document`): why `take`
        did not take it (None: it did, or the job is a repeat, its client_task_id taken), and
        the job as taken."""
        try:
            row = await connection.fetchrow(
                _CLAIM["insert_taken"], document, *held, take.backend,
                take.prompt_id, take.owner, take.charge, self._max_concurrent,
                job.api_key_hash, take.max_inflight, take.ended)
        except asyncpg.PostgresError as exc:  # nothing written: the claim may still take it
            return exc, None
        if row["refusal"] is not None:
            return Refusal(row["refusal"]), None
        if row["status"] is None:
            return None, None
        return None, _changed(job, row)

    async def release_client_task_id(self, job: Job) -> None:
        """Free `job`'s client_task_id for a new job (an idempotency key past its window)."""
        async with self._statements.begin() as session:
            await session.exec(update(_table).where(
                _table.c.id == job.id, _table.c.client_task_id == job.client_task_id,
            ).values(client_task_id=None))

    async def claim_key(self, tenant: str | None, scope: str, key: str, seconds: float
                        ) -> KeyClaim | None:
        """Claim the idempotency key `key` of the API key whose digest is `tenant` among the
        keys of `scope` for `seconds` (a request in flight under it); the claim, or None
        while another's claim holds."""
        claim = KeyClaim(tenant or "", scope, key, str(uuid.uuid4()))
        async with driver_connection(self.engine) as connection:
            claimed = await connection.fetchval(_SQL["claim_key"], claim.tenant, scope, key,
                                                claim.token, seconds)
        return claim if claimed else None

    async def release_key(self, claim: KeyClaim) -> None:
        """Let go of `claim` (claim_key), if the holder still has it."""
        async with driver_connection(self.engine) as connection:
            await connection.execute(_SQL["release_key"], claim.tenant, claim.scope, claim.key,
                                     claim.token)
        claim.held = False

    async def reusable(self, fingerprint: str, api_key_hash: str | None) -> Job | None:
        """The latest job that ran the work `fingerprint` names and succeeded, among those the
        same API key submitted: another key's outputs are not this caller's to see, nor is
        whether they exist."""
        owner = (col(Job.api_key_hash).is_(None) if api_key_hash is None
                 else col(Job.api_key_hash) == api_key_hash)
        query = (
            select(Job)
            .where(col(Job.fingerprint) == fingerprint, owner,
                   col(Job.status) == JobStatus.SUCCEEDED, col(Job.reused_from).is_(None))
            .order_by(col(Job.finished_at).desc())
            .limit(1)
        )
        async with self._statements() as session:
            return (await session.exec(query)).first()

    async def get(self, job_id: uuid.UUID) -> Job | None:
        async with driver_connection(self._read_engine) as connection:
            row = await connection.fetchrow(_READS["job"], job_id)
        return _job(row) if row is not None else None

    async def shown(self, job_id: uuid.UUID) -> Job | None:
        """Job `job_id` as a Comfy API v2 poll shows it (sql/reads.sql `job_shown`): `get`'s
        job but for its prompt, which holds the prompt's node ids only, each mapped to None.
        For a reader that neither shows nor sends the prompt (its graph: `get`)."""
        async with driver_connection(self._read_engine) as connection:
            row = await connection.fetchrow(_READS["job_shown"], job_id)
        return _job(row) if row is not None else None

    async def ended_here(self, job_id: uuid.UUID) -> Job | None:
        """Job `job_id` as this process's statement ended it (one of the latest ENDED_KEPT),
        else None: what `get` would read now, but for its client_task_id. An ended job's row is
        written again only to free that (`release_client_task_id`): every other statement
        writing a job is fenced on states that are not ended (sql/jobs.sql, sql/claim.sql), and
        no statement deletes a job. So a reader that does not show the client_task_id, in any
        process, may take this for a read: it is committed (the statement returned), and no
        process can change it since. (A status poll's last read, the one that sees the end.)

        While this process is writing the job's end (`finish`), that is waited for first (at
        most FINISH_WAIT_SECONDS): a read meanwhile finds the job as it was, and its poller
        asks again a poll's period later; the end is about a millisecond away (a statement and
        its commit)."""
        writing = self._finishing.get(job_id)
        if writing is not None:
            await asyncio.wait((writing,), timeout=FINISH_WAIT_SECONDS)
        return self._ended.get(job_id)

    async def reread(self, job_id: uuid.UUID, known: Job | None) -> Job | None:
        """The job `job_id` as it is now, None when it is gone: whole (`get`) if `known` is
        None, else the columns its changes touch read again (sql/reads.sql `job_changes`) and
        the others as `known` holds them (its prompt, params, labels: written once, with the
        job, and tens of KB to decode; a reader of those that other statements change
        (overtaken, client_task_id, extra_data_holder) reads the whole job with `get`)."""
        if known is None:
            return await self.get(job_id)
        async with driver_connection(self._read_engine) as connection:
            row = await connection.fetchrow(_READS["job_changes"], job_id)
        return _changed(known, row) if row is not None else None

    async def claim_next(
        self,
        backends: Sequence[str],
        prompt_id: str,
        *,
        max_inflight: int,
        pick: Callable[[str, BacklogRead], Choice | None],
        owner: int | None = None,
        ended: Collection[str] = (),
        window: int | None = None,
        read: BacklogRead | None = None,
        connection: asyncpg.Connection | None = None,
    ) -> Claim:
        """Take the queued job `pick` chooses for the first of `backends` that chooses one,
        among the head of each tenant's backlog (tenants first in virtual time first, each
        one's jobs highest priority, then oldest, first), as `read` by the claim before this
        one (its `Claim.read`), or else as read now for the first backend, under no lock
        (nothing more when it has no free slot). The backends are asked on that read, in
        order, and the first that chooses a job takes it, in one statement (sql/claim.sql
        `claim`), on its own, under its own lock: it counts its slots again, counts the jobs
        the choice passes as overtaken, charges its tenant the choice's estimated seconds,
        and reads the backlog as it leaves it, for the next claim (`Claim.read`). A claim
        made on the read of the one before it is one round trip (its first backend's slots
        counted by a take only: a full one is refused, no_slot, when it chooses a job).

        The backends' slots hold across processes: the takes for one backend are serialised by
        an advisory lock and count what every process has on it, but for the prompts `ended`:
        the caller's whose end it has read from their backend, their jobs not recorded off it
        yet (a prompt that ended holds no GPU; only the caller knows it ended). A slot the
        read saw free and another process's take filled since is refused (no_slot). Claims,
        in any process, read the backlog side by side, without locks, and see every queued
        job; the take locks the job and those it passes (those the pick names, and any queued
        ahead of it in its tenant's backlog at its priority that the read did not see: requeued
        since), so no two share a job, and no job is passed by more than `window` claims
        (None: no bound) that counted it. When another claim took the chosen job since the
        read, or passed one of those it passes `window` times, the claim picks again on the
        read its take made (CLAIM_TAKES in all): the backlog has moved on.

        On `connection`, in the caller's transaction (`insert`'s `dispatch`), the statements
        commit with it, and the caller tells of the job taken once they have.
        """
        claim, takes = None, 0
        while claim is None:
            takes += 1
            claim, read = await self._claim(backends, prompt_id, max_inflight, pick, owner,
                                            list(ended), window, read, connection,
                                            last=takes == CLAIM_TAKES)
        return claim

    async def _claim(
        self, backends: Sequence[str], prompt_id: str, max_inflight: int,
        pick: Callable[[str, BacklogRead], Choice | None], owner: int | None,
        ended: list[str], window: int | None, read: BacklogRead | None,
        on: asyncpg.Connection | None, *, last: bool,
    ) -> tuple[Claim | None, BacklogRead | None]:
        """One pick on the backlog `read` (read now when None) and the take of what it chose
        (`claim_next`); None and the take's read when the take lost a race with another claim
        (not on the `last` take: that is refused)."""
        first = backends[0]
        async with (driver_connection(self.engine) if on is None
                    else nullcontext(on)) as connection:
            if read is None:
                row, read = await self._claim_statement(
                    connection, None, (), first, prompt_id, owner, 0.0, max_inflight, ended,
                    None, window, self._latest_read)
                if row["free"] <= 0:
                    return Claim(None, (first,), None, 1), None
            queued = read.queued
            # On an empty read the first is asked only (what it saw is its outcome).
            for asked, backend in enumerate(backends if queued else backends[:1]):
                choice = pick(backend, read)
                if choice is None:
                    continue
                row, after = await self._claim_statement(
                    connection, choice.job_id, choice.passed, backend, prompt_id, owner,
                    choice.charge, max_inflight, ended, read.lock_of(choice.job_id), window,
                    read)
                counted = (first, backend)[:1 + bool(asked)]
                if row["refusal"] is not None:
                    refusal = Refusal(row["refusal"])
                    if refusal is Refusal.RACED and not last:
                        return None, after
                    return Claim(None, counted, after.backlog, asked + 1, refusal, after), after
                break
            else:
                return Claim(None, (first,), read.backlog, len(backends)), None
        claimed = _taken(next(job for job in queued if job.id == choice.job_id), row)
        if on is None:
            self._on_change(claimed.id)
        return Claim(claimed, counted, after.backlog, asked + 1, read=after), after

    async def _claim_statement(
        self, connection: asyncpg.Connection, job_id: uuid.UUID | None,
        passed: Sequence[uuid.UUID], backend: str, prompt_id: str, owner: int | None,
        charge: float, max_inflight: int, ended: list[str], tenant: str | None,
        window: int | None, held: BacklogRead | None,
    ) -> tuple[asyncpg.Record, BacklogRead]:
        """sql/claim.sql `claim`: take `job_id` (None: read only); its row and its read.
        `held`: a read whose jobs the statement gives only by their place in it (each claim
        reads the head of every tenant's backlog again, the same CLAIM_BATCH jobs but the
        ones taken, and a prompt is tens of KB): with a job to take, the read the caller
        picked on, whose ids a take sends anyway; else the latest read (a pass's first read:
        the head it reads is mostly the one the pass before left). A job's prompt never
        changes: it is decoded once while its job stays near the head, and its QueuedJob is
        kept from read to read while its overtaken count stays (so only read)."""
        ids = held.ids if held is not None else "{}"
        seen, kept = (ids, "{}") if job_id is not None else ("{}", ids)
        row: asyncpg.Record = await connection.fetchrow(
            _CLAIM["claim"], job_id, list(passed), backend, prompt_id, owner, charge,
            self._max_concurrent, max_inflight, ended, tenant, window, seen, CLAIM_BATCH, kept)
        holding = held.queued if held is not None else []
        fresh = iter(row["fresh"] or ())  # null: none read, or every one held
        queued: list[QueuedJob] = []
        # A loop of its own: a read is CLAIM_BATCH jobs at every claim, most of them held.
        for place, overtaken in zip(row["places"] or (), row["overtaken_counts"] or (),
                                    strict=True):
            if place:
                job = holding[place - 1]
                if job.overtaken != overtaken:
                    job = job._replace(overtaken=overtaken)
            else:
                new = next(fresh)
                job = QueuedJob(new[0], new[1], json_codec.loads(new[2]), new[3], overtaken,
                                new[4], new[5])
            queued.append(job)
        tenants = {tenant: TenantHead(start, weight, limited)
                   for tenant, start, weight, limited in row["tenants"] or ()}
        read = self._latest_read = BacklogRead(queued, tenants, row["beyond"], row["backlog"],
                                               row["ids"])
        return row, read

    async def move(
        self, job: Job, backend: str, prompt_id: str, *, max_inflight: int,
        owner: int | None = None,
    ) -> Job | None:
        """Give a job whose prompt is off its backend now (never started, or interrupted to
        run afresh elsewhere) to `backend` under a new prompt id; no attempt is spent. None
        when `backend` has no free slot or the job is no longer where it was. The slots count
        every process's prompts on `backend`, under its lock, as a claim's take does, in one
        statement."""
        async with driver_connection(self.engine) as connection:
            row = await connection.fetchrow(_SQL["move"], job.id, job.attempts, job.prompt_id,
                                            backend, prompt_id, owner, max_inflight)
        if row is None:
            return None
        self._on_change(job.id)
        return _changed(job, row)

    async def transition(
        self, job: Job, states: Iterable[JobStatus], *, event: str | None = None,
        status: JobStatus | None = None, progress: float | None = None,
        progress_detail: dict[str, Any] | EllipsisType | None = ...,
        started_at: datetime | None = None, uploading_at: datetime | None = None,
        finished_at: datetime | None = None, outputs: list[dict[str, Any]] | None = None,
        error: dict[str, Any] | None = None,
    ) -> Job | None:
        """Write the values given (those not None; `progress_detail` whenever it is given,
        None too) if the job is still at the same attempt and prompt, in one of `states`.

        `event` (e.g. "job.started") goes into the webhook outbox with the change, by the
        same statement, when the job's client subscribed to it. Returns the updated job, or
        None when the fence did not hold (nothing was written).
        """
        detail_given, detail = _given(progress_detail)
        delivery = None
        if event is not None:
            delivery = await self._delivery(job, event, {
                "status": status, "progress": progress, "started_at": started_at,
                "uploading_at": uploading_at, "finished_at": finished_at, "outputs": outputs,
                "error": error}, progress_detail)
        leased = delivery is not None and delivery.lease_token is not None
        try:
            changed = await self._fenced(
                "transition", job, [str(state) for state in states], status, progress,
                detail_given, _json(detail), started_at, finished_at, _json(outputs),
                _json(error), _delivery_json(delivery), uploading_at,
                written=_documents(outputs, error, detail_given, detail))
        except BaseException:
            if leased:  # written or not, its lease runs out: any process's pass sends it
                self._hand_over(delivery, written=False)
            raise
        if leased:
            self._hand_over(delivery, written=changed is not None)
        return changed

    async def _delivery(
        self, job: Job, event: str, changes: dict[str, Any],
        progress_detail: dict[str, Any] | EllipsisType | None,
    ) -> deliveries.OutgoingDelivery | None:
        """The outbox row reporting `event` for `job` as the change leaves it: `changes` that
        are not None written, and `progress_detail` whenever it is given (None too); leased to
        this process's webhook worker when it has room."""
        written = {name: value for name, value in changes.items() if value is not None}
        given, detail = _given(progress_detail)
        if given:
            written["progress_detail"] = detail
        return await deliveries.delivery_row(job, event, self._webhook_slots, written)

    def _hand_over(self, delivery: deliveries.OutgoingDelivery | None, *, written: bool) -> None:
        """A delivery leased to this process's worker: `written` (then the worker sends it)
        or not (its slot is freed)."""
        assert delivery is not None and self._webhook_slots is not None
        if written:
            self._webhook_slots.written(delivery)
        else:
            self._webhook_slots.not_written(delivery)

    async def report_progress(self, reports: Sequence[ProgressReport]) -> list[Job]:
        """Record the latest progress of running jobs in one statement (sql/jobs.sql
        `progress`), each fenced as `transition` fences it, with its `job.progress` webhook
        where its client subscribed; the jobs written, as they are now."""
        rows = [_delivery_json(await deliveries.delivery_row(report.job, "job.progress", changes={
            "progress": report.progress, "progress_detail": report.detail}))
            for report in reports]
        async with driver_connection(self.engine) as connection:
            written = await connection.fetch(
                _SQL["progress"], [report.job.id for report in reports],
                [report.job.attempts for report in reports],
                [report.job.prompt_id for report in reports],
                [report.progress for report in reports],
                [_json(report.detail) for report in reports], rows)
        jobs = {report.job.id: report for report in reports}
        changed = []
        for row in written:
            report = jobs[uuid.UUID(bytes=row["id"].bytes)]
            changed.append(_changed(report.job, row, {"progress_detail": report.detail}))
        for job in changed:
            self._on_change(job.id)
        return changed

    async def finish(
        self, job: Job, status: JobStatus, states: Iterable[JobStatus], *,
        outputs: list[dict[str, Any]] | None = None, error: dict[str, Any] | None = None,
        started_at: datetime | None = None, uploading_at: datetime | None = None,
        progress: float | None = None,
        progress_detail: dict[str, Any] | EllipsisType | None = ...,
    ) -> Job | None:
        """A terminal transition (recording when the job started and ended executing, and its
        progress then, too, when given), fenced as `transition` fences it: the job ended, its
        webhook in the outbox, or None when the fence did not hold (nothing was written).

        Group commit: the ends that come while a statement writing ends is in flight wait for
        it, and the next writes them all (sql/jobs.sql `finish`, FINISH_BATCH at most), each
        fenced on its own and its caller told its own outcome; so at saturation one statement
        and one round trip end several jobs. An end that comes with none in flight is written
        at once, by its caller, by `transition`'s statement (no timer, no task; the batch's
        statement, its arrays and its locks cost a lone end about 0.15 ms more CPU). A caller
        cancelled before its end's statement is sent writes nothing; after, the end is written
        or not as the statement goes. `ended_here` waits for it meanwhile."""
        finished_at = utcnow()
        # Awaited by `ended_here` (the first caller's, if two): a context manager cost 1-1.5 us.
        written = None if job.id in self._finishing else self._finishing.setdefault(
            job.id, asyncio.get_running_loop().create_future())
        try:
            if not self._writing_ends:
                self._writing_ends = True
                try:
                    ended = await self.transition(
                        job, states, event=f"job.{status}", status=status,
                        finished_at=finished_at, outputs=outputs, error=error,
                        started_at=started_at, uploading_at=uploading_at, progress=progress,
                        progress_detail=progress_detail)
                finally:
                    if self._ends:  # came meanwhile: written after, not by this caller
                        self._ending = asyncio.create_task(self._write_ends())
                    else:
                        self._writing_ends = False
                if ended is not None:
                    self._keep_ended(ended)
                return ended
            changes = {"status": status, "finished_at": finished_at, "outputs": outputs,
                       "error": error, "started_at": started_at, "uploading_at": uploading_at,
                       "progress": progress}
            delivery = await self._delivery(job, f"job.{status}", changes, progress_detail)
            detail_given, detail = _given(progress_detail)
            end = _End(job, (
                job.id, job.attempts, job.prompt_id, ",".join(str(state) for state in states),
                str(status), finished_at, _json(outputs), _json(error), started_at,
                uploading_at, progress, detail_given, _json(detail), _delivery_json(delivery),
            ), _documents(outputs, error, detail_given, detail), delivery,
                asyncio.get_running_loop().create_future())
            self._ends.append(end)
            if not self._writing_ends:  # the writing ended while this end was built
                self._writing_ends = True
                self._ending = asyncio.create_task(self._write_ends())
            return await end.outcome
        finally:
            if written is not None:
                del self._finishing[job.id]
                written.set_result(None)

    async def _write_ends(self) -> None:
        """Write the job ends waiting (`finish`), FINISH_BATCH to a statement, until none
        waits."""
        try:
            while self._ends:
                batch, self._ends = self._ends[:FINISH_BATCH], self._ends[FINISH_BATCH:]
                await self._write(batch)
        finally:
            self._writing_ends = False
            self._ending = None
            for end in self._ends:  # cancelled (the event loop closing): not written
                self._drop(end)
            self._ends = []

    async def _write(self, batch: list[_End]) -> None:
        """sql/jobs.sql `finish` for the ends of `batch` whose callers still wait, each
        answered. A statement of several refused (but for an outage: for one end's values, a
        deadlock) wrote nothing, and is made again for each end alone: the others are
        written, and only the caller of an end refused alone is told."""
        waiting = []
        for end in batch:
            if end.outcome.cancelled():  # its caller gave up before it was sent
                self._drop(end)
            else:
                waiting.append(end)
        batch = waiting
        if not batch:
            return
        try:
            async with driver_connection(self.engine) as connection:
                rows = await connection.fetch(_SQL["finish"], *map(list, zip(
                    *(end.values for end in batch), strict=True)))
        except Exception as exc:
            if len(batch) > 1 and not unavailable(exc):
                for end in batch:
                    await self._write([end])
                return
            for end in batch:
                self._answer(end, None, exc)
            return
        except BaseException:
            for end in batch:  # written or not, nobody will know: as a caller cancelled
                self._drop(end)
            raise
        ended = {row["entry"]: row for row in rows}
        for entry, end in enumerate(batch, 1):
            row = ended.get(entry)
            self._answer(end, None if row is None else _changed(end.job, row, end.written))

    def _answer(self, end: _End, job: Job | None, error: Exception | None = None) -> None:
        """Tell `end`'s caller, if it still waits, that its job ended (`job`), was fenced out
        (None) or that the statement failed (`error`); its webhook's lease handed over, and
        the job ended kept (`ended_here`) and the readers of jobs told of it."""
        if end.delivery is not None and end.delivery.lease_token is not None:
            self._hand_over(end.delivery, written=job is not None)
        if job is not None:
            self._keep_ended(job)
            self._on_change(job.id)
        if not end.outcome.done():
            if error is not None:
                end.outcome.set_exception(error)
            else:
                end.outcome.set_result(job)

    def _keep_ended(self, job: Job) -> None:
        """`job`, ended by this process's statement, kept as it left it (`ended_here`)."""
        self._ended[job.id] = job
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)

    def _drop(self, end: _End) -> None:
        """`end` given up, written or not, its caller's wait cancelled (if it still waits):
        its webhook's lease, if any, is let go of (if the delivery was written, any process's
        pass sends it once the lease runs out)."""
        end.outcome.cancel()
        self._answer(end, None)

    async def requeue(self, job: Job, error: dict[str, Any] | None = None) -> Job | None:
        """Put a job whose prompt was lost back in the backlog; it keeps its attempt count."""
        return await self._fenced("requeue", job, _json(error))

    async def release(self, job: Job) -> Job | None:
        """Undo a claim whose prompt never reached the backend: queued again, attempt not spent."""
        return await self._fenced("release", job)

    async def _fenced(self, query: str, job: Job, *values: Any,
                      written: Mapping[str, Any] | None = None) -> Job | None:
        """Run the fenced change `query` of sql/jobs.sql on `job`, `values` after its fence;
        the job as it is now (`written`: the JSON documents the change wrote, its row's null),
        or None when nothing was written."""
        changed = await self._change(query, job, *values, written=written)
        if changed is not None:
            self._on_change(job.id)
        return changed

    async def _change(self, query: str, job: Job, *values: Any,
                      written: Mapping[str, Any] | None = None) -> Job | None:
        """`_fenced`, telling nobody (for a change no reader of jobs sees)."""
        async with driver_connection(self.engine) as connection:
            row = await connection.fetchrow(_SQL[query], job.id, job.attempts, job.prompt_id,
                                            *values)
        return _changed(job, row, written) if row is not None else None

    async def page(
        self,
        *,
        limit: int,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        after: tuple[datetime, uuid.UUID] | None = None,
        api_key_hash: str | None = None,
        labels: dict[str, str] | None = None,
        created: tuple[datetime | None, datetime | None] = (None, None),
    ) -> list[Job]:
        """Newest first; `after` is the (created_at, id) of the last job of the page before.
        With `api_key_hash`, only the jobs that key submitted; with `labels`, only those
        having all of these labels; `created`: only those created from its first time on and
        before its second. NotStorable for a `workflow` or `labels` no job can have."""
        check_storable({"workflow": workflow, "labels": labels})
        query = select(Job).order_by(col(Job.created_at).desc(), col(Job.id).desc()).limit(limit)
        if api_key_hash is not None:
            query = query.where(col(Job.api_key_hash) == api_key_hash)
        if labels:
            # Written into the statement, not bound, as `_of_states` writes states: planned
            # for these labels, which alone tell how many jobs have them (a few: from the
            # labelled jobs' index, jobs_labelled; most: a walk newest first). A pooled
            # connection's generic plan of `labels @> $n` walked every job for labels none has.
            query = query.where(col(Job.labels).contains(sqlalchemy.cast(
                literal(json_codec.dumps_text(labels), literal_execute=True), JSONB)))
        if workflow is not None:
            query = query.where(col(Job.workflow) == workflow)
        if after is not None:
            query = query.where(tuple_(col(Job.created_at), col(Job.id)) < tuple_(*after))
        since, until = created
        if since is not None:
            query = query.where(col(Job.created_at) >= since)
        if until is not None:
            query = query.where(col(Job.created_at) < until)
        if status is not None:
            query = _of_states(query, limit, {str(status)} if isinstance(status, str)
                               else set(map(str, status)))
        async with self._reads() as session:
            return list((await session.exec(query)).all())

    async def queue_position(self, job: Job) -> int:
        """1 for the queued job the next free slot takes (ignoring capability routing and
        limits). With fair share: its own key's jobs ahead of it (priority, then age), and of
        every other key as many as start before it in virtual time, each taken to run as long
        as this job's workflow usually does. Without: every job of higher priority, or as high
        and older. Exact while fewer than `exact_positions_below` jobs are queued; else
        counted in a snapshot of the backlog (positions.py), the first one waited for, which
        misses none of the changes this process was told of `position_max_age` seconds (and
        the time a read takes) before the previous ask (`Recent`). A job this
        repository stored with no other queued is 1 at its first ask within that age, without
        a read (a submit's answer)."""
        stored_alone = self._first_in_line.pop(job.id, None)
        if stored_alone is not None and time.monotonic() - stored_alone < self._position_max_age:
            return 1
        backlog = self._backlog_snapshot()
        if backlog is None:
            async with driver_connection(self._read_engine) as connection:
                rows = await connection.fetch(_CLAIM["place"], job.id,
                                              self._exact_positions_below)
            if rows[0]["deep"]:
                backlog = await self._first_snapshot()
            else:
                counted = [row for row in rows if row["own"] is not None]
                self._backlog_seen = sum(int(row["queued"]) for row in counted)
                self._backlog.forget()  # not told of changes while shallow: outdated then
                if not counted or not counted[0]["own"]:
                    return 1  # no longer queued
                own, *others = (Share(int(row["queued"]), int(row["ahead"]),
                                      float(row["start"]), float(row["weight"]))
                                for row in counted)
        if backlog is not None:
            own, others = backlog.shares(job.api_key_hash or "", job.priority, job.created_at)
        if not self._fair_share or not others:
            return own.ahead + sum(other.ahead for other in others) + 1
        seconds = await self.recent_run_seconds(job.workflow) or UNKNOWN_RUN_SECONDS
        return fair_position(own, others, seconds)

    def _backlog_snapshot(self) -> Backlog | None:
        """The snapshot of the backlog to count positions in, without waiting for a read:
        None while the backlog last seen was shallow, or none of it deep is read yet."""
        if self._backlog_seen < self._exact_positions_below:
            return None
        snapshot = self._backlog.latest()
        return snapshot if snapshot is not None \
            and snapshot.size >= self._exact_positions_below else None

    async def _first_snapshot(self) -> Backlog:
        """A snapshot of the backlog `place` found deep, where none of it deep is read yet:
        the first read, which every ask meanwhile waits for (each counting exactly instead,
        side by side, they piled up: 50 ms each at 100,000 queued jobs). Read anew if the one
        it waited for, begun before, found the backlog shallow."""
        self._backlog_seen = max(self._backlog_seen, self._exact_positions_below)
        snapshot = self._backlog.latest()
        if snapshot is not None and snapshot.size >= self._exact_positions_below:
            return snapshot  # read since this ask's `place` began
        self._backlog.forget()  # a shallow one's, if any: not to be counted in
        snapshot = await self._backlog.get()
        if snapshot.size < self._exact_positions_below:
            snapshot = await self._backlog.fresh()
        return snapshot

    async def _read_backlog(self) -> Backlog:
        async with driver_connection(self._read_engine) as connection:
            snapshot = Backlog.from_rows(await connection.fetch(_CLAIM["backlog"]))
        self._backlog_seen = snapshot.size
        return snapshot

    async def typical_run_seconds(
        self, workflow: str, backend: str | None = None, sample: int = 20
    ) -> float | None:
        """Mean start-to-finish time of the workflow's latest successful jobs on `backend`;
        on any backend when `backend` is None or has run none yet. None without any."""
        async with driver_connection(self._read_engine) as connection:
            mean = await connection.fetchval(_READS["mean_run_seconds"], workflow, backend,
                                             sample)
        return float(mean) if mean is not None else None

    async def recent_run_seconds(self, workflow: str, backend: str | None = None
                                 ) -> float | None:
        """`typical_run_seconds(workflow, backend)`, read at most once per
        `position_max_age` seconds by this process, in the background but the first (the
        asks meanwhile sharing the last read): what a queued job's position and ETA take its
        run to be (on any backend), and a dispatched job's ETA (on its backend), asked at
        every GET of the job."""
        key = (workflow, backend)
        recent = self._run_seconds.get(key)
        if recent is None:
            recent = self._run_seconds[key] = Recent(
                partial(self.typical_run_seconds, workflow, backend), self._position_max_age)
            if len(self._run_seconds) > RUN_TIMES_KEPT:  # v2 graphs: any shape a client sends
                self._run_seconds.popitem(last=False)
        else:
            self._run_seconds.move_to_end(key)
        return await recent.get()

    async def recent_work_on_backends_seconds(self) -> float:
        """`work_on_backends_seconds()`, read at most once per `position_max_age` seconds
        by this process, in the background but the first (the asks meanwhile sharing the
        last read): what every queued job waits behind."""
        return await self._work_on_backends.get()

    async def next_finish_seconds(self, tenant: Tenant | None = None) -> float | None:
        """Expected seconds until the next job on a backend ends (of `tenant`, or of anyone),
        freeing a slot for the head of the backlog (sql/reads.sql `left_on_backends`). None
        when no such job is on a backend."""
        soonest = (await self._left_on_backends(tenant, None))["soonest"]
        return float(soonest) if soonest is not None else None

    async def work_on_backends_seconds(self, ahead_of: Job | None = None) -> float:
        """Expected seconds the jobs on backends have left, all told (sql/reads.sql
        `left_on_backends`): the work every queued job waits behind; with `ahead_of` (a job
        sent to a backend), only that of the jobs sent to its backend before it."""
        return float((await self._left_on_backends(None, ahead_of))["total"])

    async def _left_on_backends(self, tenant: Tenant | None, ahead_of: Job | None
                                ) -> asyncpg.Record:
        async with driver_connection(self._read_engine) as connection:
            row: asyncpg.Record = await connection.fetchrow(
                _READS["left_on_backends"],
                tenant is not None, tenant.api_key_hash if tenant is not None else None,
                ahead_of is not None, ahead_of.backend if ahead_of is not None else None,
                ahead_of.dispatched_at if ahead_of is not None else None, RUN_TIME_SAMPLE)
        return row

    async def tenant_activity(self, window: timedelta) -> list[TenantActivity]:
        """Each key with jobs unfinished, or run within `window` until now: its jobs queued and
        on backends, and the seconds its jobs ran (start to end) within the window."""
        since = func.now() - window
        ran = func.greatest(
            func.extract("epoch", func.coalesce(_table.c.finished_at, func.now())
                         - func.greatest(_table.c.started_at, since)), 0)
        on_backend = _table.c.status.in_([str(state) for state in ON_BACKEND_STATES])
        query = (
            select(
                _table.c.api_key_hash,
                func.count().filter(_table.c.status == JobStatus.QUEUED),
                func.count().filter(on_backend),
                # A queued job's start is that of an attempt given back: not running now.
                func.coalesce(func.sum(ran).filter(_table.c.started_at.is_not(None),
                                                   _table.c.status != JobStatus.QUEUED), 0.0),
            )
            # Each side of the OR from a partial index: the unfinished jobs', the ran ones'.
            .where(sqlalchemy.or_(UNFINISHED, _table.c.started_at.is_not(None)
                                  & (_table.c.finished_at > since)))
            .group_by(_table.c.api_key_hash)
        )
        async with self._reads() as session:
            rows = (await session.exec(query)).all()
        return [TenantActivity(key, queued, running, float(seconds or 0.0))
                for key, queued, running, seconds in rows]

    async def unfinished_counts(self) -> list[tuple[str, str, int]]:
        """(status, workflow, count) of the jobs not finished yet, in every process."""
        async with self._statements() as session:
            result = await session.exec(
                select(col(Job.status), col(Job.workflow), func.count())
                .where(col(Job.status).in_([str(state) for state in UNFINISHED_STATES]))
                .group_by(col(Job.status), col(Job.workflow))
            )
            return [(status, workflow, count) for status, workflow, count in result.all()]

    async def take_over(self, job: Job, owner: int) -> Job | None:
        """Make `owner` the process following `job`, if no other process took it first."""
        return await self._change("take_over", job, owner, job.dispatched_by)

    async def on_backend(
        self, backend: str | None = None, *, unless_followed_by: Iterable[int] = ()
    ) -> list[Job]:
        """The jobs on `backend` (on any backend when None): dispatched, running or uploading;
        without those the processes `unless_followed_by` dispatched."""
        async with driver_connection(self.engine) as connection:
            rows = await (
                connection.fetch(_SQL["unfollowed"], list(unless_followed_by)) if backend is None
                else connection.fetch(_SQL["on_backend"], backend))
        return [_job(row) for row in rows]

    async def extra_data_lost(self, live: Iterable[int]) -> list[Job]:
        """The queued jobs whose extra_data a process not among `live` held, which nobody can
        send now (jobs/extra_data.py)."""
        async with driver_connection(self.engine) as connection:
            rows = await connection.fetch(_SQL["extra_data_lost"], list(live))
        return [_job(row) for row in rows]

    async def ended_among(self, job_ids: Iterable[uuid.UUID]) -> set[uuid.UUID]:
        """Those of `job_ids` that have ended."""
        async with driver_connection(self.engine) as connection:
            rows = await connection.fetch(_SQL["ended_among"], list(job_ids))
        return {row["id"] for row in rows}


def _of_states(newest: SelectOfScalar[Job], limit: int, states: set[str]) -> SelectOfScalar[Job]:
    """`newest` (a page of jobs, newest first) of those in one of `states`. Each state is
    written into the statement, not bound: a pooled connection's generic plan of
    `status = $n` can use none of the indexes holding some states only. Each state's jobs are
    read by an index of their own and merged: the newest of a state off the backends from
    jobs_by_status_newest, and every job of a state on them (as many as the backends' slots)
    by jobs_on_backend, behind an OFFSET that keeps the planner from walking every job newest
    first for them instead (with the page's LIMIT, a walk looks cheap wherever those jobs
    are). As one walk of every job filtered by state, a page of states whose jobs are not the
    newest (v2's `queued`, queued and dispatched, behind a day's newer history) read every
    job newer than its last, or sorted every job of those states, for each page. Merged by
    id and created_at only: a union of whole jobs cost SQLAlchemy 2 ms to build."""
    keys = newest.with_only_columns(col(Job.id), col(Job.created_at))
    parts = [keys.where(col(Job.status) == literal(state, literal_execute=True))
             for state in sorted(states - ON_BACKEND_STATES)]
    on_backends = [keys.where(col(Job.status) == literal(state, literal_execute=True))
                   .order_by(None).limit(None).offset(0)
                   for state in sorted(states & ON_BACKEND_STATES)]
    if len(parts) == 1 and not on_backends:
        return newest.where(col(Job.status) == literal(min(states), literal_execute=True))
    if not parts + on_backends:
        return newest.where(sqlalchemy.false())
    page = union_all(*parts, *on_backends).subquery()
    return select(Job).join(page, col(Job.id) == page.c.id) \
        .order_by(page.c.created_at.desc(), page.c.id.desc()).limit(limit)


async def lock_backend(connection: asyncpg.Connection, backend: str) -> None:
    """Serialise the claims and moves for `backend` (and its removal from the fleet), in every
    process, until `connection`'s transaction ends (claim_locks(), migration 0031, takes the
    same lock for them); a statement after this one sees every claim committed before it."""
    await connection.execute(_SQL["lock"], backend)


def _job(row: Mapping[str, Any]) -> Job:
    """A job from a row of fixed SQL (`comfyfleet.sql`), ids as plain UUIDs.

    Built without `Job(...)`: a table model's constructor sets each field through SQLAlchemy's
    instrumentation (a tenth of a millisecond a job), and the row is our own database's, in
    the shapes the model holds (JSONB decoded by the connection's codec, timestamps aware,
    status as text). So the job is a plain model, not an ORM instance: nothing adds it to a
    session (the ORM's reads load their own)."""
    return _built({name: row[name] for name in _JOB_FIELDS})


def _taken(job: QueuedJob, row: Mapping[str, Any]) -> Job:
    """The job `job` of a claim's read as the claim's take left it: the columns of its row
    (sql/claim.sql `claim`), and those no statement changes once a job is stored as the read
    gave them (its prompt, tens of KB, decoded once while it stays near the head). Built as
    `_job` builds a job, for the same reasons."""
    read = {"id": job.id, "workflow": job.workflow, "prompt": job.prompt,
            "priority": job.priority, "created_at": job.created_at}
    return _built({name: row[name] if taken else read[name] for name, taken in _FIELDS_TAKEN})


def _built(values: dict[str, Any]) -> Job:
    """The job of a row's `values` (`_job`), every field in the model's order, its ids as
    plain UUIDs (asyncpg's are not)."""
    for name in ("id", "reused_from"):
        if values[name] is not None:
            values[name] = uuid.UUID(bytes=values[name].bytes)
    return constructed(Job, values)


def _changed(job: Job, row: Mapping[str, Any], written: Mapping[str, Any] | None = None
             ) -> Job:
    """`job` as a fenced change left it: the columns a change may touch from `row` (its
    RETURNING), but those of `written` (JSON documents the change wrote, which the row does
    not repeat: see sql/jobs.sql's head), the others as they were (`transition` returns the
    id too, for the outbox). A plain model, as `_job` builds one; its fields read from
    `job.__dict__`, where every model keeps them (the ORM's loads too, never expired here),
    not each through the ORM's attribute."""
    kept = job.__dict__
    values = {name: row[name] if changing else kept[name]
              for name, changing in _FIELDS_CHANGING}
    if written:
        values.update(written)
    return constructed(Job, values)


def _documents(outputs: list[dict[str, Any]] | None, error: dict[str, Any] | None,
               detail_given: bool, detail: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON documents a change of sql/jobs.sql (`transition`, `finish`) writes, by
    column: outputs and error given (not None), the progress detail when given. Its row
    gives them null, as the connection would decode each again (a job's outputs at its
    end)."""
    written: dict[str, Any] = {}
    if outputs is not None:
        written["outputs"] = outputs
    if error is not None:
        written["error"] = error
    if detail_given:
        written["progress_detail"] = detail
    return written


async def _store(
    connection: asyncpg.Connection, job: Job, document: str, row: str | None,
    held: tuple[Any, ...], shallow: bool, backlog: BacklogLimits | None,
    dispatch: Callable[[asyncpg.Connection], Awaitable[Job | None]] | None,
) -> tuple[asyncpg.Record | None, Job | None]:
    """`insert`'s statements on `connection` for `job`, its row `document` (`_document`):
    the `insert` row (None: a repeat) and the job as `dispatch` took it in the same
    transaction (None: not taken); _Undispatched when `dispatch` failed."""
    if backlog is None and dispatch is None:
        return await connection.fetchrow(_SQL["insert"], document, row, *held,
                                         shallow), None
    taken = None
    async with connection.transaction():
        if backlog is not None:
            await _check_backlog(connection, job, backlog)
        stored = await connection.fetchrow(_SQL["insert"], document, row, *held, shallow)
        if stored is not None and dispatch is not None:
            try:
                taken = await dispatch(connection)
            except Exception as exc:
                raise _Undispatched from exc
    return stored, taken


async def _by_client_task_id(connection: asyncpg.Connection, job: Job) -> Job:
    """The job stored before `job` under its client_task_id (`insert`'s repeat)."""
    return _job(await connection.fetchrow(_SQL["by_client_task_id"], job.client_task_id,
                                          job.api_key_hash, job.source))


async def _check_backlog(
    connection: asyncpg.Connection, job: Job, backlog: BacklogLimits
) -> None:
    """Raise QueueFull when `job` would pass `backlog`, in the caller's transaction."""
    # Serialised (the whole service's submits first, then the key's, always in that order),
    # so concurrent submits cannot all pass the count together.
    counts: list[tuple[Literal["key", "service"], int, bool]] = []
    if backlog.total is not None:
        await connection.execute(_SQL["lock"], "backlog")
        counts.append(("service", backlog.total, False))
    if backlog.per_key is not None:
        await connection.execute(_SQL["lock"], f"quota:{job.api_key_hash}")
        # The key's own limit is told first: the caller can do something about it.
        counts.insert(0, ("key", backlog.per_key, True))
    for scope, limit, of_key in counts:
        found: int = await connection.fetchval(_SQL["queued"], of_key, job.api_key_hash)
        if found < limit:
            continue
        if job.client_task_id is not None and await connection.fetchrow(
                _SQL["by_client_task_id"], job.client_task_id, job.api_key_hash,
                job.source) is not None:
            return  # the insert finds the existing job
        raise QueueFull(scope, found, limit)


def _given(progress_detail: dict[str, Any] | EllipsisType | None
           ) -> tuple[bool, dict[str, Any] | None]:
    """Whether a progress detail is to be written (given, None too), and what."""
    if isinstance(progress_detail, EllipsisType):
        return False, None
    return True, progress_detail


def _document(job: Job) -> str:
    """The row of `job` as `insert` sends it (JSON text, a column by name); NotStorable first
    for a value PostgreSQL refuses. Its fields as the model keeps them (read as `_changed`
    reads them, no copy made as `model_dump` makes one), those that are None left out (a key
    jsonb_populate_record does not find is null), in orjson's JSON, a third of pydantic's time,
    written once and checked as written (`storable_json`); pydantic's (`model_dump_json`)
    where orjson refuses (an integer beyond 64 bits, a key that is not text)."""
    fields = vars(job)
    text = storable_json({name: value for name in _JOB_FIELDS
                          if (value := fields[name]) is not None}, _table)
    return text.decode() if text is not None else job.model_dump_json()


def _json(value: Any) -> str | None:
    """A JSONB parameter of the named queries (sent as JSON text); None stays NULL."""
    return json_codec.dumps_text(value) if value is not None else None


def _delivery_json(delivery: deliveries.OutgoingDelivery | None) -> str | None:
    """An outbox row as the named queries take it (`deliveries.row_json`); None stays NULL."""
    return deliveries.row_json(delivery) if delivery is not None else None
