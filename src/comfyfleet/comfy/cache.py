"""Which node results a ComfyUI 0.3.64 server keeps between prompts, by cache key.

The simulator keeps node outputs in it; the gateway keeps, per backend, what it believes that
backend holds. The rules are ComfyUI's (execution.py CacheSet, comfy_execution/caching.py),
chosen by its command line (main.py):
- classic (the default): at the start of every prompt, every result whose key is not a key of
  one of that prompt's nodes is dropped; whatever the prompt runs is added. So after a prompt,
  the server holds the results of that prompt's nodes that were cached or ran.
- `--cache-lru N` (N > 0): each prompt is a generation; at its start its nodes' keys are
  marked used in it, then, while more than N results are held, whole generations are dropped,
  oldest first, never the current one. A prompt can grow the cache past N until the next
  prompt starts.
- `--cache-none`: everything is dropped at the start of every prompt.
- `POST /free {"free_memory": true}` drops everything (all generations too).
A result whose key can never match (a node whose IS_CHANGED is NaN or the time) still takes
a place: callers give it a key of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

V = TypeVar("V")

CacheKind = Literal["classic", "lru", "none"]


@dataclass(frozen=True)
class CachePolicy:
    kind: CacheKind = "classic"
    size: int = 0  # results held before older generations go (lru only)

    @classmethod
    def from_argv(cls, argv: Sequence[str]) -> CachePolicy:
        """The policy of a server started with `argv` (system_stats `argv`), read as main.py
        does: `--cache-lru N` with N > 0 wins, then `--cache-none`, else classic."""
        lru = 0
        none = False
        args = [str(arg) for arg in argv]
        for index, arg in enumerate(args):
            name, equals, value = arg.partition("=")
            if name == "--cache-lru":
                if not equals:
                    value = args[index + 1] if index + 1 < len(args) else ""
                try:
                    lru = int(value)
                except ValueError:
                    continue
            elif arg == "--cache-none":
                none = True
        if lru > 0:
            return cls("lru", lru)
        return cls("none") if none else cls()

    def argv(self) -> list[str]:
        """The command line options that select this policy."""
        if self.kind == "lru":
            return ["--cache-lru", str(self.size)]
        return ["--cache-none"] if self.kind == "none" else []

    def describe(self) -> str:
        return f"lru {self.size}" if self.kind == "lru" else self.kind


CLASSIC = CachePolicy()  # ComfyUI's default


class NodeCache(Generic[V]):
    """Results (of type V) by cache key, kept and dropped as the server's policy does."""

    def __init__(self, policy: CachePolicy) -> None:
        self.policy = policy
        self._results: dict[str, V] = {}
        self._used: dict[str, int] = {}  # lru: the generation that last used each result
        self._generation = 0
        self._oldest = 0  # lru: generations before this one are gone

    def start_prompt(self, keys: Iterable[str]) -> None:
        """A prompt with nodes of these keys starts: drop what the policy drops now."""
        if self.policy.kind == "none":
            self.clear()
        elif self.policy.kind == "classic":
            live = set(keys)
            self._results = {k: v for k, v in self._results.items() if k in live}
            # And their generations (`set` marks each): kept for good, they grew by every
            # key ever run (a prompt's output node's is its own), the gateway's model of every
            # backend too.
            self._used = {k: g for k, g in self._used.items() if k in live}
        else:
            self._generation += 1
            for key in keys:
                if key in self._results:
                    self._used[key] = self._generation
            while len(self._results) > self.policy.size and self._oldest < self._generation:
                self._oldest += 1
                for key in [k for k in self._results if self._used[k] < self._oldest]:
                    del self._results[key]
                    del self._used[key]

    def get(self, key: str) -> V | None:
        return self._results.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._results

    def set(self, key: str, result: V) -> None:
        self._results[key] = result
        self._used[key] = self._generation

    def discard(self, key: str) -> None:
        self._results.pop(key, None)
        self._used.pop(key, None)

    def clear(self) -> None:
        """POST /free with free_memory: a new, empty cache."""
        self._results.clear()
        self._used.clear()
        self._generation = self._oldest = 0

    def copy(self) -> NodeCache[V]:
        twin: NodeCache[V] = NodeCache(self.policy)
        twin._results, twin._used = dict(self._results), dict(self._used)
        twin._generation, twin._oldest = self._generation, self._oldest
        return twin

    def items(self) -> Iterator[tuple[str, V]]:
        return iter(list(self._results.items()))

    def __len__(self) -> int:
        return len(self._results)
