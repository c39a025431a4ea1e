"""Capability-aware routing: a job goes only where every node class and model it uses is."""

from __future__ import annotations

import gc
import json
import uuid
import weakref
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfyfleet.app import serving
from comfyfleet.comfy.capabilities import Capabilities
from comfyfleet.dispatch.dispatcher import RunnableJobs, _Band
from comfyfleet.jobs.repository import QueuedJob
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from comfyfleet.workflows.catalog import load_catalog
from tests.support import REPO, wait_for_healthy_backends

# A copy of ../shared/fixtures, so a clone of this repository is complete on its own.
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "comfyui-0.3.64"

TXT2IMG: dict[str, dict[str, Any]] = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
    "3": {"class_type": "KSampler", "inputs": {
        "model": ["4", 0], "sampler_name": "euler", "scheduler": "normal", "seed": 1}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "t"}},
}


def real_comfyui(**models: list[str]) -> Capabilities:
    """A real ComfyUI 0.3.64's /object_info, with these files in its model folders."""
    info: dict[str, Any] = json.loads((FIXTURES / "object_info_full.json").read_text())
    info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] = models.get(
        "checkpoints", [])
    return Capabilities.from_object_info(info)


def test_missing_model_file_and_unknown_value_are_named() -> None:
    bare = real_comfyui()
    assert bare.missing(TXT2IMG) == ["CheckpointLoaderSimple.ckpt_name = sd15.safetensors"]
    stocked = real_comfyui(checkpoints=["sd15.safetensors"])
    assert stocked.can_run(TXT2IMG)
    odd_sampler = {**TXT2IMG, "3": {**TXT2IMG["3"], "inputs": {
        **TXT2IMG["3"]["inputs"], "sampler_name": "warp_drive"}}}
    assert stocked.missing(odd_sampler) == ["KSampler.sampler_name = warp_drive"]


def test_a_queued_job_is_judged_by_each_backends_capabilities_as_they_are_now() -> None:
    """The dispatcher keeps whether each backend can run a job near the backlog's head (its
    backends weigh it at every claim); a backend that comes back with other models is asked
    afresh, as is one like it."""
    job = QueuedJob(uuid.uuid4(), "txt2img", TXT2IMG)
    runnable = RunnableJobs()
    bare, stocked = real_comfyui(), real_comfyui(checkpoints=["sd15.safetensors"])
    assert not runnable.runs_on(bare, job)
    assert runnable.runs_on(stocked, job)  # reconnected, the model added
    assert not runnable.runs_on(real_comfyui(), job)  # and removed again
    assert runnable.runs_on(stocked, job) and not runnable.runs_on(bare, job)
    assert runnable.runnable(stocked, [job]) == [job] and runnable.runnable(bare, [job]) == []


def test_backends_alike_share_their_capabilities_and_a_job_is_judged_once_for_them() -> None:
    """Backends whose /object_info is the same JSON share one Capabilities (the dispatcher
    keeps whether a job runs by the capabilities' identity); one with another model has its
    own."""
    info = json.loads((FIXTURES / "object_info_full.json").read_text())
    first, like_it = Capabilities.shared(info), Capabilities.shared(json.loads(json.dumps(info)))
    assert like_it is first
    info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] = ["sd15.safetensors"]
    stocked = Capabilities.shared(info)
    assert stocked is not first and stocked.can_run(TXT2IMG) and not first.can_run(TXT2IMG)
    job, runnable = QueuedJob(uuid.uuid4(), "txt2img", TXT2IMG), RunnableJobs()
    assert not runnable.runs_on(first, job) and not runnable.runs_on(like_it, job)
    assert runnable.runs_on(stocked, job)


def test_a_picks_band_is_what_it_runs_of_the_first_priority_within_the_window() -> None:
    """A backend's pick chooses among the jobs of the read (in fair-share order) it can run,
    of the priority of the first of them, up to the first passed AFFINITY_WINDOW times; it
    asks whether it can run the read's jobs past the first only once it looks past that."""
    stocked = real_comfyui(checkpoints=["sd15.safetensors"])
    elsewhere = {**TXT2IMG, "4": {"class_type": "CheckpointLoaderSimple",
                                  "inputs": {"ckpt_name": "sdxl.safetensors"}}}
    first, lower, not_here, due, _ = read = [
        QueuedJob(uuid.uuid4(), "txt2img", TXT2IMG, priority=1),
        QueuedJob(uuid.uuid4(), "txt2img", TXT2IMG, priority=0),
        QueuedJob(uuid.uuid4(), "txt2img", elsewhere, priority=1),
        QueuedJob(uuid.uuid4(), "txt2img", TXT2IMG, priority=1, overtaken=3),
        QueuedJob(uuid.uuid4(), "txt2img", TXT2IMG, priority=1)]
    kept, looked = RunnableJobs(), []

    def runnable(jobs: list[QueuedJob]) -> list[QueuedJob]:
        looked.extend(jobs)
        return kept.runnable(stocked, jobs)

    band = _Band(read, runnable, window=3)
    assert band and band[0] is first and looked == [first]
    assert list(band) == [first, due] and len(band) == 2 and band.before(1) == (first.id,)
    assert looked == read
    assert list(_Band([not_here, lower, first], runnable, window=3)) == [lower]
    assert list(_Band(read, runnable, window=0)) == [first]  # AFFINITY_WINDOW=0: the first
    assert not _Band([not_here], runnable, window=3)


def test_capabilities_no_backend_holds_are_let_go_of_with_what_was_kept_of_them() -> None:
    """What is kept of a backend's capabilities (which jobs they run) does not keep them: a
    backend that reconnected with other models leaves its old ones (a real ComfyUI's are
    megabytes) to be freed."""
    job, runnable = QueuedJob(uuid.uuid4(), "txt2img", TXT2IMG), RunnableJobs()
    old = real_comfyui(checkpoints=["sd15.safetensors"])
    assert runnable.runnable(old, [job]) == [job]
    gone = weakref.ref(old)
    del old
    gc.collect()
    assert gone() is None
    assert not runnable.runs_on(real_comfyui(), job)


def test_unknown_node_class_is_named_and_uploaded_images_are_not_checked() -> None:
    caps = real_comfyui()
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "job-123/input.png"}},
        "2": {"class_type": "TotallyCustomNode", "inputs": {"image": ["1", 0]}},
    }
    assert caps.missing(prompt) == ["node class TotallyCustomNode"]


async def test_job_no_backend_can_run_is_422_naming_what_is_missing(
    settings: Settings, tmp_path: Path
) -> None:
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "txt2img.json").write_text(json.dumps(TXT2IMG))
    settings.workflows_dir = workflows
    async with SimulatedComfyUI() as sim:  # knows only the model-free core nodes
        settings.comfyui_endpoints = [sim.url + "#cpu"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            api = base + settings.route_prefix
            # The backend connects in the background.
            (backend,) = await wait_for_healthy_backends(http, api)
            assert backend["capabilities"]["node_classes"] > 10
            async with http.post(f"{api}/jobs", json={"workflow": "txt2img"}) as response:
                body = await response.json()
    assert response.status == 422
    assert body["error"]["type"] == "no_capable_backend"
    assert body["error"]["missing"] == {
        "cpu": ["node class CheckpointLoaderSimple", "node class KSampler"]}


@pytest.mark.parametrize(("name", "checkpoint"), [
    ("sd15_txt2img", "v1-5-pruned-emaonly-fp16.safetensors"),
    ("sdxl_txt2img", "sd_xl_base_1.0.safetensors"),
    ("sd15_img2img", "v1-5-pruned-emaonly-fp16.safetensors"),
])
def test_gpu_samples_fit_a_real_comfyui_that_has_their_model(name: str, checkpoint: str) -> None:
    workflow = load_catalog(REPO / "workflows").workflows[name]
    prompt = workflow.fill({**{n: s.default for n, s in workflow.params.items()},
                            "prompt": "a lighthouse at dawn", "image": "comfyfleet/x.png"})
    with_model = real_comfyui(checkpoints=[checkpoint])
    assert with_model.missing(prompt) == []
    assert with_model.out_of_range(prompt) == []
    assert real_comfyui().missing(prompt) == [f"CheckpointLoaderSimple.ckpt_name = {checkpoint}"]
