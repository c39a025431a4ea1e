"""Nothing is lost when the gateway is SIGKILLed or a backend restarts mid-job."""

from __future__ import annotations

import asyncio
import signal
import uuid
from contextlib import AsyncExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.app import serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.db import driver_connection
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from comfyfleet.storage.local import PART_PREFIX
from tests.support import LOOPBACK, free_ports, python_process, serve_env, wait_for_job

PROMPT_SECONDS = 1.5


def sim_process(port: int, seconds: float = PROMPT_SECONDS) -> Any:
    return python_process(
        "comfyfleet", "sim", "--port", str(port), "--duration", str(seconds),
        ready_url=f"http://{LOOPBACK}:{port}/prompt",
    )


async def job_status(http: aiohttp.ClientSession, api: str, job_id: str) -> dict[str, Any]:
    async with http.get(f"{api}/jobs/{job_id}") as response:
        assert response.status == 200
        job: dict[str, Any] = await response.json()
        return job


async def backend_history(http: aiohttp.ClientSession, port: int, prompt_id: str
                          ) -> dict[str, Any]:
    async with http.get(f"http://{LOOPBACK}:{port}/history/{prompt_id}") as response:
        entry: dict[str, Any] = await response.json()
        return entry


async def submit(http: aiohttp.ClientSession, api: str, callback: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        body = {"workflow": "invert", "params": {"width": 16 + i}, "callback_url": callback}
        async with http.post(f"{api}/jobs", json=body) as response:
            assert response.status == 202
            ids.append((await response.json())["id"])
    return ids


async def test_gateway_killed_mid_job_resumes_without_losing_or_rerunning_anything(
    settings: Settings, receiver: WebhookReceiver, data_root: Path
) -> None:
    sim_port, service_port = free_ports(1), free_ports(1)
    env = serve_env(settings, data_root, service_port,
                    COMFYUI_ENDPOINTS=f"{LOOPBACK}:{sim_port}#gpu")
    base = f"http://{LOOPBACK}:{service_port}"
    api = base + settings.route_prefix
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(sim_process(sim_port))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        first = await stack.enter_async_context(
            python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz")
        )
        # Two jobs fill the backend's slots (one running, one pending there); one waits here.
        ids = await submit(http, api, receiver.url, 3)
        await wait_for_job(http, api, ids[0], "running")
        async with asyncio.timeout(10):  # the second prompt is in the backend's queue
            while True:
                async with http.get(f"http://{LOOPBACK}:{sim_port}/queue") as response:
                    if len((await response.json())["queue_pending"]) == 1:
                        break
                await asyncio.sleep(0.05)
        running = (await job_status(http, api, ids[0]))["prompt_id"]
        first.send_signal(signal.SIGKILL)
        await first.wait()
        # The running prompt finishes while we are down.
        async with asyncio.timeout(10):
            while not await backend_history(http, sim_port, running):  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # polling the backend: no local event to wait on
        await stack.enter_async_context(
            python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz")
        )
        async with asyncio.timeout(30):
            await receiver.wait_for(3)
        jobs = [await job_status(http, api, job_id) for job_id in ids]
    assert receiver.rejected == 0
    assert sorted(event["data"]["id"] for event in receiver.verified) == sorted(ids)
    for job in jobs:
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 1, job  # re-attached, not run again
        (output,) = job["outputs"]
        assert (data_root / "outputs" / output["key"]).stat().st_size == output["size"]


async def test_a_prompt_adopted_from_a_killed_gateway_ends_by_the_queues_status(
    settings: Settings, receiver: WebhookReceiver, data_root: Path
) -> None:
    """The prompt still runs as the new process adopts it; its frames go to the killed
    process's socket, so only the `status` broadcast of its queue's change, then its /history,
    tell its end: well before a quiet prompt's poll (a minute here)."""
    sim_port, service_port = free_ports(1), free_ports(1)
    env = serve_env(settings, data_root, service_port, QUIET_PROMPT_SECONDS="60",
                    COMFYUI_ENDPOINTS=f"{LOOPBACK}:{sim_port}#gpu")
    base = f"http://{LOOPBACK}:{service_port}"
    api = base + settings.route_prefix
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(sim_process(sim_port, seconds=10))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        first = await stack.enter_async_context(
            python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz"))
        (job_id,) = await submit(http, api, receiver.url, 1)
        await wait_for_job(http, api, job_id, "running")
        first.send_signal(signal.SIGKILL)
        await first.wait()
        await stack.enter_async_context(
            python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz"))
        prompt_id = (await job_status(http, api, job_id))["prompt_id"]
        assert not await backend_history(http, sim_port, prompt_id)  # adopted still running
        async with asyncio.timeout(30):
            await receiver.wait_for(1)
        job = await job_status(http, api, job_id)
    assert job["status"] == "succeeded", job
    assert job["attempts"] == 1, job


async def test_backend_restart_loses_its_queue_and_the_job_runs_again(
    settings: Settings, receiver: WebhookReceiver
) -> None:
    port = free_ports(1)
    settings.comfyui_endpoints = [f"{LOOPBACK}:{port}#gpu"]
    async with AsyncExitStack() as stack:
        backend = await stack.enter_async_context(sim_process(port))
        api = await stack.enter_async_context(serving(settings)) + settings.route_prefix
        http = await stack.enter_async_context(aiohttp.ClientSession())
        (job_id,) = await submit(http, api, receiver.url, 1)
        await wait_for_job(http, api, job_id, "running")
        backend.send_signal(signal.SIGKILL)
        await backend.wait()
        # Restarted ComfyUI: empty queue and history, so the prompt is lost, not late.
        await stack.enter_async_context(sim_process(port))
        async with asyncio.timeout(30):
            await receiver.wait_for(1)
        job = await job_status(http, api, job_id)
    assert job["status"] == "succeeded"
    assert job["attempts"] == 2
    assert len(job["outputs"]) == 1


async def test_gateway_killed_while_uploading_stores_the_output_once_after_restart(
    settings: Settings, receiver: WebhookReceiver, data_root: Path
) -> None:
    """The collector dies with its process halfway through a slow /view; the next process
    finds the job in `uploading` and collects it again under the same key."""
    port = free_ports(1)
    base = f"http://{LOOPBACK}:{port}"
    api = base + settings.route_prefix
    output_bytes = 3 * 1024 * 1024
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI(
            output_size=output_bytes, view_bytes_per_second=1024 * 1024))
        env = serve_env(settings, data_root, port, COMFYUI_ENDPOINTS=f"{sim.url}#gpu")
        http = await stack.enter_async_context(aiohttp.ClientSession())
        first = await stack.enter_async_context(
            python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz"))
        (job_id,) = await submit(http, api, receiver.url, 1)
        uploading = await wait_for_job(http, api, job_id, "uploading")
        async with asyncio.timeout(10):  # a part of the file is through
            while not any(part.stat().st_size for part in (data_root / "outputs").rglob(  # noqa: ASYNC110
                    f"{PART_PREFIX}*")):
                await asyncio.sleep(0.05)  # the storage directory: no event to wait on
        first.send_signal(signal.SIGKILL)
        await first.wait()
        await stack.enter_async_context(
            python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz"))
        async with asyncio.timeout(30):
            await receiver.wait_for(1)
        job = await job_status(http, api, job_id)
    assert (job["status"], job["attempts"]) == ("succeeded", 1)
    # Adopted, not dispatched again: the upload began when the first process began it.
    assert job["uploading_at"] == uploading["uploading_at"] is not None, job
    assert datetime.fromisoformat(job["uploading_at"]) <= datetime.fromisoformat(
        job["finished_at"]), job
    (output,) = job["outputs"]
    assert output["size"] == output_bytes
    stored = [path for path in (data_root / "outputs").rglob("*") if path.is_file()]
    assert [p.relative_to(data_root / "outputs").as_posix() for p in stored] == [output["key"]]
    assert stored[0].stat().st_size == output_bytes  # whole, once, no leftover part files
    assert [event["type"] for event in receiver.verified] == ["job.succeeded"]


async def test_gateway_killed_before_writing_a_jobs_end_of_executing_stores_its_output_once(
    settings: Settings, receiver: WebhookReceiver, data_root: Path, engine: AsyncEngine
) -> None:
    """A job whose prompt ended, another queued behind it for the backend's one slot, has
    its end of executing left to the statement writing its end while its outputs are stored
    (execution/tracker.py `_defer_end`). The gateway is SIGKILLed during that store, before
    either write: the database shows the job where its last write left it, no upload time.
    The next process reads the prompt's end from /history and collects the outputs again
    under the same key: each job succeeds once, at its first attempt, its output whole and
    stored once, one webhook each."""
    port = free_ports(1)
    base = f"http://{LOOPBACK}:{port}"
    api = base + settings.route_prefix
    output_bytes = 1024 * 1024
    async with AsyncExitStack() as stack:
        # An output that takes a second to read from the backend; each prompt runs 0.3 s,
        # the second job queued meanwhile.
        sim = await stack.enter_async_context(SimulatedComfyUI(
            duration=0.3, output_size=output_bytes, view_bytes_per_second=output_bytes))
        env = serve_env(settings, data_root, port, COMFYUI_ENDPOINTS=f"{sim.url}#gpu",
                        MAX_INFLIGHT_PER_BACKEND="1")
        http = await stack.enter_async_context(aiohttp.ClientSession())
        first = await stack.enter_async_context(
            python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz"))
        ids = await submit(http, api, receiver.url, 2)
        async with driver_connection(engine) as connection:
            # The second job is claimed as the first's prompt is read to have ended: the
            # first's outputs are being stored from then on, for a second.
            async with asyncio.timeout(10):
                while await connection.fetchval(  # noqa: ASYNC110
                        "SELECT status FROM jobs WHERE id = $1", uuid.UUID(ids[1])) == "queued":
                    await asyncio.sleep(0.01)  # the database: no event to wait on here
            # Time for a write of the end of executing made at once (as when it was, with a
            # job queued) to be seen; well within END_WRITE_DELAY.
            await asyncio.sleep(0.1)
            first.send_signal(signal.SIGKILL)
            await first.wait()
            left = await connection.fetchrow(
                "SELECT status, uploading_at FROM jobs WHERE id = $1", uuid.UUID(ids[0]))
        assert left["status"] in ("dispatched", "running"), dict(left)
        assert left["uploading_at"] is None, dict(left)
        await stack.enter_async_context(
            python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz"))
        async with asyncio.timeout(30):
            await receiver.wait_for(2)
        jobs = await statuses(http, api, ids)
    keys = []
    for job in jobs:
        assert (job["status"], job["attempts"]) == ("succeeded", 1), job
        (output,) = job["outputs"]
        assert output["size"] == output_bytes
        keys.append(output["key"])
    stored = [path for path in (data_root / "outputs").rglob("*") if path.is_file()]
    assert sorted(p.relative_to(data_root / "outputs").as_posix() for p in stored) == sorted(keys)
    assert all(path.stat().st_size == output_bytes for path in stored)  # whole, no part files
    assert sorted((event["type"], event["data"]["id"]) for event in receiver.verified) == sorted(
        ("job.succeeded", job_id) for job_id in ids)


async def test_gateway_and_backend_lost_while_uploading_run_the_job_again_with_a_new_upload_time(
    settings: Settings, receiver: WebhookReceiver, data_root: Path
) -> None:
    """The gateway is SIGKILLed once a job is `uploading` (its `uploading_at` set) from a slow
    /view, and its backend goes with it; the next process (with a second backend) finds that
    backend still unreachable past the grace period, takes the job over and requeues it, and
    the second backend runs it again. While it runs again its timeline shows no upload (the
    claim clears `uploading_at`, sql/claim.sql); at the end its upload time is the new run's,
    later than the first and no later than its end.

    The gateway killed alone does not dispatch the job again: its successor finds the job
    `uploading` on a reachable backend and collects it again (execution/tracker.py
    `_reconcile`), under the first run's `uploading_at` (the test above keeps attempts at 1);
    only a backend lost past the grace period sends an uploading job back to the claim."""
    port = free_ports(1)
    base = f"http://{LOOPBACK}:{port}"
    api = base + settings.route_prefix
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        # Long enough to be seen running: the claim's effect is what the test looks at.
        second = await stack.enter_async_context(SimulatedComfyUI(duration=PROMPT_SECONDS))
        # 1 MiB at 64 KiB/s: the job stays `uploading` for 16 s, far longer than the kill takes.
        async with SimulatedComfyUI(output_size=1024 * 1024,
                                    view_bytes_per_second=64 * 1024) as lost:
            lost_url = lost.url
            first = await stack.enter_async_context(python_process(
                "comfyfleet", "serve", ready_url=base + "/healthz",
                env=serve_env(settings, data_root, port, COMFYUI_ENDPOINTS=f"{lost_url}#lost")))
            (job_id,) = await submit(http, api, receiver.url, 1)
            uploading = await wait_for_job(http, api, job_id, "uploading")
            assert uploading["uploading_at"] is not None, uploading
            first.send_signal(signal.SIGKILL)
            await first.wait()
        await stack.enter_async_context(python_process(
            "comfyfleet", "serve", ready_url=base + "/healthz",
            env=serve_env(settings, data_root, port, BACKEND_GRACE_SECONDS="1",
                          COMFYUI_ENDPOINTS=f"{lost_url}#lost,{second.url}#second")))
        again = await wait_for_job(http, api, job_id, "running")
        done = await wait_for_job(http, api, job_id)
    assert (again["status"], again["attempts"]) == ("running", 2), again
    assert (uploading["backend"], again["backend"]) == ("lost", "second"), again
    assert again["uploading_at"] is None, again  # not the first run's upload
    assert (done["status"], done["attempts"]) == ("succeeded", 2), done
    first_upload, upload, finished = (datetime.fromisoformat(at) for at in (
        uploading["uploading_at"], done["uploading_at"], done["finished_at"]))
    assert first_upload < upload <= finished, done


async def statuses(http: aiohttp.ClientSession, api: str, ids: list[str]) -> list[dict[str, Any]]:
    return [await job_status(http, api, job_id) for job_id in ids]


async def test_gateway_killed_before_its_post_reaches_the_backend_runs_each_job_once(
    settings: Settings, receiver: WebhookReceiver, data_root: Path
) -> None:
    """Killed after claiming jobs (dispatched, prompt ids on record) but before the backend
    had their prompts: the backend holds each POST /prompt (the `prompt_delay` fault) and
    drops it when its client dies. The next process finds those prompts in neither /queue nor
    /history and requeues the jobs, which then run once each, under new prompt ids."""
    port = free_ports(1)
    base = f"http://{LOOPBACK}:{port}"
    api = base + settings.route_prefix
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI())
        env = serve_env(settings, data_root, port, COMFYUI_ENDPOINTS=f"{sim.url}#gpu")
        http = await stack.enter_async_context(
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)))
        # Far longer than this test takes: a held POST ends only by its client going away.
        async with http.post(f"{sim.url}/_sim/faults", json={"prompt_delay": 600}) as response:
            assert response.status == 200
        first = await stack.enter_async_context(
            python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz"))
        ids = await submit(http, api, receiver.url, 3)
        # Both slots of the backend claimed (the oldest jobs first), their POSTs held there;
        # one job still waits here.
        for job_id in ids[:2]:
            await wait_for_job(http, api, job_id, "dispatched")
        claimed = ["dispatched", "dispatched", "queued"]
        assert [j["status"] for j in await statuses(http, api, ids)] == claimed
        claims = {j["id"]: j["prompt_id"] for j in await statuses(http, api, ids)
                  if j["status"] == "dispatched"}
        first.send_signal(signal.SIGKILL)
        await first.wait()
        assert all(claims.values()), claims  # on record before the POST
        async with http.post(f"{sim.url}/_sim/faults", json={"prompt_delay": None}) as response:
            assert response.status == 200
        await stack.enter_async_context(
            python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz"))
        try:
            async with asyncio.timeout(30):
                await receiver.wait_for(3)
        except TimeoutError:
            raise AssertionError(f"jobs left behind: {await statuses(http, api, ids)}") from None
        jobs = await statuses(http, api, ids)
        deliveries = []
        for job_id in ids:
            async with http.get(f"{api}/jobs/{job_id}/deliveries") as response:
                deliveries.append((await response.json())["deliveries"])
        async with http.get(f"{sim.url}/history") as response:
            history = await response.json()
        async with http.get(f"{sim.url}/queue") as response:
            queue = await response.json()

    for job in jobs:
        assert job["status"] == "succeeded", job
        # A claim spends an attempt; after a crash the claim's fate is unknown (never sent, or
        # lost by the backend: the same to /queue and /history), so the requeue keeps it.
        assert job["attempts"] == (2 if job["id"] in claims else 1), job
        assert job["prompt_id"] != claims.get(job["id"]), job  # run under a new prompt id
        (output,) = job["outputs"]
        assert (data_root / "outputs" / output["key"]).stat().st_size == output["size"]
    # Each job ran on the backend once: the held prompts never reached its queue.
    assert sorted(history) == sorted(job["prompt_id"] for job in jobs)
    assert queue == {"queue_running": [], "queue_pending": []}
    stored = sorted(p.relative_to(data_root / "outputs").as_posix()
                    for p in (data_root / "outputs").rglob("*") if p.is_file())
    assert stored == sorted(job["outputs"][0]["key"] for job in jobs)
    # One webhook per job, and its delivery (one, with one webhook-id) is the one we got.
    assert receiver.rejected == 0
    assert sorted(event["data"]["id"] for event in receiver.verified) == sorted(ids)
    assert {event["type"] for event in receiver.verified} == {"job.succeeded"}
    received = {event["data"]["id"]: event["webhook_id"] for event in receiver.verified}
    for job_id, found in zip(ids, deliveries, strict=True):
        (delivery,) = found
        assert (delivery["event_type"], delivery["webhook_id"]) == ("job.succeeded",
                                                                   received[job_id])
