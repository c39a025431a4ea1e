"""Jobs that cannot succeed end `failed`, with the backend's reason and a signed webhook."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.app import serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.comfy.client import ComfyClient
from comfyfleet.comfy.endpoints import Backend
from comfyfleet.comfy.prompts import isolate_outputs
from comfyfleet.execution.collector import Collector
from comfyfleet.execution.endings import Endings, JobEnded
from comfyfleet.fleet.registry import BackendRegistry
from comfyfleet.http_client import HttpClient
from comfyfleet.jobs.extra_data import ExtraData, HeldExtraData
from comfyfleet.jobs.models import Job, JobStatus, utcnow
from comfyfleet.jobs.repository import Choice, JobRepository
from comfyfleet.jobs.waiters import JobWaiters
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from comfyfleet.storage import LocalStorage
from comfyfleet.workflows.catalog import load_catalog
from tests.support import REPO

INVERT_PROMPT = load_catalog(REPO / "workflows").workflows["invert"].build({"width": 16})[1]


class KeptEndings(Endings):
    """The endings of a collector run alone, kept to be read."""

    def __init__(self) -> None:
        super().__init__([], JobWaiters(), HeldExtraData(1))
        self.told: list[Job] = []

    def tell(self, event: JobEnded) -> None:
        self.told.append(event.job)
        super().tell(event)


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedComfyUI]:
    server = SimulatedComfyUI()
    await server.start()
    yield server
    await server.stop()


async def run_one(settings: Settings, receiver: WebhookReceiver, request: dict[str, object]
                  ) -> dict[str, object]:
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        async with http.post(f"{base}{settings.route_prefix}/jobs",
                             json={**request, "callback_url": receiver.url}) as response:
            assert response.status == 202
        async with asyncio.timeout(30):
            await receiver.wait_for(1)
    return receiver.verified[0]


async def failed_with(settings: Settings, receiver: WebhookReceiver, sim: SimulatedComfyUI,
                      workflows: Path, workflow: str) -> dict[str, Any]:
    """The error of the one job of `workflow` (from `workflows`) on `sim`, which fails."""
    settings.workflows_dir = workflows
    settings.comfyui_endpoints = [sim.url]
    event = await run_one(settings, receiver, {"workflow": workflow})
    assert event["type"] == "job.failed"
    job = event["data"]
    assert isinstance(job, dict)
    error: dict[str, Any] = job["error"]
    return error


async def test_prompt_rejected_by_comfyui_fails_the_job_with_its_node_errors(
    settings: Settings, sim: SimulatedComfyUI, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "sized.json").write_text(json.dumps({
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": "$width", "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
    }))
    # Declared untyped (else it would be typed from EmptyImage.width, 1..16384, and refused
    # at submit), so the bad value reaches ComfyUI's own validation.
    (workflows / "sized.params.json").write_text(json.dumps({"width": {"type": "any"}}))
    settings.workflows_dir = workflows
    settings.comfyui_endpoints = [sim.url]
    event = await run_one(settings, receiver, {"workflow": "sized", "params": {"width": 0}})
    assert event["type"] == "job.failed"
    job = event["data"]
    assert isinstance(job, dict)
    assert job["status"] == "failed"
    assert job["error"]["type"] == "prompt_rejected"
    assert job["error"]["details"]["1"]["errors"][0]["type"] == "value_smaller_than_min"
    assert job["outputs"] == []


async def test_output_missing_on_the_backend_fails_instead_of_storing_nothing(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    sim = SimulatedComfyUI(data_dir=tmp_path / "sim")
    await sim.start()
    repository = JobRepository(engine)
    storage = LocalStorage(tmp_path / "outputs")
    endings = KeptEndings()
    try:
        async with aiohttp.ClientSession() as http, HttpClient() as lean_http:
            client = ComfyClient(sim.url, http, lean_http)
            prompt = isolate_outputs(INVERT_PROMPT, "missing")
            prompt_id = str(uuid.uuid4())
            await client.queue_prompt(prompt, prompt_id=prompt_id, client_id="test")
            async with asyncio.timeout(10):
                # Polling a remote server: there is no local event to wait on.
                while (entry := await client.history(prompt_id)) is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            (image,) = entry["outputs"]["3"]["images"]
            # Gone before we collect it, as after a cleanup or a wiped temp directory.
            (tmp_path / "sim" / "output" / image["subfolder"] / image["filename"]).unlink()
            job, _ = await repository.insert(Job(workflow="invert", prompt=prompt))
            await BackendRegistry(engine).add(Backend("sim", sim.url))  # a claim needs it
            claimed = (await repository.claim_next(
                ["sim"], prompt_id, max_inflight=1, pick=lambda _, read: Choice(read.queued[0].id)
            )).job
            assert claimed is not None and claimed.id == job.id
            uploading = await repository.transition(
                claimed, {JobStatus.DISPATCHED}, status=JobStatus.UPLOADING
            )
            assert uploading is not None
            collector = Collector(repository, storage, "", endings)
            await collector.collect(client, uploading)
    finally:
        await sim.stop()
    (failed,) = endings.told
    assert failed.status == JobStatus.FAILED
    assert failed.error is not None
    assert failed.error["type"] == "output_unavailable"
    assert "404" in failed.error["message"]
    assert failed.outputs == []
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.png"))


@pytest.mark.parametrize("heard_from", ["websocket", "history"])
async def test_execution_error_fails_the_job_with_its_node_and_traceback_once(
    settings: Settings, receiver: WebhookReceiver, heard_from: str
) -> None:
    """A node raising on the backend (the simulator's out-of-memory error) fails the job: the
    node, its type, the exception and its traceback are in the job and its webhook, and the
    prompt is not run again. Read from the `execution_error` event, or from the history
    when the socket says nothing."""
    settings.max_attempts = 3  # attempts to spare: none may be spent on it
    settings.quiet_prompt_seconds = 1.0
    async with SimulatedComfyUI(fail_rate=1.0, hang=heard_from == "history") as sim:
        settings.comfyui_endpoints = [sim.url + "#gpu"]
        event = await run_one(settings, receiver, {"workflow": "invert",
                                                   "params": {"width": 16}})
        async with aiohttp.ClientSession() as http, http.get(f"{sim.url}/history") as response:
            history = await response.json()
    assert event["type"] == "job.failed"
    job = event["data"]
    assert isinstance(job, dict)
    assert (job["status"], job["attempts"], job["outputs"]) == ("failed", 1, [])
    error = job["error"]
    assert error["type"] == "execution_error"
    assert (error["node_id"], error["node_type"]) == ("2", "ImageInvert")
    assert error["message"].startswith("CUDA out of memory. Tried to allocate 2.00 GiB.")
    assert error["details"]["exception_type"] == "torch.OutOfMemoryError"
    traceback = error["details"]["traceback"]
    assert traceback and all(isinstance(line, str) for line in traceback)
    assert any("File " in line for line in traceback)
    assert list(history) == [job["prompt_id"]]  # run once: not retried


async def test_a_requeued_or_moved_job_sheds_what_its_last_run_stored(engine: AsyncEngine
                                                                      ) -> None:
    """Outputs are recorded while a prompt runs: a run that is lost (requeued) or moved to
    another backend leaves none of them, nor its node's progress, on the job."""
    repository = JobRepository(engine)
    registry = BackendRegistry(engine)
    for name, port in (("gpu0", 9), ("gpu1", 10)):  # rows only: nothing connects to them
        await registry.add(Backend(name, f"http://127.0.0.1:{port}"))
    job, _ = await repository.insert(Job(workflow="invert", prompt=INVERT_PROMPT))
    early = [{"node_id": "3", "filename": "a.png", "content_type": "image/png", "size": 1,
              "key": f"{job.id}/3_0.png"}]
    detail = {"node": "2", "class_type": "ImageInvert", "step": 1, "steps": 2}

    async def running_on_gpu0() -> Job:
        claimed = (await repository.claim_next(["gpu0"], str(uuid.uuid4()), max_inflight=1,
                                               pick=lambda _, read: Choice(read.queued[0].id))).job
        assert claimed is not None
        running = await repository.transition(claimed, {JobStatus.DISPATCHED},
                                              status=JobStatus.RUNNING, outputs=early,
                                              progress_detail=detail)
        assert running is not None and running.outputs == early
        return running

    requeued = await repository.requeue(await running_on_gpu0())
    assert requeued is not None and requeued.status == JobStatus.QUEUED
    assert (requeued.outputs, requeued.progress_detail) == ([], None)
    moved = await repository.move(await running_on_gpu0(), "gpu1", str(uuid.uuid4()),
                                  max_inflight=1)
    assert moved is not None and moved.backend == "gpu1"
    assert (moved.outputs, moved.progress_detail) == ([], None)


def test_a_jobs_end_forgets_the_extra_data_held_for_it() -> None:
    """Whichever stage ends a job, the partner key held for it here goes (jobs/extra_data.py)."""
    held = HeldExtraData(7)
    job, other = (Job(workflow="graph", status=JobStatus.FAILED, extra_data_holder=7)
                  for _ in range(2))
    for each in (job, other):
        held.hold(each.id, ExtraData({"api_key_comfy_org": "partner-key"}))
    Endings([], JobWaiters(), held).tell(JobEnded(job))
    assert held.get(job.id) is None
    assert held.get(other.id) == ExtraData({"api_key_comfy_org": "partner-key"})
    assert "partner-key" not in repr(held.get(other.id))


async def test_a_job_requeued_after_it_reached_uploading_shows_no_upload_until_it_uploads_again(
    engine: AsyncEngine,
) -> None:
    """A job whose prompt was lost while its outputs were being uploaded (its backend stayed
    unreachable past the grace period) is requeued and claimed again: its timeline (GET /jobs/{id},
    the dashboard's job page) must not show the old run's upload while the new run is on its
    way, nor keep that time once the new run uploads."""
    repository = JobRepository(engine)
    await BackendRegistry(engine).add(Backend("gpu0", "http://127.0.0.1:9"))  # a row only
    job, _ = await repository.insert(Job(workflow="invert", prompt=INVERT_PROMPT))

    async def claimed() -> Job:
        found = (await repository.claim_next(["gpu0"], str(uuid.uuid4()), max_inflight=1,
                                             pick=lambda _, read: Choice(read.queued[0].id))).job
        assert found is not None and found.id == job.id
        return found

    async def uploading(job: Job) -> Job:
        running = await repository.transition(job, {JobStatus.DISPATCHED},
                                              status=JobStatus.RUNNING, started_at=utcnow())
        assert running is not None and running.uploading_at is None
        found = await repository.transition(running, {JobStatus.RUNNING},
                                            status=JobStatus.UPLOADING, uploading_at=utcnow())
        assert found is not None and found.uploading_at is not None
        return found

    first = await uploading(await claimed())
    assert await repository.requeue(first) is not None
    again = await claimed()
    assert (again.attempts, again.uploading_at, again.started_at) == (2, None, None)
    stored = await repository.get(job.id)
    assert stored is not None and stored.uploading_at is None
    second = await uploading(again)
    assert second.uploading_at is not None and first.uploading_at is not None
    assert second.uploading_at > first.uploading_at


async def test_an_execution_error_holding_nul_fails_the_job_with_nul_replaced(
    settings: Settings, sim: SimulatedComfyUI, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """A node raising on a string its backend made with NUL in it (here a file name prefix,
    which the OS refuses): the error's texts (current_inputs among them) are kept with each
    NUL replaced by U+FFFD, as jsonb cannot hold \\u0000, instead of the job's end never
    being recorded."""
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "nul_prefix.json").write_text(json.dumps({
        "1": {"class_type": "RegexReplace",
              "inputs": {"string": "out@put", "regex_pattern": "@", "replace": "\\0"}},
        "2": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": ["1", 0]}},
    }))
    error = await failed_with(settings, receiver, sim, workflows, "nul_prefix")
    assert (error["type"], error["node_id"], error["node_type"]) == \
        ("execution_error", "3", "SaveImage")
    assert error["details"]["current_inputs"]["filename_prefix"] == ["out\ufffdput"]


def scale_by_workflow(workflows: Path, scale_by: str) -> None:
    """`scaled`: ImageScaleBy given `scale_by` as text, which ComfyUI turns with float(), so
    "nan" and "inf" reach it as floats that are not finite."""
    workflows.mkdir()
    (workflows / "scaled.json").write_text(json.dumps({
        "1": {"class_type": "EmptyImage",
              "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
        "2": {"class_type": "ImageScaleBy", "inputs": {"image": ["1", 0],
                                                       "upscale_method": "nearest-exact",
                                                       "scale_by": scale_by}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": "x"}},
    }))


async def test_an_execution_error_holding_nan_fails_the_job_with_it_as_text(
    settings: Settings, sim: SimulatedComfyUI, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """A node raising on a float input that is NaN (its backend sends the token NaN, which
    jsonb refuses): the job ends with the error, the value given as the text "NaN", instead
    of its end never being recorded."""
    scale_by_workflow(tmp_path / "workflows", "nan")
    error = await failed_with(settings, receiver, sim, tmp_path / "workflows", "scaled")
    assert (error["type"], error["node_id"], error["node_type"]) == \
        ("execution_error", "2", "ImageScaleBy")
    assert error["details"]["current_inputs"]["scale_by"] == ["NaN"]


async def test_a_prompt_rejected_for_an_infinite_value_fails_the_job_with_it_as_text(
    settings: Settings, sim: SimulatedComfyUI, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    """ComfyUI refuses a float input of "inf" as bigger than its max, echoing it back as the
    token Infinity in its node errors: the job ends with them, the value as "Infinity"."""
    scale_by_workflow(tmp_path / "workflows", "inf")
    error = await failed_with(settings, receiver, sim, tmp_path / "workflows", "scaled")
    assert error["type"] == "prompt_rejected"
    (node_error,) = error["details"]["2"]["errors"]
    assert node_error["type"] == "value_bigger_than_max"
    assert node_error["extra_info"]["received_value"] == "Infinity"
