"""Load-balancing quality: late binding (comfyfleet) against early binding, in one run.

8 simulated backends of mixed speeds run N SimulatedWork jobs with log-normal durations.
Early binding pushes every job at once to the shortest queue (what a naive gateway does);
comfyfleet keeps the backlog and hands a backend work only when it has a free slot. Each is
reported as makespan / lower bound, the bound being the larger of total work / total speed
and the longest job on the fastest backend. No dispatcher that starts jobs in arrival order
without knowing their durations can reach that bound when a long job comes late, so a
reference is printed beside it: jobs placed in order, each where it would finish first,
knowing every duration in advance (computed, not run). Also the dispatch gap: a backend's queue
shrinking (a prompt done) -> growing again (our next prompt accepted), while the backlog is
deep.

With sigma 1 a run's figure depends on where its few long jobs fall (and on the timing of
the run), so several runs are made, each with its own durations, and their mean reported.
One seed's figure moves between runs of the same code (where its last long jobs land: one
that lands late on a slow backend and is not restarted sets the makespan), so codes are
compared over many seeds: `--seeds 7-16 --no-early --base DIR` runs every seed through this
tree's `comfyfleet serve` and through the one in DIR (e.g. main: `git archive main | tar -x -C
DIR`), taking turns at which goes first, and prints each seed's ratios and both codes' mean,
median and max. `--trace` prints each run's tail after it: the jobs that ended last and the
longest, where and when each ran (read from the service's database), which says where a
figure came from.

Run from the repository root:  .venv/bin/python -m bench.fleet_balance [--sigma 1] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.harness import (
    bench_root,
    comfyfleet_serve,
    embedded_postgres,
    fresh_database,
    percentile,
    print_table,
    sim_fleet,
)
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.comfy.client import ComfyClient
from comfyfleet.comfy.messages import Executing, Status, parse_text
from comfyfleet.http_client import HttpClient
from comfyfleet.jobs.repository import CLAIM_BATCH
from comfyfleet.webhooks.signing import new_secret
from comfyfleet.workflows.catalog import load_catalog

REPO = Path(__file__).resolve().parent.parent
SPEEDS = [1, 1, 1, 1, 0.5, 0.5, 0.25, 0.25]


@asynccontextmanager
async def simulated_fleet() -> AsyncIterator[list[str]]:
    """Fresh simulators in their own process (nothing cached from an earlier run)."""
    speeds = ",".join(str(speed) for speed in SPEEDS)
    async with sim_fleet(len(SPEEDS), options=("--speeds", speeds)) as fleet:
        yield fleet.urls


class QueueObserver:
    """Watches each backend's broadcast `status` to time the gaps between a prompt ending
    and the next one arriving, while the backlog is deep. (Within the last CLAIM_BATCH jobs
    placement holds slow backends back on purpose: a wait there is a decision, not a gap.)"""

    def __init__(self, deep_until: int) -> None:
        self.gaps: list[float] = []
        self._arrivals = 0  # prompts that reached a backend, over all of them
        self._deep_until = deep_until
        self._tasks: list[asyncio.Task[None]] = []

    def watch(self, http: aiohttp.ClientSession, url: str) -> None:
        self._tasks.append(asyncio.create_task(self._follow(http, url)))

    async def _follow(self, http: aiohttp.ClientSession, url: str) -> None:
        freed_at: float | None = None
        last = 0
        async with http.ws_connect(f"{url}/ws", params={"clientId": uuid.uuid4().hex}) as ws:
            async for frame in ws:
                message = parse_text(frame.data) if frame.type == aiohttp.WSMsgType.TEXT \
                    else None
                remaining = message.queue_remaining if isinstance(message, Status) else None
                if remaining is None:
                    continue
                now = time.perf_counter()
                if remaining < last:
                    freed_at = now
                elif remaining > last:
                    self._arrivals += remaining - last
                    if freed_at is not None and self._arrivals <= self._deep_until:
                        self.gaps.append(now - freed_at)
                    freed_at = None
                last = remaining

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def work_prompt(seconds: float, tag: str) -> dict[str, Any]:
    workflow = load_catalog(REPO / "workflows").workflows["simulated_work"]
    _, prompt = workflow.build({"seconds": seconds, "steps": 5})
    prompt["3"]["inputs"]["filename_prefix"] = f"bench/{tag}"
    return prompt


async def early_binding(durations: list[float]) -> float:
    """Every job POSTed at once, each to the backend with the fewest assigned so far."""
    async with simulated_fleet() as urls, aiohttp.ClientSession() as http, \
            HttpClient() as lean_http:
        client_id = uuid.uuid4().hex
        sockets = [await http.ws_connect(f"{url}/ws", params={"clientId": client_id})
                   for url in urls]
        clients = [ComfyClient(url, http, lean_http) for url in urls]
        assigned = [0] * len(urls)
        started = time.perf_counter()
        for seconds in durations:
            target = min(range(len(urls)), key=lambda i: assigned[i])
            assigned[target] += 1
            await clients[target].queue_prompt(work_prompt(seconds, uuid.uuid4().hex),
                                               prompt_id=str(uuid.uuid4()), client_id=client_id)
        await asyncio.gather(*(wait_finished(ws, n) for ws, n in zip(sockets, assigned,
                                                                       strict=True)))
        makespan = time.perf_counter() - started
        for ws in sockets:
            await ws.close()
        return makespan


async def wait_finished(ws: aiohttp.ClientWebSocketResponse, count: int) -> None:
    done = 0
    while done < count:
        message = parse_text((await ws.receive()).data)
        if isinstance(message, Executing) and message.node is None:
            done += 1


async def late_binding(durations: list[float], source: Path | None = None, *,
                       trace: bool = False) -> tuple[float, list[float]]:
    """The same jobs through `comfyfleet serve` (its own process, as deployed; its code from
    the source tree `source` when given, else this one); returns the makespan and the
    dispatch gaps. With `trace`, prints the batch's tail (`print_tail`)."""
    async with AsyncExitStack() as stack:
        root = stack.enter_context(bench_root())
        postgres = await stack.enter_async_context(embedded_postgres(root))
        urls = await stack.enter_async_context(simulated_fleet())
        receiver = WebhookReceiver(new_secret())
        await receiver.start()
        stack.push_async_callback(receiver.stop)
        code = {} if source is None else {
            "PYTHONPATH": os.pathsep.join([str(source / "src"), str(source)])}
        database = await fresh_database(postgres)
        serve = await stack.enter_async_context(comfyfleet_serve(
            database, root / "data", urls, secret=receiver.secret,
            env_overrides=code))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        observer = QueueObserver(deep_until=len(durations) - CLAIM_BATCH)
        for url in urls:
            observer.watch(http, url)
        stack.push_async_callback(observer.stop)
        started = time.perf_counter()
        for seconds in durations:
            body = {"workflow": "simulated_work", "params": {"seconds": seconds, "steps": 5},
                    "callback_url": receiver.url}
            async with http.post(f"{serve.api}/jobs", json=body) as response:
                assert response.status == 202, await response.text()
        await receiver.wait_for(len(durations))
        makespan = time.perf_counter() - started
        failed = [e for e in receiver.verified if e["type"] != "job.succeeded"]
        assert not failed, failed[0]
        if trace:
            print(f"the tail through {source or 'this tree'}: {makespan:.2f} s")
            await print_tail(database, urls)
        return makespan, observer.gaps


async def print_tail(database: str, urls: list[str], last: int = 8) -> None:
    """The jobs that ended last and the longest ones: in which order each arrived, its
    seconds (at speed 1), the speed of the GPU it ended on, when it was last dispatched (a
    move, to another GPU's queue or run afresh there, spends no attempt: it shows as a late
    dispatch), started and ended (seconds from the first job's arrival) and its attempts
    (above 1: put back in the backlog and claimed again), and when each GPU ended its last job
    and how many it ran. Where a batch's last long jobs land sets its makespan."""
    conn = await asyncpg.connect(database.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = await conn.fetch(
            "SELECT (jobs.params->>'seconds')::float AS seconds, backends.url, attempts,"
            " extract(epoch FROM created_at) AS created,"
            " extract(epoch FROM dispatched_at) AS dispatched,"
            " extract(epoch FROM started_at) AS started,"
            " extract(epoch FROM finished_at) AS finished"
            " FROM jobs JOIN backends ON backends.name = jobs.backend ORDER BY created_at")
    finally:
        await conn.close()
    zero = float(rows[0]["created"])
    speed = {url: SPEEDS[i] for i, url in enumerate(urls)}
    jobs = [[index, row["seconds"], speed[row["url"]],
             *(round(float(row[moment]) - zero, 2)
               for moment in ("dispatched", "started", "finished")), row["attempts"]]
            for index, row in enumerate(rows)]
    header = ["job", "seconds", "GPU speed", "dispatched", "started", "ended", "attempts"]
    print_table(header, sorted(jobs, key=lambda job: job[5])[-last:])
    print_table(header, sorted(jobs, key=lambda job: job[1])[-last // 2:])
    ends: dict[str, list[float]] = {url: [] for url in urls}
    for row, job in zip(rows, jobs, strict=True):
        ends[row["url"]].append(job[5])
    print("each GPU's last end (jobs run): " + ", ".join(
        f"{speed[url]}x {max(ends[url], default=math.nan):.1f} ({len(ends[url])})"
        for url in urls), flush=True)


def in_order_with_hindsight(durations: list[float]) -> float:
    """Makespan of placing the jobs in arrival order, each on the backend that would finish
    it first, knowing every duration: a reference for in-order dispatch, not a bound."""
    free_at = [0.0] * len(SPEEDS)
    for seconds in durations:
        best = min(range(len(SPEEDS)), key=lambda i: free_at[i] + seconds / SPEEDS[i])
        free_at[best] += seconds / SPEEDS[best]
    return max(free_at)


@dataclass
class Run:
    seed: int
    bound: float
    hindsight: float  # each a makespan in seconds
    early: float  # nan: not run (--no-early)
    late: float
    gaps: list[float]
    base: float  # the late binding of the --base tree; nan: none

    def ratios(self) -> dict[str, float]:
        return {name: round(getattr(self, name) / self.bound, 3)
                for name in ("hindsight", "early", "late", "base")}


async def one_run(seed: int, args: argparse.Namespace) -> Run:
    rng = random.Random(seed)
    durations = [round(rng.lognormvariate(math.log(args.median), args.sigma), 3)
                 for _ in range(args.jobs)]
    bound = max(sum(durations) / sum(SPEEDS), max(durations) / max(SPEEDS))
    early = math.nan if args.no_early else await early_binding(durations)
    base = math.nan
    # Taking turns at going first, so that neither code always runs on a fresher machine.
    if args.base is not None and seed % 2:
        base, _ = await late_binding(durations, args.base, trace=args.trace)
    late, gaps = await late_binding(durations, trace=args.trace)
    if args.base is not None and not seed % 2:
        base, _ = await late_binding(durations, args.base, trace=args.trace)
    return Run(seed, bound, in_order_with_hindsight(durations), early, late, gaps, base)


def seed_list(text: str) -> list[int]:
    """`7-16` or `7,9,12`: the seeds to run."""
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds.extend(range(int(first), int(last or first) + 1))
    return seeds


def summary(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Mean, median and max of each ratio over the runs (nan where not run)."""
    stats: dict[str, Callable[[list[float]], float]] = {
        "mean": statistics.mean, "median": statistics.median, "max": max}
    return {label: {name: round(stat([run.ratios()[name] for run in runs]), 3)
                    for name in ("hindsight", "early", "late", "base")}
            for label, stat in stats.items()}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--median", type=float, default=0.5, help="median job seconds")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma")
    parser.add_argument("--seed", type=int, default=7, help="of the first run")
    parser.add_argument("--runs", type=int, default=3,
                        help="each with its own durations (seeds seed, seed+1, ...)")
    parser.add_argument("--seeds", type=seed_list,
                        help="instead of --seed and --runs: e.g. 7-16 or 7,9,12")
    parser.add_argument("--no-early", action="store_true",
                        help="skip early binding (the slowest part of a run)")
    parser.add_argument("--base", type=Path,
                        help="also run each seed through the comfyfleet of this source tree")
    parser.add_argument("--trace", action="store_true",
                        help="after each run, print the jobs that ended last and the longest")
    args = parser.parse_args()
    runs = []
    for seed in args.seeds or range(args.seed, args.seed + args.runs):
        runs.append(await one_run(seed, args))
        print(f"seed {seed}: {runs[-1].ratios()}", flush=True)
    gaps = [gap for run in runs for gap in run.gaps]
    stats = summary(runs)
    print_table(
        ["seed", "lower bound s", "hindsight ÷ bound", "early binding ÷ bound",
         "comfyfleet ÷ bound", "--base's comfyfleet ÷ bound"],
        [[run.seed, f"{run.bound:.2f}", *run.ratios().values()] for run in runs]
        + [[label, "", *(f"{value:.3f}" for value in values.values())]
           for label, values in stats.items()])
    print(f"dispatch gap over all runs: p50 {statistics.median(gaps) * 1000:.1f} ms, "
          f"p99 {percentile(gaps, 0.99) * 1000:.1f} ms, {len(gaps)} gaps")
    print(json.dumps({
        "jobs": args.jobs, "sigma": args.sigma, "speeds": SPEEDS,
        "runs": [{"seed": run.seed, "lower_bound_s": round(run.bound, 2), **run.ratios()}
                 for run in runs],
        "base": str(args.base) if args.base is not None else None,
        **stats,
        "dispatch_gap_ms": {"samples": len(gaps), "p50": round(statistics.median(gaps) * 1000, 1),
                            "p99": round(percentile(gaps, 0.99) * 1000, 1)},
    }))


if __name__ == "__main__":
    asyncio.run(main())
