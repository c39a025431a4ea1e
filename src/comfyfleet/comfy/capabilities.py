"""What a backend can run, from its `/object_info`: node classes, and the values its combo
inputs accept (model files for loader nodes, samplers, ...)."""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from comfyfleet import json_codec
from comfyfleet.comfy.object_info import InputSpec, hidden_inputs, node_inputs


def _combo_options(spec: InputSpec) -> frozenset[str] | None:
    """The accepted values of a combo input, or None if the input is not a checked combo.
    Inputs filled by uploads (`image_upload`) or fetched at run time (`remote`) are not
    checked: their options depend on files the job itself brings."""
    if spec.kind != "COMBO" or spec.config.get("image_upload") or spec.config.get("remote"):
        return None
    if not isinstance(spec.options, list):
        return None
    return frozenset(str(option) for option in spec.options)


def _numeric_range(spec: InputSpec) -> tuple[float | None, float | None] | None:
    if spec.kind not in ("INT", "FLOAT"):
        return None
    low, high = spec.config.get("min"), spec.config.get("max")
    return (low if isinstance(low, int | float) else None,
            high if isinstance(high, int | float) else None)


def _has_unique_id(hidden: Mapping[str, Any]) -> bool:
    """Whether a node's hidden inputs include UNIQUE_ID (some specs wrap kinds in a list)."""
    return any(kind == "UNIQUE_ID" or kind == ["UNIQUE_ID"] for kind in hidden.values())


@dataclass(frozen=True)
class NodeSpec:
    """What a node class takes and gives: the checks ComfyUI makes of a prompt before it
    queues it (required inputs present, links to an output the source node has)."""

    # input name -> declared type ("IMAGE", "INT", ...; "COMBO" for a list of choices)
    input_types: dict[str, str]
    required: frozenset[str]
    output_types: tuple[str, ...]
    output_node: bool

    @classmethod
    def from_object_info(cls, node: dict[str, Any]) -> NodeSpec:
        inputs = list(node_inputs(node))
        outputs = node.get("output") or []
        return cls(
            # An input of no declared type is taken for a combo.
            input_types={name: spec.kind or "COMBO" for name, spec, _ in inputs},
            required=frozenset(name for name, _, required in inputs if required),
            output_types=tuple(str(output) for output in outputs),
            output_node=node.get("output_node") is True,
        )


@dataclass(frozen=True)
class Capabilities:
    node_classes: frozenset[str] = frozenset()
    # (class, input name) -> accepted values, for combo inputs
    combos: dict[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    # (class, input name) -> (min, max), for INT and FLOAT inputs
    ranges: dict[tuple[str, str], tuple[float | None, float | None]] = field(
        default_factory=dict)
    nodes: dict[str, NodeSpec] = field(default_factory=dict)
    # Classes with a hidden UNIQUE_ID input: ComfyUI puts the node id into their cache key.
    keyed_by_id: frozenset[str] = frozenset()

    @classmethod
    def from_object_info(cls, info: dict[str, Any]) -> Capabilities:
        nodes = {class_name: NodeSpec.from_object_info(node)
                 for class_name, node in info.items() if isinstance(node, dict)}
        combos: dict[tuple[str, str], frozenset[str]] = {}
        ranges: dict[tuple[str, str], tuple[float | None, float | None]] = {}
        keyed_by_id: set[str] = set()
        for class_name, node in info.items():
            if _has_unique_id(hidden_inputs(node)):
                keyed_by_id.add(class_name)
            for input_name, spec, _ in node_inputs(node):
                options = _combo_options(spec)
                if options is not None:
                    combos[(class_name, input_name)] = options
                bounds = _numeric_range(spec)
                if bounds is not None:
                    ranges[(class_name, input_name)] = bounds
        return cls(frozenset(info), combos, ranges, nodes, frozenset(keyed_by_id))

    @classmethod
    def shared(cls, info: dict[str, Any]) -> Capabilities:
        """`from_object_info`, the very object made of an /object_info alike (the same JSON)
        while any backend holds it: placement keeps whether a job runs on a backend by the
        capabilities' identity (dispatcher.HeadJob), and in a fleet of like servers each job
        near the backlog's head was walked once per backend."""
        digest = hashlib.sha256(json_codec.dumps(info)).digest()
        capabilities = _SHARED.get(digest)
        if capabilities is None:
            capabilities = _SHARED[digest] = cls.from_object_info(info)
        return capabilities

    def missing(self, prompt: dict[str, Any]) -> list[str]:
        """What this backend lacks to run `prompt`, in words an operator can act on."""
        return sorted(set(self._lacking(prompt)))

    def _lacking(self, prompt: dict[str, Any]) -> Iterator[str]:
        for node in prompt.values():
            class_name = node.get("class_type")
            if class_name not in self.node_classes:
                yield f"node class {class_name}"
                continue
            for input_name, value in (node.get("inputs") or {}).items():
                options = self.combos.get((class_name, input_name))
                if options is not None and isinstance(value, str) and value not in options:
                    yield f"{class_name}.{input_name} = {value}"

    def out_of_range(self, prompt: dict[str, Any]) -> list[str]:
        """Numbers outside the range the node itself declares (ComfyUI would reject them)."""
        problems: list[str] = []
        for node in prompt.values():
            class_name = node.get("class_type")
            for input_name, value in (node.get("inputs") or {}).items():
                bounds = self.ranges.get((class_name, input_name))
                if bounds is None or isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                low, high = bounds
                if low is not None and value < low:
                    problems.append(f"{class_name}.{input_name} = {value} (min {low})")
                elif high is not None and value > high:
                    problems.append(f"{class_name}.{input_name} = {value} (max {high})")
        return sorted(set(problems))

    def can_run(self, prompt: dict[str, Any]) -> bool:
        # At the first thing lacking: the dispatcher asks for every job it reads, on every
        # backend it weighs.
        return next(self._lacking(prompt), None) is None

    def summary(self) -> dict[str, int]:
        return {"node_classes": len(self.node_classes), "combo_inputs": len(self.combos)}


# The capabilities made by `Capabilities.shared`, by their /object_info's digest.
_SHARED: weakref.WeakValueDictionary[bytes, Capabilities] = weakref.WeakValueDictionary()
