"""schemathesis over /openapi.json (every route, and each workflow's typed endpoint) and the
v2 surface's /api/v2/openapi.json: no generated request gets a 5xx.

`st run` (its examples, coverage and fuzzing phases, positive and negative data) with a fixed
seed and a bounded number of examples per operation, against a `comfyfleet serve` on
loopback with no backends. tests/fuzz_hooks.py adds values that have broken such services
and keeps every URL the service could reach on loopback. Its report is the failure message.
A deeper run: FUZZ_EXAMPLES=200 FUZZ_SEED=7 .venv/bin/pytest tests/test_api_fuzz.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from comfyfleet.settings import Settings
from comfyfleet.webhooks.signing import new_secret
from tests.support import LOOPBACK, child_env, free_ports, new_database, serve_env

SEED = int(os.environ.get("FUZZ_SEED", "14"))
EXAMPLES_PER_OPERATION = int(os.environ.get("FUZZ_EXAMPLES", "50"))
# Each schema, and the operations left out of its pass: the health checks answer 503 while a
# backend is down, and the fuzzing adds backends that are; the dashboard's stream never ends.
SCHEMAS = {"/openapi.json": ["/readyz", "/api/v1/dashboard/events"],
           "/api/v2/openapi.json": ["/health"]}


@pytest.fixture(scope="module")
async def fuzz_database(postgres: Any) -> str:
    return await new_database(postgres, prefix="fuzz")


@pytest.fixture(scope="module")
def service(fuzz_database: str) -> Iterator[str]:
    """A `comfyfleet serve` on its own database, with no backends, for both passes; its base
    URL."""
    settings = Settings(_env_file=None, database_url=fuzz_database, webhook_secret=new_secret())
    port = free_ports(1)
    base = f"http://{LOOPBACK}:{port}"
    with tempfile.TemporaryDirectory(prefix="comfyfleet-fuzz-") as data_dir:
        process = subprocess.Popen(
            [sys.executable, "-m", "comfyfleet", "serve"], cwd=data_dir,
            env=serve_env(settings, Path(data_dir), port), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    requests.get(f"{base}/healthz", timeout=1)
                    break
                except (requests.ConnectionError, requests.Timeout):  # refused, or starting
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)  # a sync test: the service runs in its own process
            yield base
        finally:
            process.terminate()
            process.wait(timeout=30)


@pytest.mark.parametrize("schema", SCHEMAS)
def test_no_generated_request_gets_a_server_error(
    service: str, tmp_path: Path, schema: str
) -> None:
    command = [
        sys.executable, "-m", "schemathesis.cli", "--no-color", "run", service + schema,
        "--checks", "not_a_server_error",
        "--phases", "examples,coverage,fuzzing",
        "--seed", str(SEED),
        "--max-examples", str(EXAMPLES_PER_OPERATION),
        # One: with two, both threads may have hypothesis parse the source of a lambda at once,
        # and Python 3.11's ast module keeps one recursion count for all threads ("AST
        # constructor recursion depth mismatch"). The time is the generating, not the waiting.
        "--workers", "1",
        "--request-timeout", "10",
        "--generation-database", "none",
        *(arg for path in SCHEMAS[schema] for arg in ("--exclude-path", path)),
    ]
    env = child_env(SCHEMATHESIS_HOOKS="tests.fuzz_hooks")
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    # The hooks did keep the service on loopback: every backend the run added is there.
    backends = requests.get(f"{service}/api/v1/backends", timeout=10).json()
    assert {urlsplit(backend["url"]).hostname for backend in backends} <= {LOOPBACK}
