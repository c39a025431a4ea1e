"""For webhook tests: receivers on loopback that answer from a script, and the service's API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from comfyfleet.app import serving
from comfyfleet.settings import Settings
from tests.support import LOOPBACK


@dataclass(frozen=True)
class Answer:
    status: int = 200
    delay: float = 0.0  # seconds before answering
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Arrival:
    at: float  # time.monotonic()
    headers: dict[str, str]
    body: str


class ScriptedReceiver:
    """Answers the n-th request with the n-th answer (the last one repeats); records each."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers) or [Answer()]
        self.arrivals: list[Arrival] = []
        self.active = 0
        self.max_active = 0
        self.url = ""
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        await web.TCPSite(self._runner, LOOPBACK, port).start()
        self.url = f"http://{LOOPBACK}:{self._runner.addresses[0][1]}/hooks"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        arrival = Arrival(time.monotonic(), dict(request.headers), await request.text())
        answer = self.answers[min(len(self.arrivals), len(self.answers) - 1)]
        async with self._changed:
            self.arrivals.append(arrival)
            self._changed.notify_all()
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(answer.delay)
            return web.Response(status=answer.status, headers=answer.headers, body=answer.body)
        finally:
            self.active -= 1

    async def wait_for(self, count: int, seconds: float = 20.0) -> None:
        async with asyncio.timeout(seconds), self._changed:
            await self._changed.wait_for(lambda: len(self.arrivals) >= count)

    @property
    def webhook_ids(self) -> list[str]:
        return [arrival.headers["webhook-id"] for arrival in self.arrivals]


class Gateway:
    """The service's API as these tests use it."""

    def __init__(self, http: aiohttp.ClientSession, api: str) -> None:
        self.http = http
        self.api = api

    async def finished_job(self, callback_url: str, **extra: Any) -> str:
        """A job that ended (cancelled while queued), so its webhook is due."""
        body = {"workflow": "invert", "params": {"width": 16}, "callback_url": callback_url,
                **extra}
        async with self.http.post(f"{self.api}/jobs", json=body) as response:
            assert response.status == 202, await response.text()
            job_id: str = (await response.json())["id"]
        async with self.http.post(f"{self.api}/jobs/{job_id}/cancel") as response:
            assert response.status == 200, await response.text()
        return job_id

    async def deliveries(self, job_id: str) -> list[dict[str, Any]]:
        async with self.http.get(f"{self.api}/jobs/{job_id}/deliveries") as response:
            assert response.status == 200, await response.text()
            found: list[dict[str, Any]] = (await response.json())["deliveries"]
            return found

    async def delivery(self, job_id: str) -> dict[str, Any]:
        (delivery,) = await self.deliveries(job_id)
        return delivery

    async def wait_for(
        self, job_id: str, status: str, *, attempts: int = 1, seconds: float = 20.0
    ) -> dict[str, Any]:
        """The job's delivery once it has `status` and at least `attempts` attempts."""
        async with asyncio.timeout(seconds):
            while True:
                delivery = await self.delivery(job_id)
                if delivery["status"] == status and len(delivery["attempts"]) >= attempts:
                    return delivery
                await asyncio.sleep(0.05)  # polling the API: no event to wait on out here


@asynccontextmanager
async def gateway(settings: Settings) -> AsyncIterator[Gateway]:
    async with serving(settings, port=0) as base, aiohttp.ClientSession() as http:
        yield Gateway(http, base + settings.route_prefix)


def verified(settings: Settings, receiver: ScriptedReceiver) -> list[dict[str, Any]]:
    """Every request the receiver got, verified with the standardwebhooks package."""
    assert settings.webhook_secret is not None
    webhook = Webhook(settings.webhook_secret)
    return [webhook.verify(arrival.body, arrival.headers) for arrival in receiver.arrivals]
