"""Websocket frames as ComfyUI writes them (protocol doc 5.4).

Text frames are `{"type", "data"}` JSON with Python's default separators. Binary frames start
with a 4-byte big-endian event type; the payload layout depends on the type.
"""

from __future__ import annotations

import functools
import json
import struct
from typing import Any

PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4

# The image format codes of a type 1 preview.
JPEG = 1
PNG = 2


# json.dumps's output (default separators: clients see exactly the bytes Python's json.dumps
# gives ComfyUI), without the check for circular references, which the simulator's messages
# never have: a fifth faster, a dozen messages per prompt.
_encode = json.JSONEncoder(check_circular=False).encode


def text_frame(event: str, data: dict[str, Any]) -> str:
    return _encode({"type": event, "data": data})


@functools.lru_cache(maxsize=256)
def status_frame(queue_remaining: int) -> str:
    """The `status` broadcast, the most frequent message: made once per queue length."""
    return text_frame("status", {"status": {"exec_info": {"queue_remaining": queue_remaining}}})


def binary_frame(event_type: int, payload: bytes) -> bytes:
    return struct.pack(">I", event_type) + payload


def preview_frame(png: bytes) -> bytes:
    """Type 1: the legacy preview, for clients that did not negotiate preview metadata."""
    return struct.pack(">II", PREVIEW_IMAGE, PNG) + png


def preview_with_metadata_frame(png: bytes, metadata: dict[str, Any]) -> bytes:
    """Type 4: the preview with a JSON header saying which prompt and node it belongs to."""
    header = json.dumps({**metadata, "image_type": "image/png"}).encode()
    return struct.pack(">II", PREVIEW_IMAGE_WITH_METADATA, len(header)) + header + png


def websocket_frame(frame: str | bytes) -> bytes:
    """The frame on the wire (RFC 6455): unfragmented, unmasked (server to client) and
    uncompressed, text for str, binary for bytes."""
    payload, first = (frame.encode(), 0x81) if isinstance(frame, str) else (frame, 0x82)
    size = len(payload)
    if size < 126:
        header = struct.pack(">BB", first, size)
    elif size < 1 << 16:
        header = struct.pack(">BBH", first, 126, size)
    else:
        header = struct.pack(">BBQ", first, 127, size)
    return header + payload


def progress_text_frame(node_id: str, text: str) -> bytes:
    """Type 3: status text a node shows under itself (GetImageSize's size line)."""
    node = node_id.encode()
    return struct.pack(">II", TEXT, len(node)) + node + text.encode()
