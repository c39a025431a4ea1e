"""CPU per pick: what the dispatcher's choice of a job for a free backend (`Dispatcher._pick`,
the Python inside every claim) costs, on a fixed, realistic state, with no I/O.

The state: 16 backends of mixed speeds (four of them with half of the eight models: capability
routing), three prompts' slots each, one of ours running on most backends, a second waiting
on a few, none on three, each backend's cache holding the model its last prompt loaded; costs of
nodes, run times and overheads learned; the head of the backlog of three tenants, jobs of
several workflows (`simulated_model` for six models with different work, `invert`), some
already passed (overtaken) several times. Two backlogs: a deep one (the read says more is
queued: every backend takes work), which moves on by a job at every pick, as it does when
each claim takes one (a job new to the read each time: its cache keys are worked out), and
the end of one (a dozen jobs: speed-aware placement weighs the others' loads). Every backend
picks in turn, each on a read of its own (fresh rows, as each claim reads the backlog anew),
AFFINITY_WINDOW 32. Between two picks a prompt ends (as at saturation, where a prompt
ends for every job taken): a sample of a node's cost, a run time and an overhead are
recorded, the same each time; the picks change nothing.

With `--other SRC`, the same in a process whose PYTHONPATH puts SRC first (a `git archive` of
main's `src`, say), in turns with this checkout's: the CPU per pick of each, and a digest of
every decision made (the job chosen, those passed, the charge, what came of the pick), which
must be equal when a change is meant to keep the decisions.

Run from the repository root:
    .venv/bin/python -m bench.pick_cpu [--other /tmp/main/src] [--turns 3] [--rounds 40]
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import random
import statistics
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.harness import measured_runs, paired_parser, print_table
from comfyfleet.comfy.capabilities import Capabilities
from comfyfleet.comfy.endpoints import Backend
from comfyfleet.dispatch.dispatcher import Dispatcher
from comfyfleet.execution.costs import NodeCosts
from comfyfleet.execution.run_times import RunTimes
from comfyfleet.execution.session import BackendSession
from comfyfleet.execution.tracker import ExecutionTracker
from comfyfleet.execution.warm import PromptKeys
from comfyfleet.jobs.models import Job
from comfyfleet.jobs.repository import BacklogRead, QueuedJob, TenantHead
from comfyfleet.workflows.catalog import Catalog, load_catalog
from tests.support import REPO

BACKENDS = 16
MAX_INFLIGHT = 3
WINDOW = 32
READ = 50  # jobs a claim reads (CLAIM_BATCH)
ROUNDS_MAX = 200
MODELS = [f"model-{letter}.safetensors" for letter in "abcdefgh"]
WANTED = MODELS[:6]  # the models of the queued jobs: a backend holding another is cold
TENANTS = [("", 1), ("tenant-a", 3), ("tenant-b", 1)]
LOAD_SECONDS = 3.0
CLASSES = ["SimulatedLoader", "SimulatedWork", "SaveImage", "EmptyImage", "ImageInvert"]


class Listener:
    """A session's listener that hears nothing: no backend is connected."""

    async def backend_connected(self, session: BackendSession) -> None: ...

    async def backend_message(self, session: BackendSession, message: Any) -> None: ...

    async def backend_disconnected(self, session: BackendSession) -> None: ...


@functools.cache
def catalog() -> Catalog:
    return load_catalog(REPO / "workflows")


def prompt_of(workflow: str, params: dict[str, Any]) -> dict[str, Any]:
    built: dict[str, Any] = catalog().workflows[workflow].build(params)[1]
    return built


def job_prompt(rng: random.Random) -> tuple[str, dict[str, Any]]:
    if rng.random() < 0.2:
        return "invert", prompt_of("invert", {"width": 64, "height": 64,
                                              "color": rng.randrange(1, 1000)})
    return "simulated_model", prompt_of("simulated_model", {
        "model": rng.choice(WANTED), "seconds": rng.choice([0.5, 1.0, 2.0, 4.0]),
        "steps": rng.randrange(1, 50)})


class State:
    """Backends, tracker, learned costs and two backlogs, the same for a given seed."""

    def __init__(self, seed: int, tenants: int = len(TENANTS)) -> None:
        rng = random.Random(seed)
        self.run_times = RunTimes()
        self.node_costs = NodeCosts()
        self.sessions: list[BackendSession] = []
        full = Capabilities(node_classes=frozenset(CLASSES),
                            combos={("SimulatedLoader", "ckpt_name"): frozenset(MODELS)})
        partial = Capabilities(node_classes=frozenset(CLASSES),
                               combos={("SimulatedLoader", "ckpt_name"): frozenset(MODELS[:4])})
        self.speeds = speeds = [rng.choice([0.5, 1.0, 1.0, 2.0]) for _ in range(BACKENDS)]
        # A sample of a node's cost per backend, recorded again between two picks.
        self.samples: list[tuple[str, str, str, float]] = []
        for index in range(BACKENDS):
            session = BackendSession(Backend(f"gpu{index:02}", f"http://127.0.0.1:{9000 + index}"),
                                     Listener())
            session.connected = True
            session.capabilities = full if index < BACKENDS - 4 else partial
            self.sessions.append(session)
        self.tracker = ExecutionTracker(
            None, None, max_attempts=3, endings=None, signals=None,  # type: ignore[arg-type]
            quiet_seconds=30.0, grace_seconds=30.0, events=None,  # type: ignore[arg-type]
            run_times=self.run_times, node_costs=self.node_costs, lease=None,  # type: ignore[arg-type]
            extra_data=None, queued=None)  # type: ignore[arg-type]
        # What has been learned: every backend has run each workflow, and the loaders of
        # the models it can load.
        for session, speed in zip(self.sessions, speeds, strict=True):
            assert session.capabilities is not None
            for sample in range(5):
                self.node_costs.record_overhead(session.name, 0.02 + 0.005 * sample)
                self.run_times.record(session.name, "simulated_model",
                                      (LOAD_SECONDS / 3 + 1.5) / speed * (0.8 + 0.1 * sample))
                self.run_times.record(session.name, "invert", 0.05 / speed)
            for model in MODELS if session.capabilities is full else MODELS[:4]:
                workflow, prompt = "simulated_model", prompt_of(
                    "simulated_model", {"model": model, "seconds": 1.0, "steps": 1})
                keys = PromptKeys(prompt, session.capabilities.keyed_by_id)
                for node_id, key in keys.keys.items():
                    class_type = prompt[node_id]["class_type"]
                    seconds = {"SimulatedLoader": LOAD_SECONDS, "SimulatedWork": 1.5}.get(
                        class_type, 0.01)
                    self.node_costs.record(session.name, key, class_type, seconds / speed)
            self.samples.append((session.name, key, class_type, seconds / speed))
        # Each backend's cache: the model of the last prompt it ran.
        for index, session in enumerate(self.sessions):
            model = MODELS[index % (8 if index < BACKENDS - 4 else 4)]
            keys = PromptKeys(prompt_of("simulated_model",
                                        {"model": model, "seconds": 1.0, "steps": 1}),
                              frozenset())
            session.warm.started(keys, [])
            for node_id in keys.keys:
                session.warm.ran(keys, node_id)
        # Ours on the backends: none on three, one running on most (some far enough to
        # judge by their steps), and a second waiting behind it on a few; a free slot on each.
        self.now = now = time.monotonic()
        for index, session in enumerate(self.sessions):
            for position in range(0 if index % 5 == 4 else 2 if index % 4 == 2 else 1):
                workflow, prompt = job_prompt(rng)
                job = Job(workflow=workflow, prompt=prompt, prompt_id=str(uuid.UUID(
                    int=rng.getrandbits(128))))
                self.tracker.track(session, job)
                if position == 0:
                    run = self.tracker.runs_on(session)[0]
                    run.started = now - rng.uniform(0.1, 3.0)
                    if index % 3 == 0:
                        run.step_fraction, run.stepped_at = 0.4, now - 0.05
                    run.node_running, run.node_started = "2", now - rng.uniform(0.05, 1.0)
            session.queue_remaining = len(session.inflight)
        self.deep = self._backlog(rng, READ + (ROUNDS_MAX + 1) * BACKENDS, TENANTS[:tenants])
        self.tail = self._backlog(rng, 12, TENANTS[:tenants])
        # Each tenant's start in virtual time and weight (the deep backlog's read goes on past
        # the jobs read, the tail's does not: `measure`).
        self.tenants = {tenant: TenantHead(10.0 * TENANTS.index((tenant, weight)), weight)
                        for tenant, weight in TENANTS[:tenants]}

    def prompt_ended(self, turn: int) -> None:
        """A prompt of ours ended on a backend (between two claims, at saturation): a sample
        of a node's cost, of the workflow's run time and of the overhead, the same as before
        (so the decisions stay alike), which every estimate worked out since may not
        outlive."""
        backend, key, class_type, seconds = self.samples[turn % BACKENDS]
        self.node_costs.record(backend, key, class_type, seconds)
        self.node_costs.record_overhead(backend, 0.03)
        self.run_times.record(backend, "invert", 0.05 / self.speeds[turn % BACKENDS])

    @staticmethod
    def _backlog(rng: random.Random, count: int, tenants: list[tuple[str, int]]
                 ) -> list[QueuedJob]:
        """`count` queued jobs of `tenants` as a claim reads them: each tenant's head, its
        own order."""
        created = datetime(2026, 12, 7, tzinfo=UTC)
        jobs: list[QueuedJob] = []
        for place in range(count):
            tenant, _ = tenants[place % len(tenants)]
            workflow, prompt = job_prompt(rng)
            jobs.append(QueuedJob(
                uuid.UUID(int=rng.getrandbits(128)), workflow, prompt,
                priority=1 if place < 3 else 0, overtaken=rng.choice([0, 0, 0, 3, 12, 31]),
                created_at=created + timedelta(milliseconds=place), tenant=tenant))
        return jobs


def measure(seed: int, rounds: int, tenants: int) -> dict[str, Any]:
    """CPU per pick over `rounds` rounds of every backend picking on each backlog; the
    decisions' digest."""

    async def main() -> dict[str, Any]:
        state = State(seed, tenants)
        dispatcher = Dispatcher(
            None, state.sessions, state.tracker, None,  # type: ignore[arg-type]
            signals=None, max_inflight=MAX_INFLIGHT, endings=None,  # type: ignore[arg-type]
            run_times=state.run_times, node_costs=state.node_costs, affinity_window=WINDOW,
            owner=1, extra_data=None, safety_pass_seconds=1.0)  # type: ignore[arg-type]
        index = {job.id: place for place, job in enumerate(state.deep + state.tail)}
        digest = hashlib.sha256()
        figures: dict[str, Any] = {}
        # Every pick at the instant the state was made: a running prompt's time left, and
        # so a decision, must not depend on how fast the picks before it ran.
        monotonic, time.monotonic = time.monotonic, lambda: state.now
        for name, backlog in [("deep", state.deep), ("tail", state.tail)]:
            picks, taken, outcomes = 0, 0, Counter[str]()
            cpu = 0.0
            for round_ in range(rounds + 1):  # the first round warms what is kept
                for turn, session in enumerate(state.sessions):
                    # A claim's read, anew; the deep backlog's head a job further on.
                    head = (round_ * BACKENDS + turn) if name == "deep" else 0
                    read = BacklogRead([job._replace() for job in backlog[head:head + READ]],
                                       state.tenants, name == "deep", 2)
                    state.prompt_ended(turn)
                    began = time.process_time()
                    choice = dispatcher._pick(session, read)
                    spent = time.process_time() - began
                    if round_:
                        cpu += spent
                        picks += 1
                        taken += choice is not None
                        outcomes[dispatcher._outcomes.get(session.name, "chose")] += 1
                    decision = None if choice is None else (
                        index[choice.job_id], [index[job] for job in choice.passed],
                        round(choice.charge, 9))
                    digest.update(repr((name, session.name, decision,
                                        dispatcher._outcomes.get(session.name),
                                        dispatcher._waiting, dispatcher._trying)).encode())
            figures[name] = {"ms_per_pick": 1000 * cpu / picks, "taken": taken / picks,
                             "outcomes": dict(outcomes)}
        time.monotonic = monotonic
        for session in state.sessions:
            await session.close()
        return {**figures, "decisions": digest.hexdigest()[:16]}

    result: dict[str, Any] = asyncio.run(main())
    return result



def main() -> None:
    parser = paired_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=40, choices=range(1, ROUNDS_MAX + 1),
                        metavar=f"1-{ROUNDS_MAX}")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tenants", type=int, default=len(TENANTS),
                        choices=range(1, len(TENANTS) + 1),
                        help="the backlog's tenants (1: one tenant's jobs, as bench.throughput's)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.seed, args.rounds, args.tenants)))
        return
    runs = measured_runs("bench.pick_cpu", args.other, args.turns,
                         ["--rounds", str(args.rounds), "--seed", str(args.seed),
                          "--tenants", str(args.tenants)],
                         lambda: measure(args.seed, args.rounds, args.tenants))
    print(f"load average {os.getloadavg()[0]:.2f}")
    print_table(["turn", "code", "deep ms/pick", "taken", "tail ms/pick", "taken", "decisions"],
                [[run["turn"], run["code"], f"{run['deep']['ms_per_pick']:.3f}",
                  f"{run['deep']['taken']:.2f}", f"{run['tail']['ms_per_pick']:.3f}",
                  f"{run['tail']['taken']:.2f}", run["decisions"]] for run in runs])
    # A busy machine slows some turns a lot more than others: the least of each code's turns
    # says what a pick costs, their median what it costs under the load there was.
    codes = list(dict.fromkeys(run["code"] for run in runs))
    print_table(["code", "deep ms/pick, least", "median", "tail ms/pick, least", "median"],
                [[code, *(f"{figure(times):.3f}" for backlog in ("deep", "tail")
                          for times in [[run[backlog]["ms_per_pick"] for run in runs
                                         if run["code"] == code]]
                          for figure in (min, statistics.median))] for code in codes])
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
