"""Helpers for tests that run real servers on loopback."""

from __future__ import annotations

import asyncio
import io
import json
import os
import random
import socket
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool

from comfyfleet.db import embedded_url
from comfyfleet.settings import Settings

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent

# What a child Python process needs from the caller's environment; nothing else is passed on.
PASSED_ON = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "LD_LIBRARY_PATH")


def child_env(**variables: str) -> dict[str, str]:
    """The whole environment of a process a test starts: what Python needs, the repository on
    PYTHONPATH (for `python -m tests...` and `bench...`), no AWS config files, and `variables`.
    An exported API_KEYS or AWS_PROFILE of the developer's shell never reaches it."""
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {
        **{name: os.environ[name] for name in PASSED_ON if name in os.environ},
        "PYTHONPATH": python_path,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        **variables,
    }


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports that are free right now, chosen below Linux's
    ephemeral range (32768 up): a port the kernel hands out is one any outgoing connection
    may take as its local port between this check and the child process binding it. Each
    pytest-xdist worker chooses from a share of its own (`_port_share`)."""
    share = _port_share()
    rng = random.Random()
    for _ in range(1000):
        first = rng.randrange(share.start, share.stop - count)
        held = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                held.append(sock)
                sock.bind((LOOPBACK, port))
            return first
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports")


def _port_share() -> range:
    """Where `free_ports` chooses: 20000-32000, or under pytest-xdist (`make test`) the
    worker's own part of it, so that two workers never pick the same free port and both bind
    it (a port is only checked free; the process that uses it binds it later)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # gw0, gw1, ...
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    size = (32000 - 20000) // workers
    first = 20000 + int(worker.removeprefix("gw")) * size
    return range(first, first + size)


async def wait_until_answering(
    url: str, seconds: float = 30.0, process: asyncio.subprocess.Process | None = None
) -> None:
    """Poll `url` until it answers any HTTP status; fails at once when `process`, which is to
    answer there, has exited (not after `seconds` of asking a port nobody will open)."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(seconds):
        while True:
            if process is not None and process.returncode is not None:
                raise AssertionError(f"exited {process.returncode} before {url} answered")
            try:
                async with http.get(url) as response:
                    await response.read()
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)


async def wait_for_healthy_backends(
    http: aiohttp.ClientSession, api: str, seconds: float = 15.0
) -> list[dict[str, Any]]:
    """The backends `GET {api}/backends` lists, once each is healthy (connected, answering
    /system_stats, its prompts reconciled). Polled: backends have no event stream."""
    async with asyncio.timeout(seconds):
        while True:
            async with http.get(f"{api}/backends") as response:
                backends: list[dict[str, Any]] = await response.json()
            if backends and all(backend["healthy"] for backend in backends):
                return backends
            await asyncio.sleep(0.1)  # polling the API: no event to wait on


@asynccontextmanager
async def app_on_loopback(app: web.Application, **runner_options: Any) -> AsyncIterator[str]:
    """`app` served on a free loopback port until the block ends: its URL. `runner_options`
    as web.AppRunner takes them."""
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    try:
        await web.TCPSite(runner, LOOPBACK, 0).start()
        yield f"http://{LOOPBACK}:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def python_process(
    *args: str, ready_url: str, env: dict[str, str] | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run `python -m ...args` until the block ends; ready once `ready_url` answers. It runs in
    an empty directory of its own (so no `.env` is read and no relative path lands in the
    repository) with `env`, default `child_env()`."""
    with tempfile.TemporaryDirectory(prefix="comfyfleet-cwd-", ignore_cleanup_errors=True) as cwd:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", *args, stdout=asyncio.subprocess.DEVNULL, cwd=cwd,
            env=child_env() if env is None else env,
        )
        try:
            await wait_until_answering(ready_url, process=process)
            yield process
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 10)
                except TimeoutError:
                    process.kill()
                    await process.wait()


def serve_env(settings: Settings, data_dir: Path, port: int, **overrides: str) -> dict[str, str]:
    """The environment of a `comfyfleet serve` subprocess on the test's database: local
    storage under `data_dir`, the repository's workflows, the test's webhook secret, private
    callbacks allowed; `overrides` add or replace variables (e.g. COMFYUI_ENDPOINTS)."""
    return child_env(**{
        "DATABASE_URL": settings.database_url or "",
        "STORAGE": "local",
        "DATA_DIR": str(data_dir),
        "WORKFLOWS_DIR": str(REPO / "workflows"),
        "WEBHOOK_SECRET": settings.webhook_secret or "",
        "ALLOW_PRIVATE_CALLBACKS": "true",
        "SERVICE_PORT": str(port),
        **overrides,
    })


async def serve_replicas(stack: AsyncExitStack, settings: Settings, data_root: Path,
                         **overrides: str) -> tuple[str, str]:
    """Two `comfyfleet serve` processes on the test's database ("a" and "b", each with its
    data directory under `data_root`), running until `stack` closes: their base URLs."""
    bases = []
    for replica in ("a", "b"):
        port = free_ports(1)
        base = f"http://{LOOPBACK}:{port}"
        await stack.enter_async_context(python_process(
            "comfyfleet", "serve", env=serve_env(settings, data_root / replica, port, **overrides),
            ready_url=base + "/healthz"))
        bases.append(base)
    return bases[0], bases[1]


# The colour of `png()`'s pixels, to check what the backend received.
COLOR = (10, 200, 30)


def png(width: int = 32, height: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), COLOR).save(buffer, format="PNG")
    return buffer.getvalue()


async def new_database(server: Any, prefix: str = "test") -> str:
    """A new, empty database on the embedded PostgreSQL `server`; its SQLAlchemy URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server.get_uri())
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return embedded_url(server).replace("/postgres?", f"/{name}?")


TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


async def server_sent_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The events of a text/event-stream response, as {event, id, data} (data decoded)."""
    event: dict[str, Any] = {}
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if "data" in event:
                yield event
            event = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(": ")
            event[field] = json.loads(value) if field == "data" else value


async def wait_for_job(
    http: aiohttp.ClientSession, api: str, job_id: str, *statuses: str,
    progress: float = 0.0, seconds: float = 30.0, headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The job once its status is one of `statuses` (default: any terminal one) and its
    progress at least `progress`, followed through its event stream
    (`GET {api}/jobs/{id}/events`), not by polling.

    An end the caller did not wait for fails at once, saying how the job ended. For a
    terminal status the job is the one the terminal event carries; for another one it is read
    just after the event (so it may have moved on since). A stream cut off (the service
    killed or restarting) is taken up again with Last-Event-ID.
    """
    wanted = set(statuses) or TERMINAL_STATUSES
    last_id: str | None = None
    seen: dict[str, Any] | None = None
    try:
        async with asyncio.timeout(seconds):
            while True:
                resume = {"Last-Event-ID": last_id} if last_id is not None else {}
                try:
                    async with http.get(
                        f"{api}/jobs/{job_id}/events", headers={**(headers or {}), **resume},
                        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
                    ) as response:
                        assert response.status == 200, await response.text()
                        async for event in server_sent_events(response):
                            if event["event"] == "preview":
                                continue
                            last_id, seen = event.get("id", last_id), event["data"]
                            status = seen["status"]
                            terminal = event["event"] in TERMINAL_STATUSES
                            if status in wanted and seen["progress"] >= progress:
                                return seen if terminal else await _job(http, api, job_id,
                                                                        headers)
                            if terminal:
                                raise AssertionError(
                                    f"job {job_id} ended {status}, not {sorted(wanted)}: {seen}")
                except aiohttp.ClientError:
                    pass  # the service is away; it is started again by the test
                await asyncio.sleep(0.1)  # reconnecting: no event to wait on while it is away
    except TimeoutError:
        raise AssertionError(f"job {job_id} not {sorted(wanted)} within {seconds:g} s; "
                             f"last seen: {seen}") from None


async def _job(
    http: aiohttp.ClientSession, api: str, job_id: str, headers: dict[str, str] | None
) -> dict[str, Any]:
    async with http.get(f"{api}/jobs/{job_id}", headers=headers) as response:
        assert response.status == 200, await response.text()
        job: dict[str, Any] = await response.json()
        return job


# Each sample of a /metrics page: (name, labels) -> value.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(http: aiohttp.ClientSession, base: str) -> Samples:
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@asynccontextmanager
async def asyncpg_statements() -> AsyncIterator[list[str]]:
    """The statements run meanwhile, as sent, on the asyncpg connections any engine opens
    meanwhile (a connection opened before is not watched)."""
    ran: list[str] = []

    def told(query: Any) -> None:
        ran.append(query.query)

    def watch(connection: Any, _: Any) -> None:
        connection.driver_connection.add_query_logger(told)

    event.listen(Pool, "connect", watch)
    try:
        yield ran
    finally:
        event.remove(Pool, "connect", watch)


@asynccontextmanager
async def statements_run(engine: AsyncEngine) -> AsyncIterator[list[str]]:
    """The statements run on `engine`'s connections meanwhile, as sent."""
    async with asyncpg_statements() as ran:
        await engine.dispose()  # its connections made anew, each watched
        yield ran

