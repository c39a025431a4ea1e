"""What a status poll and a v2 job cost comfyfleet's serve process, apart from the latency
figures of `bench.v2_overhead` (which move with the machine's load).

One zero-duration simulated ComfyUI behind `comfyfleet serve` (embedded PostgreSQL, S3 on
moto), as `bench.v2_overhead` deploys it. First `--jobs` v2 jobs one at a time, each polled
every `--poll-ms` until it succeeded: the database transactions per job (PostgreSQL's own
count; with slow polling nearly all are the pipeline's) and serve's CPU per job. Then
`--polls` GETs, one at a time, of a succeeded job through /api/v2 and /api/v1, and of
/api/v2/health (authentication off, one database ping) as the floor of any request: serve's
CPU per GET.

Run from the repository root:  .venv/bin/python -m bench.v2_poll_cost [--polls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from contextlib import AsyncExitStack
from typing import Any

from bench.harness import bench_root, deploy, print_table, transactions
from bench.v2_overhead import graph, through_v2

SERVE = "comfyfleet serve"
# PostgreSQL's statistics reach pg_stat_database within a second of a transaction.
STATS_LAG = 1.5


async def run(jobs: int, poll_ms: float, polls: int) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        root = stack.enter_context(bench_root())
        deployment = await deploy(stack, root, 1)
        base, http, meter = deployment.serve.base, deployment.http, deployment.meter
        submit = through_v2(base, poll_ms / 1000)
        for color in range(3):  # warm up
            await submit(http, graph(color))
        await asyncio.sleep(STATS_LAG)
        before = await transactions(deployment.database_url)
        meter.start()
        for index in range(jobs):
            await submit(http, graph(1000 + index))
        meter.stop()
        await asyncio.sleep(STATS_LAG)
        counted = await transactions(deployment.database_url) - before - 1  # less our own
        per_job = {"transactions": round(counted / jobs, 2),
                   "serve CPU ms": round(1000 * meter.used[SERVE] / jobs, 2)}
        async with http.get(f"{base}/api/v2/jobs?limit=1") as response:
            job_id = (await response.json())["jobs"][0]["id"]
        per_get: dict[str, float] = {}
        for path in (f"/api/v2/jobs/{job_id}", f"/api/v1/jobs/{job_id}", "/api/v2/health"):
            for _ in range(50):  # warm up
                async with http.get(base + path) as response:
                    await response.read()
            meter.start()
            for _ in range(polls):
                async with http.get(base + path) as response:
                    assert response.status == 200, await response.text()
                    await response.read()
            meter.stop()
            per_get[path.replace(job_id, "{id}")] = round(1000 * meter.used[SERVE] / polls, 3)
    print_table(["per v2 job", "value"], list(per_job.items()))
    print_table(["GET (a succeeded job)", "serve CPU ms"], list(per_get.items()))
    return {"jobs": jobs, "poll_ms": poll_ms, "polls": polls, "per_job": per_job,
            "serve_cpu_ms_per_get": per_get}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--poll-ms", type=float, default=200.0,
                        help="slow, so that the transactions counted are the pipeline's")
    parser.add_argument("--polls", type=int, default=2000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.jobs, args.poll_ms, args.polls))))


if __name__ == "__main__":
    main()
