"""What the nodes of a prompt cost to run, learned from the websocket's `executing` events.

A node runs from its `executing` event to the next node's (or the prompt's end). Costs are
kept per backend and cache key (this loader with this model on this GPU), with the median of
the class across the fleet, divided by the backend's speed, standing in for a key not yet seen
there: run times are heavy-tailed, and one slow outlier must not move an estimate much. A
backend's speed is the sum, over the classes it has run, of each class's median across the
fleet over the sum of its medians there (2.0: twice as fast): medians, so one odd run does not
move it, summed, so the nodes that take time weigh and the millisecond ones do not. Until a
class has run anywhere, a node that names a model file (a loader) counts as a load.
"""

from __future__ import annotations

import statistics
from collections import defaultdict, deque
from collections.abc import Mapping, Set
from typing import Any

from comfyfleet.execution.warm import held_node

# Samples kept per (backend, key) and per class: recent enough to follow a change.
COST_SAMPLES = 9
# A node of a class never seen running: until its first run, a fresh fleet still prefers
# the job with fewer nodes to run (its model's loader cached) to one with more.
UNSEEN_NODE_SECONDS = 1.0
# A node naming a model file (a loader) of a class never seen running: loading a checkpoint
# takes seconds. Counted as cheap as any node, a load looked worth it in a fleet's first
# seconds, before the first load had ended, and GPUs took on models they then reloaded.
UNSEEN_LOAD_SECONDS = 5.0
# A backend whose nodes took less than this in all has not run enough to tell its speed.
MIN_NODE_SECONDS = 1e-3


class NodeCosts:
    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], deque[float]] = defaultdict(
            lambda: deque(maxlen=COST_SAMPLES))
        self._by_class: dict[str, deque[float]] = defaultdict(
            lambda: deque(maxlen=COST_SAMPLES))
        self._by_backend_class: dict[str, dict[str, deque[float]]] = defaultdict(
            lambda: defaultdict(lambda: deque(maxlen=COST_SAMPLES)))
        self._speeds: dict[str, float] = {}  # worked out again after each new sample

    def record(self, backend: str, key: str, class_type: str, seconds: float) -> None:
        self._by_key[(backend, key)].append(seconds)
        self._by_class[class_type].append(seconds)
        self._by_backend_class[backend][class_type].append(seconds)
        self._speeds.clear()

    def cost(self, backend: str, key: str, class_type: str) -> float:
        """Expected seconds of one node there."""
        samples = self._by_key.get((backend, key))
        if samples:
            return statistics.median(samples)
        samples = self._by_class.get(class_type)
        return statistics.median(samples) / self.speed(backend) if samples \
            else UNSEEN_NODE_SECONDS

    def node_cost(self, backend: str, key: str, node: Mapping[str, Any]) -> float:
        """Expected seconds of the prompt's node `node` there, under cache key `key`."""
        class_type = str(node.get("class_type"))
        if (backend, key) in self._by_key or class_type in self._by_class:
            return self.cost(backend, key, class_type)
        return UNSEEN_LOAD_SECONDS if held_node(node).model_files else UNSEEN_NODE_SECONDS

    def speed(self, backend: str) -> float:
        """How fast the backend runs nodes against the fleet (1.0 until it has run some)."""
        speed = self._speeds.get(backend)
        if speed is None:
            classes = self._by_backend_class.get(backend, {})
            there = sum(statistics.median(samples) for samples in classes.values())
            fleet = sum(statistics.median(self._by_class[class_type]) for class_type in classes)
            speed = self._speeds[backend] = fleet / there if there > MIN_NODE_SECONDS else 1.0
        return speed

    def uncached_seconds(self, backend: str, prompt: Mapping[str, Any],
                         keys: Mapping[str, str], held: Set[str]) -> float:
        """What running `prompt` there costs beyond what its cache (holding `held`) serves."""
        return sum(self.node_cost(backend, key, prompt[node_id])
                   for node_id, key in keys.items() if key not in held)
