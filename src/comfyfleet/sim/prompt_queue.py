"""The prompt queue and the history, both in memory only (as in ComfyUI's PromptQueue)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from comfyfleet.sim.frames import status_frame
from comfyfleet.sim.hub import Hub

MAX_HISTORY = 10000
# The partner-node keys of extra_data, which ComfyUI 0.3.64 drops from a prompt's history
# entry (execution.py) but not from the queue.
SENSITIVE_EXTRA_DATA_KEYS = ("auth_token_comfy_org", "api_key_comfy_org")


@dataclass
class QueueItem:
    number: int | float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    @property
    def client_id(self) -> Any:
        """The websocket client that gets this prompt's events (None: nobody, or broadcast)."""
        return self.extra_data.get("client_id")

    def as_json(self) -> list[Any]:
        """As `/queue` shows it: the partner-node keys of extra_data too (ComfyUI 0.3.64 keeps
        them while the prompt waits and runs: its nodes read them)."""
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]

    def as_history_json(self) -> list[Any]:
        """As its history entry shows it: without the partner-node keys (task_done drops
        SENSITIVE_EXTRA_DATA_KEYS)."""
        extra_data = {key: value for key, value in self.extra_data.items()
                      if key not in SENSITIVE_EXTRA_DATA_KEYS}
        return [self.number, self.prompt_id, self.prompt, extra_data, self.outputs]


class PromptQueue:
    def __init__(self, hub: Hub) -> None:
        self._hub = hub
        # (number, prompt_id, arrival, item): ComfyUI's heap order, with the arrival count as a
        # final tie-break where ComfyUI would compare the prompt dicts (and crash).
        self._heap: list[tuple[int | float, str, int, QueueItem]] = []
        self._arrivals = itertools.count()
        self._wakeup = asyncio.Event()
        self.running: QueueItem | None = None
        # prompt_id -> the entry as JSON text, oldest first. Text because ten thousand entries
        # of nested dicts and lists made every full garbage collection walk ~200,000 objects
        # (0.2 s, the loop stalled). An OrderedDict because evicting the oldest entry of a plain
        # dict, as ComfyUI does, gets slower the more entries were evicted before.
        self.history: OrderedDict[str, str] = OrderedDict()

    def remaining(self) -> int:
        return len(self._heap) + (self.running is not None)

    def exec_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.remaining()}}

    def _changed(self) -> None:
        self._hub.send_frame(status_frame(self.remaining()), None)

    def put(self, item: QueueItem) -> None:
        heapq.heappush(self._heap, (item.number, item.prompt_id, next(self._arrivals), item))
        self._wakeup.set()
        self._changed()

    async def take(self) -> QueueItem:
        """Wait for the first pending prompt and make it the running one."""
        while not self._heap:
            self._wakeup.clear()
            await self._wakeup.wait()
        self.running = heapq.heappop(self._heap)[3]
        self._changed()
        return self.running

    def done(self, item: QueueItem, entry: dict[str, Any]) -> None:
        """Record the finished prompt's history entry and stop counting it as running."""
        self.running = None
        self.history[item.prompt_id] = json.dumps(entry)
        if len(self.history) > MAX_HISTORY:
            self.history.popitem(last=False)
        self._changed()

    def pending_json(self) -> list[list[Any]]:
        """Pending items in the heap's array order, which is not execution order (as in 0.3.64)."""
        return [entry[3].as_json() for entry in self._heap]

    def running_json(self) -> list[list[Any]]:
        return [] if self.running is None else [self.running.as_json()]

    def clear(self) -> None:
        if self._heap:
            self._heap.clear()
            self._changed()

    def delete(self, prompt_id: Any) -> None:
        """Remove the first pending item with this id, like ComfyUI's delete_queue_item."""
        for index, entry in enumerate(self._heap):
            if entry[1] == prompt_id:
                self._heap.pop(index)
                heapq.heapify(self._heap)
                self._changed()
                return

    def history_json(self, max_items: int | None, offset: int) -> str:
        """GET /history's body; paging ported as is (max_items alone means "the last N")."""
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        out: list[tuple[str, str]] = []
        for i, (prompt_id, entry) in enumerate(self.history.items()):
            if i >= offset:
                out.append((prompt_id, entry))
                if max_items is not None and len(out) >= max_items:
                    break
        return _json_object(out)

    def history_item_json(self, prompt_id: str) -> str:
        """GET /history/{prompt_id}'s body: `{}` for an unknown id."""
        entry = self.history.get(prompt_id)
        return _json_object([] if entry is None else [(prompt_id, entry)])


def _json_object(items: Iterable[tuple[str, str]]) -> str:
    """A JSON object of values that are JSON text already, written as json.dumps writes it."""
    return "{" + ", ".join(f"{json.dumps(key)}: {value}" for key, value in items) + "}"
