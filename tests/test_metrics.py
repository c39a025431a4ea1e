"""/metrics: the phases of a job run on a simulated ComfyUI, webhooks, stored bytes, backend
gauges and the unfinished jobs in the database, per app."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from comfyfleet import metrics
from comfyfleet.app import serving
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.support import LOOPBACK, Samples, free_ports, scrape, value

PHASES = ("queue_wait", "dispatch", "run", "upload", "webhook")


def phase_count(samples: Samples, phase: str) -> float:
    return value(samples, "comfyfleet_job_phase_seconds_count", phase=phase, workflow="invert")


async def test_metrics_move_when_a_job_runs(
    settings: Settings, receiver: WebhookReceiver
) -> None:
    async with SimulatedComfyUI(duration=0.2) as sim:
        settings.comfyui_endpoints = [sim.url + "#gpu"]
        async with serving(settings) as base, aiohttp.ClientSession() as http:
            before = await scrape(http, base)
            body = {"workflow": "invert", "params": {"width": 32}, "callback_url": receiver.url}
            async with http.post(f"{base}{settings.route_prefix}/jobs?wait=30",
                                 json=body) as response:
                job: dict[str, Any] = await response.json()
            assert job["status"] == "succeeded", job
            async with asyncio.timeout(10):
                await receiver.wait_for(1)
                # The attempt is counted once the sender has the receiver's answer.
                while phase_count(after := await scrape(http, base), "webhook") == (  # noqa: ASYNC110
                        phase_count(before, "webhook")):
                    await asyncio.sleep(0.05)  # polling /metrics: no local event to wait on

    for phase in PHASES:
        assert phase_count(after, phase) == phase_count(before, phase) + 1, phase
    assert value(after, "comfyfleet_job_phase_seconds_sum", phase="run",
                 workflow="invert") > value(before, "comfyfleet_job_phase_seconds_sum",
                                            phase="run", workflow="invert")
    finished = {"workflow": "invert", "status": "succeeded"}
    assert value(after, "comfyfleet_jobs_finished_total", **finished) == value(
        before, "comfyfleet_jobs_finished_total", **finished) + 1
    assert value(after, "comfyfleet_job_seconds_count", **finished) == value(
        before, "comfyfleet_job_seconds_count", **finished) + 1
    assert value(after, "comfyfleet_webhook_attempts_total", outcome="delivered") == value(
        before, "comfyfleet_webhook_attempts_total", outcome="delivered") + 1
    stored = sum(output["size"] for output in job["outputs"])
    assert stored > 0
    assert value(after, "comfyfleet_output_bytes_total") == value(
        before, "comfyfleet_output_bytes_total") + stored
    assert ("comfyfleet_storage_errors_total", frozenset()) in after
    assert value(after, "comfyfleet_backend_up", backend="gpu") == 1
    assert value(after, "comfyfleet_backend_inflight", backend="gpu") == 0
    assert ("comfyfleet_backend_queue_remaining", frozenset({("backend", "gpu")})) in after
    assert ("process_resident_memory_bytes", frozenset()) in after


async def test_unfinished_jobs_are_counted_from_the_database(settings: Settings) -> None:
    async with serving(settings) as base, aiohttp.ClientSession() as http:
        api = base + settings.route_prefix
        ids = []
        for _ in range(2):  # no backends: they stay queued
            body = {"workflow": "invert", "params": {"width": 16}}
            async with http.post(f"{api}/jobs", json=body) as response:
                ids.append((await response.json())["id"])
        queued = {"status": "queued", "workflow": "invert"}
        assert value(await scrape(http, base), "comfyfleet_jobs", **queued) == 2
        async with http.post(f"{api}/jobs/{ids[0]}/cancel") as response:
            assert response.status == 200
        assert value(await scrape(http, base), "comfyfleet_jobs", **queued) == 1


async def test_apps_in_one_process_report_their_own_backends(
    settings: Settings, other_database_url: str
) -> None:
    first = free_ports(2)
    # Its own database too: apps on one database share their fleet.
    other = settings.model_copy(update={"comfyui_endpoints": [f"{LOOPBACK}:{first + 1}#b"],
                                        "database_url": other_database_url})
    settings.comfyui_endpoints = [f"{LOOPBACK}:{first}#a"]  # nothing listens on either
    async with serving(settings) as base_a, serving(other) as base_b, \
            aiohttp.ClientSession() as http:
        for base, mine, theirs in ((base_a, "a", "b"), (base_b, "b", "a")):
            samples = await scrape(http, base)
            assert ("comfyfleet_backend_up", frozenset({("backend", mine)})) in samples
            assert ("comfyfleet_backend_up", frozenset({("backend", theirs)})) not in samples
            assert value(samples, "comfyfleet_backend_up", backend=mine) == 0
        async with http.get(f"{base_a}/readyz") as response:
            assert response.status == 503  # a backend is configured and none is reachable
            assert (await response.json())["backends"] == {"a": False}


def _exposed(collector: Collector) -> str:
    """`collector`'s exposition text, each `_created` timestamp (the moment a series began)
    left out."""
    registry = CollectorRegistry()
    registry.register(collector)
    return re.sub(r"(_created\{?.*) \S+$", r"\1 <when>", generate_latest(registry).decode(),
                  flags=re.MULTILINE)


def test_metrics_expose_every_event_as_prometheus_client_would() -> None:
    """The events counted without a lock are exposed as prometheus_client's own Counter and
    Histogram expose them: no observation lost or in another bucket (each bound itself, the
    largest and past it, whole numbers), the same families, series, labels and text."""
    seconds = metrics._Histogram("phase_seconds", "Time", ("phase", "workflow"),
                                 metrics._BUCKETS)
    ended = metrics._Counter("ended", "Ends", ("status",))
    stored = metrics._Counter("stored_bytes", "Bytes")
    registry = CollectorRegistry()
    their_seconds = Histogram("phase_seconds", "Time", ["phase", "workflow"],
                              buckets=metrics._BUCKETS, registry=registry)
    their_ended = Counter("ended", "Ends", ["status"], registry=registry)
    their_stored = Counter("stored_bytes", "Bytes", registry=registry)
    observed = [0.0, 0.01, *metrics._BUCKETS, 0.050001, 7200.5, 1e9, 3, 0.1 + 0.2]
    for index, amount in enumerate(observed):
        labels = ("run" if index % 3 else "upload", "invert" if index % 2 else "sdxl")
        seconds[labels].observe(amount)
        their_seconds.labels(*labels).observe(amount)
        status = "succeeded" if index % 4 else "failed"
        ended[status,].inc()
        their_ended.labels(status).inc()
        stored.inc(590 * index)
        their_stored.inc(590 * index)

    class Ours(Collector):
        def collect(self) -> Iterator[Metric]:
            return iter([seconds.family(), ended.family(), stored.family()])

    ours = _exposed(Ours())
    assert "phase_seconds_created{" in ours and "stored_bytes_created <when>" in ours
    assert ours == _exposed(registry)
