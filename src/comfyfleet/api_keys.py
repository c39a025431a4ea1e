"""API keys kept in PostgreSQL (`comfyfleet keys create|list|revoke`), as SHA-256 digests.

Every process reads them, with a short cache: a key created or revoked anywhere counts
everywhere within KEY_CACHE_SECONDS.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from datetime import datetime

from sqlalchemy import Column, DateTime, String, func, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from comfyfleet.jobs.models import utcnow

KEY_CACHE_SECONDS = 2.0
# Digests remembered at once; wrong keys are remembered too, so this bounds what they cost.
KEY_CACHE_SIZE = 10_000
KEY_PREFIX = "cf_"


def key_hash(key: str) -> str:
    """What is stored of a key. Keys are long random strings, so a plain digest is enough."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"

    name: str = Field(primary_key=True, max_length=100)
    key_hash: str = Field(sa_column=Column(String(64), nullable=False, unique=True))
    admin: bool = False
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))
    revoked_at: datetime | None = Field(
        default=None, sa_column=Column(DateTime(timezone=True), nullable=True))


class KeyExists(Exception):
    """A key with this name exists already (revoked or not)."""


_table = ApiKey.__table__  # type: ignore[attr-defined]


class KeyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
        # digest -> (good until, admin flag; None: not a live key)
        self._cache: dict[str, tuple[float, bool | None]] = {}
        self._any: tuple[float, bool] | None = None

    async def create(self, name: str, *, admin: bool) -> str:
        """A new key under `name`; the key itself is returned once and kept nowhere."""
        key = new_key()
        async with self._sessions.begin() as session:
            created = await session.exec(
                insert(_table)
                .values(name=name, key_hash=key_hash(key), admin=admin, created_at=utcnow())
                .on_conflict_do_nothing(index_elements=["name"])
                .returning(_table.c.name)
            )
            if created.first() is None:
                raise KeyExists(name)
        return key

    async def all(self) -> list[ApiKey]:
        async with self._sessions() as session:
            return list((await session.exec(select(ApiKey).order_by(col(ApiKey.name)))).all())

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

    async def lookup(self, digest: str) -> bool | None:
        """Whether the live key with this digest is an admin key; None: no such live key."""
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        async with self._sessions() as session:
            found = await session.exec(select(col(ApiKey.admin)).where(
                col(ApiKey.key_hash) == digest, col(ApiKey.revoked_at).is_(None)))
            admin = found.first()
        if len(self._cache) >= KEY_CACHE_SIZE:
            self._cache.clear()
        self._cache[digest] = (now + KEY_CACHE_SECONDS, admin)
        return admin

    async def any_live(self) -> bool:
        """Whether any key is live, so the API needs keys even without API_KEYS."""
        now = time.monotonic()
        if self._any is not None and self._any[0] > now:
            return self._any[1]
        async with self._sessions() as session:
            found = await session.exec(
                select(col(ApiKey.name)).where(col(ApiKey.revoked_at).is_(None)).limit(1))
            live = found.first() is not None
        self._any = (now + KEY_CACHE_SECONDS, live)
        return live
