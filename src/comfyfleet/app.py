"""The service: FastAPI app whose lifespan opens the database, storage, catalog and fleet."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import logging
import math
import os
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path

import uvicorn
from fastapi import Depends, FastAPI

from comfyfleet import db
from comfyfleet.api import (
    backends,
    dashboard,
    deliveries,
    events,
    health,
    jobs,
    outputs,
    prometheus,
    telemetry,
    tenants,
    workflows,
)
from comfyfleet.api.errors import install_error_handlers
from comfyfleet.api.json_text import refuse_lone_surrogates
from comfyfleet.api.openapi import install_openapi
from comfyfleet.api.prometheus import Scrape
from comfyfleet.api.security import authenticate, install_security
from comfyfleet.api.v2 import mount_v2
from comfyfleet.api_keys import KeyStore
from comfyfleet.comfy.endpoints import parse_endpoints
from comfyfleet.fleet.discovery import DnsDiscovery, DnsTarget
from comfyfleet.fleet.fleet import Fleet, FleetTuning
from comfyfleet.fleet.registry import BackendRegistry
from comfyfleet.jobs.lease import ProcessLease
from comfyfleet.jobs.notices import JobNotices
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.jobs.waiters import JobWaiters
from comfyfleet.peers import PeerChanges
from comfyfleet.services import Services
from comfyfleet.settings import Settings
from comfyfleet.storage import open_storage
from comfyfleet.webhooks.signing import new_secret
from comfyfleet.webhooks.worker import WebhookWorker
from comfyfleet.workflows.catalog import load_served_catalog
from comfyfleet.workflows.watcher import watch_directory

log = logging.getLogger(__name__)
# How long a shutdown waits for a background task it cancelled. A task awaiting a database
# call that the cancellation does not end held a test's shutdown until its 300 s limit once
# (DNS discovery's read of the registry, parked in asyncpg's bind_execute, its task
# "cancelling"; SQLAlchemy over asyncpg is known to do so: MagicStack/asyncpg#873): the
# process's exit is not left to it. (The registry reads on plain asyncpg since; asyncpg alone
# is reported to hang in like cases, MagicStack/asyncpg#1265: the bound stays.)
CANCEL_WAIT_SECONDS = 10.0

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Connections of the API's own for its reads, beside the main pool's (db.make_engine).
READ_POOL_SIZE = 4


class PortUnavailable(Exception):
    """The service's address cannot be listened on (in use, or not this machine's)."""


class StoppedWhileStarting(Exception):
    """SIGTERM or SIGINT arrived before the service was ready (e.g. waiting for its database)."""


class DataDirUnusable(Exception):
    """DATA_DIR cannot keep what the service keeps there (the generated webhook secret)."""


def webhook_secret(settings: Settings) -> str:
    """The signing secret: WEBHOOK_SECRET's first, or one generated once and kept in the data
    directory (mode 0600)."""
    if settings.webhook_secrets:
        return settings.webhook_secrets[0]
    path: Path = settings.data_dir / "webhook_secret"
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as file:
                file.write(new_secret())
            log.warning("WEBHOOK_SECRET is not set: generated one in %s", path)
        return path.read_text().strip()
    except OSError as exc:
        raise DataDirUnusable(
            f"cannot keep the generated webhook secret in {path}: {exc.strerror} (set "
            "DATA_DIR to a writable directory, or WEBHOOK_SECRET)") from exc


def url_signing_key(secret: str) -> bytes:
    """The key of local-storage file URLs, derived from the webhook secret (no second secret
    to keep); rotating the webhook secret invalidates outstanding file URLs."""
    return hmac.new(secret.encode(), b"comfyfleet local file urls", hashlib.sha256).digest()


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel `task` and wait for it to end, CANCEL_WAIT_SECONDS at most: one that does not
    is logged with where it waits and left behind, so that the shutdown goes on."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=CANCEL_WAIT_SECONDS)
    if not done:
        where = io.StringIO()
        task.print_stack(file=where)
        log.warning("%s did not end within %.0f s of its cancellation; left behind:\n%s",
                    task.get_name(), CANCEL_WAIT_SECONDS, where.getvalue())
    elif not task.cancelled():
        task.exception()  # retrieved: it ended as it did, whatever that was


@asynccontextmanager
async def running_services(settings: Settings) -> AsyncIterator[Services]:
    """Everything the service needs, started in order and stopped in reverse."""
    endpoints = parse_endpoints(settings.comfyui_endpoints)
    # A mistake in either is told before anything starts.
    discovered = DnsTarget.parse(settings.comfyui_discovery) if settings.comfyui_discovery else None
    async with AsyncExitStack() as stack:
        engine = await stack.enter_async_context(db.open_database(settings))
        reads = db.make_engine(engine.url, pool_size=READ_POOL_SIZE)
        stack.push_async_callback(reads.dispose)
        events = JobNotices()
        webhook_slots = WebhookWorker.slots(settings)
        repository = JobRepository(engine, on_change=events.changed, reads=reads,
                                   max_concurrent_per_key=settings.max_concurrent_per_key,
                                   fair_share=settings.fair_share, webhook_slots=webhook_slots)
        stack.push_async_callback(repository.close)  # before `reads` is disposed of
        await repository.read_backlog()
        secret = await asyncio.to_thread(webhook_secret, settings)
        storage = await open_storage(settings, url_signing_key(secret))
        stack.push_async_callback(storage.close)
        catalog = await asyncio.to_thread(load_served_catalog, settings.workflows_dir)
        webhooks = WebhookWorker.from_settings(settings, engine, secret, storage.url,
                                               webhook_slots)
        waiters = JobWaiters()
        stack.push_async_callback(webhooks.close)
        lease = ProcessLease(engine)
        await lease.start()
        stack.push_async_callback(lease.close)
        peers = PeerChanges(engine, events, lease, jobs_changed=repository.jobs_changed)
        peers.start()
        stack.push_async_callback(peers.close)
        registry = BackendRegistry(engine)
        fleet = Fleet(endpoints, repository, storage, FleetTuning.from_settings(settings),
                      waiters=waiters, events=events, lease=lease, registry=registry,
                      registry_changed=peers.fleet, queued=peers.queued,
                      queued_here=peers.queued_here, slots=peers.slots, catalog=catalog)
        stack.push_async_callback(fleet.close, settings.shutdown_timeout)
        services = Services(settings, engine, repository, storage, catalog, fleet, waiters,
                            events)
        await fleet.start()
        if discovered is not None:
            discovery = DnsDiscovery.from_settings(discovered, settings, fleet, registry)
            stack.push_async_callback(_cancel, asyncio.create_task(discovery.run()))
        webhooks.start()
        watcher = asyncio.create_task(
            watch_directory(settings.workflows_dir, services.reload_catalog))
        stack.push_async_callback(_cancel, watcher)
        log.info("comfyfleet ready: %d backends, %d workflows", len(endpoints),
                 len(catalog.workflows))
        yield services


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with running_services(settings) as services:
            app.state.services = services
            app.state.guard.store = KeyStore(services.engine)
            app.state.scrape = Scrape(services.repository, services.fleet.sessions,
                                      app.state.guard)
            yield

    app = FastAPI(title="comfyfleet", version="0.1.0", lifespan=lifespan,
                  dependencies=[Depends(refuse_lone_surrogates)], telemetry=telemetry())
    install_error_handlers(app)
    # First: the security's middlewares wrap the v2 app and the v1 status poll too.
    mount_v2(app)
    jobs.install_job_poll(app, settings.route_prefix)
    jobs.install_job_submit(app, settings.route_prefix)
    install_security(app, settings)
    app.include_router(health.router)
    app.include_router(prometheus.router)
    app.include_router(outputs.files_router)
    # Every route under the prefix: an API key when keys are configured, and the rate limit.
    secured = [Depends(authenticate)]
    prefix = settings.route_prefix
    app.include_router(jobs.router, prefix=prefix, dependencies=secured)
    app.include_router(outputs.router, prefix=prefix, dependencies=secured)
    app.include_router(events.router, prefix=prefix, dependencies=secured)
    app.include_router(workflows.router, prefix=prefix, dependencies=secured)
    app.include_router(deliveries.router, prefix=prefix, dependencies=secured)
    app.include_router(backends.router, prefix=prefix, dependencies=secured)
    app.include_router(tenants.router, prefix=prefix, dependencies=secured)
    app.include_router(dashboard.router, prefix=prefix, dependencies=secured)
    dashboard.install_dashboard(app, prefix)
    install_openapi(app, settings.route_prefix)
    return app


@asynccontextmanager
async def serving(settings: Settings, port: int | None = None) -> AsyncIterator[str]:
    """Run the service with uvicorn on this loop; yields its base URL (port 0: any free port).
    What stops its start (storage that cannot be opened, a database that refuses it) is raised
    here as it is, for the caller to tell."""
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.service_host,
        port=settings.service_port if port is None else port,
        log_level="warning",
        forwarded_allow_ips=settings.forwarded_allow_ips,
        log_config=None,  # uvicorn's records go through our handler (LOG_FORMAT)
        # Its access log is at INFO, under the WARNING set above: it never wrote a line, but
        # its arguments were made at every request (the path quoted again).
        access_log=False,
        # The app's lifespan is entered here: uvicorn would log its failure as a traceback
        # and exit the process (status 3) from inside.
        lifespan="off",
        # Longer than client pools keep idle connections (aiohttp: 15 s, load balancers: 60 s),
        # so a client never reuses a connection we are closing at that moment.
        timeout_keep_alive=75,
        # Requests still open when stopping (?wait=, event streams) get this long.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_timeout),
    )
    server = uvicorn.Server(config)
    # Bound here rather than by uvicorn, which logs a bind failure and exits the process:
    # a port in use is a plain error for the caller to report.
    try:
        listening = socket.create_server(
            (config.host, config.port),
            family=socket.AF_INET6 if ":" in config.host else socket.AF_INET)
    except OSError as exc:
        raise PortUnavailable(
            f"cannot listen on {config.host}:{config.port}: "
            f"{os.strerror(exc.errno) if exc.errno else exc}") from exc
    async with AsyncExitStack() as stack:
        stack.callback(listening.close)  # uvicorn closes it too once it has served on it
        with _stopped_by_signal():
            await stack.enter_async_context(app.router.lifespan_context(app))
        task = asyncio.create_task(server.serve(sockets=[listening]))
        try:
            while not server.started:
                if task.done():
                    task.result()  # it failed: raise its error
                    raise RuntimeError("the service stopped during startup")
                if server.should_exit:  # a signal: uvicorn would act on it only once started
                    raise StoppedWhileStarting
                await asyncio.sleep(0.05)
            bound = server.servers[0].sockets[0].getsockname()
            url = f"http://{settings.service_host}:{bound[1]}"
            if settings.public_url is None and config.port == 0:
                settings.public_url = url  # the port was only known now
            yield url
        finally:
            await app.state.services.fleet.stop_dispatching()  # first: start nothing we'd leave
            server.should_exit = True
            if server.started:
                await task
            else:
                await _cancel(task)


@contextmanager
def _stopped_by_signal() -> Iterator[None]:
    """SIGTERM or SIGINT stops the block (the service's start, waiting for its database, say):
    it raises StoppedWhileStarting."""
    loop = asyncio.get_running_loop()
    starting = asyncio.current_task()
    assert starting is not None
    signalled = False

    def stop() -> None:
        nonlocal signalled
        signalled = True
        starting.cancel()

    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop)
    try:
        yield
    except asyncio.CancelledError:
        if not signalled:
            raise
        starting.uncancel()
        raise StoppedWhileStarting from None
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)


async def until_terminated() -> None:
    """Wait for SIGTERM or SIGINT, so `finally` blocks (and the embedded database) stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
