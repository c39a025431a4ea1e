"""Fair share between tenants (issue #18): a small tenant behind a big one's backlog, and two
tenants of different weights both saturating the fleet.

Burst: tenant A submits --jobs jobs of --seconds each to --backends simulated backends; --delay
seconds later tenant B (weight --small-weight, A's 1) submits --small jobs. Reported: B's wait
before each of its jobs started (median, max) and before it was dispatched (median: a job
dispatched waits on its backend behind the prompt running there, --inflight of them a backend
holds), against what an exact fair share with no dispatch latency would give; B's share of
the GPU time from its arrival until its last job ended, the fleet's utilisation then
(GPU-seconds the backends report over backends x time) and A's jobs finished per second
then; with fair share (the default) and, in the same run, with FAIR_SHARE=false (one FIFO
backlog), each on fresh simulators and a fresh database. Each run stops once B's jobs have
all ended. Where GPU time went unused in a window: gaps of at most DRY_GAP between a
backend's prompts (the turnaround from one to the next already queued there) and longer ones
(its queue ran dry: dispatch came late).

Weights: tenant H (weight --heavy-weight) and tenant L (weight 1) each submit more work than
the fleet runs in --window seconds, L's jobs --length-ratio times as long as H's; reported:
each one's GPU-seconds in the window (from the backends' own execution times) against the
split the weights ask for, and the fleet's utilisation.

Run from the repository root:  .venv/bin/python -m bench.fairness [--backends 8]
    [--jobs 1000] [--small 20] [--delay 5] [--seconds 1] [--window 120] [--heavy-weight 3]
    [--length-ratio 2] [--small-weight 1] [--inflight 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg

from bench.harness import (
    bench_root,
    comfyfleet_serve,
    embedded_postgres,
    fresh_database,
    print_table,
    sim_fleet,
)
from comfyfleet.api_keys import KeyLimits, KeyStore
from comfyfleet.db import make_engine
from comfyfleet.webhooks.signing import new_secret

ENV_KEY = "bench-env-key-0f3a"  # API_KEYS must be set for keys to be asked for
SUBMITTERS = 16  # POSTs in flight at once


@dataclass
class Execution:
    backend: str  # the simulator's URL
    prompt_id: str
    start: float  # unix seconds, from the backend's history
    end: float

    def within(self, since: float, until: float) -> float:
        return max(0.0, min(self.end, until) - max(self.start, since))


@dataclass
class Tenants:
    """A running deployment with its API keys, by tenant name."""

    api: str
    keys: dict[str, str]
    database: str  # asyncpg DSN
    urls: list[str]


async def executions(http: aiohttp.ClientSession, urls: Sequence[str]) -> list[Execution]:
    """Every prompt the backends have executed, with its start and end."""
    found = []
    for url in urls:
        async with http.get(f"{url}/history", params={"max_items": "100000"}) as response:
            history = await response.json()
        for prompt_id, entry in history.items():
            times = {name: data["timestamp"] for name, data in entry["status"]["messages"]}
            if "execution_success" in times:
                found.append(Execution(url, prompt_id, times["execution_start"] / 1000,
                                       times["execution_success"] / 1000))
    return found


def work(seconds: float, number: int) -> dict[str, Any]:
    """Job `number` of about `seconds`: each differs by a tenth of a millisecond, as a seed
    would make it, so none is served from a backend's cache."""
    return {"workflow": "simulated_work",
            "params": {"seconds": round(seconds + number / 10000, 4), "steps": 1}}


async def submit(http: aiohttp.ClientSession, api: str, key: str, count: int, seconds: float,
                 first: int) -> list[str]:
    """`count` jobs of about `seconds` each, numbered from `first`; their ids."""
    gate = asyncio.Semaphore(SUBMITTERS)

    async def one(index: int) -> str:
        async with gate, http.post(f"{api}/jobs", json=work(seconds, first + index),
                                   headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status == 202, await response.text()
            job_id: str = (await response.json())["id"]
            return job_id

    return list(await asyncio.gather(*(one(index) for index in range(count))))


async def deployment(stack: AsyncExitStack, backends: int, weights: dict[str, int],
                     fair: bool, settings: Mapping[str, str] | None = None) -> Tenants:
    """`settings`: more of the service's environment (e.g. MAX_QUEUED)."""
    root = stack.enter_context(bench_root())
    postgres = await stack.enter_async_context(embedded_postgres(root))
    fleet = await stack.enter_async_context(sim_fleet(backends))
    database = await fresh_database(postgres)
    serve = await stack.enter_async_context(comfyfleet_serve(
        database, root / "data", fleet.urls, secret=new_secret(),
        env_overrides={"API_KEYS": ENV_KEY, "FAIR_SHARE": str(fair).lower(),
                       "MAX_INFLIGHT_PER_BACKEND": "2", **(settings or {})},
        api_key=ENV_KEY))
    engine = make_engine(database)
    store = KeyStore(engine)
    keys = {name: await store.create(name, admin=False, limits=KeyLimits(weight=weight))
            for name, weight in weights.items()}
    await engine.dispose()
    return Tenants(serve.api, keys, database.replace("postgresql+asyncpg://", "postgresql://"),
                   fleet.urls)


async def job_times(dsn: str, ids: Sequence[str]) -> list[JobTimes]:
    """When each job was created, dispatched and started."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT prompt_id, created_at, dispatched_at, started_at, "
                                "finished_at IS NOT NULL AS finished FROM jobs "
                                "WHERE id = ANY($1::uuid[])", list(ids))
    finally:
        await conn.close()
    return [JobTimes(row["prompt_id"], row["created_at"], row["dispatched_at"], row["started_at"],
                     row["finished"]) for row in rows]


@dataclass
class JobTimes:
    prompt_id: str
    created: datetime
    dispatched: datetime | None  # sent to a backend (the claim)
    started: datetime | None  # the backend began executing it
    finished: bool


def ideal_waits(backends: int, seconds: float, count: int, share: float) -> list[float]:
    """The waits to dispatch of `count` jobs submitted at once by a tenant entitled to `share`
    of a fleet of `backends` saturated by jobs of `seconds`, under an exact fair share with no
    dispatch latency: slots free one by one, every seconds / backends on average (the n-th,
    counting from 1, at about (n - 1/2) seconds / backends), the newcomer's first job takes the
    first, and each later one of its jobs comes 1 / share slots after the one before."""
    return [(k / share + 0.5) * seconds / backends for k in range(count)]


DRY_GAP = 0.1  # s between two prompts on a backend: longer, its queue ran dry


@dataclass
class Idle:
    """Where a window's GPU time went unused."""

    turnaround: float  # backend-seconds between prompts that followed one another at once
    dry: float  # backend-seconds in gaps longer than DRY_GAP: nothing was queued there
    dry_gaps: int
    longest: float  # s, the longest gap


def idle(ran: Sequence[Execution], urls: Sequence[str], since: float, until: float) -> Idle:
    """The gaps within [since, until] between the prompts each backend executed (and before
    its first and after its last, within the window)."""
    turnaround = dry = longest = 0.0
    dry_gaps = 0
    for url in urls:
        busy = sorted((max(e.start, since), min(e.end, until)) for e in ran
                      if e.backend == url and e.end > since and e.start < until)
        edges = [since, *(t for span in busy for t in span), until]
        for free_from, free_until in zip(edges[::2], edges[1::2], strict=True):
            gap = max(0.0, free_until - free_from)
            longest = max(longest, gap)
            if gap > DRY_GAP:
                dry += gap
                dry_gaps += 1
            else:
                turnaround += gap
    return Idle(turnaround, dry, dry_gaps, longest)


@dataclass
class Burst:
    fair: bool
    waits: list[float]  # B's, seconds from submit to start
    to_dispatch: list[float]  # B's, seconds from submit to dispatch
    share_b: float  # of the GPU time while B had work
    utilisation: float
    idle: Idle
    a_rate: float  # A's jobs finished per second while B had work


async def burst(args: argparse.Namespace, fair: bool) -> Burst:
    async with AsyncExitStack() as stack:
        tenants = await deployment(stack, args.backends, {"A": 1, "B": args.small_weight}, fair,
                                   {"MAX_INFLIGHT_PER_BACKEND": str(args.inflight)})
        http = await stack.enter_async_context(aiohttp.ClientSession())
        a_ids = await submit(http, tenants.api, tenants.keys["A"], args.jobs, args.seconds, 0)
        await asyncio.sleep(args.delay)  # the scenario: B arrives this long after A
        arrived = time.time()
        b_ids = await submit(http, tenants.api, tenants.keys["B"], args.small, args.seconds,
                             args.jobs)
        async with asyncio.timeout(args.jobs * args.seconds * 2 + 120):
            # Polling the database only: the backends' histories are large, and reading them
            # would take from the simulators' time (all in one process) while they are timed.
            while not all(job.finished for job in await job_times(tenants.database, b_ids)):  # noqa: ASYNC110
                await asyncio.sleep(0.5)
        b_jobs = await job_times(tenants.database, b_ids)
        ran = await executions(http, tenants.urls)
        a_prompts = {job.prompt_id for job in await job_times(tenants.database, a_ids)}
    b_prompts = {job.prompt_id for job in b_jobs}
    waits = [(job.started - job.created).total_seconds() for job in b_jobs
             if job.started is not None]
    to_dispatch = [(job.dispatched - job.created).total_seconds() for job in b_jobs
                   if job.dispatched is not None]
    until = max(e.end for e in ran if e.prompt_id in b_prompts)
    during = {p: sum(e.within(arrived, until) for e in ran if e.prompt_id in prompts)
              for p, prompts in (("A", a_prompts), ("B", b_prompts))}
    a_done = sum(1 for e in ran if e.prompt_id in a_prompts and arrived <= e.end < until)
    return Burst(fair, waits, to_dispatch, during["B"] / sum(during.values()),
                 sum(during.values()) / (args.backends * (until - arrived)),
                 idle(ran, tenants.urls, arrived, until), a_done / (until - arrived))


@dataclass
class Weighted:
    heavy: float  # H's GPU-seconds in the window
    light: float
    utilisation: float
    idle: Idle


async def weighted(args: argparse.Namespace) -> Weighted:
    light_seconds = args.seconds * args.length_ratio
    capacity = args.backends * args.window  # GPU-seconds in the window
    async with AsyncExitStack() as stack:
        tenants = await deployment(stack, args.backends,
                                   {"H": args.heavy_weight, "L": 1}, fair=True,
                                   settings={"MAX_INFLIGHT_PER_BACKEND": str(args.inflight)})
        http = await stack.enter_async_context(aiohttp.ClientSession())
        # Each with more than all of the window's GPU time: both saturate it throughout.
        h_ids, l_ids = await asyncio.gather(
            submit(http, tenants.api, tenants.keys["H"], int(capacity / args.seconds) + 50,
                   args.seconds, 0),
            submit(http, tenants.api, tenants.keys["L"], int(capacity / light_seconds) + 20,
                   light_seconds, 0))
        since = time.time()
        await asyncio.sleep(args.window)  # the window measured: the fleet runs meanwhile
        until = time.time()
        # The prompts running at the window's end count up to it: once they have ended.
        await asyncio.sleep(2 * light_seconds + 1)
        ran = await executions(http, tenants.urls)
        h = {job.prompt_id for job in await job_times(tenants.database, h_ids)}
        light = {job.prompt_id for job in await job_times(tenants.database, l_ids)}
    heavy_s = sum(e.within(since, until) for e in ran if e.prompt_id in h)
    light_s = sum(e.within(since, until) for e in ran if e.prompt_id in light)
    return Weighted(heavy_s, light_s, (heavy_s + light_s) / (args.backends * (until - since)),
                    idle(ran, tenants.urls, since, until))


def idle_json(gaps: Idle) -> dict[str, float]:
    return {"turnaround_s": round(gaps.turnaround, 2), "dry_s": round(gaps.dry, 2),
            "dry_gaps": gaps.dry_gaps, "longest_gap_s": round(gaps.longest, 3)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=1000, help="tenant A's burst")
    parser.add_argument("--small", type=int, default=20, help="tenant B's jobs")
    parser.add_argument("--delay", type=float, default=5.0, help="seconds from A's to B's")
    parser.add_argument("--seconds", type=float, default=1.0, help="of work per job")
    parser.add_argument("--window", type=float, default=120.0, help="weights: seconds measured")
    parser.add_argument("--heavy-weight", type=int, default=3)
    parser.add_argument("--length-ratio", type=float, default=2.0,
                        help="weights: L's jobs this many times as long as H's")
    parser.add_argument("--small-weight", type=int, default=1, help="burst: B's weight (A's 1)")
    parser.add_argument("--inflight", type=int, default=2, help="MAX_INFLIGHT_PER_BACKEND")
    args = parser.parse_args()
    load_before = os.getloadavg()
    bursts = [await burst(args, fair) for fair in (True, False)]
    ideal = statistics.median(ideal_waits(args.backends, args.seconds, args.small,
                                          args.small_weight / (args.small_weight + 1)))
    print_table(
        ["burst: B behind A's backlog", "B wait p50 s", "B wait max s", "B to dispatch p50 s",
         "B share of GPU", "utilisation", "idle: turnaround / dry s (gaps)", "A jobs/s"],
        [["fair share" if b.fair else "FIFO (FAIR_SHARE=false)",
          f"{statistics.median(b.waits):.2f}", f"{max(b.waits):.2f}",
          f"{statistics.median(b.to_dispatch):.2f}", f"{b.share_b:.3f}",
          f"{b.utilisation:.3f}",
          f"{b.idle.turnaround:.2f} / {b.idle.dry:.2f} ({b.idle.dry_gaps})", f"{b.a_rate:.2f}"]
         for b in bursts])
    print(f"exact fair share, no dispatch latency: B to dispatch p50 {ideal:.2f} s")
    print()
    w = await weighted(args)
    asked = args.heavy_weight / (args.heavy_weight + 1)
    got = w.heavy / (w.heavy + w.light)
    print_table(
        ["weights", "H GPU-s", "L GPU-s", "H share", "asked", "off by", "utilisation"],
        [[f"{args.heavy_weight}:1 over {args.window:g} s", f"{w.heavy:.1f}", f"{w.light:.1f}",
          f"{got:.3f}", f"{asked:.3f}", f"{(got - asked) / asked:+.1%}",
          f"{w.utilisation:.3f}"]])
    load_after = os.getloadavg()
    print(f"load average at the start {load_before[0]:.1f}, at the end {load_after[0]:.1f}")
    print(f"idle: turnaround {w.idle.turnaround:.1f} s, dry {w.idle.dry:.1f} s in "
          f"{w.idle.dry_gaps} gaps, longest {w.idle.longest:.2f} s")
    print(json.dumps({
        "args": vars(args), "load": [round(load_before[0], 2), round(load_after[0], 2)],
        "burst": [{"fair": b.fair, "b_wait_p50_s": round(statistics.median(b.waits), 3),
                   "b_wait_max_s": round(max(b.waits), 3),
                   "b_to_dispatch_p50_s": round(statistics.median(b.to_dispatch), 3),
                   "b_share": round(b.share_b, 4), "utilisation": round(b.utilisation, 4),
                   "idle": idle_json(b.idle), "a_jobs_per_s": round(b.a_rate, 3)}
                  for b in bursts],
        "ideal_b_to_dispatch_p50_s": round(ideal, 3),
        "weights": {"heavy_s": round(w.heavy, 2), "light_s": round(w.light, 2),
                    "heavy_share": round(got, 4), "asked": round(asked, 4),
                    "utilisation": round(w.utilisation, 4), "idle": idle_json(w.idle)},
    }))


if __name__ == "__main__":
    asyncio.run(main())
