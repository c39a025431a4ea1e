"""`comfyfleet serve` says what is wrong in one plain line, not a traceback: a port in use, a
setting that is not valid, storage that cannot be opened, a database that refuses it."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path
from typing import Any

from comfyfleet.db import embedded_url
from tests.support import LOOPBACK, child_env, free_ports


async def serve(cwd: Path, **settings: str) -> tuple[int, list[str]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "comfyfleet", "serve", cwd=cwd, env=child_env(**settings),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, err.decode().splitlines()


async def test_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.create_server((LOOPBACK, 0)) as taken:
        port = taken.getsockname()[1]
        code, lines = await serve(tmp_path, SERVICE_HOST=LOOPBACK, SERVICE_PORT=str(port),
                                  DATA_DIR=str(tmp_path / "data"))
    assert code == 1
    assert lines[-1] == (f"comfyfleet: cannot listen on {LOOPBACK}:{port}: Address already in "
                         "use (set SERVICE_PORT or --port, SERVICE_HOST)")
    assert not any("Traceback" in line for line in lines)
    assert not (tmp_path / "data").exists()  # refused before it started anything


async def test_a_bad_setting_is_one_line(tmp_path: Path) -> None:
    code, lines = await serve(tmp_path, SERVICE_PORT="eighty", MAX_ATTEMPTS="0")
    assert code == 1
    assert lines == ["comfyfleet: bad settings: SERVICE_PORT: Input should be a valid integer, "
                     "unable to parse string as an integer; MAX_ATTEMPTS: Input should be "
                     "greater than or equal to 1"]


async def test_a_bad_database_url_is_refused_without_showing_it(tmp_path: Path) -> None:
    """The value is not echoed: a URL missing its scheme still holds the password."""
    for url in ("app:pw-4e7a1c@db.example/fleet", "mysql://app:pw-4e7a1c@db.example/fleet"):
        code, lines = await serve(tmp_path, DATABASE_URL=url)
        assert code == 1
        assert len(lines) == 1 and lines[0].startswith("comfyfleet: bad settings: DATABASE_URL: ")
        assert "pw-4e7a1c" not in lines[0]


async def test_storage_that_cannot_be_opened_is_one_line(tmp_path: Path, database_url: str
                                                         ) -> None:
    """Its message names the settings to check; nothing else is started."""
    endpoint = f"{LOOPBACK}:{free_ports(1)}"  # no scheme: not an address botocore can use
    code, lines = await serve(tmp_path, DATABASE_URL=database_url, DATA_DIR=str(tmp_path),
                              S3_BUCKET="outputs", S3_ENDPOINT_URL=endpoint)
    assert code == 1
    assert lines[-1] == ("comfyfleet: cannot open the storage: S3 client (S3_ENDPOINT_URL or "
                         f"AWS_ENDPOINT_URL, S3_REGION_NAME): Invalid endpoint: {endpoint}")
    assert not any("Traceback" in line or "uvicorn" in line for line in lines), lines


async def test_a_data_dir_that_cannot_be_written_is_one_line(tmp_path: Path, database_url: str
                                                            ) -> None:
    (tmp_path / "a-file").write_text("")
    data_dir = tmp_path / "a-file" / "data"
    code, lines = await serve(tmp_path, DATABASE_URL=database_url, DATA_DIR=str(data_dir))
    assert code == 1
    assert lines[-1] == (f"comfyfleet: cannot keep the generated webhook secret in {data_dir}/"
                         "webhook_secret: Not a directory (set DATA_DIR to a writable "
                         "directory, or WEBHOOK_SECRET)")
    assert not any("Traceback" in line for line in lines), lines


async def test_a_database_that_refuses_is_one_line(tmp_path: Path, postgres: Any) -> None:
    """Refused is not unreachable: waiting would not cure it, so serve does not wait."""
    url = embedded_url(postgres).replace("/postgres?", "/no_such_database?")
    code, lines = await serve(tmp_path, DATABASE_URL=url, DATA_DIR=str(tmp_path))
    assert code == 1
    assert lines[-1].startswith("comfyfleet: the database postgresql+asyncpg://")
    assert lines[-1].endswith(
        'refused the connection: database "no_such_database" does not exist (check '
        "DATABASE_URL, or RDB_HOST, RDB_PORT, RDB_NAME, RDB_USERNAME and RDB_PASSWORD)")
    assert not any("Traceback" in line or "uvicorn" in line for line in lines), lines
