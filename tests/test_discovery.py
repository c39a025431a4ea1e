"""Backends found in DNS (COMFYUI_DISCOVERY): a real DNS server on loopback whose answers the
test changes, in front of simulated ComfyUI servers on loopback addresses of their own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import aiohttp
import pytest

from comfyfleet.app import serving
from comfyfleet.fleet.discovery import DnsTarget
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.dns_server import NAME, LoopbackDns, loopback_dns
from tests.support import free_ports, wait_for_job

PASS = 0.2  # DISCOVERY_INTERVAL in these tests


@pytest.fixture
async def dns() -> AsyncIterator[LoopbackDns]:
    async with loopback_dns() as server:
        yield server


class Fleet:
    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http, self.base = http, base

    async def backends(self) -> dict[str, dict[str, Any]]:
        async with self.http.get(f"{self.base}/backends") as response:
            assert response.status == 200
            return {b["name"]: b for b in await response.json()}

    async def until(self, check: Any) -> dict[str, dict[str, Any]]:
        """The fleet once `check(fleet)` holds; it changes on discovery passes, a few a second."""
        async with asyncio.timeout(30):
            while not check(backends := await self.backends()):  # noqa: ASYNC110
                await asyncio.sleep(PASS / 2)  # polling the API: no local event to wait on
        return backends

    async def run_job(self) -> dict[str, Any]:
        async with self.http.post(f"{self.base}/jobs?wait=30", json={
                "workflow": "invert", "params": {"width": 16}}) as response:
            job: dict[str, Any] = await response.json()
        assert job["status"] == "succeeded", job
        return job


@asynccontextmanager
async def discovering(settings: Settings, dns: LoopbackDns, port: int, *, name: str = NAME
                      ) -> AsyncIterator[Fleet]:
    """comfyfleet serving `settings`, with the backends `dns` names `name` on `port`."""
    settings.comfyui_discovery = f"dns:{name}:{port}"
    settings.discovery_interval = PASS
    settings.discovery_nameserver = dns.nameserver
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        yield Fleet(http, base + settings.route_prefix)


async def test_addresses_join_leave_and_come_back(
    settings: Settings, dns: LoopbackDns
) -> None:
    port = free_ports(1)
    async with AsyncExitStack() as stack:
        sims = {address: await stack.enter_async_context(
                    SimulatedComfyUI(host=address, port=port))
                for address in ("127.0.0.2", "127.0.0.3")}
        static = await stack.enter_async_context(SimulatedComfyUI())
        dns.addresses = ["127.0.0.2"]
        dns.name_pod("127.0.0.2", "comfyui-0")
        settings.comfyui_endpoints = [static.url + "#static"]
        fleet = await stack.enter_async_context(  # a name without its root dot: as good
            discovering(settings, dns, port, name=NAME.rstrip(".")))

        # Named after its pod (PTR); healthy once its websocket is up; then it takes work.
        backends = await fleet.until(lambda f: f.get("comfyui-0", {}).get("healthy"))
        assert backends["comfyui-0"]["url"] == f"http://127.0.0.2:{port}"
        await fleet.http.patch(f"{fleet.base}/backends/static", json={"drain": True})
        assert (await fleet.run_job())["backend"] == "comfyui-0"

        # A second address, with no PTR record: named after the address.
        dns.addresses = ["127.0.0.2", "127.0.0.3"]
        await fleet.until(lambda f: f.get("127-0-0-3", {}).get("healthy"))

        # The first vanishes: drained, then removed, as it has nothing in flight; the static
        # backend (drained by hand above) is never touched by discovery.
        dns.addresses = ["127.0.0.3"]
        backends = await fleet.until(lambda f: "comfyui-0" not in f)
        assert set(backends) == {"127-0-0-3", "static"}
        assert backends["static"]["draining"] is True
        assert (await fleet.run_job())["backend"] == "127-0-0-3"

        # DNS down: nothing is concluded from silence.
        dns.silent = True
        await dns.passes(2)
        assert set(await fleet.backends()) == {"127-0-0-3", "static"}
        dns.silent = False

        # The name gone (NXDOMAIN): every discovered backend leaves; the static one stays.
        dns.addresses = []
        await fleet.until(lambda f: set(f) == {"static"})

        # An address that returns joins again.
        dns.addresses = ["127.0.0.2"]
        await fleet.until(lambda f: f.get("comfyui-0", {}).get("healthy"))
        assert sims["127.0.0.2"].url.endswith(f":{port}")


async def test_a_vanished_backend_hands_its_prompt_on_after_the_grace_period(
    settings: Settings, dns: LoopbackDns
) -> None:
    port = free_ports(1)
    async with AsyncExitStack() as stack:
        doomed = await stack.enter_async_context(
            SimulatedComfyUI(host="127.0.0.4", port=port, duration=30))
        await stack.enter_async_context(SimulatedComfyUI(host="127.0.0.5", port=port))
        dns.addresses = ["127.0.0.4"]
        settings.backend_grace_seconds = 1.0
        fleet = await stack.enter_async_context(discovering(settings, dns, port))
        await fleet.until(lambda f: f.get("127-0-0-4", {}).get("healthy"))

        async with fleet.http.post(f"{fleet.base}/jobs", json={
                "workflow": "invert", "params": {"width": 16}}) as response:
            job_id = (await response.json())["id"]
        await fleet.until(lambda f: f["127-0-0-4"]["inflight"] == 1)

        # The pod goes away with the prompt running, and its address leaves DNS.
        await doomed.stop()
        dns.addresses = ["127.0.0.5"]
        async with fleet.http.get(f"{fleet.base}/jobs/{job_id}") as response:
            assert (await response.json())["backend"] == "127-0-0-4"
        job = await wait_for_job(fleet.http, fleet.base, job_id, "succeeded")
        assert (job["backend"], job["attempts"]) == ("127-0-0-5", 2)
        await fleet.until(lambda f: set(f) == {"127-0-0-5"})


async def test_a_backend_drained_while_still_in_dns_stays_drained(
    settings: Settings, dns: LoopbackDns
) -> None:
    port = free_ports(1)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(SimulatedComfyUI(host="127.0.0.6", port=port))
        dns.addresses = ["127.0.0.6"]
        dns.name_pod("127.0.0.6", "comfyui-0")
        fleet = await stack.enter_async_context(discovering(settings, dns, port))
        await fleet.until(lambda f: f.get("comfyui-0", {}).get("healthy"))

        # The pod's preStop hook drains it; Kubernetes takes its address out of DNS a
        # little later (endpoint updates and DNS caches lag), after passes that still see it.
        async with fleet.http.post(f"{fleet.base}/backends/comfyui-0/drain",
                                   json={"wait": 0}) as response:
            assert (await response.json())["draining"] is True
        await dns.passes(3)
        assert (await fleet.backends())["comfyui-0"]["draining"] is True

        # Then its address leaves DNS: discovery takes it from there and removes it, idle.
        dns.addresses = []
        await fleet.until(lambda f: "comfyui-0" not in f)


async def test_a_pod_whose_name_dns_has_not_answered_yet_waits_for_it(
    settings: Settings, dns: LoopbackDns
) -> None:
    """A reverse lookup that times out says nothing about the name: the address is not added
    under a name made of it (a backend keeps its name), but on the pass that gets the answer."""
    port = free_ports(1)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(SimulatedComfyUI(host="127.0.0.9", port=port))
        dns.addresses = ["127.0.0.9"]
        dns.name_pod("127.0.0.9", "comfyui-0")
        dns.silent_ptr = True
        fleet = await stack.enter_async_context(discovering(settings, dns, port))
        await dns.passes(3)
        assert await fleet.backends() == {}

        dns.silent_ptr = False
        backends = await fleet.until(lambda f: f.get("comfyui-0", {}).get("healthy"))
        assert set(backends) == {"comfyui-0"}


async def test_a_server_the_fleet_has_already_is_not_added_again(
    settings: Settings, dns: LoopbackDns
) -> None:
    """Discovered URLs are normalised as the fleet's are: a server in COMFYUI_ENDPOINTS that DNS
    names too stays one backend (two would double its slots). Port 80, which a normalised URL
    leaves out, shows it; nothing need listen there."""
    dns.addresses = ["127.0.0.7", "127.0.0.8"]
    settings.comfyui_endpoints = ["127.0.0.7:80#static"]
    async with discovering(settings, dns, 80) as fleet:
        await fleet.until(lambda f: "127-0-0-8" in f)
        await dns.passes(2)
        backends = await fleet.backends()
    assert {name: b["url"] for name, b in backends.items()} == {
        "static": "http://127.0.0.7", "127-0-0-8": "http://127.0.0.8"}


def test_the_setting_is_checked() -> None:
    assert DnsTarget.parse("dns:comfyui.default.svc:8188") == DnsTarget(
        "comfyui.default.svc", 8188)
    assert DnsTarget("comfyui", 8188).url("fd00::5") == "http://[fd00::5]:8188"
    assert DnsTarget("comfyui", 80).url("10.0.0.5") == "http://10.0.0.5"
    for wrong in ("comfyui:8188", "dns:comfyui", "dns:comfyui:0", "dns:com fy:8188",
                  "srv:comfyui:8188", "dns:comfyui:99999"):
        with pytest.raises(ValueError, match="dns:<name>:<port>"):
            DnsTarget.parse(wrong)
