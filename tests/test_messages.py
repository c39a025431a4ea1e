"""The message parser reads every frame real ComfyUI 0.3.64 sent, and tolerates newer ones."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from comfyfleet.comfy.messages import (
    Executed,
    Executing,
    ExecutionCached,
    ExecutionError,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    Other,
    Preview,
    Progress,
    Status,
    Text,
    parse_binary,
    parse_text,
    unread,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "comfyui-0.3.64"
TYPED = {
    "status": Status, "execution_start": ExecutionStart, "execution_cached": ExecutionCached,
    "executing": Executing, "progress": Progress, "executed": Executed,
    "execution_success": ExecutionSuccess, "execution_error": ExecutionError,
    "execution_interrupted": ExecutionInterrupted,
}


def frames(kind: str) -> list[dict[str, Any]]:
    found = []
    for path in sorted(FIXTURES.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            frame = json.loads(line)
            if frame["kind"] == kind:
                found.append(frame)
    return found


@pytest.mark.parametrize("frame", frames("text"), ids=lambda f: str(f["seq"]))
def test_every_recorded_text_frame_parses_to_its_type(frame: dict[str, Any]) -> None:
    raw = json.loads(frame["raw"])
    message = parse_text(frame["raw"])
    assert parse_text(frame["raw"].encode()) == message  # as the websocket hands it over
    expected = TYPED.get(raw["type"], Other)
    if expected is not Executing and expected is not Status and "prompt_id" not in raw["data"]:
        expected = Other
    assert type(message) is expected
    if isinstance(message, Status):
        assert message.queue_remaining == raw["data"]["status"]["exec_info"]["queue_remaining"]
    if isinstance(message, ExecutionError):
        assert message.exception_message == raw["data"]["exception_message"]
        assert message.traceback and message.node_type == raw["data"]["node_type"]


def test_the_frames_left_unread_are_all_progress_state_and_execution_success_and_only_those(
        ) -> None:
    # As the websocket hands them over: their UTF-8 bytes.
    recorded = [(json.loads(frame["raw"])["type"], frame["raw"].encode())
                for frame in frames("text")]
    left = {"progress_state", "execution_success"}
    assert {kind for kind, raw in recorded if unread(raw)} == left
    assert all(unread(raw) for kind, raw in recorded if kind in left)


@pytest.mark.parametrize("frame", frames("binary"), ids=lambda f: str(f["seq"]))
def test_every_recorded_binary_frame_parses(frame: dict[str, Any]) -> None:
    # Large frames were recorded by their first 16 bytes only.
    recorded = base64.b64decode(frame["b64"]) if "b64" in frame \
        else bytes.fromhex(frame["header_hex"])
    message = parse_binary(recorded)
    if frame["event_type"] == 3:
        assert isinstance(message, Text)
        assert message.text
    else:
        assert isinstance(message, Preview)
        assert message.image[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0")
        assert message.image_type in ("image/png", "image/jpeg")
        if frame["event_type"] == 4:
            assert message.prompt_id and message.node_id


@pytest.mark.parametrize(
    "raw",
    [
        '{"type": "brand_new_event", "data": {"anything": 1}}',
        '{"type": "progress", "data": {"prompt_id": "p", "value": "lots", "max": 3}}',
        '{"type": "execution_start", "data": {"prompt_id": "p", "workflow_id": "w", "x": []}}',
        '{"type": "status", "data": {"status": null}}',
        '{"type": "executed", "data": {"prompt_id": "p", "node": "9", "output": null}}',
    ],
)
def test_newer_or_odd_messages_never_raise(raw: str) -> None:
    assert parse_text(raw) is not None


@pytest.mark.parametrize(("value", "maximum"), [("NaN", "3"), ("1", "Infinity"),
                                               ("-Infinity", "3")])
def test_progress_that_is_not_a_finite_number_is_not_progress(value: str, maximum: str) -> None:
    data = f'{{"prompt_id": "p", "value": {value}, "max": {maximum}}}'
    raw = f'{{"type": "progress", "data": {data}}}'
    assert isinstance(parse_text(raw), Other)


def test_a_frame_with_a_number_json_cannot_hold_is_read_still() -> None:
    """ComfyUI writes a node's NaN as `NaN` (Python's json.dumps): orjson refuses it, the
    frame is read as the standard library reads it, not dropped."""
    raw = ('{"type": "executed", "data": {"prompt_id": "p", "node": "9", '
           '"output": {"scores": [NaN, Infinity, 1]}}}')
    message = parse_text(raw)
    assert isinstance(message, Executed) and message.output is not None
    assert message.output["scores"][2] == 1


def test_garbage_is_not_a_message() -> None:
    assert parse_text("not json") is None
    assert parse_text('["a", "list"]') is None
    assert parse_binary(b"\x00\x00") is None
    assert parse_binary(struct.pack(">II", 99, 0)) is None
    assert parse_binary(struct.pack(">II", 4, 50) + b"{broken") is None
