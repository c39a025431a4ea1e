"""This checkout's `comfyfleet serve` against another checkout's, side by side on one machine:
the v2 job latency of `bench.v2_overhead` and the CPU per request of `bench.v2_poll_cost`,
taken in turns so that both see the same load. On a shared machine, runs of one and then the
other move with whatever else runs (other users' processes took 1.3-1.6 of the 2 cores in
the runs of bench/RESULTS.md); taking turns job by job and request by request does not.

One zero-duration simulated ComfyUI, embedded PostgreSQL (a database for each service) and
S3 on moto, as `bench.v2_overhead` deploys them; a second `comfyfleet serve` runs the code
under `--other` (a checkout's `src`, e.g. a `git worktree` of main). Jobs go one at a time,
alternating which service goes first, each polled every `--poll-ms` until it succeeded; then
GETs of one succeeded job in blocks of 100, alternating, the CPU each service process used
read from /proc. `--steps`: both serves under `bench.step_trace`, and each one's steps of a
job printed as `bench.v2_overhead --explain` prints them (the serve CPU between its steps
side by side: where a change's CPU went, on the same load).

Run from the repository root:
    .venv/bin/python -m bench.v2_paired --other ../main/src [--jobs 100] [--polls 3000] [--steps]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from bench.harness import bench_root, deploy, latency_ms, print_table, serve_beside
from bench.v2_overhead import graph, phases, steps, through_v2, traced_stamps
from tests.support import REPO

BLOCK = 100  # GETs of one service before the other's turn
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU of the process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def run(other: Path, jobs: int, poll_ms: float, polls: int, traced: bool = False
              ) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        root = stack.enter_context(bench_root())
        traces = [root / "trace-this.json", root / "trace-other.json"] if traced else [None, None]
        deployment = await deploy(stack, root, 1, timed=traced, step_trace=traces[0])
        theirs = await serve_beside(
            stack, deployment, root / "data-other", deployment.sims.urls, s3=deployment.s3,
            env_overrides={"PYTHONPATH": os.pathsep.join([str(other), str(REPO)])},
            step_trace=traces[1])
        serves = {"this checkout": deployment.serve, f"--other {other}": theirs}
        http = deployment.http
        marks: dict[str, list[dict[str, Any]]] = {name: [] for name in serves}
        submits = {name: through_v2(serve.base, poll_ms / 1000, marks[name])
                   for name, serve in serves.items()}
        for submit in submits.values():  # warm up
            for color in range(3):
                await submit(http, graph(color))
        seconds: dict[str, list[float]] = {name: [] for name in serves}
        used = dict.fromkeys(serves, 0.0)
        for marked in marks.values():
            marked.clear()
        names = list(serves)
        for index in range(jobs):
            for name in names if index % 2 == 0 else reversed(names):
                before = cpu_seconds(serves[name].process.pid)
                seconds[name].append(await submits[name](http, graph(1000 + index)))
                used[name] += cpu_seconds(serves[name].process.pid) - before
        legs = {name: await phases(http, serve.base, marks[name])
                for name, serve in serves.items()}
        stepped: dict[str, list[tuple[str, float, float, float | str]]] = {}
        if traced:
            sim_stamps = await deployment.sims.stamps(http)
            offset = time.time() - time.monotonic()
            for (name, serve), trace in zip(serves.items(), traces, strict=True):
                assert trace is not None
                stepped[name] = steps(marks[name], await traced_stamps(serve, trace),
                                      sim_stamps, offset)
        per_get: dict[str, dict[str, float]] = {name: {} for name in serves}
        for kind in ("v2 job", "v1 job", "v2 health"):
            paths = {}
            for name, serve in serves.items():
                async with http.get(f"{serve.base}/api/v2/jobs?limit=1") as response:
                    job_id = (await response.json())["jobs"][0]["id"]
                paths[name] = serve.base + {"v2 job": f"/api/v2/jobs/{job_id}",
                                            "v1 job": f"/api/v1/jobs/{job_id}",
                                            "v2 health": "/api/v2/health"}[kind]
            spent = dict.fromkeys(serves, 0.0)
            for block in range(max(polls // BLOCK, 1)):
                for name in names if block % 2 == 0 else reversed(names):
                    before = cpu_seconds(serves[name].process.pid)
                    for _ in range(BLOCK):
                        async with http.get(paths[name]) as response:
                            assert response.status == 200, await response.text()
                            await response.read()
                    spent[name] += cpu_seconds(serves[name].process.pid) - before
            for name in serves:
                per_get[name][kind] = round(1000 * spent[name] / (max(polls // BLOCK, 1) * BLOCK),
                                            3)
    results = {name: latency_ms(values) for name, values in seconds.items()}
    print_table(["submit -> seen finished", "jobs", "p50 ms", "p95 ms", "p99 ms",
                 "serve CPU ms/job"],
                [(name, r["samples"], r["p50"], r["p95"], r["p99"],
                  round(1000 * used[name] / jobs, 2)) for name, r in results.items()])
    print_table(["leg p50 / p95 ms", *serves],
                [(leg, *(f"{legs[name][leg]['p50']} / {legs[name][leg]['p95']}"
                         for name in serves)) for leg in legs[names[0]]])
    for name, table in stepped.items():
        print_table([f"{name}: step (traced)", "p50 ms from sent", "p50 ms step's own",
                     "serve CPU ms since its step before"], table)
    print_table(["serve CPU ms per GET", *serves],
                [(kind, *(per_get[name][kind] for name in serves))
                 for kind in per_get[names[0]]])
    return {"jobs": jobs, "poll_ms": poll_ms, "polls": polls, "latency_ms": results,
            "serve_cpu_ms_per_job": {name: round(1000 * used[name] / jobs, 2)
                                     for name in serves},
            "legs_ms": legs, "steps_ms": stepped, "serve_cpu_ms_per_get": per_get,
            "load": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--other", type=Path, required=True,
                        help="the `src` directory of the checkout to compare with")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--poll-ms", type=float, default=2.0)
    parser.add_argument("--polls", type=int, default=3000, help="GETs of each kind, each")
    parser.add_argument("--steps", action="store_true",
                        help="both serves under bench.step_trace: each one's steps of a job")
    args = parser.parse_args()
    started = time.time()
    print(json.dumps({**asyncio.run(run(args.other.resolve(), args.jobs, args.poll_ms,
                                        args.polls, args.steps)),
                      "wall_s": round(time.time() - started)}))


if __name__ == "__main__":
    main()
