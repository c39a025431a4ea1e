"""COMFYUI_ENDPOINTS (DESIGN §7): host:port or http(s)://host:port, IPv6 literals, optional
#name; and a backend reached over IPv6 loopback running a job."""

from __future__ import annotations

import aiohttp
import pytest

from comfyfleet.app import serving
from comfyfleet.comfy.endpoints import Backend, parse_endpoint, parse_endpoints
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import wait_for_job


@pytest.mark.parametrize(("text", "expected"), [
    ("gpu1.lan:8188", Backend("gpu1.lan:8188", "http://gpu1.lan:8188")),
    ("gpu1.lan:8188#big", Backend("big", "http://gpu1.lan:8188")),
    ("http://10.0.0.7:8188#a", Backend("a", "http://10.0.0.7:8188")),
    ("https://gpu.example.com#cloud", Backend("cloud", "https://gpu.example.com")),
    ("https://gpu.example.com:8443/comfy/#behind-a-proxy",
     Backend("behind-a-proxy", "https://gpu.example.com:8443/comfy")),
    ("HTTPS://GPU.example.com:443", Backend("gpu.example.com", "https://gpu.example.com")),
    ("[::1]:8188", Backend("[::1]:8188", "http://[::1]:8188")),
    ("[fd00::7]:8188#v6", Backend("v6", "http://[fd00::7]:8188")),
    ("[FD00:0:0::7]:8188#v6", Backend("v6", "http://[fd00::7]:8188")),
    ("https://[2001:db8::1]:8443#remote", Backend("remote", "https://[2001:db8::1]:8443")),
    ("  gpu2:8189 # spaced  ", Backend("spaced", "http://gpu2:8189")),
])
def test_endpoints_are_parsed(text: str, expected: Backend) -> None:
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize(("text", "says"), [
    ("ftp://gpu:21", "not a ComfyUI endpoint"),
    ("", "not a ComfyUI endpoint"),
    ("#name-only", "not a ComfyUI endpoint"),
    ("gpu:port", "bad host or port"),
    ("gpu:99999", "bad host or port"),
    ("[::1:8188", "bad host or port"),
])
def test_bad_endpoints_are_refused_saying_which(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says) as caught:
        parse_endpoint(text)
    assert repr(text.partition("#")[0].strip()) in str(caught.value)


def test_the_list_comes_from_the_environment_and_names_are_unique() -> None:
    settings = Settings(_env_file=None, comfyui_endpoints=" a:1#x, [::1]:2 ,https://c#z ")
    assert parse_endpoints(settings.comfyui_endpoints) == [
        Backend("x", "http://a:1"), Backend("[::1]:2", "http://[::1]:2"),
        Backend("z", "https://c")]
    with pytest.raises(ValueError, match="duplicate backend names: x"):
        parse_endpoints(["a:1#x", "b:2#x"])


async def test_a_backend_on_ipv6_loopback_runs_jobs(settings: Settings) -> None:
    async with SimulatedComfyUI(host="::1") as sim:
        settings.comfyui_endpoints = [f"[::1]:{sim.port}#v6"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            api = base + settings.route_prefix
            async with http.post(f"{api}/jobs", json={"workflow": "invert"}) as response:
                job_id = (await response.json())["id"]
            job = await wait_for_job(http, api, job_id, "succeeded")
            async with http.get(f"{api}/backends") as response:
                (backend,) = await response.json()
    assert job["backend"] == "v6"
    assert (backend["name"], backend["url"], backend["healthy"]) == (
        "v6", f"http://[::1]:{sim.port}", True)


async def test_a_bad_ipv6_url_through_the_api_is_a_422(settings: Settings) -> None:
    async with serving(settings) as base, aiohttp.ClientSession() as http, http.post(
            f"{base}{settings.route_prefix}/backends", json={"url": "http://[::1:8188"}
    ) as response:
        body = await response.json()
    assert (response.status, body["error"]["type"]) == (422, "invalid_backend")
    assert "bad host or port" in body["error"]["message"]
