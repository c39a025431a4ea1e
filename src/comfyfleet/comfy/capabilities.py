"""What a backend can run, from its `/object_info`: node classes, and the values its combo
inputs accept (model files for loader nodes, samplers, ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _combo_options(spec: Any) -> frozenset[str] | None:
    """The accepted values of a combo input spec, or None if the input is not a checked combo.

    Two shapes exist: `[[options...], {...}]` and, for newer nodes, `["COMBO", {"options"}]`.
    Inputs filled by uploads (`image_upload`) or fetched at run time (`remote`) are not
    checked: their options depend on files the job itself brings.
    """
    if not isinstance(spec, list) or not spec:
        return None
    config = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if config.get("image_upload") or config.get("remote"):
        return None
    if isinstance(spec[0], list):
        options: Any = spec[0]
    elif spec[0] == "COMBO":
        options = config.get("options")
    else:
        return None
    if not isinstance(options, list):
        return None
    return frozenset(str(option) for option in options)


def _numeric_range(spec: Any) -> tuple[float | None, float | None] | None:
    if not isinstance(spec, list) or len(spec) < 2 or spec[0] not in ("INT", "FLOAT"):
        return None
    config = spec[1] if isinstance(spec[1], dict) else {}
    low, high = config.get("min"), config.get("max")
    return (low if isinstance(low, int | float) else None,
            high if isinstance(high, int | float) else None)


def _has_unique_id(hidden: Any) -> bool:
    """Whether a spec's hidden inputs include UNIQUE_ID (some specs wrap kinds in a list)."""
    if not isinstance(hidden, dict):
        return False
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
        inputs = node.get("input") or {}
        types: dict[str, str] = {}
        for section in ("required", "optional"):
            for name, spec in (inputs.get(section) or {}).items():
                declared = spec[0] if isinstance(spec, list) and spec else None
                types[name] = declared if isinstance(declared, str) else "COMBO"
        outputs = node.get("output") or []
        return cls(
            input_types=types,
            required=frozenset(inputs.get("required") or {}),
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
            inputs = node.get("input", {}) if isinstance(node, dict) else {}
            if _has_unique_id(inputs.get("hidden")):
                keyed_by_id.add(class_name)
            for section in ("required", "optional"):
                for input_name, spec in (inputs.get(section) or {}).items():
                    options = _combo_options(spec)
                    if options is not None:
                        combos[(class_name, input_name)] = options
                    bounds = _numeric_range(spec)
                    if bounds is not None:
                        ranges[(class_name, input_name)] = bounds
        return cls(frozenset(info), combos, ranges, nodes, frozenset(keyed_by_id))

    def missing(self, prompt: dict[str, Any]) -> list[str]:
        """What this backend lacks to run `prompt`, in words an operator can act on."""
        lacking: list[str] = []
        for node in prompt.values():
            class_name = node.get("class_type")
            if class_name not in self.node_classes:
                lacking.append(f"node class {class_name}")
                continue
            for input_name, value in (node.get("inputs") or {}).items():
                options = self.combos.get((class_name, input_name))
                if options is not None and isinstance(value, str) and value not in options:
                    lacking.append(f"{class_name}.{input_name} = {value}")
        return sorted(set(lacking))

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
        return not self.missing(prompt)

    def summary(self) -> dict[str, int]:
        return {"node_classes": len(self.node_classes), "combo_inputs": len(self.combos)}
