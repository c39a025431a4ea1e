"""The operator's dashboard in a real headless Chromium (Debian's, driven by Playwright): the
fleet, jobs, backlog and webhook pages against the service with simulated backends."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import BrowserContext, Page, async_playwright, expect
from sqlalchemy import text

from comfyfleet.app import serving
from comfyfleet.db import make_engine
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.conftest import StartReceiver
from tests.support import (
    serve_replicas,
    wait_for_healthy_backends,
)
from tests.webhook_support import Answer, Gateway

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Required here (root, no GPU, no network beyond loopback).
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]
# Set to a directory (e.g. docs) to keep a copy of each page's screenshot there.
SCREENSHOTS_ENV = "COMFYFLEET_SCREENSHOTS"
WAIT_MS = 20_000
KEY_A, KEY_B, ADMIN = "tenant-a-1c9f0e7d", "tenant-b-6b2a84c1", "admin-93e0d55a"
TABS = 8  # more than the six connections Chromium opens to one host

expect.set_options(timeout=WAIT_MS)


@pytest.fixture(scope="session")
async def browser() -> AsyncIterator[BrowserContext]:
    """One headless Chromium for the session, on a new empty profile."""
    profile = tempfile.mkdtemp(prefix="comfyfleet-chromium-")
    try:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 800})
            yield context
            await context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
async def page(browser: BrowserContext) -> AsyncIterator[Page]:
    """A new tab: its own sessionStorage, so no key carries over from another test."""
    tab = await browser.new_page()
    yield tab
    await tab.close()


async def screenshot(page: Page, tmp_path: Path, name: str) -> None:
    path = tmp_path / "screenshots" / f"dashboard-{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    keep = os.environ.get(SCREENSHOTS_ENV)
    if keep:
        shutil.copy(path, Path(keep) / path.name)


async def api(http: aiohttp.ClientSession, method: str, url: str, key: str | None = None,
              body: Any = None, status: int = 200) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with http.request(method, url, json=body, headers=headers) as response:
        assert response.status == status, await response.text()
        return await response.json()


@pytest.fixture
async def sims() -> AsyncIterator[list[SimulatedComfyUI]]:
    async with SimulatedComfyUI(name="a") as first, SimulatedComfyUI(name="b") as second:
        yield [first, second]


async def test_fleet_shows_each_backend_and_drains_one_from_the_page(
    settings: Settings, sims: list[SimulatedComfyUI], page: Page, tmp_path: Path
) -> None:
    settings.comfyui_endpoints = [f"{sims[0].url}#gpu-a", f"{sims[1].url}#gpu-b"]
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        prefix = base + settings.route_prefix
        await page.goto(f"{base}/dashboard#/fleet")
        rows = page.locator("#fleet tbody tr")
        await expect(rows).to_have_count(2)
        for name in ("gpu-a", "gpu-b"):
            await expect(page.locator(f'tr[data-backend="{name}"] .health')).to_have_text("up")
        await expect(page.locator("#live")).to_have_text("live")
        await screenshot(page, tmp_path, "fleet")

        await page.locator('tr[data-backend="gpu-a"] button.drain').click()
        await expect(page.locator('tr[data-backend="gpu-a"] .health')).to_have_text("draining")
        backends = {b["name"]: b for b in await api(http, "GET", f"{prefix}/backends")}
        assert backends["gpu-a"]["draining"] is True
        assert backends["gpu-b"]["draining"] is False

        # Changed elsewhere (the API): the open page follows without a reload.
        await page.evaluate("() => { window.notReloaded = true; }")
        await api(http, "PATCH", f"{prefix}/backends/gpu-a", body={"drain": False})
        await expect(page.locator('tr[data-backend="gpu-a"] .health')).to_have_text("up")
        assert await page.evaluate("() => window.notReloaded === true")

        # Enable and remove from the page too (remove: once drained, after the confirm).
        await page.locator('tr[data-backend="gpu-b"] button.drain').click()
        await expect(page.locator('tr[data-backend="gpu-b"] .health')).to_have_text("draining")
        await page.locator('tr[data-backend="gpu-b"] button.enable').click()
        await expect(page.locator('tr[data-backend="gpu-b"] .health')).to_have_text("up")
        backends = {b["name"]: b for b in await api(http, "GET", f"{prefix}/backends")}
        assert backends["gpu-b"]["draining"] is False
        await page.locator('tr[data-backend="gpu-b"] button.drain').click()
        page.once("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await page.locator('tr[data-backend="gpu-b"] button.remove:enabled').click()
        await expect(rows).to_have_count(1)
        assert [b["name"] for b in await api(http, "GET", f"{prefix}/backends")] == ["gpu-a"]


async def test_eight_tabs_share_one_live_stream_and_outlive_the_tab_that_opened_it(
    settings: Settings, sims: list[SimulatedComfyUI], browser: BrowserContext, tmp_path: Path
) -> None:
    """Chromium opens six HTTP/1.1 connections to a host at most: with a stream per tab, the
    seventh tab would wait for one to close. Every tab here must load and follow live, also
    once the first tab (the one whose page started the shared stream) is closed."""
    settings.comfyui_endpoints = [f"{sims[0].url}#gpu-a"]
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        prefix = base + settings.route_prefix
        tabs: list[Page] = []
        try:
            for number in range(TABS):
                tab = await browser.new_page()
                tabs.append(tab)
                await tab.goto(f"{base}/dashboard#/{'fleet' if number % 2 == 0 else 'jobs'}")
                await expect(tab.locator("#live")).to_have_text("live")
            fleet_tabs, jobs_tabs = tabs[0::2], tabs[1::2]
            for tab in fleet_tabs:
                await expect(tab.locator('tr[data-backend="gpu-a"] .health')).to_have_text("up")
                await tab.evaluate("() => { window.notReloaded = true; }")
            for tab in jobs_tabs:
                await expect(tab.locator("#jobs-empty")).to_be_visible()
                await tab.evaluate("() => { window.notReloaded = true; }")

            async def they_follow(fleet_tabs: list[Page], jobs_tabs: list[Page],
                                  drained: bool) -> None:
                await api(http, "PATCH", f"{prefix}/backends/gpu-a", body={"drain": drained})
                job = await api(http, "POST", f"{prefix}/jobs", status=202,
                                body={"workflow": "invert", "params": {"width": 16}})
                for tab in fleet_tabs:
                    await expect(tab.locator('tr[data-backend="gpu-a"] .health')
                                 ).to_have_text("draining" if drained else "up")
                for tab in jobs_tabs:
                    await expect(tab.locator(f'#jobs tr[data-job="{job["id"]}"]')).to_be_visible()

            await they_follow(fleet_tabs, jobs_tabs, drained=True)
            await screenshot(tabs[-1], tmp_path, "jobs-eighth-tab")
            await tabs[0].close()  # its page started the shared stream
            await they_follow(fleet_tabs[1:], jobs_tabs, drained=False)
            for tab in tabs[1:]:
                assert await tab.evaluate("() => window.notReloaded === true")
        finally:
            for tab in tabs:
                if not tab.is_closed():
                    await tab.close()


async def test_eight_job_pages_on_running_jobs_all_follow_them_live(
    settings: Settings, browser: BrowserContext, tmp_path: Path
) -> None:
    """A job page's events come over the tabs' shared stream: with a stream of its own per
    job page, the tabs past the sixth would wait for a connection while their jobs run."""
    async with AsyncExitStack() as stack:
        sims = [await stack.enter_async_context(SimulatedComfyUI(name=f"gpu-{n}"))
                for n in range(TABS)]
        settings.comfyui_endpoints = [f"{sim.url}#gpu-{n}" for n, sim in enumerate(sims)]
        settings.max_inflight_per_backend = 1  # every job runs at once, one per backend
        base = await stack.enter_async_context(serving(settings))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        prefix = base + settings.route_prefix
        await wait_for_healthy_backends(http, prefix)
        # The jobs wait, drained, while the tabs open: their 20 s run from when all eight
        # pages show them, however long a loaded machine takes to open eight tabs.
        for n in range(TABS):
            await api(http, "PATCH", f"{prefix}/backends/gpu-{n}", body={"drain": True})
        jobs = [await api(http, "POST", f"{prefix}/jobs", status=202, body={
            "workflow": "simulated_work", "params": {"seconds": 20, "steps": 40}})
            for _ in range(TABS)]
        tabs: list[Page] = []
        stack.push_async_callback(close_all, tabs)
        for job in jobs:
            tab = await browser.new_page()
            tabs.append(tab)
            await tab.goto(f"{base}/dashboard#/jobs/{job['id']}")
            await expect(tab.locator("#job-status")).to_have_text("queued")
        for n in range(TABS):
            await api(http, "PATCH", f"{prefix}/backends/gpu-{n}", body={"drain": False})
        progress = "document.getElementById('job-progress')?.value"
        for tab in tabs:  # each moves while every job still runs
            await tab.wait_for_function(f"() => ({progress} ?? 0) > 0 && {progress} < 1",
                                        timeout=WAIT_MS)
            first = await tab.evaluate(f"() => {progress}")
            await tab.wait_for_function(f"() => {progress} > {first}", timeout=WAIT_MS)
        for job in jobs:
            now = await api(http, "GET", f"{prefix}/jobs/{job['id']}")
            assert now["status"] == "running", now
        await screenshot(tabs[-1], tmp_path, "job-eighth-tab")
        for tab in tabs:
            await expect(tab.locator("#job-status")).to_have_text("succeeded", timeout=40_000)


# A port of the dashboard's SharedWorker (live.js) opened by the test in a tab, standing for
# as many job pages as jobs it follows (each tab is a port; one port may follow many jobs):
# what it is told of each job is kept in `window.told`.
JOB_PAGES_PORT = """(jobs) => {
  const { port } = new SharedWorker(new URL("/dashboard/static/live.js", location.href),
                                    { type: "module", name: "comfyfleet-live" });
  window.told = {};
  port.addEventListener("message", ({ data }) => {
    if (data.type === "job") (window.told[data.job] ??= []).push(data.name);
    if (data.type === "refused") window.refused = data.status;
  });
  port.start();
  const api = document.querySelector('meta[name="comfyfleet-api"]').content;
  port.postMessage({ type: "follow", api, key: sessionStorage.getItem("comfyfleet.key") });
  for (const job of jobs) port.postMessage({ type: "job", job });
  window.jobPages = port;
}"""


async def test_past_a_hundred_job_pages_the_newest_follow_live_and_the_rest_by_the_jobs_events(
    settings: Settings, browser: BrowserContext, page: Page, tmp_path: Path
) -> None:
    """The shared stream carries 100 jobs at most (the service refuses more, and with them
    the tabs would lose the whole stream): past 100 job pages, the 100 opened last follow
    their jobs over it, and the others re-read theirs when it says that jobs changed."""
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        prefix = base + settings.route_prefix  # no backend: every job stays queued
        jobs = [(await api(http, "POST", f"{prefix}/jobs", status=202,
                           body={"workflow": "invert", "params": {"width": 16}}))["id"]
                for _ in range(101)]
        oldest, newest = jobs[0], jobs[-1]
        await page.goto(f"{base}/dashboard#/jobs/{oldest}")
        await expect(page.locator("#job-status")).to_have_text("queued")
        await expect(page.locator("#job-waiting")).to_contain_text("position 1 in the queue")
        await page.evaluate("() => { window.notReloaded = true; }")

        others = await browser.new_page()  # a hundred more job pages, opened after it
        try:
            await others.goto(f"{base}/dashboard#/fleet")
            await others.evaluate(JOB_PAGES_PORT, jobs[1:])
            await others.wait_for_function(
                f"() => window.refused || window.told[{json.dumps(newest)}]?.includes('state')",
                timeout=WAIT_MS)
            assert await others.evaluate("() => window.refused ?? null") is None
            await api(http, "POST", f"{prefix}/jobs/{newest}/cancel")
            await others.wait_for_function(
                f"() => window.told[{json.dumps(newest)}]?.includes('cancelled')",
                timeout=WAIT_MS)

            await api(http, "POST", f"{prefix}/jobs/{oldest}/cancel")
            await expect(page.locator("#job-status")).to_have_text("cancelled")
            assert await page.evaluate("() => window.notReloaded === true")
            await screenshot(page, tmp_path, "job-past-a-hundred-pages")
        finally:
            await others.close()


async def close_all(tabs: list[Page]) -> None:
    for tab in tabs:
        await tab.close()


async def test_fleet_shows_each_backends_warm_models_as_they_change(
    settings: Settings, page: Page, tmp_path: Path
) -> None:
    async with SimulatedComfyUI() as sim:  # ComfyUI's classic cache: the last prompt's nodes
        settings.comfyui_endpoints = [f"{sim.url}#gpu"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            prefix = base + settings.route_prefix

            async def run(model: str) -> None:
                await api(http, "POST", f"{prefix}/jobs?wait=30", status=202, body={
                    "workflow": "simulated_model", "params": {"model": model, "seconds": 0}})

            await page.goto(f"{base}/dashboard#/fleet")
            warm = page.locator('tr[data-backend="gpu"] td.warm')
            await expect(warm).to_contain_text("no model loaded")
            await run("model-a.safetensors")
            await expect(warm.locator("[data-model]")).to_have_text(["model-a.safetensors"])
            await page.evaluate("() => { window.notReloaded = true; }")
            await run("model-b.safetensors")
            await expect(warm.locator("[data-model]")).to_have_text(["model-b.safetensors"])
            assert await page.evaluate("() => window.notReloaded === true")
            await screenshot(page, tmp_path, "fleet-warm")


async def test_running_job_progress_moves_and_reaches_done_without_reload(
    settings: Settings, page: Page, tmp_path: Path
) -> None:
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            prefix = base + settings.route_prefix
            job = await api(http, "POST", f"{prefix}/jobs", status=202, body={
                "workflow": "simulated_work", "params": {"seconds": 4, "steps": 8}})
            await page.goto(f"{base}/dashboard#/jobs/{job['id']}")
            await expect(page.locator("#job-progress")).to_be_visible()
            await page.evaluate("() => { window.notReloaded = true; }")
            progress = "document.getElementById('job-progress')?.value"
            # Functions, not expressions: the page's policy forbids eval.
            await page.wait_for_function(f"() => ({progress} ?? 0) > 0 && {progress} < 1",
                                         timeout=WAIT_MS)
            first = await page.evaluate(f"() => {progress}")
            await page.wait_for_function(f"() => ({progress} ?? 0) > {first}",
                                         timeout=WAIT_MS)
            await screenshot(page, tmp_path, "job-running")
            await expect(page.locator("#job-status")).to_have_text("succeeded")
            assert await page.evaluate("() => window.notReloaded === true")
            assert await page.evaluate(f"() => {progress}") == 1
            # Every step of the timeline with its time, as the API has them.
            async with http.get(f"{prefix}/jobs/{job['id']}") as response:
                ended = await response.json()
            steps = page.locator("#job-timeline li")
            await expect(steps).to_have_class(["done"] * 5)
            fields = ["created_at", "dispatched_at", "started_at", "uploading_at", "finished_at"]
            shown = await page.evaluate(
                "times => times.map(at => new Date(at).toLocaleString())",
                [ended[field] for field in fields])
            assert await steps.evaluate_all(
                "items => items.map(item => [item.dataset.step, "
                "item.querySelector('.when').textContent])") == [
                [step, at] for step, at in zip(
                    ["queued", "dispatched", "running", "uploading", "succeeded"], shown,
                    strict=True)]
            thumbnail = page.locator("#job-outputs img").first
            await expect(thumbnail).to_be_visible()
            await page.wait_for_function(
                "() => document.querySelector('#job-outputs img')?.naturalWidth > 0",
                timeout=WAIT_MS)
            assert "null" not in await page.locator("#main").inner_text()
            await screenshot(page, tmp_path, "job")


async def test_cancel_a_queued_job_from_its_page(settings: Settings, page: Page) -> None:
    async with serving(settings) as base, aiohttp.ClientSession() as http:  # no backend
        prefix = base + settings.route_prefix
        job = await api(http, "POST", f"{prefix}/jobs", status=202,
                        body={"workflow": "invert", "params": {"width": 16}})
        await page.goto(f"{base}/dashboard#/jobs/{job['id']}")
        await expect(page.locator("#job-status")).to_have_text("queued")
        await page.locator("#job-cancel").click()
        await expect(page.locator("#job-status")).to_have_text("cancelled")
        await expect(page.locator("#job-cancel")).to_have_count(0)
        assert (await api(http, "GET", f"{prefix}/jobs/{job['id']}"))["status"] == "cancelled"


async def test_failed_job_shows_its_node_and_error(
    settings: Settings, page: Page, tmp_path: Path
) -> None:
    async with SimulatedComfyUI(fail_rate=1.0, fail_seed=7) as sim:
        settings.comfyui_endpoints = [sim.url]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            prefix = base + settings.route_prefix
            job = await api(http, "POST", f"{prefix}/jobs?wait=30", status=202, body={
                "workflow": "simulated_work", "params": {"seconds": 0.2, "steps": 2}})
            assert job["status"] == "failed", job
            error = job["error"]
            await page.goto(f"{base}/dashboard#/jobs/{job['id']}")
            await expect(page.locator("#job-status")).to_have_text("failed")
            await expect(page.locator("#job-error-node")).to_contain_text(
                f"node {error['node_id']} ({error['node_type']})")
            await expect(page.locator("#job-error-message")).to_have_text(error["message"])
            await expect(page.locator("#job-traceback")).to_contain_text(
                error["details"]["traceback"][-1].strip())
            await screenshot(page, tmp_path, "job-failed")


async def test_redeliver_from_the_pages_makes_a_new_attempt(
    settings: Settings, receivers: StartReceiver, page: Page, tmp_path: Path
) -> None:
    settings.webhook_retry_delays = [3600.0]  # no retry of its own during the test
    receiver = await receivers(Answer(500))
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        gateway = Gateway(http, base + settings.route_prefix)
        job_id = await gateway.finished_job(receiver.url)
        delivery = await gateway.wait_for(job_id, "pending", attempts=1)

        await page.goto(f"{base}/dashboard#/webhooks")
        row = page.locator(f'tr[data-delivery="{delivery["id"]}"]')
        await expect(row).to_contain_text("500")
        await screenshot(page, tmp_path, "webhooks")
        await row.locator("button.redeliver").click()
        await receiver.wait_for(2)
        await gateway.wait_for(job_id, "pending", attempts=2)

        await page.goto(f"{base}/dashboard#/jobs/{job_id}")
        row = page.locator(f'#job-deliveries tr[data-delivery="{delivery["id"]}"]')
        await expect(row).to_have_attribute("data-attempts", "2")
        await row.locator("button.redeliver").click()
        await receiver.wait_for(3)
        await gateway.wait_for(job_id, "pending", attempts=3)


async def login(page: Page, base: str, key: str) -> None:
    await page.goto(f"{base}/dashboard#/jobs")
    await page.locator("#login-key").fill(key)
    await page.locator("#login button[type=submit]").click()
    await expect(page.locator("#login")).to_be_hidden()


async def test_a_tenant_key_sees_only_its_own_jobs(
    settings: Settings, page: Page, browser: BrowserContext, tmp_path: Path
) -> None:
    settings.api_keys = [KEY_A, KEY_B]
    settings.admin_api_keys = [ADMIN]
    async with serving(settings) as base, aiohttp.ClientSession() as http:  # no backends
        prefix = base + settings.route_prefix
        jobs = {key: await api(http, "POST", f"{prefix}/jobs", key, status=202,
                               body={"workflow": "invert", "params": {"width": 16}})
                for key in (KEY_A, KEY_B)}

        await page.goto(f"{base}/dashboard")
        await expect(page.locator("#login")).to_be_visible()
        await expect(page.locator("#main")).to_be_empty()
        await login(page, base, KEY_A)
        await expect(page.locator("#who")).to_have_text("tenant key")
        await expect(page.locator("#jobs tbody tr")).to_have_count(1)
        await expect(page.locator(f'tr[data-job="{jobs[KEY_A]["id"]}"]')).to_be_visible()
        await page.goto(f"{base}/dashboard#/jobs/{jobs[KEY_B]['id']}")
        await expect(page.locator("#main")).to_contain_text("no job")
        await page.goto(f"{base}/dashboard#/backlog")
        await expect(page.locator("#backlog-queued .value")).to_have_text("1")
        await expect(page.locator("#backlog-tenants")).to_have_count(0)  # admins only
        await page.goto(f"{base}/dashboard#/fleet")
        await expect(page.locator("#fleet th", has_text="Actions")).to_have_count(0)

        admin = await browser.new_page()
        try:
            await login(admin, base, ADMIN)
            await expect(admin.locator("#who")).to_have_text("admin key")
            await expect(admin.locator("#jobs tbody tr")).to_have_count(2)
            await admin.goto(f"{base}/dashboard#/backlog")
            await expect(admin.locator("#backlog-queued .value")).to_have_text("2")
            await expect(admin.locator('#backlog tr[data-key="invert"] [data-count="queued"]')
                         ).to_have_text("2")
            for name in ("API_KEYS#1", "API_KEYS#2"):  # by tenant: one queued job each
                await expect(admin.locator(
                    f'#backlog-tenants tr[data-key="{name}"] [data-count="queued"]')
                ).to_have_text("1")
            await screenshot(admin, tmp_path, "backlog-tenants")
        finally:
            await admin.close()


async def test_backlog_shows_the_last_hour_the_backends_busy_share_and_an_eta(
    settings: Settings, page: Page, tmp_path: Path
) -> None:
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [f"{sim.url}#gpu"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            prefix = base + settings.route_prefix
            body = {"workflow": "simulated_work", "params": {"seconds": 0.3, "steps": 1}}
            for _ in range(2):
                job = await api(http, "POST", f"{prefix}/jobs?wait=30", status=202, body=body)
                assert job["status"] == "succeeded", job
            await api(http, "PATCH", f"{prefix}/backends/gpu", body={"drain": True})
            for _ in range(3):
                await api(http, "POST", f"{prefix}/jobs", status=202, body=body)

            await page.goto(f"{base}/dashboard#/backlog")
            await expect(page.locator("#backlog-queued .value")).to_have_text("3")
            # 2 jobs done in the last minutes: 3 more take about as long again, and a half.
            await expect(page.locator("#backlog-eta .value")).to_have_text(re.compile(r"\d"))
            chart = page.locator("#activity polyline")
            await expect(chart.and_(page.locator('[data-series="submitted"]'))
                         ).to_have_attribute("data-total", "5")
            await expect(chart.and_(page.locator('[data-series="succeeded"]'))
                         ).to_have_attribute("data-total", "2")
            await expect(chart.and_(page.locator('[data-series="failed"]'))
                         ).to_have_attribute("data-total", "0")
            busy = page.locator('#utilisation tr[data-backend="gpu"] td.busy')
            share = float(await busy.get_attribute("data-busy") or 0)
            assert 0 < share <= 1
            await screenshot(page, tmp_path, "backlog")


LOCAL_MINUTE = """hours => { const d = new Date(Date.now() + hours * 3600e3);
    d.setMinutes(d.getMinutes() - d.getTimezoneOffset()); return d.toISOString().slice(0, 16); }"""


async def test_jobs_filter_by_tenant_and_creation_time(
    settings: Settings, page: Page, tmp_path: Path
) -> None:
    settings.api_keys = [KEY_A, KEY_B]
    settings.admin_api_keys = [ADMIN]
    async with serving(settings) as base, aiohttp.ClientSession() as http:  # no backends
        prefix = base + settings.route_prefix
        jobs = [await api(http, "POST", f"{prefix}/jobs", key, status=202,
                          body={"workflow": "invert", "params": {"width": 16}})
                for key in (KEY_A, KEY_A, KEY_B)]
        engine = make_engine(settings.database_url or "")
        try:  # the first job was made two hours ago
            async with engine.begin() as conn:
                await conn.execute(text("UPDATE jobs SET created_at = now() - interval '2 h' "
                                        "WHERE id = :id"), {"id": jobs[0]["id"]})
        finally:
            await engine.dispose()
        await login(page, base, ADMIN)
        rows = page.locator("#jobs tbody tr")
        await expect(rows).to_have_count(3)

        await page.locator("select[name=tenant]").select_option("API_KEYS#1")  # KEY_A
        await page.locator("form.filters button[type=submit]").click()
        await expect(rows).to_have_count(2)
        await expect(rows.first).to_have_attribute("data-job", jobs[1]["id"])
        await expect(rows.last).to_have_attribute("data-job", jobs[0]["id"])

        await page.locator("input[name=from]").fill(await page.evaluate(LOCAL_MINUTE, -1))
        await page.locator("form.filters button[type=submit]").click()
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_have_attribute("data-job", jobs[1]["id"])
        await screenshot(page, tmp_path, "jobs-filtered")

        await page.locator("input[name=from]").fill("")
        await page.locator("select[name=tenant]").select_option("")
        await page.locator("input[name=to]").fill(await page.evaluate(LOCAL_MINUTE, -1))
        await page.locator("form.filters button[type=submit]").click()
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_have_attribute("data-job", jobs[0]["id"])

        # The API's side: only an admin filters by tenant, by a name GET /tenants gives.
        await api(http, "GET", f"{prefix}/jobs?tenant=API_KEYS%231", KEY_A, status=403)
        await api(http, "GET", f"{prefix}/jobs?tenant=nobody", ADMIN, status=422)
        await api(http, "GET", f"{prefix}/jobs?created_after=0001-01-01T00:00:00%2B05:00",
                  ADMIN, status=422)


async def test_job_list_follows_new_jobs_and_pages_with_the_cursor(
    settings: Settings, page: Page, tmp_path: Path
) -> None:
    async with serving(settings) as base, aiohttp.ClientSession() as http:  # no backends
        prefix = base + settings.route_prefix
        await page.goto(f"{base}/dashboard#/jobs?status=queued")
        await expect(page.locator("#jobs-empty")).to_be_visible()
        await expect(page.locator("#live")).to_have_text("live")
        submitted = [await api(http, "POST", f"{prefix}/jobs", status=202,
                               body={"workflow": "invert", "params": {"width": 16}})
                     for _ in range(52)]
        # Submitted after the page was shown: the first page fills without a reload.
        await expect(page.locator("#jobs tbody tr")).to_have_count(50)
        await expect(page.locator("#jobs tbody tr").first).to_have_attribute(
            "data-job", submitted[-1]["id"])
        await screenshot(page, tmp_path, "jobs")
        await page.locator("#jobs-next").click()
        await expect(page.locator("#jobs tbody tr")).to_have_count(2)
        await expect(page.locator("#jobs tbody tr").last).to_have_attribute(
            "data-job", submitted[0]["id"])


async def test_dashboard_page_is_served_with_its_assets_and_a_strict_policy(
    settings: Settings,
) -> None:
    settings.route_prefix = "/gateway"
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        async with http.get(f"{base}/dashboard") as response:
            assert response.status == 200
            assert "default-src 'self'" in response.headers["Content-Security-Policy"]
            page = await response.text()
        assert '<meta name="comfyfleet-api" content="/gateway">' in page
        for asset in ("app.js", "app.css"):
            async with http.get(f"{base}/dashboard/static/{asset}") as response:
                assert response.status == 200, asset
        async with http.get(f"{base}/dashboard/static/../../settings.py") as response:
            assert response.status == 404


async def test_a_dashboard_on_one_replica_follows_what_is_done_through_another(
    settings: Settings, page: Page, data_root: Path, tmp_path: Path
) -> None:
    """Two `serve` processes on one database: a page open on B shows, live, a backend drained
    and a job submitted and cancelled through A (B itself changes nothing: with its one
    backend drained, B never claims the job)."""
    async with SimulatedComfyUI() as sim, AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        base_a, base_b = await serve_replicas(stack, settings, data_root,
                                              COMFYUI_ENDPOINTS=f"{sim.url}#gpu")
        through_a = base_a + settings.route_prefix
        await page.goto(f"{base_b}/dashboard#/fleet")
        health = page.locator('tr[data-backend="gpu"] .health')
        await expect(health).to_have_text("up")
        await expect(page.locator("#live")).to_have_text("live")
        await page.evaluate("() => { window.notReloaded = true; }")

        await api(http, "PATCH", f"{through_a}/backends/gpu", body={"drain": True})
        await expect(health).to_have_text("draining")

        await page.locator('nav a[data-nav="jobs"]').click()
        await expect(page.locator("#jobs-empty")).to_be_visible()
        job = await api(http, "POST", f"{through_a}/jobs", status=202,
                        body={"workflow": "invert", "params": {"width": 16}})
        row = page.locator(f'#jobs tr[data-job="{job["id"]}"]')
        await expect(row).to_have_attribute("data-status", "queued")
        await api(http, "POST", f"{through_a}/jobs/{job['id']}/cancel")
        await expect(row).to_have_attribute("data-status", "cancelled")
        assert await page.evaluate("() => window.notReloaded === true")
        await screenshot(page, tmp_path, "jobs-through-another-replica")


async def test_a_job_page_on_one_replica_follows_its_job_changed_through_another_at_once(
    settings: Settings, data_root: Path
) -> None:
    """A job page's events (the shared stream's `?job=`) on replica B, for a job cancelled
    through replica A: B is told by A's notice on `comfyfleet_jobs`, not by a re-read of the
    job once a second (it took 0.9-1 s then: the cancel came just after B read the job)."""
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())
        # No backend: the job stays queued until cancelled.
        through_a, through_b = [base + settings.route_prefix
                                for base in await serve_replicas(stack, settings, data_root)]
        # Submitted through B: A changes no job before the cancel, so its notice goes at once
        # (it tells at most one a second).
        job = await api(http, "POST", f"{through_b}/jobs", status=202,
                        body={"workflow": "invert", "params": {"width": 16}})
        async with http.get(f"{through_b}/dashboard/events",
                            params={"job": job["id"]}) as response:
            assert response.status == 200
            events = read_events(response, "job")
            async with asyncio.timeout(20):
                first = await anext(events)
                assert (first["event"], first["data"]["status"]) == ("state", "queued")
                cancelled = asyncio.get_running_loop().time()
                await api(http, "POST", f"{through_a}/jobs/{job['id']}/cancel")
                told = await anext(events)
                waited = asyncio.get_running_loop().time() - cancelled
    assert told["event"] == "cancelled"
    assert waited < 0.5, waited


async def test_dashboard_stream_tells_of_a_drain_at_once(settings: Settings) -> None:
    async with SimulatedComfyUI() as sim:
        settings.comfyui_endpoints = [f"{sim.url}#only"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            prefix = base + settings.route_prefix
            async with http.get(f"{prefix}/dashboard/events") as response:
                events = read_fleet_events(response)
                async with asyncio.timeout(20):
                    async for fleet in events:
                        if fleet[0]["healthy"]:
                            break
                    await api(http, "PATCH", f"{prefix}/backends/only", body={"drain": True})
                    async for fleet in events:
                        if fleet[0]["draining"]:
                            break


async def test_dashboard_stream_carries_the_events_of_the_keys_own_jobs_asked_for(
    settings: Settings,
) -> None:
    settings.api_keys = [KEY_A, KEY_B]
    async with SimulatedComfyUI(duration=0.5) as sim:
        settings.comfyui_endpoints = [f"{sim.url}#gpu"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            prefix = base + settings.route_prefix
            own, other = [await api(http, "POST", f"{prefix}/jobs", key, status=202,
                                    body={"workflow": "invert", "params": {"width": 16}})
                          for key in (KEY_A, KEY_B)]
            seen: list[tuple[str, str]] = []
            async with http.get(f"{prefix}/dashboard/events",
                                params=[("job", other["id"]), ("job", own["id"])],
                                headers={"Authorization": f"Bearer {KEY_A}"}) as response:
                assert response.status == 200
                async with asyncio.timeout(20):
                    async for event in read_events(response, "job"):
                        seen.append((event["job"], event["event"]))
                        if event["event"] == "succeeded":
                            assert event["data"]["id"] == own["id"]
                            break
    assert {job for job, _ in seen} == {own["id"]}  # another key's job is left out
    assert seen[0][1] == "state"


async def read_events(response: aiohttp.ClientResponse, wanted: str) -> AsyncIterator[Any]:
    name = None
    async for raw in response.content:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: ") and name == wanted:
            yield json.loads(line[len("data: "):])


async def read_fleet_events(response: aiohttp.ClientResponse) -> AsyncIterator[Any]:
    async for fleet in read_events(response, "fleet"):
        yield fleet
