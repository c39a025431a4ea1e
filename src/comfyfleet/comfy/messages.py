"""ComfyUI websocket messages as types: the one place that reads frames.

Tolerant by design (comfyui-protocol.md §12): unknown message types become `Other`, unknown
keys are ignored, and a field of an unexpected type reads as missing instead of failing.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

from comfyfleet import json_codec

# The message types are plain slotted dataclasses, not frozen ones: a frame makes one, and a
# frozen dataclass's __init__ sets each field through object.__setattr__ (0.35 us a message
# against 0.13). Nothing keeps or hashes them; they are read once by whoever is told.

PREVIEW_IMAGE = 1
TEXT = 3
PREVIEW_IMAGE_WITH_METADATA = 4
_IMAGE_FORMATS = {1: "image/jpeg", 2: "image/png"}


@dataclass(slots=True)
class Status:
    """Broadcast on every queue change; `sid` only on the copy sent at connect."""

    queue_remaining: int | None
    sid: str | None = None


@dataclass(slots=True)
class ExecutionStart:
    prompt_id: str


@dataclass(slots=True)
class ExecutionCached:
    prompt_id: str
    nodes: list[str]


@dataclass(slots=True)
class Executing:
    """A node starts; `node` None means the prompt is finished (the last per-prompt message).

    The copy replayed to a reconnecting socket has no prompt_id."""

    prompt_id: str | None
    node: str | None


@dataclass(slots=True)
class Progress:
    prompt_id: str
    node: str | None
    value: float
    max: float


@dataclass(slots=True)
class Executed:
    prompt_id: str
    node: str | None
    output: dict[str, Any] | None


@dataclass(slots=True)
class ExecutionSuccess:
    prompt_id: str


@dataclass(slots=True)
class ExecutionError:
    prompt_id: str
    node_id: str | None
    node_type: str | None
    exception_type: str | None
    exception_message: str
    traceback: list[str] = field(default_factory=list)
    current_inputs: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ExecutionInterrupted:
    prompt_id: str
    node_id: str | None
    node_type: str | None


@dataclass(slots=True)
class Other:
    """Any other text message (progress_state, feature_flags, types from newer versions)."""

    type: str
    data: dict[str, Any]


@dataclass(slots=True)
class Preview:
    """A binary preview image (frame type 1, or 4 with metadata naming its node and prompt)."""

    image_type: str
    image: bytes
    prompt_id: str | None = None
    node_id: str | None = None


@dataclass(slots=True)
class Text:
    """A binary text frame (type 3) a node pushes; broadcast to every socket."""

    node_id: str
    text: str


Message = (
    Status | ExecutionStart | ExecutionCached | Executing | Progress | Executed
    | ExecutionSuccess | ExecutionError | ExecutionInterrupted | Other
)
Binary = Preview | Text


def _str(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) else None


def _number(data: dict[str, Any], key: str) -> float | None:
    """A finite number: ComfyUI writes its messages with json.dumps, so a custom node's NaN
    or Infinity arrives as such (json.loads takes them), and the tracker's int() of one raises
    in the websocket's read loop."""
    value = data.get(key)
    # By exact type (JSON gives no subclasses; a bool is no number here): two progress
    # numbers a step, and isinstance of a union cost twice as much.
    if type(value) is float:
        return value if math.isfinite(value) else None
    if type(value) is int:
        return float(value)
    return None


def parse_event(kind: str, data: dict[str, Any]) -> Message:
    """A message from its type and data (as in frames, and in history `status.messages`)."""
    prompt_id = _str(data, "prompt_id")
    if kind == "status":
        status = data.get("status")
        info = status.get("exec_info") if isinstance(status, dict) else None
        remaining = info.get("queue_remaining") if isinstance(info, dict) else None
        return Status(remaining if isinstance(remaining, int) else None, _str(data, "sid"))
    if kind == "executing":
        return Executing(prompt_id, _str(data, "node"))
    if prompt_id is None:
        return Other(kind, data)  # every message below is about one prompt
    if kind == "execution_start":
        return ExecutionStart(prompt_id)
    if kind == "execution_cached":
        nodes = data.get("nodes")
        return ExecutionCached(prompt_id, [str(n) for n in nodes] if isinstance(nodes, list)
                               else [])
    if kind == "progress":
        value, maximum = _number(data, "value"), _number(data, "max")
        if value is None or maximum is None:
            return Other(kind, data)
        return Progress(prompt_id, _str(data, "node"), value, maximum)
    if kind == "executed":
        output = data.get("output")
        return Executed(prompt_id, _str(data, "node"), output if isinstance(output, dict)
                        else None)
    if kind == "execution_success":
        return ExecutionSuccess(prompt_id)
    if kind == "execution_error":
        traceback = data.get("traceback")
        inputs = data.get("current_inputs")
        return ExecutionError(
            prompt_id, _str(data, "node_id"), _str(data, "node_type"),
            _str(data, "exception_type"), str(data.get("exception_message") or ""),
            [str(line) for line in traceback] if isinstance(traceback, list) else [],
            inputs if isinstance(inputs, dict) else {},
        )
    if kind == "execution_interrupted":
        return ExecutionInterrupted(prompt_id, _str(data, "node_id"), _str(data, "node_type"))
    return Other(kind, data)


# The first bytes of the frames nobody here reads (`unread`) as ComfyUI writes them (json.dumps
# of {"type", "data"}, default separators). One written otherwise is decoded, and read as
# `Other` (or as `ExecutionSuccess`, which nothing acts on either).
_UNREAD = (b'{"type": "progress_state"', b'{"type": "execution_success"')


def unread(raw: bytes) -> bool:
    """Whether a text frame is one nobody here reads, told by its first bytes so that its JSON
    is never decoded: `progress_state`, the state of every node of the prompt so far, sent as
    each node starts and ends (a prompt's frames grow with the square of its nodes), whose
    news the `executing` and `progress` frames carry; and `execution_success`, a prompt's
    every time, whose news the `executing` with no node that follows it carries."""
    return raw.startswith(_UNREAD)


def parse_text(raw: str | bytes) -> Message | None:
    """A text frame (or its UTF-8 bytes) as a typed message, or None when it is not JSON of
    the expected shape."""
    try:
        decoded = json_codec.loads(raw)
    except ValueError:
        return None
    if not isinstance(decoded, dict) or not isinstance(decoded.get("type"), str):
        return None
    data = decoded.get("data")
    return parse_event(decoded["type"], data if isinstance(data, dict) else {})


def parse_binary(frame: bytes) -> Binary | None:
    """A binary frame (§5.4: 4-byte big-endian event type, then its payload), or None."""
    if len(frame) < 8:
        return None
    (event,) = struct.unpack_from(">I", frame)
    if event == PREVIEW_IMAGE:
        (image_format,) = struct.unpack_from(">I", frame, 4)
        return Preview(_IMAGE_FORMATS.get(image_format, "application/octet-stream"), frame[8:])
    if event == PREVIEW_IMAGE_WITH_METADATA:
        (length,) = struct.unpack_from(">I", frame, 4)
        try:
            metadata = json_codec.loads(frame[8 : 8 + length])
        except ValueError:
            return None
        if not isinstance(metadata, dict):
            return None
        return Preview(
            str(metadata.get("image_type") or "application/octet-stream"),
            frame[8 + length :],
            _str(metadata, "prompt_id"),
            _str(metadata, "node_id"),
        )
    if event == TEXT:
        (length,) = struct.unpack_from(">I", frame, 4)
        node_id = frame[8 : 8 + length].decode("utf-8", errors="replace")
        return Text(node_id, frame[8 + length :].decode("utf-8", errors="replace"))
    return None
