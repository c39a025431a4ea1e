"""The operator's dashboard with a large fleet and a deep history (issue #19's figures).

One `comfyfleet serve` (local storage, API keys: an admin key and `--tenants` tenant keys) in
front of `--backends` zero-duration simulators (`comfyfleet sim`, several per process), on an
embedded PostgreSQL that holds `--jobs` jobs of the last 24 hours. The history is written
straight into the database: one `invert` job through `JobRepository.insert` (the call POST
/jobs makes), copied server-side (`INSERT ... SELECT ... generate_series`) into a mix of
workflows, tenants and states (88 % succeeded with an output, 6 % failed with a node error and
a traceback, 2 % cancelled, 4 % queued), 30 % with a callback URL and a webhook delivery each
(1 % of those dead, 1 % failed, 1 % pending after failed attempts, their next attempt a day
away, to `hooks.invalid`, which never resolves), then ANALYZE.

1. Server time, every backend drained (so the backlog stays): each data endpoint the pages
   call, `--requests` times one after the other, and each page as the browser loads it (the
   HTML, /dashboard/me, then the page's own reads; the fleet page's is the first `fleet` event
   of the live stream), p50/p99. Target: <= 200 ms for each page.
2. The browser's load of the fleet page in headless Chromium (Debian's, driven by Playwright):
   from the start of the navigation to a table row for every backend, by the page's own clock
   (checked at every frame), `--loads` times, each in a new tab. Target: <= 1 s.
3. The live stream's CPU cost: the queued history is cancelled, every backend enabled and
   `invert` jobs submitted open loop at `--rate` per second throughout; each round measures
   three `--window` second windows: nothing open; `--pages` Chromium tabs in one browser
   context, as an operator's browser has them (fleet, jobs, backlog and webhooks pages in
   turn: the tabs share one live stream through live.js's SharedWorker, and each re-reads
   what it shows when the stream says so); `--streams` live streams read by this process
   with no page behind them (what the stream alone costs, and how many events it tells per
   second). The service's CPU per open dashboard is (with - without, scaled by the jobs each
   window completed) / pages. Target: < 1 % of a core at 50 jobs/s. One service process
   completes fewer than 50 jobs/s on this machine (bench/RESULTS.md, throughput); but the
   stream sends a page at most one `fleet` and one `jobs` event every 2 s however busy the
   fleet is (api/dashboard.py, MIN_EVENT_INTERVAL), each `jobs` event makes a page re-read
   what it shows, and each `fleet` event carries every backend, so above a few jobs/s what a
   dashboard costs no longer grows with the rate: the streams' events per second say so.

Run from the repository root:  .venv/bin/python -m bench.dashboard
    [--backends 200] [--jobs 100000] [--requests 50] [--loads 10] [--rate 50] [--pages 8]
    [--streams 50] [--window 60] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
from playwright.async_api import Browser, BrowserContext, async_playwright
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.harness import (
    PARAMS,
    WORKFLOW,
    Component,
    CpuMeter,
    Serve,
    bench_root,
    comfyfleet_serve,
    descendants,
    embedded_postgres,
    fresh_database,
    latency_ms,
    open_loop,
    print_table,
    sim_fleet,
    standard_components,
    workflow_job,
)
from bench.scale import set_draining
from comfyfleet.api.jobs import encode_cursor
from comfyfleet.api_keys import key_hash
from comfyfleet.db import make_engine
from comfyfleet.jobs.models import Job
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.webhooks.signing import new_secret
from tests.test_dashboard import CHROMIUM, CHROMIUM_FLAGS

ADMIN = "bench-admin-5d1c"
WORKFLOWS = ["invert", "blur_image", "sd15_txt2img", "sd15_img2img", "sdxl_txt2img",
             "simulated_work", "simulated_model", "invert_times"]
SPAN_SECONDS = 86_400  # the history covers the last day
PAGE_TARGET_MS = 200.0
BROWSER_TARGET_MS = 1000.0
CPU_TARGET = 0.01  # of a core, per open dashboard
VIEWS = ["fleet", "jobs", "backlog", "webhooks"]
PAGE_OPEN_MS = 120_000  # the machine is shared: a tab may wait long for a core
SETTLE_SECONDS = 3.0  # after the tabs open or close, before a window is measured

# Columns of the copies that differ from the template's. `g.n` runs 1..count, `g.nid` is the
# copy's id; the state follows n % 100.
STATE = ("CASE WHEN g.n % 100 < 88 THEN 'succeeded' WHEN g.n % 100 < 94 THEN 'failed' "
         "WHEN g.n % 100 < 96 THEN 'cancelled' ELSE 'queued' END")
CREATED = "now() - (:span * (:count - g.n)::float8 / :count) * interval '1 second'"
RAN = "g.n % 100 < 94"
COPIED = {
    "id": "g.nid",
    "client_task_id": "NULL",
    "workflow": "(CAST(:workflows AS text[]))"
                "[1 + g.n % cardinality(CAST(:workflows AS text[]))]",
    "status": STATE,
    "progress": "CASE WHEN g.n % 100 < 88 THEN 1.0 ELSE 0.0 END",
    "backend": f"CASE WHEN {RAN} THEN (CAST(:backends AS text[]))"
               "[1 + g.n % cardinality(CAST(:backends AS text[]))] END",
    "prompt_id": f"CASE WHEN {RAN} THEN gen_random_uuid()::text END",
    "attempts": f"CASE WHEN {RAN} THEN 1 ELSE 0 END",
    "created_at": CREATED,
    "dispatched_at": f"CASE WHEN {RAN} THEN {CREATED} + interval '50 ms' END",
    "started_at": f"CASE WHEN {RAN} THEN {CREATED} + interval '200 ms' END",
    "finished_at": f"CASE WHEN g.n % 100 < 96 THEN {CREATED} + interval '4 s' END",
    "outputs": "CASE WHEN g.n % 100 < 88 THEN jsonb_build_array(jsonb_build_object("
               "'node_id', '9', 'filename', 'ComfyUI_00001_.png', 'content_type', 'image/png', "
               "'size', 412733, 'key', g.nid::text || '/9_0.png')) ELSE '[]'::jsonb END",
    "error": "CASE WHEN g.n % 100 BETWEEN 88 AND 93 THEN jsonb_build_object("
             "'type', 'execution_error', 'message', 'Allocation on device 0 would exceed "
             "allowed memory. (out of memory)', 'node_id', '3', 'node_type', 'KSampler', "
             "'details', jsonb_build_object('exception_type', 'torch.OutOfMemoryError', "
             "'traceback', jsonb_build_array('  File \"execution.py\", line 496, in execute\n',"
             " '  File \"nodes.py\", line 1543, in sample\n', 'torch.OutOfMemoryError\n'))) END",
    "callback_url": "CASE WHEN g.n % 10 < 3 THEN 'https://hooks.invalid/comfyfleet' END",
    "api_key_hash": "(CAST(:tenants AS text[]))"
                    "[1 + (g.n / 7) % cardinality(CAST(:tenants AS text[]))]",
}
# One delivery for each finished job with a callback; k numbers them.
DELIVERY_STATE = ("CASE WHEN k % 100 = 0 THEN 'dead' WHEN k % 100 = 1 THEN 'failed' "
                  "WHEN k % 100 = 2 THEN 'pending' ELSE 'delivered' END")
DELIVERIES = f"""
INSERT INTO webhook_deliveries (id, job_id, event_type, message_id, url, host, payload, status,
    attempts, pending_since, next_attempt_at, last_status_code, last_error, created_at)
SELECT gen_random_uuid(), id, 'job.' || status, 'msg_' || md5(id::text), callback_url,
    'hooks.invalid:443', jsonb_build_object('type', 'job.' || status, 'data',
    jsonb_build_object('id', id)), {DELIVERY_STATE},
    CASE WHEN k % 100 = 2 THEN 3 ELSE 1 END, finished_at,
    CASE WHEN k % 100 = 2 THEN now() + interval '1 day' END,
    CASE WHEN k % 100 < 3 THEN 500 ELSE 200 END,
    CASE WHEN k % 100 < 3 THEN 'HTTP 500' END, finished_at
FROM (SELECT *, row_number() OVER (ORDER BY created_at) AS k FROM jobs
      WHERE callback_url IS NOT NULL AND finished_at IS NOT NULL) AS finished
"""
ATTEMPTS = """
INSERT INTO webhook_attempts (delivery_id, attempted_at, status_code, latency_ms, error)
SELECT id, created_at + interval '1 s', last_status_code, 38, last_error FROM webhook_deliveries
"""


def tenant_keys(count: int) -> list[str]:
    return [f"bench-tenant-{index:02d}" for index in range(count)]


async def seed(engine: AsyncEngine, count: int, backends: list[str], tenants: list[str]) -> None:
    """`count` jobs of the last day, and their webhook deliveries (see the module's doc)."""
    values, prompt = workflow_job()
    template, _ = await JobRepository(engine).insert(
        Job(workflow=WORKFLOW, params=values, prompt=prompt))
    columns = [column.name for column in Job.__table__.columns]  # type: ignore[attr-defined]
    async with engine.begin() as conn:
        await conn.execute(
            text(f"INSERT INTO jobs ({', '.join(columns)}) "
                 f"SELECT {', '.join(COPIED.get(c, 't.' + c) for c in columns)} FROM jobs t, "
                 "(SELECT n, gen_random_uuid() AS nid FROM generate_series(1, :count) AS n) g "
                 "WHERE t.id = :template"),
            {"count": count, "template": template.id, "span": SPAN_SECONDS,
             "workflows": WORKFLOWS, "backends": backends,
             "tenants": [key_hash(key) for key in tenants]})
        await conn.execute(text("DELETE FROM jobs WHERE id = :template"),
                           {"template": template.id})
        await conn.execute(text(DELIVERIES))
        await conn.execute(text(ATTEMPTS))
    # Committed: in the transaction SQLAlchemy begins, it was rolled back with its statistics,
    # and the planner guessed (GET /dashboard/activity read every job: 110 ms, not 5).
    async with engine.begin() as conn:
        await conn.execute(text("ANALYZE"))


# --- 1. server time -----------------------------------------------------------------------------

Request = Callable[[aiohttp.ClientSession], Awaitable[None]]


def get(url: str, key: str = ADMIN) -> Request:
    async def request(http: aiohttp.ClientSession) -> None:
        async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as response:
            await response.read()
            assert response.status == 200, (url, response.status)
    return request


def first_fleet_event(url: str) -> Request:
    """The live stream up to its first `fleet` event (every backend), then closed."""
    async def request(http: aiohttp.ClientSession) -> None:
        async with http.get(url, headers={"Authorization": f"Bearer {ADMIN}"}) as response:
            assert response.status == 200, response.status
            fleet = False
            async for line in response.content:
                if line.startswith(b"data:") and fleet:
                    return
                fleet = line.startswith(b"event: fleet")
    return request


async def sample(engine: AsyncEngine, query: str) -> list[Any]:
    async with engine.connect() as conn:
        return list((await conn.execute(text(query))).all())


async def endpoints(serve: Serve, engine: AsyncEngine, tenant: str) -> dict[str, Request]:
    """Every read a dashboard page makes, by name."""
    api = serve.api
    job_id = (await sample(engine, "SELECT id FROM jobs WHERE callback_url IS NOT NULL "
                                   "AND status = 'failed' ORDER BY random() LIMIT 1"))[0][0]
    middle = (await sample(engine, "SELECT created_at, id FROM jobs ORDER BY created_at DESC, "
                                   "id DESC OFFSET (SELECT count(*) / 2 FROM jobs) LIMIT 1"))[0]
    return {
        "GET /dashboard (the page's HTML)": get(f"{serve.base}/dashboard"),
        "GET /dashboard/me": get(f"{api}/dashboard/me"),
        "first fleet event of /dashboard/events": first_fleet_event(f"{api}/dashboard/events"),
        "GET /backends": get(f"{api}/backends"),
        "GET /jobs?limit=50": get(f"{api}/jobs?limit=50"),
        "GET /jobs?limit=50&status=failed": get(f"{api}/jobs?limit=50&status=failed"),
        "GET /jobs?limit=50&status=queued": get(f"{api}/jobs?limit=50&status=queued"),
        "GET /jobs?limit=50&workflow=sdxl_txt2img":
            get(f"{api}/jobs?limit=50&workflow=sdxl_txt2img"),
        "GET /jobs?limit=50&cursor=(the middle)":
            get(f"{api}/jobs?limit=50&cursor={encode_cursor(*middle)}"),
        "GET /jobs?limit=50, tenant key": get(f"{api}/jobs?limit=50", tenant),
        "GET /jobs/{id}": get(f"{api}/jobs/{job_id}"),
        "GET /jobs/{id}/deliveries": get(f"{api}/jobs/{job_id}/deliveries"),
        "GET /dashboard/backlog": get(f"{api}/dashboard/backlog"),
        "GET /dashboard/backlog, tenant key": get(f"{api}/dashboard/backlog", tenant),
        "GET /dashboard/activity": get(f"{api}/dashboard/activity"),
        "GET /dashboard/activity, tenant key": get(f"{api}/dashboard/activity", tenant),
        "GET /tenants": get(f"{api}/tenants"),
        "GET /dashboard/deliveries": get(f"{api}/dashboard/deliveries"),
        "GET /dashboard/deliveries, tenant key": get(f"{api}/dashboard/deliveries", tenant),
    }


# What each page asks for when it opens, in order, after its HTML and /dashboard/me.
PAGES = {
    "fleet": ["first fleet event of /dashboard/events"],
    "jobs": ["GET /jobs?limit=50"],
    "jobs, tenant key": ["GET /jobs?limit=50, tenant key"],
    "job": ["GET /jobs/{id}", "GET /jobs/{id}/deliveries"],
    "backlog": ["GET /dashboard/backlog", "GET /dashboard/activity"],
    "webhooks": ["GET /dashboard/deliveries"],
}


async def timed(http: aiohttp.ClientSession, requests: list[Request], count: int) -> list[float]:
    """`count` runs of `requests` one after the other, after one unmeasured run."""
    seconds = []
    for index in range(count + 1):
        started = time.perf_counter()
        for request in requests:
            await request(http)
        if index:
            seconds.append(time.perf_counter() - started)
    return seconds


async def server_times(
    http: aiohttp.ClientSession, reads: dict[str, Request], count: int, serve: Serve,
) -> dict[str, dict[str, dict[str, float]]]:
    """Each read's and each page's latencies, and each read's CPU time in the service (its
    own, whatever else the machine does)."""
    meter = CpuMeter([Component("comfyfleet serve", [serve.process.pid])])
    found: dict[str, dict[str, dict[str, float]]] = {"endpoints": {}}
    for name, request in reads.items():
        meter.start()
        seconds = await timed(http, [request], count)
        meter.stop()
        found["endpoints"][name] = {
            **latency_ms(seconds),
            "cpu_ms": round(meter.used["comfyfleet serve"] * 1000 / (count + 1), 2)}
    opening = [reads["GET /dashboard (the page's HTML)"], reads["GET /dashboard/me"]]
    found["pages"] = {page: latency_ms(await timed(
        http, [*opening, *(reads[name] for name in names)], count))
        for page, names in PAGES.items()}
    return found


# --- 2. the browser's load of the fleet page ------------------------------------------------------

@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            await browser.close()


async def admin_context(browser: Browser) -> BrowserContext:
    """A browser context logged in as the admin (the key in each tab's storage before the
    page runs)."""
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    await context.add_init_script(
        f"sessionStorage.setItem('comfyfleet.key', {json.dumps(ADMIN)})")
    return context


async def fleet_page_loads(
    browser: Browser, serve: Serve, backends: int, count: int,
) -> list[float]:
    """Seconds from the start of the navigation (the page's own clock, performance.now())
    to a row for every backend, each in a new tab of a fresh browser context (nothing
    cached, no stream already open)."""
    shown = (f"() => document.querySelectorAll('#fleet tbody tr').length === {backends} "
             "&& performance.now()")
    seconds = []
    for _ in range(count):
        page = await (await admin_context(browser)).new_page()
        try:
            await page.goto(f"{serve.base}/dashboard#/fleet")
            loaded = await page.wait_for_function(shown, timeout=30_000)
            seconds.append(float(await loaded.json_value()) / 1000)
        finally:
            await page.context.close()
    return seconds


# --- 3. the live stream's CPU cost ----------------------------------------------------------------

# The reads an open page makes when the stream says something changed, by the endpoint of
# phase 1 that costs the same.
REREADS = {"/jobs?": "GET /jobs?limit=50", "/dashboard/backlog": "GET /dashboard/backlog",
           "/dashboard/activity": "GET /dashboard/activity",
           "/dashboard/deliveries": "GET /dashboard/deliveries", "/tenants": "GET /tenants"}


async def open_pages(
    browser: Browser, serve: Serve, count: int, reads: dict[str, int],
) -> BrowserContext:
    """`count` tabs of one browser context (as an operator's browser has them: one live
    stream shared by every tab through live.js's SharedWorker), each on one of the pages in
    turn; each read they make is counted in `reads` by its endpoint."""
    def note(request: Any) -> None:
        for fragment, name in REREADS.items():
            if fragment in request.url:
                reads[name] = reads.get(name, 0) + 1
                return

    context = await admin_context(browser)
    for index in range(count):
        page = await context.new_page()
        page.on("request", note)
        await page.goto(f"{serve.base}/dashboard#/{VIEWS[index % len(VIEWS)]}",
                        timeout=PAGE_OPEN_MS)
        try:
            await page.wait_for_function(
                "() => document.getElementById('live')?.textContent === 'live'",
                timeout=PAGE_OPEN_MS)
        except Exception:
            print("a page did not go live; it shows:", await page.inner_text("body"),
                  flush=True)
            raise
    return context


async def raw_streams(
    serve: Serve, count: int, events: dict[str, int], stop: asyncio.Event,
) -> None:
    """`count` live streams read as a browser's worker reads them, with no page behind them
    (so no re-reads): each event counted in `events` by its name, until `stop`."""
    async def one(http: aiohttp.ClientSession) -> None:
        async with http.get(f"{serve.api}/dashboard/events") as response:
            assert response.status == 200, response.status
            async for line in response.content:
                if line.startswith(b"event:"):
                    name = line[6:].strip().decode()
                    events[name] = events.get(name, 0) + 1

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN}"},
                                     connector=aiohttp.TCPConnector(limit=0)) as http:
        tasks = [asyncio.create_task(one(http)) for _ in range(count)]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def database_now(engine: AsyncEngine) -> Any:
    return (await sample(engine, "SELECT now()"))[0][0]


async def finished_since(engine: AsyncEngine, since: Any) -> int:
    """Jobs succeeded since `since` (the database's time): not those of the last hour, from
    which the history's own jobs leave at about one a second."""
    async with engine.connect() as conn:
        found = await conn.execute(text("SELECT count(*) FROM jobs WHERE status = 'succeeded' "
                                        "AND finished_at >= :since"), {"since": since})
        return int(found.scalar_one())


def chromium_processes() -> Component:
    """Every Chromium process this benchmark runs now (the browser, its renderers, its
    helpers; not those of anybody else on the machine)."""
    pids = []
    for pid in descendants(os.getpid()):
        try:
            if "chrom" in Path(f"/proc/{pid}/comm").read_text():
                pids.append(pid)
        except OSError:
            continue  # gone meanwhile
    return Component("chromium (the open pages)", pids)


async def cpu_window(
    meter: CpuMeter, engine: AsyncEngine, window: float,
) -> tuple[dict[str, float], int]:
    """Cores busy per component over `window` seconds, and the jobs finished meanwhile."""
    meter.components[-1] = chromium_processes()
    started = await database_now(engine)
    meter.start()
    await asyncio.sleep(window)
    meter.stop()
    cores = {name: round(used / meter.seconds, 4) for name, used in meter.used.items()}
    return cores, await finished_since(engine, started)


async def submit_load(serve: Serve, tenant: str, rate: float, stop: asyncio.Event) -> int:
    """POST /jobs open loop at `rate` per second until `stop`; the number refused."""
    refused = 0
    body = {"workflow": WORKFLOW, "params": PARAMS}
    async with aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {tenant}"},
            connector=aiohttp.TCPConnector(limit=0)) as http:
        async def fire(_: int) -> None:
            nonlocal refused
            if stop.is_set():
                return
            async with http.post(f"{serve.api}/jobs", json=body) as response:
                await response.read()
                refused += response.status != 202
        while not stop.is_set():
            await open_loop(rate, max(1, int(rate * 5)), fire)
    return refused


async def stream_cost(
    browser: Browser, serve: Serve, engine: AsyncEngine, meter: CpuMeter,
    args: argparse.Namespace, tenant: str,
) -> dict[str, Any]:
    """Rounds of a window without dashboards and one with `args.pages` open, under load."""
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE jobs SET status = 'cancelled', finished_at = now() "
                                "WHERE status = 'queued'"))
    async with aiohttp.ClientSession() as http:
        http.headers["Authorization"] = f"Bearer {ADMIN}"
        await set_draining(http, serve.api, False)
    stop = asyncio.Event()
    load = asyncio.create_task(submit_load(serve, tenant, args.rate, stop))
    rounds: list[dict[str, Any]] = []
    try:
        await asyncio.sleep(SETTLE_SECONDS)
        for _ in range(args.rounds):
            without, done_without = await cpu_window(meter, engine, args.window)
            reads: dict[str, int] = {}
            context = await open_pages(browser, serve, args.pages, reads)
            await asyncio.sleep(SETTLE_SECONDS)
            reads.clear()
            with_pages, done_with = await cpu_window(meter, engine, args.window)
            reread = dict(reads)
            await context.close()
            events: dict[str, int] = {}
            closed = asyncio.Event()
            streams = asyncio.create_task(raw_streams(serve, args.streams, events, closed))
            await asyncio.sleep(SETTLE_SECONDS)
            events.clear()
            with_streams, done_streams = await cpu_window(meter, engine, args.window)
            told = dict(events)
            closed.set()
            await streams
            await asyncio.sleep(SETTLE_SECONDS)
            rounds.append({"without": without, "with": with_pages, "streams": with_streams,
                           "reads": reread, "events": told,
                           "jobs_per_second": [round(done_without / args.window, 1),
                                               round(done_with / args.window, 1),
                                               round(done_streams / args.window, 1)]})
    finally:
        stop.set()
        refused = await load
    return {"rounds": rounds, "refused": refused, **per_page(rounds, args.pages),
            **per_stream(rounds, args)}


def extra_cores(
    rounds: list[dict[str, Any]], name: str, window: str, index: int, count: int,
) -> float:
    """Cores of component `name` per page or stream in the `window` of each round, less
    its cores without, scaled to the jobs finished in that window (the machine may let fewer
    or more through); the mean over the rounds."""
    extra: list[float] = []
    for entry in rounds:
        without, loaded = entry["without"][name], entry[window][name]
        rate_without, rate_with = entry["jobs_per_second"][0], entry["jobs_per_second"][index]
        scaled = without * (rate_with / rate_without) if rate_without else without
        extra.append((loaded - scaled) / count)
    return round(sum(extra) / len(extra), 4)


def per_page(rounds: list[dict[str, Any]], pages: int) -> dict[str, float]:
    """Cores per open dashboard (tab)."""
    return {f"{name}, cores per open dashboard": extra_cores(rounds, name, "with", 1, pages)
            for name in ("comfyfleet serve", "postgres")}


def per_stream(rounds: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, float]:
    """Cores per open stream without a page behind it, and the events each stream was told
    per second: what the stream alone costs, whatever the rate of jobs."""
    seconds = args.window * args.streams * len(rounds)
    return {
        "comfyfleet serve, cores per open stream":
            extra_cores(rounds, "comfyfleet serve", "streams", 2, args.streams),
        "events per open stream per second":
            round(sum(sum(entry["events"].values()) for entry in rounds) / seconds, 3),
    }


def reread_cost(result: dict[str, Any], args: argparse.Namespace) -> dict[str, float]:
    """What the pages' re-reads cost the service by phase 1's CPU per request: a figure the
    rest of the machine moves far less than the difference of two windows."""
    rounds = result["stream"]["rounds"]
    cpu_ms = {name: figures["cpu_ms"] for name, figures in result["endpoints"].items()}
    reads = sum(sum(entry["reads"].values()) for entry in rounds)
    seconds = sum(count * cpu_ms[name] for entry in rounds
                  for name, count in entry["reads"].items()) / 1000
    page_seconds = args.window * args.pages * len(rounds)
    return {"re-reads per open dashboard per second": round(reads / page_seconds, 2),
            "their service CPU, cores per open dashboard": round(seconds / page_seconds, 4)}


# --- the run --------------------------------------------------------------------------------------

def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip()


async def main(args: argparse.Namespace) -> None:
    print(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                      "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                      "commit": commit()}), flush=True)
    tenants = tenant_keys(args.tenants)
    with bench_root() as root:
        async with AsyncExitStack() as stack:
            pg = await stack.enter_async_context(embedded_postgres(root))
            database_url = await fresh_database(pg)
            sims = await stack.enter_async_context(sim_fleet(
                args.backends, processes=args.sim_processes, data_dir=root / "sims"))
            serve = await stack.enter_async_context(comfyfleet_serve(
                database_url, root / "data", sims.urls, secret=new_secret(), api_key=ADMIN,
                env_overrides={"API_KEYS": ",".join(tenants), "ADMIN_API_KEYS": ADMIN}))
            http = await stack.enter_async_context(aiohttp.ClientSession())
            http.headers["Authorization"] = f"Bearer {ADMIN}"
            await set_draining(http, serve.api, True)
            async with http.get(f"{serve.api}/backends") as response:
                names = [backend["name"] for backend in await response.json()]
            engine = make_engine(database_url)
            stack.push_async_callback(engine.dispose)
            started = time.monotonic()
            await seed(engine, args.jobs, names, tenants)
            print(f"seeded {args.jobs:,} jobs in {time.monotonic() - started:.1f} s", flush=True)
            reads = await endpoints(serve, engine, tenants[0])
            result: dict[str, Any] = await server_times(http, reads, args.requests, serve)
            report_server(result, args)
            browser = await stack.enter_async_context(chromium())
            result["fleet_page_in_the_browser"] = latency_ms(
                await fleet_page_loads(browser, serve, args.backends, args.loads))
            report_browser(result["fleet_page_in_the_browser"], args)
            meter = CpuMeter([*standard_components([serve], sims, pg), chromium_processes()])
            result["stream"] = await stream_cost(browser, serve, engine, meter, args, tenants[1])
            result["stream"].update(reread_cost(result, args))
            report_stream(result["stream"], args)
    print(json.dumps(result))


def p50_p99(figures: dict[str, float]) -> str:
    return f"{figures['p50']} / {figures['p99']}"


def report_server(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n{args.backends} backends, {args.jobs:,} jobs; {args.requests} requests each, "
          "one at a time (ms, p50 / p99)")
    print_table(["endpoint", "p50 / p99", "service CPU per request (ms)"],
                [(name, p50_p99(f), f["cpu_ms"]) for name, f in result["endpoints"].items()])
    print()
    print_table(["page (HTML, /dashboard/me, its reads)", "p50 / p99", "target"],
                [(name, p50_p99(f), f"<= {PAGE_TARGET_MS:g}")
                 for name, f in result["pages"].items()])
    print(flush=True)


def report_browser(browser: dict[str, float], args: argparse.Namespace) -> None:
    print_table(["in Chromium", "p50 / p99 (ms)", "target"],
                [(f"fleet page, navigation -> {args.backends} rows", p50_p99(browser),
                  f"<= {BROWSER_TARGET_MS:g}")])
    print(flush=True)


def report_stream(stream: dict[str, Any], args: argparse.Namespace) -> None:
    rows = []
    for number, entry in enumerate(stream["rounds"], 1):
        for index, (window, label) in enumerate([
                ("without", "nothing open"), ("with", f"{args.pages} tabs, one browser context"),
                ("streams", f"{args.streams} streams, no page")]):
            rows.append((f"round {number}, {label}",
                         entry[window]["comfyfleet serve"], entry[window]["postgres"],
                         entry[window]["chromium (the open pages)"],
                         entry[window]["machine (all processes)"],
                         entry["jobs_per_second"][index]))
    print_table([f"cores busy at {args.rate:g} jobs/s offered", "serve", "postgres", "chromium",
                 "machine", "jobs/s done"], rows)
    print(f"refused submissions: {stream['refused']}")
    print("events told to the raw streams:", [entry["events"] for entry in stream["rounds"]])
    for name, value in stream.items():
        if "per open" in name:
            print(f"{name}: {value}" + (f" (target < {CPU_TARGET})" if "cores" in name else ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", type=int, default=200)
    parser.add_argument("--sim-processes", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--requests", type=int, default=50, help="per endpoint and page")
    parser.add_argument("--loads", type=int, default=10, help="of the fleet page in Chromium")
    parser.add_argument("--rate", type=float, default=10.0, help="jobs/s during the CPU rounds")
    parser.add_argument("--pages", type=int, default=8, help="dashboards open in a CPU round")
    parser.add_argument("--streams", type=int, default=50,
                        help="live streams with no page behind them, in a CPU round")
    parser.add_argument("--window", type=float, default=60.0, help="seconds a CPU window lasts")
    parser.add_argument("--rounds", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
