"""DNS discovery with a changing fleet: GPU pods appearing while a backlog waits, and pods
removed through their preStop drain while work runs.

Each run starts afresh: embedded PostgreSQL, `comfyfleet serve` in its own process with
COMFYUI_DISCOVERY on a DNS server in the benchmark's process (tests.dns_server, on loopback;
the benchmark changes its answers and knows when), a verifying webhook receiver, and eight
`comfyfleet sim` processes, one per backend, on 127.0.0.2-127.0.0.9 sharing one port, as the
pods of a StatefulSet share theirs. PTR records name them comfyui-0..comfyui-7.

Scale-up: with comfyui-0 and comfyui-1 in DNS, --jobs jobs of --seconds seconds
(`simulated_work`) are POSTed; --before seconds after the last one was answered, comfyui-2..7
appear in DNS, one every --stagger seconds (so each finds the discovery pass at another
phase). For each new backend: the time from its address appearing
to its first prompt accepted (its queue growing, seen on the simulator's websocket), against
DISCOVERY_INTERVAL + 1 s; and the makespan (first POST -> last webhook verified) against the
bound for the changing fleet: the earliest time by which the backends, each running one job
at a time from the moment its address appeared, could have run every job.

Scale-down: --drain-jobs more jobs; once every backend has work, comfyui-7..2 go one after
another, as a StatefulSet scaled down removes its pods: the preStop hook
(comfyui_nodes/comfyfleet_cleanup/drain.py --wait, with the pod's HOSTNAME), then the address
leaves DNS, then the simulator stops. (With --dns-first the address leaves as the drain
starts: in Kubernetes a pod's endpoint goes when the pod starts terminating, while preStop
runs, and DNS caches make that a few seconds later.) Reported: how long each drain waited
and what it answered, jobs lost (not succeeded in the end), jobs run twice (executions in
the simulators' histories, read before each stops, beyond one per job, matched through the
prompt id of each job's last attempt), jobs retried (more than one attempt), and prompts
still queued or running on a simulator when it stopped.

The DNS server and the receiver share the benchmark's event loop; everything else has a
process of its own. Jobs are `simulated_work` with 2 progress steps, MAX_INFLIGHT_PER_BACKEND
at its default of 2.

Run from the repository root:  .venv/bin/python -m bench.discovery [--runs 2] [--interval 2]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import json
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.harness import (
    TimedReceiver,
    bench_root,
    comfyfleet_serve,
    embedded_postgres,
    fresh_database,
    print_table,
)
from comfyfleet.comfy.messages import Status, parse_text
from comfyfleet.webhooks.signing import new_secret
from tests.dns_server import NAME, LoopbackDns, loopback_dns
from tests.support import REPO, free_ports, python_process

PODS = 8  # comfyui-0 .. comfyui-7 on 127.0.0.2 .. 127.0.0.9
KEPT = 2  # in DNS before the scale-up and after the scale-down
DRAIN_SCRIPT = REPO / "comfyui_nodes" / "comfyfleet_cleanup" / "drain.py"
SUBMITTERS = 16  # POSTs in flight at once
READY_SECONDS = 60.0
UNLIKE = 1e-6  # seconds between two jobs' durations (see Deployment.submit)


@dataclass
class Pod:
    """One simulated ComfyUI in a process of its own, on a loopback address of its own."""

    name: str
    address: str
    url: str
    _stack: AsyncExitStack = field(default_factory=AsyncExitStack)

    async def start(self, port: int) -> None:
        await self._stack.enter_async_context(python_process(
            "comfyfleet", "sim", "--host", self.address, "--port", str(port),
            ready_url=self.url + "/prompt"))

    async def stop(self) -> None:
        await self._stack.aclose()

    async def executions(self, http: aiohttp.ClientSession) -> tuple[list[str], int]:
        """The prompt ids its history says ran to success, and how many prompts are still
        queued or running there."""
        async with http.get(f"{self.url}/history") as response:
            history: dict[str, Any] = await response.json()
        async with http.get(f"{self.url}/queue") as response:
            queue = await response.json()
        ran = [prompt_id for prompt_id, entry in history.items()
               if entry.get("status", {}).get("status_str") == "success"]
        return ran, len(queue["queue_running"]) + len(queue["queue_pending"])


@asynccontextmanager
async def pods() -> AsyncIterator[list[Pod]]:
    port = free_ports(1)  # free on 127.0.0.1; the other addresses of 127/8 are unused here
    fleet = [Pod(f"comfyui-{i}", f"127.0.0.{i + 2}", f"http://127.0.0.{i + 2}:{port}")
             for i in range(PODS)]
    try:
        for pod in fleet:
            await pod.start(port)
        yield fleet
    finally:
        for pod in fleet:
            await pod.stop()


class FirstAccepted:
    """Watches each backend's broadcast `status` for its queue growing the first time."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}  # pod name -> time.monotonic()
        self._tasks: list[asyncio.Task[None]] = []

    def watch(self, http: aiohttp.ClientSession, pod: Pod) -> None:
        self._tasks.append(asyncio.create_task(self._follow(http, pod)))

    async def _follow(self, http: aiohttp.ClientSession, pod: Pod) -> None:
        async with http.ws_connect(f"{pod.url}/ws", params={"clientId": uuid.uuid4().hex}) as ws:
            async for frame in ws:
                if frame.type != aiohttp.WSMsgType.TEXT:
                    continue
                message = parse_text(frame.data)
                if isinstance(message, Status) and (message.queue_remaining or 0) > 0:
                    self.at[pod.name] = time.monotonic()
                    return

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def makespan_bound(appeared: Iterable[float], jobs: int, seconds: float) -> float:
    """The earliest time by which `jobs` jobs of `seconds` each can have finished on backends
    that each run one at a time from the moment it appeared: the jobs-th smallest of the
    finish times a + k * seconds (k >= 1) over every backend."""
    finishes = [(start + seconds, start) for start in appeared]
    heapq.heapify(finishes)
    for _ in range(jobs - 1):
        finish, start = heapq.heappop(finishes)
        heapq.heappush(finishes, (finish + seconds, start))
    return finishes[0][0]


@dataclass
class Drain:
    pod: str
    seconds: float
    code: int  # drain.py's: 0 idle, 1 still busy when the wait ran out, 2 refused or failed
    left_running: int  # prompts queued or running on the simulator when it stopped


@dataclass
class Run:
    interval: float
    first_job: dict[str, float | None]  # new pod -> seconds from DNS to first prompt accepted
    makespan: float
    bound: float
    drains: list[Drain]
    jobs: int
    lost: int
    twice: int
    retried: int  # jobs with more than one attempt
    left_running: int  # prompts queued or running on simulators when they stopped
    load: tuple[float, float]  # 1-minute load average at the start and the end

    @property
    def ratio(self) -> float:
        return self.makespan / self.bound

    @property
    def slowest_join(self) -> float | None:
        delays = list(self.first_job.values())
        return None if None in delays else max(d for d in delays if d is not None)


@dataclass
class Deployment:
    dns: LoopbackDns
    pods: list[Pod]
    receiver: TimedReceiver
    api: str
    http: aiohttp.ClientSession
    submitted: list[str] = field(default_factory=list)  # job ids
    executions: Counter[str] = field(default_factory=Counter)  # prompt id -> runs
    left_running: int = 0

    async def submit(self, count: int, seconds: float) -> None:
        """`count` jobs of `seconds`, SUBMITTERS POSTs at a time. Each job's seconds are a
        microsecond longer than the one before, so that no two prompts are alike: ComfyUI
        (and the simulator) serves a node from its cache when the previous prompt had the same
        one, and comfyfleet's placement would rightly send alike jobs where they cost nothing."""
        posting = asyncio.Semaphore(SUBMITTERS)

        async def post(index: int) -> None:
            body = {"workflow": "simulated_work",
                    "params": {"seconds": seconds + index * UNLIKE, "steps": 2},
                    "callback_url": self.receiver.url}
            async with posting, self.http.post(f"{self.api}/jobs", json=body) as response:
                assert response.status == 202, await response.text()
                self.submitted.append((await response.json())["id"])

        first = len(self.submitted)
        await asyncio.gather(*(post(first + i) for i in range(count)))

    async def backends(self) -> dict[str, dict[str, Any]]:
        async with self.http.get(f"{self.api}/backends") as response:
            return {b["name"]: b for b in await response.json()}

    async def until(self, check: Callable[[dict[str, dict[str, Any]]], bool]) -> None:
        fleet: dict[str, dict[str, Any]] = {}
        try:
            async with asyncio.timeout(READY_SECONDS):
                while not check(fleet := await self.backends()):  # noqa: ASYNC110
                    await asyncio.sleep(0.1)  # polling the service: no local event to wait on
        except TimeoutError:
            print("  the fleet did not get there:", json.dumps(
                {name: {k: b[k] for k in ("healthy", "draining", "inflight", "last_error")}
                 for name, b in fleet.items()}), flush=True)
            raise

    async def finished(self, seconds: float) -> None:
        """Until every job submitted has a verified webhook, or `seconds` have passed (a job
        lost never sends one: counted afterwards)."""
        try:
            await self.receiver.wait_until(len(self.submitted), seconds)
        except TimeoutError:
            print(f"  {len(self.submitted) - len(self.receiver.verified)} jobs did not finish "
                  f"within {seconds:.0f} s", flush=True)

    async def record(self, pod: Pod) -> None:
        ran, left = await pod.executions(self.http)
        self.executions.update(ran)
        self.left_running += left

    def appear(self, pod: Pod) -> float:
        self.dns.addresses = [*self.dns.addresses, pod.address]
        return time.monotonic()

    def leave(self, pod: Pod) -> None:
        self.dns.addresses = [a for a in self.dns.addresses if a != pod.address]


async def scale_up(
    deployment: Deployment, args: argparse.Namespace,
) -> tuple[dict[str, float | None], float, float]:
    """First-job delays of the new backends, the makespan and its bound."""
    watcher = FirstAccepted()
    for pod in deployment.pods[KEPT:]:
        watcher.watch(deployment.http, pod)
    try:
        started = time.monotonic()
        await deployment.submit(args.jobs, args.seconds)
        queued = time.monotonic()
        print(f"  scale-up: {args.jobs} jobs POSTed in {queued - started:.1f} s", flush=True)
        appeared: dict[str, float] = {}
        for index, pod in enumerate(deployment.pods[KEPT:]):
            await asyncio.sleep(max(0.0, queued + args.before + index * args.stagger
                                    - time.monotonic()))
            appeared[pod.name] = deployment.appear(pod)
        await deployment.finished(3 * args.jobs * args.seconds / KEPT + 60)
    finally:
        await watcher.stop()
    ended = max(deployment.receiver.verified_at.values())
    first_job = {name: (watcher.at[name] - at if name in watcher.at else None)
                 for name, at in appeared.items()}
    bound = makespan_bound([0.0] * KEPT + [at - started for at in appeared.values()],
                           args.jobs, args.seconds)
    return first_job, ended - started, bound


async def run_drain(api: str, pod: Pod, wait: float) -> tuple[int, float]:
    """drain.py as the pod's preStop hook runs it (its HOSTNAME is the pod's name); its exit
    status and how long it took."""
    began = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-I", str(DRAIN_SCRIPT), "--wait", str(wait),
        env={"COMFYFLEET_URL": api, "HOSTNAME": pod.name, "PATH": os.defpath},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await process.communicate()
    assert process.returncode is not None
    if process.returncode:
        print(f"  drain {pod.name}: {out.decode().strip()}", flush=True)
    return process.returncode, time.monotonic() - began


async def scale_down(deployment: Deployment, args: argparse.Namespace) -> list[Drain]:
    submitting = asyncio.create_task(deployment.submit(args.drain_jobs, args.seconds))
    try:
        await deployment.until(lambda fleet: len(fleet) == PODS
                               and all(b["inflight"] > 0 for b in fleet.values()))
    finally:
        await submitting  # on the way out too: no POST is left running
    print(f"  scale-down: {args.drain_jobs} jobs POSTed, every backend busy", flush=True)
    drains = []
    for pod in reversed(deployment.pods[KEPT:]):
        if args.dns_first:
            deployment.leave(pod)
        code, waited = await run_drain(deployment.api, pod, args.drain_wait)
        deployment.leave(pod)
        left_before = deployment.left_running
        await deployment.record(pod)
        await pod.stop()
        drains.append(Drain(pod.name, waited, code, deployment.left_running - left_before))
    await deployment.finished(3 * args.drain_jobs * args.seconds / KEPT + 60)
    for pod in deployment.pods[:KEPT]:
        await deployment.record(pod)
    return drains


def accounting(deployment: Deployment) -> tuple[int, int, int]:
    """Jobs lost, jobs run twice (executions beyond one per job) and jobs retried."""
    last_attempt: dict[str, dict[str, Any]] = {}
    for event in deployment.receiver.verified:
        if event["type"] == "job.succeeded":
            last_attempt[event["data"]["id"]] = event["data"]
    lost = len(set(deployment.submitted) - set(last_attempt))
    final_prompts = {job["prompt_id"] for job in last_attempt.values()}
    twice = sum(runs - (prompt_id in final_prompts)
                for prompt_id, runs in deployment.executions.items())
    retried = sum(job["attempts"] > 1 for job in last_attempt.values())
    return lost, twice, retried


async def one_run(args: argparse.Namespace) -> Run:
    load = os.getloadavg()[0]
    async with AsyncExitStack() as stack:
        root = stack.enter_context(bench_root())
        postgres = await stack.enter_async_context(embedded_postgres(root))
        dns = await stack.enter_async_context(loopback_dns())
        fleet = await stack.enter_async_context(pods())
        for pod in fleet:
            dns.name_pod(pod.address, pod.name)
        dns.addresses = [pod.address for pod in fleet[:KEPT]]
        port = fleet[0].url.rsplit(":", 1)[1]
        receiver = TimedReceiver(new_secret())
        await receiver.start()
        stack.push_async_callback(receiver.stop)
        serve = await stack.enter_async_context(comfyfleet_serve(
            await fresh_database(postgres), root / "data", [], secret=receiver.secret,
            env_overrides={"COMFYUI_DISCOVERY": f"dns:{NAME.rstrip('.')}:{port}",
                           "DISCOVERY_INTERVAL": str(args.interval),
                           "DISCOVERY_NAMESERVER": dns.nameserver}))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        deployment = Deployment(dns, fleet, receiver, serve.api, http)
        await deployment.until(lambda backends: sum(
            b["healthy"] for b in backends.values()) == KEPT)

        first_job, makespan, bound = await scale_up(deployment, args)
        drains = await scale_down(deployment, args)
        lost, twice, retried = accounting(deployment)
        return Run(args.interval, first_job, makespan, bound, drains,
                   len(deployment.submitted), lost, twice, retried, deployment.left_running,
                   (load, os.getloadavg()[0]))


def seconds_or_never(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def report(index: int, run: Run) -> None:
    target = run.interval + 1
    print(f"\nrun {index}: load average {run.load[0]:.2f} -> {run.load[1]:.2f}")
    print_table(["new backend", "DNS -> first job s", f"÷ {target:g} s"],
                [[name, seconds_or_never(delay),
                  "" if delay is None else f"{delay / target:.2f}"]
                 for name, delay in run.first_job.items()])
    print(f"makespan {run.makespan:.2f} s, bound for the changing fleet {run.bound:.2f} s: "
          f"{run.ratio:.3f}")
    print_table(["drained pod", "drain.py waited s", "exit", "prompts left on it"],
                [[d.pod, f"{d.seconds:.2f}", d.code, d.left_running] for d in run.drains])
    print(f"jobs {run.jobs}: lost {run.lost}, run twice {run.twice}, retried {run.retried}; "
          f"prompts left on stopped simulators {run.left_running}", flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--interval", type=float, default=2.0, help="DISCOVERY_INTERVAL")
    parser.add_argument("--jobs", type=int, default=400, help="scale-up jobs")
    parser.add_argument("--seconds", type=float, default=0.5, help="each job's work")
    parser.add_argument("--before", type=float, default=3.0,
                        help="seconds from the last POST to the first new address in DNS")
    parser.add_argument("--stagger", type=float, default=0.5,
                        help="seconds between two new addresses")
    parser.add_argument("--drain-jobs", type=int, default=160, help="scale-down jobs")
    parser.add_argument("--drain-wait", type=float, default=60.0, help="drain.py --wait")
    parser.add_argument("--dns-first", action="store_true",
                        help="take each address out of DNS as its drain starts, not after")
    args = parser.parse_args()
    runs = []
    for index in range(1, args.runs + 1):
        runs.append(await one_run(args))
        report(index, runs[-1])
    joins = [d for run in runs for d in run.first_job.values()]
    waits = [d.seconds for run in runs for d in run.drains]
    print()
    print_table(
        ["run", "slowest DNS -> first job s", "makespan ÷ bound", "longest drain s",
         "lost", "run twice"],
        [[i, seconds_or_never(run.slowest_join), f"{run.ratio:.3f}",
          f"{max(d.seconds for d in run.drains):.2f}", run.lost, run.twice]
         for i, run in enumerate(runs, 1)])
    print(json.dumps({
        "discovery_interval_s": args.interval, "dns_first": args.dns_first, "jobs": args.jobs,
        "seconds": args.seconds,
        "drain_jobs": args.drain_jobs, "pods": PODS, "kept": KEPT,
        "first_job_s": [None if d is None else round(d, 3) for d in joins],
        "first_job_target_s": args.interval + 1,
        "makespan_over_bound": [round(run.ratio, 3) for run in runs],
        "mean_makespan_over_bound": round(statistics.mean(run.ratio for run in runs), 3),
        "drain_waits_s": [round(w, 2) for w in waits],
        "drain_exit_codes": [d.code for run in runs for d in run.drains],
        "lost": [run.lost for run in runs], "run_twice": [run.twice for run in runs],
        "retried": [run.retried for run in runs],
        "left_on_stopped": [run.left_running for run in runs],
    }))


if __name__ == "__main__":
    asyncio.run(main())
