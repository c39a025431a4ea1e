"""API keys kept in PostgreSQL (`comfyfleet keys create|update|list|revoke`), as SHA-256
digests, each with its tenant's weight and limits, and optionally a default callback URL (the
webhook of its jobs that name none: every Comfy API v2 job).

Every process reads them (`sql/keys.sql`, on asyncpg), with a short cache: a key created or
revoked anywhere counts everywhere within KEY_CACHE_SECONDS. While the database does not
answer, the last answer read stands (the keys cannot change meanwhile); what was never read
cannot be answered.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, TypeVar, cast

from sqlalchemy import Column, DateTime, Integer, String, func, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from comfyfleet import sql
from comfyfleet.db import driver_connection, unavailable
from comfyfleet.jobs.models import utcnow

KEY_CACHE_SECONDS = 2.0
# Digests remembered at once; wrong keys are remembered too, so this bounds what they cost.
KEY_CACHE_SIZE = 10_000
KEY_PREFIX = "cf_"
_ANY = "any"  # the name of the read of whether any key is live (never a digest)

T = TypeVar("T")
_SQL = sql.queries("keys")


def key_hash(key: str) -> str:
    """What is stored of a key. Keys are long random strings, so a plain digest is enough."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class KeyLimits:
    """A tenant's share and limits. None: no limit of its own (where it comes from the
    database: the environment's default, see `or_defaults`)."""

    weight: int = 1  # its share of the GPUs against other keys with queued work
    max_concurrent: int | None = None  # its jobs dispatched, running or uploading at once
    max_queued: int | None = None  # its jobs waiting in the backlog

    def or_defaults(self, defaults: KeyLimits) -> KeyLimits:
        """These limits, with `defaults`' where these have none."""
        return replace(
            self,
            max_concurrent=defaults.max_concurrent if self.max_concurrent is None
            else self.max_concurrent,
            max_queued=defaults.max_queued if self.max_queued is None else self.max_queued,
        )


@dataclass(frozen=True)
class LiveKey:
    """What a live key in the database grants."""

    admin: bool
    limits: KeyLimits
    callback_url: str | None = None  # of its jobs that name none


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    name: str = Field(primary_key=True, max_length=100)
    key_hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    admin: bool = False
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))
    revoked_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True))
    weight: int = Field(default=1, sa_column=Column(Integer, nullable=False))
    # NULL: the environment's default (MAX_CONCURRENT_PER_KEY, MAX_QUEUED_PER_KEY).
    max_concurrent: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    max_queued: int | None = Field(default=None, sa_column=Column(Integer, nullable=True))
    # The webhook of its jobs that name none (the v2 contract has no callback field yet).
    callback_url: str | None = Field(default=None, sa_column=Column(String(2000), nullable=True))

    @property
    def limits(self) -> KeyLimits:
        return KeyLimits(self.weight, self.max_concurrent, self.max_queued)


class KeyExists(Exception):
    """A key with this name exists already (revoked or not)."""


# What `KeyStore.update` may change; a change to None puts the environment's default back
# (for the callback URL: none).
LIMIT_FIELDS = ("weight", "max_concurrent", "max_queued")
FIELDS = (*LIMIT_FIELDS, "callback_url")


_table = ApiKey.__table__  # type: ignore[attr-defined]


class KeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
        # digest -> (good until, what it grants; None: not a live key)
        self._cache: dict[str, tuple[float, LiveKey | None]] = {}
        self._any: tuple[float, bool] | None = None
        self._reading: dict[str, asyncio.Future[Any]] = {}  # the reads under way, by name

    async def create(self, name: str, *, admin: bool, limits: KeyLimits = KeyLimits(),
                     callback_url: str | None = None) -> str:
        """A new key under `name`; the key itself is returned once and kept nowhere."""
        key = new_key()
        async with self._sessions.begin() as session:
            created = await session.exec(
                insert(_table)
                .values(name=name, key_hash=key_hash(key), admin=admin, created_at=utcnow(),
                        weight=limits.weight, max_concurrent=limits.max_concurrent,
                        max_queued=limits.max_queued, callback_url=callback_url)
                .on_conflict_do_nothing(index_elements=["name"])
                .returning(_table.c.name)
            )
            if created.first() is None:
                raise KeyExists(name)
        return key

    async def all(self) -> list[ApiKey]:
        async with self._sessions() as session:
            return list((await session.exec(select(ApiKey).order_by(col(ApiKey.name)))).all())

    async def update(self, name: str, changes: dict[str, Any]) -> ApiKey | None:
        """Change the weight, limits or callback URL (FIELDS) of the live key `name`; the key
        as it is now, or None when there is no live key of that name. Every process sees the
        change within KEY_CACHE_SECONDS."""
        assert changes and changes.keys() <= set(FIELDS), changes
        async with self._sessions.begin() as session:
            result = await session.exec(
                update(ApiKey)
                .where(col(ApiKey.name) == name, col(ApiKey.revoked_at).is_(None))
                .values(**changes)
                .returning(*_table.c)
            )
            row = result.first()
        return ApiKey(**row._mapping) if row is not None else None

    async def revoke(self, name: str) -> bool:
        """False when there is no live key of that name."""
        async with self._sessions.begin() as session:
            result = await session.exec(
                update(ApiKey)
                .where(col(ApiKey.name) == name, col(ApiKey.revoked_at).is_(None))
                .values(revoked_at=func.now())
                .returning(col(ApiKey.name))
            )
            return result.first() is not None

    async def lookup(self, digest: str) -> LiveKey | None:
        """What the live key with this digest grants; None: no such live key."""
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        return await self._once(digest, self._read_key, digest)

    async def any_live(self) -> bool:
        """Whether any key is live, so the API needs keys even without API_KEYS."""
        if self._any is not None and self._any[0] > time.monotonic():
            return self._any[1]
        return await self._once(_ANY, self._read_any)

    async def _once(self, name: str, read: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`read(*args)`, or the read of `name` under way: the requests that find its cache
        run out together (a client with many in flight) make one query, not one each."""
        task = self._reading.get(name)
        if task is None:
            task = self._reading[name] = asyncio.ensure_future(read(*args))
            task.add_done_callback(functools.partial(self._read_done, name))
        # Shielded: a request given up (its client gone) leaves the read to the others.
        return cast(T, await asyncio.shield(task))

    def _read_done(self, name: str, _: asyncio.Future[Any]) -> None:
        del self._reading[name]

    async def _read_key(self, digest: str) -> LiveKey | None:
        now = time.monotonic()
        cached = self._cache.get(digest)
        try:
            async with driver_connection(self._engine) as connection:
                found = await connection.fetchrow(_SQL["live_key"], digest)
        except Exception as exc:
            if cached is None or not unavailable(exc):
                raise
            return cached[1]  # the database is away: as it was when last read
        live = (LiveKey(found["admin"], KeyLimits(found["weight"], found["max_concurrent"],
                                                  found["max_queued"]), found["callback_url"])
                if found is not None else None)
        if len(self._cache) >= KEY_CACHE_SIZE:
            self._cache.clear()
        self._cache[digest] = (now + KEY_CACHE_SECONDS, live)
        return live

    async def _read_any(self) -> bool:
        now = time.monotonic()
        try:
            async with driver_connection(self._engine) as connection:
                live = bool(await connection.fetchval(_SQL["any_live"]))
        except Exception as exc:
            if self._any is None or not unavailable(exc):
                raise
            return self._any[1]  # the database is away: as it was when last read
        self._any = (now + KEY_CACHE_SECONDS, live)
        return live
