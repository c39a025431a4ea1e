"""Assets (Comfy API v2): records over blobs that comfyfleet keeps in its own storage (S3 or
local), never on a GPU server. A blob is stored once, under the blake3 hash of its bytes,
however often it is uploaded; each upload or mint makes a record of its own, owned by the API
key that made it. Job outputs are assets too, named `<job id>.<index>`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Protocol

import blake3
from sqlalchemy import BigInteger, Column, DateTime
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from comfyfleet.jobs.models import utcnow
from comfyfleet.storage import Storage

HASH_PREFIX = "blake3:"
CHUNK = 1 << 20


class Asset(SQLModel, table=True):
    __tablename__ = "assets"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    hash: str  # blake3 of the bytes, hex
    size_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    content_type: str
    file_path: str | None = None
    tags: list[str] | None = Field(default=None, sa_column=Column(JSONB, nullable=True))
    api_key_hash: str | None = None
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))

    @property
    def tagged_hash(self) -> str:
        return HASH_PREFIX + self.hash


class Upload(Protocol):
    """The uploaded file, spooled (Starlette's UploadFile): read twice, to hash, then to
    store."""

    async def read(self, size: int = -1) -> bytes: ...

    async def seek(self, offset: int) -> None: ...


class HashMismatch(ValueError):
    """The bytes received do not have the hash the client declared."""


def output_ref(asset_id: str) -> tuple[uuid.UUID, int] | None:
    """The job and output index of a job output's asset id, or None for any other id."""
    job_part, dot, index_part = asset_id.partition(".")
    if not dot or not index_part.isdigit():
        return None
    try:
        return uuid.UUID(job_part), int(index_part)
    except ValueError:
        return None


def parse_hash(tagged: str) -> str | None:
    """The hex digest of `blake3:<hex>`, or None when it is not one."""
    digest = tagged.removeprefix(HASH_PREFIX).lower()
    if not tagged.startswith(HASH_PREFIX) or len(digest) != 64 or not all(
            c in "0123456789abcdef" for c in digest):
        return None
    return digest


class AssetStore:
    def __init__(self, engine: AsyncEngine, storage: Storage, key_prefix: str) -> None:
        self._sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
        self._storage = storage
        self._key_prefix = key_prefix

    def key(self, asset: Asset) -> str:
        """Where the blob is: the same for every record over the same bytes."""
        return f"{self._key_prefix}assets/{asset.hash}"

    async def add(
        self, upload: Upload, *, content_type: str, file_path: str | None,
        tags: list[str] | None, expected_hash: str | None, api_key_hash: str | None,
    ) -> tuple[Asset, bool]:
        """A record over the uploaded bytes, and whether they were new (stored now) rather
        than deduplicated against a blob already kept. Raises HashMismatch (nothing kept)."""
        hasher, size = blake3.blake3(), 0
        await upload.seek(0)
        while chunk := await upload.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
        asset = Asset(hash=hasher.hexdigest(), size_bytes=size, content_type=content_type,
                      file_path=file_path, tags=tags or None, api_key_hash=api_key_hash)
        if expected_hash is not None and expected_hash.lower() != asset.tagged_hash:
            raise HashMismatch(f"the bytes received hash to {asset.tagged_hash}, not "
                               f"{expected_hash}")
        new = not await self._blob_kept(asset.hash)
        if new:
            # Stored before the record: a record always has its blob.
            await upload.seek(0)
            await self._storage.put_stream(self.key(asset), _chunks(upload), content_type)
        async with self._sessions.begin() as session:
            session.add(asset)
        return asset, new

    async def mint(
        self, digest: str, *, file_path: str | None, tags: list[str] | None,
        api_key_hash: str | None,
    ) -> tuple[Asset, bool] | None:
        """A record over a blob this key already has an asset of, and whether it is new (an
        identical record is returned as it is); None when the key has none (another key's
        bytes are not this caller's to use, nor is whether they exist)."""
        async with self._sessions.begin() as session:
            mine = (await session.exec(select(Asset).where(
                col(Asset.hash) == digest,
                col(Asset.api_key_hash).is_not_distinct_from(api_key_hash),
            ).order_by(col(Asset.created_at)))).all()
            if not mine:
                return None
            for asset in mine:
                if asset.file_path == file_path and asset.tags == (tags or None):
                    return asset, False
            minted = Asset(hash=digest, size_bytes=mine[0].size_bytes,
                           content_type=mine[0].content_type, file_path=file_path,
                           tags=tags or None, api_key_hash=api_key_hash)
            session.add(minted)
        return minted, True

    async def has(self, digest: str, api_key_hash: str | None) -> bool:
        async with self._sessions() as session:
            found = await session.exec(select(col(Asset.id)).where(
                col(Asset.hash) == digest,
                col(Asset.api_key_hash).is_not_distinct_from(api_key_hash)).limit(1))
            return found.first() is not None

    async def get(self, asset_id: uuid.UUID) -> Asset | None:
        async with self._sessions() as session:
            return await session.get(Asset, asset_id)

    async def _blob_kept(self, digest: str) -> bool:
        async with self._sessions() as session:
            found = await session.exec(
                select(col(Asset.id)).where(col(Asset.hash) == digest).limit(1))
            return found.first() is not None


async def _chunks(upload: Upload) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK):
        yield chunk
