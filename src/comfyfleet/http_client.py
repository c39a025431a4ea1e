"""A lean HTTP/1.1 client for the requests every job makes (POST /prompt, GET /view, the S3
PUT): an asyncio Protocol per connection, llhttp (httptools, uvicorn's parser) for the
answers, keep-alive connections pooled per (scheme, host, port, proxy).

An aiohttp request against a local server costs 150-320 us of the client's CPU here, most of
it in the generality around the socket (its request and response objects, tracing signals,
cookie and redirect handling); this client does only what the hot path needs: bytes out with a
Content-Length, an answer whose body (Content-Length, chunked, or until close) is read whole
or streamed with backpressure, time limits, TLS, an HTTP proxy (a CONNECT tunnel for https).

A reused connection that the peer closed while it sat idle is tried once more on a new
connection only when resending cannot do anything twice: for any method when nothing was
written (the close seen before writing), and after writing only for the idempotent methods
(RFC 9110 9.2.2) and only if no byte of an answer came. A POST is never sent twice.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from comfyfleet import json_codec

# The methods a request may be resent with when its connection broke before any answer.
IDEMPOTENT_METHODS = frozenset({"GET", "PUT", "DELETE", "OPTIONS"})
# An idle connection older than this is closed, not reused: servers close theirs after 5-75 s
# (aiohttp's client keeps them 15 s, as here), and a close racing the next request costs a
# retry, or for a POST an error.
KEEPALIVE_SECONDS = 15.0
# An answer's body buffered beyond this (or what the reader asked for, if more) pauses
# reading from the socket until the reader takes it: a large output streams in bounded memory.
READ_BUFFER_BYTES = 256 * 1024
# A request body is written in pieces of this size, each once the socket takes the one
# before, rather than handed to the transport whole (which would copy what it cannot send).
WRITE_PIECE_BYTES = 256 * 1024


_DEFAULT_PORTS = {"http": 80, "https": 443}


class HttpError(Exception):
    """No complete answer: the connection could not be made or broke off, a time limit
    passed, or what came was not HTTP."""


class ConnectError(HttpError):
    """The connection could not be made (refused, unreachable, no such host, TLS refused)."""


class CertificateError(ConnectError):
    """The server's TLS certificate did not verify: it will not on the next try either."""


class HttpTimeout(HttpError, TimeoutError):
    """A time limit passed before the answer (or the next piece of its body) came."""


@dataclass(frozen=True)
class Timeouts:
    """`connect`: to open a connection; `read`: for each wait on the answer (its head, each
    piece of its body); `total`: the whole exchange, from the request to the body's end.
    None: no limit."""

    connect: float | None = None
    read: float | None = None
    total: float | None = None


# host, port -> the (family, address) pairs a connection may go to.
Resolve = Callable[[str, int], Awaitable[list[tuple[int, tuple[Any, ...]]]]]


# A pool's: scheme, host, port, proxy.
_PoolKey = tuple[str, str, int, str | None]


# A timer may fire this much before its time (uvloop's count milliseconds, rounded): a wait
# whose time limit is no further away has timed out.
TIMER_SLACK = 0.001


@lru_cache(maxsize=1024)
def _origin(scheme: str, netloc: str, proxy: str | None
            ) -> tuple[_PoolKey, str] | None:
    """The pool key and Host header of a URL of `scheme` and authority `netloc` (through the
    http:// `proxy`, if given): parsed once for the few origins requests go to, not for each
    request (a URL's host and port are parsed again at every read of them, 5-10 us); None
    when it is not http(s) with a host, ValueError for a port that is not one."""
    parts = urlsplit(f"{scheme}://{netloc}")
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    port = parts.port or _DEFAULT_PORTS[scheme]
    host_header = netloc.rpartition("@")[2]
    if parts.port is not None and port == _DEFAULT_PORTS[scheme]:
        host_header = host_header.rpartition(":")[0]  # as botocore signs it, and aiohttp
    return (scheme, parts.hostname, port, proxy), host_header


def _split(url: str) -> tuple[str, str, str, str]:
    """The scheme, authority, path and query of `url`, as urlsplit finds them. Split here when
    it is plainly `http(s)://authority[/path][?query]` in printable ASCII (every URL the
    service makes: an output's /view and PUT are new to urlsplit's cache, and its work for
    one, 2.7 us, was more than the rest of the request's setup); by urlsplit otherwise, which
    also drops what a URL must not carry (tabs, line breaks, surrounding spaces)."""
    scheme, sep, rest = url.partition("://")
    if sep and scheme in _DEFAULT_PORTS and url.isascii() and url.isprintable() \
            and " " not in url and "#" not in url:
        ends = [end for end in (rest.find("/"), rest.find("?")) if end >= 0]
        cut = min(ends) if ends else len(rest)
        path, _, query = rest[cut:].partition("?")
        return scheme, rest[:cut], path, query
    parts = urlsplit(url)
    return parts.scheme, parts.netloc, parts.path, parts.query


class _Connection(asyncio.Protocol):
    """One keep-alive connection, carrying one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        # Holds this connection's callbacks: a reference cycle until the connection is lost.
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        self.lost = False
        self._waiter: asyncio.Future[None] | None = None
        self._write_ready: asyncio.Future[None] | None = None
        # The wait under way (the answer's, or the socket's to take more of the request) and
        # when it times out; the timer that checks it (see _bounded).
        self._watched: asyncio.Future[None] | None = None
        self._expires = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._tunnel_answer: bytes | None = None  # while a CONNECT is answered
        self.begin()

    def begin(self) -> None:
        """Ready for the next exchange's answer."""
        self.status = 0
        # What came of the answer until its head was whole: its headers are read from there
        # only if asked for (`head_fields`), not by a callback per header, which cost more
        # than the rest of an answer's parsing together.
        self.head_pieces: list[bytes] = []
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.received = False  # a byte of this exchange's answer came
        self.error: HttpError | None = None
        self._body: list[bytes] = []
        self._buffered = 0
        self._want = 0
        self._paused = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are no subclass

    def data_received(self, data: bytes) -> None:
        if self._tunnel_answer is not None:
            self._tunnel_answer += data
            self._wake()
            return
        self.received = True
        if not self.head_done:
            self.head_pieces.append(data)
        assert self._parser is not None  # (no data after the connection is lost)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(HttpError(f"not an HTTP answer: {exc}"))
            assert self.transport is not None
            self.transport.close()

    def eof_received(self) -> bool:
        return False  # close: a half-closed connection carries no next request

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.head_done and not self.complete and self._until_close():
            self.complete = True  # a body delimited by the close, now whole
            self._wake()
        elif not self.complete:
            reason = f": {exc}" if exc is not None else ""
            self._fail(HttpError(f"the connection was closed before the answer ended{reason}"))
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)
        if self._timer is not None:
            self._timer.cancel()
        # Nothing is fed to the parser any more: without it the connection and its transport
        # go by reference counts, not by the garbage collector's passes (one a connection the
        # peer closes, such as each of moto's PUTs).
        self._parser = None

    def pause_writing(self) -> None:
        self._write_ready = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._write_ready is not None and not self._write_ready.done():
            self._write_ready.set_result(None)
        self._write_ready = None

    # httptools' callbacks

    def on_headers_complete(self) -> None:
        assert self._parser is not None  # (called by it)
        self.status = self._parser.get_status_code()
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered >= max(self._want, READ_BUFFER_BYTES) and not self._paused:
            assert self.transport is not None
            self.transport.pause_reading()
            self._paused = True
        if self._buffered >= self._want:
            self._wake()

    def on_message_complete(self) -> None:
        assert self._parser is not None  # (called by it)
        self.keep_alive = self._parser.should_keep_alive()  # (reset once the call returns)
        self.complete = True
        self._wake()

    # the exchange

    def _until_close(self) -> bool:
        headers = head_fields(self.head_pieces)
        return "content-length" not in headers and "chunked" not in headers.get(
            "transfer-encoding", "").lower()

    def _fail(self, error: HttpError) -> None:
        if self.error is None:
            self.error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wait(self, timeouts: Timeouts, deadline: float | None) -> Awaitable[None]:
        """Until the next callback that wakes this (or a failure, or the time limit). Not a
        coroutine of its own, one a wait: the waiter, once done, is never set again (each
        setter checks), so it need not be unset."""
        if self.error is not None:
            raise self.error
        self._waiter = self.loop.create_future()
        return self._bounded(self._waiter, timeouts, deadline)

    async def _bounded(self, future: asyncio.Future[None], timeouts: Timeouts,
                       deadline: float | None) -> None:
        """`future`, or HttpTimeout once the read timeout or the deadline passes. Checked by
        the connection's one timer, which fires no later than the wait's limit: set afresh
        only when it would fire later or is unset (the waits of one exchange and the next
        end later and later), not for each wait (call_later and cancel, 1.8 us, were more
        than the rest of a wait)."""
        wait = timeouts.read
        now = self.loop.time()
        if deadline is not None:
            wait = deadline - now if wait is None else min(wait, deadline - now)
        if wait is None:
            await future
            return
        self._watched, self._expires = future, now + wait
        if self._timer is None or self._timer.when() > self._expires:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(self._expires, self._check_wait)
        try:
            await future
        finally:
            self._watched = None

    def _check_wait(self) -> None:
        """The timer fired: the wait under way times out if its limit has come, else the
        timer is set for it again; with none under way, it stays unset until the next."""
        self._timer = None
        future = self._watched
        if future is None or future.done():
            return
        if self.loop.time() >= self._expires - TIMER_SLACK:
            future.set_exception(HttpTimeout("timed out"))
        else:
            self._timer = self.loop.call_at(self._expires, self._check_wait)

    async def tunnel(self, authority: str, tls: ssl.SSLContext, server_hostname: str) -> None:
        """Through the proxy this is connected to, a tunnel to `authority`, and TLS in it
        (the proxy's answer to CONNECT has no body, which the parser cannot be told)."""
        assert self.transport is not None
        self._tunnel_answer = b""
        self.transport.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
                             .encode("latin-1"))
        while b"\r\n\r\n" not in self._tunnel_answer:
            await self._wait(Timeouts(), None)
        status_line = self._tunnel_answer.partition(b"\r\n")[0].decode("latin-1")
        if status_line.split(" ")[1:2] != ["200"]:
            raise ConnectionRefusedError(f"the proxy answered CONNECT with {status_line!r}")
        self._tunnel_answer = None
        transport = await self.loop.start_tls(
            self.transport, self, tls, server_hostname=server_hostname)
        assert transport is not None
        self.transport = transport

    async def send(self, head: bytes, body: bytes | memoryview, timeouts: Timeouts,
                   deadline: float | None) -> None:
        """Write the request; a large body piece by piece, each once the socket has taken
        the one before (within the read timeout: a peer that stops reading fails it)."""
        assert self.transport is not None
        if len(body) <= WRITE_PIECE_BYTES:
            self.transport.write(head + body if body else head)
            return
        self.transport.write(head)
        view = memoryview(body)
        for start in range(0, len(view), WRITE_PIECE_BYTES):
            if self._write_ready is not None:
                await self._bounded(self._write_ready, timeouts, deadline)
            if self.lost:
                return  # the answer's wait says why
            self.transport.write(view[start:start + WRITE_PIECE_BYTES])

    async def answer_head(self, timeouts: Timeouts, deadline: float | None) -> None:
        while not self.head_done:
            await self._wait(timeouts, deadline)

    async def body_piece(self, size: int, timeouts: Timeouts, deadline: float | None) -> bytes:
        """Up to `size` bytes of the body, once that many are buffered or it has ended; b""
        after its end."""
        while self._buffered < size and not self.complete:
            self._want = size
            if self._paused:
                assert self.transport is not None
                self.transport.resume_reading()
                self._paused = False
            await self._wait(timeouts, deadline)
        self._want = 0
        whole = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        piece, rest = whole[:size], whole[size:]
        self._body = [rest] if rest else []
        self._buffered = len(rest)
        if self._paused and self._buffered < READ_BUFFER_BYTES:
            assert self.transport is not None
            self.transport.resume_reading()
            self._paused = False
        return piece

    def drained(self) -> bool:
        """The body has ended and all of it was read."""
        return self.complete and not self._buffered

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.lost and self.error is None \
            and not self._body


class Response:
    """An answer: its status and head (header names lowercase; repeated ones joined by ", "),
    and its body, to be read inside the `request` block."""

    def __init__(self, connection: _Connection, timeouts: Timeouts, deadline: float | None):
        self._connection = connection
        self._timeouts = timeouts
        self._deadline = deadline
        self.status = connection.status
        self._head_pieces = connection.head_pieces
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        if self._headers is None:
            self._headers = head_fields(self._head_pieces)
        return self._headers

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body, or its first `limit` bytes (the rest unread)."""
        if limit is not None:
            return await self._connection.body_piece(limit, self._timeouts, self._deadline)
        connection = self._connection
        pieces = []
        while True:  # not asking once more for the b"" that says a whole body has ended
            pieces.append(await connection.body_piece(
                READ_BUFFER_BYTES, self._timeouts, self._deadline))
            if connection.drained():
                return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    async def json(self) -> Any:
        """The body as JSON; ValueError when it is not."""
        return json_codec.loads(await self.read())

    def chunks(self, size: int) -> Chunks:
        """The body in pieces of `size` bytes (the last one shorter), at most about `size`
        bytes of it held here at a time."""
        return Chunks(self._connection, size, self._timeouts, self._deadline)


class Chunks:
    """`Response.chunks`: an iterator of its own, not an async generator (the event loop's
    hooks add each one to a weak set and remove it again, in Python, and close one left
    unfinished by a task of its own)."""

    def __init__(self, connection: _Connection, size: int, timeouts: Timeouts,
                 deadline: float | None) -> None:
        self._connection = connection
        self._size = size
        self._timeouts = timeouts
        self._deadline = deadline

    def __aiter__(self) -> Chunks:
        return self

    async def __anext__(self) -> bytes:
        piece = await self._connection.body_piece(self._size, self._timeouts, self._deadline)
        if not piece:
            raise StopAsyncIteration
        return piece


class HttpClient:
    """Pooled keep-alive connections, at most `limit` in use at a time (None: no limit).
    `tls`: the context for https (the system's defaults if None). `resolve`, if given, is
    the only way a host name becomes addresses to connect to (host, port -> (family,
    address) pairs, or OSError saying why none may be used): a guard on where connections go
    (egress.py)."""

    def __init__(self, *, limit: int | None = None, tls: ssl.SSLContext | None = None,
                 resolve: Resolve | None = None) -> None:
        self._idle: dict[_PoolKey, list[_Connection]] = {}
        self._slots = asyncio.Semaphore(limit) if limit is not None else None
        self._tls = tls
        self._resolve = resolve
        self._closed = False

    def _target(self, url: str, proxy: str | None) -> tuple[_PoolKey, str, str]:
        """The pool key, Host header and request target (origin-form, or absolute-form
        through a proxy) of a request for `url`."""
        scheme, netloc, path, query = _split(url)
        try:
            origin = _origin(scheme, netloc, proxy)
        except ValueError as exc:
            raise HttpError(f"{url!r}: {exc}") from exc
        if origin is None:
            raise HttpError(f"not an http(s) URL: {url!r}")
        key, host_header = origin
        if proxy is not None and scheme == "http":
            return key, host_header, url.partition("#")[0]
        return key, host_header, (path or "/") + (f"?{query}" if query else "")

    def request(
        self, method: str, url: str, *, body: bytes | memoryview = b"",
        headers: dict[str, str] | None = None, timeouts: Timeouts = Timeouts(),
        proxy: str | None = None,
    ) -> _Request:
        """The answer to one request (through the http:// `proxy`, if given), its body
        readable inside the block (`async with client.request(...) as response`); HttpError
        (or its kinds) when no whole answer came. Its connection is kept for the next request
        only if its body was read to the end. Not for HEAD (the parser would wait for the
        body its head announces)."""
        return _Request(self, partial(self._open, method, url, body, headers, timeouts, proxy))

    async def _open(
        self, method: str, url: str, body: bytes | memoryview, headers: dict[str, str] | None,
        timeouts: Timeouts, proxy: str | None,
    ) -> tuple[_PoolKey, _Connection, Response]:
        """`request`'s answer, with its connection, holding a slot until `_close_exchange`."""
        key, host_header, request_target = self._target(url, proxy)
        length = f"Content-Length: {len(body)}\r\n" if body or method != "GET" else ""
        fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()]) \
            if headers else ""
        head = (f"{method} {request_target} HTTP/1.1\r\nHost: {host_header}\r\n{length}{fields}"
                "\r\n").encode("latin-1")
        loop = asyncio.get_running_loop()  # (once: it asks the kernel for the process's id)
        deadline = loop.time() + timeouts.total if timeouts.total is not None else None
        if self._slots is not None and (deadline is None or not self._slots.locked()):
            await self._slots.acquire()  # no time limit to set: none, or a free slot at once
        elif self._slots is not None:
            try:  # the total time limit counts the wait for a free slot too
                async with asyncio.timeout_at(deadline):
                    await self._slots.acquire()
            except TimeoutError as exc:
                raise HttpTimeout(f"{method} {url}: no free connection in time") from exc
        try:
            connection = await self._exchange(key, method, head, body, timeouts, deadline,
                                              loop)
        except BaseException:
            if self._slots is not None:
                self._slots.release()
            raise
        return key, connection, Response(connection, timeouts, deadline)

    def _close_exchange(self, key: _PoolKey, connection: _Connection) -> None:
        """The end of `request`'s block: its connection kept or closed, its slot freed."""
        try:
            self._release(key, connection)
        finally:
            if self._slots is not None:
                self._slots.release()

    async def _exchange(self, key: _PoolKey, method: str, head: bytes,
                        body: bytes | memoryview, timeouts: Timeouts, deadline: float | None,
                        loop: asyncio.AbstractEventLoop) -> _Connection:
        """A connection whose answer's head has come."""
        resend = method in IDEMPOTENT_METHODS
        while True:
            connection, reused = await self._connection(key, timeouts, deadline, loop)
            try:
                await connection.send(head, body, timeouts, deadline)
                await connection.answer_head(timeouts, deadline)
                return connection
            except HttpTimeout:
                _close(connection)
                raise
            except HttpError:
                _close(connection)
                if reused and resend and not connection.received:
                    resend = False  # once
                    continue
                raise
            except BaseException:  # cancelled: the answer would belong to no one
                _close(connection)
                raise

    async def _connection(self, key: _PoolKey, timeouts: Timeouts, deadline: float | None,
                          loop: asyncio.AbstractEventLoop) -> tuple[_Connection, bool]:
        """An idle connection still open (True), else a new one (False)."""
        if self._closed:
            raise HttpError("the client is closed")
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            assert connection.transport is not None
            if connection.lost or connection.transport.is_closing():
                continue
            if loop.time() - connection.idle_since > KEEPALIVE_SECONDS:
                connection.transport.close()
                continue
            connection.begin()
            return connection, True
        return await self._connect(key, timeouts, deadline, loop), False

    async def _connect(self, key: _PoolKey, timeouts: Timeouts, deadline: float | None,
                       loop: asyncio.AbstractEventLoop) -> _Connection:
        """A new connection: straight, or through the proxy (for https, a CONNECT tunnel)."""
        scheme, host, port, proxy = key
        if scheme == "https" and self._tls is None:
            self._tls = ssl.create_default_context()  # once: it reads the system's CAs
        tls = self._tls if scheme == "https" else None
        where = f"{host}:{port}"
        to_host, to_port = host, port
        if proxy is not None:
            proxy_parts = urlsplit(proxy)
            to_host, to_port = proxy_parts.hostname or "", proxy_parts.port or 80
            where += f" through the proxy {to_host}:{to_port}"
        tls_now = tls if proxy is None else None  # else in the tunnel
        connect_by = None if timeouts.connect is None else loop.time() + timeouts.connect
        if deadline is not None:
            connect_by = deadline if connect_by is None else min(connect_by, deadline)
        try:
            async with asyncio.timeout_at(connect_by):
                addresses = [(0, (to_host, to_port))] if self._resolve is None \
                    else await self._resolve(to_host, to_port)
                if not addresses:
                    raise OSError(f"{to_host} has no address to connect to")
                for family, address in addresses:
                    try:
                        _, connection = await loop.create_connection(
                            lambda: _Connection(loop), address[0], address[1], family=family,
                            ssl=tls_now, server_hostname=host if tls_now is not None else None)
                        break
                    except OSError:
                        if (family, address) == addresses[-1]:
                            raise
                if proxy is not None and tls is not None:
                    try:
                        await connection.tunnel(f"{host}:{port}", tls, host)
                    except BaseException:
                        _close(connection)
                        raise
        except ssl.SSLCertVerificationError as exc:
            raise CertificateError(f"connecting to {where}: {exc}") from exc
        except TimeoutError as exc:
            raise HttpTimeout(f"connecting to {where}: timed out") from exc
        except (OSError, ssl.SSLError, HttpError) as exc:
            raise ConnectError(f"connecting to {where}: {exc}") from exc
        return connection

    def _release(self, key: _PoolKey, connection: _Connection) -> None:
        if self._closed or not connection.reusable():
            _close(connection)
            return
        connection.idle_since = connection.loop.time()
        self._idle.setdefault(key, []).append(connection)

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for connection in idle:
                _close(connection)
        self._idle.clear()


class _Request:
    """`HttpClient.request`'s block: a class, not an @asynccontextmanager, whose async
    generator cost more than the rest of a request's setup (the event loop's hooks keep a
    weak set of them, added to and removed from in Python)."""

    def __init__(self, client: HttpClient,
                 opening: Callable[[], Awaitable[tuple[_PoolKey, _Connection, Response]]]):
        self._client = client
        self._opening = opening  # HttpClient._open, called with the request's arguments
        self._exchange: tuple[_PoolKey, _Connection] | None = None

    async def __aenter__(self) -> Response:
        key, connection, response = await self._opening()
        self._exchange = key, connection
        return response

    async def __aexit__(self, *_: object) -> None:
        assert self._exchange is not None  # (entered)
        self._client._close_exchange(*self._exchange)


def head_fields(pieces: list[bytes]) -> dict[str, str]:
    """The header fields of the answer whose first bytes are `pieces` (its head whole in
    them, as the parser found it): names lowercase, a repeated one's values joined by ", "."""
    head = (pieces[0] if len(pieces) == 1 else b"".join(pieces)).partition(b"\r\n\r\n")[0]
    fields: dict[str, str] = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        key, text = name.strip().lower(), value.strip(" \t")
        fields[key] = f"{fields[key]}, {text}" if key in fields else text
    return fields


def _close(connection: _Connection) -> None:
    if connection.transport is not None:
        connection.transport.close()
