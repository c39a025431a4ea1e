"""End-to-end throughput: jobs per second through one comfyfleet process and 16 backends.

16 zero-duration simulated backends (`comfyfleet sim`, `--sim-processes` processes), one
`comfyfleet serve` (embedded PostgreSQL, outputs in S3 on a moto server, defaults otherwise:
MAX_INFLIGHT_PER_BACKEND 2, log level WARNING) and a webhook receiver in this process that
verifies every signature. `--jobs` invert jobs (64x64 PNG) are submitted by `--window`
concurrent clients; the clock runs from the first POST to the last verified webhook.

In the same run, each on its own, what the parts cost without comfyfleet:
- the simulators alone: the same prompts (comfyfleet's unique output prefix included) POSTed
  straight to the 16 backends, 2 in flight on each (as comfyfleet keeps them), each waited
  for on the websocket: the most jobs per second these backends can run here;
- moto alone: the same PNG PUT into the bucket and its URL presigned, 32 in flight.

While comfyfleet runs, py-spy samples the service's Python stacks (100 per second, without
pausing it) and the CPU time of every process is read from /proc: where the time goes, and
what bounds the rate (on 2 cores: the one process that needs a whole core, or the machine).

Run from the repository root:  .venv/bin/python -m bench.throughput [--jobs 1500] [--window 64]
(profiling needs py-spy: .venv/bin/pip install py-spy; --no-profile runs without it;
--by-statement also counts the transactions by the statement that opens each)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
import uuid
from collections import Counter
from contextlib import AsyncExitStack, nullcontext
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import (
    PARAMS,
    STATS_FLUSH_SECONDS,
    WORKFLOW,
    S3Server,
    TimedReceiver,
    bench_root,
    deploy,
    print_table,
    profile_breakdown,
    py_spy,
    s3_client,
    transactions,
    transactions_by_statement,
    workflow_job,
)
from bench.sim_throughput import run_prompts
from comfyfleet.comfy.prompts import isolate_outputs

BACKENDS = 16
SLOTS_PER_BACKEND = 2  # comfyfleet's default MAX_INFLIGHT_PER_BACKEND
WARM_UP_JOBS = 200
WEBHOOK_WAIT_SECONDS = 300.0
MOTO_IN_FLIGHT = 32
TARGET = 500.0


async def simulators_alone(urls: list[str], count: int) -> float:
    """Prompts per second straight to the backends, SLOTS_PER_BACKEND in flight on each."""
    prompt = workflow_job()[1]

    def make(_: int) -> dict[str, Any]:
        return isolate_outputs(prompt, uuid.uuid4().hex)

    started = time.perf_counter()
    await asyncio.gather(*(run_prompts(url, make, count // len(urls), SLOTS_PER_BACKEND)
                           for url in urls))
    return count // len(urls) * len(urls) / (time.perf_counter() - started)


async def moto_alone(s3: S3Server, body: bytes, count: int) -> float:
    """PUTs (each with its URL presigned) per second, MOTO_IN_FLIGHT at once."""
    async with s3_client(s3.endpoint) as client:
        numbers = iter(range(count))

        async def putter() -> None:
            for n in numbers:
                key = f"alone/{n}/3_0.png"
                await client.put_object(Bucket=s3.bucket, Key=key, Body=body,
                                        ContentType="image/png")
                await client.generate_presigned_url(
                    "get_object", Params={"Bucket": s3.bucket, "Key": key})

        started = time.perf_counter()
        await asyncio.gather(*(putter() for _ in range(MOTO_IN_FLIGHT)))
        return count / (time.perf_counter() - started)


async def through_comfyfleet(
    http: aiohttp.ClientSession, api: str, receiver: TimedReceiver, count: int, window: int,
) -> tuple[float, float]:
    """(jobs per second end to end, jobs per second accepted by the API)."""
    before = len(receiver.verified)
    numbers = iter(range(count))

    async def submitter() -> None:
        for _ in numbers:
            body = {"workflow": WORKFLOW, "params": PARAMS, "callback_url": receiver.url}
            async with http.post(f"{api}/jobs", json=body) as response:
                assert response.status == 202, await response.text()

    started = time.monotonic()
    await asyncio.gather(*(submitter() for _ in range(window)))
    submitted = time.monotonic()
    await receiver.wait_until(before + count, WEBHOOK_WAIT_SECONDS)
    events = receiver.verified[before:]
    failed = [event for event in events if event["type"] != "job.succeeded"]
    assert not failed, failed[0]
    finished = max(receiver.verified_at[event["webhook_id"]] for event in events)
    return count / (finished - started), count / (submitted - started)


async def dispatch_claims(http: aiohttp.ClientSession, base: str) -> Counter[str]:
    """The service's dispatcher claims so far by outcome (comfyfleet_dispatch_claims)."""
    async with http.get(f"{base}/metrics") as response:
        text = await response.text()
    counts = Counter[str]()
    for line in text.splitlines():
        if line.startswith("comfyfleet_dispatch_claims_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split('"')[1]] += round(float(value))
    return counts


async def run(jobs: int, window: int, processes: int, profile: Path | None,
              root: Path, by_statement: bool = False) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        deployed = await deploy(stack, root, BACKENDS, processes=processes)
        sims, receiver, http, meter = (deployed.sims, deployed.receiver, deployed.http,
                                       deployed.meter)
        serve, database_url = deployed.serve, deployed.database_url
        rates: dict[str, float] = {}
        cpu: dict[str, dict[str, float]] = {}

        await simulators_alone(sims.urls, WARM_UP_JOBS)
        meter.start()
        rates["simulators alone"] = await simulators_alone(sims.urls, jobs)
        meter.stop()
        cpu["simulators alone"] = meter.as_json()

        await through_comfyfleet(http, serve.api, receiver, WARM_UP_JOBS, window)
        output = receiver.verified[-1]["data"]["outputs"][0]
        async with http.get(output["url"]) as response:
            png = await response.read()  # the very bytes comfyfleet stored, for moto alone

        meter.start()
        rates["moto alone (PUT + presign)"] = await moto_alone(deployed.s3, png, jobs)
        meter.stop()
        cpu["moto alone (PUT + presign)"] = meter.as_json()

        profiling = py_spy(serve.process.pid, profile) if profile else nullcontext()
        counting = transactions_by_statement(deployed.postgres, database_url) if by_statement \
            else nullcontext(Counter[str]())
        committed = await transactions(database_url)
        claims = await dispatch_claims(http, serve.base)
        async with profiling, counting as opened_by:
            meter.start()
            rates["comfyfleet, end to end"], rates["comfyfleet, submits accepted"] = (
                await through_comfyfleet(http, serve.api, receiver, jobs, window))
            meter.stop()
        cpu["comfyfleet, end to end"] = meter.as_json()
        claims = await dispatch_claims(http, serve.base) - claims
        await asyncio.sleep(STATS_FLUSH_SECONDS)
        committed = await transactions(database_url) - committed
    return {"jobs": jobs, "window": window, "backends": BACKENDS, "output_bytes": len(png),
            "per_second": {name: round(rate, 1) for name, rate in rates.items()},
            "target_per_second": TARGET, "cores_busy": cpu,
            "serve_cpu_ms_per_job": round(
                cpu["comfyfleet, end to end"]["comfyfleet serve"]
                / rates["comfyfleet, end to end"] * 1000, 1),
            "transactions_per_job": round(committed / jobs, 1),
            "dispatch_claims_per_job": {
                outcome: round(count / jobs, 2) for outcome, count in claims.most_common()},
            "transactions_per_job_by_statement": {
                statement: round(count / jobs, 2) for statement, count in opened_by.most_common()
                if count / jobs >= 0.01} if by_statement else None,
            "profile": profile_breakdown(profile) if profile else None}


def report(result: dict[str, Any], profile: Path | None) -> None:
    print_table(["workload", "per second"],
                [(name, f"{rate:.0f}") for name, rate in result["per_second"].items()])
    print(f"\ncomfyfleet serve: {result['serve_cpu_ms_per_job']} ms of CPU per job; "
          f"{result['transactions_per_job']} PostgreSQL transactions per job\n")
    print_table(["the dispatcher's claims per job, by outcome", "per job"],
                list(result["dispatch_claims_per_job"].items()))
    print()
    if result["transactions_per_job_by_statement"] is not None:
        print_table(["transactions per job, by the statement opening each", "per job"],
                    list(result["transactions_per_job_by_statement"].items()))
        print()
    cpu = result["cores_busy"]
    phases = list(cpu)
    print_table(["cores busy", *phases],
                [(name, *(cpu[phase][name] for phase in phases)) for name in cpu[phases[-1]]])
    if result["profile"] is not None:
        profile_result = result["profile"]
        print(f"\nprofile of comfyfleet serve: {profile_result['samples']} samples holding the "
              f"GIL (collapsed stacks in {profile})")
        for title, key in (("activity", "by_activity"), ("innermost frame in", "by_library"),
                           ("named cost (anywhere on the stack)", "named_costs")):
            print()
            print_table([title, "% of samples"],
                        [(name, share) for name, share in profile_result[key].items()])


async def main(jobs: int, window: int, processes: int, profile: Path | None,
               by_statement: bool) -> None:
    print(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                      "cpus": os.cpu_count(), "load_average": os.getloadavg()}), flush=True)
    with bench_root() as root:
        result = await run(jobs, window, processes, profile, root, by_statement)
    report(result, profile)
    print(json.dumps(result))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument("--window", type=int, default=64, help="submits in flight (default 64)")
    parser.add_argument("--sim-processes", type=int, default=2,
                        help="processes the 16 simulators run in (default 2)")
    parser.add_argument("--profile", type=Path,
                        default=Path(tempfile.gettempdir()) / "comfyfleet-throughput.pyspy",
                        help="where py-spy's collapsed stacks go")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--by-statement", action="store_true",
                        help="count the transactions by the statement opening each, from "
                             "PostgreSQL's log of every statement (slows it: not for timing)")
    args = parser.parse_args()
    asyncio.run(main(args.jobs, args.window, args.sim_processes,
                     None if args.no_profile else args.profile, args.by_statement))
