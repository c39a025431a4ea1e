"""The comfyui_nodes package (comfyfleet-cleanup) loaded into a simulator the way ComfyUI loads
it, and comfyfleet deleting each job's outputs through it once they are stored."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfyfleet.app import serving
from comfyfleet.comfy.cleanup import BackendCleanup
from comfyfleet.comfy.client import ComfyClient, ComfyError
from comfyfleet.http_client import HttpClient
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import REPO

PACKAGE = REPO / "comfyui_nodes" / "comfyfleet_cleanup"
VERSION = "0.1.0"
TOKEN = "a-shared-token-for-tests"
TIMEOUT = 30


@pytest.fixture
async def sim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SimulatedComfyUI]:
    """A simulator with the package loaded; ComfyUI's environment (this process) has the token."""
    monkeypatch.setenv("COMFYFLEET_NODE_TOKEN", TOKEN)
    async with SimulatedComfyUI(data_dir=tmp_path / "sim", custom_nodes=[PACKAGE]) as sim:
        yield sim


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        yield session


@pytest.fixture
async def lean_http() -> AsyncIterator[HttpClient]:
    async with HttpClient() as client:
        yield client


def make_file(path: Path, content: bytes = b"bytes") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


async def delete(
    http: aiohttp.ClientSession, sim: SimulatedComfyUI, body: Any, token: str | None = TOKEN,
    *, path: str = "/comfyfleet/delete",
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = body if isinstance(body, str) else json.dumps(body)
    async with http.post(sim.url + path, data=data, headers=headers) as response:
        return response.status, await response.json()


async def test_ping_answers_on_both_paths_without_a_token(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession, lean_http: HttpClient
) -> None:
    for path in ("/comfyfleet/ping", "/api/comfyfleet/ping"):
        async with http.get(sim.url + path) as response:
            assert response.status == 200
            assert await response.json() == {"package": "comfyfleet-cleanup", "version": VERSION}
    assert await ComfyClient(sim.url, http, lean_http).cleanup_version() == VERSION


async def test_a_comfyui_without_the_package_has_no_cleanup(
    tmp_path: Path, http: aiohttp.ClientSession, lean_http: HttpClient
) -> None:
    async with SimulatedComfyUI(data_dir=tmp_path / "plain") as plain:
        assert await ComfyClient(plain.url, http, lean_http).cleanup_version() is None


IMPOSTOR = """
from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS = {}


@PromptServer.instance.routes.get("/comfyfleet/ping")
async def ping(request):
    return web.json_response({"package": "something-else", "version": "9"})
"""


async def test_another_package_on_the_ping_path_means_no_cleanup(
    tmp_path: Path, http: aiohttp.ClientSession, lean_http: HttpClient
) -> None:
    impostor = tmp_path / "impostor"
    impostor.mkdir()
    (impostor / "__init__.py").write_text(IMPOSTOR)
    async with SimulatedComfyUI(data_dir=tmp_path / "sim", custom_nodes=[impostor]) as sim:
        client = ComfyClient(sim.url, http, lean_http)
        with pytest.raises(ComfyError, match="not comfyfleet-cleanup"):
            await client.cleanup_version()
        cleanup = BackendCleanup(client, "sim", TOKEN)
        await cleanup.refresh()  # never raises: the backend is still usable
        assert cleanup.version is None and not cleanup.enabled


async def test_deletes_files_of_each_type_and_then_reports_them_missing(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession, lean_http: HttpClient
) -> None:
    client = ComfyClient(sim.url, http, lean_http)
    root = sim.data_dir
    job_output = make_file(root / "output" / "comfyfleet" / "p1" / "x_00001_.png")
    neighbour = make_file(root / "output" / "comfyfleet" / "p1" / "x_00002_.png")
    uploaded = make_file(root / "input" / "in.png")
    preview = make_file(root / "temp" / "ComfyUI_temp_abcde_00001_.png")

    assert await client.delete_file("x_00001_.png", "comfyfleet/p1", "output", TOKEN)
    assert not job_output.exists() and neighbour.exists()
    assert await client.delete_file("in.png", "", "input", TOKEN)
    assert not uploaded.exists()
    status, answer = await delete(http, sim, {"filename": preview.name, "type": "temp"},
                                  path="/api/comfyfleet/delete")
    assert (status, answer) == (200, {"deleted": True})
    assert not preview.exists()
    # Already gone: 404, which the client reports as False (nothing to do).
    assert not await client.delete_file("in.png", "", "input", TOKEN)
    status, answer = await delete(http, sim, {"filename": "in.png", "type": "input"})
    assert (status, answer) == (404, {"error": "no such file"})

    # The last file of a prompt's own folder takes the folder with it; never the type's own.
    assert await client.delete_file("x_00002_.png", "comfyfleet/p1", "output", TOKEN)
    assert not (root / "output" / "comfyfleet" / "p1").exists()
    assert (root / "output" / "comfyfleet").is_dir()
    assert (root / "input").is_dir() and (root / "temp").is_dir()


async def test_a_missing_or_wrong_token_deletes_nothing(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession, lean_http: HttpClient
) -> None:
    target = make_file(sim.data_dir / "output" / "keep.png")
    body = {"filename": "keep.png", "subfolder": "", "type": "output"}
    for token in (None, "wrong", TOKEN + "x", "", "é-not-ascii"):
        status, answer = await delete(http, sim, body, token)
        assert status == 401, token
        assert answer == {"error": "missing or wrong bearer token"}
    async with http.post(sim.url + "/comfyfleet/delete", json=body,
                         headers={"Authorization": f"Basic {TOKEN}"}) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(ComfyError, match="401"):
        await ComfyClient(sim.url, http, lean_http).delete_file("keep.png", "", "output", "wrong")
    assert target.exists()


async def test_without_a_token_on_the_server_everything_is_refused_and_says_why(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = make_file(sim.data_dir / "output" / "keep.png")
    body = {"filename": "keep.png", "type": "output"}
    for unset in ("", None):
        if unset is None:
            monkeypatch.delenv("COMFYFLEET_NODE_TOKEN")
        else:
            monkeypatch.setenv("COMFYFLEET_NODE_TOKEN", unset)
        # Even a caller sending the empty token, or no header at all, gets nowhere.
        for token in (TOKEN, "", None):
            status, answer = await delete(http, sim, body, token)
            assert status == 403
            assert "COMFYFLEET_NODE_TOKEN is not set" in answer["error"]
    assert target.exists()


def escape_attempts(root: Path) -> list[dict[str, str]]:
    """Requests for `root/secret.txt` (beside the output directory) or `input/victim.png`."""
    secret = str(root / "secret.txt")
    return [
        {"filename": secret, "subfolder": "", "type": "output"},  # absolute filename
        {"filename": "secret.txt", "subfolder": str(root), "type": "output"},  # absolute subfolder
        {"filename": "../secret.txt", "subfolder": "", "type": "output"},
        {"filename": "secret.txt", "subfolder": "..", "type": "output"},
        {"filename": "sub/../../secret.txt", "subfolder": "", "type": "output"},
        {"filename": "secret.txt", "subfolder": "comfyfleet/../..", "type": "output"},
        {"filename": "victim.png", "subfolder": "../input", "type": "output"},  # another type
        {"filename": "..", "subfolder": "", "type": "output"},
        {"filename": ".", "subfolder": "", "type": "output"},  # the directory itself
        {"filename": "x/", "subfolder": "", "type": "output"},
        {"filename": "secret.txt", "subfolder": "link-to-root", "type": "output"},  # dir link
        {"filename": "link-out.png", "subfolder": "", "type": "output"},  # file link out
        {"filename": "../../secret.txt", "subfolder": "", "type": "temp"},
    ]


async def test_nothing_outside_the_directory_can_be_reached(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession
) -> None:
    root = sim.data_dir
    secret = make_file(root / "secret.txt", b"secret")
    victim = make_file(root / "input" / "victim.png")
    (root / "output" / "link-to-root").symlink_to(root, target_is_directory=True)
    link_out = root / "output" / "link-out.png"
    link_out.symlink_to(secret)
    for body in escape_attempts(root):
        status, answer = await delete(http, sim, body)
        assert status == 403, body
        assert "does not name a file inside" in answer["error"]
    # JSON escapes decode to `..` before anything looks at the name.
    raw = '{"filename": "\\u002e\\u002e/secret.txt", "subfolder": "", "type": "output"}'
    assert (await delete(http, sim, raw))[0] == 403
    assert secret.read_bytes() == b"secret" and victim.exists() and link_out.is_symlink()


async def test_percent_encoding_is_a_literal_name_never_decoded(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession
) -> None:
    root = sim.data_dir
    secret = make_file(root / "secret.txt")
    for body in (
        {"filename": "%2e%2e%2fsecret.txt", "subfolder": "", "type": "output"},
        {"filename": "secret.txt", "subfolder": "%2e%2e", "type": "output"},
        {"filename": "..%2fsecret.txt", "subfolder": "", "type": "output"},
    ):
        assert await delete(http, sim, body) == (404, {"error": "no such file"}), body
    assert secret.exists()
    # Such names are legal file names, and deleting one touches only it.
    literal = make_file(root / "output" / "%2e%2e" / "secret.txt")
    status, _ = await delete(http, sim, {"filename": "secret.txt", "subfolder": "%2e%2e",
                                         "type": "output"})
    assert status == 200
    assert not literal.exists() and secret.exists()


async def test_a_link_pointing_inside_is_deleted_itself_not_its_target(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession
) -> None:
    output = sim.data_dir / "output"
    target = make_file(output / "real.png")
    (output / "alias.png").symlink_to(target)
    assert (await delete(http, sim, {"filename": "alias.png", "type": "output"}))[0] == 200
    assert not (output / "alias.png").is_symlink() and target.exists()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"filename": "a.png", "type": "models"}, "type must be one of output, input, temp"),
        ({"filename": "a.png"}, "type must be one of output, input, temp"),
        ({"filename": "a.png", "type": None}, "type must be one of output, input, temp"),
        ({"type": "output"}, "filename must be a non-empty string"),
        ({"filename": "", "type": "output"}, "filename must be a non-empty string"),
        ({"filename": 3, "type": "output"}, "filename must be a non-empty string"),
        ({"filename": "a.png", "subfolder": ["x"], "type": "output"}, "subfolder must be"),
        ({"filename": "a\x00.png", "type": "output"}, "names must not contain NUL"),
        (["a.png"], "the body must be a JSON object"),
        ("not json", "the body must be JSON"),
        ({"filename": "folder", "type": "output"}, "not a file"),
    ],
)
async def test_bad_requests_are_400s(
    sim: SimulatedComfyUI, http: aiohttp.ClientSession, body: Any, message: str
) -> None:
    (sim.data_dir / "output" / "folder").mkdir()
    status, answer = await delete(http, sim, body)
    assert status == 400
    assert message in answer["error"]
    assert (sim.data_dir / "output" / "folder").is_dir()


# --- comfyfleet using it ------------------------------------------------------------------------


def output_files(sim: SimulatedComfyUI) -> list[Path]:
    return [path for path in (sim.data_dir / "output").rglob("*") if path.is_file()]


async def run_one_job(
    settings: Settings, sim: SimulatedComfyUI, until_cleaned: Callable[[], Awaitable[None]]
) -> tuple[dict[str, Any], dict[str, Any], bytes]:
    """One invert job through the service: the finished job, its backend and its output."""
    settings.comfyui_endpoints = [sim.url + "#gpu"]
    async with serving(settings, port=0) as base, aiohttp.ClientSession() as http:
        api = base + settings.route_prefix
        body = {"workflow": "invert", "params": {"width": 24, "height": 16}}
        async with http.post(f"{api}/jobs", params={"wait": TIMEOUT}, json=body) as response:
            job = await response.json()
        async with http.get(f"{api}/jobs/{job['id']}/outputs/0") as response:
            assert response.status == 200
            stored = await response.read()
        async with asyncio.timeout(TIMEOUT):
            await until_cleaned()
        async with http.get(f"{api}/backends") as response:
            (backend,) = await response.json()
    return job, backend, stored


async def test_outputs_are_deleted_from_the_backend_once_stored(
    settings: Settings, sim: SimulatedComfyUI
) -> None:
    settings.comfyfleet_node_token = TOKEN

    async def files_gone() -> None:
        while output_files(sim):  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # the backend's disk: no event to wait on

    job, backend, stored = await run_one_job(settings, sim, files_gone)
    assert job["status"] == "succeeded"
    (output,) = job["outputs"]
    assert stored[:8] == b"\x89PNG\r\n\x1a\n" and len(stored) == output["size"]
    assert backend["cleanup"] == VERSION
    assert not output_files(sim)
    # The prompt's own folder went with its file; the folder comfyfleet writes under stays.
    assert [p.name for p in (sim.data_dir / "output").rglob("*")] == ["comfyfleet"]


async def test_a_refused_delete_is_logged_and_the_job_still_succeeds(
    settings: Settings, sim: SimulatedComfyUI, caplog: pytest.LogCaptureFixture
) -> None:
    settings.comfyfleet_node_token = "not-the-backend-token"
    caplog.set_level(logging.WARNING, logger="comfyfleet.comfy.cleanup")

    async def delete_refused() -> None:
        while "could not delete" not in caplog.text:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    job, backend, _ = await run_one_job(settings, sim, delete_refused)
    assert job["status"] == "succeeded"
    assert "401" in caplog.text
    assert "not-the-backend-token" not in caplog.text  # no secret in the logs
    assert backend["cleanup"] == VERSION
    (left,) = output_files(sim)
    assert left.name == job["outputs"][0]["filename"]


async def test_a_backend_without_the_package_keeps_its_files_and_says_so(
    settings: Settings, tmp_path: Path
) -> None:
    settings.comfyfleet_node_token = TOKEN
    async with SimulatedComfyUI(data_dir=tmp_path / "plain") as plain:

        async def nothing_to_wait_for() -> None:
            pass

        job, backend, stored = await run_one_job(settings, plain, nothing_to_wait_for)
        assert job["status"] == "succeeded"
        assert backend["cleanup"] is None
        (left,) = output_files(plain)
        assert left.read_bytes() == stored


def test_the_package_needs_nothing_but_comfyui() -> None:
    """It is copied into ComfyUI alone: no comfyfleet import may creep in."""
    source = (PACKAGE / "__init__.py").read_text()
    imports = {line.split()[1] for line in source.splitlines()
               if line.startswith(("import ", "from "))}
    assert imports <= {"__future__", "contextlib", "hmac", "logging", "os", "stat", "aiohttp",
                       "folder_paths", "server"}
