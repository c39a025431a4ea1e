"""The job API around submit: listing with cursors, waiting, idempotency keys, and the
ComfyUI-server request shape."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest
from openapi_spec_validator import validate
from pydantic import BaseModel, TypeAdapter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comfyfleet.api.job_poll import JobPollRoute, job_response
from comfyfleet.api.job_submit import SubmitRoute
from comfyfleet.app import serving
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import asyncpg_statements, wait_for_healthy_backends
from tests.test_recent import waiting_for_a_lock


class Client:
    def __init__(self, http: aiohttp.ClientSession, prefix: str) -> None:
        self.http, self.prefix = http, prefix

    async def call(self, method: str, path: str, body: Any = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.http.request(method, self.prefix + path, json=body,
                                     headers=headers) as response:
            return response.status, await response.json()


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Client]:
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        yield Client(http, base + settings.route_prefix)


async def test_pages_of_jobs_newest_first_with_filters(api: Client) -> None:
    ids = [(await api.call("POST", "/jobs", {"workflow": "invert", "params": {"width": w}}))[1]
           ["id"] for w in range(1, 6)]
    seen, cursor = [], None
    while True:
        status, page = await api.call("GET", "/jobs?limit=2" + (f"&cursor={cursor}"
                                                               if cursor else ""))
        assert status == 200
        assert len(page["jobs"]) <= 2
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    status, queued = await api.call("GET", "/jobs?status=queued&workflow=invert&limit=10")
    assert (status, len(queued["jobs"]), queued["next_cursor"]) == (200, 5, None)
    status, none = await api.call("GET", "/jobs?status=succeeded")
    assert (status, none["jobs"]) == (200, [])
    # A time with no UTC equivalent (year 1 at +14:00), in the form cursors take.
    no_utc = base64.urlsafe_b64encode(f"0001-01-01T00:00:00+14:00|{ids[0]}".encode()).decode()
    for bad in ("/jobs?cursor=bm9wZQ", f"/jobs?cursor={no_utc}", "/jobs?status=sleeping",
                "/jobs?limit=0"):
        status, body = await api.call("GET", bad)
        assert status == 422, bad
        assert body["error"]["type"] in ("invalid_cursor", "invalid_request")


async def test_idempotency_key_returns_the_same_job_and_refuses_a_different_body(
    api: Client,
) -> None:
    request = {"workflow": "invert", "params": {"width": 7}}
    key = {"Idempotency-Key": "order-42"}
    status, first = await api.call("POST", "/jobs", request, key)
    assert status == 202
    status, again = await api.call("POST", "/jobs", request, key)
    assert (status, again["id"]) == (200, first["id"])
    status, body = await api.call("POST", "/jobs", {**request, "params": {"width": 8}}, key)
    assert (status, body["error"]["type"]) == (422, "idempotency_conflict")
    status, body = await api.call("POST", "/jobs", {**request, "client_task_id": "other"}, key)
    assert (status, body["error"]["type"]) == (422, "idempotency_conflict")


async def test_comfyui_server_request_shape(api: Client) -> None:
    status, job = await api.call("POST", "", {
        "service_type": "invert", "client_task_id": "cs-1",
        "client_callback_url": "http://127.0.0.1:9/hook", "params": {"width": 3}})
    assert status == 202
    assert (job["workflow"], job["client_task_id"], job["params"]["width"]) == ("invert",
                                                                                "cs-1", 3)
    assert job["callback_url"] == "http://127.0.0.1:9/hook"
    status, body = await api.call("POST", "", {"service_type": "nope"})
    assert (status, body["error"]["type"]) == (422, "unknown_workflow")


@pytest.mark.parametrize(("duration", "wait", "status"), [(0.2, 20, "succeeded"),
                                                          (30, 1.5, "running")])
async def test_wait_returns_the_ended_job_or_the_job_as_it_is(
    settings: Settings, duration: float, wait: float, status: str
) -> None:
    async with SimulatedComfyUI(duration=duration) as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            # A job queued while its backend still connects would stay queued past the wait.
            await wait_for_healthy_backends(http, base + settings.route_prefix)
            started = time.monotonic()
            async with http.post(f"{base}{settings.route_prefix}/jobs?wait={wait}",
                                 json={"workflow": "invert"}) as response:
                job = await response.json()
            elapsed = time.monotonic() - started
    assert response.status == 202
    assert job["status"] == status
    if status == "succeeded":
        assert job["outputs"] and elapsed < wait
    else:
        assert elapsed >= wait



async def test_each_workflow_has_a_typed_endpoint_in_the_openapi_schema(
    api: Client, settings: Settings
) -> None:
    base = api.prefix.removesuffix(settings.route_prefix)
    async with api.http.get(f"{base}/openapi.json") as response:
        schema = await response.json()
    validate(schema)  # a valid OpenAPI document, workflow paths included
    operation = schema["paths"]["/api/v1/workflows/invert/jobs"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    width = body["properties"]["params"]["properties"]["width"]
    assert width == {"description": "Image width in pixels", "type": "integer",
                     "minimum": 1, "maximum": 16384, "default": 512}
    assert "/api/v1/workflows/simulated_work/jobs" in schema["paths"]
    async with api.http.get(f"{base}/docs") as response:
        assert response.status == 200

    status, job = await api.call("POST", "/workflows/invert/jobs", {"params": {"width": 9}})
    assert (status, job["workflow"], job["params"]["width"]) == (202, "invert", 9)
    status, body = await api.call("POST", "/workflows/invert/jobs", {"params": {"width": -1}})
    assert (status, body["error"]["type"]) == (422, "invalid_params")
    status, body = await api.call("POST", "/workflows/nope/jobs", {"params": {}})
    assert (status, body["error"]["type"]) == (404, "workflow_not_found")


async def test_the_typed_endpoint_takes_json_or_multipart_only(api: Client) -> None:
    """A text/plain or urlencoded body is what a page on another site can send without a
    CORS preflight: refused, as is a body of no stated type."""
    body = b'{"params": {"width": 9}}'
    answers = {}
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        async with api.http.post(f"{api.prefix}/workflows/invert/jobs", data=body,
                                 headers=headers, skip_auto_headers=["Content-Type"]
                                 ) as response:
            answers[content_type] = response.status, (await response.json())["error"]["type"]
    assert set(answers.values()) == {(415, "unsupported_media_type")}, answers
    async with api.http.post(f"{api.prefix}/workflows/invert/jobs", data=body, headers={
            "Content-Type": "application/json; charset=utf-8"}) as response:
        assert response.status == 202
    _, page = await api.call("GET", "/jobs")
    assert len(page["jobs"]) == 1  # only the JSON body made a job


@pytest.mark.parametrize("duration", [0.0, 1.0])  # 0: dispatched to uploading in one write
async def test_a_job_has_the_time_of_each_step_of_its_timeline(
    settings: Settings, duration: float
) -> None:
    async with SimulatedComfyUI(duration=duration) as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            api = Client(http, base + settings.route_prefix)
            await wait_for_healthy_backends(http, api.prefix)
            status, job = await api.call("POST", "/jobs?wait=20", {"workflow": "invert"})
            assert (status, job["status"]) == (202, "succeeded")
            status, job = await api.call("GET", f"/jobs/{job['id']}")
    assert status == 200
    steps = ["created_at", "dispatched_at", "started_at", "uploading_at", "finished_at"]
    times = [datetime.fromisoformat(job[step]) for step in steps]
    assert times == sorted(times), dict(zip(steps, times, strict=True))
    started, uploading = times[2], times[3]
    # Uploading begins when the prompt is done on its backend, not when it starts there.
    assert (uploading - started).total_seconds() >= duration


async def test_a_status_poll_answers_as_the_route(settings: Settings) -> None:
    """GET /api/v1/jobs/{id} is answered past the app's router and dependency solving
    (JobPoll) unless it has a JSON body for the app to check (then it takes the route): both
    answer alike, in the same bytes, a job that ran, a queued one (its place and expected
    end) and every error a poll can meet; an id that is not a UUID in its canonical form goes
    to the route either way."""
    settings.api_keys = ["v1-key"]
    key = {"Authorization": "Bearer v1-key"}
    async with SimulatedComfyUI(duration=0) as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base, aiohttp.ClientSession(headers=key) as http:
            api = Client(http, base + settings.route_prefix)
            await wait_for_healthy_backends(http, api.prefix)
            _, ran = await api.call("POST", "/jobs?wait=20", {"workflow": "invert"})
            assert ran["status"] == "succeeded" and ran["outputs"], ran
    settings.comfyui_endpoints = []  # the next job stays queued
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        prefix = base + settings.route_prefix
        async with http.post(f"{prefix}/jobs", json={"workflow": "invert"},
                             headers=key) as response:
            queued = await response.json()
        assert queued["status"] == "queued"

        async def answer(job_id: str, headers: dict[str, str]
                         ) -> tuple[int, list[tuple[str, str]], bytes]:
            async with http.get(f"{prefix}/jobs/{job_id}", headers=headers) as response:
                kept = sorted((name.lower(), value) for name, value in response.headers.items()
                              if name.lower() not in ("date", "server"))
                return response.status, kept, await response.read()

        cases = [(ran["id"], key), (queued["id"], key), (ran["id"].upper(), key),
                 (ran["id"], {"Authorization": "bearer   v1-key "}), (ran["id"], {}),
                 (ran["id"], {"Authorization": "Bearer wrong"}),
                 (ran["id"], {"Authorization": "Basic djI="}), (str(uuid.uuid4()), key),
                 (ran["id"].replace("-", ""), key), ("not-a-uuid", key), ("%20", key)]
        statuses, bodies = [], []
        for job_id, headers in cases:
            polled = await answer(job_id, headers)
            routed = await answer(job_id, {**headers, "Content-Type": "application/json"})
            # An output's local URL is signed for the second it is asked in.
            assert routed in (polled, await answer(job_id, headers)), job_id
            statuses.append(polled[0])
            bodies.append(json.loads(polled[2]))
    assert statuses == [200, 200, 200, 200, 401, 401, 401, 404, 200, 422, 422]
    assert bodies[0]["status"] == "succeeded" and bodies[0]["outputs"]
    assert (bodies[1]["status"], bodies[1]["queue_position"]) == ("queued", 1)
    assert bodies[2]["id"] == bodies[8]["id"] == ran["id"]
    assert bodies[7]["error"]["type"] == "job_not_found"


async def test_only_a_status_poll_of_a_job_id_goes_past_the_router() -> None:
    """JobPollRoute hands the poll's app a GET of {prefix}/jobs/{id}, the id a UUID in its
    canonical form (the route's parameter), without a JSON body (behind the server's root
    path too), and everything else to the app."""
    seen: list[tuple[str, str]] = []

    def app_named(name: str) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            seen.append((name, scope["path"]))
        return app

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        pass

    routes = JobPollRoute(app_named("app"), jobs="/api/v1/jobs/", poll=app_named("poll"))
    job = str(uuid.uuid4())
    json_body = [(b"content-type", b"Application/JSON; charset=utf-8")]
    cases = [("GET", "", f"/api/v1/jobs/{job}", []), ("GET", "/gw", f"/gw/api/v1/jobs/{job}", []),
             ("GET", "", f"/api/v1/jobs/{job.upper()}", [(b"content-type", b"text/plain")]),
             ("GET", "", f"/api/v1/jobs/{job}", json_body), ("HEAD", "", f"/api/v1/jobs/{job}", []),
             ("DELETE", "", f"/api/v1/jobs/{job}", []),
             ("GET", "", f"/api/v1/jobs/{job}/events", []),
             ("GET", "", f"/api/v1/jobs/{job.replace('-', '')}", []),
             ("GET", "", f"/api/v1/jobs/{{{job}}}", []), ("GET", "", "/api/v1/jobs/", []),
             ("GET", "", "/api/v1/jobs", []), ("GET", "", f"/api/v2/jobs/{job}", []),
             ("GET", "", f"/jobs/{job}", [])]
    for method, root_path, path, headers in cases:
        await routes({"type": "http", "method": method, "path": path, "root_path": root_path,
                      "headers": headers}, receive, send)
    assert [name for name, _ in seen] == ["poll", "poll", "poll"] + ["app"] * 10
    assert [path for _, path in seen] == [path for _, _, path, _ in cases]


def test_a_job_answered_past_the_router_is_in_the_routes_bytes() -> None:
    """`job_response` writes a job as FastAPI writes a route's `dict[str, Any]` (pydantic's
    JSON), whatever its values: numbers of every size and kind, not finite ones, text
    JSON escapes, an integer beyond 64 bits, a key that is not a string."""
    values: list[Any] = [0.0, -0.0, 0.1 + 0.2, 1e-7, 1e16, 1e21, 5e-324, 1.7976931348623157e308,
                         float("nan"), float("-inf"), 2**63 - 1, -2**63, 2**64 - 1, 2**70,
                         "é\u2028\x00\x1f\x7f\"\\/\n\t😀", None, True, [1, {"a": 2.5}]]
    values += [float(f"{digits}e{exponent}") for digits in (1, 17, 123456789, 9007199254740993)
               for exponent in range(-30, 30, 7)]
    rendered = TypeAdapter(dict[str, Any])
    for value in [*values, {1: "key"}, {"big": 2**70, "small": 1e-7}]:
        job = {"id": "x", "params": {"value": value}, "progress": value}
        assert job_response(job, 202).body == rendered.dump_json(job), value


async def test_a_submit_answers_as_the_route(settings: Settings) -> None:
    """POST /api/v1/jobs with a JSON body and no query is answered past the app's router and
    dependency solving (SubmitRoute); with a query (`?wait=0`, the route's default) it takes
    the route: both answer alike, in the same bytes, a repeat of an idempotency key and every
    error a valid body can meet (a body the route would refuse is the route's either way)."""
    settings.api_keys = ["v1-key"]
    key = {"Authorization": "Bearer v1-key"}
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        prefix = base + settings.route_prefix

        async def answer(query: str, body: Any, headers: dict[str, str]
                         ) -> tuple[int, list[tuple[str, str]], bytes]:
            async with http.post(f"{prefix}/jobs{query}", json=body,
                                 headers=headers) as response:
                kept = sorted((name.lower(), value) for name, value in response.headers.items()
                              if name.lower() not in ("date", "server"))
                return response.status, kept, await response.read()

        once = {**key, "Idempotency-Key": "order-7"}
        first = await answer("", {"workflow": "invert"}, once)
        cases: list[tuple[Any, dict[str, str]]] = [
            ({"workflow": "invert"}, once),  # the repeat: the same job, 200
            ({"workflow": "invert", "params": {"width": 9}}, once),  # idempotency_conflict
            ({"workflow": "invert"}, {}), ({"workflow": "invert"}, {"Authorization": "Bearer x"}),
            ({"workflow": "nope"}, key), ({"workflow": "invert", "params": {"width": "x"}}, key),
            ({"workflow": "invert", "priority": 5000}, key), ({"workflow": 7}, key),
            ([], key), ({"workflow": "invert", "params": {"text": "\ud800"}}, key),
            ({"workflow": "invert"}, {**key, "Idempotency-Key": "k" * 201}),
        ]
        statuses, bodies = [], []
        for body, headers in cases:
            fast = await answer("", body, headers)
            routed = await answer("?wait=0", body, headers)
            assert fast == routed, body
            statuses.append(fast[0])
            bodies.append(json.loads(fast[2]))
        submitted = await answer("", {"workflow": "invert", "params": {"width": 3}}, key)
        routed = await answer("?wait=0", {"workflow": "invert", "params": {"width": 3}}, key)
    assert first[0] == 202 and bodies[0]["id"] == json.loads(first[2])["id"]
    assert statuses == [200, 422, 401, 401, 422, 422, 422, 422, 422, 422, 422]
    assert bodies[1]["error"]["type"] == "idempotency_conflict"
    assert [body["error"]["type"] for body in bodies[4:6]] == [
        "unknown_workflow", "invalid_params"]
    # Two new jobs: alike but for what is the job's own.
    new, other = (json.loads(answer[2]) for answer in (submitted, routed))
    own = ("id", "created_at", "queued_at", "links")
    assert submitted[0] == routed[0] == 202
    assert {k: v for k, v in new.items() if k not in own} == \
        {k: v for k, v in other.items() if k not in own}
    assert sorted(new) == sorted(other)


async def test_only_a_submit_the_route_would_take_goes_past_the_router() -> None:
    """SubmitRoute answers a POST of {prefix}/jobs (behind the server's root path too) with an
    `application/json` body the route would take and an Idempotency-Key within its length,
    and hands everything else to the app, with the body it read as it came, in its pieces."""
    seen: list[tuple[str, str, list[Message]]] = []

    class Named(BaseModel):
        name: str

    def app_named(name: str) -> ASGIApp:
        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            messages = [await receive()]
            while messages[-1].get("more_body"):
                messages.append(await receive())
            seen.append((name, scope["path"], messages))
        return app

    async def answer(request: Any, submitted: Named, key: str | None) -> Any:
        seen.append(("submit", f"{submitted.name} {key}", [{"body": await request.body()}]))
        return app_named("response")

    async def send(message: Message) -> None:
        pass

    def receiving(chunks: list[Message]) -> Receive:
        async def receive() -> Message:
            return chunks.pop(0) if chunks else {"type": "http.disconnect"}
        return receive

    routes = SubmitRoute(app_named("app"), jobs="/api/v1/jobs", errors=None,  # type: ignore[arg-type]
                         body=Named, key_length=3, answer=answer)
    json_body = [(b"content-type", b"application/json")]
    cases = [("POST", "", "/api/v1/jobs", b"", json_body, [b'{"name":', b'"a"}']),
             ("POST", "/gw", "/gw/api/v1/jobs", b"", [*json_body, (b"idempotency-key", b"k")],
              [b'{"name":"c"}']),
             ("POST", "", "/api/v1/jobs", b"", json_body, [b'{"name":', b"7}"]),
             ("POST", "", "/api/v1/jobs", b"", json_body, [b'{"name":"\\ud800"}']),
             ("POST", "", "/api/v1/jobs", b"", [*json_body, (b"idempotency-key", b"long")],
              [b'{"name":"c"}']),
             ("POST", "", "/api/v1/jobs", b"", [*json_body, (b"idempotency-key", b"")],
              [b'{"name":"c"}']),
             ("POST", "", "/api/v1/jobs", b"wait=0", json_body, [b"d"]),
             ("POST", "", "/api/v1/jobs", b"", [(b"content-type", b"text/plain")], [b"e"]),
             ("POST", "", "/api/v1/jobs", b"", json_body * 2, [b"f"]),
             ("POST", "", "/api/v1/jobs", b"", [], [b"g"]),
             ("PUT", "", "/api/v1/jobs", b"", json_body, [b"h"]),
             ("POST", "", "/api/v1/jobs/", b"", json_body, [b"i"]),
             ("POST", "", "/api/v1/workflows/invert/jobs", b"", json_body, [b"j"])]
    for method, root_path, path, query, headers, pieces in cases:
        chunks: list[Message] = [
            {"type": "http.request", "body": piece, "more_body": n < len(pieces) - 1}
            for n, piece in enumerate(pieces)]
        await routes({"type": "http", "method": method, "path": path, "root_path": root_path,
                      "query_string": query, "headers": headers}, receiving(chunks), send)
    assert [(name, what) for name, what, _ in seen] == [
        ("submit", "a None"), ("response", "/api/v1/jobs"), ("submit", "c k"),
        ("response", "/gw/api/v1/jobs"), *[("app", "/api/v1/jobs")] * 9,
        ("app", "/api/v1/jobs/"), ("app", "/api/v1/workflows/invert/jobs")]
    assert [b"".join(m.get("body", b"") for m in messages) for name, _, messages in seen
            if name == "app"] == [b'{"name":7}', b'{"name":"\\ud800"}', b'{"name":"c"}',
                                  b'{"name":"c"}', b"d", b"e", b"f", b"g", b"h", b"i", b"j"]
    assert [len(messages) for name, _, messages in seen if name == "app"][:1] == [2]


async def test_polls_of_a_queued_job_share_the_estimates_of_its_eta(settings: Settings) -> None:
    """The run time and the work on the backends an ETA rests on are read once per
    POSITION_MAX_AGE by a serve process, not at each GET of a queued job."""
    async with SimulatedComfyUI(duration=0) as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            api = Client(http, base + settings.route_prefix)
            await wait_for_healthy_backends(http, api.prefix)
            _, ran = await api.call("POST", "/jobs?wait=20", {"workflow": "invert"})
            assert ran["status"] == "succeeded", ran
    settings.comfyui_endpoints = []  # the next job stays queued
    async with asyncpg_statements() as ran, serving(settings) as base, \
            aiohttp.ClientSession() as http:
        api = Client(http, base + settings.route_prefix)
        _, queued = await api.call("POST", "/jobs", {"workflow": "invert"})
        before = len(ran)
        polls = [(await api.call("GET", f"/jobs/{queued['id']}"))[1] for _ in range(10)]
        # By the polls' tasks, or in the background for them.
        estimates = [statement for statement in ran[before:] if "avg(" in statement]
    assert all(poll["queue_position"] == 1 and poll["eta_seconds"] is not None
               for poll in polls), polls
    # One read of each (two, should the polls outlast POSITION_MAX_AGE), not ten.
    assert 2 <= len(estimates) <= 4, estimates


async def test_gets_behind_a_deep_backlog_answer_at_once_while_its_snapshot_is_read_again(
    settings: Settings, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GET /jobs/{id} of queued jobs behind a backlog as deep as the threshold (5 here; 1,000
    in service): while the snapshot is read again after a job is cancelled (held up by a lock
    another connection holds on tenant_shares, which the read joins), the GETs answer at once from
    the one before; once it is read, from the new one."""
    defaults = JobRepository.__init__.__kwdefaults__  # the service's repository's
    assert defaults is not None
    monkeypatch.setitem(defaults, "exact_positions_below", 5)
    monkeypatch.setitem(defaults, "position_max_age", 0.1)
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        api = Client(http, base + settings.route_prefix)
        ids = [(await api.call("POST", "/jobs", {"workflow": "invert"}))[1]["id"]
               for _ in range(8)]

        async def positions() -> list[int]:
            return [(await api.call("GET", f"/jobs/{job}"))[1]["queue_position"]
                    for job in ids[1:]]

        assert await positions() == list(range(2, 9))  # the first counts, and finds it deep
        await asyncio.sleep(1.0)  # the snapshot that ask began, read (milliseconds)
        async with engine.connect() as holder, holder.begin():
            await holder.execute(text("LOCK TABLE tenant_shares IN ACCESS EXCLUSIVE MODE"))
            assert (await api.call("POST", f"/jobs/{ids[0]}/cancel"))[0] == 200
            async with asyncio.timeout(1):  # (the read the cancel began, or this GET)
                assert await positions() == list(range(2, 9))
            async with asyncio.timeout(10):
                while not await waiting_for_a_lock(engine):  # noqa: ASYNC110 (pg_locks tells no one)
                    await asyncio.sleep(0.05)
            async with asyncio.timeout(1):
                assert await positions() == list(range(2, 9))  # the snapshot before
        async with asyncio.timeout(10):
            while await positions() != list(range(1, 8)):  # noqa: ASYNC110 (read in the background)
                await asyncio.sleep(0.05)
