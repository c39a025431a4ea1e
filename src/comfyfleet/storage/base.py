"""Where job outputs go: the interface every storage backend keeps."""

from __future__ import annotations

import mimetypes
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_SAFE_EXTENSION = re.compile(r"^\.[a-z0-9]{1,10}$")


class StorageError(Exception):
    """The store could not take or serve a file (it may be down for a while: retry later)."""


class NotInStorage(StorageError):
    """The object is not in the store (deleted, or never kept): trying again will not bring
    it back, unlike the outages StorageError otherwise stands for."""


@dataclass(frozen=True)
class SignedUrl:
    """A URL a client can fetch an object from, and the moment it stops working (or earlier:
    never later)."""

    url: str
    expires_at: datetime


class Storage(Protocol):
    async def put_stream(self, key: str, chunks: AsyncIterator[bytes], content_type: str) -> int:
        """Store the stream under `key`, replacing any earlier object; returns its size."""
        ...

    async def read(self, key: str) -> bytes:
        """The whole object (for inputs, which are bounded by MAX_UPLOAD_BYTES); NotInStorage
        when there is none under `key`."""
        ...

    async def delete(self, key: str) -> None:
        """Remove the object; one that is not there is no error."""
        ...

    async def url(self, key: str) -> str | None:
        """A URL a client can fetch the object from, or None when the API must serve it."""
        ...

    async def signed_url(self, key: str) -> SignedUrl | None:
        """`url`, with when it expires."""
        ...

    async def check(self) -> None:
        """Raise StorageError when the store is not reachable."""
        ...

    async def close(self) -> None: ...


def output_key(prefix: str, job_id: str, node_id: str, index: int, filename: str) -> str:
    """`{prefix}{job_id}/{node_id}_{index}{ext}`: deterministic, so a retry overwrites.

    Names from backends are not trusted: only a short lowercase extension survives.
    """
    extension = "." + filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if not _SAFE_EXTENSION.match(extension):
        extension = ""
    return f"{prefix}{job_id}/{_UNSAFE.sub('_', node_id)}_{index}{extension}"


# What ComfyUI's output nodes write, fixed here: the system's mime table varies by machine.
_MEDIA_TYPES = {
    ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
    ".gif": "image/gif", ".mp4": "video/mp4", ".webm": "video/webm", ".mov": "video/quicktime",
    ".flac": "audio/flac", ".wav": "audio/wav", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
    ".opus": "audio/opus", ".glb": "model/gltf-binary", ".gltf": "model/gltf+json",
    ".obj": "model/obj", ".latent": "application/octet-stream",
}


def content_type_for(filename: str) -> str:
    extension = "." + filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if extension in _MEDIA_TYPES:
        return _MEDIA_TYPES[extension]
    guessed, _ = mimetypes.guess_type(filename)
    return guessed or "application/octet-stream"
