"""`comfyfleet submit`: a command-line client of a running comfyfleet (DESIGN §10).

One job, or one per image in a folder; a progress bar per job from its Server-Sent Events;
the outputs downloaded when it succeeds. The exit code is non-zero if any job did not.

In folder mode `OUT/jobs.jsonl` records which file became which job: a line as each file is
submitted (its job id, or why it was refused), so that an interrupted run still says where
its jobs are, and a line when the job has ended (status, saved outputs). A refused file does
not stop the others.
"""

from __future__ import annotations

import asyncio
import json
import mimetypes
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}
CHUNK_BYTES = 1024 * 1024


class SubmitError(Exception):
    """The server refused or could not be reached; the message says why."""


@dataclass(frozen=True)
class Target:
    server: str  # e.g. http://127.0.0.1:8000/api/v1
    api_key: str | None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`k=v` pairs; a value that reads as JSON (42, 1.5, true) keeps that type."""
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SubmitError(f"--param takes name=value, not {pair!r}")
        try:
            params[name] = json.loads(value)
        except ValueError:
            params[name] = value
    return params


async def _json(response: aiohttp.ClientResponse) -> Any:
    body = await response.json(content_type=None)
    if response.status >= 400:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        raise SubmitError(f"HTTP {response.status}: {error.get('message', body)}")
    return body


async def _image_param(http: aiohttp.ClientSession, target: Target, workflow: str) -> str:
    async with http.get(f"{target.server}/workflows/{workflow}",
                        headers=target.headers) as response:
        described = await _json(response)
    names = [p["name"] for p in described["params"] if p["type"] == "image"]
    if len(names) != 1:
        raise SubmitError(f"--input-dir needs a workflow with one image parameter; "
                          f"{workflow} has {len(names)}")
    return str(names[0])


async def _submit(http: aiohttp.ClientSession, target: Target, workflow: str,
                  params: dict[str, Any], image: tuple[str, Path] | None) -> dict[str, Any]:
    url = f"{target.server}/workflows/{workflow}/jobs"
    if image is None:
        async with http.post(url, json={"params": params}, headers=target.headers) as response:
            job: dict[str, Any] = await _json(response)
            return job
    form = aiohttp.FormData()
    for name, value in params.items():
        form.add_field(name, value if isinstance(value, str) else json.dumps(value))
    param, path = image
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    form.add_field(param, await asyncio.to_thread(path.read_bytes), filename=path.name,
                   content_type=content_type)
    async with http.post(url, data=form, headers=target.headers) as response:
        job = await _json(response)
        return job


async def _events(http: aiohttp.ClientSession, target: Target, job_id: str
                  ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The job's Server-Sent Events as (event, data), until its terminal one."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with http.get(f"{target.server}/jobs/{job_id}/events", headers=target.headers,
                        timeout=timeout) as response:
        if response.status != 200:
            await _json(response)
        event, data = "message", ""
        async for raw in response.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif not line and data:
                yield event, json.loads(data)
                event, data = "message", ""


async def _download(http: aiohttp.ClientSession, target: Target, job: dict[str, Any],
                    out: Path) -> list[Path]:
    saved = []
    for index, output in enumerate(job["outputs"]):
        if not output.get("key"):
            continue  # a text output: it is in the job itself
        path = out / job["id"] / Path(output["key"]).name
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        async with http.get(f"{target.server}/jobs/{job['id']}/outputs/{index}",
                            headers=target.headers) as response:
            if response.status != 200:
                raise SubmitError(f"output {index} of job {job['id']}: HTTP {response.status}")
            with path.open("wb") as file:
                async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                    await asyncio.to_thread(file.write, chunk)
        saved.append(path)
    return saved


async def _follow(http: aiohttp.ClientSession, target: Target, job: dict[str, Any],
                  progress: Progress, task: TaskID) -> dict[str, Any]:
    async for event, data in _events(http, target, job["id"]):
        if event == "state":
            eta = f" ~{data['eta_seconds']:.0f}s" if data.get("eta_seconds") else ""
            progress.update(task, completed=data["progress"],
                            description=f"{job['id'][:8]} {data['status']}{eta}")
        elif event in ("succeeded", "failed", "cancelled"):
            progress.update(task, completed=1.0, description=f"{job['id'][:8]} {event}")
            return data
    raise SubmitError(f"the event stream of job {job['id']} ended early")


def _images_in(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _say(console: Console, line: str) -> None:
    """A line as it is: not wrapped (a path stays whole for a pipe), no markup read in it."""
    console.print(line, soft_wrap=True, markup=False, highlight=False)


class JobLog:
    """`OUT/jobs.jsonl`: which input file became which job, appended as it happens."""

    def __init__(self, out: Path) -> None:
        self.path = out / "jobs.jsonl"

    async def write(self, path: Path, **fields: Any) -> None:
        line = json.dumps({"input": str(path), **fields,
                           "at": datetime.now(UTC).isoformat(timespec="seconds")})
        await asyncio.to_thread(self._append, line)

    def _append(self, line: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as file:
            file.write(line + "\n")


@dataclass
class Submitted:
    job: dict[str, Any]
    input: Path | None  # the file of folder mode


async def _submit_folder(http: aiohttp.ClientSession, target: Target, workflow: str,
                         params: dict[str, Any], input_dir: Path, log: JobLog,
                         console: Console) -> tuple[list[Submitted], int]:
    """A job per image, each recorded as it is accepted or refused; the refusals counted."""
    param = await _image_param(http, target, workflow)
    files = await asyncio.to_thread(_images_in, input_dir)
    if not files:
        raise SubmitError(f"no images in {input_dir}")
    submitted, refused = [], 0
    for path in files:
        try:
            job = await _submit(http, target, workflow, params, (param, path))
        except SubmitError as exc:
            refused += 1
            await log.write(path, error=str(exc))
            _say(console, f"{path.name}: refused: {exc}")
            continue
        await log.write(path, job_id=job["id"], status=job["status"])
        _say(console, f"{path.name}: job {job['id']}")
        submitted.append(Submitted(job, path))
    return submitted, refused


async def run_submit(
    target: Target, workflow: str, params: dict[str, Any], input_dir: Path | None, out: Path,
    console: Console,
) -> int:
    """Submit, follow and download; the process exit code (0: every job succeeded)."""
    log = JobLog(out)
    async with aiohttp.ClientSession() as http:
        if input_dir is None:
            submitted = [Submitted(await _submit(http, target, workflow, params, None), None)]
            failures = 0
        else:
            submitted, failures = await _submit_folder(http, target, workflow, params,
                                                       input_dir, log, console)
        with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                      console=console, transient=False) as progress:
            tasks = [progress.add_task(item.job["id"][:8], total=1.0) for item in submitted]
            ended = await asyncio.gather(*(_follow(http, target, item.job, progress, task)
                                           for item, task in zip(submitted, tasks, strict=True)))
        for item, job in zip(submitted, ended, strict=True):
            name = f"{item.input.name} -> " if item.input is not None else ""
            saved: list[Path] = []
            if job["status"] == "succeeded":
                saved = await _download(http, target, job, out)
                for path in saved:
                    _say(console, f"{name}{job['id']}: {path}")
            else:
                failures += 1
                error = job.get("error") or {}
                _say(console, f"{name}{job['id']}: {job['status']}: {error.get('message', '')}")
            if item.input is not None:
                await log.write(item.input, job_id=job["id"], status=job["status"],
                                outputs=[str(path) for path in saved])
    return 1 if failures else 0
