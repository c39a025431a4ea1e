"""One persistent websocket (and one HTTP session) per backend, reconnecting with backoff."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from typing import Protocol

import aiohttp

from comfyfleet import json_codec
from comfyfleet.comfy.cache import CachePolicy
from comfyfleet.comfy.capabilities import Capabilities
from comfyfleet.comfy.cleanup import BackendCleanup
from comfyfleet.comfy.client import ComfyClient, ComfyError
from comfyfleet.comfy.endpoints import Backend
from comfyfleet.comfy.messages import Binary, Message, Status, parse_binary, parse_text, unread
from comfyfleet.comfy.websocket import TEXT, WebSocket, WebSocketError
from comfyfleet.db import unavailable
from comfyfleet.execution.warm import WarmCache
from comfyfleet.http_client import HttpClient
from comfyfleet.pulse import Pulse
from comfyfleet.workflows.inference import NodeInputs

log = logging.getLogger(__name__)


FEATURE_FLAGS = json_codec.dumps({"type": "feature_flags",
                                  "data": {"supports_preview_metadata": True}})
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
# Healthy is the websocket up and /system_stats answering (DESIGN §7): a server whose HTTP
# side hangs or fails can keep its socket open. Asked this often, given this long.
STATS_PROBE_SECONDS = 5.0
STATS_TIMEOUT = 10.0


class SessionListener(Protocol):
    """Who hears a session's news (the fleet, which made it), told in this order:
    `backend_connected` after every (re)connect, before any message of that connection (so
    missed events can be reconciled); each `backend_message` in arrival order (but the frames
    nobody reads, `messages.unread`);
    `backend_disconnected` when a connection that was up is lost."""

    async def backend_connected(self, session: BackendSession) -> None: ...

    async def backend_message(self, session: BackendSession, message: Message | Binary
                              ) -> None: ...

    async def backend_disconnected(self, session: BackendSession) -> None: ...


class BackendSession:
    """Tracks one backend: whether it is up, its queue length, and our prompts on it; tells
    `listener` of what happens there."""

    def __init__(
        self,
        backend: Backend,
        listener: SessionListener,
        *,
        node_token: str | None = None,
        changes: Pulse | None = None,
    ) -> None:
        """`changes` beats whenever what `Fleet.describe` shows of this backend changes."""
        self.backend = backend
        # One id for the life of this process: events for prompts queued before a reconnect
        # still reach the new socket (which is opened only after the old one is closed).
        self.client_id = f"comfyfleet-{uuid.uuid4().hex}"
        self._listener = listener
        self._changes = changes or Pulse()
        self._http = aiohttp.ClientSession()
        self._lean_http = HttpClient()
        self.client = ComfyClient(backend.url, self._http, self._lean_http)
        self.connected = False
        # Counts the websocket connections made: events heard on one connection from a
        # prompt's start to its end are all its events (none were sent while it was down).
        self.connections = 0
        self.draining = False  # takes no new work; finishes what it has
        # When the backend was last seen going away (or this session began): the grace clock.
        self._unreachable_since: float | None = time.monotonic()
        self.queue_remaining = 0
        # Prompts we queued here that have not finished executing: the dispatch slots in use.
        # A dict as an insertion-ordered set: the oldest is the one running.
        self.inflight: dict[str, None] = {}
        self.last_error: str | None = None
        self.capabilities: Capabilities | None = None  # known once it has connected
        self.node_inputs: NodeInputs | None = None  # the same: what workflows are typed from
        self.warm = WarmCache()  # what its node cache holds, as far as we can tell
        # Deletes our files there when it has comfyui_nodes/ and a token is configured.
        self.cleanup = BackendCleanup(self.client, backend.name, node_token)

    @property
    def name(self) -> str:
        return self.backend.name

    async def run(self) -> None:
        """Stay connected until cancelled."""
        delay = BACKOFF_FIRST
        while True:
            try:
                await self._connection()
                delay = BACKOFF_FIRST  # it was up: reconnect quickly
            except ComfyError as exc:
                self.last_error = str(exc)
                log.warning("backend %s unreachable: %s", self.name, exc)
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.last_error = repr(exc)
                log.warning("backend %s connection lost: %r", self.name, exc)
            except Exception as exc:
                # Reconciling or following the events failed (the database away): the events
                # not handled are not replayed, so reconnect, and reconcile on connect again.
                self.last_error = "events not handled: " + str(exc).partition("\n")[0]
                log.warning("backend %s: %s; reconnecting", self.name, self.last_error,
                            exc_info=not unavailable(exc))  # a traceback unless an outage
            self._changes.beat()
            # Full jitter keeps a fleet of gateways from reconnecting in lockstep.
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _connection(self) -> None:
        websocket = await self.client.connect_websocket(self.client_id)
        self.connections += 1
        try:
            # Must be the first message: previews then name their prompt (frame type 4).
            websocket.send_text(FEATURE_FLAGS)
            stats = await self.client.system_stats()
            system = stats.get("system")
            argv = system.get("argv") if isinstance(system, dict) else None
            # Reset on every connect: a restarted server holds nothing.
            self.warm.reset(CachePolicy.from_argv(argv if isinstance(argv, list) else []))
            # Refreshed on every connect: a restarted backend may have new nodes or models.
            object_info = await self.client.object_info()
            self.capabilities = Capabilities.shared(object_info)
            self.node_inputs = NodeInputs.from_object_info(object_info)
            await self.cleanup.refresh()
            self.connected = True
            self._unreachable_since = None
            self.last_error = None
            log.info("backend %s connected (%s)", self.name, self.backend.url)
            self._changes.beat()
            await self._listener.backend_connected(self)
            probe = asyncio.create_task(self._probe_stats(websocket))
            try:
                await self._read(websocket)
            finally:
                probe.cancel()
                await asyncio.gather(probe, return_exceptions=True)
            if not probe.cancelled():
                raise probe.result()  # the probe closed the socket
            self.last_error = "websocket closed by the backend"
        except asyncio.CancelledError:
            self.connected = False  # we are shutting down: not a lost backend
            raise
        finally:
            websocket.close()
            if self.connected:
                self.connected = False
                self._unreachable_since = time.monotonic()
                log.warning("backend %s disconnected", self.name)
                self._changes.beat()
                await self._listener.backend_disconnected(self)

    async def _read(self, websocket: WebSocket) -> None:
        """Until the websocket is closed; a ComfyError when it fails."""
        # Looked up once a connection (the fleet's is the tracker's own, made at each look).
        tell = self._listener.backend_message
        try:
            # The messages that came in one read are taken without a wait between them.
            while (received := await websocket.receive()) is not None:
                kind, data = received
                if kind == TEXT:
                    if unread(data):
                        continue
                    message = parse_text(data)
                    if message is None:
                        continue
                    # Here, not in a coroutine of its own: a frame's every layer is one
                    # more coroutine made and awaited.
                    if (isinstance(message, Status) and message.queue_remaining is not None
                            and message.queue_remaining != self.queue_remaining):
                        self.queue_remaining = message.queue_remaining
                        self._changes.beat()
                    await tell(self, message)
                else:
                    binary = parse_binary(data)
                    if binary is not None:
                        await tell(self, binary)
        except WebSocketError as exc:
            raise ComfyError(f"websocket error: {exc}") from exc

    async def _probe_stats(self, websocket: WebSocket) -> ComfyError:
        """Ask /system_stats until it fails; then close the socket, so the backend counts as
        away (and is connected again, through the same check, once it answers)."""
        while True:
            await asyncio.sleep(STATS_PROBE_SECONDS)
            try:
                async with asyncio.timeout(STATS_TIMEOUT):
                    await self.client.system_stats()
            except ComfyError as exc:
                failure = exc
            except TimeoutError:
                failure = ComfyError(f"GET /system_stats: no answer in {STATS_TIMEOUT:g} s")
            else:
                continue
            websocket.close()
            return failure

    def unreachable_for(self) -> float:
        """Seconds since the backend went away; 0 while it is connected."""
        if self._unreachable_since is None:
            return 0.0
        return time.monotonic() - self._unreachable_since

    @property
    def accepts_work(self) -> bool:
        return self.connected and not self.draining

    def hold(self, prompt_id: str) -> None:
        """One of our prompts is going to this backend: it takes a slot."""
        self.inflight[prompt_id] = None
        self._changes.beat()

    def release(self, prompt_id: str) -> None:
        """The prompt finished executing here (or never will): its slot is free."""
        if self.inflight.pop(prompt_id, 0) is None:
            self._changes.beat()

    async def withdraw(self, prompt_id: str) -> None:
        """Take a prompt off this backend: out of the queue if pending, interrupted if running."""
        try:
            await self.client.delete_queued([prompt_id])
            await self.client.interrupt(prompt_id)
        except ComfyError as exc:
            # Unreachable now; if it runs later, nobody tracks it and its result is dropped.
            log.warning("could not withdraw prompt %s from %s: %s", prompt_id, self.name, exc)

    async def close(self) -> None:
        await self._http.close()
        await self._lean_http.close()
