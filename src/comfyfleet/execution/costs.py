"""What the nodes of a prompt cost to run, learned from the websocket's `executing` events.

A node runs from its `executing` event to the next node's (or the prompt's end). Costs are
kept per backend and cache key (this loader with this model on this GPU), with the median of
the class across the fleet standing in for a key not yet seen there: run times are
heavy-tailed, and one slow outlier must not move an estimate much.
"""

from __future__ import annotations

import statistics
from collections import defaultdict, deque
from collections.abc import Mapping, Set
from typing import Any

# Samples kept per (backend, key) and per class: recent enough to follow a change.
COST_SAMPLES = 9
# A node of a class never seen running: until its first run, a fresh fleet still prefers
# the job with fewer nodes to run (its model's loader cached) to one with more.
UNSEEN_NODE_SECONDS = 1.0


class NodeCosts:
    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], deque[float]] = defaultdict(
            lambda: deque(maxlen=COST_SAMPLES))
        self._by_class: dict[str, deque[float]] = defaultdict(
            lambda: deque(maxlen=COST_SAMPLES))

    def record(self, backend: str, key: str, class_type: str, seconds: float) -> None:
        self._by_key[(backend, key)].append(seconds)
        self._by_class[class_type].append(seconds)

    def cost(self, backend: str, key: str, class_type: str) -> float:
        """Expected seconds of one node there."""
        samples = self._by_key.get((backend, key)) or self._by_class.get(class_type)
        return statistics.median(samples) if samples else UNSEEN_NODE_SECONDS

    def uncached_seconds(self, backend: str, prompt: Mapping[str, Any],
                         keys: Mapping[str, str], held: Set[str]) -> float:
        """What running `prompt` there costs beyond what its cache (holding `held`) serves."""
        return sum(self.cost(backend, key, str(prompt[node_id].get("class_type")))
                   for node_id, key in keys.items() if key not in held)
