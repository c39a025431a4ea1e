"""CPU per job of a job's end: what the service spends from the `executed` of a job's output
to the job ended (the output fetched by GET /view from a simulator and stored, the job's end
written with its webhook's outbox row, the end told), one process, embedded PostgreSQL.

`--jobs` jobs a round, dispatched to one simulator and started (in the table: nothing runs),
each with a callback URL (so its end writes a webhook delivery, leased to a worker with room);
for each, `--concurrency` at a time, what the tracker does when a zero-duration prompt ends:
`Collector.store_early` of its one output (a PNG of about 600 bytes, as the throughput
benchmark's), the early storing closed as the end comes, then `Collector.collect` with the end
of executing deferred to the job's end (so one statement records both, by group commit when
ends come together). Storage is S3 on moto (`--storage local`: a directory). The CPU time of
this process (`time.process_time`: waiting for PostgreSQL, the simulator or moto is not
counted) is divided by the jobs, over `--rounds` rounds; the garbage collector tuned as the
service tunes it. And PostgreSQL's (its server's processes) over the same ends: its planning
of a statement is CPU of its own, not this process's. `--profile PATH`: samples of that CPU
time in the last round (bench.cpu_sampled's), as collapsed stacks.

With `--other SRC`, the same in a process whose PYTHONPATH puts SRC first (main's `src`, say),
in turns with this checkout's.

Run from the repository root:
    .venv/bin/python -m bench.finish_cpu [--other /work/main/src] [--turns 3] [--storage local]
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench.cpu_sampled import Sampler
from bench.harness import (
    Component,
    CpuMeter,
    bench_root,
    embedded_postgres,
    fresh_database,
    measured_runs,
    moto_s3,
    paired_parser,
    print_turns,
    sim_fleet,
    workflow_job,
)
from comfyfleet import db
from comfyfleet.cli.main import _tune_garbage_collector
from comfyfleet.comfy.client import ComfyClient
from comfyfleet.execution.collector import Collector, EarlyOutputs
from comfyfleet.execution.endings import Endings
from comfyfleet.execution.starts import ExecutionEnd, UnrecordedEnd, UnrecordedStart
from comfyfleet.http_client import HttpClient
from comfyfleet.jobs.deliveries import DeliverySlots
from comfyfleet.jobs.extra_data import HeldExtraData
from comfyfleet.jobs.models import Job, JobStatus, utcnow
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.jobs.waiters import JobWaiters
from comfyfleet.settings import Settings
from comfyfleet.storage import LocalStorage, S3Storage, Storage
from tests.conftest import S3_CREDENTIALS

BACKEND = "gpu0"
CALLBACK = "http://127.0.0.1:9/hooks"  # never called: the deliveries are only written
OUTPUT = "ComfyUI_00001_.png"
OUTPUT_BYTES = bytes(range(256)) * 2 + bytes(78)  # 590 bytes, as the throughput benchmark's
NODE = "9"
DISPATCHED = """
UPDATE jobs SET status = 'dispatched', backend = $1, prompt_id = id::text, attempts = 1,
    dispatched_by = 1, dispatched_at = now()
WHERE status = 'queued'
RETURNING *
"""


@asynccontextmanager
async def storage_for(kind: str, root: Path) -> AsyncIterator[Storage]:
    if kind == "local":
        yield LocalStorage(root / "outputs")
        return
    async with moto_s3() as s3:
        storage = await S3Storage.open(Settings(
            _env_file=None, s3_bucket=s3.bucket, s3_endpoint_url=s3.endpoint,
            aws_access_key_id=S3_CREDENTIALS["aws_access_key_id"],
            aws_secret_access_key=S3_CREDENTIALS["aws_secret_access_key"]))
        try:
            yield storage
        finally:
            await storage.close()


async def measure(jobs: int, rounds: int, concurrency: int, kind: str,
                  profile: Path | None = None) -> dict[str, Any]:
    params, prompt = workflow_job()
    sampler = Sampler(profile) if profile is not None else None
    if sampler is not None:
        signal.signal(signal.SIGPROF, sampler.sample)
        gc.callbacks.append(sampler.collecting)
    ui = {"images": [{"filename": OUTPUT, "subfolder": "", "type": "input"}]}
    per_job: list[float] = []
    postgres: list[float] = []
    with bench_root() as root:
        async with embedded_postgres(root) as server, sim_fleet(1) as sims, \
                storage_for(kind, root) as storage, aiohttp.ClientSession() as http, \
                HttpClient() as lean_http:
            form = aiohttp.FormData()
            form.add_field("image", OUTPUT_BYTES, filename=OUTPUT, content_type="image/png")
            async with http.post(sims.urls[0] + "/upload/image", data=form) as response:
                response.raise_for_status()
            client = ComfyClient(sims.urls[0], http, lean_http)
            engine = db.make_engine(await fresh_database(server))
            meter = CpuMeter([Component("postgres", [server.get_pid()], with_children=True)])
            try:
                await db.migrate(engine)
                slots = DeliverySlots(concurrency=10**9, per_host=10**9,
                                      lease=timedelta(seconds=60))
                slots.open()
                repository = JobRepository(engine, webhook_slots=slots)
                collector = Collector(repository, storage, "outputs/",
                                      Endings([], JobWaiters(), HeldExtraData(1)))

                async def end(job: Job) -> None:
                    started = utcnow()
                    early = EarlyOutputs()
                    collector.store_early(client, job, {NODE: ui}, early,
                                          UnrecordedStart(started))
                    await asyncio.sleep(0)  # as the tracker lets the GET /view go out
                    early.closed = True
                    unrecorded = UnrecordedEnd(ExecutionEnd(utcnow(), started))
                    await collector.collect(client, job, early=early, unrecorded=unrecorded,
                                            history_outputs={NODE: ui})

                async def ends(jobs: Iterator[Job]) -> None:
                    for job in jobs:
                        await end(job)

                for _ in range(rounds):
                    for _ in range(jobs):
                        await repository.insert(Job.model_construct(
                            id=uuid.uuid4(), created_at=utcnow(), workflow="invert",
                            params=params, prompt=prompt, callback_url=CALLBACK))
                    async with db.driver_connection(engine) as connection:
                        rows = await connection.fetch(DISPATCHED, BACKEND)
                    # As the claim builds them: ids as plain UUIDs (asyncpg's are not).
                    dispatched = iter([Job.model_construct(**(dict(row.items()) | {
                        "id": uuid.UUID(bytes=row["id"].bytes)})) for row in rows])
                    _tune_garbage_collector()  # as `comfyfleet serve` does once started

                    if sampler is not None:
                        sampler.start()
                    meter.start()
                    began = time.process_time()
                    await asyncio.gather(*(ends(dispatched) for _ in range(concurrency)))
                    per_job.append(1000 * (time.process_time() - began) / jobs)
                    meter.stop()
                    postgres.append(meter.ms_per_item(jobs)["postgres"])
                    if sampler is not None:
                        sampler.stop()  # written each round: the last round's stay
                    async with db.driver_connection(engine) as connection:
                        ended = await connection.fetchval(
                            "SELECT count(*) FROM jobs WHERE status = $1", JobStatus.SUCCEEDED)
                    assert ended == jobs * len(per_job), ended
            finally:
                await engine.dispose()
    return {"ms_per_job": per_job, "postgres_ms_per_job": postgres}


def main() -> None:
    parser = paired_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--storage", choices=("s3", "local"), default="s3")
    parser.add_argument("--profile", type=Path, help="where the last round's samples go")
    args = parser.parse_args()
    if args.child or args.profile:
        print(json.dumps(uvloop.run(measure(args.jobs, args.rounds, args.concurrency,
                                            args.storage, args.profile))))
        return
    print(f"load average {os.getloadavg()[0]:.2f}")
    options = [f"--jobs={args.jobs}", f"--rounds={args.rounds}",
               f"--concurrency={args.concurrency}", f"--storage={args.storage}"]
    runs = measured_runs("bench.finish_cpu", args.other, args.turns, options, lambda: uvloop.run(
        measure(args.jobs, args.rounds, args.concurrency, args.storage)))
    print_turns(runs, "ms_per_job", "ms per job")
    print_turns(runs, "postgres_ms_per_job", "PostgreSQL's ms per job")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
