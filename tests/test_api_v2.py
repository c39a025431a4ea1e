"""The Comfy API v2, driven by Comfy's official SDK (comfy-sdk from PyPI) over real sockets:
the service in-process on its own database and local storage, two `comfyfleet sim` backends
in their own process."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import asyncpg
import pytest
from comfy_low.errors import ApiError
from comfy_low.transport import AsyncComfyLow
from comfy_sdk import (
    AsyncComfy,
    Comfy,
    ComfyError,
    Log,
    OutputReady,
    Preview,
    Progress,
    StatusChange,
)
from comfy_sdk.exceptions import JobFailed, NotFound, Unauthorized
from fastapi.dependencies.utils import solve_dependencies
from PIL import Image
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comfyfleet import sql
from comfyfleet.api.v2 import V2Routes
from comfyfleet.app import serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.db import driver_connection
from comfyfleet.settings import Settings
from tests.support import (
    COLOR,
    LOOPBACK,
    free_ports,
    png,
    python_process,
    serve_replicas,
)
from tests.test_dashboard import api, read_events
from tests.test_security import keys_command

SIM_BACKENDS = 2


def invert(width: int, color: int) -> dict[str, Any]:
    """An API-format graph as ComfyUI's "Export (API)" writes it."""
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": width, "height": 24, "batch_size": 1, "color": color}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": "ComfyUI"}},
    }


def work(seconds: float, steps: int) -> dict[str, Any]:
    return {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SimulatedWork",
              "inputs": {"image": ["1", 0], "seconds": seconds, "steps": steps}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": "work"}},
    }


@pytest.fixture
async def sim_urls() -> AsyncIterator[list[str]]:
    port = free_ports(SIM_BACKENDS)
    urls = [f"http://{LOOPBACK}:{port + i}" for i in range(SIM_BACKENDS)]
    async with python_process(
        "comfyfleet", "sim", "--backends", str(SIM_BACKENDS), "--port", str(port),
        "--duration", "0.2", ready_url=urls[-1] + "/system_stats",
    ):
        yield urls


@asynccontextmanager
async def fleet_service(settings: Settings, sim_urls: list[str]) -> AsyncIterator[str]:
    """The service on the sims; yields its base URL once every backend is connected (their
    /object_info known, so graphs are checked against it)."""
    settings.comfyui_endpoints = [f"{url}#gpu{i}" for i, url in enumerate(sim_urls)]
    async with serving(settings, port=0) as base, aiohttp.ClientSession() as http:
        await until_every_backend_healthy(http, base)
        yield base


async def until_every_backend_healthy(http: aiohttp.ClientSession, base: str) -> None:
    """Once the service at `base` has every backend connected (GET /api/v2/health)."""
    async with asyncio.timeout(30):
        while True:
            async with http.get(f"{base}/api/v2/health") as response:
                health = await response.json()
            if response.status == 200 and all(health["backends"].values()):
                return
            await asyncio.sleep(0.05)  # polling the service: no event to wait on


@pytest.fixture
async def v2(settings: Settings, sim_urls: list[str], monkeypatch: pytest.MonkeyPatch
             ) -> AsyncIterator[str]:
    """The service's base URL, and COMFY_BASE_URL pointing the SDK at it."""
    async with fleet_service(settings, sim_urls) as base:
        monkeypatch.setenv("COMFY_BASE_URL", base)
        yield base


async def backend_of(base: str, job_id: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/api/v1/jobs/{job_id}") as r:
        backend: str = (await r.json())["backend"]
        return backend


async def test_sdk_runs_graphs_on_both_backends_and_downloads_outputs(v2: str) -> None:
    colors = [0x102030 * (i + 1) for i in range(4)]
    async with AsyncComfy() as client:
        jobs = await asyncio.gather(*(
            client.submit(client.workflows.from_json(invert(30 + i, color)))
            for i, color in enumerate(colors)))
        assert {job.status for job in jobs} <= {"queued", "running"}
        for i, job in enumerate(jobs):
            await job.result()
            (output,) = job.get_outputs("3")
            assert (output.type, output.content_type) == ("image", "image/png")
            data = await output.to_bytes()
            assert len(data) == output.size_bytes
            image = Image.open(io.BytesIO(data)).convert("RGB")
            assert image.size == (30 + i, 24)
            inverted = 0xFFFFFF - colors[i]
            assert image.getpixel((0, 0)) == (inverted >> 16, inverted >> 8 & 0xFF,
                                              inverted & 0xFF)
            assert output.job_id == job.id
    assert {await backend_of(v2, job.id) for job in jobs} == {"gpu0", "gpu1"}


async def test_an_outputs_url_expires_when_its_url_expires_at_says(v2: str) -> None:
    """url_expires_at is the expiry of the URL it stands beside (here local storage's signed
    `/files/` link), not a moment computed apart from it."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{v2}/api/v2/jobs", json={"workflow": invert(20, 0x123456)}
                             ) as response:
            job = await response.json()
        async with asyncio.timeout(30):
            while job["status"] != "succeeded":
                await asyncio.sleep(0.02)
                async with http.get(f"{v2}/api/v2/jobs/{job['id']}") as response:
                    job = await response.json()
        (output,) = job["outputs"]
        expires = int(parse_qs(urlsplit(output["url"]).query)["expires"][0])
        assert datetime.fromisoformat(output["url_expires_at"]) == datetime.fromtimestamp(
            expires, UTC)
        async with http.get(output["url"]) as response:
            assert response.status == 200


async def test_a_request_under_api_v2_reaches_the_v2_app_as_through_a_mount() -> None:
    """V2Routes hands the v2 app what a mount at /api/v2 would (its root path, behind the
    server's own too), a status poll without a JSON body to the poll's own app the same way,
    and everything else to the service app."""
    seen: list[tuple[str, str, str]] = []

    def app_named(name: str) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            seen.append((name, scope["path"], scope.get("root_path", "")))
        return app

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    routes = V2Routes(app_named("service"), v2=app_named("v2"), job_poll=app_named("poll"))
    for root_path, path in [("", "/api/v2/jobs/1"), ("/gw", "/gw/api/v2/health"),
                            ("", "/api/v2"), ("", "/api/v2x/jobs"), ("", "/api/v1/jobs"),
                            ("/gw", "/gw/api/v1/jobs")]:
        await routes({"type": "http", "path": path, "root_path": root_path}, receive, send)
    assert seen == [("v2", "/api/v2/jobs/1", "/api/v2"), ("v2", "/gw/api/v2/health", "/gw/api/v2"),
                    ("service", "/api/v2", ""), ("service", "/api/v2x/jobs", ""),
                    ("service", "/api/v1/jobs", ""), ("service", "/gw/api/v1/jobs", "/gw")]
    seen.clear()
    json_body = [(b"content-type", b"Application/JSON; charset=utf-8")]
    for method, root_path, path, headers in [
            ("GET", "", "/api/v2/jobs/1", []), ("GET", "/gw", "/gw/api/v2/jobs/2", []),
            ("GET", "", "/api/v2/jobs/3", [(b"content-type", b"text/plain")]),
            ("GET", "", "/api/v2/jobs/4", json_body), ("HEAD", "", "/api/v2/jobs/5", []),
            ("POST", "", "/api/v2/jobs/6", []), ("GET", "", "/api/v2/jobs/7/events", []),
            ("GET", "", "/api/v2/jobs/", []), ("GET", "", "/api/v2/jobs", [])]:
        await routes({"type": "http", "method": method, "path": path, "root_path": root_path,
                      "headers": headers}, receive, send)
    inner = "/api/v2"
    assert seen == [("poll", "/api/v2/jobs/1", inner), ("poll", "/gw/api/v2/jobs/2", "/gw" + inner),
                    ("poll", "/api/v2/jobs/3", inner), ("v2", "/api/v2/jobs/4", inner),
                    ("v2", "/api/v2/jobs/5", inner), ("v2", "/api/v2/jobs/6", inner),
                    ("v2", "/api/v2/jobs/7/events", inner), ("v2", "/api/v2/jobs/", inner),
                    ("v2", "/api/v2/jobs", inner)]


async def test_the_readme_lines_run_a_workflow_file(v2: str, tmp_path: Path) -> None:
    """docs/api.md, "Using Comfy's SDK with comfyfleet": the synchronous client, as written."""
    (tmp_path / "workflow_api.json").write_text(json.dumps(invert(12, 0)))

    def readme() -> None:
        client = Comfy()
        client.run(client.workflows.from_file(tmp_path / "workflow_api.json")
                   ).get_outputs("3")[0].to_file(tmp_path / "out.png")
        client.close()

    await asyncio.to_thread(readme)
    with Image.open(tmp_path / "out.png") as image:
        assert image.size == (12, 24)


async def test_events_show_rising_progress_and_end_succeeded(v2: str) -> None:
    async with AsyncComfy() as client:
        job = await client.submit(client.workflows.from_json(work(seconds=2.0, steps=8)))
        values: list[float] = []
        statuses: list[str] = []
        async with asyncio.timeout(30):
            async for event in job.events():
                if isinstance(event, Progress):
                    values.append(event.value)
                elif isinstance(event, StatusChange):
                    statuses.append(event.status)
        assert statuses[-1] == "succeeded"
        assert "running" in statuses
        assert values == sorted(values)
        assert len({value for value in values if 0 < value < 1}) >= 2, values
        await job.refresh()
        assert job.status == "succeeded"
        assert job._model.progress is not None and job._model.progress.value == 1.0


async def test_progress_names_the_node_running_and_its_step(v2: str) -> None:
    """From ComfyUI's `executing` and `progress` events, in the stream and in the job read
    back while it runs (what any process answers, not only the one following the job)."""
    async with AsyncComfy() as client:
        job = await client.submit(client.workflows.from_json(work(seconds=3.0, steps=6)))
        stepped: list[Progress] = []
        polled = None
        async with asyncio.timeout(30):
            async for event in job.events():
                if isinstance(event, Progress) and event.steps is not None:
                    stepped.append(event)
                    if polled is None:
                        await job.refresh()
                        polled = job._model.progress
        assert stepped, "no progress event named a step"
        assert {(e.current_node, e.steps) for e in stepped} == {("2", 6)}
        steps = [e.step or 0 for e in stepped]
        assert steps == sorted(steps)
        assert all(e.message == f"SimulatedWork {e.step}/6" for e in stepped)
        assert polled is not None and polled.current_node_class == "SimulatedWork"
        assert (polled.current_node, polled.steps) == ("2", 6)
        await job.refresh()
        assert job._model.progress is not None
        assert (job._model.progress.current_node, job._model.progress.step) == (None, None)


async def test_an_output_is_on_the_job_as_soon_as_its_node_reports_it(v2: str) -> None:
    """Node 2 saves its image before node 3 works for seconds: its output is stored, on the
    job and in the stream while the job still runs, and keeps its id at the end."""
    graph = {
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                    "filename_prefix": "early"}},
        "3": {"class_type": "SimulatedWork",
              "inputs": {"image": ["1", 0], "seconds": 3.0, "steps": 3}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0],
                                                    "filename_prefix": "late"}},
    }
    async with AsyncComfy() as client:
        job = await client.submit(client.workflows.from_json(graph))
        seen: list[tuple[str, str, str]] = []  # (node, output id, job status then)
        status = "queued"
        async with asyncio.timeout(30):
            async for event in job.events():
                if isinstance(event, StatusChange):
                    status = event.status
                elif isinstance(event, OutputReady):
                    seen.append((event.output.node_id, event.output.id, status))
                    if event.output.node_id == "2":
                        await job.refresh()
                        assert job.status == "running"
                        assert [o.node_id for o in job._model.outputs] == ["2"]
        assert [(node, then) for node, _, then in seen] == [("2", "running"), ("4", "running")]
        await job.refresh()
        assert [(o.node_id, o.id) for o in job._model.outputs] == [
            (node, output_id) for node, output_id, _ in seen]
        (early,) = job.get_outputs("2")
        image = Image.open(io.BytesIO(await early.to_bytes())).convert("RGB")
        assert image.size == (8, 8)


async def test_a_stream_opened_later_starts_with_the_latest_preview(v2: str) -> None:
    """Node 2 sends the job's only preview; a stream opened while node 3 works (no previews)
    gets it on connect, as the contract says."""
    graph = work(seconds=0.2, steps=1)
    graph["4"] = {"class_type": "SimulatedWork", "inputs": {
        "image": ["2", 0], "seconds": 30.0, "steps": 30, "preview": False}}
    graph["3"]["inputs"]["images"] = ["4", 0]
    async with AsyncComfy() as client:
        job = await client.submit(client.workflows.from_json(graph))
        async with asyncio.timeout(30):
            async for event in job.events():
                if isinstance(event, Preview):
                    break
            later: list[Any] = []
            async for event in job.events():
                later.append(event)
                if isinstance(event, Preview) or (
                        isinstance(event, Progress) and (event.step or 0) >= 2):
                    break
        await job.cancel()
    assert isinstance(later[-1], Preview), later
    assert (later[-1].node_id, later[-1].content_type) == ("2", "image/png")


async def test_cancel_a_running_job(v2: str) -> None:
    async with AsyncComfy() as client:
        job = await client.submit(client.workflows.from_json(work(seconds=60.0, steps=60)))
        async with asyncio.timeout(30):
            async for event in job.events():
                if isinstance(event, StatusChange) and event.status == "running":
                    break
        await job.cancel()
        assert job.status == "canceled"
        await job.wait(timeout=10)
        assert job.status == "canceled"
        assert job.error is not None and job.error.code == "canceled"


async def test_events_read_a_job_only_when_something_changed(settings: Settings) -> None:
    """An open stream of a queued job whose position cannot move reads the job no more: the
    stream used to read it every second (REREAD_SECONDS), busy or not. Seen from PostgreSQL: the
    jobs table locked, the stream's connection does not come to wait for the lock in three
    such seconds."""
    async with serving(settings, port=0) as base, aiohttp.ClientSession() as http:  # no backend
        job = (await api(http, "POST", f"{base}/api/v1/jobs", status=202,
                         body={"workflow": "invert", "params": {"width": 16}}))["id"]
        # Stored first in line, its first position is 1 unread: the stream's is counted.
        await api(http, "GET", f"{base}/api/v1/jobs/{job}")
        db = await asyncpg.connect(
            (settings.database_url or "").replace("postgresql+asyncpg://", "postgresql://"))
        try:
            async with http.get(f"{base}/api/v2/jobs/{job}/events") as response:
                statuses = read_events(response, "status")
                async with asyncio.timeout(20):
                    assert await anext(statuses) == {"status": "queued", "queue_position": 1}
                # The connection the stream read the job's position on (the service's
                # reads share a pool that this test leaves to the stream).
                reader = {row["pid"] for row in await db.fetch(
                    "SELECT pid FROM pg_stat_activity WHERE query LIKE '-- Where queued job%'")}
                assert reader
                async with db.transaction():
                    await db.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
                    # A window of three times the old interval.
                    deadline = asyncio.get_running_loop().time() + 3.0
                    while asyncio.get_running_loop().time() < deadline:
                        assert not await lock_waiters(db) & reader
                        await asyncio.sleep(0.05)
                await api(http, "POST", f"{base}/api/v2/jobs/{job}/cancel")
                async with asyncio.timeout(20):
                    assert await anext(statuses) == {"status": "canceled",
                                                     "queue_position": None}
        finally:
            await db.close()


@pytest.mark.parametrize(("path", "first"), [("/api/v2/jobs/{}/events", "status"),
                                             ("/api/v1/jobs/{}/events", "state")])
async def test_events_read_again_only_what_a_change_touches(
    settings: Settings, path: str, first: str
) -> None:
    """On a change a stream reads its job's changing columns again, not its prompt (tens of
    KB of JSON to decode at every change). Seen from PostgreSQL: with the jobs table locked,
    the statement the stream waits in after a change told by another process (peers.py) is
    `job_changes`, not the whole job's read."""
    async with serving(settings, port=0) as base, aiohttp.ClientSession() as http:  # no backend
        job = (await api(http, "POST", f"{base}/api/v1/jobs", status=202,
                         body={"workflow": "invert", "params": {"width": 16}}))["id"]
        url = (settings.database_url or "").replace("postgresql+asyncpg://", "postgresql://")
        db, locker = await asyncpg.connect(url), await asyncpg.connect(url)
        try:
            async with http.get(base + path.format(job)) as response:
                async with asyncio.timeout(20):
                    assert (await anext(read_events(response, first)))["status"] == "queued"
                async with locker.transaction():
                    await locker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
                    # Another process's id: every stream of this one reads its job again.
                    await db.execute("SELECT pg_notify('comfyfleet_jobs', '987654')")
                    assert await first_lines_waiting(db) == [
                        "-- The columns of the job $1 that its changes touch (those jobs.sql's "
                        "changes return), if it"]
                await api(http, "POST", f"{base}/api/v2/jobs/{job}/cancel")
                ended = ""
                async with asyncio.timeout(20):
                    async for raw in response.content:  # until the stream ends
                        if raw.decode().startswith("event: "):
                            ended = raw.decode().strip()
                assert ended in ("event: status", "event: cancelled")
        finally:
            await db.close()
            await locker.close()


async def test_a_poll_reads_the_prompts_node_ids_not_the_prompt(settings: Settings) -> None:
    """A status poll reads every column of its job but the prompt (tens of KB of JSON to
    decode at every poll, and a v2 job object shows only how many nodes it has): seen from
    PostgreSQL, with the jobs table locked, the statement the poll waits in is `job_shown`,
    not the whole job's read; and the job it answers counts the graph's nodes, whose
    workflow is still the whole graph."""
    graph = invert(8, 1) | {str(node): {"class_type": "ImageInvert",
                                          "inputs": {"image": ["1", 0]}}
                            for node in range(10, 50)}
    async with serving(settings, port=0) as base, aiohttp.ClientSession() as http:  # no backend
        job = (await api(http, "POST", f"{base}/api/v2/jobs", status=201,
                         body={"workflow": graph}))["id"]
        url = (settings.database_url or "").replace("postgresql+asyncpg://", "postgresql://")
        db, locker = await asyncpg.connect(url), await asyncpg.connect(url)
        try:
            async with locker.transaction():
                await locker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
                poll = asyncio.ensure_future(api(http, "GET", f"{base}/api/v2/jobs/{job}"))
                assert await first_lines_waiting(db) == [
                    "-- The job with id $1 as a Comfy API v2 poll shows it, if any: every "
                    "column but its prompt,"]
            async with asyncio.timeout(20):
                polled = await poll
        finally:
            await db.close()
            await locker.close()
        assert polled["status"] == "queued"
        assert polled["progress"]["nodes_total"] == len(graph)
        assert (await api(http, "GET", f"{base}/api/v2/jobs/{job}/workflow"))["workflow"] \
            == graph


async def lock_waiters(db: asyncpg.Connection) -> set[int]:
    """The processes waiting for a lock on the jobs table."""
    return {row["pid"] for row in await db.fetch(
        "SELECT pid FROM pg_locks WHERE NOT granted AND relation = 'jobs'::regclass")}


async def first_lines_waiting(db: asyncpg.Connection) -> list[str]:
    """The first line of each statement waiting for a lock, once one is (within 20 s)."""
    waiting: list[str] = []
    async with asyncio.timeout(20):
        while not waiting:
            waiting = [row["query"] for row in await db.fetch(
                "SELECT query FROM pg_stat_activity WHERE pid = ANY($1)",
                list(await lock_waiters(db)))]
            await asyncio.sleep(0.05)
    return [query.split("\n", 1)[0] for query in waiting]


async def test_events_follow_a_job_changed_through_another_replica_at_once(
    settings: Settings, data_root: Path
) -> None:
    """The events of a job queued on replica B, which reads its job only when told that
    something changed: its position moves when the job ahead is cancelled (any job's change
    wakes a queued job's stream), and its own cancel through replica A is told at once by A's
    notice on `comfyfleet_jobs`."""
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        # No backend: the jobs stay queued until cancelled.
        through_a, through_b = await serve_replicas(stack, settings, data_root)
        ahead, job = [(await api(http, "POST", f"{through_b}/api/v1/jobs", status=202,
                                 body={"workflow": "invert", "params": {"width": 16}}))["id"]
                      for _ in range(2)]
        async with http.get(f"{through_b}/api/v2/jobs/{job}/events") as response:
            assert response.status == 200
            statuses = read_events(response, "status")
            async with asyncio.timeout(20):
                assert await anext(statuses) == {"status": "queued", "queue_position": 2}
                # Through B, so that A has told nothing before the cancel below (it tells at
                # most once a second).
                await api(http, "POST", f"{through_b}/api/v1/jobs/{ahead}/cancel")
                assert await anext(statuses) == {"status": "queued", "queue_position": 1}
                cancelled = asyncio.get_running_loop().time()
                await api(http, "POST", f"{through_a}/api/v2/jobs/{job}/cancel")
                told = await anext(statuses)
                waited = asyncio.get_running_loop().time() - cancelled
    assert told == {"status": "canceled", "queue_position": None}
    assert waited < 0.5, waited


async def test_the_replica_that_ended_a_job_answers_its_poll_without_reading_it(
    settings: Settings, sim_urls: list[str], data_root: Path, engine: AsyncEngine
) -> None:
    """A status poll's last read, the one that sees the job ended, is not made by the replica
    whose statement ended it: with the jobs table locked, that replica answers the poll at once
    while the other waits to read the job; and both answer the same job object."""
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        bases = await serve_replicas(stack, settings, data_root,
                                     COMFYUI_ENDPOINTS=",".join(sim_urls))
        for base in bases:
            await until_every_backend_healthy(http, base)
        async with asyncio.timeout(30):
            job = await api(http, "POST", f"{bases[0]}/api/v2/jobs", status=201,
                            body={"workflow": invert(8, 1)})
            while job["status"] != "succeeded":
                await asyncio.sleep(0.05)
                job = await api(http, "GET", f"{bases[0]}/api/v2/jobs/{job['id']}")

        async def poll(base: str) -> dict[str, Any] | None:
            """The job as `base` answers it; None when it does not within a second."""
            try:
                async with http.get(f"{base}/api/v2/jobs/{job['id']}",
                                    timeout=aiohttp.ClientTimeout(total=1)) as response:
                    assert response.status == 200
                    polled: dict[str, Any] = await response.json()
            except TimeoutError:
                return None
            # An output's URL is the replica's own, and signed for the second it is asked in.
            for output in polled["outputs"]:
                output["url"] = output["url"].removeprefix(base).partition("?")[0]
                output.pop("url_expires_at")
            return polled

        async with driver_connection(engine) as locker, locker.transaction():
            await locker.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
            answered = await asyncio.gather(*(poll(base) for base in bases))
        ended_it = [index for index, polled in enumerate(answered) if polled is not None]
        assert len(ended_it) == 1, answered
        read = await poll(bases[1 - ended_it[0]])
        assert read is not None and read["status"] == "succeeded"
        assert answered[ended_it[0]] == read


async def test_a_poll_while_the_jobs_end_is_written_answers_that_end(
    settings: Settings, sim_urls: list[str], engine: AsyncEngine
) -> None:
    """A status poll that comes while the service is writing the job's end waits for that
    write and answers the job ended, not the job as it was before (which would send its
    client back for another poll a poll's period later). The end is held up by a lock on the
    tenants' shares, which, once the job is on its backend (its claim charged it), only the
    job's end writes (it settles the charge)."""
    async with fleet_service(settings, sim_urls) as base, aiohttp.ClientSession() as http:
        job = await api(http, "POST", f"{base}/api/v2/jobs", status=201,
                        body={"workflow": invert(8, 2)})
        as_stored = f"{base}{settings.route_prefix}/jobs/{job['id']}"
        async with asyncio.timeout(30):
            # Polling the service: the claim (a pass of the dispatcher's) tells nobody here.
            while (await api(http, "GET", as_stored))["status"] == "queued":  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        async with driver_connection(engine) as locker:
            holding = locker.transaction()
            await holding.start()
            try:
                await locker.execute("LOCK TABLE tenant_shares IN EXCLUSIVE MODE")
                async with asyncio.timeout(30):
                    # Polling PostgreSQL: no event tells of a statement waiting for a lock.
                    while not await locker.fetchval(  # noqa: ASYNC110
                            "SELECT count(*) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND wait_event_type = 'Lock'"):
                        await asyncio.sleep(0.01)
                polled = asyncio.ensure_future(
                    api(http, "GET", f"{base}/api/v2/jobs/{job['id']}"))
                await asyncio.sleep(0.1)
                assert not polled.done()
            finally:
                await holding.rollback()
        assert (await polled)["status"] == "succeeded"


async def rows_holding(engine: AsyncEngine, secret: str) -> list[str]:
    """The tables of the test's database with a row whose text holds `secret`."""
    found = []
    async with engine.connect() as connection:
        tables = (await connection.execute(text(
            "SELECT schemaname, tablename FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"))).all()
        for schema, table in tables:
            count = (await connection.execute(text(
                f'SELECT count(*) FROM "{schema}"."{table}" AS row WHERE row::text LIKE :like'),
                {"like": f"%{secret}%"})).scalar_one()
            if count:
                found.append(f"{schema}.{table}")
    assert tables
    return found


async def test_the_partner_key_reaches_the_backend_with_the_prompt_and_is_stored_nowhere(
    v2: str, sim_urls: list[str], engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """The SDK's `api_key` (extra_data.api_key_comfy_org) is in the prompt ComfyUI runs, and
    in no row, answer or log line of the gateway's."""
    caplog.set_level(logging.INFO)
    partner_key = f"partner-{uuid.uuid4().hex}"
    async with AsyncComfy() as client, aiohttp.ClientSession() as http:
        job = await client.submit(client.workflows.from_json(work(seconds=60.0, steps=60)),
                                  api_key=partner_key)
        async with asyncio.timeout(30):
            async for event in job.events():
                if isinstance(event, StatusChange) and event.status == "running":
                    break
        async with http.get(f"{v2}/api/v1/jobs/{job.id}") as response:
            ours = await response.json()
        sim = sim_urls[int(ours["backend"].removeprefix("gpu"))]
        async with http.get(f"{sim}/queue") as response:
            (running,) = (await response.json())["queue_running"]
        answers = [json.dumps(ours)]
        for path in ("", "/workflow"):
            async with http.get(f"{v2}/api/v2/jobs/{job.id}{path}") as response:
                answers.append(await response.text())
        await job.cancel()
        await job.wait(timeout=10)
    assert running[1] == ours["prompt_id"]
    assert running[3]["api_key_comfy_org"] == partner_key
    assert not [answer for answer in answers if partner_key in answer]
    assert await rows_holding(engine, partner_key) == []
    assert job.id in caplog.text  # the gateway's log lines about the job were read
    assert partner_key not in caplog.text


async def test_extra_data_is_the_contracts_closed_object(v2: str) -> None:
    """Only `api_key_comfy_org`, a string; nothing the contract does not name is forwarded."""
    graph = invert(8, 0)
    async with aiohttp.ClientSession() as http:
        for extra_data in ({}, {"api_key_comfy_org": 7}, {"api_key_comfy_org": None},
                           {"api_key_comfy_org": "k", "extra_pnginfo": {}}, "k"):
            async with http.post(f"{v2}/api/v2/jobs",
                                 json={"workflow": graph, "extra_data": extra_data}) as response:
                body = await response.json()
            assert response.status == 422, (extra_data, body)
            assert body["error"]["code"] == "invalid_request"
            assert "extra_data" in body["error"]["message"]
        async with http.post(f"{v2}/api/v2/jobs", json={
                "workflow": graph, "extra_data": {"api_key_comfy_org": "k"}}) as response:
            assert response.status == 201, await response.text()


async def test_invalid_and_ui_format_graphs_are_422_with_node_details(v2: str) -> None:
    broken = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1}},
        "2": {"class_type": "NoSuchNode", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["9", 0],
                                                    "filename_prefix": "x"}},
        "4": {"class_type": "ImageInvert", "inputs": {"image": ["1", 5]}},
    }
    ui_export = {"last_node_id": 3, "last_link_id": 2, "nodes": [{"id": 1}], "links": []}
    async with AsyncComfyLow(v2, None) as low:
        with pytest.raises(ApiError) as invalid:
            await low.post_jobs(broken)
        with pytest.raises(ApiError) as ui:
            await low.post_jobs(ui_export)
        with pytest.raises(ApiError) as no_output:
            await low.post_jobs({"1": invert(8, 0)["1"]})
    assert (invalid.value.http_status, invalid.value.code) == (422, "invalid_workflow")
    assert invalid.value.details is not None and no_output.value.details is not None
    node_errors = invalid.value.details["node_errors"]
    assert {(node, p["field"], p["reason"]) for node, problems in node_errors.items()
            for p in problems} == {
        ("1", "color", "missing_input"),
        ("2", "class_type", "unknown_class"),
        ("3", "images", "bad_link"),
        ("4", "image", "bad_link"),
    }
    assert (ui.value.http_status, ui.value.code) == (422, "workflow_format_ui")
    assert "Export (API)" in ui.value.message
    assert no_output.value.code == "invalid_workflow"
    assert no_output.value.details["reason"] == "prompt_no_outputs"


async def test_labels_outside_the_contract_are_refused_before_the_graph(v2: str) -> None:
    """The intake's label rules (comfy-sdk's): at most 16, keys of 1 to 40 safe characters,
    values strings of at most 256 bytes without control characters; refused as
    metadata_invalid naming the key, even when the graph is bad too, and no job is made."""
    refused: list[tuple[dict[str, Any], str | None]] = [
        ({"bad key": "x"}, "bad key"), ({"": "x"}, ""), ({"k" * 41: "x"}, "k" * 41),
        ({"n": 1}, "n"), ({"bell": "a\u0007"}, "bell"), ({"rtl": "a\u202eb"}, "rtl"),
        ({"long": "\u00e9" * 129}, "long"), ({f"k{i}": "v" for i in range(17)}, None),
    ]
    async with aiohttp.ClientSession() as http:
        for metadata, key in refused:
            for graph in (invert(20, 1), {"1": {"class_type": "NoSuchNode", "inputs": {}}}):
                async with http.post(f"{v2}/api/v2/jobs",
                                     json={"workflow": graph, "metadata": metadata}) as response:
                    assert response.status == 422, metadata
                    error = (await response.json())["error"]
                assert error["code"] == "metadata_invalid", metadata
                assert error["details"] == (None if key is None else {"key": key})
        async with http.get(f"{v2}/api/v2/jobs") as response:
            assert (await response.json())["jobs"] == []
        at_the_limits = {f"k{i}": "v" for i in range(15)}
        at_the_limits["a-Z_0.9" * 5 + "xxxxx"] = "\u00e9" * 128  # a 40-character key, 256 bytes
        async with http.post(f"{v2}/api/v2/jobs",
                             json={"workflow": invert(20, 1), "metadata": at_the_limits}
                             ) as response:
            assert response.status == 201
            assert (await response.json())["metadata"] == at_the_limits


async def test_idempotent_submit_replays_and_refuses_another_body(
    v2: str, engine: AsyncEngine
) -> None:
    key = str(uuid.uuid4())
    async with AsyncComfy() as client:
        first = await client.submit(client.workflows.from_json(invert(20, 1)),
                                    idempotency_key=key, metadata={"batch": "b1"})
        again = await client.submit(client.workflows.from_json(invert(20, 1)),
                                    idempotency_key=key, metadata={"batch": "b1"})
        assert again.id == first.id
        with pytest.raises(ComfyError) as reuse:
            await client.submit(client.workflows.from_json(invert(21, 1)),
                                idempotency_key=key, metadata={"batch": "b1"})
        assert (reuse.value.http_status, reuse.value.code) == (422, "idempotency_key_reuse")
        await again.result()
        assert again.metadata == {"batch": "b1"}
        workflow = await again.get_workflow()
        assert (workflow.format, workflow.graph) == ("api", invert(20, 1))
        other = await client.submit(client.workflows.from_json(invert(22, 1)))
        listed = [summary.id async for summary in client.list_jobs(metadata={"batch": "b1"})]
        assert listed == [first.id]
        await other.result()
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{v2}/api/v2/jobs", json={"workflow": invert(20, 1)},
                             headers={"Idempotency-Key": key}) as response:
            assert response.status == 422  # the same key without the labels: another body
        async with http.post(f"{v2}/api/v2/jobs",
                             json={"workflow": invert(20, 1), "metadata": {"batch": "b1"}},
                             headers={"Idempotency-Key": key}) as response:
            assert response.status == 201
            assert response.headers["Idempotency-Replayed"] == "true"
            assert (await response.json())["id"] == first.id
        # A key holds for 24 hours; then it is free for a new job.
        async with engine.begin() as connection:
            await connection.execute(text(
                "UPDATE jobs SET created_at = created_at - interval '25 hours'"))
        async with http.post(f"{v2}/api/v2/jobs", json={"workflow": invert(23, 1)},
                             headers={"Idempotency-Key": key}) as response:
            assert response.status == 201
            assert "Idempotency-Replayed" not in response.headers
            renewed = (await response.json())["id"]
            assert renewed != first.id
        async with http.post(f"{v2}/api/v2/jobs", json={"workflow": invert(23, 1)},
                             headers={"Idempotency-Key": key}) as response:
            assert response.headers["Idempotency-Replayed"] == "true"
            assert (await response.json())["id"] == renewed


async def test_api_keys_are_bearer_tokens_and_errors_use_the_envelope(
    settings: Settings, sim_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.api_keys = ["v2-key"]
    async with fleet_service(settings, sim_urls) as base:
        monkeypatch.setenv("COMFY_BASE_URL", base)
        async with AsyncComfy(api_key="v2-key") as client:
            job = await client.run(client.workflows.from_json(invert(10, 2)))
            assert job.status == "succeeded"
            # Another key's job is as absent as a missing one.
        async with AsyncComfy(api_key="wrong") as stranger:
            with pytest.raises(Unauthorized):
                await stranger.jobs.get(job.id)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/api/v2/jobs/{job.id}") as response:
                assert response.status == 401
                error = (await response.json())["error"]
                assert error["code"] == "unauthorized"
            headers = {"Authorization": "Bearer v2-key"}
            async with http.get(f"{base}/api/v2/jobs/{uuid.uuid4()}",
                                headers=headers) as response:
                assert response.status == 404
                assert (await response.json())["error"]["code"] == "not_found"
            async with http.post(f"{base}/api/v2/jobs", json={"workflow": invert(8, 0),
                                                              "webhook_url": "http://x"},
                                 headers=headers) as response:
                assert response.status == 422
                assert (await response.json())["error"]["code"] == "invalid_request"
            async with http.get(f"{base}/api/v2/health") as response:
                assert response.status == 200  # open, like /healthz


async def test_a_status_poll_answers_as_the_v2_apps_route(
    settings: Settings, sim_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GET /api/v2/jobs/{id} is answered past the v2 app (JobPoll) unless it has a JSON body
    for the app to check: with a JSON content type it takes the route. Both answer alike, in
    the same bytes, a job and every error the poll can meet."""
    settings.api_keys = ["v2-key"]
    async with fleet_service(settings, sim_urls) as base:
        monkeypatch.setenv("COMFY_BASE_URL", base)
        async with AsyncComfy(api_key="v2-key") as client:
            job = await client.run(client.workflows.from_json(invert(10, 3)))
        key = {"Authorization": "Bearer v2-key"}
        json_body = {"Content-Type": "application/json"}
        cases = [(job.id, key), (job.id, {"Authorization": "bearer   v2-key "}),
                 (job.id, {}), (job.id, {"Authorization": "Bearer wrong"}),
                 (job.id, {"Authorization": "Basic djI="}), (str(uuid.uuid4()), key),
                 ("not-a-uuid", key), ("%20", key)]

        async def answer(http: aiohttp.ClientSession, job_id: str,
                         headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
            async with http.get(f"{base}/api/v2/jobs/{job_id}", headers=headers) as response:
                kept = sorted((name.lower(), value) for name, value in response.headers.items()
                              if name.lower() not in ("date", "server"))
                return response.status, kept, await response.read()

        async with aiohttp.ClientSession() as http:
            statuses = []
            for job_id, headers in cases:
                polled = await answer(http, job_id, headers)
                routed = await answer(http, job_id, {**headers, **json_body})
                # An output's local URL is signed for the second it is asked in.
                assert routed in (polled, await answer(http, job_id, headers)), job_id
                statuses.append(polled[0])
        assert statuses == [200, 200, 401, 401, 401, 404, 404, 404]
        assert json.loads(polled[2])["error"]["code"] == "not_found"


Answered = tuple[int, list[tuple[str, str]], bytes]


async def test_a_submit_answers_as_the_v2_apps_route(
    settings: Settings, sim_urls: list[str], engine: AsyncEngine
) -> None:
    """POST /api/v2/jobs with a JSON body and no query is answered past the v2 app's router
    and dependency solving (SubmitRoute); with a query (which the route ignores) it takes the
    route: both answer alike, in the same bytes, a repeat of an idempotency key and every
    error a submit can meet (a body the route would refuse is the route's either way)."""
    settings.api_keys = ["v2-key"]
    settings.max_queued_per_key = 1
    settings.max_concurrent_per_key = 1  # a second job waits in the backlog
    key = {"Authorization": "Bearer v2-key"}
    async with fleet_service(settings, sim_urls) as base, aiohttp.ClientSession() as http:

        async def answer(query: str, body: Any, headers: dict[str, str]) -> Answered:
            async with http.post(f"{base}/api/v2/jobs{query}", json=body,
                                 headers=headers) as response:
                kept = sorted((name.lower(), value) for name, value in response.headers.items()
                              if name.lower() not in ("date", "server"))
                return response.status, kept, await response.read()

        async def alike(body: Any, headers: dict[str, str]) -> Answered:
            fast = await answer("", body, headers)
            routed = await answer("?via=route", body, headers)
            # A finished job's output URL is signed for the second it is asked in.
            assert routed in (fast, await answer("", body, headers)), body
            return fast

        async def reached(job: Answered, *statuses: str) -> None:
            job_id = json.loads(job[2])["id"]
            async with asyncio.timeout(30):
                while True:
                    async with http.get(f"{base}/api/v2/jobs/{job_id}", headers=key) as polled:
                        if (await polled.json())["status"] in statuses:
                            return
                    await asyncio.sleep(0.05)

        # Two new jobs: alike but for what is the job's own.
        once = {**key, "Idempotency-Key": "order-7"}
        new = await answer("", {"workflow": invert(20, 1)}, once)
        # Off the backlog first: the key may have one job queued (max_queued_per_key).
        await reached(new, "succeeded")
        other = await answer("?via=route", {"workflow": invert(20, 2)}, key)
        assert new[0] == other[0] == 201
        assert [name for name, _ in new[1]] == [name for name, _ in other[1]]
        assert sorted(json.loads(new[2])) == sorted(json.loads(other[2]))
        await reached(other, "succeeded")
        broken = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
        ui_export = {"last_node_id": 3, "last_link_id": 2, "nodes": [{"id": 1}], "links": []}
        missing = load_and_invert({"__type": "core/ASSET", "info": {"id": str(uuid.uuid4())}})
        cases: list[tuple[Any, dict[str, str]]] = [
            ({"workflow": invert(20, 1)}, once),  # the repeat: the same job, replayed
            ({"workflow": invert(21, 1)}, once),  # idempotency_key_reuse
            ({"workflow": invert(20, 1)}, {}),
            ({"workflow": invert(20, 1)}, {"Authorization": "Bearer wrong"}),
            ({"workflow": broken}, key), ({"workflow": ui_export}, key),
            ({"workflow": missing}, key),
            ({"workflow": invert(20, 1), "metadata": {"bad key": "x"}}, key),
            ({"workflow": invert(20, 1), "webhook_url": "http://127.0.0.1/hook"}, key),
            # Refused by the route's own reading, either way.
            ([], key), ({"workflow": invert(20, 1), "extra_data": {"other": 1}}, key),
            ({"workflow": invert(20, 1), "metadata": {"text": "\ud800"}}, key),
            ({"workflow": invert(20, 1)}, {**key, "Idempotency-Key": "k" * 256}),
        ]
        answers = [await alike(body, headers) for body, headers in cases]
        # A retry while the first submit under its key is held at its INSERT: 409.
        async with engine.connect() as blocker:
            transaction = await blocker.begin()
            await blocker.execute(text("LOCK TABLE jobs IN EXCLUSIVE MODE"))
            held = {**key, "Idempotency-Key": "order-8"}
            first = asyncio.create_task(answer("", {"workflow": invert(22, 1)}, held))
            await submit_insert_awaits_lock(engine)
            answers.append(await alike({"workflow": invert(22, 1)}, held))
            await transaction.rollback()
        assert (await first)[0] == 201
        await reached(await first, "succeeded")
        # A full backlog: one job running, one waiting.
        running = await answer("", {"workflow": work(seconds=60, steps=6)}, key)
        await reached(running, "running")
        waiting = await answer("", {"workflow": work(seconds=60, steps=6)}, key)
        answers.append(await alike({"workflow": invert(9, 9)}, key))
        for job in (waiting, running):
            async with http.post(f"{base}/api/v2/jobs/{json.loads(job[2])['id']}/cancel",
                                 headers=key) as response:
                assert response.status == 200
    replayed = answers[0]
    assert (replayed[0], dict(replayed[1])["idempotency-replayed"]) == (201, "true")
    assert json.loads(replayed[2])["id"] == json.loads(new[2])["id"]
    assert [status for status, _, _ in answers] == [201, 422, 401, 401, *[422] * 9, 409, 429]
    assert [json.loads(body)["error"]["code"] for _, _, body in answers[1:]] == [
        "idempotency_key_reuse", "unauthorized", "unauthorized", "invalid_workflow",
        "workflow_format_ui", "missing_asset", "metadata_invalid", *["invalid_request"] * 5,
        "idempotency_conflict", "queue_full"]
    assert "retry-after" in dict(answers[-2][1]) and "retry-after" in dict(answers[-1][1])


async def test_a_v2_submit_goes_past_fastapis_dependency_solving(settings: Settings) -> None:
    """What SubmitRoute is for: the submit it answers never reaches FastAPI's
    `solve_dependencies`, which the route's (a query sends it there) goes through."""
    solved: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is solve_dependencies.__code__:
            solved.append(frame.f_code.co_name)

    answered = []
    async with serving(settings, port=0) as base, aiohttp.ClientSession() as http:
        for query in ("", "?via=route"):
            before = sys.getprofile()
            sys.setprofile(profile)  # this thread runs the service too
            try:
                async with http.post(f"{base}/api/v2/jobs{query}",
                                     json={"workflow": invert(8, 1)}) as response:
                    answered.append((response.status, len(solved)))
            finally:
                sys.setprofile(before)
            solved.clear()
    assert answered[0] == (201, 0)
    assert answered[1][0] == 201 and answered[1][1] > 0


def load_and_invert(image: Any) -> dict[str, Any]:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": "loaded"}},
    }


async def test_an_uploaded_asset_feeds_load_image_and_is_deduplicated(v2: str) -> None:
    picture = png(32, 16)
    async with AsyncComfy() as client:
        asset = client.assets.from_bytes(picture, filename="photo.png")
        workflow = client.workflows.from_json(load_and_invert("placeholder.png"))
        workflow.set_input("1", "image", asset)
        job = await client.run(workflow)
        assert asset.created_new is True
        (output,) = job.get_outputs("3")
        image = Image.open(io.BytesIO(await output.to_bytes())).convert("RGB")
        assert image.size == (32, 16)
        assert image.getpixel((0, 0)) == tuple(255 - channel for channel in COLOR)
        # The same bytes again: the SDK finds them by hash, and no bytes move. The same
        # reference is the same asset; under another name a new record over the same blob.
        again = client.assets.from_bytes(picture, filename="photo.png")
        await again.commit()
        assert again.id == asset.id
        renamed = client.assets.from_bytes(picture, filename="copy.png")
        await renamed.commit()
        assert renamed.hash == asset.hash and renamed.id != asset.id
        fetched = await client.assets.get(str(asset.id))
        assert (fetched.hash, fetched.file_path) == (asset.hash, "photo.png")
        # An earlier job's output is an asset too, usable as an input.
        chained = client.workflows.from_json(load_and_invert({
            "__type": "core/ASSET", "info": {"id": output.id}}))
        twice = await client.run(chained)
        (back,) = twice.get_outputs("3")
        image = Image.open(io.BytesIO(await back.to_bytes())).convert("RGB")
        assert image.getpixel((0, 0)) == COLOR


async def test_multipart_uploads_keep_one_blob_and_check_the_declared_hash(
    v2: str, settings: Settings
) -> None:
    picture = png(7, 5)

    def form(expected_hash: str | None = None) -> aiohttp.FormData:
        data = aiohttp.FormData()
        data.add_field("content_type", "image/png")
        data.add_field("file_path", "small.png")
        if expected_hash is not None:
            data.add_field("expected_hash", expected_hash)
        data.add_field("file", picture, filename="small.png", content_type="image/png")
        return data

    async with aiohttp.ClientSession() as http:
        answers = []
        for _ in range(2):
            async with http.post(f"{v2}/api/v2/assets", data=form()) as response:
                answers.append((response.status, await response.json()))
        async with http.post(f"{v2}/api/v2/assets",
                             data=form("blake3:" + "0" * 64)) as response:
            assert response.status == 409
            assert (await response.json())["error"]["code"] == "hash_mismatch"
        (first_status, first), (second_status, second) = answers
        assert (first_status, first["created_new"]) == (201, True)
        assert (second_status, second["created_new"]) == (200, False)
        assert first["hash"] == second["hash"] and first["id"] != second["id"]
        async with http.get(f"{v2}/api/v2/assets/{second['id']}/content",
                            headers={"Range": "bytes=0-7"}) as response:
            assert response.status == 206
            assert await response.read() == picture[:8]
        async with http.head(f"{v2}/api/v2/assets/by-hash/{first['hash']}") as response:
            assert response.status == 200
        async with http.head(f"{v2}/api/v2/assets/by-hash/blake3:{'1' * 64}") as response:
            assert response.status == 404
        missing = {"workflow": load_and_invert(
            {"__type": "core/ASSET", "info": {"id": str(uuid.uuid4())}})}
        async with http.post(f"{v2}/api/v2/jobs", json=missing) as response:
            assert response.status == 422
            assert (await response.json())["error"]["code"] == "missing_asset"
    digest = first["hash"].removeprefix("blake3:")
    blobs = await asyncio.to_thread(lambda: [path for path in settings.data_dir.rglob(digest)
                                             if path.is_file()])
    assert len(blobs) == 1


async def test_a_failed_job_says_why_and_a_full_queue_is_429(
    settings: Settings, sim_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.max_queued_per_key = 1
    settings.max_concurrent_per_key = 1  # a second job waits in the backlog
    async with fleet_service(settings, sim_urls) as base:
        monkeypatch.setenv("COMFY_BASE_URL", base)
        async with AsyncComfy() as client:
            # The backend refuses a file it does not have (LoadImage checks it when queued).
            with pytest.raises(JobFailed) as failed:
                await client.run(client.workflows.from_json(load_and_invert("nowhere.png")))
            assert failed.value.error is not None
            assert failed.value.error.code == "prompt_rejected"
            assert (failed.value.error.node_id, failed.value.error.class_type) == ("1",
                                                                                   "LoadImage")
            assert "nowhere.png" in failed.value.error.message
            long = await client.submit(client.workflows.from_json(work(seconds=60, steps=6)))
            waiting = await client.submit(client.workflows.from_json(work(seconds=60, steps=6)))
            async with aiohttp.ClientSession() as http, http.post(
                    f"{base}/api/v2/jobs", json={"workflow": invert(9, 9)}) as response:
                assert response.status == 429
                assert response.headers["Retry-After"].isdigit()
                assert (await response.json())["error"]["code"] == "queue_full"
            for job in (waiting, long):
                await job.cancel()
                assert job.status == "canceled"


async def test_a_job_whose_asset_bytes_are_gone_fails_with_input_unavailable(
    v2: str, settings: Settings
) -> None:
    """An asset's blob gone from storage (by hand: its record stays) before its job is sent:
    the job fails, never to be claimed again, and the SDK reads why."""
    async with AsyncComfy() as client, aiohttp.ClientSession() as http:
        async def drain(drained: bool) -> None:
            for index in range(SIM_BACKENDS):
                async with http.patch(f"{v2}/api/v1/backends/gpu{index}",
                                      json={"drain": drained}) as response:
                    assert response.status == 200, await response.text()

        asset = client.assets.from_bytes(png(7, 5), filename="gone.png")
        await asset.commit()
        await drain(True)  # the job waits in the backlog while its bytes go
        workflow = client.workflows.from_json(load_and_invert("placeholder.png"))
        workflow.set_input("1", "image", asset)
        job = await client.submit(workflow)
        (blob,) = await asyncio.to_thread(blobs_of, settings, asset.hash)
        await asyncio.to_thread(blob.unlink)
        await drain(False)
        with pytest.raises(JobFailed) as failed:
            async with asyncio.timeout(20):
                await job.result()
        assert failed.value.error is not None
        assert failed.value.error.code == "input_unavailable"
        assert "1.image" in failed.value.error.message


async def test_with_a_backend_not_heard_from_yet_only_the_structure_is_checked(
    settings: Settings, sim_urls: list[str]
) -> None:
    """That backend may have the node class no other one has, as for catalog jobs (with every
    backend known, the same graph is 422 unknown_class: see the test of invalid graphs)."""
    silent = f"http://{LOOPBACK}:{free_ports(1)}#silent"
    custom = {**invert(8, 0), "2": {"class_type": "OnlyOnSilent", "inputs": {"x": ["1", 0]}}}
    settings.comfyui_endpoints = [f"{sim_urls[0]}#gpu0", silent]
    async with serving(settings, port=0) as base, aiohttp.ClientSession() as http:
        async with asyncio.timeout(30):
            while True:
                async with http.get(f"{base}/api/v2/health") as response:
                    if (await response.json())["backends"].get("gpu0"):
                        break
                await asyncio.sleep(0.05)
        async with http.post(f"{base}/api/v2/jobs", json={"workflow": custom}) as response:
            assert response.status == 201
            job = await response.json()
            assert job["status"] == "queued"
        async with http.post(f"{base}/api/v2/jobs",
                             json={"workflow": {"1": {"inputs": {}}}}) as response:
            assert response.status == 422
        async with http.post(f"{base}{job['urls']['cancel']}") as response:
            assert (await response.json())["status"] == "canceled"


def asset_form(picture: bytes, file_path: str) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("content_type", "image/png")
    form.add_field("file_path", file_path)
    form.add_field("file", picture, filename=file_path, content_type="image/png")
    return form


def blobs_of(settings: Settings, tagged_hash: str) -> list[Path]:
    digest = tagged_hash.removeprefix("blake3:")
    return [path for path in settings.data_dir.rglob(digest) if path.is_file()]


async def test_deleting_assets_keeps_shared_bytes_and_what_a_job_needs(
    settings: Settings, sim_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.max_concurrent_per_key = 1  # a second job waits in the backlog
    async with fleet_service(settings, sim_urls) as base:
        monkeypatch.setenv("COMFY_BASE_URL", base)
        async with AsyncComfy() as client:
            await _delete_assets(base, client, settings)


async def _delete_assets(base: str, client: AsyncComfy, settings: Settings) -> None:
    picture = png(9, 9)
    first = client.assets.from_bytes(picture, filename="one.png")
    second = client.assets.from_bytes(picture, filename="two.png")  # the same bytes
    await first.commit()
    await second.commit()
    tagged_hash, first_id, second_id = first.hash, first.id, second.id
    # A job that has not run yet holds the asset it loads.
    long = await client.submit(client.workflows.from_json(work(seconds=60, steps=6)))
    loads = client.workflows.from_json(load_and_invert("placeholder.png"))
    loads.set_input("1", "image", second)
    waiting = await client.submit(loads)
    assert waiting.status == "queued"
    with pytest.raises(ComfyError) as held:
        await second.delete()
    assert (held.value.http_status, held.value.code) == (409, "asset_in_use")
    for job in (waiting, long):
        await job.cancel()
    # One record goes; the other still has its bytes.
    await first.delete()
    with pytest.raises(NotFound):
        await client.assets.get(str(first_id))
    assert len(await asyncio.to_thread(blobs_of, settings, tagged_hash)) == 1
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/api/v2/assets/{second_id}/content") as response:
            assert (response.status, await response.read()) == (200, picture)
        async with http.delete(f"{base}/api/v2/assets/{first_id}") as response:
            assert response.status == 404  # a second delete
            assert (await response.json())["error"]["code"] == "not_found"
    # The last record takes the bytes with it.
    await second.delete()
    assert await asyncio.to_thread(blobs_of, settings, tagged_hash) == []
    # A job's output goes with its job.
    done = await client.run(client.workflows.from_json(invert(8, 3)))
    (output,) = done.get_outputs("3")
    async with aiohttp.ClientSession() as http, http.delete(
            f"{base}/api/v2/assets/{output.id}") as response:
        assert response.status == 409
        assert (await response.json())["error"]["code"] == "asset_in_use"


async def test_an_upload_retried_under_its_idempotency_key_is_the_same_asset(
    v2: str, settings: Settings, engine: AsyncEngine
) -> None:
    key = str(uuid.uuid4())
    picture = png(6, 6)
    async with aiohttp.ClientSession() as http:
        answers = []
        for _ in range(2):
            async with http.post(f"{v2}/api/v2/assets", data=asset_form(picture, "a.png"),
                                 headers={"Idempotency-Key": key}) as response:
                answers.append((response.status, response.headers.get("Idempotency-Replayed"),
                                await response.json()))
        (status, replayed, first), (again_status, again_replayed, again) = answers
        assert (status, replayed, first["created_new"]) == (201, None, True)
        assert (again_status, again_replayed, again["id"]) == (200, "true", first["id"])
        async with http.post(f"{v2}/api/v2/assets", data=asset_form(picture, "b.png"),
                             headers={"Idempotency-Key": key}) as response:
            assert response.status == 422
            assert (await response.json())["error"]["code"] == "idempotency_key_reuse"
        async with http.post(f"{v2}/api/v2/assets",
                             data=asset_form(png(6, 7), "a.png"),
                             headers={"Idempotency-Key": key}) as response:
            assert response.status == 422  # other bytes under the same name
        # Keys hold for 24 hours; then the key is free for another upload.
        async with engine.begin() as connection:
            await connection.execute(text(
                "UPDATE assets SET created_at = created_at - interval '25 hours'"))
        async with http.post(f"{v2}/api/v2/assets", data=asset_form(picture, "b.png"),
                             headers={"Idempotency-Key": key}) as response:
            assert response.status == 200  # a new record over the bytes kept already
            later = await response.json()
            assert later["id"] != first["id"] and later["file_path"] == "b.png"
        async with http.post(f"{v2}/api/v2/assets", data=asset_form(picture, "b.png"),
                             headers={"Idempotency-Key": key}) as response:
            assert (await response.json())["id"] == later["id"]
    assert len(await asyncio.to_thread(blobs_of, settings, first["hash"])) == 1


async def test_a_key_with_a_callback_url_gets_signed_webhooks_of_its_v2_jobs(
    settings: Settings, sim_urls: list[str], monkeypatch: pytest.MonkeyPatch,
    receiver: WebhookReceiver,
) -> None:
    """The contract has no callback field (it refuses `webhook_url`): the key names one
    (`comfyfleet keys create --callback-url`), checked as job callback URLs are."""
    code, _ = await keys_command(settings, "create", "app", "--callback-url", receiver.url)
    assert code == 2  # a loopback address, without ALLOW_PRIVATE_CALLBACKS
    code, key = await keys_command(settings, "create", "app", "--callback-url", receiver.url,
                                   ALLOW_PRIVATE_CALLBACKS="true")
    assert code == 0
    code, listed = await keys_command(settings, "list")
    assert f"callback_url {receiver.url}" in listed
    async with fleet_service(settings, sim_urls) as base:
        monkeypatch.setenv("COMFY_BASE_URL", base)
        async with AsyncComfy(api_key=key.strip()) as client:
            job = await client.run(client.workflows.from_json(invert(10, 4)))
        async with asyncio.timeout(30):
            await receiver.wait_for(1)
    (event,) = receiver.verified
    assert (event["type"], event["data"]["id"]) == ("job.succeeded", job.id)
    assert [output["node_id"] for output in event["data"]["outputs"]] == ["3"]


async def submit_insert_awaits_lock(engine: AsyncEngine) -> None:
    """Returns once a session of the database waits for a lock in a statement storing a job:
    `insert`, or `insert_taken` (a job stored already taken), whose text pg_stat_activity
    shows only as far as its opening comment, not to its INSERT."""
    async with asyncio.timeout(30):
        while True:
            async with engine.connect() as connection:
                waiting = await connection.scalar(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND (strpos(query, 'INSERT INTO jobs') > 0 OR starts_with(query, :taken))"),
                    {"taken": sql.queries("claim")["insert_taken"].splitlines()[0]})
            if waiting:
                return
            await asyncio.sleep(0.02)


async def test_a_retry_while_the_first_submit_is_in_flight_is_409(
    v2: str, engine: AsyncEngine
) -> None:
    """The contract's Stripe semantics: while a submit under a key is being answered (held
    here at its INSERT by a lock on the jobs table), a retry under the key, with the same
    body or another, is 409 idempotency_conflict with Retry-After; once the first has its
    answer, the retry is that answer, replayed."""
    key = str(uuid.uuid4())
    async with AsyncComfy() as client, engine.connect() as blocker:
        transaction = await blocker.begin()
        await blocker.execute(text("LOCK TABLE jobs IN EXCLUSIVE MODE"))
        first = asyncio.create_task(client.submit(client.workflows.from_json(invert(20, 3)),
                                                  idempotency_key=key))
        await submit_insert_awaits_lock(engine)
        for retry in (invert(20, 3), invert(21, 3)):
            with pytest.raises(ComfyError) as conflict:
                async with asyncio.timeout(10):
                    await client.submit(client.workflows.from_json(retry), idempotency_key=key)
            assert (conflict.value.http_status, conflict.value.code) == (409,
                                                                         "idempotency_conflict")
            assert conflict.value.retry_after == 1
        assert not first.done()
        await transaction.rollback()
        job = await first
        again = await client.submit(client.workflows.from_json(invert(20, 3)),
                                    idempotency_key=key)
        assert again.id == job.id
        await again.result()


async def test_an_idempotency_key_is_one_callers_and_one_apis(
    settings: Settings, sim_urls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same key sent by two API keys, and by one API key to v1 (client_task_id) and to
    v2 (Idempotency-Key), names four jobs; within each, a repeat is still the same job."""
    settings.api_keys = ["tenant-a", "tenant-b"]
    key = "order-17"
    async with fleet_service(settings, sim_urls) as base, aiohttp.ClientSession() as http:
        monkeypatch.setenv("COMFY_BASE_URL", base)

        async def v1(tenant: str) -> str:
            async with http.post(f"{base}/api/v1/jobs", json={
                    "workflow": "invert", "params": {"width": 16}, "client_task_id": key},
                    headers={"Authorization": f"Bearer {tenant}"}) as response:
                assert response.status in (200, 202), await response.text()
                job_id: str = (await response.json())["id"]
                return job_id

        async def v2(tenant: str) -> str:
            async with AsyncComfy(api_key=tenant) as client:
                job = await client.submit(client.workflows.from_json(invert(16, 5)),
                                          idempotency_key=key)
                return job.id

        jobs = [await v1("tenant-b"), await v2("tenant-a"), await v2("tenant-b"),
                await v1("tenant-a")]
        assert len(set(jobs)) == 4
        assert [await v1("tenant-b"), await v2("tenant-a"), await v2("tenant-b"),
                await v1("tenant-a")] == jobs


async def test_events_carry_the_log_lines_of_the_execution(v2: str, sim_urls: list[str]) -> None:
    """`log` events, from the prompt's own messages on its backend: its start and how long
    it took, or the exception and its traceback as ComfyUI's console prints them; all
    before the terminal status. (Each prompt is held at the backends' door until its stream
    is open: log lines are told only while they happen.)"""
    async with AsyncComfy() as client, aiohttp.ClientSession() as http:

        async def faults(**changes: Any) -> None:
            for url in sim_urls:
                async with http.post(f"{url}/_sim/faults", json=changes) as response:
                    assert response.status == 200

        logs: dict[str, list[tuple[str, str]]] = {}
        for seconds, fail_rate in ((0.3, 0.0), (0.4, 1.0)):
            await faults(fail_rate=fail_rate, prompt_delay=60)
            job = await client.submit(client.workflows.from_json(work(seconds, steps=2)))
            lines: list[tuple[str, str]] = []
            held = True
            async with asyncio.timeout(30):
                async for event in job.events():
                    if isinstance(event, Log):
                        lines.append((event.level, event.message))
                    elif isinstance(event, StatusChange) and event.status in ("succeeded",
                                                                              "failed"):
                        logs[event.status] = lines
                    if held:  # the stream is open: let the prompt in
                        await faults(prompt_delay=None)
                        held = False
    started, executed = logs["succeeded"]
    assert started[0] == "info" and started[1].startswith("execution started on backend gpu")
    assert executed[0] == "info" and executed[1].startswith("Prompt executed in ")
    failed = logs["failed"]
    assert failed[0][1].startswith("execution started on backend gpu")
    # (where its first node was cached, a line says so)
    assert set(failed[1:-2]) <= {("info", "served from the backend's cache: node 1")}
    (level, exception), (trace_level, trace) = failed[-2:]
    assert (level, trace_level) == ("error", "error")
    assert exception.startswith("!!! Exception during processing !!! CUDA out of memory")
    assert trace.lstrip().startswith('File "') and "OutOfMemoryError" in trace


async def test_an_upload_retried_while_the_first_is_still_arriving_is_409(
    v2: str, engine: AsyncEngine
) -> None:
    """An upload under a key holds it from its first byte: a retry sent while the first
    upload's body is still arriving is 409 idempotency_conflict; once the first is stored,
    the retry is its asset, replayed."""
    key = str(uuid.uuid4())
    picture = png(9, 9)
    multipart = asset_form(picture, "slow.png")()
    body = await multipart.as_bytes()
    rest = asyncio.Event()

    async def slowly() -> AsyncIterator[bytes]:
        yield body[:64]
        await rest.wait()
        yield body[64:]

    async with aiohttp.ClientSession() as http:
        first = asyncio.create_task(http.post(
            f"{v2}/api/v2/assets", data=slowly(),
            headers={"Idempotency-Key": key, "Content-Type": multipart.content_type}))
        async with asyncio.timeout(30):  # until the first upload holds its key
            while True:
                async with engine.connect() as connection:
                    if await connection.scalar(text(
                            "SELECT count(*) FROM idempotency_claims WHERE key = :key"),
                            {"key": key}):
                        break
                await asyncio.sleep(0.02)
        async with http.post(f"{v2}/api/v2/assets", data=asset_form(picture, "slow.png"),
                             headers={"Idempotency-Key": key}) as response:
            assert response.status == 409
            assert response.headers["Retry-After"] == "1"
            assert (await response.json())["error"]["code"] == "idempotency_conflict"
        rest.set()
        async with await first as response:
            assert response.status == 201
            stored = await response.json()
        async with http.post(f"{v2}/api/v2/assets", data=asset_form(picture, "slow.png"),
                             headers={"Idempotency-Key": key}) as response:
            assert (response.status, response.headers.get("Idempotency-Replayed")) == (200,
                                                                                       "true")
            assert (await response.json())["id"] == stored["id"]
