"""Outputs in S3 (or MinIO, R2, ...) through aiobotocore.

A stream is cut into parts of PART_SIZE: a short one becomes one PUT, a longer one a
multipart upload that holds one part in memory at a time and is aborted on failure, so
memory stays flat whatever the size and no half-written object is left behind.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

from aiobotocore.session import get_session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from comfyfleet.settings import Settings
from comfyfleet.storage.base import StorageError

log = logging.getLogger(__name__)

PART_SIZE = 8 * 1024 * 1024  # S3's minimum part size is 5 MiB
PART_CONCURRENCY = 4


class S3Storage:
    def __init__(self, client: Any, bucket: str, url_ttl: int, exit_stack: AsyncExitStack):
        self._client = client
        self.bucket = bucket
        self.url_ttl = url_ttl
        self._exit_stack = exit_stack

    @classmethod
    async def open(cls, settings: Settings) -> S3Storage:
        if not settings.s3_bucket:
            raise StorageError("S3_BUCKET is not set")
        stack = AsyncExitStack()
        client = await stack.enter_async_context(
            get_session().create_client(
                "s3",
                region_name=settings.s3_region_name,
                endpoint_url=settings.s3_endpoint,
                aws_access_key_id=settings.aws_access_key_id,
                aws_secret_access_key=settings.aws_secret_access_key,
                config=Config(retries={"max_attempts": 3, "mode": "standard"}),
            )
        )
        return cls(client, settings.s3_bucket, settings.s3_url_ttl, stack)

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes], content_type: str) -> int:
        try:
            return await self._upload(key, chunks, content_type)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"S3 upload of {key}: {exc}") from exc

    async def _upload(self, key: str, chunks: AsyncIterator[bytes], content_type: str) -> int:
        parts = _parts(chunks)
        first = await anext(parts, b"")
        second = await anext(parts, None) if len(first) == PART_SIZE else None
        if second is None:
            await self._client.put_object(
                Bucket=self.bucket, Key=key, Body=first, ContentType=content_type
            )
            return len(first)
        created = await self._client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType=content_type
        )
        upload_id: str = created["UploadId"]
        etags: dict[int, str] = {}
        size = 0
        # Each part in flight holds PART_SIZE bytes: this bounds memory per upload.
        slots = asyncio.Semaphore(PART_CONCURRENCY)
        uploads: list[asyncio.Task[None]] = []
        try:
            async for number, body in _numbered(first, second, parts):
                await slots.acquire()
                failed = next((t for t in uploads if t.done() and t.exception()), None)
                if failed is not None:
                    await failed  # raises its error: stop reading the source early
                size += len(body)
                uploads.append(asyncio.create_task(
                    self._put_part(key, upload_id, number, body, etags, slots)))
            await asyncio.gather(*uploads)
            await self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n]}
                                           for n in sorted(etags)]},
            )
            return size
        except BaseException:
            for task in uploads:
                task.cancel()
            await asyncio.gather(*uploads, return_exceptions=True)
            await self._abort(key, upload_id)
            raise

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id
            )
        except (BotoCoreError, ClientError) as exc:
            # The upload's own error matters more; a bucket lifecycle rule reaps the leftover.
            log.warning("could not abort multipart upload of %s: %s", key, exc)

    async def _put_part(
        self, key: str, upload_id: str, number: int, body: bytes, etags: dict[int, str],
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            result = await self._client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
            )
            etags[number] = result["ETag"]
        finally:
            slots.release()

    async def url(self, key: str) -> str | None:
        url: str = await self._client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.url_ttl
        )
        return url

    async def check(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"S3 bucket {self.bucket}: {exc}") from exc

    async def close(self) -> None:
        await self._exit_stack.aclose()


async def _parts(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The stream cut into PART_SIZE pieces (the last one shorter)."""
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        while len(buffer) >= PART_SIZE:
            yield bytes(buffer[:PART_SIZE])
            del buffer[:PART_SIZE]
    if buffer:
        yield bytes(buffer)


async def _numbered(
    first: bytes, second: bytes, rest: AsyncIterator[bytes]
) -> AsyncIterator[tuple[int, bytes]]:
    yield 1, first
    yield 2, second
    number = 2
    async for body in rest:
        number += 1
        yield number, body
