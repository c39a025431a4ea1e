"""The lean HTTP/1.1 client (http_client.py) against servers on loopback: aiohttp's, and raw
asyncio servers scripted to answer as a misbehaving peer would."""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from comfyfleet.comfy.client import ComfyClient, ComfyError
from comfyfleet.http_client import (
    TIMER_SLACK,
    ConnectError,
    HttpClient,
    HttpError,
    HttpTimeout,
    Timeouts,
    _origin,
    _split,
)
from tests.support import LOOPBACK, app_on_loopback, free_ports

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A server on loopback calling `handler(reader, writer, n)` for each connection, n
    counting the connections from 0: its URL."""
    count = 0
    handling: set[asyncio.Task[None]] = set()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        number, count = count, count + 1
        task = asyncio.current_task()
        assert task is not None
        handling.add(task)
        try:
            await handler(reader, writer, number)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            handling.discard(task)

    server = await asyncio.start_server(connected, LOOPBACK, 0)
    async with server:
        yield f"http://{LOOPBACK}:{server.sockets[0].getsockname()[1]}"
        for task in list(handling):
            task.cancel()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head (its first line and headers) and its Content-Length body."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    async with HttpClient() as http:
        yield http


async def test_requests_one_after_another_share_one_kept_connection(client: HttpClient) -> None:
    peers: list[int] = []

    async def echo(request: web.Request) -> web.Response:
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[1])
        return web.Response(body=await request.read())

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    async with app_on_loopback(app) as url:
        for index in range(5):
            method = "POST" if index % 2 else "GET"
            body = f"body {index}".encode() if method == "POST" else b""
            async with client.request(method, url + "/echo", body=body) as response:
                assert response.status == 200
                assert await response.read() == body
    assert len(peers) == 5
    assert len(set(peers)) == 1


async def test_an_answer_saying_connection_close_is_not_followed_on_its_connection(
    client: HttpClient,
) -> None:
    """The server means to close (it may not have yet): the next request goes on a new
    connection, never on this one, where nothing would answer it."""
    connections: list[int] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     number: int) -> None:
        connections.append(number)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        await reader.read()  # the socket left open until the client closes it

    async with raw_server(answer) as url:
        for _ in range(2):
            async with client.request("GET", url + "/", timeouts=Timeouts(read=5)) as response:
                assert await response.read() == b"ok"
    assert connections == [0, 1]


async def test_a_limited_client_frees_every_slot_and_bounds_the_wait_for_one() -> None:
    """At most `limit` requests at a time: a request that failed frees its slot as an
    answered one does; a request waiting for a slot counts the wait in its total time limit,
    and takes the slot freed in time."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while True:
            await read_request(reader)
            writer.write(OK)

    refused = f"http://{LOOPBACK}:{free_ports(1)}/"  # nothing listens there

    async def read(http: HttpClient, url: str, timeouts: Timeouts | None = None) -> bytes:
        async with http.request("GET", url, timeouts=timeouts or Timeouts()) as response:
            return await response.read()

    async with asyncio.timeout(10), raw_server(answer) as url, HttpClient(limit=1) as http:
        for _ in range(2):
            with pytest.raises(ConnectError):
                await read(http, refused)
        assert await read(http, url + "/") == b"ok"
        async with http.request("GET", url + "/") as holding:  # the only slot
            with pytest.raises(HttpTimeout, match="no free connection in time"):
                await read(http, url + "/", Timeouts(total=0.2))
            waiting = asyncio.create_task(read(http, url + "/", Timeouts(total=5)))
            await asyncio.sleep(0.2)
            assert not waiting.done()
            assert await holding.read() == b"ok"
        assert await waiting == b"ok"


async def test_a_connection_the_peer_closed_is_freed_by_reference_counts(
    client: HttpClient,
) -> None:
    """With the garbage collector off: the parser refers back to its connection, a cycle that
    was left for the collector's passes at every connection a peer closed (each of moto's
    PUTs)."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()

    async with raw_server(answer) as url:
        gc.collect()
        gc.disable()
        try:
            async with client.request("GET", url + "/", timeouts=Timeouts(read=5)) as response:
                assert await response.read() == b"ok"
                connection = weakref.ref(response._connection)
            del response
            for _ in range(100):  # until the loop has told it of the close
                if connection() is None:
                    break
                await asyncio.sleep(0.01)
            assert connection() is None
        finally:
            gc.enable()


@pytest.mark.parametrize("framing", ["content-length", "chunked", "until-close"])
async def test_a_body_is_read_whole_however_it_is_framed(client: HttpClient,
                                                          framing: str) -> None:
    pieces = [b"a" * 1000, b"b" * 70_000, b"c" * 5]
    whole = b"".join(pieces)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        if framing == "content-length":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(whole))
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
        elif framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in pieces:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        else:  # HTTP/1.0 style: no length, the body ends with the connection
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + whole)
        await writer.drain()
        if framing == "until-close":
            writer.close()
        else:
            await reader.read()  # until the client closes

    async with raw_server(answer) as url, client.request("GET", url + "/") as response:
        assert response.status == 200
        assert await response.read() == whole


async def test_a_large_body_streams_in_pieces_with_bounded_memory(client: HttpClient) -> None:
    """A reader that stops reading stops the socket: the server cannot push the whole body
    into the client while nothing takes it; read on, it arrives whole, in pieces of the size
    asked for."""
    size = 64 * 1024 * 1024
    written = 0
    block = bytes(range(256)) * 256  # 64 KiB

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        nonlocal written
        await read_request(reader)
        writer.transport.set_write_buffer_limits(high=64 * 1024)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        while written < size:
            writer.write(block)
            await writer.drain()
            written += len(block)
        await reader.read()

    async with raw_server(answer) as url, client.request("GET", url + "/") as response:
        chunks = response.chunks(1024 * 1024)
        first = await anext(chunks)
        await asyncio.sleep(0.5)  # nothing read meanwhile
        held_back = size - written
        sizes = [len(first)] + [len(chunk) async for chunk in chunks]
    # The socket buffers on loopback hold a few MiB; the rest waited for the reader.
    assert held_back > size // 2
    assert sizes == [1024 * 1024] * 64


async def test_a_body_that_breaks_off_is_an_error_not_a_short_body(client: HttpClient) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 400)
        await writer.drain()

    async with raw_server(answer) as url, client.request("GET", url + "/") as response:
        with pytest.raises(HttpError, match="closed before the answer ended"):
            await response.read()


def close_the_second_request(seen: list[bytes]) -> Handler:
    """Answers each connection's first request and keeps the connection; at its second, closes
    it unanswered, as a server does when its idle timeout fires just as a request arrives."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        head, _body = await read_request(reader)
        seen.append(head.split(b"\r\n")[0])
        writer.write(OK)
        await writer.drain()
        head, _body = await read_request(reader)
        seen.append(head.split(b"\r\n")[0])
        writer.transport.abort()

    return answer


async def test_a_get_on_a_connection_the_peer_closed_is_sent_again_once(
    client: HttpClient,
) -> None:
    seen: list[bytes] = []
    async with raw_server(close_the_second_request(seen)) as url:
        for _ in range(2):
            async with client.request("GET", url + "/a") as response:
                assert await response.read() == b"ok"
    assert seen == [b"GET /a HTTP/1.1"] * 3  # the second one twice: closed, then answered


async def test_a_post_on_a_connection_the_peer_closed_is_never_sent_again(
    client: HttpClient,
) -> None:
    """The request may have been acted on before the close: a POST /prompt sent twice queues
    the prompt twice."""
    seen: list[bytes] = []
    async with raw_server(close_the_second_request(seen)) as url:
        async with client.request("POST", url + "/prompt", body=b"{}") as response:
            assert await response.read() == b"ok"
        with pytest.raises(HttpError, match="closed before the answer"):
            async with client.request("POST", url + "/prompt", body=b"{}"):
                pass
    assert seen == [b"POST /prompt HTTP/1.1"] * 2


async def test_a_post_after_the_peer_closed_the_idle_connection_goes_on_a_new_one(
    client: HttpClient,
) -> None:
    """Closed while idle (its close seen before the next request): nothing was written on it,
    so even a POST goes, once, on a new connection."""
    seen: list[bytes] = []
    closed = asyncio.Event()

    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          _: int) -> None:
        head, _body = await read_request(reader)
        seen.append(head.split(b"\r\n")[0])
        writer.write(OK)
        await writer.drain()
        writer.close()  # without Connection: close, as an idle timeout does
        closed.set()

    async with raw_server(answer_once) as url:
        for _ in range(2):
            async with client.request("POST", url + "/prompt", body=b"{}") as response:
                assert await response.read() == b"ok"
            await closed.wait()
            await asyncio.sleep(0.05)  # the close reaches the client
            closed.clear()
    assert seen == [b"POST /prompt HTTP/1.1"] * 2


async def test_an_answer_that_does_not_come_times_out(client: HttpClient) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        await reader.read()

    async def slow_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        _: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await reader.read()

    async with raw_server(silent) as url:
        started = asyncio.get_running_loop().time()
        with pytest.raises(HttpTimeout):
            async with client.request("GET", url + "/", timeouts=Timeouts(read=0.2)):
                pass
        with pytest.raises(TimeoutError):  # a TimeoutError too, as callers catch
            async with client.request("GET", url + "/", timeouts=Timeouts(total=0.2)):
                pass
        assert asyncio.get_running_loop().time() - started < 2
    async with raw_server(slow_body) as url, client.request(
            "GET", url + "/", timeouts=Timeouts(read=0.2)) as response:
        with pytest.raises(HttpTimeout):
            await response.read()


async def test_each_wait_on_a_kept_connection_times_out_at_its_own_limit(
    client: HttpClient,
) -> None:
    """One timer a connection checks its waits' limits, not one a wait: a wait times out at
    its own limit when the timer was set for a later one before it, and a wait under way
    when the timer fires for an earlier one goes on to its own limit."""
    async def answer_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           _: int) -> None:
        while True:  # GET /<seconds>: answered that many seconds after it came
            head = (await read_request(reader))[0]
            await asyncio.sleep(float(head.split(b" ")[1].strip(b"/")))
            writer.write(OK)

    loop = asyncio.get_running_loop()

    async def seconds_to_answer(url: str, delay: float, read: float) -> float | None:
        """None when it timed out, not before its limit (nor long after: a loaded machine
        may be late by a fraction of a second)."""
        started = loop.time()
        try:
            async with client.request("GET", f"{url}/{delay}",
                                      timeouts=Timeouts(read=read)) as response:
                assert await response.read() == b"ok"
        except HttpTimeout:
            assert read - TIMER_SLACK <= loop.time() - started < read + 1
            return None
        return loop.time() - started

    async with raw_server(answer_after) as url:
        assert await seconds_to_answer(url, 0, read=5) is not None
        assert await seconds_to_answer(url, 10, read=0.3) is None  # not at 5 s
        # On a new connection (a timed out one is closed): the timer set for 0.2 s fires
        # while the next wait is under way, whose limit is 2 s.
        assert await seconds_to_answer(url, 0, read=0.2) is not None
        assert (await seconds_to_answer(url, 0.4, read=2) or 0) >= 0.4
        assert await seconds_to_answer(url, 10, read=0.3) is None


async def test_a_peer_that_stops_reading_a_large_body_times_out(client: HttpClient) -> None:
    async def not_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          _: int) -> None:
        await asyncio.sleep(30)

    async with raw_server(not_reading) as url:
        with pytest.raises(HttpTimeout):
            async with client.request("PUT", url + "/", body=bytes(64 * 1024 * 1024),
                                      timeouts=Timeouts(read=0.3)):
                pass


async def test_the_total_time_limit_bounds_connecting_too() -> None:
    """A connection that does not come (here its address never resolves) fails at the total
    limit when no connect limit is set, as a webhook's attempt has only its total."""

    async def never(host: str, port: int) -> list[tuple[int, tuple[str, int]]]:
        await asyncio.sleep(30)
        return []

    async with HttpClient(resolve=never) as client:
        with pytest.raises(HttpTimeout):
            async with client.request("POST", "http://receiver.example/hooks", body=b"{}",
                                      timeouts=Timeouts(total=0.2)):
                pass


def refused_url() -> str:
    """The URL of a loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return f"http://{LOOPBACK}:{probe.getsockname()[1]}"


async def test_a_refused_connection_is_a_connect_error_and_a_comfy_error(
    client: HttpClient,
) -> None:
    url = refused_url()
    with pytest.raises(ConnectError):
        async with client.request("GET", url + "/"):
            pass
    async with aiohttp.ClientSession() as session:
        comfy = ComfyClient(url, session, client)
        with pytest.raises(ComfyError, match="POST /prompt"):
            await comfy.queue_prompt({}, prompt_id="p", client_id="c")
        with pytest.raises(ComfyError, match="GET /view"):
            async with comfy.view("a.png", "", "output", 1024):
                pass


async def test_an_answer_s_headers_as_its_head_says_them_even_split_across_reads(
    client: HttpClient,
) -> None:
    """Read from the head's bytes only when asked (not by a callback per header): names in
    lowercase, values without the whitespace around them, a repeated one's values joined."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     number: int) -> None:
        await read_request(reader)
        for piece in (b"HTTP/1.1 200 OK\r\nX-Many: one\r\nLoc", b"ation:  /there \r\n",
                      b"x-many:two\r\nContent-Length: 2\r\n\r\nok"):
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(0.01)  # each piece a read of its own
        await reader.read()

    async with raw_server(answer) as url, client.request("GET", url + "/") as response:
        assert await response.read() == b"ok"
        assert response.headers == {"x-many": "one, two", "location": "/there",
                                    "content-length": "2"}


@pytest.mark.parametrize("url", [
    "http://h:8188/view?filename=ComfyUI_00001_.png&subfolder=&type=output",
    "https://bucket.s3.eu-west-1.amazonaws.com/outputs/job/9_0.png", "http://h:8188",
    "http://u:p@h:80/a?b=1", "http://[::1]:9/v", "http://h?q", "http://h?", "http://h/p?",
    "http://h/p??x", "http://h//x", "http:///x", "http://h:port/", "HTTP://h/x",
    "http://h/a#f", "http://h/a b", " http://h/a", "http://h/a\r\nX-Injected: 1",
    "http://h\t/a", "http://hé/a", "ftp://h/x", "h/x",
])
def test_a_url_is_split_as_urlsplit_splits_it(url: str) -> None:
    """The split of a request's URL (by hand when it is plain, `_split`) is urlsplit's."""
    parts = urlsplit(url)
    assert _split(url) == (parts.scheme, parts.netloc, parts.path, parts.query)


def test_each_origin_is_parsed_once_and_each_url_answered_as_it_was() -> None:
    """A request's pool key, Host header and target: its origin (scheme, authority, proxy)
    parsed once for all its requests (`_origin`), the rest of the URL for each; a URL that
    is not one an HttpError every time."""
    http = HttpClient()
    proxy = "http://proxy:3128"
    cases = {
        ("http://u:p@h:80/a?b=1#c", None): (("http", "h", 80, None), "h", "/a?b=1"),
        ("http://h:8188", None): (("http", "h", 8188, None), "h:8188", "/"),
        ("https://H.example:443/x", proxy): (("https", "h.example", 443, proxy),
                                            "H.example", "/x"),
        ("http://h/x?y#f", proxy): (("http", "h", 80, proxy), "h", "http://h/x?y"),
        ("http://[::1]:9/v", None): (("http", "::1", 9, None), "[::1]:9", "/v"),
    }
    for (url, via), (key, host_header, request_target) in cases.items():
        assert http._target(url, via) == (key, host_header, request_target), url
    parsed = _origin.cache_info().misses
    for path in ("/view?filename=a.png", "/view?filename=b.png", "/prompt"):
        assert http._target(f"http://h:8188{path}", None)[2] == path
    assert _origin.cache_info().misses == parsed
    for url in ("ftp://h/", "http:///x", "http://h:99999/", "http://h:port/"):
        for _ in range(2):
            with pytest.raises(HttpError, match=r"not an http|Port"):
                http._target(url, None)
