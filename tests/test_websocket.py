"""The lean websocket client (comfy/websocket.py) over real sockets: against the simulator,
and against a loopback server written here for what the simulator never sends (fragments,
pings, silence, protocol errors, a refused handshake)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from comfyfleet.comfy import websocket
from comfyfleet.comfy.websocket import BINARY, CLOSE, PING, PONG, TEXT, WebSocket, WebSocketError
from comfyfleet.sim import SimulatedComfyUI
from tests.test_sim import TIMEOUT, work_prompt

FLAGS = json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}})


async def messages_until_done(ws: WebSocket, prompt_id: str) -> list[tuple[int, bytes]]:
    """What came until the prompt's last message (`executing` with no node)."""
    received = []
    while True:
        message = await asyncio.wait_for(ws.receive(), TIMEOUT)
        assert message is not None
        received.append(message)
        kind, data = message
        if kind == TEXT:
            decoded = json.loads(data)
            if decoded["type"] == "executing" and decoded["data"]["node"] is None \
                    and decoded["data"].get("prompt_id") == prompt_id:
                return received


async def run_prompt(sim: SimulatedComfyUI, client_id: str, prompt_id: str) -> None:
    body = {"prompt": work_prompt(0, 2), "client_id": client_id, "prompt_id": prompt_id}
    async with aiohttp.ClientSession() as http, http.post(f"{sim.url}/prompt",
                                                          json=body) as response:
        assert response.status == 200, await response.text()


@pytest.mark.parametrize("flags", [True, False], ids=["preview metadata", "legacy previews"])
async def test_a_prompt_s_messages_and_previews_from_the_simulator(
        tmp_path: Path, flags: bool) -> None:
    async with SimulatedComfyUI(data_dir=tmp_path) as sim:
        ws = await websocket.connect(f"{sim.url}/ws?clientId=c1")
        if flags:
            ws.send_text(FLAGS.encode())
        hello = await asyncio.wait_for(ws.receive(), TIMEOUT)
        assert hello is not None and hello[0] == TEXT
        assert json.loads(hello[1])["data"]["sid"] == "c1"
        await run_prompt(sim, "c1", "p1")
        received = await messages_until_done(ws, "p1")
        previews = [data for kind, data in received if kind == BINARY]
        # One preview a step, each a PNG after its header: type 4 names its prompt.
        assert len(previews) == 2
        for preview in previews:
            (event,) = struct.unpack_from(">I", preview)
            assert event == (4 if flags else 1)
            assert b"\x89PNG" in preview
            if flags:
                assert b'"prompt_id": "p1"' in preview
        kinds = [json.loads(data)["type"] for kind, data in received if kind == TEXT]
        assert kinds.count("progress") == 2 and "execution_success" in kinds
        ws.close()
        assert await asyncio.wait_for(ws.receive(), TIMEOUT) is None


async def test_a_server_that_closes_ends_the_messages_and_one_that_drops_fails_them(
        tmp_path: Path) -> None:
    async with SimulatedComfyUI(data_dir=tmp_path) as sim:
        ws = await websocket.connect(f"{sim.url}/ws?clientId=c1")
        assert await asyncio.wait_for(ws.receive(), TIMEOUT) is not None  # the status
        assert sim.drop_websockets() == 1  # no close frame: the connection is lost
        with pytest.raises(WebSocketError, match="lost"):
            await asyncio.wait_for(ws.receive(), TIMEOUT)
        ws = await websocket.connect(f"{sim.url}/ws?clientId=c2")
        assert await asyncio.wait_for(ws.receive(), TIMEOUT) is not None
    # Stopped: the simulator closes its sockets with a close frame.
    assert await asyncio.wait_for(ws.receive(), TIMEOUT) is None


# A loopback server for the rest.

Scenario = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[object]]


async def read_client_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """A client's frame: (its opcode, its payload unmasked); it must be final and masked."""
    first, second = await reader.readexactly(2)
    assert first & 0x80 and second & 0x80, "a client's frame is final and masked"
    size = second & 0x7F
    if size == 126:
        (size,) = struct.unpack(">H", await reader.readexactly(2))
    elif size == 127:
        (size,) = struct.unpack(">Q", await reader.readexactly(8))
    key = await reader.readexactly(4)
    payload = await reader.readexactly(size)
    return first & 0x0F, bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def frame(opcode: int, payload: bytes, *, final: bool = True) -> bytes:
    size = len(payload)
    first = (0x80 if final else 0) | opcode
    if size < 126:
        return struct.pack(">BB", first, size) + payload
    if size < 1 << 16:
        return struct.pack(">BBH", first, 126, size) + payload
    return struct.pack(">BBQ", first, 127, size) + payload


async def answer_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           answer: bytes | None = None) -> None:
    """Read a client's opening handshake and answer it: with `answer` if given, else with a
    proper 101."""
    head = await reader.readuntil(b"\r\n\r\n")
    key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:"))
    accept = base64.b64encode(hashlib.sha1(
        key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    writer.write(answer or b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")


@asynccontextmanager
async def loopback(scenario: Scenario, *, answer: bytes | None = None) -> AsyncIterator[str]:
    """A server at the URL yielded: it answers the handshake (`answer`, if given, instead of a
    proper 101), then plays `scenario`."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answer_handshake(reader, writer, answer)
        try:
            await scenario(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/ws"


async def test_fragments_are_joined_and_a_ping_is_answered_with_its_payload() -> None:
    pongs: list[tuple[int, bytes]] = []

    async def scenario(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A ping between the fragments of a message, as the RFC allows; all in one write.
        writer.write(frame(TEXT, b'{"type": ', final=False) + frame(PING, b"hi")
                     + frame(0, b'"status", ', final=False) + frame(0, b'"data": {}}')
                     + frame(BINARY, b"\x00\x00\x00\x01"))
        pongs.append(await read_client_frame(reader))
        writer.write(frame(CLOSE, struct.pack(">H", 1000)))
        assert await read_client_frame(reader) == (CLOSE, struct.pack(">H", 1000))

    async with loopback(scenario) as url:
        ws = await websocket.connect(url)
        assert await ws.receive() == (TEXT, b'{"type": "status", "data": {}}')
        assert await ws.receive() == (BINARY, b"\x00\x00\x00\x01")
        assert await asyncio.wait_for(ws.receive(), TIMEOUT) is None
    assert pongs == [(PONG, b"hi")]


async def test_a_message_larger_than_aiohttp_took_arrives_whole_in_pieces() -> None:
    large = bytes(range(256)) * (5 * 1024 * 1024 // 256)  # 5 MiB: aiohttp refused over 4

    async def scenario(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        wire = frame(BINARY, large) + frame(TEXT, b"{}")
        for start in range(0, len(wire), 65536):  # in pieces, as a socket gives them
            writer.write(wire[start:start + 65536])
            await writer.drain()
        await reader.read()

    async with loopback(scenario) as url:
        ws = await websocket.connect(url)
        assert await asyncio.wait_for(ws.receive(), TIMEOUT) == (BINARY, large)
        assert await asyncio.wait_for(ws.receive(), TIMEOUT) == (TEXT, b"{}")
        ws.close()


async def test_a_silent_server_is_pinged_and_failed_when_it_does_not_answer() -> None:
    async def scenario(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await read_client_frame(reader) == (PING, b"")
        writer.write(frame(PONG, b""))  # answered once: the connection stays
        assert await read_client_frame(reader) == (PING, b"")
        await reader.read()  # not the second time

    async with loopback(scenario) as url:
        ws = await websocket.connect(url, heartbeat=0.2)
        started = asyncio.get_running_loop().time()
        with pytest.raises(WebSocketError, match="no answer to a ping"):
            await asyncio.wait_for(ws.receive(), TIMEOUT)
        # Ping at 0.2 s, answered; ping at 0.4, unanswered; failed at 0.5.
        assert 0.45 < asyncio.get_running_loop().time() - started < 2


@pytest.mark.parametrize("wire, why", [
    (frame(BINARY | 0x40, b"x"), "reserved bits"),
    (bytes([0x81, 0x81]) + b"abcd" + b"x", "masked by the server"),
    (frame(0, b"x"), "no message to continue"),
    (frame(PING, b"x", final=False), "control frame"),
    (frame(0x3, b""), "unknown opcode"),
    (frame(TEXT, b"a", final=False) + frame(TEXT, b"b"), "before the fragmented one ended"),
])
async def test_a_server_that_breaks_the_protocol_fails_the_connection(wire: bytes,
                                                                      why: str) -> None:
    closes: list[tuple[int, bytes]] = []

    async def scenario(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(frame(TEXT, b"before") + wire)
        closes.append(await read_client_frame(reader))
        await reader.read()

    async with loopback(scenario) as url:
        ws = await websocket.connect(url)
        assert await ws.receive() == (TEXT, b"before")  # what came first is still read
        with pytest.raises(WebSocketError, match=why):
            await asyncio.wait_for(ws.receive(), TIMEOUT)
    assert closes == [(CLOSE, struct.pack(">H", 1002))]


@pytest.mark.parametrize("answer, why", [
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "404 Not Found"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
     b"Sec-WebSocket-Accept: wrong\r\n\r\n", "does not match"),
])
async def test_a_refused_handshake_is_an_error(answer: bytes, why: str) -> None:
    async def scenario(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with loopback(scenario, answer=answer) as url:
        with pytest.raises(WebSocketError, match=why):
            await asyncio.wait_for(websocket.connect(url), TIMEOUT)


async def test_nothing_listening_is_an_error() -> None:
    async with loopback(lambda reader, writer: reader.read()) as url:
        pass  # closed: nothing listens there now
    with pytest.raises(WebSocketError):
        await websocket.connect(url)

