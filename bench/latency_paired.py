"""This checkout's `comfyfleet serve` against another checkout's, side by side, for the dispatch
leg of `bench.latency` (POST /api/v1/jobs sent -> the prompt accepted by a zero-duration
simulated backend) and the serve CPU per job, with both under the same load at the same time.
On a shared machine, runs of one and then the other move with whatever else runs (load 5-9 on
2 cores in the runs of December 2026, a run's p50 moving 2x from one to the next); jobs
alternating between the two services do not.

Deployed as `bench.latency` deploys it (8 timed simulators, embedded PostgreSQL, S3 on moto,
the verifying receiver); a second `comfyfleet serve` runs the code under `--other` (a
checkout's `src`) on a database of its own, in front of the same simulators. Jobs arrive open
loop (Poisson, `--rate` per second for each service, so twice that in all) for `--seconds`,
each sent to the two services in turn; each service's dispatch leg is reported whole and in
the legs of `bench.latency.dispatch_legs`, with its CPU per job. Run it twice.

Run from the repository root:
    .venv/bin/python -m bench.latency_paired --other ../main/src [--rate 10] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Iterable
from contextlib import AsyncExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import (
    PARAMS,
    WORKFLOW,
    bench_root,
    deploy,
    latency_ms,
    open_loop,
    print_table,
    serve_beside,
)
from bench.latency import BACKENDS, WARM_UP_JOBS, WEBHOOK_WAIT_SECONDS, dispatch_legs
from bench.v2_paired import cpu_seconds
from tests.support import REPO


async def jobs_got(http: aiohttp.ClientSession, api: str, ids: Iterable[str]
                   ) -> dict[str, dict[str, Any]]:
    """Each job as GET /jobs/{id} answers it, its times as datetimes (`dispatch_legs`): each
    service here has a database of its own, and no transactions are counted."""
    jobs = {}
    for job_id in ids:
        async with http.get(f"{api}/jobs/{job_id}") as response:
            job = await response.json()
        jobs[job_id] = {**job, **{name: datetime.fromisoformat(job[name])
                                  for name in ("created_at", "dispatched_at")}}
    return jobs


async def run(other: Path, rate: float, seconds: float) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        root = stack.enter_context(bench_root())
        deployment = await deploy(stack, root, BACKENDS, timed=True)
        theirs = await serve_beside(
            stack, deployment, root / "data-other", deployment.sims.urls, s3=deployment.s3,
            env_overrides={"PYTHONPATH": os.pathsep.join([str(other), str(REPO)])})
        serves = {"this checkout": deployment.serve, f"--other {other}": theirs}
        names = list(serves)
        http, receiver = deployment.http, deployment.receiver
        sent: dict[str, dict[str, float]] = {name: {} for name in serves}

        async def submit(index: int) -> None:
            # In turns, the order swapped every other pair.
            name = names[(index + index // 2) % 2]
            body = {"workflow": WORKFLOW, "params": PARAMS, "callback_url": receiver.url}
            started = time.monotonic()
            async with http.post(f"{serves[name].api}/jobs", json=body) as response:
                job = await response.json()
                assert response.status == 202, job
            sent[name][job["id"]] = started

        for phase, count in (("warm-up", WARM_UP_JOBS), ("measured", round(2 * rate * seconds))):
            for jobs in sent.values():
                jobs.clear()
            before = len(receiver.verified)
            cpu = {name: cpu_seconds(serve.process.pid) for name, serve in serves.items()}
            await open_loop(2 * rate, count, submit)
            await receiver.wait_until(before + count, WEBHOOK_WAIT_SECONDS)
            cpu = {name: cpu_seconds(serve.process.pid) - cpu[name]
                   for name, serve in serves.items()}
            print(json.dumps({"phase": phase, "jobs": count, "load": os.getloadavg()}),
                  flush=True)
        stamps = await deployment.sims.stamps(http)
        results: dict[str, Any] = {}
        for name, serve in serves.items():
            legs = dispatch_legs(await jobs_got(http, serve.api, sent[name]), sent[name], stamps)
            results[name] = {  # the legs of a job add up to its dispatch
                "dispatch": latency_ms([sum(job) for job in zip(*legs.values(), strict=True)]),
                **{leg: latency_ms(values) for leg, values in legs.items()},
                "serve_cpu_ms_per_job": round(1000 * cpu[name] / len(sent[name]), 2),
            }
    print_table(["p50 / p95 / p99 ms", *results],
                [(row, *(cells(results[name][row]) for name in results))
                 for row in results[names[0]] if row != "serve_cpu_ms_per_job"]
                + [("serve CPU ms per job",
                    *(results[name]["serve_cpu_ms_per_job"] for name in results))])
    return {"rate_per_service": rate, "seconds": seconds, "runs": results,
            "load": os.getloadavg()}


def cells(figures: dict[str, float]) -> str:
    return f"{figures['p50']} / {figures['p95']} / {figures['p99']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", type=Path, required=True,
                        help="the `src` directory of the checkout to compare with")
    parser.add_argument("--rate", type=float, default=10.0,
                        help="jobs per second offered to each service (default 10)")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    print(json.dumps({"load_average": os.getloadavg(), "cpus": os.cpu_count()}), flush=True)
    print(json.dumps(asyncio.run(run(args.other.resolve(), args.rate, args.seconds))))


if __name__ == "__main__":
    main()
