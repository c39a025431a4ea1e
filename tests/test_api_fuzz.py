"""schemathesis generates requests from /openapi.json (every route, and each workflow's
typed endpoint); no input may cause a 5xx. Bounded: a few examples per operation."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import hypothesis
import pytest
import requests
import schemathesis
from schemathesis.checks import not_a_server_error

from comfyfleet.db import embedded_url
from comfyfleet.settings import Settings
from comfyfleet.webhooks.signing import new_secret
from tests.support import LOOPBACK, free_ports, serve_env

EXAMPLES_PER_OPERATION = 8


async def _create_database(admin_uri: str, name: str) -> None:
    admin = await asyncpg.connect(admin_uri)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def api_schema(postgres: Any) -> Iterator[Any]:
    """One `comfyfleet serve` (no backends) for every generated request of this module."""
    name = f"fuzz_{uuid.uuid4().hex[:12]}"
    asyncio.run(_create_database(postgres.get_uri(), name))
    settings = Settings(_env_file=None,
                        database_url=embedded_url(postgres).replace("/postgres?", f"/{name}?"),
                        webhook_secret=new_secret())
    port = free_ports(1)
    base = f"http://{LOOPBACK}:{port}"
    with tempfile.TemporaryDirectory(prefix="comfyfleet-fuzz-") as data_dir:
        process = subprocess.Popen(
            [sys.executable, "-m", "comfyfleet", "serve"],
            cwd=data_dir, env=serve_env(settings, Path(data_dir), port), stdout=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    requests.get(f"{base}/healthz", timeout=1)
                    break
                except requests.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)  # a sync test: the service runs in its own process
            yield schemathesis.openapi.from_url(f"{base}/openapi.json")
        finally:
            process.terminate()
            process.wait(timeout=20)


# Requests that would make the service reach past loopback are not generated: a backend
# added with a random host name, an image URL to fetch. And `?wait=` would only slow it down.
NETWORK_BOUND = r"/backends$|/workflows/(blur_image|sd15_img2img)/jobs$"


@schemathesis.hook
def map_query(context: Any, query: dict[str, Any] | None) -> dict[str, Any] | None:
    if query is not None:
        query.pop("wait", None)
    return query


def test_no_generated_request_gets_a_server_error(api_schema: Any) -> None:
    schema = api_schema.exclude(path_regex=NETWORK_BOUND, method="POST")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 20  # every route, and a typed endpoint per workflow
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None,
                             derandomize=True, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def no_server_error(case: Any) -> None:
            case.call_and_validate(checks=[not_a_server_error], timeout=30)

        no_server_error()
