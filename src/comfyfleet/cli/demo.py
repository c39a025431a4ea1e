"""`comfyfleet demo`: the whole flow on one machine with no GPU.

Embedded PostgreSQL, local storage, two simulated ComfyUI servers, the sample workflows, and a
webhook receiver that verifies every signature and prints what it gets.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from comfyfleet.app import serving, until_terminated, webhook_secret
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI

WEBHOOK_WAIT_SECONDS = 120.0


@dataclass
class WebhookReceiver:
    """A webhook endpoint on loopback that keeps only what verifies against `secret`."""

    secret: str
    verified: list[dict[str, Any]] = field(default_factory=list)
    rejected: int = 0
    echo: bool = False
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _runner: web.AppRunner | None = None
    url: str = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hooks", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hooks"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        body = await request.text()
        try:
            event = Webhook(self.secret).verify(body, dict(request.headers))
        except WebhookVerificationError as exc:
            self.rejected += 1
            print(f"webhook REJECTED: {exc}", flush=True)
            return web.Response(status=401)
        event["webhook_id"] = request.headers["webhook-id"]
        if self.echo:
            data = event["data"]
            print(f"webhook verified: {event['type']} job {data['id']} on {data['backend']} "
                  f"-> {[o.get('key') for o in data['outputs']]}", flush=True)
        async with self._arrived:
            self.verified.append(event)
            self._arrived.notify_all()
        return web.Response(status=204)

    async def wait_for(self, count: int) -> None:
        """Return once `count` verified events have arrived."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.verified) >= count)


SAMPLE_COLORS = [0x3366CC, 0xCC3333, 0x33CC66, 0xFFCC00, 0x9933CC, 0x00CCCC]


async def _submit(http: aiohttp.ClientSession, api: str, index: int, callback: str) -> str:
    body = {
        "workflow": "invert",
        "params": {"width": 64 + 16 * index, "height": 48,
                   "color": SAMPLE_COLORS[index % len(SAMPLE_COLORS)]},
        "callback_url": callback,
    }
    async with http.post(f"{api}/jobs", json=body) as response:
        job = await response.json()
        if response.status != 202:
            raise RuntimeError(f"submit failed: HTTP {response.status} {job}")
        print(f"submitted job {job['id']} ({job['status']})", flush=True)
        return str(job["id"])


async def run_demo(jobs: int | None, port: int | None) -> int:
    """Returns the process exit code: 0 when every job succeeded with a verified webhook."""
    started = time.monotonic()
    async with AsyncExitStack() as stack:
        sims = [SimulatedComfyUI(name=f"sim{i}", duration=0.5) for i in range(2)]
        for sim in sims:
            await sim.start()
            stack.push_async_callback(sim.stop)
            print(f"simulated ComfyUI {sim.url}", flush=True)
        settings = Settings(
            comfyui_endpoints=[f"{sim.url}#sim{i}" for i, sim in enumerate(sims)],
            storage="local",
            allow_private_callbacks=True,
        )
        if settings.configured_database_url() is None:
            print(f"embedded PostgreSQL under {settings.data_dir / 'pg'}", flush=True)
        receiver = WebhookReceiver(await asyncio.to_thread(webhook_secret, settings), echo=True)
        await receiver.start()
        stack.push_async_callback(receiver.stop)
        base = await stack.enter_async_context(serving(settings, port))
        api = base + settings.route_prefix
        print(f"comfyfleet API {api} (docs: {base}/docs); webhooks -> {receiver.url}", flush=True)
        print(f"dashboard {base}/dashboard", flush=True)
        http = await stack.enter_async_context(aiohttp.ClientSession())
        count = 2 if jobs is None else jobs
        ids = [await _submit(http, api, index, receiver.url) for index in range(count)]
        try:
            async with asyncio.timeout(WEBHOOK_WAIT_SECONDS):
                await receiver.wait_for(count)
            arrived = True
        except TimeoutError:
            arrived = False
        if jobs is not None:
            return await _summary(http, api, ids, receiver, arrived, time.monotonic() - started)
        print("\nthe demo keeps running; try:\n"
              f"  curl -X POST {api}/jobs -H 'content-type: application/json' "
              f"-d '{{\"workflow\": \"invert\", \"params\": {{\"width\": 128}}}}'\n"
              "Ctrl-C stops it.", flush=True)
        await until_terminated()
    return 0


async def _summary(
    http: aiohttp.ClientSession, api: str, ids: list[str], receiver: WebhookReceiver,
    arrived: bool, elapsed: float,
) -> int:
    finished = []
    for job_id in ids:
        async with http.get(f"{api}/jobs/{job_id}") as response:
            finished.append(await response.json())
    backends = sorted({job["backend"] for job in finished if job["backend"]})
    succeeded = [job for job in finished if job["status"] == "succeeded"]
    print("\njob                                   status     backend  outputs")
    for job in finished:
        keys = ", ".join(str(output.get("key")) for output in job["outputs"])
        print(f"{job['id']}  {job['status']:<10} {job['backend'] or '-':<8} {keys}")
    summary = {
        "jobs": len(ids),
        "succeeded": len(succeeded),
        "webhooks_verified": len(receiver.verified),
        "webhooks_rejected": receiver.rejected,
        "backends_used": backends,
        "seconds": round(elapsed, 2),
    }
    print("\n" + json.dumps(summary), flush=True)
    ok = arrived and len(succeeded) == len(ids) and receiver.rejected == 0
    return 0 if ok else 1
