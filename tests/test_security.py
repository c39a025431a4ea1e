"""API keys on every route under the prefix, per-key job visibility, rate limits, queue quotas,
body size limits and CORS, against a real service on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
from fastapi import Request
from fastapi.routing import iter_route_contexts
from fastapi.security import HTTPBearer
from multidict import CIMultiDictProxy
from PIL import Image
from starlette.types import Message, Receive, Scope, Send

from comfyfleet.api import telemetry
from comfyfleet.api.body_limit import BodyLimitMiddleware
from comfyfleet.api.security import bearer_key
from comfyfleet.api_keys import KEY_CACHE_SECONDS
from comfyfleet.app import create_app, serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.settings import Settings
from tests.support import child_env, png

KEY_A, KEY_B, ADMIN = "key-a-8c1f6e2d", "key-b-37d0b9aa", "admin-5e9a1c44"
OPEN_PATHS = ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json")
# Routes outside the prefix, open by design (/files/ URLs carry their own signature).
UNPREFIXED = {*OPEN_PATHS, "/redoc", "/docs/oauth2-redirect", "/files/{key:path}",
              "/dashboard"}  # the dashboard's page and assets hold no data
# Stand-ins for path parameters: enough for the request to reach the route.
SAMPLE_VALUES = {"job_id": str(uuid.uuid4()), "delivery_id": str(uuid.uuid4()), "index": "0",
                 "name": "invert"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Client:
    def __init__(self, http: aiohttp.ClientSession, base: str, prefix: str) -> None:
        self.http = http
        self.base = base
        self.api = base + prefix

    async def call(self, method: str, path: str, key: str | None = None, body: Any = None,
                   headers: dict[str, str] | None = None, **kwargs: Any
                   ) -> tuple[int, Any, CIMultiDictProxy[str]]:
        headers = {**(bearer(key) if key else {}), **(headers or {})}
        async with self.http.request(method, self.api + path, json=body, headers=headers,
                                     **kwargs) as response:
            if response.content_type == "text/event-stream":  # endless: the status is enough
                return response.status, None, response.headers
            text = await response.text()
            payload = await response.json() if text and response.content_type.endswith(
                "json") else text
            return response.status, payload, response.headers

    async def submit(self, key: str | None, **fields: Any) -> dict[str, Any]:
        status, job, _ = await self.call(
            "POST", "/jobs", key, {"workflow": "invert", "params": {"width": 16}, **fields})
        assert status == 202, job
        return dict(job)


@pytest.fixture
async def keyed(settings: Settings) -> AsyncIterator[Client]:
    settings.api_keys = [KEY_A, KEY_B]
    settings.admin_api_keys = [ADMIN]
    settings.max_auth_failures = None  # tests send many wrong keys, all from one address
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        yield Client(http, base, settings.route_prefix)


def concrete(path: str) -> str:
    return re.sub(r"\{(\w+)(:path)?\}", lambda m: SAMPLE_VALUES.get(m[1], "x"), path)


def app_routes(settings: Settings) -> set[tuple[str, str]]:
    """(method, path) of every route of the app, included routers' too."""
    return {
        (method, context.path)
        for context in iter_route_contexts(create_app(settings).routes)
        if context.path is not None
        for method in getattr(context.original_route, "methods", None) or ()
        if method != "HEAD"
    }


def prefixed_routes(settings: Settings, openapi: dict[str, Any]) -> set[tuple[str, str]]:
    """(method, path) of every route under the prefix: the app's routes and the OpenAPI paths
    (which add one typed submit path per workflow)."""
    prefix = settings.route_prefix
    found = {(method, concrete(path)) for method, path in app_routes(settings)
             if path.startswith(prefix)}
    found |= {(method.upper(), concrete(path)) for path, operations in openapi["paths"].items()
              if path.startswith(prefix) for method in operations}
    return found


def test_fastapis_telemetry_is_on_only_where_opentelemetry_is_set_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FastAPI's OpenTelemetry bridge looks up three providers at every request: on where
    the environment sets OpenTelemetry up, off (nothing to look up) everywhere else."""
    for name in os.environ:
        if name.startswith(("OTEL_", "FASTAPI_OTEL_")):
            monkeypatch.delenv(name)
    config = create_app(Settings(_env_file=None))._telemetry
    assert (config["tracing"], config["metrics"], config["logs"]) == (False, False, False)
    for name in ("OTEL_TRACES_EXPORTER", "FASTAPI_OTEL_AUTO_CONFIGURE"):
        with monkeypatch.context() as env:
            env.setenv(name, "otlp")
            assert telemetry() == {}  # FastAPI's defaults


async def test_a_key_read_past_fastapi_is_read_as_its_bearer_scheme_reads_it() -> None:
    """The status poll and the submit answered past the router read the key themselves
    (`bearer_key`): as FastAPI's HTTPBearer reads the header, whatever it holds."""
    read = HTTPBearer(auto_error=False)
    for value in (None, "", " ", "Bearer", "Bearer ", "Bearer k", "bearer k", "BeArEr  k \t",
                  "Bearer k extra", "Bearer\tk", " Bearer k", "Basic k", "Bearerk", "Bearer  ",
                  "Token Bearer k"):
        headers = [] if value is None else [(b"authorization", value.encode())]
        credentials = await read(Request({"type": "http", "headers": headers}))
        assert bearer_key(value) == (credentials.credentials if credentials else None), value

async def test_every_route_under_the_prefix_needs_a_key(
    settings: Settings, keyed: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with keyed.http.get(keyed.base + "/openapi.json") as response:
        openapi = await response.json()
    routes = prefixed_routes(settings, openapi)
    for path, operations in openapi["paths"].items():  # /docs shows the lock on each
        for operation in operations.values():
            secured = path.startswith(settings.route_prefix)
            assert (operation.get("security") == [{"HTTPBearer": []}]) == secured, path
    assert ("POST", settings.route_prefix) in routes  # the ComfyUI-server shape
    assert ("POST", f"{settings.route_prefix}/workflows/invert/jobs") in routes
    assert len(routes) >= 18
    prefix_length = len(settings.route_prefix)
    for method, path in sorted(routes):
        route = path[prefix_length:]
        for key in (None, "wrong-secret-value"):
            status, body, headers = await keyed.call(method, route, key, body={})
            assert status == 401, (method, path, key, body)
            assert body["error"]["type"] in ("missing_api_key", "invalid_api_key")
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert "wrong-secret-value" not in str(body)
        # Changing the fleet or the catalog, and seeing every tenant, takes an admin key;
        # everything else any key.
        admin_only = (method != "GET" and route.startswith("/backends")) or route in (
            "/workflows/reload", "/tenants")
        status, body, _ = await keyed.call(method, route, KEY_A, body={})
        if admin_only:
            assert (status, body["error"]["type"]) == (403, "admin_only"), (method, path)
            status, body, _ = await keyed.call(method, route, ADMIN, body={})
        assert status not in (401, 403) and status < 500, (method, path, status, body)
    # A key never reaches the logs, not even a wrong one.
    for key in (KEY_A, KEY_B, ADMIN, "wrong-secret-value"):
        assert key not in caplog.text


def test_only_health_docs_metrics_and_signed_files_are_outside_the_prefix(
    settings: Settings,
) -> None:
    outside = {path for _, path in app_routes(settings)
               if not path.startswith(settings.route_prefix)}
    assert outside == UNPREFIXED


async def test_health_docs_and_metrics_stay_open(keyed: Client) -> None:
    for path in OPEN_PATHS:
        async with keyed.http.get(keyed.base + path) as response:
            assert response.status == 200, path
    schemes = (await (await keyed.http.get(keyed.base + "/openapi.json")).json())[
        "components"]["securitySchemes"]
    assert schemes["HTTPBearer"]["scheme"] == "bearer"


async def test_metrics_token(settings: Settings) -> None:
    settings.metrics_token = "scrape-token-91"
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        async with http.get(base + "/metrics") as response:
            assert response.status == 401
            assert (await response.json())["error"]["type"] == "invalid_metrics_token"
        async with http.get(base + "/metrics", headers=bearer("scrape-token-91")) as response:
            assert response.status == 200
            assert "comfyfleet_job_phase_seconds" in await response.text()


async def test_a_key_sees_only_its_own_jobs_and_an_admin_key_sees_all(
    settings: Settings, keyed: Client, receiver: WebhookReceiver
) -> None:
    mine = await keyed.submit(KEY_A, callback_url=receiver.url, client_task_id="order-1")
    theirs = await keyed.submit(KEY_B)
    job_id = mine["id"]

    # Another key: the job does not exist, on every route that names it.
    for method, path in [("GET", f"/jobs/{job_id}"), ("POST", f"/jobs/{job_id}/cancel"),
                         ("DELETE", f"/jobs/{job_id}"), ("GET", f"/jobs/{job_id}/deliveries"),
                         ("GET", f"/jobs/{job_id}/outputs/0"), ("GET", f"/jobs/{job_id}/events")]:
        status, body, _ = await keyed.call(method, path, KEY_B)
        assert (status, body["error"]["type"]) == (404, "job_not_found"), (method, path)
    status, page, _ = await keyed.call("GET", "/jobs", KEY_B)
    assert [job["id"] for job in page["jobs"]] == [theirs["id"]]
    # Its client_task_id is its key's own: another key's "order-1" is another job.
    status, body, _ = await keyed.call("POST", "/jobs", KEY_B, {
        "workflow": "invert", "params": {"width": 16}, "client_task_id": "order-1"})
    assert status == 202 and body["id"] != job_id
    also_theirs = body["id"]

    # The owner and the admin see it; the owner's repeat gets the same job.
    status, body, _ = await keyed.call("POST", "/jobs", KEY_A, {
        "workflow": "invert", "params": {"width": 16}, "callback_url": receiver.url,
        "client_task_id": "order-1"})
    assert (status, body["id"]) == (200, job_id)
    for key in (KEY_A, ADMIN):
        status, body, _ = await keyed.call("GET", f"/jobs/{job_id}", key)
        assert (status, body["id"]) == (200, job_id)
    status, page, _ = await keyed.call("GET", "/jobs", ADMIN)
    assert {job["id"] for job in page["jobs"]} == {job_id, theirs["id"], also_theirs}
    assert "api_key_hash" not in page["jobs"][0]

    # Deliveries follow their job.
    status, body, _ = await keyed.call("POST", f"/jobs/{job_id}/cancel", KEY_A)
    assert (status, body["status"]) == (200, "cancelled")
    async with asyncio.timeout(10):
        await receiver.wait_for(1)
    status, body, _ = await keyed.call("GET", f"/jobs/{job_id}/deliveries", KEY_A)
    delivery_id = body["deliveries"][0]["id"]
    status, body, _ = await keyed.call("POST", f"/deliveries/{delivery_id}/redeliver", KEY_B)
    assert (status, body["error"]["type"]) == (404, "delivery_not_found")
    status, _, _ = await keyed.call("POST", f"/deliveries/{delivery_id}/redeliver", KEY_A)
    assert status == 202

    # The database holds a digest of the key, never the key.
    assert settings.database_url is not None
    connection = await asyncpg.connect(settings.database_url.replace("+asyncpg", ""))
    try:
        row = await connection.fetchrow("SELECT * FROM jobs WHERE id = $1", uuid.UUID(job_id))
    finally:
        await connection.close()
    assert row is not None
    assert row["api_key_hash"] == hashlib.sha256(KEY_A.encode()).hexdigest()
    assert KEY_A not in str(dict(row))


async def test_rate_limit_per_key_answers_429_with_retry_after(settings: Settings) -> None:
    settings.api_keys = [KEY_A, KEY_B]
    settings.rate_limit = 3
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        client = Client(http, base, settings.route_prefix)
        for _ in range(3):
            status, _, _ = await client.call("GET", "/jobs", KEY_A)
            assert status == 200
        status, body, headers = await client.call("GET", "/jobs", KEY_A)
        assert (status, body["error"]["type"]) == (429, "rate_limited")
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert body["error"]["retry_after"] == int(headers["Retry-After"])
        status, _, _ = await client.call("GET", "/jobs", KEY_B)  # another key has its own
        assert status == 200
        async with http.get(base + "/healthz") as response:  # health is not counted
            assert response.status == 200


async def test_rate_limit_without_keys_is_per_client_address(settings: Settings) -> None:
    settings.rate_limit = 2
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        client = Client(http, base, settings.route_prefix)
        answers = [await client.call("GET", "/workflows") for _ in range(3)]
        assert [status for status, _, _ in answers] == [200, 200, 429]
        assert all("Retry-After" not in headers for _, _, headers in answers[:2])
        _, body, headers = answers[2]
        assert body["error"]["type"] == "rate_limited"
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert body["error"]["retry_after"] == int(headers["Retry-After"])


async def test_wrong_keys_from_one_address_are_throttled(settings: Settings) -> None:
    settings.api_keys = [KEY_A]
    settings.max_auth_failures = 3
    # uvicorn takes the client's address from X-Forwarded-For sent by a proxy on loopback.
    elsewhere = {"X-Forwarded-For": "203.0.113.7"}
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        client = Client(http, base, settings.route_prefix)
        statuses = [(await client.call("GET", "/jobs", f"guess-{n}"))[0] for n in range(3)]
        assert statuses == [401, 401, 401]
        for key in ("guess-3", KEY_A):  # a right key too: its 200 would tell the guesser
            status, body, headers = await client.call("GET", "/jobs", key)
            assert (status, body["error"]["type"]) == (429, "auth_failures")
            assert 1 <= int(headers["Retry-After"]) <= 60
        status, _, _ = await client.call("GET", "/jobs", None)  # no key: nothing guessed
        assert status == 401
        status, _, _ = await client.call("GET", "/jobs", KEY_A, headers=elsewhere)
        assert status == 200  # another client address is not held back
        status, _, _ = await client.call("GET", "/jobs", "guess-4", headers=elsewhere)
        assert status == 401


async def test_max_queued_per_key(settings: Settings) -> None:
    settings.api_keys = [KEY_A, KEY_B]
    settings.max_queued_per_key = 2
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        client = Client(http, base, settings.route_prefix)
        first = await client.submit(KEY_A, client_task_id="a-1")
        await client.submit(KEY_A)  # no backends: both stay queued
        body = {"workflow": "invert", "params": {"width": 16}}
        status, refused, headers = await client.call("POST", "/jobs", KEY_A, body)
        assert (status, refused["error"]["type"]) == (429, "queue_full")
        assert (refused["error"]["scope"], refused["error"]["queued"]) == ("key", 2)
        # Nothing runs, so nothing tells when room comes: a guess, said the same both ways.
        assert headers["Retry-After"] == str(refused["error"]["retry_after"]) == "10"
        status, _, _ = await client.call("POST", "", KEY_A, {"service_type": "invert",
                                                              "params": {"width": 16}})
        assert status == 429  # every submit path counts
        # A repeat is not a new job: it is answered even at the limit.
        status, again, _ = await client.call("POST", "/jobs", KEY_A,
                                             {**body, "client_task_id": "a-1"})
        assert (status, again["id"]) == (200, first["id"])
        await client.submit(KEY_B)  # another key has its own quota
        status, _, _ = await client.call("POST", f"/jobs/{first['id']}/cancel", KEY_A)
        assert status == 200
        await client.submit(KEY_A)  # room again


async def test_concurrent_submits_cannot_overrun_the_quota(settings: Settings) -> None:
    settings.max_queued_per_key = 3
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        client = Client(http, base, settings.route_prefix)
        body = {"workflow": "invert", "params": {"width": 16}}
        answers = await asyncio.gather(*(client.call("POST", "/jobs", None, body)
                                         for _ in range(8)))
        assert sorted(status for status, _, _ in answers) == [202] * 3 + [429] * 5


async def test_bodies_over_the_limit_get_413(settings: Settings) -> None:
    settings.max_request_bytes = 2000
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        api = base + settings.route_prefix
        small = {"workflow": "invert", "params": {"width": 16}, "client_task_id": "x" * 100}
        async with http.post(f"{api}/jobs", json=small) as response:
            assert response.status == 202
        big = {"workflow": "invert", "params": {"width": 16}, "client_task_id": "y" * 3000}
        async with http.post(f"{api}/jobs", json=big) as response:  # Content-Length says so
            assert response.status == 413
            error = (await response.json())["error"]
            assert (error["type"], error["limit"]) == ("request_too_large", 2000)

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: found while reading
            yield b'{"workflow": "invert", "params": {"width": 16}, "client_task_id": "'
            for _ in range(10):
                yield b"z" * 500
            yield b'"}'

        async with http.post(f"{api}/jobs", data=chunks(),
                             headers={"content-type": "application/json"}) as response:
            assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
            assert response.status == 413
            assert (await response.json())["error"]["type"] == "request_too_large"
        # The service goes on answering.
        async with http.get(f"{api}/jobs") as response:
            assert response.status == 200
            assert len((await response.json())["jobs"]) == 1


async def test_a_body_framed_by_its_content_length_is_not_counted_again() -> None:
    """Within the limit by its Content-Length, or without a body, an HTTP/1.1 request reaches
    the app with the server's own receive and send (the server reads no more than that); a
    chunked body, or one of HTTP/2, is counted as it comes."""
    reached: list[tuple[Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append((receive, send))

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}"}

    async def send(message: Message) -> None:
        pass

    middleware = BodyLimitMiddleware(app, max_bytes=100, max_upload_bytes=1000)
    framed: Scope = {"type": "http", "http_version": "1.1",
                     "headers": [(b"content-length", b"100")]}
    for scope in (framed, {**framed, "headers": []}):
        await middleware(scope, receive, send)
        assert reached.pop() == (receive, send)
    for scope in ({**framed, "headers": [(b"transfer-encoding", b"chunked")]},
                  {**framed, "headers": [(b"content-length", b"100"),
                                         (b"transfer-encoding", b"chunked")]},
                  {**framed, "http_version": "2"}):
        await middleware(scope, receive, send)
        counted, _ = reached.pop()
        assert counted is not receive


async def test_multipart_uploads_over_their_own_limit_get_413(settings: Settings) -> None:
    settings.max_request_bytes = 1000  # JSON bodies: multipart uploads have their own limit
    settings.max_upload_bytes = 20_000
    noise = io.BytesIO()
    Image.frombytes("RGB", (128, 128), os.urandom(128 * 128 * 3)).save(noise, format="PNG")
    big = noise.getvalue()
    assert len(big) > settings.max_upload_bytes

    def form(picture: bytes) -> aiohttp.FormData:
        data = aiohttp.FormData()
        data.add_field("image", picture, filename="me.png", content_type="image/png")
        data.add_field("width", "8")
        return data

    async with serving(settings) as base, aiohttp.ClientSession() as http:
        url = f"{base}{settings.route_prefix}/workflows/blur_image/jobs"
        async with http.post(url, data=form(png(48, 48))) as response:  # over 1000, under 20k
            assert response.status == 202, await response.text()
        async with http.post(url, data=form(big)) as response:  # Content-Length says so
            assert response.status == 413
            error = (await response.json())["error"]
            assert (error["type"], error["limit"]) == ("request_too_large", 20_000)

        boundary = "comfyfleet-test-boundary"
        raw = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"width\"\r\n\r\n8\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
               f"filename=\"me.png\"\r\nContent-Type: image/png\r\n\r\n").encode()
        raw += big + f"\r\n--{boundary}--\r\n".encode()

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: found while reading
            for start in range(0, len(raw), 4096):
                yield raw[start:start + 4096]

        async with http.post(url, data=chunks(), headers={
                "content-type": f"multipart/form-data; boundary={boundary}"}) as response:
            assert response.request_info.headers.get("Transfer-Encoding") == "chunked"
            assert response.status == 413
            assert (await response.json())["error"]["type"] == "request_too_large"
        async with http.get(f"{base}{settings.route_prefix}/jobs") as response:
            assert response.status == 200
            assert len((await response.json())["jobs"]) == 1  # only the one under the limit


async def test_cors_is_off_unless_origins_are_allowed(settings: Settings) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    async with serving(settings) as base, aiohttp.ClientSession() as http, http.get(
        f"{base}{settings.route_prefix}/jobs", headers={"Origin": "https://app.example"}
    ) as response:
        assert "Access-Control-Allow-Origin" not in response.headers
    settings.cors_origins = ["https://app.example"]
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        async with http.options(f"{base}{settings.route_prefix}/jobs",
                                headers=preflight) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "authorization" in response.headers["Access-Control-Allow-Headers"].lower()
        async with http.options(f"{base}{settings.route_prefix}/jobs",
                                headers={**preflight, "Origin": "https://evil.example"}) as r:
            assert "Access-Control-Allow-Origin" not in r.headers


async def test_the_body_limit_and_cors_wrap_api_v2_too(settings: Settings) -> None:
    """/api/v2 is routed past the service app's router, inside its middlewares."""
    settings.max_request_bytes = 2000
    settings.cors_origins = ["https://app.example"]
    origin = {"Origin": "https://app.example"}
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        async with http.options(f"{base}/api/v2/jobs", headers={
                **origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "idempotency-key"}) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
        big = {"workflow": {"1": {"class_type": "x" * 3000, "inputs": {}}}}
        async with http.post(f"{base}/api/v2/jobs", json=big, headers=origin) as response:
            assert response.status == 413
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert (await response.json())["error"]["type"] == "request_too_large"
        async with http.get(f"{base}/api/v2/health", headers=origin) as response:
            assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"
            assert "database" in await response.json()


async def keys_command(settings: Settings, *args: str, **env: str) -> tuple[int, str]:
    """`comfyfleet keys ...` on the test's database (and `env`): exit code and standard
    output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfyfleet", "keys", *args,
        env=child_env(DATABASE_URL=settings.database_url or "", **env),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_keys_made_with_the_command_line_turn_authentication_on(
    settings: Settings,
) -> None:
    code, out = await keys_command(settings, "create", "shop")
    assert code == 0
    key = out.strip()
    assert key.startswith("cf_") and len(key) > 40
    code, out = await keys_command(settings, "create", "ops", "--admin")
    assert code == 0
    admin = out.strip()
    assert (await keys_command(settings, "create", "shop"))[0] == 1  # names are unique
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        client = Client(http, base, settings.route_prefix)
        status, _, _ = await client.call("GET", "/jobs")
        assert status == 401  # no API_KEYS, but the database has keys
        job = await client.submit(key)
        status, _, _ = await client.call("GET", f"/jobs/{job['id']}", KEY_A)
        assert status == 401  # a key of nobody's
        for reader in (key, admin):
            status, found, _ = await client.call("GET", f"/jobs/{job['id']}", reader)
            assert (status, found["id"]) == (200, job["id"])

        code, listing = await keys_command(settings, "list")
        assert code == 0
        assert [line.split("\t")[:2] for line in listing.splitlines()] == [
            ["ops", "admin"], ["shop", "key"]]
        assert key not in listing
        assert (await keys_command(settings, "revoke", "shop"))[0] == 0
        assert (await keys_command(settings, "revoke", "shop"))[0] == 1  # already
        async with asyncio.timeout(KEY_CACHE_SECONDS + 5):
            while (await client.call("GET", "/jobs", key))[0] != 401:  # noqa: ASYNC110
                await asyncio.sleep(0.2)  # the service notices within KEY_CACHE_SECONDS
        status, found, _ = await client.call("GET", f"/jobs/{job['id']}", admin)
        assert status == 200  # a revoked key's jobs stay for the admins
        assert "revoked 20" in (await keys_command(settings, "list"))[1]
