"""Outputs in a local directory (the default without S3): written to a temp file, then renamed,
and handed out through URLs that carry an expiry and an HMAC signature (like presigned S3 URLs),
served by the service's `/files/` route."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlencode

from comfyfleet.storage.base import NotInStorage, SignedUrl, StorageError

PART_PREFIX = ".part-"  # then the writing process's pid, so a dead one's leftovers are known


class LocalStorage:
    def __init__(
        self,
        root: Path,
        *,
        signing_key: bytes | None = None,
        base_url: Callable[[], str] | None = None,
        url_ttl: int = 3600,
    ) -> None:
        self.root = root.resolve()
        self._signing_key = signing_key
        self._base_url = base_url
        self._url_ttl = url_ttl

    def _signature(self, key: str, expires: int) -> str:
        assert self._signing_key is not None
        message = f"{key}\n{expires}".encode()
        return hmac.new(self._signing_key, message, hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: int, signature: str) -> bool:
        """Whether a `/files/` request carries a valid, unexpired signature for `key`."""
        if self._signing_key is None or expires < time.time():
            return False
        # As bytes: compare_digest refuses str with non-ASCII characters, which anyone can send.
        return hmac.compare_digest(self._signature(key, expires).encode(), signature.encode())

    def path_of(self, key: str) -> Path:
        """Where `key` lives, refused if it names a place outside the root. Normalised by
        its text, with no system call (it runs on the event loop): only a key's `..` can
        leave the root; links inside the root are the operator's."""
        path = Path(os.path.normpath(self.root / key))
        if not path.is_relative_to(self.root):
            raise StorageError(f"key {key!r} leaves the storage directory")
        return path

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes], content_type: str) -> int:
        """Written off the event loop in one thread's turn per chunk (`_Part.write`), the
        part file opened with the first and renamed into place with the last, which one
        chunk read ahead tells: a one-chunk output (every image) in one turn, where opening,
        writing and renaming took a turn each. A turn is most of a small file's time on a
        busy machine."""
        part = _Part(self.path_of(key))
        size = 0
        try:
            chunk = await anext(chunks, b"")
            while True:
                following = await anext(chunks, None)
                await asyncio.to_thread(part.write, chunk, last=following is None)
                size += len(chunk)
                if following is None:
                    return size
                chunk = following
        except BaseException:
            await asyncio.to_thread(part.discard)
            raise

    async def read(self, key: str) -> bytes:
        try:
            return await asyncio.to_thread(self.path_of(key).read_bytes)
        except FileNotFoundError as exc:
            raise NotInStorage(f"reading {key}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"reading {key}: {exc}") from exc

    async def delete(self, key: str) -> None:
        try:
            await asyncio.to_thread(_remove_with_empty_parents, self.path_of(key), self.root)
        except OSError as exc:
            raise StorageError(f"deleting {key}: {exc}") from exc

    async def url(self, key: str) -> str | None:
        signed = await self.signed_url(key)
        return signed.url if signed is not None else None

    async def signed_url(self, key: str) -> SignedUrl | None:
        if self._signing_key is None or self._base_url is None:
            return None
        expires = int(time.time()) + self._url_ttl
        query = urlencode({"expires": expires, "signature": self._signature(key, expires)})
        return SignedUrl(f"{self._base_url()}/files/{quote(key)}?{query}",
                         datetime.fromtimestamp(expires, UTC))

    async def check(self) -> None:
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        if not await asyncio.to_thread(os.access, self.root, os.W_OK):
            raise StorageError(f"{self.root} is not writable")

    async def close(self) -> None:
        return None


def _prepare_directory(directory: Path) -> None:
    """Create it, and remove the part files of processes that died writing into it (a
    SIGKILLed collector cannot clean up; its job is collected again under the same key)."""
    directory.mkdir(parents=True, exist_ok=True)
    for part in directory.glob(f"{PART_PREFIX}*"):
        pid = part.name.removeprefix(PART_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            _remove_quietly(str(part))


class _Part:
    """A file being stored at `path`: written into a part file of this process beside it,
    renamed into place once whole."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None
        self._name = ""

    def write(self, chunk: bytes, *, last: bool) -> None:
        """Write the next chunk (the first opens the part file, its directory prepared; the
        last renames it into place). Blocking."""
        if self._file is None:
            _prepare_directory(self.path.parent)
            fd, self._name = tempfile.mkstemp(dir=self.path.parent,
                                              prefix=f"{PART_PREFIX}{os.getpid()}-")
            self._file = os.fdopen(fd, "wb")
        self._file.write(chunk)
        if last:
            self._file.close()
            os.replace(self._name, self.path)

    def discard(self) -> None:
        """Remove the part file, if there is one. Blocking."""
        if self._file is not None:
            self._file.close()
            _remove_quietly(self._name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


def _remove_with_empty_parents(path: Path, root: Path) -> None:
    """Remove the file, then the directories it leaves empty (a job's `inputs/`, the job's
    own), up to `root`: nothing of a deleted key stays behind."""
    _remove_quietly(str(path))
    for directory in path.parents:
        if directory == root or not directory.is_relative_to(root):
            return
        try:
            directory.rmdir()
        except OSError:  # not empty (or gone): what is above it is not empty either
            return


def _remove_quietly(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)
