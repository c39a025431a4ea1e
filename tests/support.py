"""Helpers for tests that run real servers on loopback."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from PIL import Image

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
    """The first of `count` consecutive ports that are free right now."""
    for _ in range(100):
        with socket.socket() as probe:
            probe.bind((LOOPBACK, 0))
            first = int(probe.getsockname()[1])
        if first + count > 65535:
            continue
        try:
            held = []
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


async def wait_until_answering(url: str, seconds: float = 30.0) -> None:
    """Poll `url` until it answers any HTTP status."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(seconds):
        while True:
            try:
                async with http.get(url) as response:
                    await response.read()
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)


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
            await wait_until_answering(ready_url)
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
