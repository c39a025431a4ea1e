"""Webhook delivery throughput: N deliveries to one receiver that answers after D seconds.

The outbox is filled first (N jobs ended, each with its delivery row), then the service starts
and its worker delivers. Sent one at a time this would take N x D; with C deliveries in flight
the bound is ceil(N / C) x D. Reported per concurrency level: wall time from the service's
start to the last delivery recorded in the database, that bound, their ratio, and the peak
number of requests the receiver had open at once. Every request's signature is verified.

Run from the repository root:  .venv/bin/python -m bench.webhook_delivery
                               [--deliveries 1000] [--delay 2] [--concurrency 50,100,200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from standardwebhooks.webhooks import Webhook

from bench.harness import bench_root, embedded_postgres, fresh_database
from comfyfleet import db
from comfyfleet.app import running_services
from comfyfleet.jobs.models import Job, JobStatus
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.settings import Settings
from comfyfleet.webhooks.signing import new_secret
from tests.support import LOOPBACK

REPO = Path(__file__).resolve().parent.parent
FILL_BATCH = 50  # jobs ended at once while filling the outbox


class SlowReceiver:
    """Answers every webhook after `delay` seconds; counts verified ones and open requests."""

    def __init__(self, secret: str, delay: float) -> None:
        self._webhook = Webhook(secret)
        self._delay = delay
        self.verified = 0
        self.rejected = 0
        self.open = 0
        self.peak_open = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, LOOPBACK, 0, backlog=1024).start()
        self.url = f"http://{LOOPBACK}:{self._runner.addresses[0][1]}/hooks"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        try:
            body = await request.text()
            try:
                self._webhook.verify(body, dict(request.headers))
                self.verified += 1
            except Exception:
                self.rejected += 1
            await asyncio.sleep(self._delay)
            return web.Response(status=204)
        finally:
            self.open -= 1


async def fill_outbox(settings: Settings, callback_url: str, count: int) -> None:
    """`count` jobs, each ended (cancelled while queued) with its delivery in the outbox."""
    async with db.open_database(settings) as engine:
        repository = JobRepository(engine)

        async def ended_job(index: int) -> None:
            job, _ = await repository.insert(
                Job(workflow="invert", params={"width": 16 + index}, callback_url=callback_url)
            )
            await repository.finish(job, JobStatus.CANCELLED, {JobStatus.QUEUED})

        for start in range(0, count, FILL_BATCH):
            await asyncio.gather(*(ended_job(i) for i in range(start, min(start + FILL_BATCH,
                                                                          count))))


async def delivered(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        result = await conn.execute(
            text("SELECT count(*) FROM webhook_deliveries WHERE status = 'delivered'")
        )
        return int(result.scalar_one())


async def run_level(
    server: Any, data_dir: Path, count: int, delay: float, concurrency: int
) -> dict[str, object]:
    secret = new_secret()
    receiver = SlowReceiver(secret, delay)
    await receiver.start()
    settings = Settings(
        _env_file=None,
        database_url=await fresh_database(server),
        data_dir=data_dir,
        workflows_dir=REPO / "workflows",
        storage="local",
        webhook_secret=secret,
        allow_private_callbacks=True,
        webhook_concurrency=concurrency,
        webhook_concurrency_per_host=concurrency,
    )
    try:
        await fill_outbox(settings, receiver.url, count)
        started = time.perf_counter()
        async with running_services(settings) as services:
            # Done when the last delivery is recorded, which the receiver cannot see.
            while await delivered(services.engine) < count:  # noqa: ASYNC110 (polling the DB)
                await asyncio.sleep(0.05)
            elapsed = time.perf_counter() - started
    finally:
        await receiver.stop()
    bound = math.ceil(count / concurrency) * delay
    return {
        "deliveries": count,
        "receiver_delay_s": delay,
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "bound_seconds": bound,
        "ratio_to_bound": round(elapsed / bound, 3),
        "one_at_a_time_seconds": count * delay,
        "peak_open_at_receiver": receiver.peak_open,
        "verified": receiver.verified,
        "rejected": receiver.rejected,
        "per_second": round(count / elapsed, 1),
    }


async def main(count: int, delay: float, levels: list[int]) -> None:
    print(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                      "cpus": os.cpu_count()}), flush=True)
    with bench_root() as root:
        async with embedded_postgres(root) as server:
            for concurrency in levels:
                figures = await run_level(server, root / "data", count, delay, concurrency)
                print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=2.0, help="receiver's answer delay (s)")
    parser.add_argument("--concurrency", default="50,100,200",
                        help="comma-separated WEBHOOK_CONCURRENCY levels to run")
    args = parser.parse_args()
    asyncio.run(main(args.deliveries, args.delay,
                     [int(level) for level in args.concurrency.split(",")]))
