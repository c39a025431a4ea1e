"""Changing the fleet at run time: what a backend may be called and where it may point."""

from __future__ import annotations

import asyncio
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.app import serving
from comfyfleet.comfy.endpoints import Backend
from comfyfleet.fleet.registry import BackendExists, BackendRegistry
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import LOOPBACK, free_ports, serve_env


async def call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, url, json=body) as response:
        return response.status, (await response.json() if response.status != 204 else None)


async def test_backend_names_and_urls_are_checked(settings: Settings) -> None:
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI())
        other = await stack.enter_async_context(SimulatedComfyUI())
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        api = base + settings.route_prefix
        port = sim.url.rsplit(":", 1)[1]

        refused = [
            ({"url": "http://u:p@127.0.0.1:1/x?y#z", "name": "weird/../name"}, "name"),
            ({"url": sim.url, "name": ".."}, "name"),
            ({"url": sim.url, "name": "a#b"}, "name"),
            ({"url": f"http://admin:s3cret@{LOOPBACK}:{port}", "name": "creds"}, "url"),
            ({"url": sim.url + "/?token=abc", "name": "query"}, "url"),
            ({"url": sim.url + "#frag", "name": "fragment"}, "url"),
            ({"url": f"http://{LOOPBACK}:{port}/a b", "name": "space"}, "url"),
            ({"url": "http://a..com:8188", "name": "badhost"}, "url"),
        ]
        for body, field in refused:
            status, answer = await call(http, "POST", f"{api}/backends", body)
            assert status == 422, (body, answer)
            assert field in (answer["error"].get("field"), answer["error"].get("problems", [{}])[0]
                             .get("field")), answer
            assert "s3cret" not in str(answer)  # credentials are never echoed

        status, added = await call(http, "POST", f"{api}/backends",
                                   {"url": sim.url, "name": "gpu-1"})
        assert (status, added["name"], added["url"]) == (201, "gpu-1", sim.url)
        # The same server under a second name (spelled differently) would double its slots.
        for url in (sim.url + "/", f"HTTP://{LOOPBACK}:{port}", f"{LOOPBACK}:{port}"):
            status, answer = await call(http, "POST", f"{api}/backends",
                                        {"url": url, "name": "gpu-2"})
            assert (status, answer["error"]["type"], answer["error"]["field"]) == (
                409, "backend_exists", "url"), url
            assert "gpu-1" in answer["error"]["message"]
        status, answer = await call(http, "POST", f"{api}/backends",
                                    {"url": other.url, "name": "gpu-1"})
        assert (status, answer["error"]["field"]) == (409, "name")

        # The default name (host:port) is a name PATCH and DELETE can address.
        status, added = await call(http, "POST", f"{api}/backends", {"url": other.url})
        assert (status, added["name"]) == (201, other.url.removeprefix("http://"))
        for name in ("gpu-1", added["name"]):
            status, _ = await call(http, "PATCH", f"{api}/backends/{name}", {"drain": True})
            assert status == 200
            assert (await call(http, "DELETE", f"{api}/backends/{name}"))[0] == 204
        assert await call(http, "GET", f"{api}/backends") == (200, [])


async def test_configured_endpoints_follow_the_same_rules(
    settings: Settings, engine: AsyncEngine, data_root: Path
) -> None:
    port = free_ports(1)
    for endpoints, expected in [
        ("http://admin:s3cret@127.0.0.1:1#gpu", "credentials"),
        ("127.0.0.1:1#weird/../name", "not a slug"),
        ("127.0.0.1:1/x?y=1#gpu", "query"),
        ("127.0.0.1:1#a,http://127.0.0.1:1/#b", "duplicate backend urls"),
    ]:
        env = serve_env(settings, data_root, port, COMFYUI_ENDPOINTS=endpoints)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "comfyfleet", "serve", env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        _, stderr = await asyncio.wait_for(process.communicate(), 60)
        error = stderr.decode()
        assert process.returncode != 0
        assert error.startswith("comfyfleet: COMFYUI_ENDPOINTS: ") and expected in error, error
        assert "Traceback" not in error and "s3cret" not in error

    # A process configured with a server the fleet already has under another name.
    registry = BackendRegistry(engine)
    await registry.add(Backend("gpu", "http://127.0.0.1:1"))
    with pytest.raises(BackendExists, match="fleet has it as 'gpu'"):
        await registry.seed([Backend("127.0.0.1:1", "http://127.0.0.1:1")])
    await registry.seed([Backend("gpu", "http://127.0.0.1:1")])  # the same name is fine
