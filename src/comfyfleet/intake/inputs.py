"""Image parameters: what a client sends (an http(s) URL, base64, a data URI, or an upload)
turned into checked bytes, kept in storage until the dispatcher uploads them to the backend
that runs the job (DESIGN §3).

URLs are fetched with a size and time limit, through the SSRF guard of the webhooks, and no
redirects are followed; whatever the source, the bytes must be an image format ComfyUI reads,
of at most MAX_IMAGE_PIXELS pixels by its header (a small file can unpack to gigabytes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from PIL import Image

from comfyfleet.egress import UrlNotAllowed, check_url, guarded_connector
from comfyfleet.storage import Storage, StorageError

log = logging.getLogger(__name__)

BACKEND_SUBFOLDER = "comfyfleet"  # in the backend's input directory
# The formats ComfyUI's LoadImage opens (as Pillow names them), and how we store each.
_FORMATS = {
    "PNG": ("image/png", ".png"),
    "JPEG": ("image/jpeg", ".jpg"),
    "WEBP": ("image/webp", ".webp"),
    "GIF": ("image/gif", ".gif"),
    "BMP": ("image/bmp", ".bmp"),
}
_DATA_URI = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+)?(;[\w=.+-]+)*;base64,(?P<data>.*)$",
                       re.DOTALL)


class InputError(ValueError):
    """An image parameter that cannot be used; the message says why."""


class InputTooLarge(InputError):
    """An image over MAX_UPLOAD_BYTES, however it came."""


@dataclass(frozen=True)
class ImageInput:
    data: bytes
    content_type: str
    extension: str


def image(data: bytes, *, max_pixels: int) -> ImageInput:
    """The image `data` holds, by its header as Pillow reads it (nothing is decoded):
    InputError unless it is one of _FORMATS with at most `max_pixels` pixels."""
    try:
        with warnings.catch_warnings():
            # Pillow warns of large images, and refuses huge ones itself (below).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=list(_FORMATS)) as picture:
                format_, (width, height) = picture.format, picture.size
    except Image.DecompressionBombError as exc:
        raise InputError(f"too many pixels: {exc}") from exc
    except Exception as exc:  # Pillow's parsers raise many kinds on a malformed header
        raise InputError("not an image ComfyUI can read (PNG, JPEG, WEBP, GIF or BMP)"
                         ) from exc
    if width * height > max_pixels:
        raise InputError(f"{width}x{height} is more than {max_pixels} pixels "
                         f"(MAX_IMAGE_PIXELS)")
    content_type, extension = _FORMATS[str(format_)]
    return ImageInput(data, content_type, extension)


async def resolve(
    value: str, *, max_bytes: int, max_pixels: int, allow_private: bool, fetch_seconds: float
) -> ImageInput:
    """The image a parameter value names: fetched (URL, within `fetch_seconds`) or decoded
    (base64 / data URI)."""
    if value.startswith(("http://", "https://")):
        data = await _fetch(value, max_bytes=max_bytes, allow_private=allow_private,
                            fetch_seconds=fetch_seconds)
        return image(data, max_pixels=max_pixels)
    match = _DATA_URI.match(value)
    encoded = match.group("data") if match else value
    if len(encoded) > max_bytes * 4 // 3 + 4:
        raise InputTooLarge(f"larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InputError("expected an http(s) URL, base64 or a data: URI") from exc
    return image(data, max_pixels=max_pixels)


async def _fetch(url: str, *, max_bytes: int, allow_private: bool, fetch_seconds: float
                 ) -> bytes:
    """The whole body of a 200 answer to GET `url`, however it is framed (Content-Length or
    chunked); InputTooLarge as soon as it passes `max_bytes`, InputError when it cannot be
    had whole within `fetch_seconds`."""
    try:
        await check_url(url, allow_private=allow_private)
    except UrlNotAllowed as exc:
        raise InputError(str(exc)) from exc
    too_large = InputTooLarge(f"{url} is larger than {max_bytes} bytes")
    body = bytearray()
    try:
        async with aiohttp.ClientSession(
            connector=guarded_connector(allow_private=allow_private),
            timeout=aiohttp.ClientTimeout(total=fetch_seconds),
        ) as http, http.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise InputError(f"fetching {url} answered HTTP {response.status}")
            declared = response.content_length
            if declared is not None and declared > max_bytes:
                raise too_large
            async for chunk in response.content.iter_any():
                body += chunk
                if len(body) > max_bytes:
                    raise too_large
    except TimeoutError as exc:
        raise InputError(f"fetching {url} took longer than {fetch_seconds:g} s") from exc
    except (aiohttp.ClientError, OSError) as exc:
        # A body cut short (fewer bytes than declared, a broken chunk) is an error too.
        raise InputError(f"could not fetch {url}: {exc!r}") from exc
    return bytes(body)


def backend_name(job_id: str, param: str, extension: str) -> str:
    """The file's name in the backend's input folder: unique per job, so uploads never clash
    and ComfyUI's rename-on-conflict never changes it."""
    return f"{job_id}_{param}{extension}"


def describe(job_id: str, param: str, picture: ImageInput) -> dict[str, Any]:
    """What a job records for this image parameter: its file on the backend and its content
    (by digest: a repeat of the request, or a reuse of the outputs, compares the bytes)."""
    return {"name": backend_name(job_id, param, picture.extension),
            "subfolder": BACKEND_SUBFOLDER, "content_type": picture.content_type,
            "size": len(picture.data), "sha256": hashlib.sha256(picture.data).hexdigest()}


def in_prompt(record: dict[str, Any]) -> str:
    """The value LoadImage gets: the file's path in the backend's input folder."""
    return f"{record['subfolder']}/{record['name']}"


def by_content(params: dict[str, Any]) -> dict[str, Any]:
    """Parameters with each image record replaced by the digest of its bytes."""
    return {name: value["sha256"] if isinstance(value, dict) and "sha256" in value else value
            for name, value in params.items()}


async def store(
    storage: Storage, key_prefix: str, job_id: str, param: str, picture: ImageInput
) -> dict[str, Any]:
    """Keep the bytes until dispatch; returns the parameter's record with where they are."""
    key = f"{key_prefix}{job_id}/inputs/{param}{picture.extension}"

    async def chunks() -> Any:
        yield picture.data

    await storage.put_stream(key, chunks(), picture.content_type)
    return {"input": key, **describe(job_id, param, picture)}


async def discard(storage: Storage, records: Iterable[dict[str, Any]]) -> None:
    """Delete the stored ones among these inputs, which no job will use (the submit made no
    job); best effort: a failure is logged, and the submit's own answer stands."""
    for record in records:
        if "input" not in record:
            continue
        try:
            await storage.delete(record["input"])
        except StorageError as exc:
            log.warning("could not delete the unused input %s: %s", record["input"], exc)
