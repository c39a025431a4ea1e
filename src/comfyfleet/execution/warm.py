"""What each backend holds in its node cache, as far as we can tell, and how sure we are.

After a prompt runs, a ComfyUI server holds the results of the nodes it ran or served from
cache (comfy/cache.py says which it keeps, by its `--cache-*` options from system_stats argv).
We follow our own prompts: at `execution_cached` the server names the nodes it served from
its cache, which both checks the prediction and corrects it (another client, another gateway
process or a `/free` may have changed the cache); every node that then runs is held.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence, Set
from typing import Any, NamedTuple

from comfyfleet.comfy.cache import CLASSIC, CachePolicy, NodeCache
from comfyfleet.comfy.signatures import (
    Parts,
    cache_keys,
    downstream,
    predicted_signatures,
)

# Extensions of the weight files ComfyUI's loaders list (folder_paths.supported_pt_extensions,
# and .gguf): literal inputs naming one tell an operator which models a backend holds.
MODEL_FILE_EXTENSIONS = (".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft",
                         ".gguf")


class HeldNode(NamedTuple):
    """A held result, readably: the node's class and the model files its inputs name. A
    tuple, not a frozen dataclass: a job's prompt makes one for each node it starts or runs,
    and a frozen dataclass sets each field through object.__setattr__."""

    class_type: str
    model_files: tuple[tuple[str, str], ...]  # (input name, file)


def held_node(node: Mapping[str, Any]) -> HeldNode:
    inputs = node.get("inputs")
    # Picked out in a loop (no generator), then sorted if any (a node names a model file or
    # two among its inputs, most none): a result held is one a node of every prompt started
    # or run.
    files = []
    if isinstance(inputs, dict | Mapping):  # a dict by its type, not the ABC's check
        for name, value in inputs.items():
            if isinstance(value, str) and value.lower().endswith(MODEL_FILE_EXTENSIONS):
                files.append((name, value))
    return HeldNode(str(node.get("class_type")), tuple(sorted(files)) if files else ())


class PromptKeys:
    """The cache keys of one prompt's nodes, computed once (a key that matches nothing must
    stay the same key while that prompt is followed)."""

    def __init__(self, prompt: Mapping[str, Any], keyed_by_id: frozenset[str],
                 signatures: Mapping[str, str | None] | None = None,
                 parts: Parts | None = None, changed: Set[str] = frozenset()) -> None:
        self.prompt = prompt
        self.keyed_by_id = keyed_by_id
        # Its nodes' parts of keys (immediate signatures and links), for `of_copy`'s nodes
        # not changed.
        self.parts: Parts = parts if parts is not None else {}
        self.signatures = dict(signatures) if signatures is not None \
            else predicted_signatures(prompt, keyed_by_id, parts=self.parts)
        # Fresh for each prompt followed: a key that matches nothing is its own.
        self.keys = cache_keys(self.signatures)
        # The nodes whose keys are not those of the prompt it is a copy of (`of_copy`): the
        # nodes changed and those downstream of them. None for a prompt keyed on its own.
        self.changed = changed

    @functools.cached_property
    def key_set(self) -> frozenset[str]:
        """Its keys: what a classic cache holds once it has run the prompt."""
        return frozenset(self.keys.values())

    def of_copy(self, copy: Mapping[str, Any], keyed_by_id: frozenset[str]) -> PromptKeys:
        """The keys of `copy`, this prompt with some nodes changed (as `isolate_outputs`
        changes the saving nodes): computed again only for the nodes changed and those
        downstream of them, the nodes not changed written as they were for this prompt. (A key
        costs a canonical encoding of the node and its ancestors and a hash: a job's prompt
        is keyed as the dispatcher weighs it, and again as it is sent.)"""
        if keyed_by_id != self.keyed_by_id or copy.keys() != self.prompt.keys():
            return PromptKeys(copy, keyed_by_id)
        # A node the copy did not change is most often the same object (isolate_outputs').
        edited = [node_id for node_id, node in copy.items()
                  if node is not (kept := self.prompt[node_id]) and node != kept]
        parts = self.parts.copy()
        for node_id in edited:
            parts.pop(node_id, None)
        changed = downstream(copy, edited, parts)
        return PromptKeys(copy, keyed_by_id, {
            **self.signatures,
            **predicted_signatures(copy, keyed_by_id, only=changed, parts=parts)},
            parts, changed)


class WarmCache:
    """One backend's node cache as we believe it to be."""

    def __init__(self, policy: CachePolicy = CLASSIC) -> None:
        self._held: NodeCache[HeldNode] = NodeCache(policy)
        # Its keys, made once between changes: placement asks what every backend holds at
        # every claim that weighs them.
        self._keys: frozenset[str] | None = None
        self.predictions = 0  # prompts whose execution_cached we checked
        self.mispredictions = 0  # of those, how many the server contradicted

    @property
    def policy(self) -> CachePolicy:
        return self._held.policy

    def reset(self, policy: CachePolicy) -> None:
        """A (re)connected server: it may have restarted, and then holds nothing."""
        self._held = NodeCache(policy)
        self._keys = None

    def cached_nodes(self, prompt: PromptKeys) -> set[str]:
        """The nodes of `prompt` the server would serve from its cache if it started it now."""
        return {node_id for node_id, key in prompt.keys.items() if key in self._held}

    def held_after(self, ahead: Sequence[PromptKeys]) -> frozenset[str]:
        """The keys it will hold once the prompts `ahead` (queued or running there, in order)
        have run: what a prompt queued now will find."""
        if self.policy.kind == "none":
            return frozenset()  # dropped as every prompt starts
        if not ahead:
            if self._keys is None:
                self._keys = frozenset(key for key, _ in self._held.items())
            return self._keys
        if self.policy.kind == "classic":
            return ahead[-1].key_set
        projected = self._held.copy()
        for prompt in ahead:
            projected.start_prompt(prompt.keys.values())
            for node_id, key in prompt.keys.items():
                projected.set(key, held_node(prompt.prompt[node_id]))
        return frozenset(key for key, _ in projected.items())

    def started(self, prompt: PromptKeys, reported: list[str]) -> bool:
        """The server started `prompt` and reported serving `reported` from its cache.
        Returns whether that was the prediction; either way, the server is believed."""
        predicted = self.cached_nodes(prompt)
        self._keys = None
        self._held.start_prompt(prompt.keys.values())
        served = set(reported)
        for node_id, key in prompt.keys.items():
            if node_id in served:
                self._held.set(key, held_node(prompt.prompt[node_id]))
            else:
                self._held.discard(key)
        self.predictions += 1
        right = predicted == served
        self.mispredictions += not right
        return right

    def ran(self, prompt: PromptKeys, node_id: str) -> None:
        """A node of `prompt` finished running: the server holds its result."""
        key = prompt.keys.get(node_id)
        if key is not None:
            self._keys = None
            self._held.set(key, held_node(prompt.prompt[node_id]))

    def describe(self) -> dict[str, Any]:
        """For GET /backends: the policy, how many results, the model files held."""
        models = sorted({
            f"{node.class_type}.{name}={file}"
            for _, node in self._held.items() for name, file in node.model_files
        })
        return {
            "policy": self.policy.describe(),
            "held_nodes": len(self._held),
            "models": models,
            "predictions": self.predictions,
            "mispredictions": self.mispredictions,
        }
