"""The worker: runs queued prompts one at a time and reports them like ComfyUI's execution.py.

Message order per prompt (protocol doc 5.3): execution_start, execution_cached, then for each
node progress_state(running), executing, [progress_state + progress]*, executed (UI nodes
only), progress_state(finished); then execution_success / execution_error /
execution_interrupted, the `status` broadcast and finally `executing {node: null}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from comfyfleet.comfy.cache import CachePolicy, NodeCache
from comfyfleet.comfy.signatures import (
    CHANGED_EVERY_RUN,
    NEVER_EQUAL,
    cache_keys,
    node_signatures,
)
from comfyfleet.sim.blocking import Disk
from comfyfleet.sim.faults import Faults
from comfyfleet.sim.files import Folders, file_sha256
from comfyfleet.sim.frames import preview_frame, preview_with_metadata_frame, progress_text_frame
from comfyfleet.sim.hub import Hub
from comfyfleet.sim.nodes import (
    IMAGE_FILE_NODES,
    UI,
    NodeContext,
    Outputs,
    declared_inputs,
    run_node,
)
from comfyfleet.sim.prompt_queue import PromptQueue, QueueItem
from comfyfleet.sim.validation import full_type_name

logger = logging.getLogger(__name__)

# The longest the worker keeps the event loop to itself when prompts need no waiting.
MAX_BUSY_SECONDS = 0.005


def now_ms() -> int:
    return int(time.time() * 1000)


class Interrupted(Exception):
    """POST /interrupt reached the running prompt."""


class OutOfMemoryError(RuntimeError):
    """The injected failure (Faults.fail_rate): what a GPU server reports most often."""

    # Named as torch names its error, so execution_error carries "torch.OutOfMemoryError".
    __module__ = "torch"

    def __init__(self) -> None:
        super().__init__(
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            "23.55 GiB of which 1.12 GiB is free. Of the allocated memory 21.73 GiB is "
            "allocated by PyTorch, and 311.52 MiB is reserved by PyTorch but unallocated."
        )
        # ComfyUI appends these tips to the message of an out-of-memory error.
        self.tips = (
            "This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow "
            "worked before you might have accidentally set the batch_size to a large number."
        )


class _NodeFailed(Exception):
    def __init__(self, node_id: str, error: Exception, current_inputs: dict[str, Any]) -> None:
        super().__init__(node_id)
        self.node_id = node_id
        self.error = error
        self.current_inputs = current_inputs


@dataclass(frozen=True)
class _CacheEntry:
    outputs: Outputs
    ui: UI


class Executor:
    def __init__(
        self,
        *,
        specs: dict[str, Any],
        folders: Folders,
        disk: Disk,
        hub: Hub,
        queue: PromptQueue,
        faults: Faults,
        speed: float,
        duration: float,
        cache: CachePolicy,
        load_seconds: float,
    ) -> None:
        self.specs = specs
        self.folders = folders
        self.disk = disk
        self.hub = hub
        self.queue = queue
        self.faults = faults
        self.speed = speed
        self.duration = duration
        self.load_seconds = load_seconds
        # Node outputs by cache key, kept as the server's --cache-* options say.
        self.cache: NodeCache[_CacheEntry] = NodeCache(cache)
        self.interrupted = asyncio.Event()
        self.free_requested = False
        self._current: _PromptRun | None = None

    def executing_node(self, client_id: str) -> str | None:
        """The node the running prompt of this client is executing, for a reconnecting socket."""
        run = self._current
        return run.last_node if run is not None and run.client_id == client_id else None

    async def run(self) -> None:
        """The worker loop; runs until cancelled."""
        loop = asyncio.get_running_loop()
        busy = 0.0  # seconds spent running prompts since the last yield below
        while True:
            item = await self.queue.take()
            started = loop.time()
            run = self._current = _PromptRun(self, item)
            try:
                entry = await run.execute()
            except Exception:
                # A simulator bug must not kill the worker and leave every later prompt queued.
                logger.exception("prompt %s crashed the simulator", item.prompt_id)
                entry = run.history_entry(success=False)
            finally:
                self._current = None
            self.queue.done(item, entry)
            if item.client_id is not None:
                executing = {"node": None, "prompt_id": item.prompt_id}
                self.hub.send_to(item.client_id, "executing", executing)
            # A zero-duration prompt with small images never waits for anything, so a long
            # queue would run to its end before a single request or frame got through. Not after
            # every prompt, though: a write per prompt took 40% more CPU time in the simulator
            # and 70% more in its client than writing the frames of several prompts at once.
            busy += loop.time() - started
            if busy > MAX_BUSY_SECONDS:
                busy = 0.0
                await asyncio.sleep(0)

    async def sleep(self, seconds: float) -> None:
        """Sleep, waking early on an interrupt (the caller then notices it at its next check)."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self.interrupted.wait()

    def check_interrupt(self) -> None:
        if self.interrupted.is_set():
            raise Interrupted

    async def signatures(self, prompt: dict[str, Any]) -> dict[str, str]:
        """The cache key of every node (comfy/signatures.py), with the IS_CHANGED values of
        the nodes that have one: a file's hash, or the time (never equal)."""
        changed: dict[str, object] = {}
        for node_id, node in prompt.items():
            if node["class_type"] in IMAGE_FILE_NODES:
                changed[node_id] = await self._image_fingerprint(node)
            elif node["class_type"] in CHANGED_EVERY_RUN:
                changed[node_id] = NEVER_EQUAL

        def is_changed(node_id: str, node: Mapping[str, Any]) -> object:
            return changed.get(node_id, False)

        def keyed_by_id(class_type: str) -> bool:
            # Nodes that see their own id are never shared.
            return "UNIQUE_ID" in _hidden_kinds(self.specs[class_type]).values()

        return cache_keys(node_signatures(prompt, is_changed=is_changed, keyed_by_id=keyed_by_id))

    async def _image_fingerprint(self, node: dict[str, Any]) -> object:
        """LoadImage's IS_CHANGED: the file's hash, so a changed file re-runs the node."""
        path = self.folders.image_input_path(str(_inputs_of(node).get("image")))
        try:
            if path is not None:
                size = await self.disk.run(0, os.path.getsize, path)
                return [await self.disk.run(size, file_sha256, path)]
        except OSError:
            pass
        # ComfyUI stores NaN when IS_CHANGED fails: it never equals itself.
        return NEVER_EQUAL


class _PromptRun:
    """One execution of one queue item."""

    def __init__(self, executor: Executor, item: QueueItem) -> None:
        self.ex = executor
        self.item = item
        self.prompt = item.prompt
        self.prompt_id = item.prompt_id
        self.client_id = item.client_id
        self.messages: list[list[Any]] = []  # the execution_* messages, for history
        self.signatures: dict[str, str] = {}
        self.results: dict[str, Outputs] = {}
        self.executed: list[str] = []
        self.progress: dict[str, dict[str, Any]] = {}
        self.last_node: str | None = None
        self.fail_at: str | None = None  # the node where an injected failure strikes

    async def execute(self) -> dict[str, Any]:
        ex = self.ex
        ex.interrupted.clear()  # an interrupt only ever stops the prompt it arrived during
        if ex.free_requested:
            ex.cache.clear()
            ex.free_requested = False
        self.message("execution_start", {"prompt_id": self.prompt_id}, broadcast=False)
        self.signatures = await ex.signatures(self.prompt)
        ex.cache.start_prompt(self.signatures.values())
        cached = [n for n in self.prompt if self.signatures[n] in ex.cache]
        for node_id in cached:
            self.results[node_id] = self._cached(node_id).outputs
        cached_data = {"nodes": cached, "prompt_id": self.prompt_id}
        self.message("execution_cached", cached_data, broadcast=False)

        order = self._plan(lambda n: self.signatures[n] in ex.cache)
        wait_before = self._duration_node(order, cached)
        if ex.faults.draw_failure():
            self.fail_at = self._failing_node(order)
        node_id = ""
        try:
            for node_id in order:
                if node_id == wait_before:
                    await ex.sleep(ex.duration / ex.speed)
                await self._run_node(node_id)
        except Interrupted:
            self.message("execution_interrupted", self._failure(node_id), broadcast=True)
            return self.history_entry(success=False)
        except _NodeFailed as failed:
            self.message("execution_error", self._error(failed), broadcast=False)
            return self.history_entry(success=False)
        self.message("execution_success", {"prompt_id": self.prompt_id}, broadcast=False)
        return self.history_entry(success=True)

    def _cached(self, node_id: str) -> _CacheEntry:
        entry = self.ex.cache.get(self.signatures[node_id])
        assert entry is not None
        return entry

    def _duration_node(self, order: list[str], cached: list[str]) -> str | None:
        """Where the server's `duration` is spent: before the first output node that really
        runs. Prompts with SimulatedWork take that node's time instead; cached ones take none."""
        if self.ex.duration <= 0:
            return None
        if any(node["class_type"] == "SimulatedWork" for node in self.prompt.values()):
            return None
        return next((n for n in order if n in self.item.outputs and n not in cached), None)

    def _failing_node(self, order: list[str]) -> str | None:
        """Where an injected failure strikes: SimulatedWork (the "sampler"), else the last node
        that computes something, else the first node that runs. None if everything is cached."""
        running = [n for n in order if self.signatures[n] not in self.ex.cache]
        kinds = {n: self.prompt[n]["class_type"] for n in running}
        work = [n for n in running if kinds[n] == "SimulatedWork"]
        computing = [n for n in running if n not in self.item.outputs]
        return next(iter(work or computing[-1:] or running), None)

    def _plan(self, is_cached: Callable[[str], bool]) -> list[str]:
        """Nodes to run, dependencies first: the outputs and what they need that is not cached."""
        order: list[str] = []
        seen: set[str] = set()

        def visit(node_id: str) -> None:
            if node_id in seen:
                return
            seen.add(node_id)
            node = self.prompt[node_id]
            declared = {name for name, _, _ in declared_inputs(self.ex.specs[node["class_type"]])}
            for name, value in node["inputs"].items():
                if name in declared and _is_link(value) and not is_cached(value[0]):
                    visit(value[0])
            order.append(node_id)

        for output in self.item.outputs:
            visit(output)
        return order

    async def _run_node(self, node_id: str) -> None:
        ex = self.ex
        node = self.prompt[node_id]
        class_type = node["class_type"]
        spec = ex.specs[class_type]
        cached = ex.cache.get(self.signatures[node_id])
        if cached is not None:
            # Cached (possibly by an identical node earlier in this prompt): re-report its UI,
            # with the old filenames, and write nothing.
            executed = {"node": node_id, "display_node": node_id, "output": cached.ui}
            self.to_client("executed", {**executed, "prompt_id": self.prompt_id})
            self.results[node_id] = cached.outputs
            self._finish_progress(node_id)
            return

        self._set_progress(node_id, 0.0, 1.0, "running")
        if self.client_id is not None:
            self.last_node = node_id
            executing = {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id}
            self.to_client("executing", executing)
        inputs = self._inputs(node, spec)
        ctx = NodeContext(
            node_id=node_id,
            folders=ex.folders,
            disk=ex.disk,
            prompt=self.prompt,
            extra_pnginfo=self.item.extra_data.get("extra_pnginfo"),
            speed=ex.speed,
            load_seconds=ex.load_seconds,
            output_size=ex.faults.output_size,
            sleep=ex.sleep,
            progress=lambda value, total, preview: self._report_progress(
                node_id, value, total, preview
            ),
            show_text=lambda text: ex.hub.send_frame(progress_text_frame(node_id, text), None),
        )
        try:
            ex.check_interrupt()
            if node_id == self.fail_at:
                raise OutOfMemoryError
            outputs, ui = await run_node(class_type, spec, ctx, inputs)
        except Interrupted:
            raise
        except Exception as error:
            current_inputs = self._current_inputs(node_id, spec, inputs)
            raise _NodeFailed(node_id, error, current_inputs) from error

        ui = ui or None
        if ui is not None:
            executed = {"node": node_id, "display_node": node_id, "output": ui}
            self.to_client("executed", {**executed, "prompt_id": self.prompt_id})
        ex.cache.set(self.signatures[node_id], _CacheEntry(outputs, ui))
        self.results[node_id] = outputs
        self.executed.append(node_id)
        self._finish_progress(node_id)

    def _inputs(self, node: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
        """Declared inputs with links replaced by the linked outputs (unknown keys dropped)."""
        declared = {name for name, _, _ in declared_inputs(spec)}
        return {
            name: self.results[value[0]][value[1]] if _is_link(value) else value
            for name, value in node["inputs"].items()
            if name in declared
        }

    def _current_inputs(
        self, node_id: str, spec: dict[str, Any], inputs: dict[str, Any]
    ) -> dict[str, Any]:
        """execution_error's current_inputs: each input (hidden ones too) as a 1-element list."""
        hidden_values = {
            "PROMPT": self.prompt,
            "EXTRA_PNGINFO": self.item.extra_data.get("extra_pnginfo"),
            "UNIQUE_ID": node_id,
        }
        values = dict(inputs)
        for name, kind in _hidden_kinds(spec).items():
            if kind in hidden_values:
                values[name] = hidden_values[kind]
        return {name: [_format_value(value)] for name, value in values.items()}

    # --- progress ----------------------------------------------------------------------------

    async def _report_progress(
        self, node_id: str, value: int, total: int, preview: bytes | None
    ) -> None:
        # As in ComfyUI's progress hook: the interrupt check comes first; a client that
        # negotiated preview metadata gets a type 4 preview before `progress`, anyone else a
        # type 1 preview after it (broadcast when the prompt has no client).
        self.ex.check_interrupt()
        self._set_progress(node_id, value, total, "running")
        with_metadata = self.ex.hub.supports_preview_metadata(self.client_id)
        if preview is not None and with_metadata:
            metadata = {
                "node_id": node_id,
                "prompt_id": self.prompt_id,
                "display_node_id": node_id,
                "parent_node_id": None,
                "real_node_id": node_id,
            }
            self.ex.hub.send_frame(preview_with_metadata_frame(preview, metadata), self.client_id)
        progress = {"value": value, "max": total, "prompt_id": self.prompt_id, "node": node_id}
        self._send("progress", progress, broadcast=True)
        if preview is not None and not with_metadata:
            self.ex.hub.send_frame(preview_frame(preview), self.client_id)

    def _finish_progress(self, node_id: str) -> None:
        # A node that never started (a cached one) finishes at 1 of 1, in ints as in ComfyUI.
        state = self.progress.get(node_id, {"max": 1})
        self._set_progress(node_id, state["max"], state["max"], "finished")

    def _set_progress(self, node_id: str, value: float, total: float, state: str) -> None:
        self.progress[node_id] = {
            "value": value,
            "max": total,
            "state": state,
            "node_id": node_id,
            "prompt_id": self.prompt_id,
            "display_node_id": node_id,
            "parent_node_id": None,
            "real_node_id": node_id,
        }
        snapshot = {"prompt_id": self.prompt_id, "nodes": self.progress}
        self._send("progress_state", snapshot, broadcast=True)

    # --- messages ----------------------------------------------------------------------------

    def _send(self, event: str, data: dict[str, Any], *, broadcast: bool) -> None:
        """To the prompt's client; without one, broadcast if `broadcast`, else drop."""
        if self.client_id is not None:
            self.ex.hub.send_to(self.client_id, event, data)
        elif broadcast:
            self.ex.hub.broadcast(event, data)

    def to_client(self, event: str, data: dict[str, Any]) -> None:
        self._send(event, data, broadcast=False)

    def message(self, event: str, data: dict[str, Any], *, broadcast: bool) -> None:
        """An execution_* message: timestamped, sent, and kept for the history entry."""
        data = {**data, "timestamp": now_ms()}
        self.messages.append([event, data])
        self._send(event, data, broadcast=broadcast)

    def _failure(self, node_id: str) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id,
            "node_id": node_id,
            "node_type": self.prompt[node_id]["class_type"],
            "executed": list(self.executed),
        }

    def _error(self, failed: _NodeFailed) -> dict[str, Any]:
        error = failed.error
        tips = getattr(error, "tips", "")
        return {
            **self._failure(failed.node_id),
            "exception_message": f"{error}\n{tips}",
            "exception_type": full_type_name(type(error)),
            "traceback": traceback.format_tb(error.__traceback__),
            "current_inputs": failed.current_inputs,
            "current_outputs": list(self.prompt),
        }

    def history_entry(self, *, success: bool) -> dict[str, Any]:
        """The /history entry: UI of every node of this prompt found in the cache."""
        outputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for node_id, signature in self.signatures.items():
            entry = self.ex.cache.get(signature)
            if entry is not None and entry.ui is not None:
                outputs[node_id] = entry.ui
                meta[node_id] = {
                    "node_id": node_id,
                    "display_node": node_id,
                    "parent_node": None,
                    "real_node_id": node_id,
                }
        status = {
            "status_str": "success" if success else "error",
            "completed": success,
            "messages": self.messages,
        }
        return {"prompt": self.item.as_history_json(), "outputs": outputs, "status": status,
                "meta": meta}


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2


def _inputs_of(node: dict[str, Any]) -> dict[str, Any]:
    """A node's inputs; nodes no output needs were never validated and may be malformed."""
    inputs = node.get("inputs")
    return inputs if isinstance(inputs, dict) else {}


def _hidden_kinds(spec: dict[str, Any]) -> dict[str, Any]:
    """Hidden inputs by name -> kind ("PROMPT", ...); some specs wrap the kind in a list."""
    hidden = spec["input"].get("hidden", {})
    return {name: kind[0] if isinstance(kind, list) else kind for name, kind in hidden.items()}


def _format_value(value: Any) -> Any:
    """ComfyUI's format_value: JSON scalars as they are, anything else as str()."""
    if value is None or isinstance(value, int | float | bool | str):
        return value
    return str(value)
