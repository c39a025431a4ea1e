"""The dispatcher's claim transactions: a free backend that would take nothing from the backlog
is not asked in a transaction of its own (comfyfleet_dispatch_claims counts them by outcome)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import Pool

from comfyfleet import sql
from comfyfleet.app import serving
from comfyfleet.db import driver_connection
from comfyfleet.jobs.lease import LOCK_SPACE
from comfyfleet.jobs.models import Job, JobStatus
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.metrics import REGISTRY
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import LOOPBACK, wait_for_job

CLAIM = sql.queries("claim")["claim"]
SD15 = "v1-5-pruned-emaonly-fp16.safetensors"  # what workflows/sd15_txt2img.json loads
SDXL = "sd_xl_base_1.0.safetensors"  # and workflows/sdxl_txt2img.json
# All but "empty": a pass woken with nothing queued claims once.
# A trigger noting each write of a job's status, and its transaction.
NOTE_JOB_WRITES = """
    CREATE TABLE job_writes (id uuid, status text, xid bigint);
    CREATE FUNCTION note_job_write() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO job_writes VALUES (NEW.id, NEW.status, txid_current());
        RETURN NEW;
    END $$;
    CREATE TRIGGER note_job_write AFTER INSERT OR UPDATE OF status ON jobs
    FOR EACH ROW EXECUTE FUNCTION note_job_write()"""
OUTCOMES = ("took", "no_slot", "not_accepting", "cannot_run", "waits_for_warm", "slower",
            "tenant_limit", "raced")


async def until_healthy(http: aiohttp.ClientSession, base: str, count: int) -> None:
    async with asyncio.timeout(30):
        while True:
            async with http.get(f"{base}/backends") as response:
                if sum(backend["healthy"] for backend in await response.json()) == count:
                    return
            await asyncio.sleep(0.05)  # polling the API: there is no local event to wait on


def claims() -> dict[str, float]:
    """The claims this process has made so far, by outcome."""
    return {outcome: REGISTRY.get_sample_value(
        "comfyfleet_dispatch_claims_total", {"outcome": outcome}) or 0.0
        for outcome in OUTCOMES}


async def test_backends_that_cannot_run_the_backlog_cost_one_claim_not_one_each(
    settings: Settings,
) -> None:
    async with AsyncExitStack() as stack:
        sd15 = [await stack.enter_async_context(
            SimulatedComfyUI(name=f"sd15-{n}", models=[SD15]))
            for n in range(3)]
        sdxl = await stack.enter_async_context(
            SimulatedComfyUI(name="sdxl", models=[SDXL]))
        # The three that cannot run the job listed first: as idle as the one that can, they
        # are asked first.
        settings.comfyui_endpoints = [f"{sim.url}#{sim.name}" for sim in [*sd15, sdxl]]
        base = await stack.enter_async_context(serving(settings)) + settings.route_prefix
        http = await stack.enter_async_context(aiohttp.ClientSession())
        await until_healthy(http, base, 4)
        before = claims()
        body = {"workflow": "sdxl_txt2img", "params": {"prompt": "a lighthouse", "seed": 1}}
        async with http.post(f"{base}/jobs", json=body) as response:
            assert response.status == 202, await response.text()
            job_id = (await response.json())["id"]
        job = await wait_for_job(http, base, job_id, "succeeded")
        assert job["backend"] == "sdxl", job
        made = {outcome: count - before[outcome] for outcome, count in claims().items()
                if count > before[outcome]}
        # The first claim reads the backlog and finds nothing it can run; the other two
        # sd15 backends are asked in memory, on what it read; sdxl's claim takes the job.
        assert made == {"cannot_run": 1, "took": 1}


def claim_transactions() -> float:
    """The claim transactions this process has made so far."""
    return REGISTRY.get_sample_value("comfyfleet_dispatch_claim_transactions_total") or 0.0


def empty_claims() -> float:
    """The claims that found nothing queued (each a transaction of its own)."""
    return REGISTRY.get_sample_value(
        "comfyfleet_dispatch_claims_total", {"outcome": "empty"}) or 0.0


async def submit(http: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> str:
    async with http.post(f"{base}/jobs", json=body) as response:
        assert response.status == 202, await response.text()
        job_id: str = (await response.json())["id"]
    return job_id


async def test_the_backend_that_takes_the_job_takes_it_in_the_first_claims_transaction(
    settings: Settings,
) -> None:
    async with AsyncExitStack() as stack:
        sd15 = await stack.enter_async_context(
            SimulatedComfyUI(name="sd15", models=[SD15]))
        sdxl = await stack.enter_async_context(
            SimulatedComfyUI(name="sdxl", models=[SDXL]))
        # The one that cannot run the job listed first: as idle as the other, asked first.
        settings.comfyui_endpoints = [f"{sim.url}#{sim.name}" for sim in [sd15, sdxl]]
        base = await stack.enter_async_context(serving(settings)) + settings.route_prefix
        http = await stack.enter_async_context(aiohttp.ClientSession())
        await until_healthy(http, base, 2)
        before, transactions, empty = claims(), claim_transactions(), empty_claims()
        job_id = await submit(http, base, {"workflow": "sdxl_txt2img",
                                           "params": {"prompt": "a lighthouse", "seed": 1}})
        job = await wait_for_job(http, base, job_id, "succeeded")
        assert job["backend"] == "sdxl", job
        made = {outcome: count - before[outcome] for outcome, count in claims().items()
                if count > before[outcome]}
        # sd15's claim read the backlog and found nothing it could run; sdxl, asked on that
        # read, took the job under its own lock in the same transaction. (Passes woken as the
        # backends connected may find nothing queued, a transaction each.)
        assert made == {"cannot_run": 1, "took": 1}
        assert claim_transactions() - transactions - (empty_claims() - empty) == 1


async def test_a_slot_freed_with_the_backlog_known_empty_costs_no_claim(
    settings: Settings,
) -> None:
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI(name="gpu"))
        settings.comfyui_endpoints = [f"{sim.url}#gpu"]
        settings.dispatch_interval = 600  # no safety pass within the test
        base, http = await served(stack, settings)
        await wait_for_job(http, base, await submit(http, base, {"workflow": "invert"}),
                           "succeeded")
        before, transactions, empty = claims(), claim_transactions(), empty_claims()
        for color in range(1, 6):  # each submitted once the one before is done: found anew
            job_id = await submit(http, base, {"workflow": "invert", "params": {"color": color}})
            await wait_for_job(http, base, job_id, "succeeded")
        made = {outcome: count - before[outcome] for outcome, count in claims().items()
                if count > before[outcome]}
        # Each claim saw the job it took as the last queued; the slot each job freed found
        # the backlog known empty, and no claim looked again (a pass woken late by the
        # service's start, on a busy machine, may still look once).
        assert made == {"took": 5}
        assert empty_claims() - empty <= 1
        assert claim_transactions() - transactions - (empty_claims() - empty) == 5


async def test_a_pass_that_takes_several_jobs_reads_the_backlog_once(
    settings: Settings,
) -> None:
    claims_read: list[bool] = []  # each claim statement the service runs: whether it only read

    def told(query: Any) -> None:
        if query.query == CLAIM:
            claims_read.append(query.args[0] is None)

    def watch(connection: Any, _: Any) -> None:
        connection.driver_connection.add_query_logger(told)

    event.listen(Pool, "connect", watch)
    try:
        async with AsyncExitStack() as stack:
            sim = await stack.enter_async_context(SimulatedComfyUI(name="gpu"))
            settings.comfyui_endpoints = [f"{sim.url}#gpu"]
            settings.max_inflight_per_backend = 3
            settings.dispatch_interval = 600  # no safety pass within the test
            base, http = await served(stack, settings)
            async with http.patch(f"{base}/backends/gpu", json={"drain": True}) as response:
                assert response.status == 200, await response.text()
            job_ids = [await submit(http, base, {"workflow": "invert", "params": {"color": c}})
                       for c in range(3)]
            await asyncio.sleep(0)
            claims_read.clear()
            async with http.patch(f"{base}/backends/gpu", json={"drain": False}) as response:
                assert response.status == 200, await response.text()
            for job_id in job_ids:
                await wait_for_job(http, base, job_id, "succeeded")
    finally:
        event.remove(Pool, "connect", watch)
    # The backend back takes the three in one pass: a read, then each take on the read the
    # take before it made; their slots freed find the backlog known empty. (A pass woken late,
    # on a busy machine, by the submits' notices or the drain's end may still read once after
    # them: seen on main at 2 of 16 runs two at a time.)
    assert claims_read[:4] == [True, False, False, False]
    assert claims_read[4:] in ([], [True]), claims_read


async def test_a_job_submitted_with_a_backend_free_is_dispatched_in_its_inserts_commit(
    settings: Settings, engine: AsyncEngine,
) -> None:
    """Nothing queued, the dispatcher idle and a slot free: the job is stored already taken,
    never written queued (a trigger notes each write's status and transaction); with the slot
    taken, the job is stored queued and dispatched by a take of its own once a slot frees.
    A Comfy API v2 submit alike, answered as taken: on its backend, position 0."""
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI(name="gpu"))
        base, http = await served_idle(stack, settings, sim, engine)
        before = claims()
        first = await submit(http, base, {"workflow": "simulated_work",
                                          "params": {"seconds": 1.0, "steps": 2}})
        second = await submit(http, base, {"workflow": "simulated_work",
                                           "params": {"seconds": 0.1, "steps": 1}})
        await ended_on(http, base, "gpu", "succeeded", first, second)
        graph = {"1": {"class_type": "EmptyImage",
                       "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                 "2": {"class_type": "SaveImage",
                       "inputs": {"images": ["1", 0], "filename_prefix": "ComfyUI"}}}
        async with http.post(base.removesuffix(settings.route_prefix) + "/api/v2/jobs",
                             json={"workflow": graph}) as response:
            answer = await response.json()
            assert response.status == 201, answer
        assert answer["queue_position"] == 0, answer
        third = answer["id"]
        await ended_on(http, base, "gpu", "succeeded", third)
        async with driver_connection(engine) as connection:
            writes = {(str(row["id"]), row["status"]): row["xid"] for row in await connection.fetch(
                "SELECT * FROM job_writes WHERE status IN ('queued', 'dispatched')")}
        assert (first, "dispatched") in writes and (first, "queued") not in writes, writes
        assert writes[second, "queued"] != writes[second, "dispatched"], writes
        assert (third, "dispatched") in writes and (third, "queued") not in writes, writes
        made = {outcome: count - before[outcome] for outcome, count in claims().items()
                if count > before[outcome]}
        assert made.get("took") == 3, made


# socket(7): a read's ancillary data says when the kernel received the data read (for TCP, on
# loopback: as the sender wrote it).
SO_TIMESTAMPNS = 35


def stamped_read(sock: socket.socket) -> tuple[bytes, int]:
    """What one read of `sock` (SO_TIMESTAMPNS set) got, and when (ns) the kernel received it."""
    data, ancillary, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(16))
    stamps = [struct.unpack("qq", raw[:16]) for level, kind, raw in ancillary
              if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS]
    return data, (stamps[0][0] * 10**9 + stamps[0][1]) if stamps else 0


class StampedRelay:
    """A TCP relay (threads, blocking sockets) in front of the server at `url`, noting when
    the kernel received each read from a client that begins with `prefix`: the order in which
    the service wrote its requests, whatever the order its readers were scheduled in."""

    def __init__(self, url: str, prefix: bytes) -> None:
        parts = urlsplit(url)
        self._target = (parts.hostname, parts.port)
        self._prefix = prefix
        self._sockets = [socket.create_server((LOOPBACK, 0))]
        self.url = f"http://{LOOPBACK}:{self._sockets[0].getsockname()[1]}"
        self.stamps: list[int] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sockets[0].accept()
            except OSError:  # closed
                return
            client.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            upstream = socket.create_connection(self._target)
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := (read := stamped_read(source))[0]:
                if data.startswith(self._prefix):
                    self.stamps.append(read[1])
                sink.sendall(data)
        except OSError:
            pass
        finally:
            source.close()
            sink.close()

    def close(self) -> None:
        for sock in self._sockets:
            # Wakes the thread blocked on it (a close alone leaves an accept() waiting).
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def answer_stamped(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST `body` to `url` (blocking): when the kernel received the answer's first bytes, and
    the answer's JSON."""
    parts = urlsplit(url)
    payload = json.dumps(body).encode()
    with socket.create_connection((parts.hostname, parts.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.sendall(f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + payload)
        answer, stamp = stamped_read(sock)
        while piece := sock.recv(65536):
            answer += piece
    head, _, content = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 201"), answer
    return stamp, json.loads(content)


async def test_a_submits_prompt_goes_to_its_backend_before_its_answer_to_the_client(
    settings: Settings,
) -> None:
    """A job stored already taken has its POST /prompt written before the submit's answer:
    the job's way to its end runs through the backend, and the answer (rendered, written)
    waits for it, not the other way round. Seen by when the kernel received each: the POST at
    a relay in front of the backend, the answer at the client."""
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI(name="gpu"))
        relay = StampedRelay(sim.url, b"POST /prompt")
        stack.callback(relay.close)
        settings.comfyui_endpoints = [f"{relay.url}#gpu"]
        base, http = await served(stack, settings)
        v2 = base.removesuffix(settings.route_prefix) + "/api/v2/jobs"
        graph: dict[str, dict[str, Any]] = {
            "1": {"class_type": "EmptyImage",
                  "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage",
                  "inputs": {"images": ["1", 0], "filename_prefix": "ComfyUI"}}}
        # Those stored already taken but the first (which may open the connection POST
        # /prompt reuses): the first job or two are stored queued, until the dispatcher is
        # idle with the backlog known empty (see `served_idle`).
        taken = 0
        for color in range(10):
            graph["1"]["inputs"]["color"] = color
            sent = len(relay.stamps)
            answered, job = await asyncio.to_thread(answer_stamped, v2, {"workflow": graph})
            await wait_for_job(http, base, job["id"], "succeeded")
            assert len(relay.stamps) == sent + 1
            if color and job["queue_position"] == 0:  # stored taken: on its backend
                assert relay.stamps[sent] < answered, (relay.stamps[sent] - answered) / 1e6
                taken += 1
                if taken == 3:
                    return
        raise AssertionError(f"{taken} of 10 jobs were stored already taken")


async def test_a_job_whose_claim_fails_as_it_is_stored_is_stored_queued(
    settings: Settings, engine: AsyncEngine,
) -> None:
    """The submit's own take and claim fail (PostgreSQL refuses every write dispatching a job,
    by a trigger): the submit is still accepted, its job stored queued, not refused with their
    error; once dispatching works again it runs."""
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI(name="gpu"))
        base, http = await served_idle(stack, settings, sim, engine)
        async with driver_connection(engine) as connection:
            await connection.execute("""
                CREATE FUNCTION refuse_dispatch() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN
                    RAISE EXCEPTION 'dispatching refused by the test';
                END $$;
                CREATE TRIGGER refuse_dispatch BEFORE INSERT OR UPDATE OF status ON jobs
                FOR EACH ROW WHEN (NEW.status = 'dispatched')
                EXECUTE FUNCTION refuse_dispatch()""")
        refused = await submit(http, base, {"workflow": "invert"})
        assert await status_in_database(engine, refused) == "queued"
        async with driver_connection(engine) as connection:
            await connection.execute("DROP TRIGGER refuse_dispatch ON jobs")
        # The dispatcher's pass after the submit failed as the claim did; the next submit's
        # wakes it.
        after = await submit(http, base, {"workflow": "invert"})
        await ended_on(http, base, "gpu", "succeeded", refused, after)


async def test_a_backend_takes_its_next_job_before_the_end_of_the_last_one_is_recorded(
    settings: Settings, engine: AsyncEngine,
) -> None:
    async with AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimulatedComfyUI(name="gpu"))
        settings.comfyui_endpoints = [f"{sim.url}#gpu"]
        settings.max_inflight_per_backend = 1
        base, http = await served(stack, settings)
        first = await submit(http, base, {"workflow": "simulated_work",
                                          "params": {"seconds": 3.0, "steps": 2}})
        await wait_for_job(http, base, first, "running")
        second = await submit(http, base, {"workflow": "simulated_work",
                                           "params": {"seconds": 0.1, "steps": 1}})
        async with row_locked(engine, first):
            # The statement recording the first job's end (uploading) waits for this lock:
            # slow bookkeeping, as under a busy database.
            # Its prompt ends on the backend meanwhile: its slot is free, the second job
            # goes to the backend while the first is still recorded as running there.
            await on_the_backend_beside(http, base, engine, second, first, seconds=10)
        await ended_on(http, base, "gpu", "succeeded", first, second)


async def test_a_backend_whose_slots_another_process_filled_is_counted_as_having_none(
    settings: Settings, engine: AsyncEngine,
) -> None:
    """The backend after a claim's first chooses a job on its own count of its prompts; the
    claim's take counts every process's under its lock and refuses: no_slot, whatever the
    tenant's limit (there is none here)."""
    other = 12345  # a live process's id: the test's connection holds its lease
    async with AsyncExitStack() as stack:
        sd15 = await stack.enter_async_context(SimulatedComfyUI(name="sd15", models=[SD15]))
        sdxl = await stack.enter_async_context(SimulatedComfyUI(name="sdxl", models=[SDXL]))
        # The one that cannot run the job listed first: as idle as the other, asked first.
        settings.comfyui_endpoints = [f"{sim.url}#{sim.name}" for sim in [sd15, sdxl]]
        settings.max_inflight_per_backend = 1
        settings.dispatch_interval = 600  # no safety pass within the test
        base = await stack.enter_async_context(serving(settings)) + settings.route_prefix
        http = await stack.enter_async_context(aiohttp.ClientSession())
        await until_healthy(http, base, 2)
        peer = await stack.enter_async_context(driver_connection(engine))
        await peer.execute("SELECT pg_advisory_lock($1, $2)", LOCK_SPACE, other)
        # The other process's prompt fills sdxl's one slot: this process does not follow it.
        await JobRepository(engine).insert(Job(
            workflow="sdxl_txt2img", prompt={}, status=JobStatus.RUNNING, backend="sdxl",
            prompt_id="elsewhere", dispatched_by=other))
        before = claims()
        await submit(http, base, {"workflow": "sdxl_txt2img",
                                  "params": {"prompt": "a lighthouse", "seed": 1}})
        refused = {"no_slot", "tenant_limit", "not_accepting", "raced"}
        async with asyncio.timeout(30):
            # Until a take is refused (counted after the pick's cannot_run); the job stays
            # queued, so another wake (the submit's own notice) may claim again: every claim
            # counts the same pair.
            while all(claims()[outcome] == before[outcome]  # noqa: ASYNC110
                      for outcome in refused):
                await asyncio.sleep(0.05)  # the metric is in this process: no event to wait on
        made = {outcome: count - before[outcome] for outcome, count in claims().items()
                if count > before[outcome]}
    assert set(made) == {"cannot_run", "no_slot"}
    assert made["no_slot"] <= made["cannot_run"]


async def test_a_take_refused_as_its_job_is_stored_leaves_it_to_a_claim_in_the_same_commit(
    settings: Settings, engine: AsyncEngine,
) -> None:
    """The dispatcher, idle with nothing queued, picks the backend with room by its own count
    before the insert; the database counts another process's prompt there and refuses the take
    (no_slot), writing nothing: the dispatcher's claim in the insert's transaction takes the
    job for the other backend, one commit for both."""
    other = 12345  # a live process's id: the test's connection holds its lease
    async with AsyncExitStack() as stack:
        sims = [await stack.enter_async_context(SimulatedComfyUI(name=name))
                for name in ("a", "b")]
        settings.comfyui_endpoints = [f"{sim.url}#{sim.name}" for sim in sims]
        settings.max_inflight_per_backend = 1
        settings.dispatch_interval = 600  # no safety pass within the test
        base = await stack.enter_async_context(serving(settings)) + settings.route_prefix
        http = await stack.enter_async_context(aiohttp.ClientSession())
        await until_healthy(http, base, 2)
        await wait_for_job(http, base, await submit(http, base, {"workflow": "invert"}),
                           "succeeded")
        peer = await stack.enter_async_context(driver_connection(engine))
        await peer.execute("SELECT pg_advisory_lock($1, $2)", LOCK_SPACE, other)
        await JobRepository(engine).insert(Job(
            workflow="invert", prompt={}, status=JobStatus.RUNNING, backend="a",
            prompt_id="elsewhere", dispatched_by=other))
        await peer.execute(NOTE_JOB_WRITES)
        before = claims()
        job_id = await submit(http, base, {"workflow": "invert", "params": {"color": 1}})
        await ended_on(http, base, "b", "succeeded", job_id)
        writes = {row["status"]: row["xid"] for row in await peer.fetch(
            "SELECT status, xid FROM job_writes WHERE id = $1", uuid.UUID(job_id))}
    assert writes["queued"] == writes["dispatched"], writes
    made = {outcome: count - before[outcome] for outcome, count in claims().items()
            if count > before[outcome]}
    # The take's refusal, and the claim's read counting "a" full.
    assert made == {"no_slot": 2, "took": 1}, made


async def served(stack: AsyncExitStack, settings: Settings
                 ) -> tuple[str, aiohttp.ClientSession]:
    """The service of `settings` (one backend) on `stack`, healthy: its API's base URL and
    a client session."""
    base = await stack.enter_async_context(serving(settings)) + settings.route_prefix
    http = await stack.enter_async_context(aiohttp.ClientSession())
    await until_healthy(http, base, 1)
    return base, http


async def served_idle(stack: AsyncExitStack, settings: Settings, sim: SimulatedComfyUI,
                      engine: AsyncEngine) -> tuple[str, aiohttp.ClientSession]:
    """`served`, with `sim` its one backend of one slot and no safety pass within the test,
    once a job stored already taken has succeeded: the dispatcher idle, the backlog known
    empty (the job's own take left it so) and no claim due when its slot freed. The first job
    a service takes is stored queued when it comes before the start's claim has read the
    backlog; one taken by a pass may leave the backlog unknown, and the claim that reads it
    again on the slot freed may still run as the test submits (seen under load): so jobs are
    run until one was stored taken. Each job's writes are noted (`NOTE_JOB_WRITES`)."""
    settings.comfyui_endpoints = [f"{sim.url}#gpu"]
    settings.max_inflight_per_backend = 1
    settings.dispatch_interval = 600
    base, http = await served(stack, settings)
    async with driver_connection(engine) as connection:
        await connection.execute(NOTE_JOB_WRITES)
        for _ in range(5):
            job = await submit(http, base, {"workflow": "invert"})
            await wait_for_job(http, base, job, "succeeded")
            if not await connection.fetchval(
                    "SELECT count(*) FROM job_writes WHERE id = $1 AND status = 'queued'",
                    uuid.UUID(job)):
                return base, http
    raise AssertionError("no job was stored already taken in five")


@asynccontextmanager
async def row_locked(engine: AsyncEngine, job_id: str) -> AsyncIterator[None]:
    """The job's row locked by another transaction: a statement writing to it waits (slow
    bookkeeping, as under a busy database)."""
    async with driver_connection(engine) as blocker, blocker.transaction():
        await blocker.execute("SELECT 1 FROM jobs WHERE id = $1 FOR UPDATE", uuid.UUID(job_id))
        yield


async def status_in_database(engine: AsyncEngine, job_id: str) -> str:
    async with driver_connection(engine) as reader:
        status: str = await reader.fetchval("SELECT status FROM jobs WHERE id = $1",
                                            uuid.UUID(job_id))
        return status


async def on_the_backend_beside(http: aiohttp.ClientSession, base: str, engine: AsyncEngine,
                                second: str, first: str, *, seconds: float) -> None:
    """Job `second` reaches the backend while `first` is still recorded as running there."""
    await wait_for_job(http, base, second, "dispatched", "running", "uploading", "succeeded",
                       seconds=seconds)
    assert await status_in_database(engine, first) == "running"


async def ended_on(http: aiohttp.ClientSession, base: str, backend: str, status: str,
                   *job_ids: str) -> None:
    """Each of `job_ids` ends `status`, on `backend`."""
    for job_id in job_ids:
        assert (await wait_for_job(http, base, job_id, status))["backend"] == backend


def runs_executed(workflow: str) -> float:
    """The prompts of `workflow` this process has read the end of (their `run` phase)."""
    return REGISTRY.get_sample_value("comfyfleet_job_phase_seconds_count",
                                     {"phase": "run", "workflow": workflow}) or 0.0


async def test_a_job_queued_while_the_end_of_the_last_is_left_unwritten_takes_its_slot(
    settings: Settings, engine: AsyncEngine,
) -> None:
    """The first job's claim saw the backlog empty, so its end of executing is left to the
    statement recording its end (its outputs are slow to read) or to its own write a moment
    later; neither can commit here. A job queued meanwhile takes the backend's one slot at
    once (the claim counts the ended prompt out), not at the dispatcher's next safety pass."""
    async with AsyncExitStack() as stack:
        # A 4 KB output read at 2 KB/s: its collection outlasts END_WRITE_DELAY.
        sim = await stack.enter_async_context(SimulatedComfyUI(
            name="gpu", duration=0.5, output_size=4096, view_bytes_per_second=2048))
        base, http = await served_idle(stack, settings, sim, engine)
        executed = runs_executed("invert")
        first = await submit(http, base, {"workflow": "invert", "params": {"color": 1}})
        await wait_for_job(http, base, first, "running")
        async with row_locked(engine, first):
            # Every write of the first job's end (of executing, or with its outputs) waits
            # for this lock.
            async with asyncio.timeout(30):
                # Its end read from the backend (a counter of this process: no event to wait on).
                while runs_executed("invert") == executed:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            second = await submit(http, base, {"workflow": "invert", "params": {"color": 2}})
            await on_the_backend_beside(http, base, engine, second, first, seconds=30)
        await ended_on(http, base, "gpu", "succeeded", first, second)


async def test_a_job_queued_while_the_failure_of_the_last_is_being_written_takes_its_slot(
    settings: Settings, engine: AsyncEngine,
) -> None:
    """A prompt that failed on the backend frees its slot for this process's claims as its
    failure is read, and holds it in the database's count until the failure is written: the
    claim counts it out meanwhile, so a job queued for the backend's one slot takes it at
    once, not at the dispatcher's next safety pass."""
    async with AsyncExitStack() as stack:
        # The failure strikes at the prompt's last node, after its checkpoint's 3 s load.
        sim = await stack.enter_async_context(SimulatedComfyUI(
            name="gpu", fail_rate=1.0, models=[SD15], load_seconds=3.0))
        settings.comfyui_endpoints = [f"{sim.url}#gpu"]
        settings.max_inflight_per_backend = 1
        settings.dispatch_interval = 600  # no safety pass within the test
        base, http = await served(stack, settings)
        body = {"workflow": "sd15_txt2img", "params": {"prompt": "a lighthouse", "seed": 1}}
        first = await submit(http, base, body)
        await wait_for_job(http, base, first, "running")
        async with row_locked(engine, first):
            # The statement writing the first job's failure waits for this lock.
            second = await submit(http, base, {**body, "params": {"prompt": "a boat"}})
            await wait_for_job(http, base, second, "dispatched", "running", "failed",
                               seconds=30)
            assert await status_in_database(engine, first) == "running"
        await ended_on(http, base, "gpu", "failed", first, second)
