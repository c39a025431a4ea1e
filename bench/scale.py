"""Scale: a large fleet and a deep backlog against a small fleet, in one run.

Each fleet gets its own database on one embedded PostgreSQL, its own zero-duration timed
simulators (`bench.timed_sim`, several per process) and its own `comfyfleet serve` (local
storage, defaults otherwise, log level WARNING). Both are set up first:

- serve starts with every backend in COMFYUI_ENDPOINTS and is ready once all are connected;
  then every backend is drained (PATCH /backends/{name}), so that nothing is dispatched;
- the backlog is written straight into the database, with the shape the API writes: one
  `invert` job through `JobRepository.insert` (the call POST /jobs makes, with the params and
  prompt the catalog builds), then copied server-side (`INSERT ... SELECT ... generate_series`)
  with fresh ids and created_at 1 us apart, then vacuumed, analysed and checkpointed
  (`settle`). (Through the API it would take minutes: POST /jobs is what bench.throughput
  measures.) With `--ended`, that many ended jobs (succeeded, over the day before) are
  copied from it first, and settled as a day's history would be, so that the backlog sits after
  them in the table's heap, as a burst submitted to a database with a day's history; and
  its database's sequential scans are not synchronised (`without_synchronized_scans`).

Then `--rounds` rounds alternate between the two fleets (so that a change in the machine's
load weighs on both alike). In a round, on one fleet:

1. GET /api/v1/jobs/{id} of random queued jobs, open loop at `--get-rate` per second, while
   nothing is dispatched ("idle");
2. every backend is enabled at once (a PATCH each, all together) and the backlog dispatched
   for `--window` seconds (less if it runs low), the same GETs going on ("dispatching"); then
   the backends are drained again. GETs that overlap the enabling or draining PATCHes are
   reported apart: with 200 backends those are a burst of 200 requests of their own. GETs
   still unanswered once the backends are drained again are cancelled and counted.
   The dispatch rate is the number of prompts the simulators accepted in the window (their own
   stamps) over its length.

GET latencies are pooled over the rounds; the dispatch rate is the median round's.
Target: at 200 backends and 100,000 jobs, GET p99 and the dispatch rate within 2x of the small
fleet's (8 backends, 1,000 jobs).

Run from the repository root:  .venv/bin/python -m bench.scale
    [--backends 8,200] [--jobs 1000,100000] [--sim-processes 1,4] [--ended 0,0] [--window 6]
    [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.harness import (
    WORKFLOW,
    CpuMeter,
    Serve,
    SimFleet,
    bench_root,
    comfyfleet_serve,
    embedded_postgres,
    fresh_database,
    latency_ms,
    open_loop,
    print_table,
    sim_fleet,
    standard_components,
    workflow_job,
)
from comfyfleet.db import make_engine
from comfyfleet.jobs.models import Job
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.webhooks.signing import new_secret

IDLE_GETS = 1000  # per round: its p99 is not one burst's
DISPATCHED_SHARE = 0.9  # the window ends early once this share of the backlog is dispatched
POLL_SECONDS = 0.5
# A GET cancelled at a window's close counts as unanswered if sent this long before it.
UNANSWERED_AFTER = 1.0
SETTLE_SECONDS = 1.0
TARGET_RATIO = 2.0


@dataclass
class Fleet:
    backends: int
    jobs: int
    processes: int
    ended: int = 0  # jobs stored ended before the backlog
    fill_seconds: float = 0.0
    ids: list[str] = field(default_factory=list)
    idle: list[float] = field(default_factory=list)  # GET latencies, nothing dispatched
    dispatching: list[float] = field(default_factory=list)  # GET latencies meanwhile
    # GETs that overlapped the PATCHes enabling or draining every backend at once
    switching: list[float] = field(default_factory=list)
    # GETs of the dispatching windows still unanswered once the backends were drained again,
    # sent UNANSWERED_AFTER or more before (cancelled then): none is in the latencies above
    unanswered: int = 0
    rates: list[float] = field(default_factory=list)  # prompts accepted per second, per round
    cores: list[dict[str, float]] = field(default_factory=list)  # per round

    def as_json(self) -> dict[str, Any]:
        return {
            "backends": self.backends, "jobs": self.jobs, "ended": self.ended,
            "fill_seconds": round(self.fill_seconds, 1),
            "get_idle_ms": latency_ms(self.idle),
            "get_dispatching_ms": latency_ms(self.dispatching),
            "get_switching_ms": latency_ms(self.switching),
            "get_unanswered": self.unanswered,
            "dispatch_per_second": round(statistics.median(self.rates), 1),
            "dispatch_per_second_rounds": [round(rate, 1) for rate in self.rates],
            "cores_busy": {name: round(statistics.mean(c[name] for c in self.cores), 2)
                           for name in self.cores[0]},
        }


async def fill_queue(database_url: str, count: int, ended: int) -> list[str]:
    """`count` queued jobs as POST /jobs writes them, after `ended` ended ones; their ids."""
    engine = make_engine(database_url)
    try:
        values, prompt = workflow_job()
        template, _ = await JobRepository(engine).insert(
            Job(workflow=WORKFLOW, params=values, prompt=prompt))
        columns = [column.name for column in Job.__table__.columns]  # type: ignore[attr-defined]

        def copies(changed: dict[str, str]) -> Any:
            """Copies of the first job, with the columns `changed` (SQL of n, 1 to :copies)."""
            return text(f"INSERT INTO jobs ({', '.join(columns)}) "
                        f"SELECT {', '.join(changed.get(c, c) for c in columns)} "
                        "FROM jobs, generate_series(1, :copies) AS n WHERE id = :template")

        earlier = ("created_at - interval '1 day'"
                   " + n * (interval '1 day' / greatest(:copies, 1))")
        async with engine.begin() as conn:
            await conn.execute(copies({
                "id": "gen_random_uuid()", "status": "'succeeded'", "progress": "1",
                "attempts": "1", "backend": "'gone'", "prompt_id": "gen_random_uuid()::text",
                "created_at": earlier, "dispatched_at": earlier, "started_at": earlier,
                "finished_at": earlier}), {"copies": ended, "template": template.id})
        if ended:
            await settle(engine)
        async with engine.begin() as conn:
            await conn.execute(copies({
                "id": "gen_random_uuid()",
                "created_at": "created_at + n * interval '1 microsecond'"}),
                {"copies": count - 1, "template": template.id})
        await settle(engine)
        async with engine.connect() as conn:
            result = await conn.execute(text("SELECT id FROM jobs WHERE status = 'queued'"))
            return [str(job_id) for job_id in result.scalars()]
    finally:
        await engine.dispose()


async def settle(engine: AsyncEngine) -> None:
    """The jobs written maintained as they are by the time the rounds would come in a
    database that took them over a while: vacuumed (their pages all-visible, their hint bits
    set), analysed, and their WAL checkpointed. Written seconds before the rounds, that
    maintenance ran during the first of them, which measured it rather than the service: a
    checkpoint writing out a day's history's 0.5 GB of WAL (25 s), then an autovacuum of every
    page of the table (12 s, 110 MB of WAL), over both fleets' first rounds (in one run the
    large fleet's six slowest idle GETs, 44-76 ms, all in the first 50 ms of its first). The
    100,000 queued jobs alone are more inserts than autovacuum's threshold (1,000 + a fifth of
    the table), so they are settled too. Idle GETs still come slow in bursts of five or six
    together (6-18 ms) with no pause over 4 ms in any of our processes (serve, client,
    simulators, sampled on the event loops and the garbage collectors): at 200 idle GETs a
    round, one such burst was the p99; at IDLE_GETS it takes five."""
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        await conn.execute(text("VACUUM (ANALYZE) jobs"))
        await conn.execute(text("CHECKPOINT"))


async def without_synchronized_scans(database_url: str) -> None:
    """Each sequential scan of the database's tables, in every session opened from now on,
    starts at the table's first page, as on a server whose shared_buffers exceed four times
    the table (a quarter of a machine's RAM, against a jobs table of a day's history). The
    embedded server's 128 MB synchronise the scans of tables over 32 MB instead, each starting
    where the last one reached: a claim reading the backlog from the heap's start, through
    every ended job, did so once, and then each started where the previous one found jobs."""
    engine = make_engine(database_url)
    try:
        async with engine.begin() as conn:
            name = await conn.scalar(text("SELECT current_database()"))
            await conn.execute(text(f'ALTER DATABASE "{name}" SET synchronize_seqscans = off'))
    finally:
        await engine.dispose()


async def get_jobs(
    http: aiohttp.ClientSession, api: str, ids: list[str], rate: float, count: int,
    samples: list[tuple[float, float]], seed: int, asked: list[float] | None = None,
) -> None:
    """GET random jobs open loop; each answer's (start, latency) goes into `samples`, and
    each request's start into `asked` as it is sent."""
    rng = random.Random(seed)

    async def fire(_: int) -> None:
        started = time.monotonic()
        if asked is not None:
            asked.append(started)
        async with http.get(f"{api}/jobs/{rng.choice(ids)}") as response:
            await response.read()
            assert response.status == 200, response.status
        samples.append((started, time.monotonic() - started))

    await open_loop(rate, count, fire, seed=seed)


async def set_draining(http: aiohttp.ClientSession, api: str, drain: bool) -> None:
    async with http.get(f"{api}/backends") as response:
        names = [backend["name"] for backend in await response.json()]

    async def change(name: str) -> None:
        async with http.patch(f"{api}/backends/{name}", json={"drain": drain}) as response:
            assert response.status == 200, await response.text()

    await asyncio.gather(*(change(name) for name in names))


async def start_fleet(
    stack: AsyncExitStack, pg: Any, root: Path, fleet: Fleet,
) -> tuple[SimFleet, Serve]:
    """Simulators and a service, every backend connected then drained, the backlog written."""
    workdir = root / f"fleet{fleet.backends}"
    database_url = await fresh_database(pg)
    if fleet.ended:
        await without_synchronized_scans(database_url)
    sims = await stack.enter_async_context(sim_fleet(
        fleet.backends, processes=fleet.processes, data_dir=workdir / "sims", timed=True))
    serve = await stack.enter_async_context(comfyfleet_serve(
        database_url, workdir / "data", sims.urls, secret=new_secret()))
    async with aiohttp.ClientSession() as http:
        await set_draining(http, serve.api, True)
    started = time.monotonic()
    fleet.ids = await fill_queue(database_url, fleet.jobs, fleet.ended)
    fleet.fill_seconds = time.monotonic() - started
    return sims, serve


async def one_round(
    http: aiohttp.ClientSession, fleet: Fleet, sims: SimFleet, serve: Serve, meter: CpuMeter,
    get_rate: float, window: float, seed: int,
) -> None:
    """GETs while nothing is dispatched, then GETs while the backlog is dispatched for
    `window` seconds (less if it runs low); the backends are drained again after."""
    idle: list[tuple[float, float]] = []
    await get_jobs(http, serve.api, fleet.ids, get_rate, IDLE_GETS, idle, seed)
    fleet.idle += [seconds for _, seconds in idle]
    accepted = await sims.accepted(http)
    meter.start()
    opened = time.monotonic()
    samples: list[tuple[float, float]] = []
    asked: list[float] = []
    gets = asyncio.create_task(get_jobs(http, serve.api, fleet.ids, get_rate,
                                        round(get_rate * window), samples, seed, asked))
    await set_draining(http, serve.api, False)
    enabled = time.monotonic()
    low = accepted + DISPATCHED_SHARE * (fleet.jobs - accepted)
    while (time.monotonic() - opened < window  # noqa: ASYNC110 (polling the simulators)
           and await sims.accepted(http) < low):
        await asyncio.sleep(POLL_SECONDS)
    closed = time.monotonic()
    meter.stop()
    await set_draining(http, serve.api, True)
    gets.cancel()
    with suppress(asyncio.CancelledError):
        await gets
    answered = {started for started, _ in samples}
    fleet.unanswered += sum(1 for started in asked
                            if started < closed - UNANSWERED_AFTER and started not in answered)
    # One PATCH per backend, all at once: on the large fleet 200 of them, a burst of its own.
    for started, seconds in samples:
        steady = enabled <= started and started + seconds <= closed
        (fleet.dispatching if steady else fleet.switching).append(seconds)
    stamps = (await sims.stamps(http))["accepted"].values()
    fleet.rates.append(sum(opened <= stamp <= closed for stamp in stamps) / (closed - opened))
    fleet.cores.append(meter.as_json())
    await asyncio.sleep(SETTLE_SECONDS)  # what is in flight ends before the next fleet's turn


def report(small: dict[str, Any], large: dict[str, Any]) -> dict[str, Any]:
    def p50_p99(figures: dict[str, float]) -> str:
        return f"{figures['p50']} / {figures['p99']}" if figures["samples"] else "none"

    def worse(ours: float | None, theirs: float | None) -> float | None:
        """ours / theirs; None where either side has nothing to show (e.g. no GET answered
        within the window: see the unanswered row)."""
        return ours / theirs if ours and theirs else None

    def times(ratio: float | None) -> str:
        return "-" if ratio is None else f"{ratio:.2f}x"

    ratios = {
        "get_p99_idle": worse(large["get_idle_ms"].get("p99"), small["get_idle_ms"].get("p99")),
        "get_p99_dispatching": worse(large["get_dispatching_ms"].get("p99"),
                                     small["get_dispatching_ms"].get("p99")),
        # Slower is worse: small / large, so that above 1 means the large fleet lost.
        "dispatch_rate": worse(small["dispatch_per_second"], large["dispatch_per_second"]),
    }
    print_table(
        ["", *(f"{fleet['backends']} backends, {fleet['jobs']:,} jobs"
               + (f" after {fleet['ended']:,} ended" if fleet["ended"] else "")
               for fleet in (small, large)), "worse by", "target"],
        [
            ("backlog written (s)", small["fill_seconds"], large["fill_seconds"], "", ""),
            ("GET /jobs/{id} p50 / p99 (ms), idle", p50_p99(small["get_idle_ms"]),
             p50_p99(large["get_idle_ms"]), times(ratios["get_p99_idle"]),
             f"<= {TARGET_RATIO:g}x"),
            ("GET /jobs/{id} p50 / p99 (ms), dispatching",
             p50_p99(small["get_dispatching_ms"]), p50_p99(large["get_dispatching_ms"]),
             times(ratios["get_p99_dispatching"]), f"<= {TARGET_RATIO:g}x"),
            ("  overlapping the PATCHes that enable or drain every backend",
             p50_p99(small["get_switching_ms"]), p50_p99(large["get_switching_ms"]), "", ""),
            (f"  unanswered {UNANSWERED_AFTER:g} s after sent, at the window's close (cancelled)",
             small["get_unanswered"], large["get_unanswered"], "", "0"),
            ("dispatch rate (prompts accepted / s), median round", small["dispatch_per_second"],
             large["dispatch_per_second"], times(ratios["dispatch_rate"]),
             f"<= {TARGET_RATIO:g}x"),
            ("  per round", ", ".join(map(str, small["dispatch_per_second_rounds"])),
             ", ".join(map(str, large["dispatch_per_second_rounds"])), "", ""),
        ])
    print()
    print_table(["cores busy while dispatching (mean of rounds)", "small", "large"],
                [(name, small["cores_busy"][name], large["cores_busy"][name])
                 for name in small["cores_busy"]])
    return {"small": small, "large": large,
            "worse_by": {name: None if ratio is None else round(ratio, 2)
                         for name, ratio in ratios.items()}}


async def main(fleets: list[Fleet], get_rate: float, window: float, rounds: int) -> None:
    print(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                      "cpus": os.cpu_count(), "load_average": os.getloadavg()}), flush=True)
    with bench_root() as root:
        async with AsyncExitStack() as stack:
            pg = await stack.enter_async_context(embedded_postgres(root))
            started = [await start_fleet(stack, pg, root, fleet) for fleet in fleets]
            http = await stack.enter_async_context(
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
            meters = [CpuMeter(standard_components([serve], sims, pg)) for sims, serve in started]
            # Rounds alternate between the fleets, so that a change in the machine's load
            # (other users) weighs on both alike.
            for number in range(rounds):
                for fleet, (sims, serve), meter in zip(fleets, started, meters, strict=True):
                    await one_round(http, fleet, sims, serve, meter, get_rate, window, number)
    print(json.dumps(report(*(fleet.as_json() for fleet in fleets))))


def pair(text: str) -> list[int]:
    small, large = (int(part) for part in text.split(","))
    return [small, large]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", type=pair, default=[8, 200], help="small,large")
    parser.add_argument("--jobs", type=pair, default=[1000, 100_000], help="small,large")
    parser.add_argument("--sim-processes", type=pair, default=[1, 4], help="small,large")
    parser.add_argument("--ended", type=pair, default=[0, 0],
                        help="small,large: jobs stored ended (a day's history) before the backlog")
    parser.add_argument("--get-rate", type=float, default=100.0, help="GETs per second")
    parser.add_argument("--window", type=float, default=6.0,
                        help="seconds of dispatching per round (default 6)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per fleet (default 3)")
    args = parser.parse_args()
    asyncio.run(main([Fleet(*sizes) for sizes in zip(args.backends, args.jobs,
                                                      args.sim_processes, args.ended,
                                                      strict=True)],
                     args.get_rate, args.window, args.rounds))
