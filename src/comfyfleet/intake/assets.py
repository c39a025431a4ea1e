"""Assets (Comfy API v2): records over blobs that comfyfleet keeps in its own storage (S3 or
local), never on a GPU server. A blob is stored once, under the blake3 hash of its bytes,
however often it is uploaded; each upload or mint makes a record of its own, owned by the API
key that made it. Job outputs are assets too, named `<job id>.<index>`. An upload may carry an
idempotency key: a retry under it, within IDEMPOTENCY_WINDOW, is the same asset.

Every change to the records over one blob takes the blob's advisory lock, so that the last
record's deletion (which deletes the blob) and a new record over the same bytes never pass
each other: a record always has its blob."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from enum import Enum
from typing import Protocol

import blake3
from sqlalchemy import BigInteger, Column, DateTime, cast, delete, func, literal, update
from sqlalchemy.dialects.postgresql import JSONB, JSONPATH
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from comfyfleet.db import check_storable
from comfyfleet.jobs.models import Job, JobSource, utcnow
from comfyfleet.jobs.repository import UNFINISHED
from comfyfleet.storage import Storage

HASH_PREFIX = "blake3:"
CHUNK = 1 << 20
# How long an upload's idempotency key stands for its asset (the v2 contract: 24 hours).
IDEMPOTENCY_WINDOW = timedelta(hours=24)
# A job's params name the assets it loads (intake.graph_jobs): {"<node>.<input>": {"asset"...}}.
_LOADS_ASSET = cast(literal("$.*.asset ? (@ == $id)"), JSONPATH)


class Asset(SQLModel, table=True):
    __tablename__ = "assets"

    id: uuid.UUID = Field(default_factory=uuid.uuid4, primary_key=True)
    hash: str  # blake3 of the bytes, hex
    size_bytes: int = Field(sa_column=Column(BigInteger, nullable=False))
    content_type: str
    file_path: str | None = None
    tags: list[str] | None = Field(default=None, sa_column=Column(JSONB, nullable=True))
    api_key_hash: str | None = None
    # The Idempotency-Key of the upload that made it; it stands for IDEMPOTENCY_WINDOW.
    idempotency_key: str | None = None
    created_at: datetime = Field(
        default_factory=utcnow, sa_column=Column(DateTime(timezone=True), nullable=False))

    @property
    def tagged_hash(self) -> str:
        return HASH_PREFIX + self.hash

    def same_upload(self, other: Asset) -> bool:
        """Whether `other` records the same bytes under the same name, type and tags."""
        return (self.hash, self.content_type, self.file_path, self.tags) == (
            other.hash, other.content_type, other.file_path, other.tags)


class Uploaded(Enum):
    """What an upload did."""

    STORED = "stored"  # new bytes, kept now
    DEDUPLICATED = "deduplicated"  # a new record over bytes kept already
    REPLAYED = "replayed"  # a retry under the idempotency key of an earlier upload


class Upload(Protocol):
    """The uploaded file, spooled (Starlette's UploadFile): read twice, to hash, then to
    store."""

    async def read(self, size: int = -1) -> bytes: ...

    async def seek(self, offset: int) -> None: ...


class HashMismatch(ValueError):
    """The bytes received do not have the hash the client declared."""


class UploadKeyReuse(ValueError):
    """The idempotency key was used, within its window, for a different upload."""


class AssetInUse(ValueError):
    """An unfinished job is to load the asset: its record stays until the job ends."""


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
        self._engine = engine
        self._storage = storage
        self._key_prefix = key_prefix

    @functools.cached_property
    def _sessions(self) -> async_sessionmaker[AsyncSession]:
        # Made as a read first needs it: a store is made for every v2 submit, and most graphs
        # reference no asset.
        return async_sessionmaker(self._engine, class_=AsyncSession, expire_on_commit=False)

    def key(self, asset: Asset) -> str:
        """Where the blob is: the same for every record over the same bytes."""
        return f"{self._key_prefix}assets/{asset.hash}"

    async def add(
        self, upload: Upload, *, content_type: str, file_path: str | None,
        tags: list[str] | None, expected_hash: str | None, api_key_hash: str | None,
        idempotency_key: str | None = None,
    ) -> tuple[Asset, Uploaded]:
        """A record over the uploaded bytes, and what the upload did. Raises HashMismatch
        and UploadKeyReuse (nothing kept for either), NotStorable for a field that cannot
        be stored (before any byte is)."""
        _check_storable(content_type=content_type, file_path=file_path, tags=tags)
        hasher, size = blake3.blake3(), 0
        await upload.seek(0)
        while chunk := await upload.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
        asset = Asset(hash=hasher.hexdigest(), size_bytes=size, content_type=content_type,
                      file_path=file_path, tags=tags or None, api_key_hash=api_key_hash,
                      idempotency_key=idempotency_key)
        if expected_hash is not None and expected_hash.lower() != asset.tagged_hash:
            raise HashMismatch(f"the bytes received hash to {asset.tagged_hash}, not "
                               f"{expected_hash}")
        earlier = await self._under_key(asset)
        if earlier is not None:
            return self._replay(earlier, asset), Uploaded.REPLAYED
        try:
            if await self._record(asset, only_over_kept_blob=True):
                return asset, Uploaded.DEDUPLICATED
            await upload.seek(0)
            await self._storage.put_stream(self.key(asset), _chunks(upload), content_type)
            await self._record(asset, only_over_kept_blob=False)
        except IntegrityError:
            # The same key's upload, concurrent with this one, was recorded first.
            earlier = await self._under_key(asset)
            if earlier is None:
                raise
            return self._replay(earlier, asset), Uploaded.REPLAYED
        return asset, Uploaded.STORED

    async def _under_key(self, asked: Asset) -> Asset | None:
        """The caller's asset recorded under the idempotency key of `asked`, within its
        window."""
        if asked.idempotency_key is None:
            return None
        async with self._sessions() as session:
            found = await session.exec(select(Asset).where(
                col(Asset.api_key_hash).is_not_distinct_from(asked.api_key_hash),
                col(Asset.idempotency_key) == asked.idempotency_key,
                col(Asset.created_at) > utcnow() - IDEMPOTENCY_WINDOW))
            return found.first()

    @staticmethod
    def _replay(earlier: Asset, asked: Asset) -> Asset:
        if not earlier.same_upload(asked):
            raise UploadKeyReuse(f"Idempotency-Key {asked.idempotency_key!r} was used before "
                                 f"for a different upload")
        return earlier

    async def _record(self, asset: Asset, *, only_over_kept_blob: bool) -> bool:
        """Insert the record (with `only_over_kept_blob`, only if the blob is kept already);
        whether it was inserted. A key past its window is taken from the asset it named."""
        async with self._sessions.begin() as session:
            await _lock_blob(session, asset.hash)
            if only_over_kept_blob and not await _blob_kept(session, asset.hash):
                return False
            if asset.idempotency_key is not None:
                await session.exec(update(Asset).where(
                    col(Asset.api_key_hash).is_not_distinct_from(asset.api_key_hash),
                    col(Asset.idempotency_key) == asset.idempotency_key,
                    col(Asset.created_at) <= utcnow() - IDEMPOTENCY_WINDOW,
                ).values(idempotency_key=None))
            session.add(asset)
        return True

    async def delete(self, asset: Asset) -> None:
        """Delete the record, and the blob with the last record over it. Raises AssetInUse
        while an unfinished job is to load it, and the storage's StorageError (the record
        then stays)."""
        async with self._sessions.begin() as session:
            # Counted among the unfinished jobs, read by an index of theirs
            # (jobs_unfinished_by_key_status), never among every job ever stored: the states
            # named, not the terminal ones excluded, so that the index's predicate holds, and
            # no LIMIT, with which a sequential scan looked cheaper (it stops at the first job
            # found, and an asset no job loads is the common case: 0.3-1.2 s at 500,000 jobs).
            # Only a v2 graph's params name assets.
            loading = (await session.exec(select(func.count()).where(
                UNFINISHED, col(Job.source) == JobSource.GRAPH,
                func.jsonb_path_exists(col(Job.params), _LOADS_ASSET,
                                       func.jsonb_build_object("id", str(asset.id)))))).one()
            if loading:
                raise AssetInUse(f"asset {asset.id} is an input of a job that has not ended")
            await _lock_blob(session, asset.hash)
            await session.exec(delete(Asset).where(
                col(Asset.id) == asset.id))
            if not await _blob_kept(session, asset.hash):
                await self._storage.delete(self.key(asset))

    async def mint(
        self, digest: str, *, file_path: str | None, tags: list[str] | None,
        api_key_hash: str | None,
    ) -> tuple[Asset, bool] | None:
        """A record over a blob this key already has an asset of, and whether it is new (an
        identical record is returned as it is); None when the key has none (another key's
        bytes are not this caller's to use, nor is whether they exist). NotStorable for a
        field that cannot be stored."""
        _check_storable(file_path=file_path, tags=tags)
        async with self._sessions.begin() as session:
            await _lock_blob(session, digest)
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

def _check_storable(**fields: str | list[str] | None) -> None:
    """NotStorable, naming the field, for a client's text PostgreSQL would refuse."""
    check_storable(fields, Asset.__table__)  # type: ignore[attr-defined]


async def _lock_blob(session: AsyncSession, digest: str) -> None:
    await session.exec(select(func.pg_advisory_xact_lock(func.hashtext(HASH_PREFIX + digest))))


async def _blob_kept(session: AsyncSession, digest: str) -> bool:
    found = await session.exec(select(col(Asset.id)).where(col(Asset.hash) == digest).limit(1))
    return found.first() is not None


async def _chunks(upload: Upload) -> AsyncIterator[bytes]:
    while chunk := await upload.read(CHUNK):
        yield chunk
