"""Tenants (API keys) on one fleet: each key's limits kept in the keys table, the backlog's
bounds (the key's `max_queued`, the service's MAX_QUEUED) answered with 429 queue_full and a
Retry-After from the learned run times, against a real service on loopback."""

from __future__ import annotations

import asyncio
import math
import re
import time
from contextlib import AsyncExitStack
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.api_keys import KEY_CACHE_SECONDS, KeyLimits, KeyStore, key_hash
from comfyfleet.app import serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.jobs.models import Job, JobStatus, utcnow
from comfyfleet.jobs.repository import JobRepository, Tenant
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import (
    LOOPBACK,
    free_ports,
    python_process,
    serve_env,
    statements_run,
    wait_for_healthy_backends,
    wait_for_job,
)
from tests.test_security import ADMIN, KEY_A, KEY_B, Client, bearer, keys_command

LONG = {"workflow": "simulated_work", "params": {"seconds": 3600, "steps": 2}}
QUICK = {"workflow": "invert", "params": {"width": 16}}


async def ran(repository: JobRepository, workflow: str, seconds: float) -> None:
    """A finished job in the history the run times are learned from."""
    finished = utcnow()
    await repository.insert(Job(workflow=workflow, status=JobStatus.SUCCEEDED, backend="gpu",
                                started_at=finished - timedelta(seconds=seconds),
                                finished_at=finished))


async def on_backend(repository: JobRepository, workflow: str, key: str | None,
                     ran_for: float | None) -> None:
    """A job on a backend: running for `ran_for` seconds, or not started (None)."""
    now = utcnow()
    started = None if ran_for is None else now - timedelta(seconds=ran_for)
    status = JobStatus.DISPATCHED if ran_for is None else JobStatus.RUNNING
    await repository.insert(Job(workflow=workflow, status=status, backend="gpu",
                                api_key_hash=key, dispatched_at=now, started_at=started))


async def test_the_next_finish_comes_from_learned_run_times(engine: AsyncEngine) -> None:
    repository = JobRepository(engine)
    assert await repository.next_finish_seconds() is None  # nothing on a backend
    await on_backend(repository, "short", "key-a", ran_for=10.0)
    # Nothing learned yet (a cold start): as long again as it has run.
    cold = await repository.next_finish_seconds()
    assert cold is not None and 10.0 <= cold < 11.0
    for seconds in (20.0, 40.0):
        await ran(repository, "short", seconds)
    await ran(repository, "long", 100.0)
    await on_backend(repository, "long", "key-b", ran_for=10.0)
    await on_backend(repository, "short", "key-b", ran_for=None)
    soonest = await repository.next_finish_seconds()
    assert soonest is not None and 19.0 < soonest <= 20.0  # a 30 s mean, 10 s run
    of_b = await repository.next_finish_seconds(Tenant("key-b"))
    assert of_b is not None and 29.0 < of_b <= 30.0  # not started: its whole run
    assert await repository.next_finish_seconds(Tenant(None)) is None
    await on_backend(repository, "new", "key-c", ran_for=None)
    assert await repository.next_finish_seconds(Tenant("key-c")) == 0.0  # not started: soon


async def test_the_work_on_backends_is_the_run_times_they_have_left_all_told(
    engine: AsyncEngine,
) -> None:
    """What a queued job waits behind (its ETA): all of it, or that of the jobs sent to one
    backend before one."""
    repository = JobRepository(engine)
    before_any = utcnow()
    assert await repository.work_on_backends_seconds() == 0.0  # nothing on a backend
    for seconds in (20.0, 40.0):
        await ran(repository, "short", seconds)
    await on_backend(repository, "short", "key-a", ran_for=10.0)  # 20 s left
    await on_backend(repository, "short", "key-b", ran_for=None)  # 30 s: its whole run
    assert 49.0 < await repository.work_on_backends_seconds() <= 50.0
    sent = Job(workflow="short", backend="gpu", dispatched_at=utcnow())
    assert 49.0 < await repository.work_on_backends_seconds(ahead_of=sent) <= 50.0
    first = sent.model_copy(update={"dispatched_at": before_any})
    assert await repository.work_on_backends_seconds(ahead_of=first) == 0.0
    elsewhere = sent.model_copy(update={"backend": "other"})
    assert await repository.work_on_backends_seconds(ahead_of=elsewhere) == 0.0


async def test_a_cold_start_retries_soon_when_room_comes_soon(settings: Settings) -> None:
    """Nothing has run yet, so no run time is learned: the Retry-After comes from how long
    the job on the backend has run so far, not a fixed guess far beyond the room's coming."""
    settings.api_keys = [KEY_A]
    settings.max_inflight_per_backend = 1
    settings.max_queued_per_key = 1
    jobs = [{"workflow": "simulated_work", "params": {"seconds": 5 + n / 1000, "steps": 2}}
            for n in range(4)]  # each its own prompt: none served from the backend's cache
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            client = Client(http, base, settings.route_prefix)
            running = await client.submit(KEY_A, **jobs[0])
            await wait_for_job(client.http, client.api, running["id"], "running",
                               headers=bearer(KEY_A))
            seen_running = time.monotonic()
            queued = await client.submit(KEY_A, **jobs[1])  # the key's backlog: 1, its max
            status, refused, headers = await client.call("POST", "/jobs", KEY_A, jobs[2])
            assert (status, refused["error"]["type"]) == (429, "queue_full")
            retry_after = int(headers["Retry-After"])
            assert refused["error"]["retry_after"] == retry_after
            # As long again as it has run: a second or so, well within its 5 s run.
            ran_for = time.monotonic() - seen_running + 0.5  # its start is seen by polling
            assert 1 <= retry_after <= min(5, max(1, math.ceil(ran_for))), ran_for
            # Room comes once the running job ends and the queued one starts.
            await wait_for_job(client.http, client.api, queued["id"], "running",
                               headers=bearer(KEY_A))
            accepted = await client.submit(KEY_A, **jobs[3])
            assert accepted["status"] == "queued"


async def metric(http: aiohttp.ClientSession, base: str, line: str) -> float:
    async with http.get(f"{base}/metrics") as response:
        text = await response.text()
    found = re.search(rf"^{re.escape(line)} (\S+)$", text, re.MULTILINE)
    return float(found[1]) if found else 0.0


async def test_full_backlogs_answer_429_with_retry_after_from_run_times(
    settings: Settings, engine: AsyncEngine
) -> None:
    repository = JobRepository(engine)
    for seconds in (30.0, 30.0):
        await ran(repository, "simulated_work", seconds)  # learned: 30 s a run
    settings.api_keys = [KEY_A, KEY_B]
    settings.max_inflight_per_backend = 1
    settings.max_queued_per_key = 2
    settings.max_queued = 3
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            client = Client(http, base, settings.route_prefix)
            refused_before = {scope: await metric(
                http, base, f'comfyfleet_queue_full_total{{scope="{scope}"}}')
                for scope in ("key", "service")}
            running = await client.submit(KEY_A, **LONG)
            await wait_for_job(client.http, client.api, running["id"], "running",
                               headers=bearer(KEY_A))
            for _ in range(2):
                await client.submit(KEY_A, **LONG)  # the key's backlog: 2, its max
            status, refused, headers = await client.call("POST", "/jobs", KEY_A, LONG)
            assert (status, refused["error"]["type"]) == (429, "queue_full")
            error = refused["error"]
            assert (error["scope"], error["queued"], error["limit"]) == ("key", 2, 2)
            # When the key's running job should end: 30 s learned, a moment run already.
            assert 25 <= int(headers["Retry-After"]) <= 30
            assert error["retry_after"] == int(headers["Retry-After"])

            await client.submit(KEY_B, **QUICK)  # another key: the service's backlog is 3
            status, refused, headers = await client.call("POST", "/jobs", KEY_B, QUICK)
            assert (status, refused["error"]["type"]) == (429, "queue_full")
            error = refused["error"]
            assert (error["scope"], error["queued"], error["limit"]) == ("service", 3, 3)
            # The head of the backlog starts when the running job ends.
            assert 25 <= int(headers["Retry-After"]) <= 30
            async with http.get(f"{base}/readyz") as response:
                assert response.status == 200  # refusing work is not being unwell
            for scope in ("key", "service"):
                refused_now = await metric(
                    http, base, f'comfyfleet_queue_full_total{{scope="{scope}"}}')
                assert refused_now == refused_before[scope] + 1


async def test_keys_carry_their_own_limits(settings: Settings) -> None:
    settings.max_queued_per_key = 3  # the default of keys without their own
    code, out = await keys_command(settings, "create", "shop", "--max-queued", "1",
                                   "--weight", "3")
    assert code == 0
    shop = out.strip()
    code, out = await keys_command(settings, "create", "lab")
    lab = out.strip()
    assert (await keys_command(settings, "create", "bad", "--max-queued", "0"))[0] == 2
    assert (await keys_command(settings, "update", "nobody", "--weight", "2"))[0] == 1
    assert (await keys_command(settings, "update", "shop"))[0] == 2  # nothing to change

    async def queued_until_refused(client: Client, key: str) -> tuple[int, dict[str, Any]]:
        for accepted in range(10):
            status, body, _ = await client.call("POST", "/jobs", key, QUICK)
            if status == 429:
                return accepted, body["error"]
            assert status == 202
        raise AssertionError("never refused")

    async with serving(settings) as base, aiohttp.ClientSession() as http:  # no backends
        client = Client(http, base, settings.route_prefix)
        accepted, error = await queued_until_refused(client, shop)
        assert (accepted, error["limit"]) == (1, 1)
        assert (await queued_until_refused(client, lab))[0] == 3  # the environment's default
        assert (await keys_command(settings, "update", "shop", "--max-queued", "2"))[0] == 0
        async with asyncio.timeout(KEY_CACHE_SECONDS + 5):
            while (await client.call("POST", "/jobs", shop, QUICK))[0] != 202:  # noqa: ASYNC110
                await asyncio.sleep(0.2)  # every process follows within KEY_CACHE_SECONDS
        assert (await keys_command(settings, "update", "shop", "--max-queued", "default"))[0] == 0
        code, listing = await keys_command(settings, "list")
    rows = {line.split("\t")[0]: line.split("\t")[4:] for line in listing.splitlines()}
    assert rows == {"shop": ["weight 3", "max_concurrent default", "max_queued default"],
                    "lab": ["weight 1", "max_concurrent default", "max_queued default"]}


async def test_tenants_lists_each_keys_limits_backlog_and_gpu_share(
    settings: Settings, engine: AsyncEngine
) -> None:
    settings.api_keys = [KEY_A]
    settings.admin_api_keys = [ADMIN]
    settings.max_queued_per_key = 5
    shop = await KeyStore(engine).create("shop", admin=False,
                                         limits=KeyLimits(weight=3, max_concurrent=2))
    a, of_shop = key_hash(KEY_A), key_hash(shop)
    repository = JobRepository(engine)
    now = utcnow()

    async def ran(key: str, started_ago: float, ended_ago: float) -> None:
        await repository.insert(Job(
            workflow="invert", status=JobStatus.SUCCEEDED, api_key_hash=key, backend="gpu",
            started_at=now - timedelta(minutes=started_ago),
            finished_at=now - timedelta(minutes=ended_ago)))

    await ran(a, started_ago=90, ended_ago=30)  # half of it in the last hour: 1800 s
    await ran(a, started_ago=150, ended_ago=120)  # before the last hour: not counted
    await ran(of_shop, started_ago=15, ended_ago=5)  # 600 s
    await on_backend(repository, "invert", of_shop, ran_for=None)  # dispatched, not started
    async with serving(settings) as base, aiohttp.ClientSession() as http:  # no backends
        client = Client(http, base, settings.route_prefix)
        for key in (KEY_A, KEY_A, shop):
            await client.submit(key)
        status, refused, _ = await client.call("GET", "/tenants", KEY_A)
        assert (status, refused["error"]["type"]) == (403, "admin_only")
        status, body, _ = await client.call("GET", "/tenants", ADMIN)
        assert status == 200
        assert body["window_seconds"] == 3600
        tenants = {tenant.pop("name"): tenant for tenant in body["tenants"]}
        assert list(tenants) == ["ADMIN_API_KEYS#1", "API_KEYS#1", "shop"]
        seconds = {name: tenants[name].pop("gpu_seconds") for name in tenants}
        assert seconds["ADMIN_API_KEYS#1"] == 0
        assert 1790 < seconds["API_KEYS#1"] <= 1800 and seconds["shop"] == 600
        shares = {name: tenants[name].pop("gpu_share") for name in tenants}
        assert shares == {"ADMIN_API_KEYS#1": 0.0, "API_KEYS#1": pytest.approx(0.75, abs=1e-3),
                          "shop": pytest.approx(0.25, abs=1e-3)}
        assert tenants == {
            "ADMIN_API_KEYS#1": {"admin": True, "revoked": False, "weight": 1,
                                 "max_concurrent": None, "max_queued": 5,
                                 "queued": 0, "running": 0},
            "API_KEYS#1": {"admin": False, "revoked": False, "weight": 1,
                           "max_concurrent": None, "max_queued": 5, "queued": 2, "running": 0},
            "shop": {"admin": False, "revoked": False, "weight": 3, "max_concurrent": 2,
                     "max_queued": 5, "queued": 1, "running": 1},
        }
        assert await metric(http, base, 'comfyfleet_tenant_queued{tenant="API_KEYS#1"}') == 2
        assert await metric(http, base, 'comfyfleet_tenant_running{tenant="shop"}') == 1


async def test_a_key_at_its_max_concurrent_is_skipped_by_the_claim(settings: Settings) -> None:
    settings.api_keys = [KEY_A, KEY_B]
    settings.max_concurrent_per_key = 1
    settings.max_inflight_per_backend = 2  # room for two on the one backend
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            client = Client(http, base, settings.route_prefix)
            first = await client.submit(KEY_A, **LONG)
            await wait_for_job(client.http, client.api, first["id"], "running",
                               headers=bearer(KEY_A))
            second = await client.submit(KEY_A, **LONG)
            other = await client.submit(KEY_B, **LONG)  # after A's, yet it goes first
            await wait_for_job(client.http, client.api, other["id"], "dispatched",
                               headers=bearer(KEY_B))
            assert (await client.call("GET", f"/jobs/{second['id']}", KEY_A))[1][
                "status"] == "queued"
            status, _, _ = await client.call("POST", f"/jobs/{first['id']}/cancel", KEY_A)
            assert status == 200
            await wait_for_job(client.http, client.api, second["id"], "dispatched",
                               headers=bearer(KEY_A))  # A's turn again


def most_at_once(histories: list[dict[str, Any]]) -> int:
    """The most prompts executing at one time on all the backends together, from the
    execution_start and execution_success times in their histories."""
    edges = []
    for history in histories:
        for entry in history.values():
            times = {name: data["timestamp"] for name, data in entry["status"]["messages"]}
            edges += [(times["execution_start"], 1), (times["execution_success"], -1)]
    most = now = 0
    for _, step in sorted(edges):  # at one instant an end counts before a start
        now += step
        most = max(most, now)
    return most


async def test_max_concurrent_holds_across_two_processes(
    settings: Settings, receiver: WebhookReceiver, data_root: Path
) -> None:
    backends, jobs = 4, 16
    sim_port = free_ports(backends)
    sims = [f"http://{LOOPBACK}:{sim_port + i}" for i in range(backends)]
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(python_process(
            "comfyfleet", "sim", "--backends", str(backends), "--port", str(sim_port),
            ready_url=sims[-1] + "/prompt"))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        bases = []
        for i in range(2):
            port = free_ports(1)
            bases.append(f"http://{LOOPBACK}:{port}")
            env = serve_env(
                settings, data_root / f"process{i}", port, MAX_INFLIGHT_PER_BACKEND="1",
                MAX_CONCURRENT_PER_KEY="2",  # the one tenant there is without keys
                COMFYUI_ENDPOINTS=",".join(f"{url}#gpu{n}" for n, url in enumerate(sims)))
            await stack.enter_async_context(
                python_process("comfyfleet", "serve", env=env, ready_url=bases[-1] + "/healthz"))
        for base in bases:  # both have their backends before any work arrives
            await wait_for_healthy_backends(http, f"{base}/api/v1")
        for n in range(jobs):
            body = {"workflow": "simulated_work", "params": {"seconds": 0.3, "steps": 1},
                    "callback_url": receiver.url}
            async with http.post(f"{bases[n % 2]}/api/v1/jobs", json=body) as response:
                assert response.status == 202
        async with asyncio.timeout(60):
            await receiver.wait_for(jobs)
        histories = []
        for url in sims:
            async with http.get(f"{url}/history") as response:
                histories.append(await response.json())
    assert sum(len(history) for history in histories) == jobs
    assert all(event["type"] == "job.succeeded" for event in receiver.verified)
    assert most_at_once(histories) == 2  # four backends free, two of them used at a time


async def test_requests_finding_the_key_cache_run_out_together_read_the_keys_once(
    engine: AsyncEngine,
) -> None:
    """A client with many requests in flight as the cache runs out costs one query for
    whether keys are needed and one for its key, not one each."""
    store = KeyStore(engine)
    key = await store.create("tenant", admin=False)
    async with statements_run(engine) as statements:
        assert await asyncio.gather(*(store.any_live() for _ in range(10))) == [True] * 10
        found = await asyncio.gather(*(store.lookup(key_hash(key)) for _ in range(10)))
    assert all(live is not None and not live.admin for live in found)
    assert len(statements) == 2, statements
