"""CPU per claim: what the claiming process spends on `JobRepository.claim_next` (sql/claim.sql
`claim`: its arguments encoded, its row and read decoded, the read made into QueuedJobs), one
process, embedded PostgreSQL, no backends running.

`--jobs` queued invert jobs (the throughput benchmark's prompt, no API key), 16 backends in the
table; claims in a row, each taking the first job of the read the claim before it made (a
pick that costs nothing: `bench.pick_cpu` measures placement), as the dispatcher's pass does at
saturation, until none is left; `--rounds` times. A read is of CLAIM_BATCH jobs until the last
ones. The CPU time of this process (`time.process_time`: waiting for PostgreSQL is not
counted) over the claims made, and of the claim statement's round trips alone; and
PostgreSQL's (its server's processes, the backend running the claims all but alone) over the
same claims: how the statement gives its read moves work between the two (migrations 0048 and
0049), and what one saves the other may spend.

With `--other SRC`, the same in a process whose PYTHONPATH puts SRC first (a `git archive` of
main's `src`, say), in turns with this checkout's.

Run from the repository root:
    .venv/bin/python -m bench.claim_cpu [--other /tmp/main/src] [--turns 3] [--jobs 800]
"""

from __future__ import annotations

import json
import os
import statistics
import time
import uuid
from typing import Any

import asyncpg
import uvloop

from bench.harness import (
    Component,
    CpuMeter,
    bench_root,
    embedded_postgres,
    fresh_database,
    measured_runs,
    paired_parser,
    print_table,
    workflow_job,
)
from comfyfleet import db
from comfyfleet.comfy.endpoints import Backend
from comfyfleet.fleet.registry import BackendRegistry
from comfyfleet.jobs.models import Job, utcnow
from comfyfleet.jobs.repository import BacklogRead, Choice, JobRepository

BACKENDS = [f"gpu{index:02}" for index in range(16)]
DISPATCHED_AWAY = "UPDATE jobs SET status = 'succeeded', backend = NULL WHERE status = 'dispatched'"


def first(_: str, read: BacklogRead) -> Choice | None:
    return Choice(read.queued[0].id, charge=0.01) if read.queued else None


async def measure(jobs: int, rounds: int) -> dict[str, Any]:
    params, prompt = workflow_job()
    statement_cpu = 0.0
    fetchrow = asyncpg.Connection.fetchrow

    async def timed_fetchrow(self: asyncpg.Connection, query: str, *args: Any) -> Any:
        nonlocal statement_cpu
        began = time.process_time()
        try:
            return await fetchrow(self, query, *args)
        finally:
            if "-- name: claim\n" in query or "claim_locks($3" in query:
                statement_cpu += time.process_time() - began

    asyncpg.Connection.fetchrow = timed_fetchrow
    per_claim: list[float] = []
    per_statement: list[float] = []
    postgres: list[float] = []
    with bench_root() as root:
        async with embedded_postgres(root) as server:
            engine = db.make_engine(await fresh_database(server))
            meter = CpuMeter([Component("postgres", [server.get_pid()], with_children=True)])
            try:
                await db.migrate(engine)
                repository, registry = JobRepository(engine), BackendRegistry(engine)
                for port, name in enumerate(BACKENDS, start=9):
                    await registry.add(Backend(name, f"http://127.0.0.1:{port}"))
                for _ in range(rounds):
                    for _ in range(jobs):
                        await repository.insert(Job.model_construct(
                            id=uuid.uuid4(), created_at=utcnow(), workflow="invert",
                            params=params, prompt=prompt))
                    claims, read, statement_cpu = 0, None, 0.0
                    meter.start()
                    began = time.process_time()
                    while True:
                        claim = await repository.claim_next(
                            BACKENDS, str(uuid.uuid4()), max_inflight=jobs, pick=first, owner=1,
                            window=20, read=read)
                        read = claim.read
                        if claim.job is None:
                            break
                        claims += 1
                    per_claim.append(1000 * (time.process_time() - began) / claims)
                    meter.stop()
                    per_statement.append(1000 * statement_cpu / claims)
                    postgres.append(meter.ms_per_item(claims)["postgres"])
                    async with db.driver_connection(engine) as connection:
                        await connection.execute(DISPATCHED_AWAY)
            finally:
                await engine.dispose()
    return {"ms_per_claim": per_claim, "statement_ms_per_claim": per_statement,
            "postgres_ms_per_claim": postgres}


def main() -> None:
    parser = paired_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(uvloop.run(measure(args.jobs, args.rounds))))
        return
    print(f"load average {os.getloadavg()[0]:.2f}")
    runs = measured_runs("bench.claim_cpu", args.other, args.turns,
                         ["--jobs", str(args.jobs), "--rounds", str(args.rounds)],
                         lambda: uvloop.run(measure(args.jobs, args.rounds)))
    # The least of each code's rounds says what a claim costs, the median what it costs under
    # the load there was.
    codes = list(dict.fromkeys(run["code"] for run in runs))
    print_table(["code", "ms per claim, least", "median", "the statement's, least", "median",
                 "PostgreSQL's, least", "median"],
                [[code, *(f"{figure(values):.3f}" for key in ("ms_per_claim",
                                                               "statement_ms_per_claim",
                                                               "postgres_ms_per_claim")
                          for values in [[value for run in runs if run["code"] == code
                                          for value in run[key]]]
                          for figure in (min, statistics.median))] for code in codes])
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
