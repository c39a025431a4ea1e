"""Replays of the recorded ComfyUI 0.3.64 sessions against the simulator.

Each scenario sends the simulator the requests of one recording (fixtures/comfyui-0.3.64, see
comfyui-protocol.md) and compares what comes back: the websocket frames in order (text
messages with their payloads, binary frames with their type and fields) and the HTTP statuses,
content types and bodies. Only what differs between any two runs is normalised: timestamps,
tracebacks, the server's directory, `number` (the lab's server had counted other prompts
first; see Replay.renumber), PreviewImage's random file names and tensor reprs.

The lab ran on one server, in this order (by the timestamps in the recordings): the normal
run, the 400 errors, the two runtime errors, the binary previews, the slow node, the
interrupt, the queue, the prompt without client, the cache rerun, uploads and views, then the
type 3 text frame. Where a recording depends on what ran before it (cached nodes, files on
disk, the prompt counter), its scenario runs that first and says so. The restart, the two
instances, the cleanup route and the counter reuse happened in that order on a second server.

The lab had a test package with a LabSlowImage node (sleeps, reports progress, optionally
sends JPEG previews) that the simulator does not have: recorded prompts and messages are
mapped to SimulatedWork (`lab_to_sim`), whose previews are PNG.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType
from PIL import Image

from comfyfleet.comfy.cache import CachePolicy
from comfyfleet.sim import SimulatedComfyUI
from tests.cache_probes import run_step as run_probe
from tests.test_sim import decode_binary

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "comfyui-0.3.64"
TIMEOUT = 5.0
JSON = dict[str, Any]

# The recording servers' base directories, as their messages show them.
RECORDED_ROOTS = ("/opt/ComfyUI", "/srv/comfy-b")


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


# --- the lab's nodes ---------------------------------------------------------------------------


def lab_to_sim(value: Any, stretch: float = 1.0) -> Any:
    """A recording with LabSlowImage as the simulator runs it: SimulatedWork taking the same
    time (times `stretch`) in as many steps, with previews if it sent them."""
    if isinstance(value, list):
        return [lab_to_sim(item, stretch) for item in value]
    if not isinstance(value, dict):
        return value
    if value.get("class_type") == "LabSlowImage":
        lab = value["inputs"]
        inputs = {
            "image": lab["image"],
            "seconds": round(lab["steps"] * lab["step_seconds"] * stretch, 3),
            "steps": lab["steps"],
            "preview": lab["send_preview"],
        }
        return {**value, "class_type": "SimulatedWork", "inputs": inputs}
    mapped = {key: lab_to_sim(item, stretch) for key, item in value.items()}
    if mapped.get("node_type") == "LabSlowImage":
        mapped["node_type"] = "SimulatedWork"
    return mapped


# --- normalisation -----------------------------------------------------------------------------

_TEMP_NAME = re.compile(r"ComfyUI_temp_[a-z]{5}_")


def normalise(value: Any, root: str) -> Any:
    """What must be equal between the recording and the replay."""
    if isinstance(value, list):
        return [normalise(item, root) for item in value]
    if isinstance(value, dict):
        out: JSON = {}
        for key, item in value.items():
            if key == "timestamp":
                out[key] = "<timestamp>"
            elif key == "traceback":
                out[key] = "<traceback>"  # ComfyUI's frames are not the simulator's
            elif key == "current_outputs":
                out[key] = sorted(item)  # a set in ComfyUI
            else:
                out[key] = normalise(item, root)
        return out
    if isinstance(value, str):
        if value.startswith(("tensor(", "[<PIL.")):
            return "<image>"  # a torch tensor there, Pillow images here
        for base in (root, *RECORDED_ROOTS):
            value = value.replace(base, "<root>")
        return _TEMP_NAME.sub("ComfyUI_temp_xxxxx_", value)
    return value


def recorded_frames(name: str, stretch: float = 1.0) -> list[JSON]:
    """A websocket transcript as the frames `Socket` collects (without the close record)."""
    frames: list[JSON] = []
    for line in (FIXTURES / name).read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "text":
            frames.append(lab_to_sim(json.loads(record["raw"]), stretch))
        elif record["kind"] == "binary":
            fields = {"event": record["event_type"]}
            if record["event_type"] == 1:
                # LabSlowImage sent JPEG previews; the simulator's are PNG.
                fields["image_format"] = 2
            elif record["event_type"] == 4:
                fields["metadata"] = record["metadata"]
            else:
                fields |= {"node_id": record["node_id"], "text": record["text"]}
            frames.append({"type": "binary", "data": fields})
    return frames


def sent_first(name: str) -> str | None:
    """The text the lab's client sent before anything else (feature flags), if any."""
    first = json.loads((FIXTURES / name).read_text().splitlines()[0])
    return first["raw"] if first["kind"] == "sent_text" else None


def shapes(frames: list[JSON], root: str, *, timed: bool = False) -> list[Any]:
    """Frames as compared. With `timed`, how many progress ticks a node reported depends on
    when the lab acted (an interrupt), so their values are dropped and repeats collapsed."""
    out: list[Any] = []
    last_tick: list[Any] | None = None
    i = 0
    while i < len(frames):
        tick = _tick_length(frames, i) if timed else 0
        if tick:
            block = [_shape(frame, root, timed) for frame in frames[i : i + tick]]
            if block != last_tick:
                out += block
            last_tick = block
            i += tick
            continue
        out.append(_shape(frames[i], root, timed))
        last_tick = None
        i += 1
    return out


def _tick_length(frames: list[JSON], i: int) -> int:
    """A progress tick: progress_state then progress (then a type 1 preview), or 0."""
    kinds = [frame["type"] for frame in frames[i : i + 3]]
    if kinds[:2] != ["progress_state", "progress"]:
        return 0
    return 3 if kinds[2:] == ["binary"] else 2


def _shape(frame: JSON, root: str, timed: bool) -> Any:
    kind = frame["type"]
    data = {k: v for k, v in frame["data"].items() if k != "image"}  # images compared apart
    if timed and kind == "progress":
        data["value"] = "<tick>"
    if timed and kind == "progress_state":
        data["nodes"] = {
            node: {**state, "value": "<tick>"} if state["state"] == "running" else state
            for node, state in data["nodes"].items()
        }
    return (kind, normalise(data, root))


# --- live sockets ------------------------------------------------------------------------------


class Socket:
    """A websocket whose frames a background task collects as they come."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.frames: list[JSON] = []
        self.end: WSMsgType | None = None  # how the connection ended: CLOSE is a close frame
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            message = await self.ws.receive()
            if message.type == WSMsgType.TEXT:
                self.frames.append(json.loads(message.data))
            elif message.type == WSMsgType.BINARY:
                self.frames.append({"type": "binary", "data": decode_binary(message.data)})
            else:
                self.end = message.type
                self._changed.set()
                return
            self._changed.set()

    async def until(self, done: Callable[[list[JSON]], bool], what: str) -> None:
        try:
            async with asyncio.timeout(TIMEOUT):
                while not done(self.frames):
                    if self.end is not None:
                        raise AssertionError(f"socket ended ({self.end}) before {what}")
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            kinds = [frame["type"] for frame in self.frames]
            raise AssertionError(f"no {what}; got {kinds}") from None

    async def until_done(self, prompt_id: str) -> None:
        finished = {"type": "executing", "data": {"node": None, "prompt_id": prompt_id}}
        await self.until(lambda frames: finished in frames, f"end of {prompt_id}")

    async def until_count(self, count: int) -> None:
        await self.until(lambda frames: len(frames) >= count, f"{count} frames")

    async def until_new(self, kind: str, after: int) -> None:
        """Until a frame of `kind` arrives after the first `after` frames."""
        await self.until(
            lambda frames: any(f["type"] == kind for f in frames[after:]), f"a new {kind}"
        )

    async def until_ended(self) -> None:
        async with asyncio.timeout(TIMEOUT):
            await asyncio.shield(self._reader)

    async def close(self) -> list[JSON]:
        """Close from our side; the server answers after everything it sent before, so the
        frames are then complete without waiting for stragglers."""
        if self.end is None:
            await self.ws.send_frame(struct.pack(">H", 1000), WSMsgType.CLOSE)
        await self.until_ended()
        return self.frames


# --- the replayer ------------------------------------------------------------------------------


class Replay:
    """Sends recorded requests to one simulator and checks the answers."""

    def __init__(self, http: aiohttp.ClientSession, sim: SimulatedComfyUI, stretch: float) -> None:
        self.http = http
        self.sim = sim
        self.stretch = stretch
        self.root = str(sim.data_dir)
        self.offset: int | None = None  # recorded number - simulator's number
        self.aliases: dict[str, str] = {}  # generated prompt id here -> the recorded one
        self.sockets: list[Socket] = []

    async def socket(self, client_id: str, first_text: str | None = None) -> Socket:
        ws = await self.http.ws_connect(f"{self.sim.url}/ws?clientId={client_id}")
        if first_text is not None:
            await ws.send_str(first_text)
        socket = Socket(ws)
        self.sockets.append(socket)
        await socket.until_count(1)  # the hello
        return socket

    def next_recording(self) -> None:
        """The next requests come from a recording whose server had counted other prompts."""
        self.offset = None

    def renumber(self, number: Any) -> Any:
        """The lab's server had counted other prompts first; explicit (float) numbers stay."""
        if isinstance(number, float) or self.offset is None:
            return number
        return number + self.offset if number >= 0 else number - self.offset

    def live(self, body: Any, path: str, method: str) -> Any:
        """A simulator answer in the recording's terms: aliases and numbers."""
        text = json.dumps(body)
        for generated, recorded in self.aliases.items():
            text = text.replace(generated, recorded)
        body = json.loads(text)
        if method == "POST" and path == "/prompt" and "number" in body:
            body["number"] = self.renumber(body["number"])
        elif path == "/queue":
            for item in body["queue_running"] + body["queue_pending"]:
                item[0] = self.renumber(item[0])
        elif path.startswith("/history"):
            for entry in body.values():
                entry["prompt"][0] = self.renumber(entry["prompt"][0])
        return body

    async def request(
        self,
        record: JSON,
        *,
        params: dict[str, str] | None = None,
        data: Any = None,
        expected: Any = None,
    ) -> Any:
        """Send a recorded request; check status, headers and body; return the body."""
        method, path = record["method"], record["path"]
        body = lab_to_sim(record.get("request_json"), self.stretch)
        async with self.http.request(
            method, self.sim.url + path, json=body, params=params, data=data
        ) as response:
            status, headers, raw = response.status, response.headers, await response.read()
        assert status == record["status"], (method, path, raw[:300])
        for header in ("Content-Type", "Content-Disposition"):
            if header in record.get("response_headers", {}):
                recorded_header = record["response_headers"][header]
                got_header = normalise(headers.get(header), self.root)
                assert got_header == normalise(recorded_header, self.root), header
        if "response_json" not in record:
            # The format's signature; RIFF (webp) is followed by the file size.
            magic = bytes.fromhex(record["response_magic_hex"])[:4]
            assert raw.startswith(magic) and bool(raw) == bool(record["response_bytes_len"])
            return raw
        answer = json.loads(raw)
        if method == "POST" and path == "/prompt" and status == 200:
            recorded = record["response_json"]
            if self.offset is None:
                self.offset = recorded["number"] - answer["number"]
            if not (body or {}).get("prompt_id"):
                self.aliases[answer["prompt_id"]] = recorded["prompt_id"]
        if expected is None:
            expected = lab_to_sim(record["response_json"], self.stretch)
        got = normalise(self.live(answer, path, method), self.root)
        assert got == normalise(expected, self.root), (method, path)
        return answer

    async def history(self, record: JSON, only: set[str] | None = None) -> Any:
        """A recorded GET /history[/{id}], once the simulator has the same prompts finished.

        `only`: compare just these prompts of a recorded /history (the lab server's history
        also held other sessions' prompts)."""
        expected = lab_to_sim(record["response_json"], self.stretch)
        if only is not None:
            expected = {key: entry for key, entry in expected.items() if key in only}
        wanted = set(expected)
        for _ in range(500):
            async with self.http.get(self.sim.url + record["path"]) as response:
                have = set(self.live(await response.json(), record["path"], "GET"))
            if have == wanted:
                break
            await asyncio.sleep(0.01)
        return await self.request(record, expected=expected)

    async def close_all(self) -> None:
        for socket in self.sockets:
            await socket.close()


def multipart(record: JSON, data: bytes) -> aiohttp.MultipartWriter:
    """A recorded upload's form (the lab's file bytes were not recorded: `data` stands in)."""
    form = aiohttp.MultipartWriter("form-data")
    for field, filename in record["multipart_fields"].items():
        part = form.append(data, {"Content-Type": "image/png"})
        part.set_content_disposition("form-data", quote_fields=False, name=field, filename=filename)
    for key, value in record["form_data"].items():
        form.append(value).set_content_disposition("form-data", name=key)
    return form


def png(color: tuple[int, ...], size: tuple[int, int] = (8, 6), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session:
        yield session


LAB_PACKAGE = '''
"""The recording lab's routes (protocol doc section 11), as a package under test."""
import asyncio
import os

from aiohttp import web

import folder_paths
from server import PromptServer

NODE_CLASS_MAPPINGS = {}


@PromptServer.instance.routes.get("/lab/ping")
async def ping(request):
    return web.json_response({"ok": True, "output_dir": folder_paths.get_output_directory()})


@PromptServer.instance.routes.post("/lab/delete_output")
async def delete_output(request):
    body = await request.json()
    base = folder_paths.get_directory_by_type(body.get("type", "output"))
    path = os.path.abspath(os.path.join(base, body.get("subfolder", ""), body["filename"]))
    if os.path.commonpath((base, path)) != base:
        return web.json_response({"error": "outside directory"}, status=403)
    try:
        await asyncio.to_thread(os.remove, path)
    except FileNotFoundError:
        return web.json_response({"deleted": False})
    return web.json_response({"deleted": True})
'''


@contextlib.asynccontextmanager
async def lab_server(
    tmp_path: Path, name: str, http: aiohttp.ClientSession, stretch: float = 1.0
) -> AsyncIterator[Replay]:
    """A simulator with the lab's package, and a replayer for it."""
    package = tmp_path / "lab_test_nodes"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(LAB_PACKAGE)
    async with SimulatedComfyUI(data_dir=tmp_path / name, custom_nodes=[package]) as sim:
        replay = Replay(http, sim, stretch)
        try:
            yield replay
        finally:
            await replay.close_all()


async def run_prompt(replay: Replay, record: JSON, socket: Socket | None = None) -> Any:
    """POST a recorded prompt and wait until it is finished (the lab waited between prompts)."""
    answer = await replay.request(record)
    if socket is not None:
        await socket.until_done(answer["prompt_id"])
    else:
        for _ in range(500):
            async with replay.http.get(f"{replay.sim.url}/history/{answer['prompt_id']}") as r:
                if await r.json():
                    break
            await asyncio.sleep(0.01)
    return answer


def same_frames(
    live: list[JSON], name: str, root: str, *, timed: bool = False, stretch: float = 1.0
) -> None:
    recorded = recorded_frames(name, stretch)
    assert shapes(live, root, timed=timed) == shapes(recorded, root, timed=timed), name


# --- the scenarios -----------------------------------------------------------------------------

Scenario = Callable[[Path, aiohttp.ClientSession], Awaitable[None]]
SCENARIOS: dict[str, tuple[list[str], Scenario]] = {}


def scenario(*files: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[fn.__name__] = (list(files), fn)
        return fn

    return register


async def invert_session(replay: Replay) -> None:
    """The lab's first prompt: a normal run (also the state later recordings start from)."""
    ids = fixture("s1_ids.json")
    records = fixture("ws_transcript_http.json")
    socket = await replay.socket(ids["client_id"])
    await run_prompt(replay, records[0], socket)
    await socket.close()


@scenario("ws_transcript.jsonl", "ws_transcript_http.json", "s1_ids.json", "view_invert_00001_.png")
async def invert(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    ids = fixture("s1_ids.json")
    records = fixture("ws_transcript_http.json")
    async with lab_server(tmp_path, "lab", http) as replay:
        socket = await replay.socket(ids["client_id"])
        await replay.request(records[0])
        assert records[0]["response_json"]["prompt_id"] == ids["prompt_id"]
        history = await replay.history(records[1])
        [image] = history[ids["prompt_id"]]["outputs"]["3"]["images"]
        served = await replay.request(records[2], params=image)
        await replay.request(records[3])
        await replay.request(records[4])
        await socket.until_done(ids["prompt_id"])
        same_frames(await socket.close(), "ws_transcript.jsonl", replay.root)
    # The file /view served: the same image and PNG text chunks (pixels may differ by one,
    # ComfyUI inverts in floating point).
    recorded = FIXTURES / f"view_{image['filename']}"
    with Image.open(io.BytesIO(served)) as ours, Image.open(recorded) as lab:
        assert (ours.size, ours.mode, ours.info) == (lab.size, lab.mode, lab.info)
        pairs = zip(ours.tobytes(), lab.tobytes(), strict=True)
        assert all(abs(a - b) <= 1 for a, b in pairs)


@scenario("http_400_errors.json")
async def validation_errors(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with lab_server(tmp_path, "lab", http) as replay:
        # The lab's first prompt (number 0) ran before these; all of them take a number.
        await invert_session(replay)
        for case, recorded in fixture("http_400_errors.json").items():
            record: JSON = {"method": "POST", "path": "/prompt", "status": recorded["status"]}
            if "request_raw" in recorded:
                async with http.post(f"{replay.sim.url}/prompt", data=recorded["request_raw"]) as r:
                    assert (r.status, r.content_type) == (500, "text/plain"), case
                    assert await r.text() == recorded["response"], case
                continue
            record |= {"request_json": recorded["request"], "response_json": recorded["response"]}
            await replay.request(record)


@scenario(
    "ws_execution_error_loadimage_corrupt.jsonl", "ws_execution_error_loadimage_corrupt_http.json"
)
async def error_corrupt_image(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    records = fixture("ws_execution_error_loadimage_corrupt_http.json")
    async with lab_server(tmp_path, "lab", http) as replay:
        socket = await replay.socket(records[1]["request_json"]["client_id"])
        await replay.request(records[0], data=multipart(records[0], b"not an image at all"))
        await run_prompt(replay, records[1], socket)
        await replay.history(records[2])
        same_frames(await socket.close(), "ws_execution_error_loadimage_corrupt.jsonl", replay.root)


@scenario(
    "ws_execution_error_saveimage_escape.jsonl", "ws_execution_error_saveimage_escape_http.json"
)
async def error_save_outside(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    records = fixture("ws_execution_error_saveimage_escape_http.json")
    async with lab_server(tmp_path, "lab", http) as replay:
        # Nodes 1 and 2 were cached from the lab's earlier prompts (same inputs).
        await invert_session(replay)
        replay.next_recording()
        socket = await replay.socket(records[0]["request_json"]["client_id"])
        await run_prompt(replay, records[0], socket)
        await replay.history(records[1])
        same_frames(await socket.close(), "ws_execution_error_saveimage_escape.jsonl", replay.root)


def preview_images(frames: list[JSON]) -> list[bytes]:
    return [frame["data"]["image"] for frame in frames if frame["type"] == "binary"]


def recorded_preview_images(name: str) -> list[bytes]:
    """The images of the binary frames the lab recorded in full."""
    images = []
    for line in (FIXTURES / name).read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "binary":
            images.append(decode_binary(base64.b64decode(record["b64"]))["image"])
    return images


@scenario("ws_binary_preview_legacy_type1.jsonl", "ws_binary_preview_legacy_type1_http.json")
async def preview_legacy(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    name = "ws_binary_preview_legacy_type1"
    records = fixture(f"{name}_http.json")
    async with lab_server(tmp_path, "lab", http) as replay:
        socket = await replay.socket(records[0]["request_json"]["client_id"])
        await run_prompt(replay, records[0], socket)
        await replay.history(records[1])
        frames = await socket.close()
        same_frames(frames, f"{name}.jsonl", replay.root)
        # SaveImageWebsocket's PNGs, byte for byte.
        assert preview_images(frames) == recorded_preview_images(f"{name}.jsonl")


@scenario(
    "ws_binary_preview_with_metadata_type4.jsonl",
    "ws_binary_preview_with_metadata_type4_http.json",
)
async def preview_with_metadata(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    name = "ws_binary_preview_with_metadata_type4"
    records = fixture(f"{name}_http.json")
    legacy = fixture("ws_binary_preview_legacy_type1_http.json")
    async with lab_server(tmp_path, "lab", http) as replay:
        # The legacy run came just before: its EmptyImage node is cached.
        await run_prompt(replay, legacy[0])
        client_id = records[0]["request_json"]["client_id"]
        socket = await replay.socket(client_id, sent_first(f"{name}.jsonl"))
        await run_prompt(replay, records[0], socket)
        await replay.history(records[1])
        frames = await socket.close()
        same_frames(frames, f"{name}.jsonl", replay.root)
        assert preview_images(frames) == recorded_preview_images(f"{name}.jsonl")


@scenario("ws_progress_labslow.jsonl", "ws_progress_labslow_http.json")
async def progress(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    records = fixture("ws_progress_labslow_http.json")
    async with lab_server(tmp_path, "lab", http) as replay:
        socket = await replay.socket(records[0]["request_json"]["client_id"])
        await run_prompt(replay, records[0], socket)
        await replay.history(records[1])
        same_frames(await socket.close(), "ws_progress_labslow.jsonl", replay.root)


@scenario("ws_no_client_id_prompt_observer.jsonl", "ws_no_client_id_prompt_http.json")
async def prompt_without_client(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    name = "ws_no_client_id_prompt_observer.jsonl"
    records = fixture("ws_no_client_id_prompt_http.json")
    expected = recorded_frames(name)
    async with lab_server(tmp_path, "lab", http) as replay:
        observer = await replay.socket(expected[0]["data"]["sid"])
        await run_prompt(replay, records[0])
        await replay.history(records[1])
        await observer.until_count(len(expected))
        same_frames(await observer.close(), name, replay.root)


@scenario(
    "ws_interrupt_global_submitter.jsonl",
    "ws_interrupt_global_observer.jsonl",
    "ws_interrupt_global_http.json",
)
async def interrupt(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    records = fixture("ws_interrupt_global_http.json")
    observed = recorded_frames("ws_interrupt_global_observer.jsonl")
    async with lab_server(tmp_path, "lab", http) as replay:
        submitter = await replay.socket(records[0]["request_json"]["client_id"])
        observer = await replay.socket(observed[0]["data"]["sid"])
        answer = await replay.request(records[0])
        await submitter.until_new("progress", 0)  # the lab interrupted a few ticks in
        await replay.request(records[1])
        await replay.history(records[2])
        await submitter.until_done(answer["prompt_id"])
        await observer.until_count(len(observed))
        submitted = await submitter.close()
        same_frames(submitted, "ws_interrupt_global_submitter.jsonl", replay.root, timed=True)
        same_frames(await observer.close(), "ws_interrupt_global_observer.jsonl", replay.root)


@scenario(
    "ws_queue_submitter_original_socket.jsonl",
    "ws_queue_submitter_reconnected_same_clientId.jsonl",
    "ws_queue_late_joiner.jsonl",
    "ws_queue_http.json",
    "ws_queue_ids.json",
)
async def queue(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    records = fixture("ws_queue_http.json")
    ids = fixture("ws_queue_ids.json")
    joiner = recorded_frames("ws_queue_late_joiner.jsonl")
    # The slow prompt A takes 0.3 s a step here (the lab's took 0.1 s): the original socket
    # must be replaced before A's first tick, as it was in the lab.
    async with lab_server(tmp_path, "lab", http, stretch=3.0) as replay:
        client_id = records[0]["request_json"]["client_id"]
        original = await replay.socket(client_id)
        await replay.request(records[0])  # A, slow
        # B arrived once A was at its slow node.
        executing = {"node": "2", "display_node": "2", "prompt_id": ids["A"]}
        await original.until(lambda f: {"type": "executing", "data": executing} in f, "A's node 2")
        for record in records[1:5]:  # B, C (front), D, E (number -1000.5)
            await replay.request(record)
        await original.until(lambda frames: queued(frames) == 5, "five queued")
        await replay.request(records[5])  # the queue, in heap order
        late = await replay.socket(joiner[0]["data"]["sid"])
        again = await replay.socket(client_id)  # replaces the original socket
        await again.until_new("progress", 0)
        await replay.request(records[6])  # interrupting pending B does nothing
        await replay.request(records[7])  # deleting D does
        await replay.request(records[8])
        await again.until(lambda frames: queued(frames) == 4, "the deletion's status")
        await again.until_new("progress", len(again.frames))
        await replay.request(records[9])  # interrupting running A
        await again.until_done(ids["B"])
        await replay.history(records[10], only=set(ids.values()))
        await late.until_count(len(joiner))
        root = replay.root
        same_frames(await original.close(), "ws_queue_submitter_original_socket.jsonl", root)
        same_frames(
            await again.close(),
            "ws_queue_submitter_reconnected_same_clientId.jsonl",
            root,
            timed=True,
            stretch=3.0,
        )
        same_frames(await late.close(), "ws_queue_late_joiner.jsonl", root)


def queued(frames: list[JSON]) -> int | None:
    """queue_remaining of the last status message."""
    statuses = [frame for frame in frames if frame["type"] == "status"]
    return statuses[-1]["data"]["status"]["exec_info"]["queue_remaining"] if statuses else None


@scenario("ws_dup_clientid_new_socket_after_old_closed.jsonl")
async def duplicate_client_id(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    name = "ws_dup_clientid_new_socket_after_old_closed.jsonl"
    client_id = recorded_frames(name)[0]["data"]["sid"]
    async with lab_server(tmp_path, "lab", http) as replay:
        old = await replay.socket(client_id)
        new = await replay.socket(client_id)
        await old.close()
        for _ in range(500):  # until the server has unregistered the id on the old close
            async with http.get(f"{replay.sim.url}/_sim") as response:
                if client_id not in (await response.json())["clients"]:
                    break
            await asyncio.sleep(0.01)
        # The lab's other clients kept working meanwhile; the new socket heard none of it.
        await invert_session(replay)
        same_frames(await new.close(), name, replay.root)


@scenario("ws_cached_rerun_and_free.jsonl", "ws_cached_rerun_and_free_http.json")
async def cached_rerun(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    records = fixture("ws_cached_rerun_and_free_http.json")
    async with lab_server(tmp_path, "lab", http) as replay:
        socket = await replay.socket(records[0]["request_json"]["client_id"])
        await run_prompt(replay, records[0], socket)
        await run_prompt(replay, records[1], socket)  # identical: served from the cache
        await replay.history(records[2])
        await replay.request(records[3])  # POST /free
        await run_prompt(replay, records[4], socket)  # identical, but runs again
        await replay.history(records[5])
        same_frames(await socket.close(), "ws_cached_rerun_and_free.jsonl", replay.root)


@scenario("upload_and_view_http.json", "upload_and_view_results.json")
async def upload_and_view(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    records = fixture("upload_and_view_http.json")
    results = list(fixture("upload_and_view_results.json").values())
    # The lab's bytes were not recorded. Two different images of one size, used as the
    # results show (the subfolder and /view of the top copy give different lengths).
    first, other = png((200, 30, 30)), png((30, 30, 200))
    mask = png((0, 0, 0, 128), mode="RGBA")
    uploads = [first, first, other, other, first, first, first, first, first, first, mask]
    async with lab_server(tmp_path, "lab", http) as replay:
        # /view of lab/invert_00001_.png at the end: the lab's first prompt saved it.
        await invert_session(replay)
        replay.next_recording()
        for record, data, result in zip(records, uploads, results, strict=False):
            answer = await replay.request(record, data=multipart(record, data))
            assert result["status"] == record["status"]
            assert answer == (json.loads(result["body"]) if result["body"] else b"")
        await run_prompt(replay, records[11])
        history = await replay.history(records[12])
        [preview] = next(iter(history.values()))["outputs"]["3"]["images"]
        views = [result for result in results if "params" in result]
        for record, result in zip(records[13:], views, strict=True):
            params = result["params"]
            if _TEMP_NAME.match(params.get("filename", "")):
                params = {**params, "filename": preview["filename"]}
            await replay.request(record, params=params)
    # The mask upload: the original image with the mask's alpha channel.
    with Image.open(replay.sim.data_dir / "input" / "clipspace" / "lab_mask.png") as masked:
        assert masked.mode == "RGBA"
        assert masked.getpixel((0, 0)) == (30, 30, 200, 128)


@scenario(
    "restart_http.json",
    "two_instances.txt",
    "cleanup_route_and_cache_hazard_http.json",
    "cleanup_route_and_cache_hazard.txt",
    "counter_reuse_after_delete.txt",
)
async def second_server(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """The lab's second server (/srv/comfy-b): restarted, then run beside the first one, then
    its cleanup route used; each recording starts from what the previous one left."""
    async with lab_server(tmp_path, "b", http) as replay:
        await restart(replay)
        await two_instances(tmp_path, replay)
        await cleanup_route(replay)
        await counter_reuse(replay)


async def restart(replay: Replay) -> None:
    records = fixture("restart_http.json")
    watcher = await replay.socket("watcher")
    await run_prompt(replay, records[0])
    for record in records[1:4]:  # the slow prompt runs, two wait
        await replay.request(record)
    await replay.request(records[4])
    await replay.history(records[5])
    (replay.sim.data_dir / "temp" / "scratch.png").write_bytes(png((1, 1, 1)))
    async with replay.http.post(f"{replay.sim.url}/_sim/restart") as response:
        assert response.status == 200
    # Killed: the socket dropped without a close frame; temp wiped; queue, history and the
    # counter gone; output files kept (the SaveImage counter continues).
    await watcher.until_ended()
    assert watcher.end in (WSMsgType.CLOSED, WSMsgType.ERROR)
    assert not (replay.sim.data_dir / "temp" / "scratch.png").exists()
    await replay.request(records[6])
    await replay.request(records[7])
    await run_prompt(replay, records[8])
    await replay.history(records[9])


def saving_prompt(color: int, prefix: str, batch_size: int = 1) -> JSON:
    """EmptyImage -> ImageInvert -> SaveImage (the prompts of the lab's notes are not recorded,
    only what they saved)."""
    empty = {"width": 64, "height": 48, "batch_size": batch_size, "color": color}
    return {
        "1": {"class_type": "EmptyImage", "inputs": empty},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}},
    }


async def two_instances(tmp_path: Path, b: Replay) -> None:
    """The same prompt on two servers with their own directories: both write two_00001_."""
    lines = (FIXTURES / "two_instances.txt").read_text().splitlines()
    prompt = saving_prompt(0x123456, "lab/two")
    async with lab_server(tmp_path, "a", b.http) as a:
        answers = []
        for server in (a, b):
            async with b.http.post(f"{server.sim.url}/prompt", json={"prompt": prompt}) as r:
                assert r.status == 200
                answers.append(await r.json())
        # The first server was the lab's main one, at its 31st prompt; the second at its 2nd.
        recorded = json.loads(lines[1].removeprefix("8189 200 "))
        assert answers[1] | {"prompt_id": recorded["prompt_id"]} == recorded
        listings = []
        for server, answer, line in zip((a, b), answers, lines[2:4], strict=True):
            entry = await wait_entry(server, answer["prompt_id"])
            status = entry["status"]
            note = f"{status['completed']} {status['status_str']} {entry['outputs']} argv: "
            assert note in line
            # Each knows its own directories, through the system stats and the lab package.
            async with b.http.get(f"{server.sim.url}/system_stats") as response:
                argv = (await response.json())["system"]["argv"]
            assert str(server.sim.port) in argv and f"{server.root}/output" in argv
            async with b.http.get(f"{server.sim.url}/lab/ping") as response:
                assert (await response.json())["output_dir"] == f"{server.root}/output"
            folder = server.sim.data_dir / "output" / "lab"
            listings.append(sorted(path.name for path in folder.iterdir()))
        assert "two_00001_.png" in listings[0]  # the lab's main server held other files too
        assert repr(listings[1]) == lines[4].split("] ")[1]


async def wait_entry(replay: Replay, prompt_id: str) -> JSON:
    for _ in range(500):
        async with replay.http.get(f"{replay.sim.url}/history/{prompt_id}") as response:
            history = await response.json()
        if history:
            entry: JSON = history[prompt_id]
            return entry
        await asyncio.sleep(0.01)
    raise AssertionError(f"{prompt_id} never finished")


async def cleanup_route(replay: Replay) -> None:
    """The lab package's routes, and why a cached rerun after a cleanup is a hazard."""
    records = fixture("cleanup_route_and_cache_hazard_http.json")
    await run_prompt(replay, records[0])
    history = await replay.history(records[1])
    [first] = next(iter(history.values()))["outputs"]["3"]["images"]
    await replay.request(records[2], params=first)
    ping = await replay.request(records[3])
    await replay.request(records[4])  # /api/lab/ping
    delete = await replay.request(records[5])
    await replay.request(records[6])  # a path outside: 403
    await replay.request(records[7], params=first)
    await run_prompt(replay, records[8])
    history = await replay.history(records[9])
    [again] = next(iter(history.values()))["outputs"]["3"]["images"]
    await replay.request(records[10], params=again)
    # The lab's notes, from what the simulator answered.
    output_dir = ping["output_dir"].replace(replay.root, "/srv/comfy-b")
    notes = [
        f"first run: {first}",
        "view before delete: 200",
        f"ping: {ping | {'output_dir': output_dir}} api-prefixed ping: 200",
        f"delete: {delete} traversal: 403",
        "view after delete: 404",
        f"identical resubmission after delete -> {again} view: 404",
    ]
    assert notes == (FIXTURES / "cleanup_route_and_cache_hazard.txt").read_text().splitlines()


async def counter_reuse(replay: Replay) -> None:
    """SaveImage numbers files 1 + the highest on disk: a deleted newest number comes back."""
    folder = replay.sim.data_dir / "output" / "lab"
    notes = [f"dir before: {sorted(p.name for p in folder.iterdir())}"]

    async def save(color: int, batch: int = 1) -> list[str]:
        prompt = saving_prompt(color, "lab/cleanup", batch)
        async with replay.http.post(f"{replay.sim.url}/prompt", json={"prompt": prompt}) as r:
            prompt_id = (await r.json())["prompt_id"]
        entry = await wait_entry(replay, prompt_id)
        return [image["filename"] for image in entry["outputs"]["3"]["images"]]

    notes.append(f"new run (different color) -> {await save(0x010101)}")
    notes.append(f"batch of 2 -> {await save(0x020202, batch=2)}")
    newest = await save(0x030303)
    notes.append(f"next -> {newest}")
    body = {"filename": newest[0], "subfolder": "lab", "type": "output"}
    async with replay.http.post(f"{replay.sim.url}/lab/delete_output", json=body) as r:
        assert await r.json() == {"deleted": True}
    notes.append(f"after deleting {newest[0]} next run -> {await save(0x040404)}")
    assert notes == (FIXTURES / "counter_reuse_after_delete.txt").read_text().splitlines()


@scenario(
    "ws_progress_text_type3_submitter.jsonl",
    "ws_progress_text_type3_other_client.jsonl",
    "ws_progress_text_type3_http.json",
)
async def progress_text(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    records = fixture("ws_progress_text_type3_http.json")
    other_name = "ws_progress_text_type3_other_client.jsonl"
    other_frames = recorded_frames(other_name)
    async with lab_server(tmp_path, "lab", http) as replay:
        submitter = await replay.socket(records[0]["request_json"]["client_id"])
        other = await replay.socket(other_frames[0]["data"]["sid"])
        await run_prompt(replay, records[0], submitter)
        await replay.history(records[1])
        await other.until_count(len(other_frames))
        same_frames(await submitter.close(), "ws_progress_text_type3_submitter.jsonl", replay.root)
        same_frames(await other.close(), other_name, replay.root)


def work_done(step: JSON) -> Counter[str]:
    """The classes of the nodes that ran. (Which of two identical nodes runs, and in which
    order ready nodes run, is ComfyUI's scheduling, not its cache.)"""
    return Counter(step["prompt"][node]["class_type"] for node in step["ran"])


@scenario("cache_probes.json")
async def cache_between_prompts(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Per cache option (classic, `--cache-lru 4`, `--cache-none`), a series recorded on a
    real server started with it: the simulator started with the same option serves the same
    nodes from its cache (`execution_cached`, partial graphs included) and runs the same work.
    Recorded by tests/cache_probes.py with the simulator's nodes loaded into ComfyUI."""
    for kind, series in fixture("cache_probes.json").items():
        policy = CachePolicy.from_argv(series["argv"])
        assert policy.kind == kind
        sim = SimulatedComfyUI(data_dir=tmp_path / kind, cache=policy)
        await sim.start()
        try:
            async with http.get(f"{sim.url}/system_stats") as response:
                argv = (await response.json())["system"]["argv"]
            assert CachePolicy.from_argv(argv) == policy
            async with http.ws_connect(f"{sim.url}/ws?clientId=replay") as ws:
                for index, recorded in enumerate(series["steps"]):
                    step = {key: recorded[key] for key in ("prompt", "upload", "color", "free")
                            if key in recorded}
                    seen = await run_probe(http, sim.url, ws, "replay", step)
                    if "prompt" in step:
                        where = f"{kind} step {index}"
                        assert seen["outcome"] == recorded["outcome"], where
                        assert seen["cached"] == recorded["cached"], where
                        assert work_done(seen) == work_done(recorded), where
        finally:
            await sim.stop()


@scenario("object_info_modelfree_subset.json", "object_info_full.json")
async def object_info(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Every node the simulator offers is specified as ComfyUI 0.3.64 specifies it."""
    subset = fixture("object_info_modelfree_subset.json")
    full = fixture("object_info_full.json")
    async with (
        lab_server(tmp_path, "lab", http) as replay,
        http.get(f"{replay.sim.url}/object_info") as response,
    ):
        info = await response.json()
    lab_nodes = {name for name, spec in subset.items() if spec["category"] == "lab"}
    simulated = {"SimulatedWork", "SimulatedLoader"}  # the simulator's own nodes
    assert set(info) == (set(subset) - lab_nodes) | {"PreviewAny"} | simulated
    for name, spec in info.items():
        if name in ("LoadImage", "LoadImageMask"):
            # The combo lists the input directory: the lab's files there, none here.
            spec["input"]["required"]["image"][0] = full[name]["input"]["required"]["image"][0]
        if name not in simulated:
            assert spec == full[name], name


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCENARIOS))
async def test_replay(name: str, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    await SCENARIOS[name][1](tmp_path, http)


def test_every_recording_is_replayed() -> None:
    """Each file of the recordings (sessions, their ids, the served PNG, the node specs) is
    used by a scenario."""
    replayed = {file for files, _ in SCENARIOS.values() for file in files}
    assert replayed == {path.name for path in FIXTURES.iterdir()}
