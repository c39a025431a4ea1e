"""Two comfyfleet processes on one database share the work: every job runs exactly once, and a
backend never holds more than MAX_INFLIGHT_PER_BACKEND prompts from both together."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.api.v2.assets import asset_store
from comfyfleet.app import running_services, serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.comfy.messages import Status, parse_text
from comfyfleet.execution.tracker import END_WRITE_DELAY
from comfyfleet.intake.graph_jobs import GraphRequest, accept_graph
from comfyfleet.jobs.extra_data import ExtraData
from comfyfleet.jobs.lease import LOCK_SPACE
from comfyfleet.peers import QUEUED_CHANNEL
from comfyfleet.pulse import Pulse
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import (
    LOOPBACK,
    free_ports,
    python_process,
    serve_env,
    wait_for_healthy_backends,
    wait_for_job,
)
from tests.test_api_v2 import rows_holding, work

JOBS = 24
# Long enough for the other process's job to be submitted, and its claim to find no slot.
BLOCKER_SECONDS = 3.0


async def watch_queue(http: aiohttp.ClientSession, url: str, peaks: dict[str, int]) -> None:
    """Record the longest queue the backend reports (its broadcast `status`)."""
    async with http.ws_connect(f"{url}/ws", params={"clientId": uuid.uuid4().hex}) as ws:
        async for frame in ws:
            message = parse_text(frame.data) if frame.type == aiohttp.WSMsgType.TEXT else None
            if isinstance(message, Status) and message.queue_remaining is not None:
                peaks[url] = max(peaks.get(url, 0), message.queue_remaining)


async def test_two_processes_share_one_database_and_the_backend_slots(
    settings: Settings, receiver: WebhookReceiver, data_root: Path
) -> None:
    sim_port = free_ports(2)
    sims = [f"http://{LOOPBACK}:{sim_port + i}" for i in range(2)]
    first_port = free_ports(2)  # two ports at once: two single picks may be one port
    ports = [first_port, first_port + 1]
    bases = [f"http://{LOOPBACK}:{port}" for port in ports]
    peaks: dict[str, int] = {}
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(python_process(
            "comfyfleet", "sim", "--backends", "2", "--port", str(sim_port), "--duration", "0.2",
            ready_url=sims[1] + "/prompt"))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        watchers = [asyncio.create_task(watch_queue(http, url, peaks)) for url in sims]
        for i, (port, base) in enumerate(zip(ports, bases, strict=True)):
            env = serve_env(
                settings, data_root / f"process{i}", port,
                COMFYUI_ENDPOINTS=",".join(f"{url}#gpu{n}" for n, url in enumerate(sims)))
            await stack.enter_async_context(
                python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz"))
        for base in bases:  # both have their backends before any work arrives
            await wait_for_healthy_backends(http, f"{base}/api/v1")
        ids = []
        for n in range(JOBS):
            body = {"workflow": "invert", "params": {"width": 8 + n},
                    "callback_url": receiver.url}
            async with http.post(f"{bases[n % 2]}/api/v1/jobs", json=body) as response:
                assert response.status == 202
                ids.append((await response.json())["id"])
        async with asyncio.timeout(60):
            await receiver.wait_for(JOBS)
        ran = 0
        for url in sims:
            async with http.get(f"{url}/history") as response:
                ran += len(await response.json())
        jobs = []
        for job_id in ids:
            async with http.get(f"{bases[0]}/api/v1/jobs/{job_id}") as response:
                jobs.append(await response.json())
        for watcher in watchers:
            watcher.cancel()
    assert sorted(event["data"]["id"] for event in receiver.verified) == sorted(ids)
    assert all(job["status"] == "succeeded" and job["attempts"] == 1 for job in jobs)
    assert ran == JOBS  # each prompt ran once, on one backend
    assert {job["backend"] for job in jobs} == {"gpu0", "gpu1"}
    assert peaks and max(peaks.values()) <= settings.max_inflight_per_backend


class Gateways:
    """`comfyfleet serve` processes on the test's database, all in front of one backend."""

    def __init__(self, stack: AsyncExitStack, settings: Settings, data_root: Path,
                 backend: str) -> None:
        self.stack, self.settings, self.data_root, self.backend = (
            stack, settings, data_root, backend)
        self.started = 0

    async def start(self, http: aiohttp.ClientSession, **overrides: str
                    ) -> tuple[str, asyncio.subprocess.Process]:
        """`overrides`: more settings of the process (see serve_env)."""
        port = free_ports(1)
        base = f"http://{LOOPBACK}:{port}"
        env = serve_env(self.settings, self.data_root / f"process{self.started}", port,
                        COMFYUI_ENDPOINTS=self.backend + "#gpu", **overrides)
        self.started += 1
        process = await self.stack.enter_async_context(
            python_process("comfyfleet", "serve", env=env, ready_url=base + "/healthz"))
        await wait_for_healthy_backends(http, f"{base}/api/v1")  # its reconciliation done
        return base, process

    async def start_two_woken_only(self, http: aiohttp.ClientSession, inflight: tuple[int, int]
                                   ) -> tuple[str, str]:
        """Two processes, with MAX_INFLIGHT_PER_BACKEND `inflight`, whose safety passes come
        after the test is over: only wake-ups dispatch."""
        first, second = [(await self.start(http, MAX_INFLIGHT_PER_BACKEND=str(slots),
                                           DISPATCH_INTERVAL="60"))[0] for slots in inflight]
        return first, second


async def test_a_killed_process_jobs_are_taken_over_without_a_reconnect(
    settings: Settings, receiver: WebhookReceiver, data_root: Path
) -> None:
    async with AsyncExitStack() as stack:
        # Long enough for the second process to start while the job runs: as long as
        # python_process gives a process to answer (10 s was outlasted on a loaded machine).
        sim = await stack.enter_async_context(SimulatedComfyUI(duration=30.0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateways = Gateways(stack, settings, data_root, sim.url)
        first, first_process = await gateways.start(http)
        body = {"workflow": "invert", "params": {"width": 8}, "callback_url": receiver.url}
        async with http.post(f"{first}/api/v1/jobs", json=body) as response:
            job_id = (await response.json())["id"]
        await wait_for_job(http, f"{first}/api/v1", job_id, "running")
        # Started only now, the second takes no part in it: the job is surely the first's.
        second, _ = await gateways.start(http)
        async with http.get(f"{second}/api/v1/jobs/{job_id}") as response:
            assert (await response.json())["status"] == "running"
        first_process.send_signal(signal.SIGKILL)
        await first_process.wait()

        # The backend never drops the second process's socket: only noticing that the first
        # process died can get this job collected.
        done = await wait_for_job(http, f"{second}/api/v1", job_id, "succeeded", "failed",
                                  seconds=60)  # the rest of its 30 s run, and the takeover
        await receiver.wait_for(1)
        async with http.get(f"{sim.url}/history") as response:
            ran = len(await response.json())
    assert (done["status"], done["attempts"], ran) == ("succeeded", 1, 1)
    assert [event["type"] for event in receiver.verified] == ["job.succeeded"]


async def test_a_prompt_another_live_process_is_sending_is_left_to_it(
    settings: Settings, receiver: WebhookReceiver, data_root: Path
) -> None:
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI())
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateways = Gateways(stack, settings, data_root, sim.url)
        first, _ = await gateways.start(http)
        # The first process's POST /prompt hangs at the backend until the second process has
        # started and looked at the job, however long that takes (the fault holds it until
        # cleared; the first gives up on a POST after 30 s).
        async with http.post(f"{sim.url}/_sim/faults", json={"prompt_delay": 600}) as response:
            assert response.status == 200
        body = {"workflow": "invert", "params": {"width": 8}, "callback_url": receiver.url}
        async with http.post(f"{first}/api/v1/jobs", json=body) as response:
            job_id = (await response.json())["id"]
        await wait_for_job(http, f"{first}/api/v1", job_id, "dispatched")
        # Its prompt is in neither /queue nor /history yet: from here it looks lost.
        second, _ = await gateways.start(http)
        async with http.get(f"{second}/api/v1/jobs/{job_id}") as response:
            assert (await response.json())["status"] == "dispatched"  # not requeued
        async with http.post(f"{sim.url}/_sim/faults", json={"prompt_delay": None}) as response:
            assert response.status == 200

        done = await wait_for_job(http, f"{first}/api/v1", job_id, "succeeded", "failed")
        await receiver.wait_for(1)
        async with http.get(f"{sim.url}/history") as response:
            ran = len(await response.json())
    assert (done["status"], done["attempts"], ran) == ("succeeded", 1, 1)


async def test_a_job_queued_through_one_process_is_dispatched_by_another_at_once(
    settings: Settings, data_root: Path
) -> None:
    """The process a job is submitted to has no free slot; the other one, told by the
    database as the job commits, claims it at once, not at its next safety pass."""
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI(duration=30.0))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateways = Gateways(stack, settings, data_root, sim.url)
        full, free = await gateways.start_two_woken_only(http, (1, 2))
        body = {"workflow": "invert", "params": {"width": 8}}
        async with http.post(f"{free}/api/v1/jobs", json=body) as response:
            first = (await response.json())["id"]
        # On the backend (whichever process took it): the first process takes no second job.
        await wait_for_job(http, f"{free}/api/v1", first, "running")
        submitted = time.monotonic()
        async with http.post(f"{full}/api/v1/jobs", json={**body, "params": {"width": 9}}
                             ) as response:
            second = (await response.json())["id"]
        job = await wait_for_job(http, f"{free}/api/v1", second, "dispatched", "running",
                                 seconds=10)
        waited = time.monotonic() - submitted
    assert job["backend"] == "gpu"
    assert waited < 1.0  # 30 to 130 ms here; up to DISPATCH_INTERVAL before


async def submit_v2(http: aiohttp.ClientSession, base: str, graph: dict[str, Any],
                    **fields: Any) -> str:
    async with http.post(f"{base}/api/v2/jobs", json={"workflow": graph, **fields}
                         ) as response:
        assert response.status == 201, await response.text()
        job_id: str = (await response.json())["id"]
        return job_id


async def v2_job(http: aiohttp.ClientSession, base: str, job_id: str) -> dict[str, Any]:
    async with http.get(f"{base}/api/v2/jobs/{job_id}") as response:
        job: dict[str, Any] = await response.json()
        return job


async def test_a_job_with_extra_data_is_dispatched_only_by_the_process_that_holds_it(
    settings: Settings, data_root: Path, engine: AsyncEngine
) -> None:
    """Its partner key lives in the memory of the process it was submitted to: another
    process with a free slot leaves it queued (and takes the job after it), and the holder
    sends it, key and all, once it has a slot."""
    partner_key = f"partner-{uuid.uuid4().hex}"
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI())
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateways = Gateways(stack, settings, data_root, sim.url)
        holder, other = await gateways.start_two_woken_only(http, (1, 3))
        # A job of its own too, so that the holder's is the slot it takes (the other process,
        # hearing of a job as it commits, may claim it first).
        blocker = await submit_v2(http, holder, work(seconds=60.0, steps=60),
                                  extra_data={"api_key_comfy_org": f"blocker-{partner_key}"})
        await wait_for_job(http, f"{holder}/api/v1", blocker, "running")
        # The holder has no slot now; the other process hears of each job as it commits.
        held = await submit_v2(http, holder, work(seconds=0.5, steps=2),
                               extra_data={"api_key_comfy_org": partner_key})
        after = await submit_v2(http, holder, work(seconds=60.0, steps=60))
        await wait_for_job(http, f"{other}/api/v1", after, "dispatched", "running")
        assert (await v2_job(http, other, held))["status"] == "queued"  # passed over

        # The holder's slot frees: it sends the job.
        for job_id in (after, blocker):
            async with http.post(f"{holder}/api/v2/jobs/{job_id}/cancel") as response:
                assert response.status == 200
        await wait_for_job(http, f"{holder}/api/v1", held, "running")
        async with http.get(f"{sim.url}/queue") as response:
            (running,) = (await response.json())["queue_running"]
        done = await wait_for_job(http, f"{other}/api/v1", held)
        async with engine.connect() as connection:
            holder_id, dispatched_by = (await connection.execute(text(
                "SELECT extra_data_holder, dispatched_by FROM jobs WHERE id = :id"),
                {"id": held})).one()
    assert running[1] == done["prompt_id"]
    assert running[3]["api_key_comfy_org"] == partner_key
    assert done["status"] == "succeeded"
    assert holder_id is not None and dispatched_by == holder_id
    assert await rows_holding(engine, partner_key) == []


async def queue_lengths(http: aiohttp.ClientSession, url: str,
                        seen: list[tuple[float, int]], changed: Pulse) -> None:
    """Record when the backend reports each new length of its queue (its broadcast `status`),
    beating `changed`."""
    async with http.ws_connect(f"{url}/ws", params={"clientId": uuid.uuid4().hex}) as ws:
        async for frame in ws:
            message = parse_text(frame.data) if frame.type == aiohttp.WSMsgType.TEXT else None
            if isinstance(message, Status) and message.queue_remaining is not None \
                    and (not seen or seen[-1][1] != message.queue_remaining):
                seen.append((time.monotonic(), message.queue_remaining))
                changed.beat()


async def test_a_slot_another_process_frees_is_taken_at_once_by_the_one_waiting(
    settings: Settings, data_root: Path
) -> None:
    """The backend's only slot is held by a prompt of one process; another holds a job only it
    can send (its extra_data). When the prompt ends, the slot counts free in the database only
    once the first process has written its end (a moment after every process read the
    backend's `status`): told so then, the waiting process sends its job at once, not at its
    next safety pass."""
    lengths: list[tuple[float, int]] = []
    lengthened = Pulse()
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI())
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateways = Gateways(stack, settings, data_root, sim.url)
        # The holding process has room for two by its count: it claims on hearing of the held
        # job, and sees nothing it could take queued.
        waiting, holding = await gateways.start_two_woken_only(http, (1, 2))
        watcher = asyncio.create_task(queue_lengths(http, sim.url, lengths, lengthened))
        # The blocker's output takes 2 s to fetch: its job ends long after its prompt, and the
        # slot counts free in the database only once the prompt's end is written on its own.
        async with http.post(f"{sim.url}/_sim/faults", json={
                "output_size": 20_000, "view_bytes_per_second": 10_000}) as response:
            assert response.status == 200
        blocker = await submit_v2(http, holding, work(seconds=BLOCKER_SECONDS, steps=3),
                                  extra_data={"api_key_comfy_org": "blocker-key"})
        await wait_for_job(http, f"{holding}/api/v1", blocker, "running")
        held = await submit_v2(http, waiting, work(seconds=0.5, steps=2),
                               extra_data={"api_key_comfy_org": "held-key"})
        submitted = time.monotonic()
        job = await wait_for_job(http, f"{waiting}/api/v1", held, "running", seconds=15)
        async with asyncio.timeout(5):  # its prompt's arrival in the queue, told as it came
            while (changed := lengthened.next()) and lengths[-1][1] == 0:
                await changed.wait()
        watcher.cancel()
    # The blocker's queue of one, then none, then the held job's.
    (freed, _), (arrived, _) = lengths[-2:]
    assert [length for _, length in lengths[-3:]] == [1, 0, 1]
    assert job["backend"] == "gpu"
    assert freed - submitted > 0.5  # it waited: its claims on submit found no slot
    # 40-80 ms here; up to DISPATCH_INTERVAL before, and END_WRITE_DELAY more had the
    # blocker's process left the end unwritten for that moment, as it does while it knows of
    # no job waiting for the slot.
    assert arrived - freed < END_WRITE_DELAY


async def test_a_job_whose_extra_data_holder_is_killed_before_dispatch_fails(
    settings: Settings, data_root: Path
) -> None:
    """SIGKILL of the process holding a queued job's partner key: the key is gone with it,
    so another process fails the job (`extra_data_lost`) as soon as its lease is gone,
    rather than leave it queued for ever or run it without the key."""
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI())
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateways = Gateways(stack, settings, data_root, sim.url)
        holder, holder_process = await gateways.start(http, MAX_INFLIGHT_PER_BACKEND="1")
        other, _ = await gateways.start(http, MAX_INFLIGHT_PER_BACKEND="1")
        blocker = await submit_v2(http, other, work(seconds=60.0, steps=60))
        await wait_for_job(http, f"{other}/api/v1", blocker, "running")
        held = await submit_v2(http, holder, work(seconds=0.5, steps=2),
                               extra_data={"api_key_comfy_org": "partner-key"})
        assert (await v2_job(http, other, held))["status"] == "queued"  # no slot anywhere
        holder_process.send_signal(signal.SIGKILL)
        await holder_process.wait()

        failed = await wait_for_job(http, f"{other}/api/v1", held, "failed", seconds=15)
        job = await v2_job(http, other, held)
    assert failed["error"]["type"] == "extra_data_lost"
    assert (job["status"], job["error"]["code"]) == ("failed", "extra_data_lost")
    assert failed["attempts"] == 0  # never sent


async def test_a_job_sent_again_after_its_holder_is_gone_fails_instead(
    settings: Settings, data_root: Path
) -> None:
    """The holder is killed while the job runs (another process follows it), then the backend
    restarts and loses the prompt: sending it again needs the key, which is gone, so the job
    fails `extra_data_lost`, never run again without it."""
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI())
        http = await stack.enter_async_context(aiohttp.ClientSession())
        gateways = Gateways(stack, settings, data_root, sim.url)
        holder, holder_process = await gateways.start(http)
        other, _ = await gateways.start(http)
        held = await submit_v2(http, holder, work(seconds=60.0, steps=60),
                               extra_data={"api_key_comfy_org": "partner-key"})
        await wait_for_job(http, f"{holder}/api/v1", held, "running")
        holder_process.send_signal(signal.SIGKILL)
        await holder_process.wait()
        async with http.post(f"{sim.url}/_sim/restart") as response:
            assert response.status == 200

        failed = await wait_for_job(http, f"{other}/api/v1", held, "failed", seconds=20)
        async with http.get(f"{sim.url}/queue") as response:
            queue = await response.json()
    assert failed["error"]["type"] == "extra_data_lost"
    assert failed["attempts"] == 1  # sent once, by the holder
    assert queue == {"queue_running": [], "queue_pending": []}


async def test_a_held_key_is_forgotten_when_another_process_ends_its_job(
    settings: Settings,
) -> None:
    """A job held here but cancelled through another process: this one hears of no ending,
    and forgets the key at its next watch pass all the same."""
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI())
        settings.comfyui_endpoints = [sim.url + "#gpu"]
        holder = await stack.enter_async_context(running_services(settings))
        other = await stack.enter_async_context(running_services(settings))
        await holder.fleet.set_draining("gpu", True)  # the job stays queued
        held = holder.fleet.extra_data
        job, created = await accept_graph(
            holder.repository, asset_store(holder), [],
            GraphRequest(work(seconds=0.5, steps=2), None, None, None,
                         extra_data=ExtraData({"api_key_comfy_org": "partner-key"})),
            backlog=None, held=held)
        assert created and held.get(job.id) is not None
        cancelled = await other.fleet.cancel(job.id)
        assert cancelled is not None and cancelled.status == "cancelled"
        async with asyncio.timeout(5):
            while held.get(job.id) is not None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # the watch's pass: no event to wait on


@dataclass
class ServiceAndPeer:
    """A `serve` on the test's database, and the test's own connection playing another
    process, which hears the service's notifications on QUEUED_CHANNEL."""

    base: str
    db: asyncpg.Connection
    heard: asyncio.Queue[str]
    http: aiohttp.ClientSession

    async def submit(self) -> str:
        """A job's id, submitted to the service."""
        body = {"workflow": "invert", "params": {"width": 8}}
        async with self.http.post(f"{self.base}/api/v1/jobs", json=body) as response:
            assert response.status == 202, await response.text()
            job_id: str = (await response.json())["id"]
            return job_id

    async def join(self, process: int) -> None:
        """Hold the lease of `process` and say so, as a process that starts does."""
        await self.db.execute("SELECT pg_advisory_lock($1, $2)", LOCK_SPACE, process)
        await self.db.execute(f"NOTIFY {QUEUED_CHANNEL}, '{process}'")


@asynccontextmanager
async def service_and_peer(settings: Settings) -> AsyncIterator[ServiceAndPeer]:
    async with AsyncExitStack() as stack:
        base = await stack.enter_async_context(serving(settings))
        assert settings.database_url is not None
        db = await asyncpg.connect(make_url(settings.database_url).set(
            drivername="postgresql").render_as_string(hide_password=False))
        stack.push_async_callback(db.close)
        heard: asyncio.Queue[str] = asyncio.Queue()
        await db.add_listener(QUEUED_CHANNEL, lambda *notice: heard.put_nowait(notice[3]))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        yield ServiceAndPeer(base, db, heard, http)


async def test_a_process_alone_tells_nobody_of_its_jobs_until_another_joins(
    settings: Settings,
) -> None:
    """One `serve` alone on its database sends no notification for the jobs submitted to it
    (nobody would hear it); once another process holds its lease and says so, it tells of
    the jobs submitted after. The test's own connection plays the other process."""
    other = 12345
    async with service_and_peer(settings) as service:
        await asyncio.gather(*(service.submit() for _ in range(5)))
        await service.join(other)
        before: list[str] = []
        async with asyncio.timeout(10):
            while (payload := await service.heard.get()) != str(other):
                before.append(payload)
            # The service hears that in its own time: each job submitted after is told.
            while True:
                await service.submit()
                try:
                    async with asyncio.timeout(0.5):
                        told = await service.heard.get()
                    break
                except TimeoutError:
                    continue
    assert before == []  # the service told nobody of the five
    assert told.isdigit() and told != str(other)


async def jobs_statements_started(db: asyncpg.Connection, seconds: float) -> list[str]:
    """The statements naming the jobs table that the other connections to the database start
    in the next `seconds`, watched in pg_stat_activity (each shows its last statement until
    its next one: the watch passes a second apart stay in view far longer than a look)."""
    since = await db.fetchval("SELECT clock_timestamp()")
    seen: dict[tuple[int, Any], str] = {}
    deadline = asyncio.get_running_loop().time() + seconds
    while asyncio.get_running_loop().time() < deadline:
        for row in await db.fetch(
                "SELECT pid, query_start, query FROM pg_stat_activity WHERE datname = "
                "current_database() AND pid <> pg_backend_pid() AND query_start > $1", since):
            if re.search(r"\bjobs\b", row["query"]):
                seen[row["pid"], row["query_start"]] = row["query"]
        await asyncio.sleep(0.02)  # a look at what runs: there is no event to wait on
    return list(seen.values())


async def test_an_idle_process_reads_the_jobs_table_only_when_another_process_stops(
    settings: Settings,
) -> None:
    """With no backends and nothing submitted, `serve` runs no statement against the jobs
    table: its watch reads which processes hold their lease every second, and the jobs they
    left only once one of them is gone. The test's own connection plays the other process,
    which holds a queued job's extra_data and stops."""
    other = 12345
    async with service_and_peer(settings) as service:
        await service.join(other)
        async with asyncio.timeout(10):
            while True:  # until the service tells of a job: it knows the other is alive
                job_id = await service.submit()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.5):
                        while await service.heard.get() == str(other):
                            pass
                        break
        await service.db.execute("UPDATE jobs SET extra_data_holder = $1 WHERE id = $2",
                                 other, uuid.UUID(job_id))
        await service.db.execute("SELECT pg_advisory_unlock($1, $2)", LOCK_SPACE, other)
        failed = await wait_for_job(service.http, f"{service.base}/api/v1", job_id, "failed",
                                    seconds=15)
        assert failed["error"]["type"] == "extra_data_lost"
        idle = await jobs_statements_started(service.db, 4.0)
    assert idle == []
