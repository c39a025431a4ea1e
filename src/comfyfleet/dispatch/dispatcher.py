"""Late-binding dispatch: the backlog stays in Postgres until a backend has a free slot.

Each backend holds at most `max_inflight` of our prompts; among healthy backends with a free
slot the one with the shortest queue wins (ComfyUI's `queue_remaining`, which also counts other
clients' prompts), ties broken by fewer prompts in flight. With AFFINITY_WINDOW above 0
placement counts each backend's cache: a backend keeps to the jobs its cache serves (its model
loaded), and a job waits for the backend holding its model while that finishes it sooner,
counting the load another would spend and the round trip of each prompt ahead (see `_affine`).
Once run times have been seen, placement (placement.py) keeps a slow backend from taking a job
a faster one would finish sooner, and once the backlog is empty a backend with room takes over
a prompt that would finish sooner there (one waiting in another's queue, or a long one running
on a much slower GPU). Dispatch wakes on events (a job arriving, a slot freeing, a running
prompt's progress showing its length); the periodic pass is only a safety net.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import asyncpg

from comfyfleet import metrics
from comfyfleet.comfy.capabilities import Capabilities
from comfyfleet.comfy.client import ComfyError, PromptRejected
from comfyfleet.comfy.prompts import isolate_outputs
from comfyfleet.dispatch.fair_share import fair_order, fifo_order
from comfyfleet.dispatch.placement import BackendLoad, remaining, should_take
from comfyfleet.execution.costs import UNSEEN_NODE_SECONDS, NodeCosts
from comfyfleet.execution.endings import Endings, JobEnded
from comfyfleet.execution.run_times import MIN_PROGRESS_TO_JUDGE, RunTimes
from comfyfleet.execution.session import BackendSession
from comfyfleet.execution.signals import DispatchSignals
from comfyfleet.execution.tracker import ExecutionTracker, PromptRun
from comfyfleet.execution.warm import PromptKeys
from comfyfleet.jobs.extra_data import EXTRA_DATA_LOST, ExtraData, HeldExtraData
from comfyfleet.jobs.models import ON_BACKEND_STATES, Job, JobStatus, job_error
from comfyfleet.jobs.repository import (
    CLAIM_BATCH,
    UNKNOWN_RUN_SECONDS,
    BacklogRead,
    Choice,
    Dispatch,
    JobRepository,
    QueuedJob,
    Refusal,
    Store,
    Take,
    TenantHead,
)
from comfyfleet.logs import job_fields
from comfyfleet.storage import NotInStorage, Storage, StorageError

log = logging.getLogger(__name__)

SUBMIT_FAILURE_PAUSE = 1.0
# Moving a waiting prompt costs a few round trips and a little risk; only worth it for a
# clear gain, in seconds of expected completion.
MOVE_MIN_GAIN = 1.0
# Restart a running prompt elsewhere only when it would finish this many times sooner afresh
# than by going on.
RESTART_MARGIN = 1.5
INTERRUPT_WAIT = 5.0  # seconds for an interrupted prompt to reach its backend's history
# Take a job out of order only to save this many seconds at least: learned costs jitter.
AFFINITY_MIN_GAIN = 0.25
HEADS_KEPT = 4 * CLAIM_BATCH  # what placement worked out of the jobs near the backlog's head
INPUT_UNAVAILABLE = "input_unavailable"


class InputUnavailable(Exception):
    """A job's input image is no longer in storage: the job can never be sent."""


def by_preference(sessions: Sequence[BackendSession], max_inflight: int,
                  taken: Callable[[BackendSession], int]) -> list[BackendSession]:
    """Backends with a free slot (`taken`: how many our prompts take there), the one that can
    start soonest first."""
    free = [(s, used) for s in sessions if s.accepts_work and (used := taken(s)) < max_inflight]
    # queue_remaining lags behind prompts we just sent; our own count is a lower bound for it.
    free.sort(key=lambda pair: (max(pair[0].queue_remaining, pair[1]), pair[1]))
    return [s for s, _ in free]


def length_by_steps(run: PromptRun) -> float | None:
    """A running prompt's whole run time as its step progress tells it; None until it has
    made enough progress to judge."""
    if run.started is None or run.step_fraction < MIN_PROGRESS_TO_JUDGE:
        return None
    # Timed at its last report: the time since then is part of the next step, and counting
    # it would make the prompt look longer than it is.
    return (run.stepped_at - run.started) / run.step_fraction


class RunnableJobs:
    """Which jobs near the backlog's head a backend can run, kept by its capabilities'
    identity (a backend's are replaced when it reconnects, never changed, and backends alike
    share one: `Capabilities.shared`): worked out once a job and capabilities while the job
    stays near the head. Every claim reads the head afresh and weighs each of its jobs on the
    backend it asks: a look-up a job, not a call chain."""

    def __init__(self) -> None:
        # By the capabilities' id, each with a weak reference to them: their entry goes with
        # them (a backend that reconnected with other models, say), and their id with it.
        self._known: dict[int, tuple[weakref.ref[Capabilities],
                                     OrderedDict[uuid.UUID, bool]]] = {}

    def runs_on(self, capabilities: Capabilities, job: QueuedJob) -> bool:
        """Whether a backend of these capabilities can run `job`."""
        known = self._of(capabilities)
        runs = known.get(job.id)
        if runs is None:
            runs = self._learn(capabilities, known, job)
        return runs

    def runnable(self, capabilities: Capabilities, jobs: list[QueuedJob]) -> list[QueuedJob]:
        """The jobs of `jobs` a backend of these capabilities can run, in their order."""
        known = self._of(capabilities)
        runnable: list[QueuedJob] = []
        for job in jobs:
            runs = known.get(job.id)
            if runs is None:
                runs = self._learn(capabilities, known, job)
            if runs:
                runnable.append(job)
        return runnable

    def _of(self, capabilities: Capabilities) -> OrderedDict[uuid.UUID, bool]:
        entry = self._known.get(id(capabilities))
        if entry is None or entry[0]() is not capabilities:
            key = id(capabilities)
            entry = self._known[key] = (
                weakref.ref(capabilities, lambda _: self._known.pop(key, None)), OrderedDict())
        return entry[1]

    @staticmethod
    def _learn(capabilities: Capabilities, known: OrderedDict[uuid.UUID, bool],
               job: QueuedJob) -> bool:
        runs = known[job.id] = capabilities.can_run(job.prompt)
        while len(known) > HEADS_KEPT:
            known.popitem(last=False)
        return runs


@dataclass(frozen=True)
class Prospect:
    """A prompt that might finish sooner elsewhere."""

    run: PromptRun
    left: float  # expected seconds until it finishes where it is
    cost: float  # what its nodes not held in that backend's cache cost there
    # Its length as its progress shows it over what its nodes were expected to cost there
    # (1.0 for one waiting): a long prompt is as long afresh elsewhere.
    overrun: float

    def gain_on(self, target: BackendView, cost: float, *, backlog: bool) -> float:
        """Seconds sooner it would finish given now to `target`, where its nodes not held in
        that backend's cache cost `cost`; 0 when not worth it."""
        afresh = target.busy + target.overhead + cost * self.overrun
        # Work done there is thrown away when a running prompt restarts: only a clear win.
        if self.run.started is not None:
            return 0.0 if afresh * RESTART_MARGIN >= self.left else self.left - afresh
        # As in placement: with jobs still queued, the GPU time a move spends beyond what the
        # prompt costs where it is (a load) goes to them, so it must gain more than that.
        extra = max(cost + target.overhead - self.cost, 0.0) if backlog else 0.0
        return self.left - afresh - extra


class BackendView:
    """One backend as cache-aware placement sees it: the cache keys it will hold once its
    prompts have run, what a prompt costs it beyond its nodes (`overhead`, the round trip),
    and (worked out only when asked: most backends are looked at only for what they hold)
    the expected seconds until a prompt queued there now starts."""

    def __init__(self, session: BackendSession, held: frozenset[str], overhead: float,
                 busy: Callable[[], float]) -> None:
        self.session, self.held, self.overhead, self._busy = session, held, overhead, busy

    @functools.cached_property
    def busy(self) -> float:
        return self._busy()


class _Elsewhere:
    """Where the jobs a backend passes would run instead: each, in backlog order, on the
    backend that holds more of it and finishes it soonest, after the jobs before it that
    went there too."""

    def __init__(self, dispatcher: Dispatcher, here: BackendView,
                 others: list[BackendView], *, tried: bool = False) -> None:
        self._dispatcher, self._here, self._tried = dispatcher, here, tried
        self._holders: dict[str, list[BackendView]] = {}
        for view in others:
            for key in view.held - here.held:
                self._holders.setdefault(key, []).append(view)
        # Each holder's work from now on, once jobs went there (else its `busy`, worked out
        # only for a holder weighed).
        self._ahead: dict[str, float] = {}

    def finish(self, job: QueuedJob, cost_here: float) -> tuple[float, float] | None:
        """When `job` would be done on the backend that holds more of it than here, and what
        it costs there (None when no backend holds more of it), counting it in that
        backend's work from now on."""
        keys = self._dispatcher.keys_of(job, self._here.session).keys.values()
        best: tuple[float, float, BackendView] | None = None
        for view in {id(v): v for key in keys for v in self._holders.get(key, ())}.values():
            cost = self._dispatcher.cost(view, job, tried=self._tried)
            if cost + AFFINITY_MIN_GAIN >= cost_here:
                continue
            done = self._ahead.get(view.session.name, view.busy) + view.overhead + cost
            if (best is None or done < best[0]) and self._dispatcher.can_run(view.session, job):
                best = (done, cost, view)
        if best is None:
            return None
        self._ahead[best[2].session.name] = best[0]
        return best[0], best[1]

    def gain(self, job: QueuedJob, cost_here: float) -> float | None:
        """How much sooner `job` would be done starting here now than on the backend that
        holds more of it, less the GPU time it costs here beyond what it costs there (the
        load, which the fleet loses): above AFFINITY_MIN_GAIN, it should not wait for that
        backend. None when no backend holds more of it."""
        there = self.finish(job, cost_here)
        if there is None:
            return None
        finish_there, cost_there = there
        finish_here = self._here.busy + self._here.overhead + cost_here
        return finish_there - finish_here - (cost_here - cost_there)


class _Affine(NamedTuple):
    """The job a backend's pick chooses by cache-aware placement (`Dispatcher._affine`)."""

    job: QueuedJob
    passed: tuple[uuid.UUID, ...]  # the jobs of its band before it
    cost: float  # its nodes not held in that backend's cache, in expected seconds there
    served: bool  # that backend's cache saves AFFINITY_MIN_GAIN at least of it


class _Band:
    """The jobs of a read, in fair-share order, among which a backend's pick chooses (see
    `Dispatcher._affine`): those it can run of the priority of the first of them, up to the
    first already passed AFFINITY_WINDOW times. That one is then judged like any other: it
    goes to the backend whose cache holds its model when waiting for that one is sooner, and
    the others take only what is ahead of it meanwhile. (Forcing it onto whichever backend
    came first made GPUs trade models back and forth: see bench/RESULTS.md, cache-aware
    placement.)

    The first job of the read is looked at (whether the backend can run it: `runnable`, of a
    list of jobs) alone, the others only once the pick asks for a job of the band past it:
    with a deep backlog of short jobs the pick takes the first (it costs nothing there, and no
    backend holds more of it), and whether the backend could run each job of the 50-job read
    was looked up at every claim (the first hash of each job's id, fresh from the read, most
    of that). (The end of a backlog is counted whole: placement weighs it by its length.)"""

    def __init__(self, ordered: list[QueuedJob],
                 runnable: Callable[[list[QueuedJob]], list[QueuedJob]], window: int) -> None:
        self._ordered, self._runnable, self._window = ordered, runnable, window
        self._jobs: list[QueuedJob] = []
        self._looked = 0  # the jobs of `ordered` looked at
        self._complete = False  # every job of the band found

    def _find(self, count: float) -> None:
        """Look at the jobs of the read until `count` jobs of the band are found, or all: the
        first alone, then all the others at once."""
        while len(self._jobs) < count and not self._complete:
            looking = self._ordered[self._looked:self._looked + 1 if not self._looked else None]
            self._looked += len(looking)
            self._complete = not looking
            for job in self._runnable(looking):
                if not self._jobs or job.priority == self._jobs[0].priority:
                    self._jobs.append(job)
                    if job.overtaken >= self._window:
                        self._complete = True
                        break

    def __bool__(self) -> bool:
        self._find(1)
        return bool(self._jobs)

    def __len__(self) -> int:
        self._find(math.inf)
        return len(self._jobs)

    def __getitem__(self, index: int) -> QueuedJob:
        self._find(index + 1)
        return self._jobs[index]

    def __iter__(self) -> Iterator[QueuedJob]:
        index = 0
        while True:
            self._find(index + 1)
            if index == len(self._jobs):
                return
            yield self._jobs[index]
            index += 1

    def before(self, index: int) -> tuple[uuid.UUID, ...]:
        """The ids of the jobs of the band before its job `index` (found)."""
        return tuple(job.id for job in self._jobs[:index])


class _BandCosts:
    """What each job of a band costs on one backend (`cost`), worked out only as it is asked
    for: a pick weighs the whole band only when its first job costs more there than a gain
    worth taking a job out of order for (else that one is the warm one, whatever the others
    cost: none costs less than nothing), and its gains only up to the first job no other
    backend holds more of. At saturation on short jobs, every job of a 50-job band was
    weighed at every claim to take the first."""

    def __init__(self, cost: Callable[[QueuedJob], float], band: _Band) -> None:
        self.band, self._cost = band, cost
        self._known: list[float] = []

    def __getitem__(self, index: int) -> float:
        while len(self._known) <= index:
            self._known.append(self._cost(self.band[len(self._known)]))
        return self._known[index]

    def warm(self) -> int:
        """The first job that costs at most AFFINITY_MIN_GAIN more than the cheapest."""
        if self[0] <= AFFINITY_MIN_GAIN:
            return 0
        cheapest = min(self[index] for index in range(len(self.band)))
        return next(index for index in range(len(self.band))
                    if self[index] <= cheapest + AFFINITY_MIN_GAIN)


class Dispatcher:
    def __init__(
        self,
        repository: JobRepository,
        sessions: Sequence[BackendSession],
        tracker: ExecutionTracker,
        storage: Storage,
        *,
        signals: DispatchSignals,
        max_inflight: int,
        endings: Endings,
        run_times: RunTimes,
        node_costs: NodeCosts,
        affinity_window: int,
        owner: int,
        extra_data: HeldExtraData,
        safety_pass_seconds: float,
        fair_share: bool = True,
    ) -> None:
        self._repository = repository
        self._extra_data = extra_data  # of the jobs accepted here: sent with their prompts
        # Events wake the loop (a job queued through any process too, and a slot another
        # process frees while this one waits for it: the fleet hears the database's notices);
        # this pass of its own catches what none announces (a notice sent while the listening
        # connection was away).
        self._safety_pass_seconds = safety_pass_seconds
        self._owner = owner  # this process's ProcessLease id, recorded on what it claims
        self._run_times = run_times
        self._node_costs = node_costs
        self._affinity_window = affinity_window
        self._fair_share = fair_share  # between tenants; else one backlog, priority then age
        # What placement worked out of the jobs near the head of the backlog: their prompts'
        # cache keys by job id (`keys_of`), and whether each backend can run them.
        self._keys: OrderedDict[uuid.UUID, PromptKeys] = OrderedDict()
        self._runnable = RunnableJobs()
        self._sessions = sessions
        self._tracker = tracker
        self._storage = storage
        self._max_inflight = max_inflight
        self._endings = endings
        self._signals = signals
        # No job was queued as the last claim saw it (counting those other claims held), and
        # none has been since that anyone told: a freed slot has nothing to claim.
        self._backlog_empty = False
        self._waiting = False  # a pick left a free backend idle: waiting was sooner
        self._trying = False  # the last pick tries a backend on a guess (see `_affine`)
        self._trial: str | None = None  # the prompt id of the last such try
        # A claim of the pass under way found a backend with room by this process's count
        # full in the database's (`no_slot`): other processes' prompts hold it.
        self._short = False
        # And one left a backend this process has room on without a job, by its own choice.
        self._left_free = False
        self._outcome = ""  # what the pick under way comes to (metrics.DISPATCH_CLAIMS)
        self._outcomes: dict[str, str] = {}  # and each pick of the claim under way, by backend
        self._submissions: set[asyncio.Task[None]] = set()
        # The backlog as the last claim's take left it, which the next claim of the pass
        # picks on: a claim after a take is one round trip. (A pass begins with a read: a
        # wake-up says the backlog or the fleet may have changed since.)
        self._read: BacklogRead | None = None
        self._claiming = asyncio.Lock()  # a pass, or a submit's claim: they share the above

    async def claim_on_submit(self, job: Job, store: Store) -> tuple[Job, bool]:
        """Store the new queued `job` by `store` (the repository's `insert`, offered a
        Dispatch or None), dispatched as it is stored when it can be: while this dispatcher
        is idle, no job is queued as far as it knows, and a backend has a free slot by its
        count. Its pick (the one of its passes) chooses the backend in memory, on the job
        alone, and the insert stores the job already taken: at 10 jobs/s the round trips
        between the submit and its prompt on a backend (BEGIN, the insert, the claim's read,
        its take, COMMIT) were most of the time between them. The database has the last word
        on the take (the slots are shared with other processes, the tenant's limit, a job
        queued meanwhile); refused, the insert's transaction holds a claim of the
        dispatcher's (the same read, pick and take as a pass) that may take this job only,
        with one commit for both. The prompt is sent once the insert has committed. Returns
        what `store` does."""
        # The backends ranked only once nothing else rules the take out: with a backlog (every
        # submit at saturation) ranking them was for nothing.
        if self._claiming.locked() or not self._backlog_empty or self._signals.queued:
            return await store(None)
        sessions = by_preference(self._sessions, self._max_inflight, self._tracker.slots_taken)
        if not sessions:
            return await store(None)
        async with self._claiming:
            take = self._take_before_insert(job, sessions)
            if take is not None:
                return await self._store_taken(job, store, *take)
        return await store(None)

    def _take_before_insert(self, job: Job, sessions: list[BackendSession]
                            ) -> tuple[Take, list[str], bool] | None:
        """The take of `job` by the first backend of `sessions` whose pick chooses it, alone
        in the backlog; the outcomes of the claim (its first backend's, when another took
        the job: as `_dispatch_one` counts them) but the taker's, and whether the pick tries
        the backend on a guess. None when no backend would take it now."""
        tenant = job.api_key_hash or ""
        alone = BacklogRead([QueuedJob(job.id, job.workflow, job.prompt, job.priority,
                                       created_at=job.created_at, tenant=tenant)],
                            {tenant: TenantHead()})
        self._outcomes = {}
        for session in sessions:
            if session.capabilities is None:
                continue
            choice = self._pick(session, alone)
            if choice is not None:
                first = [self._outcomes[name] for name in list(self._outcomes)[:1]]
                return (Take(session.name, str(uuid.uuid4()), choice.charge, self._owner,
                             self._max_inflight, list(self._tracker.ended())),
                        first, self._trying)
        return None

    async def _store_taken(self, job: Job, store: Store, take: Take, outcomes: list[str],
                           trying: bool) -> tuple[Job, bool]:
        """`job` stored by `store`, offered to `take`, and then to a claim of the dispatcher's
        in the insert's transaction; the job taken started once committed."""
        try:
            stored, created = await store(Dispatch(take, functools.partial(
                self._claim_submitted, job.id, outcomes)))
        except BaseException:
            self._read = None  # the claim's, if any, from a transaction undone
            self._signals.job_queued()  # whatever was stored: a pass looks
            raise
        if not created or stored.status != JobStatus.DISPATCHED:
            return stored, created
        if stored.prompt_id == take.prompt_id:  # taken as it was stored
            metrics.dispatch_claim([*outcomes, "took"])
            if trying:
                self._trial = take.prompt_id
        assert stored.backend is not None
        self._start(next(s for s in self._sessions if s.name == stored.backend), stored)
        # Its POST /prompt goes out now, in its task's first step (the request written, its
        # answer awaited), before the submit's answer is rendered and written: the job's way
        # to its end runs through the backend, not through that answer.
        await asyncio.sleep(0)
        return stored, created

    async def _claim_submitted(self, job_id: uuid.UUID, outcomes: list[str],
                               why: Refusal | asyncpg.PostgresError,
                               connection: asyncpg.Connection) -> Job | None:
        """The claim of job `job_id` as its insert stores it, in the insert's transaction on
        `connection`, after its take (`outcomes` the claim's before it) was refused or
        failed (`why`): a pass of the dispatcher's that may take that job only, its first
        read afresh, in the transaction (no earlier read has the job). The job taken, not
        started (the transaction has not committed), or None."""
        if isinstance(why, Refusal):
            metrics.dispatch_claim([*outcomes, why])
        else:
            log.warning("taking job %s as it was stored failed: %s", job_id, why)
        # Its job is queued in the transaction: a first backend found full (no read) is no
        # sign that nothing is.
        self._read, self._backlog_empty = None, False
        try:
            taken, _ = await self._dispatch_one(connection, only=job_id)
        except BaseException as exc:
            # Undone with the insert's transaction, which stores the job afresh, queued:
            # nothing was taken, nor read.
            self._read = None
            if isinstance(exc, Exception):
                log.exception("claiming job %s as it was stored failed", job_id)
            raise
        return taken[1] if taken is not None else None

    async def run(self) -> None:
        while True:
            # A backend left free to wait for a warm one may be better off taking a job now
            # that a running prompt's length is clearer.
            claim, queued = self._signals.take()
            if queued:
                self._backlog_empty = False
            try:
                async with self._claiming:
                    await self._pass(claim)
            except Exception:  # the database may be away for a while; keep the loop alive
                log.exception("dispatch pass failed")
            try:
                async with asyncio.timeout(self._safety_pass_seconds):
                    await self._signals.changed.wait()
            except TimeoutError:
                self._signals.job_queued()  # as if: a job queued unheard of is found now

    async def _pass(self, claim: bool) -> None:
        if (claim and not self._backlog_empty) or self._waiting:
            self._waiting = self._short = self._left_free = False
            self._read = None  # the pass's first claim reads the backlog
            more = True
            while more:
                taken, more = await self._dispatch_one()
                if taken is not None:
                    self._start(*taken)
            if self._short and not self._backlog_empty:
                # Another process's prompt ending frees a slot in the database's
                # count only as that process writes it: it tells us then.
                self._signals.short_of_slots()
        if self._signals.take_released_for_peer() and (
                self._backlog_empty or self._left_free):
            # Released after the claims that counted it free (`ended`) left it so:
            # the process that waits for a slot is told.
            self._signals.tell_freed()
        await self._rebalance()

    async def _dispatch_one(
        self, connection: asyncpg.Connection | None = None, only: uuid.UUID | None = None,
    ) -> tuple[tuple[BackendSession, Job] | None, bool]:
        """Take one job for the best backend that has a free slot and should run it (only
        job `only`, when given, on `connection`): the backend and the job taken, to start
        once its take has committed, and whether another may follow.

        One claim reads the backlog for the first backend (or has the read the pass's last
        take made) and asks the backends after it on that read, in memory: only one whose
        pick would take a job takes its lock and the job, in a statement of its own
        (sql/claim.sql), which reads the backlog for the next claim. A claim for every free
        backend that would
        take nothing (one that cannot run the queued jobs, a slower one the last jobs are left
        to faster ones for, a cold one that should wait) was most of the dispatcher's work,
        and a claim that took nothing before the one that took a job was half its
        transactions.
        Whatever changes the backlog or the fleet meanwhile (a job queued, a slot freed, a
        backend connected) wakes another pass."""
        sessions = {session.name: session
                    for session in by_preference(self._sessions, self._max_inflight,
                                                 self._tracker.slots_taken)
                    if session.capabilities is not None}
        names = list(sessions)
        while names:
            self._outcomes = {}
            # Job, backend and prompt id are on record before the POST, so a crash at any
            # point can be reconciled.
            claim = await self._repository.claim_next(
                names, str(uuid.uuid4()), max_inflight=self._max_inflight,
                pick=functools.partial(self._pick_only, sessions, only),
                owner=self._owner, ended=self._tracker.ended(), window=self._affinity_window,
                read=self._read, connection=connection)
            self._read = claim.read
            taker = claim.job.backend if claim.job is not None else None
            if claim.refusal is not None:  # the last backend it counts chose a job in vain
                self._outcomes[claim.counted[-1]] = claim.refusal
            outcomes = ["took" if name == taker else self._outcomes.get(name, "no_slot")
                        for name in claim.counted]
            metrics.dispatch_claim(outcomes)
            # A backend this process has room on, full in the database's count: held by
            # other processes' prompts. Or one this process chose to leave without a job.
            self._short = self._short or "no_slot" in outcomes
            self._left_free = self._left_free or any(
                outcome != "no_slot" for outcome in self._outcomes.values())
            if claim.backlog is not None:
                self._backlog_empty = claim.backlog == 0
            if claim.job is not None:
                assert taker is not None
                if self._trying:  # the taker's pick, the last one asked
                    self._trial = claim.job.prompt_id
                # It took the last: no claim to find none.
                return (sessions[taker], claim.job), not self._backlog_empty
            if self._backlog_empty:
                return None, False  # nothing queued: no other backend would find anything
            names = names[claim.next:]
        return None, False

    def _start(self, session: BackendSession, job: Job) -> None:
        metrics.job_dispatched(job)
        # Read once: a job's fields are SQLAlchemy attributes (0.2 us a read).
        prompt_id = job.prompt_id
        assert prompt_id is not None
        # Made once, for the POST and for the tracker's keys of what was sent.
        prompt = isolate_outputs(job.prompt, prompt_id)
        self._tracker.track(session, job, submitting=True, keys=self._keys.get(job.id),
                            sent=prompt)
        task = asyncio.create_task(self._submit(session, job, prompt_id, prompt))
        self._submissions.add(task)
        task.add_done_callback(self._submissions.discard)

    def _pick_only(self, sessions: dict[str, BackendSession], only: uuid.UUID | None,
                   name: str, read: BacklogRead) -> Choice | None:
        """The pick of backend `name` of `sessions`, if it chooses job `only` (None: any)."""
        choice = self._pick(sessions[name], read)
        if choice is None or only in (None, choice.job_id):
            return choice
        self._outcomes[name] = "not_submitted"
        return None

    def _pick(self, session: BackendSession, read: BacklogRead) -> Choice | None:
        choice = self._choose(session, read)
        if choice is None:  # else the claim says what came of it
            self._outcomes[session.name] = self._outcome
        return choice

    def _choose(self, session: BackendSession, read: BacklogRead) -> Choice | None:
        """The job `session` should start now, in fair-share order (see `_affine`), unless
        faster backends would get through the backlog before it finished that job."""
        assert session.capabilities is not None
        queued = read.queued
        self._trying = False
        self._outcome = "empty" if not queued else "not_accepting"
        if not session.accepts_work:
            return None  # drained (or gone) since this pass ranked the backends
        estimate = functools.partial(self._estimate, session)
        ordered = (fair_order(queued, read.tenants, estimate) if self._fair_share
                   else fifo_order(queued))
        band = _Band(ordered, functools.partial(self._runnable.runnable, session.capabilities),
                     self._affinity_window)
        self._outcome = "cannot_run" if queued else "empty"
        if not band:
            return None
        self._outcome = "slower"  # unless the pick says otherwise below
        # The backlog goes on beyond what we read: deep enough for everyone.
        backlog = math.inf if read.beyond \
            else len(self._runnable.runnable(session.capabilities, ordered))
        if not self._affinity_window:  # the band is the first job it can run
            return self._speed_checked(
                session, Choice(band[0].id, charge=estimate(band[0].workflow)), band[0], backlog)
        here = self._view(session)
        # The other backends, worked out once a pick weighs them (a backend whose cache
        # serves none of the jobs, the end of a backlog), the same views for all it weighs.
        # (Not by functools.cache, whose wrapper made at every pick was a few percent of it.)
        views: list[BackendView] | None = None

        def others() -> list[BackendView]:
            nonlocal views
            if views is None:
                views = [self._view(other) for other in self._sessions if other is not session
                         and other.accepts_work and other.capabilities is not None]
            return views

        affine = self._affine(here, others, band)
        if affine is None:
            self._outcome = "waits_for_warm"
            return None
        head, cost = affine.job, affine.cost
        choice = Choice(head.id, affine.passed, charge=estimate(head.workflow))
        if not affine.served:
            return self._speed_checked(session, choice, head, backlog)
        # Its cache serves this job: judged by the same estimate, cache and all, against
        # the others (a blind one could leave a job to a backend that would load its model,
        # which leaves it to this one), and left to another only for the gain for which
        # that one would take it (see `_affine`): more than its extra cost. Not with a deep
        # backlog: then the others' views are not made (a generator's first iterable is
        # evaluated as it is made, and made them at every claim for nothing).
        if backlog == math.inf:
            return choice
        rivals = (BackendLoad(view.session.name, view.overhead + rival_cost,
                              view.busy + max(rival_cost - cost, 0.0) + AFFINITY_MIN_GAIN)
                  for view in others() if self.can_run(view.session, head)
                  for rival_cost in [self.cost(view, head)])
        return choice if should_take(
            BackendLoad(session.name, here.overhead + cost, here.busy), rivals,
            int(backlog)) else None

    def _speed_checked(self, session: BackendSession, choice: Choice, head: QueuedJob,
                       backlog: float) -> Choice | None:
        """`choice`, unless faster backends would get through the backlog before `session`
        finished it, by the run times learned per workflow."""
        candidate = self._load(session, head.workflow)
        if candidate is None or backlog == math.inf:
            return choice
        return choice if should_take(candidate, self._rivals(session, head), int(backlog)) \
            else None

    def _estimate(self, session: BackendSession, workflow: str) -> float:
        """The GPU-seconds a job of `workflow` is expected to take on `session`: what its
        tenant is charged until it ends (its real run time replaces the charge then)."""
        return self._run_times.expected(session.name, workflow) or UNKNOWN_RUN_SECONDS

    def _affine(self, here: BackendView, others: Callable[[], list[BackendView]],
                band: _Band) -> _Affine | None:
        """The job of `band` that the backend `here` should start now, by where each job
        finishes soonest, counting what every backend's cache holds (with the jobs it passes,
        what it costs `here` and whether `here`'s cache serves it); None when every one of
        them finishes sooner by waiting for another backend.

        A backend whose cache serves one of these jobs (its model loaded) keeps to it: it
        takes the oldest job that costs it least. A backend whose cache serves none of them
        takes the job that gains most by starting there now rather than waiting for a backend
        that holds its model, if it gains more than the load costs there, and only once its
        GPU would otherwise go idle; if it waits only for a guessed cost that no run will
        measure, it tries the job (`_may_try`). Either way every job of the band older than
        the one taken is passed (overtaken) once more, and none is passed more than
        AFFINITY_WINDOW times (`_Band`)."""
        costs = _BandCosts(functools.partial(self.cost, here), band)
        warm = costs.warm()
        index: int | None = warm
        served = self._served(here, band[warm], costs[warm])
        if not served:
            gains = self._gains(_Elsewhere(self, here, others()), costs)
            index = self._cold_pick(here, gains)
            if index is None and self._may_try(here):
                gains = self._gains(_Elsewhere(self, here, others(), tried=True), _BandCosts(
                    functools.partial(self.cost, here, tried=True), band))
                index = self._cold_pick(here, gains)
                self._trying = index is not None
        if index is None:
            return None
        if index != warm:
            served = self._served(here, band[index], costs[index])
        return _Affine(band[index], band.before(index), costs[index], served)

    def _served(self, here: BackendView, job: QueuedJob, cost: float) -> bool:
        """Whether the cache of `here`, where `job` costs `cost`, serves it (its model
        loaded): it saves AFFINITY_MIN_GAIN at least."""
        return not self.cost(here, job, cold=True) - cost < AFFINITY_MIN_GAIN

    @staticmethod
    def _gains(elsewhere: _Elsewhere, costs: _BandCosts) -> list[float | None]:
        """What each job of a band (`costs`: its jobs and their costs here) gains by starting
        here now rather than on the backend that holds more of it, up to the first that no
        backend holds more of (none later can go before it)."""
        gains: list[float | None] = []
        for index, job in enumerate(costs.band):
            gains.append(elsewhere.gain(job, costs[index]))
            if gains[-1] is None:
                break
        return gains

    def _may_try(self, here: BackendView) -> bool:
        """Whether `here`, idle, may try a job it waits on only for a guess: the cost of
        nodes never seen running though some backend's cache served them (NodeCosts). Left
        idle, such a backend waits for ever, for no run measures the guess; tried, its
        cache is known once the prompt starts (`execution_cached`) and the nodes' cost once
        they run. One try at a time, so that a guess that was right costs one load."""
        return not self._tracker.runs_on(here.session) and (
            self._trial is None or not self._tracker.is_tracked(self._trial))

    def _cold_pick(self, here: BackendView, gains: list[float | None]) -> int | None:
        """For a backend whose cache serves none of the band: the job that gains most by
        starting there now rather than waiting for the backend that holds it (`gains`, in
        band order), or None when waiting is sooner for every one."""
        best: tuple[float, int] | None = None
        for index, gain in enumerate(gains):
            if gain is None:  # no backend holds more of it: the oldest such goes now
                return index
            if best is None or gain > best[0]:
                best = (gain, index)
        # Only a gain larger than the extra GPU time it costs here (the load) is one: the
        # fleet spends that time, and a smaller gain soon goes to the next job. A load is
        # decided as late as it can be, when the GPU would otherwise go idle: by then more of
        # the backlog has arrived and more is known of what things cost.
        if best is None or best[0] <= AFFINITY_MIN_GAIN or self._tracker.runs_on(here.session):
            self._waiting = True
            return None
        return best[1]

    def _view(self, session: BackendSession) -> BackendView:
        """What `session` holds and has ahead of a prompt queued there now."""
        runs = self._tracker.runs_on(session)
        ahead = [run.keys for run in runs if run.keys is not None]
        return BackendView(session, session.warm.held_after(ahead),
                           self._node_costs.overhead(session.name),
                           functools.partial(self._busy_for, session, runs))

    def _busy_for(self, session: BackendSession, runs: list[PromptRun]) -> float:
        """Expected seconds until `session` has run `runs` (ours there, in order)."""
        busy = max((done for _, done in self._finishes(session, runs)), default=0.0)
        # Other clients' prompts there count as much as one of ours.
        return busy + max(0, session.queue_remaining - len(runs)) * UNSEEN_NODE_SECONDS

    def _finishes(self, session: BackendSession,
                  runs: list[PromptRun]) -> Iterator[tuple[PromptRun, float]]:
        """Each of `runs` (ours on `session`, in order) with the expected seconds until it is
        done, each finding in the cache what the ones before it leave there, and each not
        started yet costing the backend's overhead too."""
        ahead: list[PromptKeys] = []
        overhead = self._node_costs.overhead(session.name)
        done = 0.0
        for run in runs:
            done += self._run_left(run, session.warm.held_after(ahead))
            if run.started is None:
                done += overhead
            yield run, done
            if run.keys is not None:
                ahead.append(run.keys)

    def _run_left(self, run: PromptRun, held: frozenset[str]) -> float:
        """Expected seconds left of a prompt of ours that will find `held` in its backend's
        cache (for one running, what its cached and finished nodes left there): by its own
        step progress once that tells (a long job shows itself long), else by what its nodes
        not held cost."""
        length = length_by_steps(run)
        if length is not None and run.started is not None:
            return max(length - (time.monotonic() - run.started), 0.0)
        if run.keys is None:
            return self._seconds_left(run, UNSEEN_NODE_SECONDS)
        left = self._node_costs.uncached_seconds(run.session.name, run.keys.prompt,
                                                 run.keys.keys, held)
        node = run.node_running
        if node is not None and node in run.keys.keys:
            # A node past its expected time is probably a long one.
            cost = self._node_costs.node_cost(run.session.name, run.keys.keys[node],
                                              run.keys.prompt[node])
            left += remaining(cost, time.monotonic() - run.node_started) - cost
        return max(left, 0.0)

    def cost(self, view: BackendView, job: QueuedJob, *, cold: bool = False,
             tried: bool = False) -> float:
        """Expected seconds of `job` on that backend beyond what its cache serves (with
        `cold`, as if it held nothing; `tried`: see `NodeCosts.node_cost`)."""
        return self._node_costs.uncached_seconds(
            view.session.name, job.prompt, self.keys_of(job, view.session).keys,
            frozenset() if cold else view.held, tried=tried)

    def keys_of(self, job: QueuedJob, session: BackendSession) -> PromptKeys:
        """The cache keys of a queued job's prompt, kept while it is near the backlog's head."""
        keys = self._keys.get(job.id)
        if keys is None:
            assert session.capabilities is not None
            keys = self._keys[job.id] = PromptKeys(job.prompt, session.capabilities.keyed_by_id)
            while len(self._keys) > HEADS_KEPT:
                self._keys.popitem(last=False)
        return keys

    def can_run(self, session: BackendSession, job: QueuedJob) -> bool:
        """Whether `session` (its capabilities known) can run a queued job."""
        assert session.capabilities is not None
        return self._runnable.runs_on(session.capabilities, job)

    def _rivals(self, session: BackendSession, job: QueuedJob) -> Iterator[BackendLoad]:
        for other in self._sessions:
            if other is session or not other.accepts_work or other.capabilities is None:
                continue
            load = self._load(other, job.workflow)
            if load is not None and self.can_run(other, job):
                yield load

    def _load(self, session: BackendSession, workflow: str) -> BackendLoad | None:
        """What `session` has ahead of a new prompt of `workflow`, in expected seconds, each
        prompt not started yet costing the backend's overhead too. The new prompt's own
        overhead is the fleet's: backends alike but for a few milliseconds of round trip are
        alike (by `should_take`, one a hair slower leaves the last job to the other)."""
        run_time = self._run_times.expected(session.name, workflow)
        if run_time is None:
            return None
        overhead = self._node_costs.overhead(session.name)
        per_job = run_time + self._node_costs.overhead()
        runs = self._tracker.runs_on(session)
        busy = sum(self._seconds_left(run, run_time) + (overhead if run.started is None else 0.0)
                   for run in runs)
        # Other clients' prompts there count as much as one of ours.
        busy += max(0, session.queue_remaining - len(runs)) * per_job
        return BackendLoad(session.name, per_job, busy)

    def _seconds_left(self, run: PromptRun, default: float) -> float:
        expected = self._run_times.expected(run.session.name, run.job.workflow) or default
        if run.started is None:
            return expected
        return remaining(expected, time.monotonic() - run.started)

    async def _rebalance(self) -> None:
        """Give a backend that has room and nothing to take from the backlog the prompt that
        would finish soonest by moving there: one waiting in a busy backend's queue (a slow
        GPU's prefetched job, one stuck behind a long prompt), or a long one running on a
        much slower GPU, started afresh. That happens only near the end of a batch."""
        targets = [s for s in self._sessions if s.accepts_work and s.capabilities is not None
                   and self._tracker.slots_taken(s) < self._max_inflight
                   # With a backlog left, only backends placement keeps idle.
                   and (self._backlog_empty
                        or not (self._tracker.slots_taken(s) or s.queue_remaining))]
        if not targets:
            return
        # Most prompts could not gain enough even on an infinitely fast backend: this pass
        # costs one look at each prompt, and a look at each target only for those that could.
        prospects = [prospect for run in self._tracker.movable_runs()
                     if (prospect := self._prospect(run)) is not None
                     and prospect.left > MOVE_MIN_GAIN]
        if not prospects:
            return
        best: tuple[float, Prospect, BackendSession] | None = None
        for target in targets:
            assert target.capabilities is not None
            view = self._view(target)
            for prospect in prospects:
                run = prospect.run
                if run.session is target or run.keys is None:
                    continue
                # By the same estimate as placement: what its nodes not held there cost.
                cost = self._node_costs.uncached_seconds(
                    target.name, run.keys.prompt, run.keys.keys, view.held)
                gain = prospect.gain_on(view, cost, backlog=not self._backlog_empty)
                if gain > MOVE_MIN_GAIN and (best is None or gain > best[0]) \
                        and target.capabilities.can_run(run.job.prompt):
                    best = (gain, prospect, target)
        if best is not None:
            await self._move(best[1].run, best[2])

    def _prospect(self, run: PromptRun) -> Prospect | None:
        """How long `run` has left where it is, by what its nodes and those of the prompts
        ahead of it cost there, counting that backend's cache; a running prompt judged by its
        own step progress rather than by averages."""
        if run.keys is None:
            return None
        if run.started is None:
            before = 0.0
            for earlier, done in self._finishes(run.session, self._tracker.runs_on(run.session)):
                if earlier is run:
                    return Prospect(run, left=done, cost=done - before, overrun=1.0)
                before = done
            return None
        length = length_by_steps(run)
        if length is None:
            return None
        expected = self._node_costs.uncached_seconds(run.session.name, run.keys.prompt,
                                                     run.keys.keys, run.served)
        left = max(length - (time.monotonic() - run.started), 0.0)
        return Prospect(run, left=left, cost=expected,
                        overrun=length / expected if expected > 0 else 1.0)

    async def _move(self, run: PromptRun, target: BackendSession) -> None:
        job, source = run.job, run.session
        assert job.prompt_id is not None
        try:
            if run.started is None:
                gone = await self._withdraw_waiting(source, job.prompt_id)
            else:
                gone = await self._interrupt_running(run)
        except ComfyError as exc:
            run.moving = False
            log.info("could not take prompt %s off %s: %s", job.prompt_id, source.name, exc)
            return
        if not gone:
            return
        prompt_id = str(uuid.uuid4())
        # Followed until the write saying where the job goes is committed: one that fails
        # (the database away) leaves it to the safety net, which puts the job back then.
        try:
            async with self._tracker.leaving(job.prompt_id):
                moved = await self._repository.move(
                    job, target.name, prompt_id, max_inflight=self._max_inflight,
                    owner=self._owner)
                if moved is None:
                    # Cancelled meanwhile, or the target got busy: back to the backlog.
                    await self._tracker.put_back(run)
        except Exception:
            self._tracker.withdrawn(run)
            raise
        if moved is None:
            return
        log.info("job %s moved from %s to %s", job.id, source.name, target.name,
                 extra=job_fields(moved))
        self._start(target, moved)

    @staticmethod
    async def _withdraw_waiting(source: BackendSession, prompt_id: str) -> bool:
        """Delete a waiting prompt; whether it is gone for good (else it started first)."""
        await source.client.delete_queued([prompt_id])
        # The queue before the history: a prompt only moves from one to the other, so
        # missing from both means the delete took it and it will never run there.
        if prompt_id in await source.client.queued_prompt_ids():
            return False
        return await source.client.history(prompt_id) is None

    async def _interrupt_running(self, run: PromptRun) -> bool:
        """Interrupt a running prompt; whether it ended unfinished. One that finished first is
        settled as usual; one not stopped in time goes on where it is."""
        run.moving = True  # its events are ours to read now, from /history
        client = run.session.client
        await client.interrupt(run.prompt_id)
        try:
            async with asyncio.timeout(INTERRUPT_WAIT):
                # Polling a remote server: this prompt's events are no longer read.
                while (entry := await client.history(run.prompt_id)) is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        except TimeoutError:
            run.moving = False
            return False
        if entry.get("status", {}).get("status_str") == "success":
            await self._tracker.settle(run, entry)
            return False
        return True

    async def _submit(self, session: BackendSession, job: Job, prompt_id: str,
                      prompt: dict[str, Any]) -> None:
        """POST `prompt` (`job`'s, as `isolate_outputs` makes it) as `prompt_id`."""
        extra_data: ExtraData | None = None
        if job.extra_data_holder is not None:
            extra_data = self._extra_data.get(job.id)
            if extra_data is None:  # never sent without it (the claim is the holder's only)
                await self._fail_unsendable(job)
                return
        try:
            await self._upload_inputs(session, job)
            await session.client.queue_prompt(
                prompt, prompt_id=prompt_id, client_id=session.client_id,
                extra_data=extra_data.values if extra_data is not None else None,
            )
        except PromptRejected as exc:
            await self._fail_unsent(job, job_error(
                "prompt_rejected", str(exc), details=exc.body.get("node_errors")))
            return
        except InputUnavailable as exc:
            # Gone, not away for a while: put back in the backlog it would be claimed, and
            # fail to be sent, again and again.
            await self._fail_unsent(job, job_error(INPUT_UNAVAILABLE, str(exc)))
            return
        except (ComfyError, StorageError) as exc:
            log.warning("backend %s did not take job %s: %s", session.name, job.id, exc,
                        extra=job_fields(job))
            # Hold the slot a moment so a backend that fails every POST is not hammered.
            await asyncio.sleep(SUBMIT_FAILURE_PAUSE)
            # A POST that failed late (a timeout) may have been taken: released only once
            # the prompt is surely not there, else reconciliation settles it as a prompt
            # whose events were missed.
            try:
                if not await self._withdraw_waiting(session, prompt_id):
                    return
            except ComfyError:
                return
            # Followed until the release is written: a release that fails (the database
            # away) leaves it to the safety net, which finds the prompt gone and puts the job
            # back then.
            async with self._tracker.leaving(prompt_id):
                await self._repository.release(job)
            self._signals.job_queued()
            return
        finally:
            self._tracker.submitted(prompt_id)
        if not self._tracker.is_tracked(prompt_id):
            # Cancelled while the POST was on its way: take it back off the backend.
            await session.withdraw(prompt_id)
            return
        if log.isEnabledFor(logging.INFO):  # (its arguments, read through the ORM's descriptors)
            log.info("job %s queued on %s as %s", job.id, session.name, prompt_id,
                     extra=job_fields(job))

    async def _fail_unsendable(self, job: Job) -> None:
        await self._fail_unsent(job, job_error(
            EXTRA_DATA_LOST, "this gateway process does not hold the job's extra_data "
            "(never stored) and cannot send the job without it; submit it again"))

    async def _fail_unsent(self, job: Job, error: dict[str, Any]) -> None:
        """Fail a claimed job whose prompt its backend never took."""
        assert job.prompt_id is not None
        async with self._tracker.leaving(job.prompt_id):
            failed = await self._repository.finish(job, JobStatus.FAILED, ON_BACKEND_STATES,
                                                   error=error)
        if failed is not None:
            self._endings.tell(JobEnded(failed))

    async def _upload_inputs(self, session: BackendSession, job: Job) -> None:
        """Right before queueing: the job's input images into this backend's input folder;
        InputUnavailable when one is no longer in storage."""
        for param, value in job.params.items():
            if isinstance(value, dict) and "input" in value:
                try:
                    data = await self._storage.read(value["input"])
                except NotInStorage as exc:
                    raise InputUnavailable(
                        f"the image of parameter {param!r} is no longer in storage "
                        f"({value['input']}); submit the job again") from exc
                await session.client.upload_image(data, value["name"], value["subfolder"],
                                                  value["content_type"])

    async def close(self) -> None:
        for task in self._submissions:
            task.cancel()
        await asyncio.gather(*self._submissions, return_exceptions=True)
