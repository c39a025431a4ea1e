"""GET /metrics in the Prometheus text format; open unless METRICS_TOKEN is set.

Events are counted process-wide (`comfyfleet.metrics`); what describes one running app (its
backends; the unfinished jobs in the database, by status and by API key) is read when it is
scraped, by that app's
`Scrape`, so several apps in one process (tests) each report their own state.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Iterable, Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from comfyfleet.api.depends import ServicesDep
from comfyfleet.api.errors import ApiError
from comfyfleet.api.security import Guard
from comfyfleet.api.tenants import TenantState, tenant_states
from comfyfleet.execution.session import BackendSession
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.metrics import REGISTRY

log = logging.getLogger(__name__)

# A scrape never waits longer than this for the database.
DATABASE_TIMEOUT = 2.0

router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def get_metrics(request: Request, svc: ServicesDep) -> Response:
    token = svc.settings.metrics_token
    if token is not None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "invalid_metrics_token",
                           "/metrics needs `Authorization: Bearer <METRICS_TOKEN>`",
                           headers={"WWW-Authenticate": "Bearer"})
    scrape = request.app.state.scrape
    assert isinstance(scrape, Scrape)
    return Response(await scrape.render(), media_type=CONTENT_TYPE_LATEST)


class _Shared(Collector):
    """The process-wide event metrics, inside an app's registry."""

    def collect(self) -> Iterable[Metric]:
        return REGISTRY.collect()


class _Fleet(Collector):
    """One app's backends and unfinished jobs, as of the last refresh."""

    def __init__(self, sessions: list[BackendSession]) -> None:
        self._sessions = sessions
        self.unfinished: list[tuple[str, str, int]] | None = None
        self.tenants: list[TenantState] | None = None

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("comfyfleet_backend_up",
                               "1 when the backend's websocket is connected", labels=["backend"])
        draining = GaugeMetricFamily("comfyfleet_backend_draining",
                                     "1 when the backend takes no new work", labels=["backend"])
        queue = GaugeMetricFamily(
            "comfyfleet_backend_queue_remaining",
            "Prompts in the backend's queue, other clients' included", labels=["backend"])
        inflight = GaugeMetricFamily(
            "comfyfleet_backend_inflight", "Prompts this process has on the backend",
            labels=["backend"])
        for session in list(self._sessions):
            up.add_metric([session.name], int(session.connected))
            draining.add_metric([session.name], int(session.draining))
            queue.add_metric([session.name], session.queue_remaining)
            inflight.add_metric([session.name], len(session.inflight))
        yield from (up, draining, queue, inflight)
        if self.unfinished is not None:
            jobs = GaugeMetricFamily(
                "comfyfleet_jobs",
                "Unfinished jobs in the database (all processes) by status and workflow",
                labels=["status", "workflow"])
            for status, workflow, count in self.unfinished:
                jobs.add_metric([status, workflow], count)
            yield jobs
        if self.tenants is not None:
            queued = GaugeMetricFamily(
                "comfyfleet_tenant_queued", "Jobs of each API key waiting in the backlog",
                labels=["tenant"])
            running = GaugeMetricFamily(
                "comfyfleet_tenant_running",
                "Jobs of each API key on backends (dispatched, running or uploading)",
                labels=["tenant"])
            for tenant in self.tenants:
                queued.add_metric([tenant.name], tenant.queued)
                running.add_metric([tenant.name], tenant.running)
            yield from (queued, running)


class Scrape:
    """What GET /metrics answers for one app."""

    def __init__(
        self, repository: JobRepository, sessions: list[BackendSession], guard: Guard
    ) -> None:
        self._repository = repository
        self._guard = guard
        self._fleet = _Fleet(sessions)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Shared())
        self.registry.register(self._fleet)

    async def render(self) -> bytes:
        """The exposition text, with job counts read from the database now (left out when
        the database does not answer in time, rather than shown stale)."""
        try:
            async with asyncio.timeout(DATABASE_TIMEOUT):
                self._fleet.unfinished = await self._repository.unfinished_counts()
                self._fleet.tenants = await tenant_states(self._guard, self._repository)
        except Exception as exc:  # the database is away: the rest of the metrics still count
            log.warning("metrics: job counts unavailable: %s", exc)
            self._fleet.unfinished = self._fleet.tenants = None
        return generate_latest(self.registry)
