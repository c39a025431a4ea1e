"""Helpers for tests that run real servers on loopback."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

LOOPBACK = "127.0.0.1"


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
    """Run `python -m ...args` until the block ends; ready once `ready_url` answers."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *args, stdout=asyncio.subprocess.DEVNULL, env=env
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
