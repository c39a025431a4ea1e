"""Websocket clients and the ordered delivery of messages to them.

Like ComfyUI's PromptServer, senders only enqueue; one publisher task writes the frames in
order. A slow client therefore delays later messages but never the worker, and the recipient
of a per-client message is looked up when it is written, not when it is queued.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import aiohttp
from aiohttp import web

logger = logging.getLogger(__name__)

# Failures of a write to a socket that is going away; ComfyUI ignores them the same way.
_SEND_ERRORS = (ConnectionError, aiohttp.ClientError)


class Hub:
    def __init__(self) -> None:
        # clientId -> socket. Reproduces ComfyUI's table exactly, including its hazard: a new
        # socket with a known clientId replaces the entry, and when the old socket closes it
        # deletes the entry by id, silently unregistering the new one.
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self._outbox: asyncio.Queue[tuple[str, str | None]] = asyncio.Queue()

    def broadcast(self, event: str, data: dict[str, Any]) -> None:
        self._outbox.put_nowait((_frame(event, data), None))

    def send_to(self, sid: str, event: str, data: dict[str, Any]) -> None:
        """Queue a message for one client; it is dropped if that client has no socket."""
        self._outbox.put_nowait((_frame(event, data), sid))

    async def send_now(self, sid: str, event: str, data: dict[str, Any]) -> None:
        """Write at once, bypassing the queue (ComfyUI does this for replies on connect)."""
        ws = self.sockets.get(sid)
        if ws is not None:
            await _write(ws, _frame(event, data))

    async def publish(self) -> None:
        """Run forever, writing queued messages in order."""
        while True:
            text, sid = await self._outbox.get()
            if sid is None:
                for ws in list(self.sockets.values()):
                    await _write(ws, text)
            elif (target := self.sockets.get(sid)) is not None:
                await _write(target, text)

    async def close_all(self) -> None:
        sockets = list(self.sockets.values())
        await asyncio.gather(
            *(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY) for ws in sockets),
            return_exceptions=True,
        )


def _frame(event: str, data: dict[str, Any]) -> str:
    # Default separators: clients see exactly the bytes Python's json.dumps gives ComfyUI.
    return json.dumps({"type": event, "data": data})


async def _write(ws: web.WebSocketResponse, text: str) -> None:
    if ws.closed:
        return
    try:
        await ws.send_str(text)
    except _SEND_ERRORS:
        pass
    except Exception:
        # One broken socket must not end delivery to all the others.
        logger.exception("websocket write failed")
