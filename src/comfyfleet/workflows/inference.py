"""Parameter types from the fleet (DESIGN §3): a placeholder that is the whole value of a node
input takes that input's type, range and choices from the backends' `/object_info`; one inside
a longer string is a string.

Each backend's report is kept by name; where backends differ, a node class is described by the
first backend (in name order) that has it, and a combo takes any value one of them lists (the
job is then routed to a backend that has it). A class no backend has leaves the type unknown.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from comfyfleet.comfy.object_info import InputSpec, node_inputs
from comfyfleet.workflows.params import ParamSpec, ParamType, placeholders, whole_placeholder

NOT_KNOWN_YET = ("not known yet: no backend has reported its nodes (/object_info); "
                 "filled in when one connects")


@dataclass(frozen=True)
class InputType:
    """What a value for one node input must be."""

    type: ParamType
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] = ()


def _number(value: Any) -> float | None:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _combo(spec: InputSpec) -> InputType | None:
    config = spec.config
    if config.get("multiselect"):
        return None  # a list of values: nothing a placeholder's type can say
    if config.get("image_upload") and config.get("image_folder", "input") == "input":
        # LoadImage and the like: comfyfleet uploads the picture and names the file.
        return InputType("image")
    if any(config.get(key) for key in ("image_upload", "video_upload", "file_upload", "remote")):
        return InputType("string")  # a file on the backend: its list changes with the files
    return InputType("enum", choices=tuple(spec.options) if isinstance(spec.options, list)
                     else ())


def input_type(spec: InputSpec) -> InputType | None:
    """The value an input takes; None for inputs fed by a link (IMAGE, MODEL, ...) or taking
    anything else."""
    if spec.kind == "COMBO":
        return _combo(spec)
    if spec.kind in ("INT", "FLOAT"):
        config = spec.config
        return InputType("int" if spec.kind == "INT" else "float", _number(config.get("min")),
                         _number(config.get("max")), _number(config.get("step")))
    if spec.kind == "STRING":
        return InputType("string")
    if spec.kind == "BOOLEAN":
        return InputType("bool")
    return None


@dataclass(frozen=True)
class NodeInputs:
    """One backend's node classes, each input with the value it takes (None: a link)."""

    classes: Mapping[str, Mapping[str, InputType | None]]

    @classmethod
    def from_object_info(cls, info: dict[str, Any]) -> NodeInputs:
        return cls({class_name: {name: input_type(spec) for name, spec, _ in node_inputs(node)}
                    for class_name, node in info.items()})


@dataclass(frozen=True)
class NotKnown:
    """Why an input's type cannot be told."""

    reason: str


class FleetNodes:
    """What the fleet's backends have reported of their nodes, merged."""

    def __init__(self) -> None:
        self._reports: dict[str, NodeInputs] = {}
        self._in_order: list[NodeInputs] = []  # by backend name: looked up for every use

    def report(self, backend: str, inputs: NodeInputs) -> None:
        self._reports[backend] = inputs
        self._in_order = [report for _, report in sorted(self._reports.items())]

    def forget(self, backend: str) -> None:
        self._reports.pop(backend, None)
        self._in_order = [report for _, report in sorted(self._reports.items())]

    def input_type(self, class_type: str, input_name: str) -> InputType | NotKnown:
        if not self._in_order:
            return NotKnown(NOT_KNOWN_YET)
        having = (report.classes[class_type] for report in self._in_order
                  if class_type in report.classes)
        node = next(having, None)
        if node is None:
            return NotKnown(f"no backend has node class {class_type}")
        if input_name not in node:
            return NotKnown(f"{class_type} has no input {input_name}")
        first = node[input_name]
        if first is None:
            return NotKnown(f"{class_type}.{input_name} takes a link, not a value")
        if first.type != "enum":
            return first
        choices = dict.fromkeys(first.choices)
        for inputs in having:  # the other backends with this node
            other = inputs.get(input_name)
            if other is not None and other.type == "enum":
                choices.update(dict.fromkeys(other.choices))
        return replace(first, choices=tuple(choices))


@dataclass(frozen=True)
class NodeInput:
    """A placeholder that is the whole value of a node's input."""

    node_id: str
    class_type: str
    input_name: str


# Where a placeholder appears: a node input, "text" (inside a longer string) or "elsewhere"
# (the whole of a value that is no node input, e.g. in `_meta`).
Use = NodeInput | str


def _uses_in(value: Any, *, at_input: NodeInput | None) -> Iterator[tuple[str, Use]]:
    if isinstance(value, str):
        whole = whole_placeholder(value)
        if whole is not None:
            yield whole, at_input if at_input is not None else "elsewhere"
        else:
            for name in placeholders(value):
                yield name, "text"
    elif isinstance(value, dict | list):
        for item in value.values() if isinstance(value, dict) else value:
            yield from _uses_in(item, at_input=None)


def placeholder_uses(template: dict[str, Any]) -> dict[str, tuple[Use, ...]]:
    """Every placeholder of an API-format template, in order, with where it is used."""
    uses: dict[str, list[Use]] = {}
    for node_id, node in template.items():
        for key, value in node.items():
            if key == "inputs":
                for input_name, given in value.items():
                    site = NodeInput(node_id, node["class_type"], input_name)
                    for name, use in _uses_in(given, at_input=site):
                        uses.setdefault(name, []).append(use)
            else:
                for name, use in _uses_in(value, at_input=None):
                    uses.setdefault(name, []).append(use)
    return {name: tuple(found) for name, found in uses.items()}


def _combined(name: str, found: list[tuple[NodeInput, InputType]]) -> ParamSpec:
    """One type satisfying every input the parameter fills, or an untyped spec saying why not."""
    types = {kind.type for _, kind in found}
    where = ", ".join(f"{site.class_type}.{site.input_name} (node {site.node_id})"
                      for site, _ in found)
    if len(types) > 1 and types not in ({"int", "float"}, {"enum", "string"}):
        return ParamSpec(name, note=f"its inputs take different types: {where}")
    # An integer suits a FLOAT input too; a choice suits a STRING one.
    kind: ParamType = "int" if "int" in types else "enum" if "enum" in types else types.pop()
    lows = [t.minimum for _, t in found if t.minimum is not None]
    highs = [t.maximum for _, t in found if t.maximum is not None]
    steps = [t.step for _, t in found if t.step is not None and t.type == kind]
    choices: tuple[Any, ...] = ()
    for _, t in found:
        if t.type == "enum":
            choices = t.choices if not choices else tuple(c for c in choices if c in t.choices)
    return ParamSpec(name, type=kind, minimum=max(lows) if lows else None,
                     maximum=min(highs) if highs else None, step=steps[0] if steps else None,
                     choices=choices, source="object_info", note=f"from {where}")


def inferred_spec(name: str, uses: tuple[Use, ...], nodes: FleetNodes) -> ParamSpec:
    """The parameter as its uses in the template and the fleet's nodes describe it: required,
    with no default."""
    inputs = [use for use in uses if isinstance(use, NodeInput)]
    if not inputs:
        if uses and all(use == "text" for use in uses):
            return ParamSpec(name, type="string", source="template",
                             note="used inside a longer string")
        return ParamSpec(name, note="not the whole value of a node input" if uses
                         else "not used in the template")
    found: list[tuple[NodeInput, InputType]] = []
    reasons: list[str] = []
    for site in inputs:
        kind = nodes.input_type(site.class_type, site.input_name)
        if isinstance(kind, NotKnown):
            reasons.append(kind.reason)
        else:
            found.append((site, kind))
    if not found:
        return ParamSpec(name, note="; ".join(dict.fromkeys(reasons)))
    return _combined(name, found)
