"""PNG encoding for saved images and previews, memoised by pixel content.

Pillow's PNG encoder is the simulator's most expensive step for a small image (~175 us for
64x64: adaptive row filters and zlib set-up), and zero-duration prompts mostly save images
seen before (EmptyImage with the same inputs, the same input file inverted). So the pixels
are encoded once, and each file gets its own text chunks spliced in after IHDR, where Pillow
writes them: the result is byte for byte what Image.save(..., pnginfo=...) gives.

The image is written without its `info` (no ICC profile, no transparency), as ComfyUI's
SaveImage writes an image made from a tensor.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterable
from io import BytesIO

from PIL import Image
from PIL.PngImagePlugin import PngInfo, putchunk

# The encodings kept, by total size: a few hundred distinct small images, or a few large ones.
CACHE_BYTES = 64 * 1024 * 1024

# Signature (8 bytes) and IHDR (length, type, 13 bytes of data, CRC): text chunks follow.
_AFTER_IHDR = 8 + 4 + 4 + 13 + 4


class _Cache:
    """Least recently used encodings, bounded by their total size; usable from any thread."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._entries: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[object, ...]) -> bytes | None:
        with self._lock:
            png = self._entries.get(key)
            if png is not None:
                self._entries.move_to_end(key)
            return png

    def put(self, key: tuple[object, ...], png: bytes) -> None:
        with self._lock:
            if key in self._entries or len(png) > self._max_bytes:
                return
            self._entries[key] = png
            self._bytes += len(png)
            while self._bytes > self._max_bytes:
                self._bytes -= len(self._entries.popitem(last=False)[1])


_cache = _Cache(CACHE_BYTES)


def encode(image: Image.Image, compress_level: int) -> bytes:
    """The image as a PNG without text chunks; blocking, and proportional to the pixels on a
    cache miss (hashing them costs about a tenth of encoding them)."""
    pixels = hashlib.sha256(image.tobytes())
    if image.palette is not None:
        pixels.update(image.palette.tobytes())
    key = (image.mode, image.size, compress_level, pixels.digest())
    png = _cache.get(key)
    if png is None:
        bare = image.copy()
        bare.info.clear()
        buffer = BytesIO()
        bare.save(buffer, format="PNG", compress_level=compress_level)
        png = buffer.getvalue()
        _cache.put(key, png)
    return png


def text_chunks(text: Iterable[tuple[str, str]]) -> bytes:
    """tEXt (or iTXt) chunks for these key-value pairs, as Pillow's PngInfo.add_text makes
    them (and raising as it does, for a key that is not latin-1)."""
    info = PngInfo()
    for key, value in text:
        info.add_text(key, value)
    out = BytesIO()
    for chunk_type, data, *_ in info.chunks:
        putchunk(out, chunk_type, data)
    return out.getvalue()


def with_chunks(png: bytes, chunks: bytes) -> bytes:
    """`png` (from encode) with `chunks` (from text_chunks) where Pillow writes text."""
    return png[:_AFTER_IHDR] + chunks + png[_AFTER_IHDR:]
