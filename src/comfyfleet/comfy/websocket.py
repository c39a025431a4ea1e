"""A lean websocket client (RFC 6455) for a ComfyUI server's /ws: an asyncio Protocol that cuts
the frames out of what the socket gives it and queues whole messages for one reader.

aiohttp's client websocket costs about a third more of the reader's CPU per job here (its
protocol and reader layers, a message object and a heartbeat callback per read; bench
figures in RESULTS.md, "wsframe"), and a backend's socket carries a dozen frames a job. This
does only what the socket to ComfyUI needs: the opening handshake (101 and
Sec-WebSocket-Accept checked; no extension, no subprotocol), text and binary messages
(fragmented ones joined), a ping answered with a pong, the server's close answered, a
heartbeat (a ping after HEARTBEAT seconds without a byte from the server, the connection
failed when nothing comes in the half of that after), frames sent masked (§5.3).

A text message is handed over as its UTF-8 bytes, not decoded: the JSON decoder reads bytes
and checks them, and the frames nobody reads (`messages.unread`) are never decoded at all.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import ssl
import struct
from collections import deque
from typing import cast
from urllib.parse import urlsplit

# Opcodes (§5.2).
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_WHOLE_TEXT = 0x80 | TEXT  # a frame's first byte: FIN, a text message
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# The opening handshake's answer (its head) may not be longer.
MAX_HANDSHAKE_BYTES = 64 * 1024
# A message may not be longer (a preview image of a large output): beyond it the connection
# fails rather than grow without bound. aiohttp's client refused more than 4 MiB.
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
HEARTBEAT = 20.0

# (opcode, payload) of a whole message: TEXT (UTF-8 bytes, unchecked) or BINARY.
Message = tuple[int, bytes]


class WebSocketError(Exception):
    """The connection could not be opened, broke off, or the server broke the protocol."""


def _masked(opcode: int, payload: bytes) -> bytes:
    """A final client frame: masked with a fresh key, as a client's frames must be."""
    size = len(payload)
    if size < 126:
        head = struct.pack(">BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        head = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, size)
    key = os.urandom(4)
    repeated = (key * (size // 4 + 1))[:size]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        size, "big")
    return head + key + body


class WebSocket(asyncio.Protocol):
    """One websocket connection, read by one task (`receive`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, key: bytes, *,
                 heartbeat: float = HEARTBEAT, max_message: int = MAX_MESSAGE_BYTES) -> None:
        self._loop = loop
        self._accept = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
        self._heartbeat = heartbeat
        self._max_message = max_message
        self.transport: asyncio.Transport | None = None
        self._head: bytes | None = b""  # the handshake's answer so far; None once open
        self.opened: asyncio.Future[None] = loop.create_future()
        # What came but is not yet a whole frame, in the pieces it came in, and how many
        # bytes the next step needs (a frame's head, or the whole frame once its head is read).
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._need = 2
        # A fragmented message's pieces so far, and its opcode (0 while there is none).
        self._fragments: list[bytes] = []
        self._fragments_opcode = 0
        self._fragments_bytes = 0
        self._messages: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False  # closed (by either side) or lost: no message comes after those
        self._error: WebSocketError | None = None
        self._close_sent = False
        self._last_received = loop.time()
        self._ping_at: float | None = None
        self._beat: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are no subclass

    def data_received(self, data: bytes) -> None:
        self._last_received = self._loop.time()
        if self._head is not None:
            data = self._handshake(data)
            if not data:
                return
        if self._pending:
            self._pending.append(data)
            self._pending_bytes += len(data)
            if self._pending_bytes < self._need:
                return
            data = b"".join(self._pending)
            self._pending.clear()
        had = len(self._messages)
        position = self._frames(data)
        if position < len(data) and not self._ended:
            rest = data[position:]
            self._pending.append(rest)
            self._pending_bytes = len(rest)
        if len(self._messages) > had:
            self._wake()

    def eof_received(self) -> bool:
        return False  # close: the server sends nothing more

    def connection_lost(self, exc: Exception | None) -> None:
        if self._beat is not None:
            self._beat.cancel()
        if not self.opened.done():
            self.opened.set_exception(WebSocketError(
                f"the connection was closed during the handshake{_reason(exc)}"))
        elif not self._ended:
            self._fail(WebSocketError(f"the connection was lost{_reason(exc)}"))
        self._ended = True
        self._wake()

    # reading

    def _handshake(self, data: bytes) -> bytes:
        """Take the handshake's answer from `data`; what follows it (frames), once it ended."""
        assert self._head is not None
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_HANDSHAKE_BYTES:
                self._refuse("an answer to the handshake longer than "
                             f"{MAX_HANDSHAKE_BYTES} bytes")
            else:
                self._head = head
            return b""
        self._head = None
        lines = head[:end].decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status[1:2] != ["101"]:
            self._refuse(f"the server answered {lines[0]!r}")
        elif headers.get("upgrade", "").lower() != "websocket" \
                or "upgrade" not in headers.get("connection", "").lower():
            self._refuse("the server's answer does not upgrade to a websocket")
        elif headers.get("sec-websocket-accept") != self._accept:
            self._refuse("the server's Sec-WebSocket-Accept does not match the key")
        elif headers.get("sec-websocket-extensions"):
            self._refuse("the server chose an extension that was not offered")
        else:
            self.opened.set_result(None)
            if self._heartbeat:
                self._beat = self._loop.call_later(self._heartbeat, self._check_heartbeat)
            return head[end + 4:]
        return b""

    def _refuse(self, why: str) -> None:
        self._head, self._ended = None, True  # nothing read from it after this
        if not self.opened.done():
            self.opened.set_exception(WebSocketError(f"websocket handshake: {why}"))
        assert self.transport is not None
        self.transport.abort()

    def _frames(self, data: bytes) -> int:
        """Take the whole frames at the start of `data`; where the first one not whole starts
        (`_need` set to the bytes it takes to go on)."""
        position, size = 0, len(data)
        while position < size and not self._ended:
            left = size - position
            if left < 2:
                self._need = 2
                return position
            first, second = data[position], data[position + 1]
            length, head = second & 0x7F, 2
            if length == 126:
                if left < 4:
                    self._need = 4
                    return position
                length, head = (data[position + 2] << 8) | data[position + 3], 4
            elif length == 127:
                if left < 10:
                    self._need = 10
                    return position
                (length,) = struct.unpack_from(">Q", data, position + 2)
                head = 10
            if first & 0x70 or second & 0x80:
                return self._protocol_error("a frame with reserved bits or masked by the server")
            if length > self._max_message:
                return self._protocol_error(f"a frame of {length} bytes: more than "
                                            f"{self._max_message}")
            end = position + head + length
            if end > size:
                self._need = head + length
                return position
            if first == _WHOLE_TEXT and not self._fragments_opcode:
                # A message's one frame, as a backend sends each: taken here (a call a frame).
                self._messages.append((TEXT, data[position + head:end]))
            else:
                self._frame(first, data[position + head:end])
            position = end
        self._need = 2
        return position

    def _frame(self, first: int, payload: bytes) -> None:
        opcode, final = first & 0x0F, first & 0x80
        if opcode in (TEXT, BINARY):
            if self._fragments_opcode:
                self._protocol_error("a new message before the fragmented one ended")
            elif final:
                self._messages.append((opcode, payload))
            else:
                self._fragments_opcode = opcode
                self._fragments, self._fragments_bytes = [payload], len(payload)
        elif opcode == CONTINUATION:
            if not self._fragments_opcode:
                self._protocol_error("a continuation frame with no message to continue")
                return
            self._fragments.append(payload)
            self._fragments_bytes += len(payload)
            if self._fragments_bytes > self._max_message:
                self._protocol_error(f"a message of more than {self._max_message} bytes")
            elif final:
                self._messages.append((self._fragments_opcode, b"".join(self._fragments)))
                self._fragments_opcode, self._fragments = 0, []
        elif not final or len(payload) > 125:
            self._protocol_error("a fragmented or long control frame")
        elif opcode == PING:
            self._send(PONG, payload)
        elif opcode == CLOSE:
            self._ended = True
            # Its status code echoed, as the RFC advises.
            self._send(CLOSE, payload[:2] if len(payload) >= 2 else b"")
            self._close_transport()
        elif opcode != PONG:  # a pong needs nothing: any byte counts for the heartbeat
            self._protocol_error(f"a frame of the unknown opcode {opcode}")

    def _protocol_error(self, what: str) -> int:
        self._fail(WebSocketError(f"the server broke the websocket protocol: {what}"))
        if not self._close_sent:
            self._send(CLOSE, struct.pack(">H", 1002))
        self._close_transport()
        return 0

    def _check_heartbeat(self) -> None:
        """A ping once the server has said nothing for the heartbeat; the connection failed
        when nothing answers it in half that time."""
        now = self._loop.time()
        if now - self._last_received < self._heartbeat:
            self._ping_at = None
            self._beat = self._loop.call_at(self._last_received + self._heartbeat,
                                            self._check_heartbeat)
        elif self._ping_at is None:
            self._ping_at = now
            self._send(PING, b"")
            self._beat = self._loop.call_at(now + self._heartbeat / 2, self._check_heartbeat)
        else:
            self._fail(WebSocketError(
                f"no answer to a ping in {self._heartbeat / 2:g} s"))
            assert self.transport is not None
            self.transport.abort()

    def _fail(self, error: WebSocketError) -> None:
        if self._error is None and not self._ended:
            self._error = error
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self) -> Message | None:
        """The next message; None once the connection was closed (by either side, with a
        close frame); WebSocketError when it failed or was lost. Messages that came before
        the end are all received first."""
        while True:
            if self._messages:
                return self._messages.popleft()
            if self._error is not None:
                raise self._error
            if self._ended:
                return None
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    # writing

    def _send(self, opcode: int, payload: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing() or self._close_sent:
            return
        self._close_sent = opcode == CLOSE
        transport.write(_masked(opcode, payload))

    def send_text(self, text: bytes) -> None:
        """A text message of `text` (UTF-8); dropped once the connection is closing."""
        self._send(TEXT, text)

    def _close_transport(self) -> None:
        self._ended = True
        if self.transport is not None:
            self.transport.close()  # once what was written is sent
        self._wake()

    def close(self) -> None:
        """Close the connection (a close frame, then the socket); the reader's `receive`
        returns None."""
        self._send(CLOSE, struct.pack(">H", 1000))
        self._close_transport()


def _reason(exc: Exception | None) -> str:
    return f": {exc}" if exc is not None else ""


async def connect(url: str, *, tls: ssl.SSLContext | None = None,
                  heartbeat: float = HEARTBEAT) -> WebSocket:
    """An open websocket to `url` (http:// or https://, as ComfyUI's own URL says it), its
    handshake answered; WebSocketError if not. No time limit of its own: the caller's
    (`asyncio.timeout`) bounds it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebSocketError(f"not an http(s) URL: {url!r}")
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16))
    loop = asyncio.get_running_loop()
    if secure and tls is None:
        tls = ssl.create_default_context()
    websocket: WebSocket | None = None
    try:
        _, websocket = await loop.create_connection(
            lambda: WebSocket(loop, key, heartbeat=heartbeat), parts.hostname, port,
            ssl=tls if secure else None)
        assert websocket.transport is not None
        websocket.transport.write(
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode("latin-1"))
        await websocket.opened
    except BaseException as exc:
        if websocket is not None and websocket.transport is not None:
            websocket.opened.cancel()  # nobody waits for it now
            websocket.transport.abort()
        if isinstance(exc, OSError):  # ssl.SSLError is one
            raise WebSocketError(f"websocket {url}: {exc}") from exc
        raise
    return websocket
