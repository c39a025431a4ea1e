"""The SSRF guard: which addresses are refused, the 422 at submit, and the connection-time
check at delivery (a name or address that is private by then is never connected to)."""

from __future__ import annotations

import aiohttp
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.egress import UrlNotAllowed, address_allowed, check_url, guarded_connector
from comfyfleet.jobs.models import Job, JobStatus
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.settings import Settings
from tests.conftest import StartReceiver
from tests.webhook_support import Answer, gateway

REFUSED = [
    "127.0.0.1", "127.255.0.9",  # loopback
    "10.1.2.3", "172.16.0.1", "192.168.1.1",  # private
    "169.254.169.254",  # link-local: the cloud metadata service
    "100.64.0.1", "100.100.100.200",  # CGNAT (Alibaba's metadata service lives there)
    "224.0.0.1", "239.255.255.250",  # multicast
    "240.0.0.1", "255.255.255.255",  # reserved, broadcast
    "0.0.0.0", "192.0.2.1", "198.18.0.1",  # unspecified, documentation, benchmarking
    "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1", "fd00:ec2::254",  # IPv6 equivalents
    "ff02::1", "2001:db8::1",  # IPv6 multicast, documentation
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",  # IPv4-mapped
    "64:ff9b::a9fe:a9fe", "2002:7f00:1::",  # NAT64 and 6to4 wrapping private IPv4
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not address_allowed(address)


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_allowed(address)


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8080/hooks",  # a name resolving to 127.0.0.1
        "http://127.0.0.1/hooks",
        "http://2130706433/hooks",  # 127.0.0.1 written as one number
        "http://[::1]/hooks",
        "http://[::ffff:127.0.0.1]/hooks",
        "http://169.254.169.254/latest/meta-data/",
        "https://10.0.0.8/hooks",
        "http://100.64.1.1/hooks",
        "http://[fe80::1]/hooks",
        "http://224.0.0.251/hooks",
        "http://0.0.0.0:8000/hooks",
        "ftp://8.8.8.8/hooks",
    ],
)
async def test_check_url_refuses(url: str) -> None:
    with pytest.raises(UrlNotAllowed):
        await check_url(url, allow_private=False)


async def test_check_url_allows_public_and_with_allow_private_anything_http() -> None:
    await check_url("http://8.8.8.8/hooks", allow_private=False)
    await check_url("https://[2606:4700:4700::1111]:8443/hooks", allow_private=False)
    await check_url("http://localhost:8080/hooks", allow_private=True)
    with pytest.raises(UrlNotAllowed):
        await check_url("file:///etc/passwd", allow_private=True)


async def test_private_callback_url_is_refused_at_submit_unless_allowed(
    settings: Settings,
) -> None:
    body = {"workflow": "invert", "callback_url": "http://localhost:8080/hooks"}
    answers = {}
    for allow in (False, True):
        settings.allow_private_callbacks = allow
        async with gateway(settings) as gw, gw.http.post(f"{gw.api}/jobs", json=body) as response:
            answers[allow] = response.status, await response.json()
    assert answers[True][0] == 202
    status, refused = answers[False]
    assert status == 422
    assert refused["error"]["type"] == "callback_url_not_allowed"
    assert refused["error"]["field"] == "callback_url"
    assert "127.0.0.1" in refused["error"]["message"]


# Each is refused before any name is looked up (and would fail before a DNS query was sent:
# the port, the brackets and the idna encoding are checked first), so no traffic leaves.
UNUSABLE = [
    f"http://{'a' * 64}.com/x.png",  # a label over 63 characters
    "http://a..com/x.png",  # an empty label
    "http://example.com:99999/x.png",  # a port out of range
    "http://[::1/x.png",  # an unclosed IPv6 literal
    "http://a\u0000b/x.png",  # a character no name has
]


@pytest.mark.parametrize("allow_private", [False, True])
async def test_a_url_whose_host_cannot_be_used_is_422(
    settings: Settings, allow_private: bool
) -> None:
    settings.allow_private_callbacks = allow_private
    async with gateway(settings) as gw:
        for url in UNUSABLE:
            image = {"workflow": "blur_image", "params": {"image": url}}
            async with gw.http.post(f"{gw.api}/jobs", json=image) as response:
                assert response.status == 422, (url, await response.text())
                assert set((await response.json())["error"]["params"]) == {"image"}
            callback = {"workflow": "invert", "callback_url": url.removesuffix("x.png")}
            async with gw.http.post(f"{gw.api}/jobs", json=callback) as response:
                assert response.status == 422, (url, await response.text())
                error = (await response.json())["error"]
                assert error.get("field") == "callback_url" or [
                    problem["field"] for problem in error["problems"]] == ["callback_url"]


async def test_guarded_connector_never_connects_to_a_private_address(
    receivers: StartReceiver,
) -> None:
    receiver = await receivers()
    port = receiver.url.split(":")[2].split("/")[0]
    for url in (receiver.url, f"http://localhost:{port}/hooks"):
        async with aiohttp.ClientSession(connector=guarded_connector(allow_private=False)) as http:
            with pytest.raises(aiohttp.ClientConnectorError, match="non-public"):
                await http.post(url)
    assert receiver.arrivals == []
    async with (
        aiohttp.ClientSession(connector=guarded_connector(allow_private=True)) as http,
        http.post(receiver.url) as response,
    ):
        assert response.status == 200


async def test_delivery_refuses_urls_that_turned_private_after_submit(
    settings: Settings, receivers: StartReceiver, engine: AsyncEngine
) -> None:
    """What DNS rebinding leads to: the URL passed at submit, but by delivery time its name
    (or, here, its address) is private. The worker must not connect."""
    settings.allow_private_callbacks = False
    settings.webhook_retry_delays = [0.2]
    receiver = await receivers()
    port = receiver.url.split(":")[2].split("/")[0]
    urls = [receiver.url, f"http://localhost:{port}/hooks", f"http://[::ffff:127.0.0.1]:{port}/"]
    async with gateway(settings) as gw:
        repository = JobRepository(engine)
        job_ids = []
        for url in urls:  # straight into the database: the API would refuse them
            job, _ = await repository.insert(Job(workflow="invert", callback_url=url))
            await repository.finish(job, JobStatus.CANCELLED, {JobStatus.QUEUED})
            job_ids.append(str(job.id))
        deliveries = [await gw.wait_for(job_id, "pending", attempts=2) for job_id in job_ids]
    assert receiver.arrivals == []
    for delivery in deliveries:
        for attempt in delivery["attempts"]:
            assert attempt["status_code"] is None
            assert "non-public" in attempt["error"]


async def test_redirects_are_not_followed(
    settings: Settings, receivers: StartReceiver
) -> None:
    settings.webhook_retry_delays = [0.2]
    target = await receivers()
    redirecting = await receivers(Answer(307, headers={"Location": target.url}), Answer(204))
    async with gateway(settings) as gw:
        job_id = await gw.finished_job(redirecting.url)
        delivery = await gw.wait_for(job_id, "delivered", attempts=2)
    assert target.arrivals == []
    redirected, ok = delivery["attempts"]
    assert redirected["status_code"] == 307
    assert redirected["error"] == f"HTTP 307: redirects are not followed (Location: {target.url})"
    assert ok["status_code"] == 204
