"""CPU per call of the service's per-job database work, each step on its own.

The throughput benchmark's CPU per job moves with the rate it reaches (a slower run makes
more empty claims per job), and on a shared machine that rate is other users' to decide; this
one is not. One process, embedded PostgreSQL, no backend running: `--jobs` jobs go through the
steps a job's life takes in the service (stored as POST /jobs stores it, started, its progress
written a statement per job as before and then as the tracker writes it now, the latest
progress of CLAIM_LIMIT running jobs a statement, finished with its webhook in the outbox, the
delivery leased, its attempt recorded by a pass of the webhook worker, which leases what is due
and finds the next due delivery in the same statement: half of them one a pass, half in
batches), all of one step before the next; then another `--jobs` jobs, put running on one
backend for one process, go through what recovery and rebalancing do (read back on a reconnect,
the periodic pass finding nothing unfollowed, taken over, moved to another backend). The CPU
time this process spends on each step (`time.process_time`, so waiting for PostgreSQL or for
the CPU is not counted) is divided by the calls. `--concurrency` calls run at once, as requests
and events do in the service. The claim step is left out: other work is changing it. Run it on
two commits to compare them (the figures of one run are comparable with each other).

Run from the repository root:  .venv/bin/python -m bench.hot_path [--jobs 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from bench.harness import bench_root, embedded_postgres, fresh_database, print_table, workflow_job
from comfyfleet import db
from comfyfleet.comfy.endpoints import Backend
from comfyfleet.fleet.registry import BackendRegistry
from comfyfleet.jobs.deliveries import DeliveryStatus, OutgoingDelivery
from comfyfleet.jobs.lease import ProcessLease
from comfyfleet.jobs.models import Job, JobStatus, utcnow
from comfyfleet.jobs.repository import JobRepository, ProgressReport
from comfyfleet.webhooks.outbox import Attempt, Outbox, Settled

CALLBACK = "http://127.0.0.1:9/hooks"  # never called: deliveries are only leased and recorded
LEASE = timedelta(seconds=60)
CLAIM_LIMIT = 32  # deliveries leased per claim, as the worker's room allows at saturation
SOURCE, TARGET = "gpu0", "gpu1"  # backends in the table only: nothing connects to them
FOLLOWER, HEIR = 1, 2  # the process following the running jobs, and the one taking them over
# The `--jobs` queued jobs running on SOURCE for FOLLOWER, as a claim and the start leave them.
RUNNING = """
UPDATE jobs SET status = 'running', backend = $1, prompt_id = id::text, attempts = 1,
    dispatched_by = $2, dispatched_at = now(), started_at = now()
WHERE status = 'queued'
"""
T = TypeVar("T")


async def timed(
    items: Sequence[T], step: Callable[[T], Awaitable[Any]], concurrency: int,
) -> tuple[float, list[Any]]:
    """(CPU milliseconds per item, results) of `step` over `items`, `concurrency` at once."""
    results: list[Any] = [None] * len(items)
    numbers = iter(range(len(items)))

    async def worker() -> None:
        for index in numbers:
            results[index] = await step(items[index])

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - started) * 1000 / len(items), results


async def run(jobs: int, concurrency: int) -> dict[str, float]:
    params, prompt = workflow_job()
    figures: dict[str, float] = {}
    with bench_root() as root:
        async with embedded_postgres(root) as server:
            engine = db.make_engine(await fresh_database(server))
            try:
                await db.migrate(engine)
                repository, outbox = JobRepository(engine), Outbox(engine)

                async def store(_: int) -> Job:
                    job, _created = await repository.insert(Job.model_construct(
                        id=uuid.uuid4(), created_at=utcnow(), workflow="invert",
                        params=params, prompt=prompt, callback_url=CALLBACK))
                    return job

                async def start(job: Job) -> Job | None:
                    return await repository.transition(
                        job, {JobStatus.QUEUED}, event="job.started",
                        status=JobStatus.RUNNING, started_at=utcnow())

                async def finish(job: Job) -> Job | None:
                    output = {"node_id": "3", "filename": "a.png", "content_type": "image/png",
                              "size": 590, "key": f"{job.id}/3_0.png"}
                    return await repository.finish(job, JobStatus.SUCCEEDED,
                                                   {JobStatus.RUNNING}, outputs=[output])

                figures["store a job (POST /jobs' insert)"], stored = await timed(
                    range(jobs), store, concurrency)
                figures["start (running)"], started = await timed(stored, start, concurrency)
                detail = {"node": "3", "class_type": "KSampler", "step": 5, "steps": 20}

                async def progress(job: Job) -> Job | None:
                    return await repository.transition(
                        job, {JobStatus.RUNNING}, event="job.progress", progress=0.5,
                        progress_detail=detail)

                async def progress_together(batch: Sequence[Job]) -> list[Job]:
                    return await repository.report_progress(
                        [ProgressReport(job, 0.6, detail) for job in batch])

                figures["progress, a statement per job (as before #17)"], _ = await timed(
                    started, progress, concurrency)
                together = [started[at:at + CLAIM_LIMIT]
                            for at in range(0, len(started), CLAIM_LIMIT)]
                per_batch, written = await timed(together, progress_together, 1)
                assert sum(len(batch) for batch in written) == len(started)
                figures[f"progress, per job ({CLAIM_LIMIT} running jobs a statement)"] = (
                    per_batch * len(together) / len(started))
                figures["finish, webhook into the outbox"], _ = await timed(
                    started, finish, concurrency)

                claimed: list[OutgoingDelivery] = []

                async def claim(_: int) -> None:
                    claimed.extend(await outbox.claim(limit=CLAIM_LIMIT, per_host=jobs,
                                                      busy={}, lease=LEASE))

                claims = -(-jobs // CLAIM_LIMIT)
                per_claim, _ = await timed(range(claims), claim, 1)
                assert len(claimed) == jobs, len(claimed)
                figures[f"lease deliveries, per delivery ({CLAIM_LIMIT} a claim)"] = (
                    per_claim * claims / jobs)

                def settled(delivery: OutgoingDelivery) -> Settled:
                    return Settled(delivery, Attempt(
                        delivery.id, delivery.lease_token, utcnow(), 204, 1, None, "",
                        DeliveryStatus.DELIVERED, None))

                async def record(batch: Sequence[OutgoingDelivery]) -> frozenset[uuid.UUID]:
                    done = await outbox.settle([settled(delivery) for delivery in batch],
                                               limit=CLAIM_LIMIT, per_host=jobs, busy={},
                                               lease=LEASE)
                    return done.kept

                half = len(claimed) // 2
                one_by_one = [[delivery] for delivery in claimed[:half]]
                batches = [claimed[at:at + CLAIM_LIMIT]
                           for at in range(half, len(claimed), CLAIM_LIMIT)]
                figures["record an attempt, one a pass (with its lease and next due)"], kept = (
                    await timed(one_by_one, record, concurrency))
                per_batch, kept_in_batches = await timed(batches, record, 1)
                figures[f"record attempts, per attempt ({CLAIM_LIMIT} a pass)"] = (
                    per_batch * len(batches) / (len(claimed) - half))
                assert sum(len(ids) for ids in kept + kept_in_batches) == len(claimed)
                figures.update(await recovery_and_moves(engine, repository, store, jobs,
                                                        concurrency))
            finally:
                await engine.dispose()
    return {name: round(ms, 3) for name, ms in figures.items()}


async def recovery_and_moves(
    engine: AsyncEngine, repository: JobRepository, store: Callable[[int], Awaitable[Job]],
    jobs: int, concurrency: int,
) -> dict[str, float]:
    """CPU ms per call of what recovery and rebalancing run, on `jobs` jobs running on one
    backend (stored with `store`, untimed)."""
    figures: dict[str, float] = {}
    registry = BackendRegistry(engine)
    for port, name in enumerate((SOURCE, TARGET), start=9):
        await registry.add(Backend(name, f"http://127.0.0.1:{port}"))
    await asyncio.gather(*(store(number) for number in range(jobs)))
    async with db.driver_connection(engine) as connection:
        await connection.execute(RUNNING, SOURCE, FOLLOWER)
    per_read, (running,) = await timed([SOURCE], repository.on_backend, 1)
    assert len(running) == jobs, len(running)
    figures["jobs on a backend (a reconnect), per job read"] = per_read / jobs
    figures["live processes (the lease), per pass"], _ = await timed(
        range(jobs), lambda _: ProcessLease(engine).live(), concurrency)
    figures["jobs no live process follows (none), per pass"], unfollowed = await timed(
        range(jobs), lambda _: repository.on_backend(unless_followed_by=[FOLLOWER]),
        concurrency)
    assert not any(unfollowed)
    figures["take over a job"], taken = await timed(
        running, lambda job: repository.take_over(job, HEIR), concurrency)
    assert all(taken)
    figures["move a job to another backend"], moved = await timed(
        taken, lambda job: repository.move(job, TARGET, str(uuid.uuid4()),
                                           max_inflight=jobs, owner=HEIR), concurrency)
    assert all(moved)
    return figures


async def main(jobs: int, concurrency: int) -> None:
    print(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                      "cpus": os.cpu_count(), "load_average": os.getloadavg()}), flush=True)
    figures = await run(jobs, concurrency)
    print_table(["step", "CPU ms per call"], list(figures.items()))
    print(json.dumps({"jobs": jobs, "concurrency": concurrency, "cpu_ms": figures}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.jobs, args.concurrency))
