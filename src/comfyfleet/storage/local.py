"""Outputs in a local directory (the default without S3): written to a temp file, then renamed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from comfyfleet.storage.base import StorageError


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path_of(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"key {key!r} leaves the storage directory")
        return path

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes], content_type: str) -> int:
        path = self.path_of(key)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        fd, temp_name = await asyncio.to_thread(tempfile.mkstemp, dir=path.parent, prefix=".part-")
        size = 0
        try:
            with os.fdopen(fd, "wb") as temp:
                async for chunk in chunks:
                    await asyncio.to_thread(temp.write, chunk)
                    size += len(chunk)
            await asyncio.to_thread(os.replace, temp_name, path)
        except BaseException:
            await asyncio.to_thread(_remove_quietly, temp_name)
            raise
        return size

    async def url(self, key: str) -> str | None:
        return None

    async def check(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        if not await asyncio.to_thread(os.access, self.root, os.W_OK):
            raise StorageError(f"{self.root} is not writable")

    async def close(self) -> None:
        return None


def _remove_quietly(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)
