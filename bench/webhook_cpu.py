"""CPU per webhook delivery of the process that sends it: the worker's pass over the outbox
(leasing, recording attempts), each delivery's body with its output's URL presigned (S3,
never connected to: presigning is local), its signature, the POST to a receiver in another
process that answers 204 at once, the attempt's metrics and outcome; one process, embedded
PostgreSQL.

Each round, `--deliveries` jobs are stored ended, each with one output in S3 and a
`job.succeeded` delivery due; then `WebhookWorker` (WEBHOOK_CONCURRENCY `--concurrency`)
delivers them all, and the CPU time of this process (`time.process_time`: waiting for
PostgreSQL or the receiver is not counted) from its start to its close is divided by the
deliveries, over `--rounds` rounds; the garbage collector tuned as the service tunes it.
The deliveries are leased by the worker's passes, not handed over as written (as a serve
process's own jobs' are), and the process polls the outbox's count ten times a second.
`--profile PATH`: samples of that CPU time in the last round (bench.cpu_sampled's), as
collapsed stacks.

With `--other SRC`, the same in a process whose PYTHONPATH puts SRC first (main's `src`, say),
in turns with this checkout's.

Run from the repository root:
    .venv/bin/python -m bench.webhook_cpu [--other /work/main/src] [--turns 3]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web
from sqlalchemy import func, select

from bench.cpu_sampled import Sampler
from bench.harness import (
    bench_root,
    embedded_postgres,
    fresh_database,
    measured_runs,
    paired_parser,
    print_turns,
)
from comfyfleet import db
from comfyfleet.cli.main import _tune_garbage_collector
from comfyfleet.jobs.deliveries import DELIVERIES, DeliveryStatus
from comfyfleet.jobs.models import Job, JobStatus, utcnow
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.settings import Settings
from comfyfleet.storage import S3Storage
from comfyfleet.webhooks.signing import new_secret
from comfyfleet.webhooks.worker import WebhookWorker
from tests.conftest import S3_CREDENTIALS

NEVER_CONNECTED = "http://127.0.0.1:9"
REPO = Path(__file__).resolve().parent.parent


async def receive(port_file: Path) -> None:
    """Answer every webhook 204 at once, until killed; the port written to `port_file`."""
    async def hook(_: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    await asyncio.to_thread(port_file.write_text, str(port))
    await asyncio.Event().wait()


async def wait_for_port(port_file: Path) -> str:
    """The receiver's port, once it has written it (PostgreSQL starts meanwhile)."""
    for _ in range(600):
        port = await asyncio.to_thread(lambda: port_file.exists() and port_file.read_text())
        if port:
            return port
        await asyncio.sleep(0.05)  # (another process writes the file)
    raise TimeoutError("the receiver did not start")


async def fill(engine: Any, deliveries: int, callback: str) -> None:
    """`deliveries` jobs stored ended with an output in S3: each insert writes the job's
    job.succeeded delivery, due now."""
    repository = JobRepository(engine)
    for _ in range(deliveries):
        job_id = uuid.uuid4()
        await repository.insert(Job(
            id=job_id, workflow="invert", status=JobStatus.SUCCEEDED, callback_url=callback,
            created_at=utcnow(), finished_at=utcnow(), outputs=[{
                "node_id": "9", "filename": "ComfyUI_00001_.png", "content_type": "image/png",
                "size": 590, "key": f"outputs/{job_id}/9_0.png"}]))


async def measure(deliveries: int, rounds: int, concurrency: int,
                  profile: Path | None = None) -> dict[str, Any]:
    sampler = Sampler(profile) if profile is not None else None
    if sampler is not None:
        signal.signal(signal.SIGPROF, sampler.sample)
        gc.callbacks.append(sampler.collecting)
    per_delivery: list[float] = []
    with bench_root() as root:
        port_file = root / "receiver-port"
        receiver = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.webhook_cpu", "--receiver", str(port_file), cwd=REPO)
        storage = await S3Storage.open(Settings(
            _env_file=None, s3_bucket="outputs", s3_endpoint_url=NEVER_CONNECTED,
            aws_access_key_id=S3_CREDENTIALS["aws_access_key_id"],
            aws_secret_access_key=S3_CREDENTIALS["aws_secret_access_key"]))
        try:
            async with embedded_postgres(root) as server:
                port = await wait_for_port(port_file)
                callback = f"http://127.0.0.1:{port}/hooks"
                engine = db.make_engine(await fresh_database(server))
                settings = Settings(_env_file=None, webhook_concurrency=concurrency,
                                    webhook_concurrency_per_host=concurrency,
                                    allow_private_callbacks=True)
                try:
                    await db.migrate(engine)
                    for _ in range(rounds):
                        await fill(engine, deliveries, callback)
                        slots = WebhookWorker.slots(settings)
                        worker = WebhookWorker.from_settings(
                            settings, engine, new_secret(), storage.url, slots)
                        _tune_garbage_collector()  # as `comfyfleet serve` does once started
                        if sampler is not None:
                            sampler.start()
                        began = time.process_time()
                        worker.start()
                        delivered = select(func.count()).select_from(DELIVERIES).where(
                            DELIVERIES.c.status == DeliveryStatus.DELIVERED)
                        while True:  # a count a tenth of a second: next to nothing here
                            await asyncio.sleep(0.1)
                            async with engine.connect() as connection:
                                done = (await connection.execute(delivered)).scalar_one()
                            if done == deliveries * (len(per_delivery) + 1):
                                break
                        await worker.close()
                        per_delivery.append(1000 * (time.process_time() - began) / deliveries)
                        if sampler is not None:
                            sampler.stop()  # written each round: the last round's stay
                finally:
                    await engine.dispose()
        finally:
            await storage.close()
            receiver.kill()
            await receiver.wait()
    return {"ms_per_delivery": per_delivery}


def main() -> None:
    parser = paired_parser(__doc__)
    parser.add_argument("--deliveries", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--profile", type=Path, help="where the last round's samples go")
    parser.add_argument("--receiver", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receiver:
        uvloop.run(receive(args.receiver))
        return
    if args.child or args.profile:
        print(json.dumps(uvloop.run(measure(args.deliveries, args.rounds, args.concurrency,
                                            args.profile))))
        return
    print(f"load average {os.getloadavg()[0]:.2f}")
    options = [f"--deliveries={args.deliveries}", f"--rounds={args.rounds}",
               f"--concurrency={args.concurrency}"]
    runs = measured_runs("bench.webhook_cpu", args.other, args.turns, options, lambda: uvloop.run(
        measure(args.deliveries, args.rounds, args.concurrency)))
    print_turns(runs, "ms_per_delivery", "ms per delivery")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
