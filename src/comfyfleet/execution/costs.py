"""What the nodes of a prompt cost to run, learned from the websocket's `executing` events.

A node runs from its `executing` event to the next node's (or the prompt's end). Costs are
kept per backend and cache key (this loader with this model on this GPU), with the median of
the class across the fleet, divided by the backend's speed, standing in for a key not yet seen
there: run times are heavy-tailed, and one slow outlier must not move an estimate much. A
backend's speed is the sum, over the classes it has run, of each class's median across the
fleet over the sum of its medians there (2.0: twice as fast): medians, so one odd run does not
move it, summed, so the nodes that take time weigh and the millisecond ones do not. Those
medians are taken over many more runs than a key's: one class runs for very different times
with different inputs (a sampler's steps, a video's frames), and the median of a backend's
last few runs of it says more about which prompts it happened to get than about its GPU (of
nine runs of log-normal lengths, sigma 1, a backend's median is off by a factor of 1.5 one
time in three: bench/RESULTS.md, the tail of a batch). Until a class has run anywhere, a node
that names a model file (a loader) counts as a load.

Around its nodes every prompt costs a round trip through this service and the backend (the
POST, the websocket's events, the handover from the prompt before it): tens of milliseconds
that no node's time shows, and nearly all of a zero-duration prompt's time. A backend's
overhead per prompt is the median, over its recent prompts, of the time each held it (from its
dispatch, or the end of the prompt before it there, to its end) less what its nodes took.

A guess is measured only where the node runs. A class that some backend served from its cache
but that never ran anywhere (its results were there before this process began following that
backend: another client's prompts, a restart of ours) keeps its guess for as long as no backend
thought not to hold it runs one: placement may try one (`tried`) to find out.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import OrderedDict, defaultdict, deque
from collections.abc import Mapping, Set
from typing import Any

from comfyfleet.execution.warm import held_node

# Samples kept per (backend, key): recent enough to follow a change.
COST_SAMPLES = 9
# Samples kept per class, across the fleet and per backend, for the class's cost where a key
# has no samples of its own and for the backend's speed: enough that the prompts a backend
# happened to get do not decide its speed, few enough to follow a GPU that slows down.
CLASS_SAMPLES = 101
# A node of a class never seen running: until its first run, a fresh fleet still prefers
# the job with fewer nodes to run (its model's loader cached) to one with more.
UNSEEN_NODE_SECONDS = 1.0
# A node naming a model file (a loader) of a class never seen running: loading a checkpoint
# takes seconds. Counted as cheap as any node, a load looked worth it in a fleet's first
# seconds, before the first load had ended, and GPUs took on models they then reloaded.
UNSEEN_LOAD_SECONDS = 5.0
# Overheads kept per backend, and across the fleet (for a backend with none yet).
OVERHEAD_SAMPLES = 15
# A backend whose nodes took less than this in all has not run enough to tell its speed.
MIN_NODE_SECONDS = 1e-3
# Keys whose estimates are kept per backend: those of the jobs near the backlog's head, and
# more (started afresh past it: the head moves on, leaving its keys behind).
ESTIMATES_KEPT = 4096
# (Backend, key) pairs whose samples are kept, the least recently recorded going first: most
# keys never come again (a node downstream of a prompt's own seed, text or image; an output
# node's, keyed by its prompt's own filename prefix, is not kept at all: `record`'s `own`),
# and each kept costs about a kilobyte. The loaders' keys, which do come again, are recorded
# again and stay.
KEYS_KEPT = 16384


class Samples:
    """The latest `size` samples, kept sorted beside the order they came in: their median is
    read at every pick after a prompt ended (every node's sample moves its class's), and
    statistics.median sorted 101 of them again each time (5 us, a tenth of a pick's CPU)."""

    __slots__ = ("_recent", "_sorted")

    def __init__(self, size: int) -> None:
        self._recent: deque[float] = deque(maxlen=size)
        self._sorted: list[float] = []

    def append(self, seconds: float) -> None:
        if len(self._recent) == self._recent.maxlen:
            del self._sorted[bisect_left(self._sorted, self._recent[0])]
        self._recent.append(seconds)
        insort(self._sorted, seconds)

    def median(self) -> float:
        """statistics.median of the samples, to the bit (the mean of the middle two of an
        even number); ValueError when there are none, as it raises StatisticsError, one."""
        ordered, middle = self._sorted, len(self._sorted) // 2
        if not ordered:
            raise ValueError("no samples")
        if len(ordered) % 2:
            return ordered[middle]
        return (ordered[middle - 1] + ordered[middle]) / 2

    def __len__(self) -> int:
        return len(self._recent)


class NodeCosts:
    def __init__(self) -> None:
        self._by_key: OrderedDict[tuple[str, str], Samples] = OrderedDict()
        self._by_class: dict[str, Samples] = defaultdict(lambda: Samples(CLASS_SAMPLES))
        self._by_backend_class: dict[str, dict[str, Samples]] = defaultdict(
            lambda: defaultdict(lambda: Samples(CLASS_SAMPLES)))
        # The medians of those, each worked out again only after a new sample of its own.
        self._class_medians: dict[str, float] = {}
        self._backend_class_medians: dict[tuple[str, str], float] = {}
        self._speeds: dict[str, float] = {}  # worked out again after each new sample
        self._served: set[str] = set()  # classes a backend's cache served, run or not
        # How each node is estimated on each backend, by (backend, tried) and cache key
        # (`_estimate`): placement weighs every job near the backlog's head on every backend
        # it asks at every claim. Its seconds when they are the key's own (its median there,
        # or a guess); else its class, whose estimate there (`_class_seconds`) moves with
        # every sample the fleet records, and is worked out again once per class then.
        self._estimates: dict[tuple[str, bool], dict[str, float | str]] = {}
        self._class_seconds: dict[str, dict[str, float]] = {}  # by backend, then class
        self._overheads: dict[str, Samples] = defaultdict(lambda: Samples(OVERHEAD_SAMPLES))
        self._fleet_overheads = Samples(OVERHEAD_SAMPLES)
        # The medians of those, by backend (None: the fleet's), until the next sample.
        self._overhead_medians: dict[str | None, float] = {}

    def record(self, backend: str, key: str, class_type: str, seconds: float, *,
               own: bool = False) -> None:
        """A node of `class_type` ran `seconds` there, under cache key `key`; `own`: a key no
        other prompt has, whose samples nobody would read: its class's take the sample."""
        if class_type not in self._by_class:
            self._estimates.clear()  # its nodes' guesses give way to its class's estimate
        if not own:
            self._key_samples(backend, key).append(seconds)
        self._by_class[class_type].append(seconds)
        self._by_backend_class[backend][class_type].append(seconds)
        self._class_medians.pop(class_type, None)
        self._backend_class_medians.pop((backend, class_type), None)
        self._speeds.clear()
        self._class_seconds.clear()
        for tried in (False, True):
            self._estimates.get((backend, tried), {}).pop(key, None)

    def _key_samples(self, backend: str, key: str) -> Samples:
        """The samples of `key` there, made if it has none: the most recently recorded now.
        Beyond KEYS_KEPT, the least recently recorded key's go, and its estimates with them."""
        samples = self._by_key.get((backend, key))
        if samples is not None:
            self._by_key.move_to_end((backend, key))
            return samples
        samples = self._by_key[(backend, key)] = Samples(COST_SAMPLES)
        if len(self._by_key) > KEYS_KEPT:
            (gone_from, gone), _ = self._by_key.popitem(last=False)
            for tried in (False, True):
                self._estimates.get((gone_from, tried), {}).pop(gone, None)
        return samples

    def served(self, class_type: str) -> None:
        """A backend served a node of `class_type` from its cache."""
        if class_type not in self._served:
            self._served.add(class_type)
            self._estimates.clear()  # a guess for a tried one is nothing now

    def record_overhead(self, backend: str, seconds: float) -> None:
        """A prompt held `backend` for `seconds` beyond what its nodes took."""
        self._overheads[backend].append(seconds)
        self._fleet_overheads.append(seconds)
        # Its own median moved, and the fleet's, which stands in for every backend with no
        # samples of its own; the others' stay (placement asks every backend's at every
        # claim that weighs them, and a prompt ends between two claims).
        for name in [name for name in self._overhead_medians
                     if name is None or name == backend or name not in self._overheads]:
            del self._overhead_medians[name]

    def overhead(self, backend: str | None = None) -> float:
        """Expected seconds a prompt holds the backend beyond its nodes (0 until one ran);
        without a backend, the fleet's."""
        median = self._overhead_medians.get(backend)
        if median is None:
            samples = self._overheads.get(backend) if backend is not None else None
            samples = samples or self._fleet_overheads
            median = self._overhead_medians[backend] = \
                samples.median() if samples else 0.0
        return median

    def cost(self, backend: str, key: str, class_type: str) -> float:
        """Expected seconds of one node there."""
        samples = self._by_key.get((backend, key))
        if samples:
            return samples.median()
        return self._class_cost(backend, class_type) \
            if class_type in self._by_class else UNSEEN_NODE_SECONDS

    def node_cost(self, backend: str, key: str, node: Mapping[str, Any], *,
                  tried: bool = False) -> float:
        """Expected seconds of the prompt's node `node` there, under cache key `key`; with
        `tried`, nothing for a node of a class served from a cache but never seen running
        (what trying a backend thought not to hold it would find out)."""
        estimate = self._estimate(backend, key, node, tried)
        return self._class_cost(backend, estimate) if isinstance(estimate, str) else estimate

    def _estimate(self, backend: str, key: str, node: Mapping[str, Any],
                  tried: bool) -> float | str:
        """`node_cost`, or the node's class when its class's estimate there is its cost."""
        samples = self._by_key.get((backend, key))
        if samples:
            return samples.median()
        class_type = str(node.get("class_type"))
        if class_type in self._by_class:
            return class_type
        if tried and class_type in self._served:
            return 0.0
        return UNSEEN_LOAD_SECONDS if held_node(node).model_files else UNSEEN_NODE_SECONDS

    def _class_cost(self, backend: str, class_type: str) -> float:
        """Expected seconds there of a node of `class_type` (seen running) whose key has no
        samples there: the fleet's median over the backend's speed."""
        known = self._class_seconds.setdefault(backend, {})
        seconds = known.get(class_type)
        if seconds is None:
            seconds = known[class_type] = self._class_median(class_type) / self.speed(backend)
        return seconds

    def speed(self, backend: str) -> float:
        """How fast the backend runs nodes against the fleet (1.0 until it has run some)."""
        speed = self._speeds.get(backend)
        if speed is None:
            classes = self._by_backend_class.get(backend, {})
            there = sum(self._backend_class_median(backend, class_type) for class_type in classes)
            fleet = sum(self._class_median(class_type) for class_type in classes)
            speed = self._speeds[backend] = fleet / there if there > MIN_NODE_SECONDS else 1.0
        return speed

    def _class_median(self, class_type: str) -> float:
        median = self._class_medians.get(class_type)
        if median is None:
            median = self._class_medians[class_type] = self._by_class[class_type].median()
        return median

    def _backend_class_median(self, backend: str, class_type: str) -> float:
        median = self._backend_class_medians.get((backend, class_type))
        if median is None:
            median = self._backend_class_medians[(backend, class_type)] = \
                self._by_backend_class[backend][class_type].median()
        return median

    def uncached_seconds(self, backend: str, prompt: Mapping[str, Any],
                         keys: Mapping[str, str], held: Set[str], *,
                         tried: bool = False) -> float:
        """What running `prompt` there costs beyond what its cache (holding `held`) serves
        (`tried`: see `node_cost`)."""
        known = self._estimates.get((backend, tried))
        if known is None or len(known) > ESTIMATES_KEPT:
            known = self._estimates[(backend, tried)] = {}
        # Looked up here, not through `_class_cost` (a call a node: placement weighs every
        # job near the backlog's head, at every claim).
        by_class = self._class_seconds.get(backend, {})
        # Added up in order, as sum() of them did on 3.11 (the same seconds to the bit).
        seconds = 0.0
        for node_id, key in keys.items():
            if key in held:
                continue
            # A key stands for the node's class and inputs (comfy/signatures.py): it is
            # estimated alike in every prompt.
            estimate = known.get(key)
            if estimate is None:
                estimate = known[key] = self._estimate(backend, key, prompt[node_id], tried)
            if isinstance(estimate, str):
                class_seconds = by_class.get(estimate)
                estimate = class_seconds if class_seconds is not None \
                    else self._class_cost(backend, estimate)
            seconds += estimate
        return seconds
