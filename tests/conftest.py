"""Real services for the tests: embedded PostgreSQL, a moto S3 server, simulated ComfyUI."""

from __future__ import annotations

import asyncio
import faulthandler
import os
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiobotocore.session import get_session
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.db import make_engine, migrate, start_embedded_postgres
from comfyfleet.settings import Settings
from comfyfleet.webhooks.signing import new_secret
from tests.s3_server import S3_CREDENTIALS as S3_CREDENTIALS  # the tests import it from here
from tests.support import (
    LOOPBACK,
    REPO,
    app_on_loopback,
    free_ports,
    new_database,
    png,
    python_process,
)
from tests.webhook_support import Answer, ScriptedReceiver


def postgres_friendly_dir() -> Iterator[Path]:
    """A temp dir outside pytest's 0700 temp root: as root, embedded PostgreSQL runs as
    another user, which must be able to reach its data directory."""
    root = Path(tempfile.mkdtemp(prefix="comfyfleet-test-"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


data_root = pytest.fixture(postgres_friendly_dir)

# Every variable the service reads: its settings (matched without regard to case, as
# pydantic-settings does) and those of the clients beneath it (botocore, libpq and asyncpg).
SETTING_VARIABLES = {Settings.model_config.get("env_prefix", "").lower() + name
                     for name in Settings.model_fields}
CLIENT_PREFIXES = ("AWS_", "PG")


@pytest.fixture(scope="session", autouse=True)
def isolated_from_the_caller() -> Iterator[None]:
    """No test depends on the developer's shell or working directory: the variables the
    service reads are removed from this process's environment (processes the tests start get
    `support.child_env()`, nothing more), no AWS config file is read, and the tests run in an
    empty directory, so no `.env` is read and no relative path lands in the repository."""
    with pytest.MonkeyPatch.context() as patch, tempfile.TemporaryDirectory(
        prefix="comfyfleet-cwd-", ignore_cleanup_errors=True
    ) as empty:
        for name in list(os.environ):
            if name.lower() in SETTING_VARIABLES or name.startswith(CLIENT_PREFIXES):
                patch.delenv(name)
        patch.setenv("AWS_CONFIG_FILE", os.devnull)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        patch.chdir(empty)
        yield


# pytest-timeout ends a test's worker at `timeout` (pyproject.toml), and under xdist what it
# prints of the stacks is lost with the worker. This many seconds before that, the worker's
# threads and, if its event loop still turns, the loop's tasks are printed: what the test awaits.
STACKS_SHOWN_BEFORE_TIMEOUT = 20.0
test_loop: list[asyncio.AbstractEventLoop] = []


@pytest.fixture(scope="session", autouse=True)
async def the_tests_event_loop() -> None:
    test_loop.append(asyncio.get_running_loop())


def show_tasks() -> None:
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)
    sys.stderr.flush()


def show_stacks(config: pytest.Config, nodeid: str) -> None:
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)
    print(f"\n{nodeid} is about to time out; its threads, then its tasks:", file=sys.stderr)
    faulthandler.dump_traceback(sys.stderr, all_threads=True)
    if test_loop:
        test_loop[0].call_soon_threadsafe(show_tasks)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, None]:
    timeout = float(item.config.getini("timeout") or 0)
    watch = None
    if timeout > STACKS_SHOWN_BEFORE_TIMEOUT:
        watch = threading.Timer(timeout - STACKS_SHOWN_BEFORE_TIMEOUT, show_stacks,
                                (item.config, item.nodeid))
        watch.daemon = True
        watch.start()
    yield
    if watch is not None:
        watch.cancel()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """The PostgreSQL every test's database is made on, without fsync: what a test commits
    still reaches the kernel before the commit returns, so a process killed (the service, or
    PostgreSQL: test_database_outage's own server has fsync) loses nothing; only a crash of the
    machine would, and then the tests' data is gone anyway. Each test's CREATE DATABASE, its
    migrations and its service's writes wait for no disk (a third of the time a database
    takes), and the server's shutdown writes no checkpoint to disk (seconds)."""
    for root in postgres_friendly_dir():
        server = start_embedded_postgres(root / "pg")
        server.psql("ALTER SYSTEM SET fsync = off; SELECT pg_reload_conf();")
        yield server
        server.cleanup()


@pytest.fixture
async def database_url(postgres: Any) -> str:
    """A fresh, empty database for one test."""
    return await new_database(postgres)


@pytest.fixture
async def other_database_url(postgres: Any) -> str:
    """A second one, for a service that must not share the first one's state."""
    return await new_database(postgres)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The test's database, migrated, for tests that work below the API."""
    migrated = make_engine(database_url)
    await migrate(migrated)
    yield migrated
    await migrated.dispose()


@pytest.fixture(scope="session")
async def s3_endpoint() -> AsyncIterator[str]:
    """moto's S3, which checks presigned URLs as AWS does (tests/s3_server.py)."""
    port = free_ports(1)
    url = f"http://{LOOPBACK}:{port}"
    async with python_process("tests.s3_server", "-H", LOOPBACK, "-p", str(port), ready_url=url):
        yield url


@pytest.fixture
async def s3_bucket(s3_endpoint: str) -> str:
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    async with get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url=s3_endpoint, **S3_CREDENTIALS
    ) as client:
        await client.create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    """Settings for an in-process service on this test's database; no backends, local storage."""
    return Settings(
        _env_file=None,
        database_url=database_url,
        data_dir=tmp_path / "data",
        workflows_dir=REPO / "workflows",
        storage="local",
        webhook_secret=new_secret(),
        allow_private_callbacks=True,
        service_port=0,
    )


@pytest.fixture
async def receiver(settings: Settings) -> AsyncIterator[WebhookReceiver]:
    """A webhook endpoint on loopback that verifies against the settings' secret."""
    assert settings.webhook_secret is not None
    hooks = WebhookReceiver(settings.webhook_secret)
    await hooks.start()
    yield hooks
    await hooks.stop()


StartReceiver = Callable[..., Awaitable[ScriptedReceiver]]


@pytest.fixture
async def receivers() -> AsyncIterator[StartReceiver]:
    """Starts scripted webhook receivers on loopback: `await receivers(Answer(500), Answer(),
    port=...)`; all stop when the test ends."""
    started: list[ScriptedReceiver] = []

    async def start(*answers: Answer, port: int = 0) -> ScriptedReceiver:
        receiver = ScriptedReceiver(*answers)
        await receiver.start(port)
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        await receiver.stop()


@pytest.fixture
def workflows(tmp_path: Path, settings: Settings) -> Path:
    """A copy of the repository's workflows the test may change, served from."""
    directory = tmp_path / "workflows"
    shutil.copytree(REPO / "workflows", directory)
    settings.workflows_dir = directory
    return directory


@pytest.fixture
async def image_server() -> AsyncIterator[str]:
    """Serves a PNG (`support.png()`) at /picture.png, and 404 elsewhere, on loopback."""
    app = web.Application()

    async def picture(_: web.Request) -> web.Response:
        return web.Response(body=png(), content_type="image/png")

    app.router.add_get("/picture.png", picture)
    async with app_on_loopback(app) as url:
        yield url
