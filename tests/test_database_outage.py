"""PostgreSQL stopped at once and started again while clients submit: what needs the database
answers 503 with Retry-After (never 500), /healthz stays up, and every job accepted before,
during or after the outage finishes, once."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfyfleet import api_keys
from comfyfleet.app import serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.db import embedded_url, make_engine, start_embedded_postgres
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import wait_for_job
from tests.test_placement import slow_and_fast

ACCEPTED_EACH_PHASE = 5
OUTAGE_ANSWERS = 60  # 503s seen before the database is started again


@pytest.fixture
async def own_postgres(data_root: Path) -> AsyncIterator[Any]:
    """A PostgreSQL of this test's own, which it stops and starts (the shared one serves every
    other test)."""
    server = await asyncio.to_thread(start_embedded_postgres, data_root / "pg")
    yield server
    await asyncio.to_thread(server.cleanup)


async def stop_immediately(server: Any) -> None:
    """`pg_ctl stop -m immediate`: every connection cut, no checkpoint."""
    postmaster = server.get_postmaster_info().process
    postmaster.send_signal(signal.SIGQUIT)
    await asyncio.to_thread(postmaster.wait, 30)


@dataclass
class Client:
    """Submits jobs and reads them back, one request after another, keeping every answer."""

    http: aiohttp.ClientSession
    base: str
    callback: str
    accepted: list[str] = field(default_factory=list)
    answers: list[tuple[str, int, str | None, Any]] = field(default_factory=list)

    async def request(self, label: str, method: str, path: str, body: Any = None) -> None:
        async with self.http.request(method, self.base + path, json=body) as response:
            payload = await response.json()
            self.answers.append((label, response.status, response.headers.get("Retry-After"),
                                 payload))
            if response.status == 202:
                self.accepted.append(payload["id"])

    async def round(self) -> None:
        """A submission, and the reads a client makes after it (the v2 surface's too)."""
        await self.request("submit", "POST", "/api/v1/jobs", {
            "workflow": "invert", "params": {"width": 8}, "callback_url": self.callback,
            "client_task_id": str(uuid.uuid4())})
        if self.accepted:
            await self.request("job", "GET", f"/api/v1/jobs/{self.accepted[-1]}")
        await self.request("page", "GET", "/api/v1/jobs?limit=5")
        await self.request("v2 page", "GET", "/api/v2/jobs?limit=5")

    def count(self, status: int) -> int:
        return sum(1 for _, answered, _, _ in self.answers if answered == status)


async def test_requests_get_503_while_the_database_is_down_and_no_job_is_lost(
    own_postgres: Any, settings: Settings, receiver: WebhookReceiver
) -> None:
    settings.database_url = embedded_url(own_postgres)
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI(duration=0.2))
        settings.comfyui_endpoints = [sim.url]
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        client = Client(http, base, receiver.url)
        async with asyncio.timeout(60):
            while len(client.accepted) < ACCEPTED_EACH_PHASE:
                await client.round()

            await stop_immediately(own_postgres)
            while client.count(503) < OUTAGE_ANSWERS:
                await client.round()
            async with http.get(f"{base}/healthz") as response:
                assert response.status == 200
            async with http.get(f"{base}/readyz") as response:
                assert response.status == 503

            # Still submitting while it starts up (and refuses connections meanwhile).
            restart = asyncio.create_task(asyncio.to_thread(own_postgres.ensure_postgres_running))
            while not restart.done():
                await client.round()
            await restart
            before = len(client.accepted)
            while len(client.accepted) < before + ACCEPTED_EACH_PHASE:
                await client.round()
            await receiver.wait_for(len(client.accepted))
        jobs = [await (await http.get(f"{base}/api/v1/jobs/{job_id}")).json()
                for job_id in client.accepted]

    statuses = Counter(status for _, status, _, _ in client.answers)
    assert set(statuses) <= {200, 202, 503}, statuses
    unavailable = [(request, retry_after, body) for request, status, retry_after, body
                   in client.answers if status == 503]
    assert {request for request, _, _ in unavailable} == {"submit", "job", "page", "v2 page"}
    for request, retry_after, body in unavailable:
        assert retry_after is not None and int(retry_after) > 0, request
        # The v2 surface says it in its spec's envelope.
        assert body["error"].get("type", body["error"].get("code")) == "database_unavailable"
    assert all(job["status"] == "succeeded" for job in jobs)
    delivered = Counter(event["data"]["id"] for event in receiver.verified)
    assert all(delivered[job_id] == 1 for job_id in client.accepted)


async def test_outputs_stored_while_the_database_is_down_are_recorded_when_it_is_back(
    own_postgres: Any, settings: Settings, receiver: WebhookReceiver
) -> None:
    settings.database_url = embedded_url(own_postgres)
    async with AsyncExitStack() as stack:
        # An output that takes a second to download: the job waits in `uploading` meanwhile.
        sim = await stack.enter_async_context(SimulatedComfyUI(
            output_size=256 * 1024, view_bytes_per_second=256 * 1024))
        settings.comfyui_endpoints = [sim.url]
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        api = base + settings.route_prefix
        body = {"workflow": "invert", "params": {"width": 8}, "callback_url": receiver.url}
        async with http.post(f"{api}/jobs", json=body) as response:
            job_id = (await response.json())["id"]
        await wait_for_job(http, api, job_id, "uploading")
        async with asyncio.timeout(30):
            await stop_immediately(own_postgres)
            stored = settings.data_dir / "outputs" / job_id / "3_0.png"
            while not await asyncio.to_thread(stored.exists):  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # the file lands, then its record cannot be written
            await asyncio.to_thread(own_postgres.ensure_postgres_running)
            await receiver.wait_for(1)
        async with http.get(f"{api}/jobs/{job_id}") as response:
            job = await response.json()
    assert (job["status"], job["attempts"]) == ("succeeded", 1)
    assert job["outputs"][0]["size"] == stored.stat().st_size
    assert [event["type"] for event in receiver.verified] == ["job.succeeded"]


async def test_what_needs_no_database_answers_and_prompts_finished_meanwhile_are_collected(
    own_postgres: Any, settings: Settings, receiver: WebhookReceiver
) -> None:
    """While it is away, the reads that need no database still answer (health, the fleet,
    the catalog: API keys read before stand); a prompt that finishes on the backend then,
    when nothing can record it, is collected once it is back, and nothing runs twice."""
    settings.database_url = embedded_url(own_postgres)
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI(duration=1.5))
        settings.comfyui_endpoints = [sim.url + "#gpu"]
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        api = base + settings.route_prefix
        ids = []
        for width in (16, 17, 18, 19):  # two on the backend, two waiting here
            async with http.post(f"{api}/jobs", json={
                    "workflow": "invert", "params": {"width": width},
                    "callback_url": receiver.url}) as response:
                assert response.status == 202
                ids.append((await response.json())["id"])
        running = await wait_for_job(http, api, ids[0], "running")

        await stop_immediately(own_postgres)
        # Past the keys' cache lifetime every key read goes to the database: what stands
        # while it is away is what was last read, not a cache entry that happens to be fresh.
        await asyncio.sleep(api_keys.KEY_CACHE_SECONDS)
        async with asyncio.timeout(20):  # it finishes there; nothing can record it
            while not await (await http.get(  # noqa: ASYNC110
                    f"{sim.url}/history/{running['prompt_id']}")).json():
                await asyncio.sleep(0.05)  # polling the backend: no local event to wait on
        async with http.get(f"{base}/healthz") as response:
            assert response.status == 200
        async with http.get(f"{base}/readyz") as response:
            ready = await response.json()
            assert (response.status, ready["database"], ready["storage"]) == (503, False, True)
        async with http.get(f"{api}/backends") as response:
            assert response.status == 200
            assert [backend["name"] for backend in await response.json()] == ["gpu"]
        async with http.get(f"{api}/workflows") as response:
            assert response.status == 200
            assert (await response.json())["workflows"]
        async with http.get(f"{api}/jobs/{ids[0]}") as response:
            assert (response.status, response.headers["Retry-After"]) == (503, "5")

        await asyncio.to_thread(own_postgres.ensure_postgres_running)
        jobs = [await wait_for_job(http, api, job_id, seconds=60) for job_id in ids]
        await receiver.wait_for(len(ids))
    for job in jobs:
        assert (job["status"], job["attempts"]) == ("succeeded", 1), job  # none run twice
        assert len(job["outputs"]) == 1, job
    assert sorted(event["data"]["id"] for event in receiver.verified) == sorted(ids)


async def test_with_keys_on_a_key_the_service_cannot_check_gets_503_not_401(
    own_postgres: Any, settings: Settings
) -> None:
    """A key not read before the outage (a database key, or a wrong one) cannot be checked:
    503 with Retry-After, like every other request that needs the database, and the answer
    it deserves once the database is back."""
    settings.database_url = embedded_url(own_postgres)
    settings.api_keys = ["configured-key"]
    async with AsyncExitStack() as stack:
        base = await stack.enter_async_context(serving(settings))  # migrated
        engine = make_engine(settings.database_url)
        late = await api_keys.KeyStore(engine).create("late", admin=False)
        await engine.dispose()
        http = await stack.enter_async_context(aiohttp.ClientSession())
        api = base + settings.route_prefix

        async def answer(key: str, path: str) -> tuple[int, str | None, str | None]:
            async with http.get(api + path, headers={"Authorization": f"Bearer {key}"}
                                ) as response:
                error = (await response.json()).get("error", {}) if response.status != 200 \
                    else {}
                return response.status, response.headers.get("Retry-After"), error.get("type")

        await stop_immediately(own_postgres)
        outage = {key: await answer(key, "/jobs") for key in (late, "wrong-key")}
        # The configured key needs no database; what it asks for here does.
        outage["configured"] = await answer("configured-key", "/jobs")
        assert outage == {key: (503, "5", "database_unavailable") for key in outage}, outage
        assert (await answer("configured-key", "/workflows"))[0] == 200
        async with http.get(f"{base}/healthz") as response:
            assert response.status == 200

        await asyncio.to_thread(own_postgres.ensure_postgres_running)
        async with asyncio.timeout(30):
            while (back := await answer(late, "/jobs"))[0] == 503:  # noqa: ASYNC110
                await asyncio.sleep(0.1)  # polling the API: its pool reconnects on use
        assert back == (200, None, None)
        assert (await answer("wrong-key", "/jobs"))[:1] == (401,)


async def submitted(stack: AsyncExitStack, settings: Settings, sim: SimulatedComfyUI,
                    receiver: WebhookReceiver) -> tuple[aiohttp.ClientSession, str, str]:
    """A service on `settings` whose one backend, `gpu`, is `sim`, and a job submitted to it
    calling `receiver` back: a client session, the service's API root and the job's id."""
    settings.comfyui_endpoints = [sim.url + "#gpu"]
    api = await stack.enter_async_context(serving(settings)) + settings.route_prefix
    http = await stack.enter_async_context(aiohttp.ClientSession())
    async with http.post(f"{api}/jobs", json={"workflow": "invert",
                                              "callback_url": receiver.url}) as response:
        assert response.status == 202
        return http, api, (await response.json())["id"]


async def failed_once_the_database_is_back(
    own_postgres: Any, caplog: pytest.LogCaptureFixture, receiver: WebhookReceiver,
) -> dict[str, Any]:
    """Once a pass of the tracker's safety net over backend `gpu` failed (the database
    stopped), start the database again: the job of the one webhook that comes then, failed."""
    failed = "watch pass for backend gpu failed"
    async with asyncio.timeout(30):
        while not any(record.getMessage() == failed for record in caplog.records):  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # reading the service's log: no event to wait on
    await asyncio.to_thread(own_postgres.ensure_postgres_running)
    async with asyncio.timeout(30):
        await receiver.wait_for(1)
    (event,) = receiver.verified
    assert event["type"] == "job.failed"
    job: dict[str, Any] = event["data"]
    return job


async def test_a_failure_read_from_history_while_the_database_is_down_is_written_once_it_is_back(
    own_postgres: Any, settings: Settings, receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A prompt fails on a backend whose socket says nothing: the safety net reads it from
    /history while the database is away, and cannot write it. The prompt stays followed, and
    the failure is written once the database is back, though no reconnect ever comes."""
    settings.database_url = embedded_url(own_postgres)
    settings.quiet_prompt_seconds = 1.0
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI(fail_rate=1.0, hang=True))
        sim.faults.update({"prompt_delay": 600})  # the prompt is held on its way...
        http, api, job_id = await submitted(stack, settings, sim, receiver)
        await wait_for_job(http, api, job_id, "dispatched")

        await stop_immediately(own_postgres)
        sim.faults.update({"prompt_delay": None})  # ...and runs, and fails, only now
        job = await failed_once_the_database_is_back(own_postgres, caplog, receiver)
    assert (job["id"], job["attempts"], job["error"]["type"]) == (job_id, 1, "execution_error")


async def test_a_backend_given_up_while_the_database_is_down_loses_its_prompts_once_it_is_back(
    own_postgres: Any, settings: Settings, receiver: WebhookReceiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A backend stays away past the grace period while the database is away: its prompts
    cannot be put back in the backlog then, and are once the database is back (here, with no
    attempt left, the job fails), though the backend never returns."""
    settings.database_url = embedded_url(own_postgres)
    settings.backend_grace_seconds = 1.0
    settings.max_attempts = 1
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI(duration=60))
        http, api, job_id = await submitted(stack, settings, sim, receiver)
        await wait_for_job(http, api, job_id, "running")

        await stop_immediately(own_postgres)
        await sim.stop()  # for good
        job = await failed_once_the_database_is_back(own_postgres, caplog, receiver)
    assert (job["id"], job["error"]["type"]) == (job_id, "backend_lost")
    assert "unreachable for over 1 s" in job["error"]["message"]


async def test_a_prompt_its_backend_did_not_take_while_the_database_is_down_runs_once_it_is_back(
    own_postgres: Any, settings: Settings, receiver: WebhookReceiver,
) -> None:
    """A backend answers the POST of a prompt with an error page while the database is away:
    the job cannot be put back in the backlog then. The prompt stays followed, so the safety
    net finds it gone and puts the job back once the database is back (its backend stays
    connected all along), and it runs."""
    settings.database_url = embedded_url(own_postgres)
    settings.quiet_prompt_seconds = 1.0
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI())
        sim.faults.update({"prompt_delay": 600})  # the POST is held on its way...
        http, api, job_id = await submitted(stack, settings, sim, receiver)
        await wait_for_job(http, api, job_id, "dispatched")

        await stop_immediately(own_postgres)
        looked = sim.requests["GET /history/{prompt_id}"]
        sim.faults.update({"prompt_status": 500, "prompt_delay": None})  # ...and refused now
        async with asyncio.timeout(30):
            # The dispatcher makes sure the prompt is not there, then puts the job back.
            while sim.requests["GET /history/{prompt_id}"] == looked:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # no event to wait on in the simulator
        sim.faults.update({"prompt_status": None})
        await asyncio.to_thread(own_postgres.ensure_postgres_running)
        async with asyncio.timeout(60):
            await receiver.wait_for(1)
    (event,) = receiver.verified
    assert (event["type"], event["data"]["id"]) == ("job.succeeded", job_id)


async def test_a_prompt_moved_while_the_database_is_down_runs_once_it_is_back(
    own_postgres: Any, settings: Settings,
) -> None:
    """The rebalancer interrupts a long prompt on a slow backend to start it afresh on an idle
    fast one, and cannot write the move (the database away). The prompt stays followed, so
    the safety net puts the job back in the backlog once the database is back, and it runs
    (left as it was, it stayed running for ever, its prompt long gone)."""
    settings.database_url = embedded_url(own_postgres)
    settings.quiet_prompt_seconds = 1.0
    settings.dispatch_interval = 60.0  # only the prompt's progress wakes the rebalancer
    async with AsyncExitStack() as stack:
        api, slow = await slow_and_fast(stack, settings)
        await api.call("PATCH", "/backends/fast", {"drain": True})
        # 16 s on the slow GPU in 4 steps: its first report, 4 s in, shows how long it is.
        job_id = await api.submit(4.0, steps=4)
        first_prompt = (await wait_for_job(api.http, api.base, job_id, "running"))["prompt_id"]
        await api.call("PATCH", "/backends/fast", {"drain": False})

        await stop_immediately(own_postgres)
        async with asyncio.timeout(30):
            # Interrupted there to move; the move is not written.
            while not await in_history(api.http, slow.url, first_prompt):  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # no event to wait on in the simulator
        await asyncio.to_thread(own_postgres.ensure_postgres_running)
        done = await wait_for_job(api.http, api.base, job_id, "succeeded", seconds=60)
    assert done["prompt_id"] != first_prompt


async def in_history(http: aiohttp.ClientSession, url: str, prompt_id: str) -> bool:
    """Whether the backend at `url` has ended the prompt (its /history lists it)."""
    async with http.get(f"{url}/history/{prompt_id}") as response:
        return prompt_id in await response.json()
