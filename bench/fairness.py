"""Fair share between tenants (issue #18): a small tenant behind a big one's backlog, and two
tenants of different weights both saturating the fleet.

Burst: tenant A submits --jobs jobs of --seconds each to --backends simulated backends; --delay
seconds later tenant B submits --small jobs. Reported: B's wait before each of its jobs
started (median, max), B's share of the GPU time from its arrival until its last job ended,
the fleet's utilisation then (GPU-seconds the backends report over backends x time) and A's
jobs finished per second then; with fair share (the default) and, in the same run, with
FAIR_SHARE=false (one FIFO backlog), each on fresh simulators and a fresh database. Each run
stops once B's jobs have all ended.

Weights: tenant H (weight --heavy-weight) and tenant L (weight 1) each submit more work than
the fleet runs in --window seconds, L's jobs --length-ratio times as long as H's; reported:
each one's GPU-seconds in the window (from the backends' own execution times) against the
split the weights ask for, and the fleet's utilisation.

Run from the repository root:  .venv/bin/python -m bench.fairness [--backends 8]
    [--jobs 1000] [--small 20] [--delay 5] [--seconds 1] [--window 120] [--heavy-weight 3]
    [--length-ratio 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
                found.append(Execution(prompt_id, times["execution_start"] / 1000,
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


async def job_times(dsn: str, ids: Sequence[str]) -> list[tuple[str, datetime, datetime | None]]:
    """(prompt id, created, started) of each job."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT prompt_id, created_at, started_at FROM jobs "
                                "WHERE id = ANY($1::uuid[])", list(ids))
    finally:
        await conn.close()
    return [(row["prompt_id"], row["created_at"], row["started_at"]) for row in rows]


@dataclass
class Burst:
    fair: bool
    waits: list[float]  # B's, seconds from submit to start
    share_b: float  # of the GPU time while B had work
    utilisation: float
    a_rate: float  # A's jobs finished per second while B had work


async def burst(args: argparse.Namespace, fair: bool) -> Burst:
    async with AsyncExitStack() as stack:
        tenants = await deployment(stack, args.backends, {"A": 1, "B": 1}, fair)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        a_ids = await submit(http, tenants.api, tenants.keys["A"], args.jobs, args.seconds, 0)
        await asyncio.sleep(args.delay)  # the scenario: B arrives this long after A
        arrived = time.time()
        b_ids = await submit(http, tenants.api, tenants.keys["B"], args.small, args.seconds,
                             args.jobs)
        async with asyncio.timeout(args.jobs * args.seconds * 2 + 120):
            while True:  # polling what the database and the backends record
                b_jobs = await job_times(tenants.database, b_ids)
                if all(started is not None for _, _, started in b_jobs):
                    ran = await executions(http, tenants.urls)
                    done = {e.prompt_id for e in ran}
                    if all(prompt in done for prompt, _, _ in b_jobs):
                        break
                await asyncio.sleep(0.5)
        a_prompts = {prompt for prompt, _, _ in await job_times(tenants.database, a_ids)}
    b_prompts = {prompt for prompt, _, _ in b_jobs}
    waits = [(started - created).total_seconds() for _, created, started in b_jobs
             if started is not None]
    until = max(e.end for e in ran if e.prompt_id in b_prompts)
    during = {p: sum(e.within(arrived, until) for e in ran if e.prompt_id in prompts)
              for p, prompts in (("A", a_prompts), ("B", b_prompts))}
    a_done = sum(1 for e in ran if e.prompt_id in a_prompts and arrived <= e.end < until)
    return Burst(fair, waits, during["B"] / sum(during.values()),
                 sum(during.values()) / (args.backends * (until - arrived)),
                 a_done / (until - arrived))


@dataclass
class Weighted:
    heavy: float  # H's GPU-seconds in the window
    light: float
    utilisation: float


async def weighted(args: argparse.Namespace) -> Weighted:
    light_seconds = args.seconds * args.length_ratio
    capacity = args.backends * args.window  # GPU-seconds in the window
    async with AsyncExitStack() as stack:
        tenants = await deployment(stack, args.backends,
                                   {"H": args.heavy_weight, "L": 1}, fair=True)
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
        h = {prompt for prompt, _, _ in await job_times(tenants.database, h_ids)}
        light = {prompt for prompt, _, _ in await job_times(tenants.database, l_ids)}
    heavy_s = sum(e.within(since, until) for e in ran if e.prompt_id in h)
    light_s = sum(e.within(since, until) for e in ran if e.prompt_id in light)
    return Weighted(heavy_s, light_s, (heavy_s + light_s) / (args.backends * (until - since)))


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
    args = parser.parse_args()
    bursts = [await burst(args, fair) for fair in (True, False)]
    print_table(
        ["burst: B behind A's backlog", "B wait p50 s", "B wait max s", "B share of GPU",
         "utilisation", "A jobs/s meanwhile"],
        [["fair share" if b.fair else "FIFO (FAIR_SHARE=false)",
          f"{statistics.median(b.waits):.2f}", f"{max(b.waits):.2f}", f"{b.share_b:.3f}",
          f"{b.utilisation:.3f}", f"{b.a_rate:.2f}"]
         for b in bursts])
    print()
    w = await weighted(args)
    asked = args.heavy_weight / (args.heavy_weight + 1)
    got = w.heavy / (w.heavy + w.light)
    print_table(
        ["weights", "H GPU-s", "L GPU-s", "H share", "asked", "off by", "utilisation"],
        [[f"{args.heavy_weight}:1 over {args.window:g} s", f"{w.heavy:.1f}", f"{w.light:.1f}",
          f"{got:.3f}", f"{asked:.3f}", f"{(got - asked) / asked:+.1%}",
          f"{w.utilisation:.3f}"]])
    print(json.dumps({
        "args": vars(args),
        "burst": [{"fair": b.fair, "b_wait_p50_s": round(statistics.median(b.waits), 3),
                   "b_wait_max_s": round(max(b.waits), 3), "b_share": round(b.share_b, 4),
                   "utilisation": round(b.utilisation, 4),
                   "a_jobs_per_s": round(b.a_rate, 3)} for b in bursts],
        "weights": {"heavy_s": round(w.heavy, 2), "light_s": round(w.light, 2),
                    "heavy_share": round(got, 4), "asked": round(asked, 4),
                    "utilisation": round(w.utilisation, 4)},
    }))


if __name__ == "__main__":
    asyncio.run(main())
