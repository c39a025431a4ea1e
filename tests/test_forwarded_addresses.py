"""FORWARDED_ALLOW_IPS: behind a reverse proxy every request comes from the proxy's address, so
the client's own is taken from X-Forwarded-For, but only when the proxy is one of the allowed
addresses. From anyone else the header is ignored: a client cannot shed its rate limit or its
failed-key throttle by inventing addresses.

The test client plays the proxy: it connects from 127.0.0.1 and says whom it forwards for
(203.0.113.0/24, addresses that are only written in a header, never reached)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from comfyfleet.app import serving
from comfyfleet.settings import Settings
from tests.support import LOOPBACK, free_ports, serve_env, wait_until_answering

KEY = "forwarded-test-key"


def forwarded_for(client: str) -> dict[str, str]:
    return {"X-Forwarded-For": client}


async def statuses(api: str, *clients: str | None, key: str | None = None) -> list[int]:
    """The status of GET /jobs sent for each client in turn (None: no header, the proxy's own
    request)."""
    answers = []
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http:
        for client in clients:
            headers = {**auth, **(forwarded_for(client) if client else {})}
            async with http.get(f"{api}/jobs", headers=headers) as response:
                answers.append(response.status)
    return answers


@pytest.mark.parametrize("allowed", ["127.0.0.1", "192.0.2.1, 127.0.0.1", "*"])
async def test_a_trusted_proxy_has_each_client_counted_on_its_own(
    settings: Settings, allowed: str
) -> None:
    settings.forwarded_allow_ips = allowed
    settings.rate_limit = 2
    async with serving(settings) as base:
        api = base + settings.route_prefix
        assert await statuses(api, "203.0.113.7", "203.0.113.7", "203.0.113.7") == [
            200, 200, 429]
        # Another client behind the same proxy, and the proxy itself, have their own count.
        assert await statuses(api, "203.0.113.8", "203.0.113.8", None) == [200, 200, 200]


async def test_from_an_address_not_allowed_the_header_is_ignored(settings: Settings) -> None:
    settings.forwarded_allow_ips = "192.0.2.1"  # the proxy is elsewhere; this caller is not it
    settings.rate_limit = 2
    async with serving(settings) as base:
        api = base + settings.route_prefix
        # Each request claims another client: all are counted as the caller's own address.
        assert await statuses(api, "203.0.113.7", "203.0.113.8", "203.0.113.9") == [
            200, 200, 429]


async def test_failed_keys_are_throttled_by_the_forwarded_address_only_from_the_proxy(
    settings: Settings
) -> None:
    settings.api_keys = [KEY]
    settings.max_auth_failures = 2
    settings.forwarded_allow_ips = "127.0.0.1"
    async with serving(settings) as base:
        api = base + settings.route_prefix
        guesser, neighbour = "203.0.113.7", "203.0.113.8"
        assert await statuses(api, guesser, guesser, key="wrong") == [401, 401]
        assert await statuses(api, guesser, key=KEY) == [429]
        assert await statuses(api, neighbour, key=KEY) == [200]  # not locked out by the guesser
    settings.forwarded_allow_ips = "192.0.2.1"
    async with serving(settings) as base:
        api = base + settings.route_prefix
        assert await statuses(api, guesser, neighbour, key="wrong") == [401, 401]
        assert await statuses(api, "203.0.113.9", key=KEY) == [429]  # a new name: no way out


async def test_serve_reads_it_from_dot_env(settings: Settings, tmp_path: Path) -> None:
    """`comfyfleet serve` takes FORWARDED_ALLOW_IPS from `.env` like every other setting."""
    port = free_ports(1)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    (workdir / ".env").write_text("FORWARDED_ALLOW_IPS=192.0.2.1\nRATE_LIMIT=2\n")
    env = serve_env(settings, tmp_path / "data", port)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfyfleet", "serve", cwd=workdir, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    base = f"http://{LOOPBACK}:{port}"
    try:
        await wait_until_answering(f"{base}/healthz")
        answers = await statuses(f"{base}{settings.route_prefix}", "203.0.113.7",
                                 "203.0.113.8", "203.0.113.9")
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 30)
    assert "FORWARDED_ALLOW_IPS" not in env  # only .env says it
    assert answers == [200, 200, 429]

