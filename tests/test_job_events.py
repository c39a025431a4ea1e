"""Server-Sent Events of a job: states in order, live previews, the terminal event, resume."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.app import serving
from comfyfleet.jobs.models import ON_BACKEND_STATES, Job, JobStatus, utcnow
from comfyfleet.jobs.notices import QUEUE_SIZE, JobNotices, PreviewImage
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import server_sent_events
from tests.test_security import KEY_A, KEY_B, Client, bearer


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            yield http, base + settings.route_prefix


async def followed_to_its_end(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[dict[str, Any], dict[str, Any], float]:
    """A job's event stream at `url` followed to its first event that is not a state: the
    snapshot on connect, that event, and the seconds between them."""
    async with http.get(url, headers=headers) as response:
        events = server_sent_events(response)
        first = await anext(events)
        asked = time.monotonic()
        async for event in events:
            if event["event"] != "state":
                break
        return first, event, time.monotonic() - asked


async def test_events_follow_the_job_to_its_end_with_previews(
    api: tuple[aiohttp.ClientSession, str],
) -> None:
    http, prefix = api
    async with http.post(f"{prefix}/jobs", json={
            "workflow": "simulated_work", "params": {"seconds": 1.5, "steps": 6}}) as response:
        job_id = (await response.json())["id"]
    events = []
    async with http.get(f"{prefix}/jobs/{job_id}/events?previews=true") as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        async for event in server_sent_events(response):
            events.append(event)
    names = [e["event"] for e in events]
    assert names[-1] == "succeeded"
    assert events[-1]["data"]["id"] == job_id and events[-1]["data"]["outputs"]
    states = [e["data"] for e in events if e["event"] == "state"]
    assert states[-1]["status"] in ("running", "uploading")
    progress = [s["progress"] for s in states]
    assert progress == sorted(progress) and max(progress) > 0.3
    previews = [e["data"] for e in events if e["event"] == "preview"]
    assert previews and previews[0]["image"].startswith("data:image/")
    assert len({e["id"] for e in events if "id" in e}) == len([e for e in events if "id" in e])

    # Reconnecting after the end, as an EventSource does: nothing more to tell.
    async with http.get(f"{prefix}/jobs/{job_id}/events",
                        headers={"Last-Event-ID": events[-1]["id"]}) as response:
        assert [e async for e in server_sent_events(response)] == []
    # Reconnecting from an older event: the current state, which is the end.
    async with http.get(f"{prefix}/jobs/{job_id}/events",
                        headers={"Last-Event-ID": events[0]["id"]}) as response:
        resumed = [e async for e in server_sent_events(response)]
    assert [e["event"] for e in resumed] == ["succeeded"]


async def test_events_of_unknown_job_is_404(api: tuple[aiohttp.ClientSession, str]) -> None:
    http, prefix = api
    async with http.get(f"{prefix}/jobs/00000000-0000-4000-8000-000000000000/events") as got:
        assert got.status == 404


async def test_queued_job_reports_its_place_in_the_queue(settings: Settings) -> None:
    async with serving(settings) as base, aiohttp.ClientSession() as http:  # no backends
        prefix = base + settings.route_prefix
        ids = []
        for _ in range(3):
            async with http.post(f"{prefix}/jobs", json={"workflow": "invert"}) as response:
                ids.append((await response.json())["id"])
        async with http.get(f"{prefix}/jobs/{ids[2]}/events") as response:
            first = await anext(server_sent_events(response))
        async with http.get(f"{prefix}/jobs/{ids[2]}") as response:
            job = await response.json()
    assert first["event"] == "state"
    assert first["data"]["status"] == "queued"
    assert first["data"]["queue_position"] == 3
    # GET /jobs/{id} says it too; no ETA: nothing of the workflow has run.
    assert (job["queue_position"], job["eta_seconds"]) == (3, None)


async def ran(repository: JobRepository, workflow: str, backend: str, seconds: float) -> None:
    """A finished job in the history the ETA is taken from."""
    finished = utcnow()
    await repository.insert(Job(workflow=workflow, status=JobStatus.SUCCEEDED, backend=backend,
                                started_at=finished - timedelta(seconds=seconds),
                                finished_at=finished))


async def test_eta_comes_from_the_runs_on_the_backend_the_job_is_on(
    settings: Settings, engine: AsyncEngine
) -> None:
    repository = JobRepository(engine)
    for backend, seconds in (("slow", 30.0), ("slow", 40.0), ("fast", 2.0)):
        await ran(repository, "simulated_work", backend, seconds)
    assert await repository.typical_run_seconds("simulated_work") == 24.0
    assert await repository.typical_run_seconds("simulated_work", "slow") == 35.0
    # A backend that has not run the workflow yet: the workflow's own history.
    assert await repository.typical_run_seconds("simulated_work", "new") == 24.0
    assert await repository.typical_run_seconds("invert", "slow") is None

    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [f"{sim.url}#slow"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            prefix = base + settings.route_prefix
            async with http.post(f"{prefix}/jobs", json={
                    "workflow": "simulated_work", "params": {"seconds": 1, "steps": 4}}
                                 ) as response:
                job_id = (await response.json())["id"]
            async with http.get(f"{prefix}/jobs/{job_id}/events") as response:
                states = [event["data"] async for event in server_sent_events(response)
                          if event["event"] == "state"]
    on_backend = [state for state in states if state["backend"] == "slow"]
    assert on_backend
    for state in on_backend:
        assert state["eta_seconds"] == round(35.0 * (1 - state["progress"]), 1)


async def test_a_queued_jobs_eta_counts_the_work_ahead_of_it_in_fair_share(
    settings: Settings, engine: AsyncEngine
) -> None:
    """Two backends, jobs of a known second each: tenant B's third job, behind the four of
    tenant A on the backends and, in fair share, two more of A's queued, ends about when its
    ETA said: after (what the backends have left + 4 jobs queued before it) / 2 backends + its
    own run, give or take one job's length and a quarter (dispatch and uploads take time on a
    busy machine). Counting queue positions by backend slots instead (2 prompts each, as if a
    backend ran both at once) says 2 s."""
    seconds = 1.0
    repository = JobRepository(engine)
    for _ in range(3):
        await ran(repository, "simulated_work", "gpu", seconds)  # the run time learned
    settings.api_keys = [KEY_A, KEY_B]
    settings.max_inflight_per_backend = 2
    async with AsyncExitStack() as stack:
        sims = [await stack.enter_async_context(SimulatedComfyUI()) for _ in range(2)]
        settings.comfyui_endpoints = [sim.url for sim in sims]
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        client = Client(http, base, settings.route_prefix)

        def work(number: int) -> dict[str, Any]:  # each its own prompt: none served cached
            return {"workflow": "simulated_work",
                    "params": {"seconds": seconds + number / 1000, "steps": 2}}

        async def on_backends(jobs: list[dict[str, Any]]) -> int:
            found = [await repository.get(uuid.UUID(job["id"])) for job in jobs]
            return sum(job is not None and job.status in ON_BACKEND_STATES for job in found)

        a_jobs = [await client.submit(KEY_A, **work(n)) for n in range(8)]
        async with asyncio.timeout(15):  # both backends busy, a prompt waiting on each
            while await on_backends(a_jobs) < 4:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # polling the database for what dispatch did
        b_jobs = [await client.submit(KEY_B, **work(100 + n)) for n in range(3)]
        _, got, _ = await client.call("GET", f"/jobs/{b_jobs[2]['id']}", KEY_B)
        assert got["queue_position"] >= 1 and got["eta_seconds"] > 2 * seconds
        first, event, took = await followed_to_its_end(
            http, f"{client.api}/jobs/{b_jobs[2]['id']}/events", bearer(KEY_B))
    assert (first["data"]["status"], event["event"]) == ("queued", "succeeded")
    eta = first["data"]["eta_seconds"]
    assert abs(took - eta) <= seconds + 0.25 * eta, (eta, took)


async def test_a_dispatched_jobs_eta_counts_the_prompt_ahead_of_it_on_its_backend(
    settings: Settings, engine: AsyncEngine
) -> None:
    """One backend holding two prompts of a known 2 s each: the second, waiting there, ends
    after what the first has left and its own run, as its ETA says (within half a second and
    15%); the rest of its own run alone would say 2 s."""
    seconds = 2.0
    repository = JobRepository(engine)
    for _ in range(3):
        await ran(repository, "simulated_work", "gpu", seconds)
    settings.max_inflight_per_backend = 2
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [f"{sim.url}#gpu"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            prefix = base + settings.route_prefix
            ids = []
            for n in range(2):  # each its own prompt: not served from the backend's cache
                async with http.post(f"{prefix}/jobs", json={
                        "workflow": "simulated_work",
                        "params": {"seconds": seconds + n / 1000, "steps": 2}}) as response:
                    ids.append(uuid.UUID((await response.json())["id"]))

            async def statuses() -> list[str | None]:
                return [job.status if (job := await repository.get(i)) else None for i in ids]

            async with asyncio.timeout(15):
                while await statuses() != ["running", "dispatched"]:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)  # polling the database for what dispatch did
            first, event, took = await followed_to_its_end(
                http, f"{prefix}/jobs/{ids[1]}/events", {})
    assert (first["data"]["status"], event["event"]) == ("dispatched", "succeeded")
    eta = first["data"]["eta_seconds"]
    assert abs(took - eta) <= 0.5 + 0.15 * eta, (eta, took)


def test_a_listener_behind_on_previews_still_learns_that_its_job_changed() -> None:
    """A listener's queue is bounded: when it is full the oldest goes, but never the notice
    that the job changed: a job's stream re-reads its job on nothing else (api/events.py)."""
    notices = JobNotices()
    job_id = uuid.uuid4()
    queue = notices.listen(job_id)
    notices.changed(job_id)
    for _ in range(QUEUE_SIZE * 2):  # a slow reader: more previews than the queue holds
        notices.preview(job_id, PreviewImage("3", "image/jpeg", b"\xff\xd8"))
    kept = [queue.get_nowait() for _ in range(queue.qsize())]
    assert len(kept) == QUEUE_SIZE and None in kept
