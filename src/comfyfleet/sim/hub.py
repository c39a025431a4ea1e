"""Websocket clients and the ordered delivery of messages to them.

Like ComfyUI's PromptServer, senders only enqueue; one publisher task writes the frames in
order, and the recipient of a per-client message is looked up when it is written, not when it
is queued. The publisher takes everything queued at once and writes it to each socket in one
piece: a system call per frame would cost more than all the rest of a prompt. That bypasses
aiohttp's frame writer, which is why the sockets are opened without compression.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web

from comfyfleet.sim.faults import Faults
from comfyfleet.sim.frames import text_frame, websocket_frame

logger = logging.getLogger(__name__)

# A client that leaves this much unread is cut off rather than grow the server's memory.
MAX_UNREAD = 32 * 1024 * 1024

Frame = str | bytes


class Hub:
    def __init__(self, faults: Faults) -> None:
        self._faults = faults
        # clientId -> socket. Reproduces ComfyUI's table exactly, including its hazard: a new
        # socket with a known clientId replaces the entry, and when the old socket closes it
        # deletes the entry by id, silently unregistering the new one.
        self.sockets: dict[str, web.WebSocketResponse] = {}
        # clientId -> the feature flags that client sent; same lifetime rules as `sockets`.
        self.client_flags: dict[str, dict[str, Any]] = {}
        # Every open socket, replaced ones included, with its connection.
        self.connections: dict[web.WebSocketResponse, asyncio.Transport] = {}
        # What the publisher writes next (a list and an event: an asyncio.Queue costs several
        # times more per message, a dozen messages per prompt).
        self._outbox: list[tuple[Frame, str | None]] = []
        self._queued = asyncio.Event()

    def supports_preview_metadata(self, sid: str | None) -> bool:
        flags = self.client_flags.get(sid) if sid is not None else None
        return bool(flags and flags.get("supports_preview_metadata"))

    def broadcast(self, event: str, data: dict[str, Any]) -> None:
        self.send_frame(text_frame(event, data), None)

    def send_to(self, sid: str, event: str, data: dict[str, Any]) -> None:
        """Queue a message for one client; it is dropped if that client has no socket."""
        self.send_frame(text_frame(event, data), sid)

    def send_frame(self, frame: Frame, sid: str | None) -> None:
        """Queue a ready-made frame, for one client or (sid None) for every socket."""
        self._outbox.append((frame, sid))
        self._queued.set()

    def send_now(self, sid: str, event: str, data: dict[str, Any]) -> None:
        """Write at once, ahead of the queue (ComfyUI does this for replies on connect)."""
        ws = self.sockets.get(sid)
        if ws is not None and not self._faults.hang:
            self._write(ws, websocket_frame(text_frame(event, data)))

    async def publish(self) -> None:
        """Run forever, writing queued messages in order."""
        while True:
            await self._queued.wait()
            self._queued.clear()
            batch, self._outbox = self._outbox, []
            if self._faults.hang:
                continue  # a hung server writes nothing, and nothing is kept for later
            pieces: dict[web.WebSocketResponse, list[bytes]] = {}
            for frame, sid in batch:
                if sid is None:
                    targets = list(self.sockets.values())
                else:
                    target = self.sockets.get(sid)
                    targets = [] if target is None else [target]
                if targets:
                    wire = websocket_frame(frame)
                    for ws in targets:
                        pieces.setdefault(ws, []).append(wire)
            for ws, frames in pieces.items():
                self._write(ws, b"".join(frames))

    def _write(self, ws: web.WebSocketResponse, data: bytes) -> None:
        transport = self.connections.get(ws)
        # A closing websocket has sent, or is sending, its close frame: nothing may follow.
        if transport is None or ws.closed or transport.is_closing():
            return
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_UNREAD:
            logger.warning("a websocket client stopped reading; dropping it")
            transport.abort()

    async def close_all(self) -> None:
        """Close every socket with a close frame, as a clean shutdown does."""
        sockets = list(self.connections)
        await asyncio.gather(
            *(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY) for ws in sockets),
            return_exceptions=True,
        )

    def drop_all(self) -> int:
        """Cut every connection without a close frame, as a crash or a network failure does."""
        transports = list(self.connections.values())
        for transport in transports:
            transport.abort()
        return len(transports)
