"""Following our prompts on the backends: websocket events -> job transitions.

Events can be missed (a socket drops, the gateway restarts), so after every connect the jobs
recorded on a backend are reconciled through `/history/{prompt_id}` and `/queue`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any

from comfyfleet import metrics
from comfyfleet.comfy.client import ComfyError
from comfyfleet.comfy.messages import (
    Binary,
    Executed,
    Executing,
    ExecutionCached,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    Message,
    Preview,
    Progress,
    Status,
    parse_event,
)
from comfyfleet.comfy.prompts import isolate_outputs
from comfyfleet.execution.collector import Collector, EarlyOutputs
from comfyfleet.execution.costs import NodeCosts
from comfyfleet.execution.endings import Endings, JobEnded
from comfyfleet.execution.run_times import MIN_PROGRESS_TO_JUDGE, RunTimes
from comfyfleet.execution.session import BackendSession
from comfyfleet.execution.signals import DispatchSignals
from comfyfleet.execution.starts import ExecutionEnd, UnrecordedEnd, UnrecordedStart
from comfyfleet.execution.warm import PromptKeys
from comfyfleet.jobs.deliveries import subscribed
from comfyfleet.jobs.extra_data import EXTRA_DATA_LOST, HeldExtraData
from comfyfleet.jobs.lease import ProcessLease
from comfyfleet.jobs.models import (
    ON_BACKEND_STATES,
    Job,
    JobStatus,
    constructed,
    job_error,
    utcnow,
)
from comfyfleet.jobs.notices import JobNotices, LogLine, PreviewImage
from comfyfleet.jobs.repository import JobRepository, ProgressReport
from comfyfleet.logs import job_fields
from comfyfleet.pulse import Pulse

log = logging.getLogger(__name__)

# Seconds between the statements writing the latest progress of every running job (one
# statement for them all), and between a job's start written with its progress and the
# dispatch it follows.
PROGRESS_WRITE_INTERVAL = 0.5
# How long a job's start waits to be recorded (`running`) on its own: a prompt that ends
# executing sooner has its start recorded by the same statement as its end (`uploading`), and
# a progress report sooner carries it too.
START_WRITE_DELAY = 0.2
# How long a prompt's end of executing (`uploading`) waits to be recorded on its own: outputs
# stored sooner (a few round trips to the backend and to storage, milliseconds for an image)
# have it recorded by the statement recording the job's end, so a job costs one transaction
# fewer. Meanwhile the job shows `running` (or `dispatched`) with its prompt done; an upload
# that takes longer shows `uploading`. Other processes' claims count the prompt's slot taken
# until it is recorded: one that waits for it says so (`peer_waiting`), and ends are then
# written at once.
END_WRITE_DELAY = 0.5
WATCH_INTERVAL = 1.0  # seconds between passes of the safety net


class PromptRun:
    """One of our prompts on its backend, followed from its dispatch to its end of executing.
    A class with slots and an __init__ of its own, not a dataclass: a job makes one as it is
    dispatched, and the dataclass's __init__ called a factory for each of seven of its fields
    (three clock reads among them) and a __post_init__."""

    __slots__ = ("adopted", "dispatched", "early", "executed", "job", "job_id", "last_heard",
                 "last_write", "moving", "node_running", "node_seconds", "node_started",
                 "nodes_done", "prompt", "prompt_id", "report", "sent_keys", "served",
                 "session", "start", "started", "started_on", "step_fraction", "stepped_at",
                 "steps", "withdrawn")

    def __init__(self, session: BackendSession, job: Job, *, adopted: bool = False) -> None:
        now = time.monotonic()
        self.session = session
        self.job = job
        # Queued by an earlier process or socket: its events go to a client id that is gone,
        # so only /history tells when it ends.
        self.adopted = adopted
        self.nodes_done = 0  # cached or finished nodes
        self.node_running: str | None = None
        self.node_started = 0.0  # monotonic time of node_running's `executing`
        self.node_seconds = 0.0  # what its nodes that ran took, in all
        self.dispatched = now  # when it was given its backend
        # The cache keys of the prompt as sent, or how to work them out (`keys`).
        self.sent_keys: PromptKeys | Callable[[], PromptKeys] | None = None
        # The keys its backend served from cache as it started.
        self.served: frozenset[str] = frozenset()
        # Monotonic time of the job's last write, or of its start: a progress report carries
        # the start no sooner than PROGRESS_WRITE_INTERVAL after it (its timer writes it
        # sooner), so a prompt that waited its turn behind another and ends as it starts has
        # it written with its end.
        self.last_write = now
        self.last_heard = now  # an event, or a history check
        self.started: float | None = None  # monotonic time of its execution_start
        # The connection to its backend its execution_start came on (None once a message of
        # its was let go unread: those heard are not all).
        self.started_on: int | None = None
        # Its `executed` messages: node -> UI (None: a node served from cache that has none).
        self.executed: dict[str, dict[str, Any] | None] = {}
        self.start = UnrecordedStart()
        self.step_fraction = 0.0  # of the node reporting progress (a sampler's steps)
        self.stepped_at = 0.0  # monotonic time of the report of step_fraction
        self.steps: tuple[int, int] | None = None  # the running node's step, out of how many
        # Its latest progress: the nodes done (the running one's fraction with them), the node
        # running and its step. Worded as the job's (`reported`) only when written: once for
        # the frames of an interval, not at each (a progress frame a step).
        self.report: tuple[float, str | None, tuple[int, int] | None] = (0.0, None, None)
        self.early = EarlyOutputs()  # files stored while it runs
        # Being taken off its backend by the dispatcher, which reads its outcome from /history.
        self.moving = False
        # Taken off its backend to move, the write saying where its job goes having failed
        # (the database away): whatever its backend says of it, the job goes back to the
        # backlog.
        self.withdrawn = False
        # Its job's, read once: a job's fields are SQLAlchemy attributes (0.2 us a read), and
        # every frame of the prompt (a progress frame per step) reads them. A newer copy of
        # the job (`job` after a write) has the same.
        prompt_id = job.prompt_id
        assert prompt_id is not None
        self.job_id: uuid.UUID = job.id
        self.prompt_id: str = prompt_id
        self.prompt: dict[str, Any] = job.prompt

    @property
    def keys(self) -> PromptKeys | None:
        """The cache keys of the prompt as sent (None: a run made up to end a prompt from its
        history), worked out the first time they are asked for."""
        if callable(self.sent_keys):
            self.sent_keys = self.sent_keys()
        return self.sent_keys

    @property
    def reported(self) -> tuple[float, dict[str, Any] | None]:
        """Its latest progress report (`report`) as the job's `progress` and
        `progress_detail` (the node running and its step out of how many)."""
        done, node, steps = self.report
        progress = min(max(done / max(len(self.prompt), 1), 0.0), 0.99)
        if node is None:
            return progress, None
        class_type = self.prompt.get(node, {}).get("class_type")
        step, of = steps if steps is not None else (None, None)
        return progress, {"node": node,
                          "class_type": class_type if isinstance(class_type, str) else None,
                          "step": step, "steps": of}


class ExecutionTracker:
    def __init__(
        self,
        repository: JobRepository,
        collector: Collector,
        *,
        max_attempts: int,
        endings: Endings,
        signals: DispatchSignals,
        quiet_seconds: float,
        grace_seconds: float,
        events: JobNotices,
        run_times: RunTimes,
        node_costs: NodeCosts,
        lease: ProcessLease,
        extra_data: HeldExtraData,
        queued: Pulse,
    ) -> None:
        """`queued` beats when any process put a job back in the backlog (or another process
        queued one): a job whose extra_data's holder is gone may be among them."""
        self._queued = queued
        self._events = events
        self._lease = lease
        self._extra_data = extra_data
        self._run_times = run_times
        self._node_costs = node_costs
        self._repository = repository
        self._quiet_seconds = quiet_seconds
        self._grace_seconds = grace_seconds
        self._abandoned: set[str] = set()  # backends whose prompts were given up after the grace
        self._collector = collector
        self._max_attempts = max_attempts
        self._endings = endings
        self._signals = signals
        self._runs: dict[str, PromptRun] = {}
        # The runs that are `adopted`, by prompt: looked for at every `status` frame (every
        # queue change of every backend), which finds none as a rule.
        self._adopted: set[str] = set()
        self._last_end: dict[str, float] = {}  # by backend: when our last prompt there ended
        self._submitting: set[str] = set()
        # Prompts whose end was read, their jobs not yet recorded off their backends: they
        # hold their backends' slots no longer for this process's claims (`ended`), and are
        # released once it is.
        self._ending: set[str] = set()
        # The ends of executing left to the job's end (`_defer_end`), by prompt, each with its
        # run: its slot is released once the end is recorded. The writes of their own under
        # way, and the task that starts them all at once when another process waits.
        self._deferred_ends: dict[str, tuple[PromptRun, UnrecordedEnd]] = {}
        self._end_writes: set[asyncio.Task[None]] = set()
        self._ends_wanted: asyncio.Task[None] | None = None
        self._collecting: dict[str, asyncio.Task[None]] = {}
        # The runs whose latest progress is still to be written, and the task writing it.
        self._progressing: dict[str, PromptRun] = {}
        self._progress_writer: asyncio.Task[None] | None = None
        self._progress_written = 0.0  # monotonic time of the last statement writing it

    # The dispatcher's side: a prompt about to be POSTed, and whether the POST took.

    def track(
        self, session: BackendSession, job: Job, *, submitting: bool = False,
        adopted: bool = False, keys: PromptKeys | None = None,
        sent: dict[str, Any] | None = None,
    ) -> None:
        """Follow `job`'s prompt on `session`; `keys`: those of the job's prompt (before
        `isolate_outputs`), if known; `sent`: the prompt as sent (`isolate_outputs`'), if
        made already. The keys of the prompt as sent are worked out when first
        asked for: for a prompt being sent, once its POST /prompt has gone out (`submitted`),
        not on the way to it (they were most of the CPU between a claim's commit and the
        POST, 0.1 ms at a load of 6 on 2 cores)."""
        run = PromptRun(session, job, adopted=adopted)
        keyed_by_id = session.capabilities.keyed_by_id if session.capabilities else frozenset()

        def sent_keys() -> PromptKeys:
            prompt = sent if sent is not None else isolate_outputs(job.prompt, run.prompt_id)
            return keys.of_copy(prompt, keyed_by_id) if keys is not None \
                else PromptKeys(prompt, keyed_by_id)

        run.sent_keys = sent_keys
        self._runs[run.prompt_id] = run
        if adopted:
            self._adopted.add(run.prompt_id)
        else:
            self._adopted.discard(run.prompt_id)
        session.hold(run.prompt_id)
        if submitting:
            self._submitting.add(run.prompt_id)

    def is_tracked(self, prompt_id: str) -> bool:
        return prompt_id in self._runs

    def runs_on(self, session: BackendSession) -> list[PromptRun]:
        """Our prompts on `session` that have not finished executing, oldest first."""
        return [self._runs[prompt_id] for prompt_id in session.inflight
                if prompt_id in self._runs and prompt_id not in self._ending]

    def slots_taken(self, session: BackendSession) -> int:
        """How many of `session`'s slots our prompts take: those held there but the ones
        whose end was read (a prompt that ended holds no GPU, recorded or not)."""
        # In C, not a generator: a claim asks it of every backend (half the CPU).
        return len(session.inflight) - len(self._ending.intersection(session.inflight))

    def ended(self) -> frozenset[str]:
        """Our prompts known to be off their backends (their end read; or failed, rejected,
        lost: `leaving`), their jobs not yet recorded off them: the database counts them in
        their backends' slots still, and a claim of this process counts them out."""
        return frozenset(self._ending)

    def movable_runs(self) -> list[PromptRun]:
        """Our prompts on backends whose events we follow (so we know whether they started),
        not ended."""
        return [run for prompt_id, run in self._runs.items()
                if not run.adopted and not run.moving and not run.withdrawn
                and prompt_id not in self._submitting
                and prompt_id not in self._ending]

    def submitted(self, prompt_id: str) -> None:
        """The POST /prompt of `prompt_id` was answered (or failed): its keys are worked out
        now, while its backend starts it, unless something asked for them already."""
        self._submitting.discard(prompt_id)
        run = self._runs.get(prompt_id)
        if run is not None and callable(run.sent_keys):
            run.sent_keys = run.sent_keys()

    def forget(self, prompt_id: str) -> None:
        """Stop following a prompt that left its backend otherwise (cancelled, moved, lost,
        failed, never sent) and release its slot."""
        run = self._unfollow(prompt_id)
        if run is not None:
            self._signals.slot_freed()
            self._release(run.session, prompt_id)

    @contextlib.asynccontextmanager
    async def leaving(self, prompt_id: str) -> AsyncIterator[None]:
        """Around the write recording that a prompt left its backend (failed, rejected, lost,
        never taken): it is followed no more, and its slot is free for this process's claims
        at once (`ended`) but released only once the write has ended. Released before the
        write, it was counted busy in the database by the claim the release woke, and nothing
        woke one after the write.

        A write that fails (the database away) leaves the prompt followed, and held in every
        count, as if it had not left: the safety net (`watch`) or the next reconciliation
        finds it gone and writes it again. Let go, it would stay in the database as it was,
        looked at by no one while its backend stays connected."""
        run = self._unfollow(prompt_id)
        if run is None:
            yield
            return
        self._ending.add(prompt_id)
        self._signals.slot_freed()
        try:
            yield
        except BaseException:
            self._ending.discard(prompt_id)
            if self._runs.setdefault(prompt_id, run) is run and run.adopted:
                self._adopted.add(prompt_id)
            raise
        self._release(run.session, prompt_id)

    def withdrawn(self, run: PromptRun) -> None:
        """`run`'s prompt is off its backend for a move whose write failed (the database
        away): followed still, by the safety net (`watch`) or the next reconciliation, which
        put its job back in the backlog (`put_back`) once the database is back."""
        run.moving = False
        run.withdrawn = True

    async def put_back(self, run: PromptRun) -> None:
        """Put the job of a prompt the dispatcher took off its backend back in the backlog:
        released if it never started, else requeued (it spent its attempt)."""
        async with self.leaving(run.prompt_id):
            await (self._repository.release(run.job) if run.started is None
                   else self._repository.requeue(run.job))
        self._signals.job_queued()

    def _unfollow(self, prompt_id: str) -> PromptRun | None:
        """Stop following a prompt (its slot stays held); the run, if it was followed."""
        self._submitting.discard(prompt_id)
        run = self._runs.pop(prompt_id, None)
        if run is None:
            return None
        self._adopted.discard(prompt_id)
        run.early.closed = True
        if run.start.at is not None:
            run.start.drop()  # it ended otherwise: cancelled, lost, moved
        return run

    def _release(self, session: BackendSession, prompt_id: str) -> None:
        """The prompt is off its backend in the database's count too: its slot is released
        (a drain waiting for the backend to go idle hears it)."""
        self._ending.discard(prompt_id)
        session.release(prompt_id)
        self._signals.slot_released()

    # Websocket events.

    async def on_message(self, session: BackendSession, message: Message | Binary) -> None:
        if isinstance(message, Preview):
            self._preview(message)
            return
        if isinstance(message, Status):
            if self._adopted:
                await self._poll_adopted(session)
            return
        prompt_id = getattr(message, "prompt_id", None)
        run = self._runs.get(prompt_id) if prompt_id is not None else None
        if run is None or run.session is not session:
            return  # not ours (another client's prompt, one already finished)
        if run.moving:  # read from /history now; should it stay, those heard are not all
            run.started_on = None
            return
        run.last_heard = time.monotonic()
        match message:  # progress first: a frame per step, the most of a prompt's frames
            case Progress(value=value, max=maximum) if maximum > 0:
                told = run.step_fraction >= MIN_PROGRESS_TO_JUDGE
                run.step_fraction, run.stepped_at = value / maximum, time.monotonic()
                run.steps = (int(value), int(maximum))
                if not told and run.step_fraction >= MIN_PROGRESS_TO_JUDGE:
                    self._signals.length_known()  # it may be worth moving now
                await self._report_progress(run, value / maximum)
            case ExecutionStart():
                self._started(session, run)
            case ExecutionCached(nodes=nodes):
                run.nodes_done += len(nodes)
                if nodes:
                    self._log(run, "info", "served from the backend's cache: node%s %s",
                              "s" if len(nodes) > 1 else "", ", ".join(nodes))
                self._check_cache(run, nodes)
            case Executing(node=None):
                await self._executed_all(session, run)
            case Executing(node=node):
                self._node_ran(run)  # a new node starting ends the previous one
                run.node_running, run.node_started = node, time.monotonic()
                run.steps = None
                await self._report_progress(run, 0.0)
            case Executed(node=str(node), output=output):
                run.executed[node] = output
                if output is not None and self._collector.store_early(
                        session.client, run.job, {node: output}, run.early, run.start):
                    # Its GET /view goes out now: a short prompt's end comes in the same read
                    # as its last output, and handling that end came before the task ran.
                    await asyncio.sleep(0)
            case ExecutionError(exception_message=exception, traceback=trace):
                # As ComfyUI's own console says it.
                self._log(run, "error", "!!! Exception during processing !!! %s", exception)
                if trace:
                    self._log(run, "error", "".join(trace))
                await self._fail(run, _execution_error(message))
            case ExecutionInterrupted(node_id=node_id, node_type=node_type):
                self._log(run, "info", "Processing interrupted")
                await self._fail(run, job_error(
                    "interrupted", "the prompt was interrupted on the backend",
                    node_id=node_id, node_type=node_type))

    def _started(self, session: BackendSession, run: PromptRun) -> None:
        """`execution_start`: the prompt began executing on `session`'s backend. Its start is
        recorded by the first write of the job to come, or on its own START_WRITE_DELAY later
        (a timer, not a task: most prompts' starts are recorded by another write first)."""
        run.started = run.last_write = time.monotonic()
        run.started_on = session.connections
        self._log(run, "info", "execution started on backend %s", session.name)
        run.start.at = utcnow()
        run.start.timer = asyncio.get_running_loop().call_later(
            START_WRITE_DELAY, self._write_start, run)

    async def _executed_all(self, session: BackendSession, run: PromptRun) -> None:
        """`executing` with no node: the prompt ran to its end on `session`'s backend."""
        self._node_ran(run)
        self._held_for(run)
        if run.started is not None:
            seconds = time.monotonic() - run.started
            self._run_times.record(session.name, run.job.workflow, seconds)
            self._log(run, "info", "Prompt executed in %.2f seconds", seconds)
        await self._finished_executing(run, self._outputs_heard(run))

    def _check_cache(self, run: PromptRun, served: list[str]) -> None:
        keys = run.keys
        if keys is None:
            return
        run.served = frozenset(keys.keys[node] for node in served if node in keys.keys)
        for node in served:
            if node in keys.prompt:
                self._node_costs.served(str(keys.prompt[node].get("class_type")))
        if not run.session.warm.started(keys, served):
            log.info("backend %s served %d nodes of prompt %s from its cache, not as predicted;"
                     " its cache model is corrected", run.session.name, len(served),
                     run.prompt_id)

    def _node_ran(self, run: PromptRun) -> None:
        """The node running (if any) finished: the backend holds its result now."""
        node_id = run.node_running
        if node_id is None:
            return
        run.nodes_done += 1
        run.node_running = None
        keys = run.keys
        key = keys.keys.get(node_id) if keys is not None else None
        if keys is not None and key is not None:
            run.session.warm.ran(keys, node_id)
            class_type = str(keys.prompt[node_id].get("class_type"))
            seconds = time.monotonic() - run.node_started
            run.node_seconds += seconds
            # A node whose key as sent is not its key as queued (`isolate_outputs` put the
            # prompt's id in its output's prefix, or it follows such a node) has a key no
            # other prompt has: placement weighs queued prompts' keys, so that key's samples
            # would be read by nobody, only its class's.
            self._node_costs.record(run.session.name, key, class_type, seconds,
                                    own=node_id in keys.changed)

    def _held_for(self, run: PromptRun) -> None:
        """`run` ended executing: what it held its backend for beyond its nodes' time, from
        its dispatch or, if later, the end of our prompt before it there (prompts run one
        at a time: a prompt queued behind another waits for it, which is that one's time)."""
        now, name = time.monotonic(), run.session.name
        held_since = max(run.dispatched, self._last_end.get(name, 0.0))
        self._node_costs.record_overhead(name, max(now - held_since - run.node_seconds, 0.0))
        self._last_end[name] = now

    def _log(self, run: PromptRun, level: str, message: str, *args: object) -> None:
        """A line of the job's execution log, for whoever follows the job now (the v2 `log`
        event): said of the prompt's own messages, never ComfyUI's server-wide console, which
        tells of other callers' prompts too. `message` % `args` (as `logging` formats), only
        when someone follows the job: a few lines a job that nobody reads as a rule."""
        job_id = run.job_id
        if self._events.followed(job_id):
            self._events.log(job_id, LogLine(level, message % args if args else message))

    def _preview(self, preview: Preview) -> None:
        run = self._runs.get(preview.prompt_id) if preview.prompt_id else None
        if run is not None:
            self._events.preview(run.job_id, PreviewImage(preview.node_id, preview.image_type,
                                                          preview.image))

    async def _poll_adopted(self, session: BackendSession) -> None:
        """The queue changed (`status` is broadcast): see whether adopted prompts ended."""
        # Looked for among the prompts held on `session` (as every run there is), not among
        # all the adopted runs: `status` comes with every queue change on every backend.
        adopted = [run for prompt_id in session.inflight
                   if (run := self._runs.get(prompt_id)) is not None and run.adopted
                   and run.session is session]
        for run in adopted:
            entry = await session.client.history(run.prompt_id)
            if entry is not None:
                await self._settle_from_history(session, run.job, entry)

    async def _update(self, run: PromptRun, states: set[JobStatus], **values: Any) -> None:
        updated = await self._repository.transition(run.job, states, **values)
        if updated is not None:
            run.job = updated

    def _write_start(self, run: PromptRun) -> None:
        """START_WRITE_DELAY after `run` started, no write having recorded its start (which
        would have cancelled this timer): record it on its own."""
        run.start.timer = asyncio.create_task(self._record_start_alone(run))

    async def _record_start_alone(self, run: PromptRun) -> None:
        """Record the start of `run` on its own, unless a write sooner carries it."""
        try:
            async with run.start.recording() as started_at:
                if started_at is not None:
                    await self._record_start(run, started_at)
        except Exception:  # the database may be away: the next write records it
            log.exception("recording the start of job %s failed", run.job.id,
                          extra=job_fields(run.job))

    async def _record_start(self, run: PromptRun, started_at: datetime) -> None:
        await self._update(run, {JobStatus.DISPATCHED}, event="job.started",
                           status=JobStatus.RUNNING, started_at=started_at)
        metrics.job_started(run.job)

    async def _report_progress(self, run: PromptRun, fraction_of_node: float) -> None:
        run.report = (run.nodes_done + fraction_of_node, run.node_running, run.steps)
        if run.start.at is not None:
            now = time.monotonic()
            if now - run.last_write < PROGRESS_WRITE_INTERVAL:
                return
            run.last_write = now
            async with run.start.recording() as started_at:
                if started_at is not None:  # the start rides on this write, with its webhook
                    progress, detail = run.reported
                    await self._update(run, {JobStatus.DISPATCHED}, event="job.started",
                                       status=JobStatus.RUNNING, started_at=started_at,
                                       progress=progress, progress_detail=detail)
                    metrics.job_started(run.job)
                    return
        self._progressing[run.prompt_id] = run
        if self._progress_writer is None:
            self._progress_writer = asyncio.create_task(self._write_progress())

    async def _write_progress(self) -> None:
        """While running jobs report progress: every PROGRESS_WRITE_INTERVAL, the latest report
        of each in one statement, not a statement per job (with a thousand GPUs at work, a
        statement per job every interval would be thousands a second)."""
        try:
            while self._progressing:
                await asyncio.sleep(
                    self._progress_written + PROGRESS_WRITE_INTERVAL - time.monotonic())
                runs = [run for prompt_id, run in self._progressing.items()
                        if self._runs.get(prompt_id) is run]
                self._progressing = {}
                self._progress_written = time.monotonic()
                if not runs:
                    continue
                try:
                    written = await self._repository.report_progress(
                        [ProgressReport(run.job, *run.reported) for run in runs])
                except Exception:  # the database may be away: the next report writes it
                    log.exception("writing the progress of %d jobs failed", len(runs))
                    continue
                for job in written:
                    run = self._runs.get(job.prompt_id or "")
                    if run is not None and run.job.attempts == job.attempts:
                        run.job = job
        finally:
            self._progress_writer = None

    @staticmethod
    def _outputs_heard(run: PromptRun) -> dict[str, Any] | None:
        """The outputs of `run`, which just ended executing, as its `/history` entry lists
        them, from its `executed` messages, when those are sure to be all of them: they all
        came on one connection (ComfyUI sends nothing while the socket is down, and replays
        nothing), and every output node of the prompt reported. Else None: `/history` tells.
        (ComfyUI 0.3.64 also lists in /history, without an `executed`, the UI of a node that
        is not an output node and was served from its cache: its UI from an earlier prompt.
        The core nodes that have UI are all output nodes, and newer versions send it again.)"""
        capabilities = run.session.capabilities
        if run.started_on != run.session.connections or capabilities is None:
            return None
        for node_id, node in run.prompt.items():
            spec = capabilities.nodes.get(node.get("class_type"))
            if spec is None or (spec.output_node and node_id not in run.executed):
                return None
        return {node: ui for node, ui in run.executed.items() if ui is not None}

    async def _finished_executing(self, run: PromptRun,
                                  outputs: dict[str, Any] | None = None) -> None:
        """`run` ended executing; `outputs`, as its history entry lists them, if known."""
        # The slot is free for the next claim as soon as the end is read, not once the
        # statement recording it (uploading) has committed: this process's claims count the
        # prompt out of its backend's slots meanwhile (`ended`); other processes' count it
        # until it is recorded. The slot is released once it is (a drain waits for that). A
        # start not recorded yet (a short prompt) is recorded by the same statement, which is
        # the job's end when its outputs are stored soon (`_defer_end`); the prompt stays
        # `ended` until then.
        prompt_id = run.prompt_id
        self._ending.add(prompt_id)
        self._signals.slot_freed()
        # The files stored early are the collection's to record now, with the job's end: an
        # early write after this one would find the job moved on (a transaction for nothing,
        # a fifth of a job's at saturation, where outputs come as the prompt ends).
        run.early.closed = True
        try:
            async with run.start.recording() as started_at:
                end = ExecutionEnd(utcnow(), started_at)
                unrecorded = self._defer_end(run, end)
                uploading = await self._record_end(run.job, end) if unrecorded is None \
                    else _executed(run.job, end)
        except BaseException:
            # Not recorded: still followed, and held in every count (reconciliation settles
            # it).
            self._ending.discard(prompt_id)
            raise
        self._unfollow(prompt_id)
        if unrecorded is None:
            self._release(run.session, prompt_id)
        if uploading is not None:  # else cancelled, or a newer attempt owns the job
            if started_at is not None:
                metrics.job_started(uploading)
            metrics.job_executed(uploading)
            self._start_collecting(run.session, uploading, run.early, unrecorded, outputs)

    def _defer_end(self, run: PromptRun, end: ExecutionEnd) -> UnrecordedEnd | None:
        """`run`'s end of executing, left for the statement recording the job's end (its
        own written after END_WRITE_DELAY, or as soon as another process says it waits for a
        slot), unless another process waits for a slot now or that statement would owe a
        job.started webhook (it writes one delivery: the job's end's); None when it is to be
        recorded now. Until it is recorded, the prompt holds its slot in the database's count
        and stays `ended` for this process's claims, which count it out: a backlog here waits
        for nothing.

        Nothing a client was told is lost by the wait: the job shows where its last write
        left it (`dispatched` or `running`), and a process that dies before the job's end
        leaves it there, its prompt on its backend to read from `/history` again (`_reconcile`):
        the next process collects it under the same keys."""
        if self._signals.peer_waiting or (
                end.started_at is not None and subscribed(run.job, "job.started")):
            return None
        unrecorded, prompt_id = UnrecordedEnd(end), run.prompt_id
        unrecorded.timer = asyncio.get_running_loop().call_later(
            END_WRITE_DELAY, self._write_end, run.job, unrecorded)
        self._deferred_ends[prompt_id] = (run, unrecorded)
        unrecorded.when_settled(functools.partial(self._end_settled, prompt_id))
        if self._ends_wanted is None:
            self._ends_wanted = asyncio.create_task(
                self._write_ends_when_wanted(self._signals.wanted.next()))
        return unrecorded

    async def _record_end(self, job: Job, end: ExecutionEnd) -> Job | None:
        """Record that `job`'s prompt ended executing (and started, if no write said so)."""
        return await self._repository.transition(
            job, {JobStatus.DISPATCHED, JobStatus.RUNNING}, status=JobStatus.UPLOADING,
            progress=1.0, progress_detail=None, started_at=end.started_at,
            uploading_at=end.uploading_at,
            event="job.started" if end.started_at is not None else None)

    def _write_end(self, job: Job, unrecorded: UnrecordedEnd) -> None:
        """Record the end of executing `unrecorded` of `job` on its own, now: END_WRITE_DELAY
        after it was deferred (the job's end did not record it sooner, which would have
        cancelled this timer), or as another process waits for a slot. Not when a write has
        taken it, or its own is under way."""
        if unrecorded.at is None or isinstance(unrecorded.timer, asyncio.Task):
            return
        if unrecorded.timer is not None:
            unrecorded.timer.cancel()
        writing = unrecorded.timer = asyncio.create_task(self._record_end_alone(job, unrecorded))
        self._end_writes.add(writing)
        writing.add_done_callback(self._end_writes.discard)

    async def _record_end_alone(self, job: Job, unrecorded: UnrecordedEnd) -> None:
        try:
            async with unrecorded.recording() as end:
                if end is not None:
                    await self._record_end(job, end)
        except Exception:  # the database may be away: the job's end records it
            log.exception("recording the end of executing of job %s failed", job.id,
                          extra=job_fields(job))

    async def _write_ends_when_wanted(self, wanted: asyncio.Event) -> None:
        """Until cancelled: whenever another process says it waits for a slot (`wanted`, the
        signals' next beat when this began), write the deferred ends of executing at once."""
        while True:
            await wanted.wait()
            wanted = self._signals.wanted.next()
            for run, unrecorded in list(self._deferred_ends.values()):
                self._write_end(run.job, unrecorded)

    def _end_settled(self, prompt_id: str) -> None:
        """A deferred end of executing is recorded (by its own write or the job's end), or
        nothing will record it: the database counts the prompt off its backend, and its slot
        is released."""
        deferred = self._deferred_ends.pop(prompt_id, None)
        if deferred is not None:
            self._release(deferred[0].session, prompt_id)

    def _start_collecting(self, session: BackendSession, job: Job,
                          early: EarlyOutputs | None = None,
                          unrecorded: UnrecordedEnd | None = None,
                          outputs: dict[str, Any] | None = None) -> None:
        """Collect the outputs of `job`, whose end of executing is recorded, or is
        `unrecorded` yet; `outputs`, as its history entry lists them, if known."""
        prompt_id = job.prompt_id  # read once: a job's fields are SQLAlchemy attributes
        assert prompt_id is not None
        if prompt_id in self._collecting:
            if unrecorded is not None:
                unrecorded.drop()
            return
        task = asyncio.create_task(metrics.timed_upload(
            job, self._collector.collect(session.client, job, cleanup=session.cleanup,
                                         early=early, unrecorded=unrecorded,
                                         history_outputs=outputs)))
        self._collecting[prompt_id] = task
        task.add_done_callback(functools.partial(self._collected, job, prompt_id))

    def _collected(self, job: Job, prompt_id: str, task: asyncio.Task[None]) -> None:
        """The collection of `job`'s outputs (its prompt `prompt_id`), `task`, ended. It ends
        the job whatever happens (failed, when it cannot store them), so an error out of it is
        one it could not even write that failure through: said here, not lost with the task,
        and left for the next reconciliation of the job's backend (a reconnect, a restart) to
        settle."""
        del self._collecting[prompt_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("collecting the outputs of job %s ended in an error; the next "
                      "reconciliation of backend %s settles it", job.id, job.backend,
                      exc_info=task.exception(), extra=job_fields(job))

    async def _fail(self, run: PromptRun, error: dict[str, Any]) -> None:
        async with run.start.recording() as started_at:
            if started_at is not None:  # the job.started webhook before job.failed
                await self._record_start(run, started_at)
        async with self.leaving(run.prompt_id):
            failed = await self._repository.finish(run.job, JobStatus.FAILED,
                                                   ON_BACKEND_STATES, error=error)
        if failed is not None:
            self._endings.tell(JobEnded(failed))

    # Reconciliation.

    async def on_connect(self, session: BackendSession) -> None:
        """Settle every job of ours (or of a dead process) recorded on this backend: missed
        events are not replayed."""
        self._abandoned.discard(session.name)
        await self._reconcile(session, await self._ours(
            await self._repository.on_backend(session.name)))

    async def _ours(self, jobs: list[Job], *, orphans_only: bool = False) -> list[Job]:
        """Of `jobs`, those this process follows: its own, and those of dead processes, taken
        over. A live process's jobs are its own to follow (it may be sending the prompt
        right now, which would look lost from here)."""
        live = await self._lease.live() if jobs else set()
        ours = []
        for job in jobs:
            if job.dispatched_by == self._lease.id:
                if not orphans_only:
                    ours.append(job)
            elif job.dispatched_by not in live:
                taken = await self._repository.take_over(job, self._lease.id)
                if taken is not None:
                    log.info("job %s taken over from a stopped process", job.id,
                             extra=job_fields(job))
                    ours.append(taken)
        return ours

    async def _reconcile(self, session: BackendSession, jobs: list[Job]) -> None:
        # The queue before the histories: a prompt only ever moves from the queue into the
        # history, so one missing from this snapshot is finished or lost for good. (History
        # first would race a prompt finishing between the two reads and call it lost.)
        queued_ids = await session.client.queued_prompt_ids() if jobs else set()
        for job in jobs:
            prompt_id = job.prompt_id
            if prompt_id is None or prompt_id in self._submitting or prompt_id in self._collecting:
                continue
            run = self._runs.get(prompt_id)
            if run is not None and run.withdrawn:
                await self.put_back(run)
                continue
            if job.status == JobStatus.UPLOADING:
                # Its collector died with an earlier process; the keys are deterministic, so
                # collecting again overwrites whatever part was stored.
                self._start_collecting(session, job)
                continue
            if prompt_id in queued_ids:
                if prompt_id not in self._runs:
                    self.track(session, job, adopted=True)
                continue
            entry = await session.client.history(prompt_id)
            if entry is not None:
                await self._settle_from_history(session, job, entry)
            else:
                await self._lost(job, f"backend {job.backend} lost the prompt")

    async def on_disconnect(self, session: BackendSession) -> None:
        # Prompts there may still run; the next connect reconciles them.
        log.info("backend %s: %d prompts to reconcile on reconnect", session.name,
                 len(session.inflight))

    async def settle(self, run: PromptRun, entry: dict[str, Any]) -> None:
        """End a prompt from its `/history` entry, its events having gone unread."""
        run.moving = False
        await self._settle_from_history(run.session, run.job, entry)

    async def _settle_from_history(
        self, session: BackendSession, job: Job, entry: dict[str, Any]
    ) -> None:
        assert job.prompt_id is not None
        run = self._runs.get(job.prompt_id) or PromptRun(session, job)
        status = entry.get("status")
        status = status if isinstance(status, dict) else {}
        if status.get("status_str") == "success":
            outputs = entry.get("outputs")
            await self._finished_executing(run, outputs if isinstance(outputs, dict) else {})
            return
        self._runs[run.prompt_id] = run
        errors = [parse_event(kind, data) for kind, data in _status_messages(status)]
        error = next(
            (_execution_error(e) for e in errors if isinstance(e, ExecutionError)),
            job_error("execution_failed", "the prompt did not complete on the backend"),
        )
        await self._fail(run, error)

    async def _lost(self, job: Job, reason: str) -> None:
        """Requeue a job whose prompt is gone (a restarted or unreachable backend)."""
        assert job.prompt_id is not None
        message = f"{reason} (attempt {job.attempts})"
        if job.attempts >= self._max_attempts:
            async with self.leaving(job.prompt_id):
                failed = await self._repository.finish(
                    job, JobStatus.FAILED, ON_BACKEND_STATES,
                    error=job_error("backend_lost", message + "; no attempts left"),
                )
            if failed is not None:
                self._endings.tell(JobEnded(failed))
            return
        log.warning("%s: job %s requeued", message, job.id, extra=job_fields(job))
        async with self.leaving(job.prompt_id):
            requeued = await self._repository.requeue(job)
        if requeued is not None:
            self._signals.job_queued()  # the dispatcher has work again

    # The safety net: quiet prompts and backends that stay away.

    async def watch(self, sessions: Sequence[BackendSession]) -> None:
        """Until cancelled: poll the history of prompts nothing was heard of for a while (a
        socket can go silent without closing), and requeue the prompts of backends that stay
        unreachable past the grace period; and, when a gateway process stopped, take up what
        it left (at the first pass: what processes that stopped before this one left); and
        look for a backlog grown deep behind this process's back (queue positions)."""
        known: set[int] | None = None  # the processes alive at the last pass
        queued = self._queued.next()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                # The jobs table is read when there may be something to take up, not at every
                # pass: when a process alive at the last pass, or heard from since (peers.py),
                # is gone (only a process that stops leaves jobs to nobody); and for the
                # extra_data of a stopped process, also when a job was put back in the backlog.
                expected = None if known is None else known | self._lease.others
                live = await self._lease.live()
                stopped = expected is None or not expected <= live
                if stopped:
                    await self._take_over_orphans(sessions, live)
                if stopped or queued.is_set():
                    pending = self._queued.next()
                    await self._fail_extra_data_lost(live)
                    queued = pending
                known = live
                await self._forget_ended_elsewhere()
                await self._repository.look_for_deep_backlog()
            except Exception:  # the database may be away; the next pass tries again
                log.exception("the watch's pass (the jobs of stopped processes, the "
                              "backlog's depth) failed")
            for session in list(sessions):
                try:
                    if session.connected:
                        await self._poll_quiet(session)
                    elif session.unreachable_for() > self._grace_seconds:
                        await self._abandon(session)
                except ComfyError as exc:
                    log.warning("backend %s: history check failed: %s", session.name, exc)
                except Exception:  # the database may be away; the next pass tries again
                    log.exception("watch pass for backend %s failed", session.name)

    async def _poll_quiet(self, session: BackendSession) -> None:
        now = time.monotonic()
        quiet = [run for run in self.runs_on(session) if run.prompt_id not in self._submitting
                 and not run.moving and now - run.last_heard >= self._quiet_seconds]
        # The queue before the histories, as in on_connect.
        queued_ids = await session.client.queued_prompt_ids() if quiet else set()
        for run in quiet:
            run.last_heard = now
            if run.withdrawn:
                await self.put_back(run)
                continue
            entry = await session.client.history(run.prompt_id)
            if entry is not None:
                log.info("prompt %s on %s ended without a word on the socket", run.prompt_id,
                         session.name)
                await self._settle_from_history(session, run.job, entry)
            elif run.prompt_id not in queued_ids:
                # Neither queued nor ended: the queue was cleared there, or a POST that
                # failed late never took.
                await self._lost(run.job, f"backend {session.name} does not have the prompt")

    async def _take_over_orphans(self, sessions: Sequence[BackendSession], live: set[int]
                                 ) -> None:
        """Follow the jobs a stopped gateway process left on backends that stay connected
        (a reconnect would otherwise be the only moment they are looked at); `live`: the
        processes alive now."""
        connected = {session.name: session for session in sessions if session.connected}
        # Read only what no live process follows (nearly always nothing), and only where we
        # can look: a backend the stopped process alone knew is not ours.
        unfollowed = await self._repository.on_backend(unless_followed_by=live)
        reachable = [job for job in unfollowed if job.backend in connected]
        orphans = await self._ours(reachable, orphans_only=True)
        for name, session in connected.items():
            here = [job for job in orphans if job.backend == name]
            if here:
                await self._reconcile(session, here)

    async def _fail_extra_data_lost(self, live: set[int]) -> None:
        """Fail the queued jobs whose extra_data went with a stopped process (any process
        may: the fence lets one do it): they must not run without it, and nobody has it."""
        for job in await self._repository.extra_data_lost(live):
            failed = await self._repository.finish(
                job, JobStatus.FAILED, {JobStatus.QUEUED}, error=job_error(
                    EXTRA_DATA_LOST, "the gateway process that accepted the job, the only "
                    "one holding its extra_data, stopped before the job could be sent to a "
                    "backend (extra_data is never stored); submit it again"))
            if failed is not None:
                log.warning("job %s failed: its extra_data went with process %s", job.id,
                            job.extra_data_holder, extra=job_fields(job))
                self._endings.tell(JobEnded(failed))

    async def _forget_ended_elsewhere(self) -> None:
        """Forget the extra_data held here for jobs that another process ended (cancelled,
        or followed to its end after taking it over)."""
        held = self._extra_data.job_ids()
        if held:
            for job_id in await self._repository.ended_among(held):
                self._extra_data.forget(job_id)

    async def _abandon(self, session: BackendSession) -> None:
        if session.name in self._abandoned:
            return
        reason = f"backend {session.name} unreachable for over {self._grace_seconds:g} s"
        for job in await self._ours(await self._repository.on_backend(session.name)):
            if job.prompt_id not in self._collecting and job.prompt_id not in self._submitting:
                await self._lost(job, reason)
        # Only once all are requeued: a pass that failed half way (the database away) is
        # made again at the next one, else its jobs stayed there until the backend came back.
        self._abandoned.add(session.name)

    async def close(self, grace: float = 0.0) -> None:
        """Give the uploads in progress up to `grace` seconds, then cut them short: a job
        left `uploading` is collected again by the next process (its keys are deterministic)."""
        if self._progress_writer is not None:
            self._progress_writer.cancel()
        for run in self._runs.values():  # still running: collected by the next process
            if run.early.storing is not None:
                run.early.storing.cancel()
            run.start.drop()  # the next process reads the job's end from /history
        tasks = list(self._collecting.values())
        if tasks and grace > 0:
            log.info("waiting up to %g s for %d uploads in progress", grace, len(tasks))
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Ends of executing left unwritten: the next process reads them from /history.
        writes = list(self._end_writes)
        if self._ends_wanted is not None:
            writes.append(self._ends_wanted)
        for task in writes:
            task.cancel()
        await asyncio.gather(*writes, return_exceptions=True)
        for _, unrecorded in list(self._deferred_ends.values()):
            unrecorded.drop()  # (releasing its slot)


# The fields of a job that the record of its end of executing writes (`_executed`).
_EXECUTED_FIELDS = frozenset({"status", "progress", "progress_detail", "uploading_at",
                              "started_at"})


def _executed(job: Job, end: ExecutionEnd) -> Job:
    """`job` as the write of its end of executing `end` leaves it (`_record_end`), while that
    write waits for the job's end (`_defer_end`): what `job.model_copy(update=...)` makes,
    built from its fields as the repository builds a job (`constructed`), not through
    pydantic's copy (2.8 against 1.6 us)."""
    values = job.__dict__
    return constructed(Job, {
        **values, "status": JobStatus.UPLOADING, "progress": 1.0, "progress_detail": None,
        "uploading_at": end.uploading_at, "started_at": end.started_at or values["started_at"],
    }, job.__pydantic_fields_set__ | _EXECUTED_FIELDS)


def _execution_error(error: ExecutionError) -> dict[str, Any]:
    return job_error(
        "execution_error",
        error.exception_message.strip() or "execution failed",
        node_id=error.node_id,
        node_type=error.node_type,
        details={
            "exception_type": error.exception_type,
            "traceback": error.traceback,
            "current_inputs": error.current_inputs,
        },
    )


def _status_messages(status: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    messages = status.get("messages")
    if not isinstance(messages, list):
        return []
    return [
        (item[0], item[1])
        for item in messages
        if isinstance(item, list) and len(item) == 2 and isinstance(item[1], dict)
    ]

