"""A client's own API-format graph (Comfy API v2 jobs), checked before it is accepted the way
ComfyUI checks a prompt before it queues it, against what the fleet's backends report in
`/object_info`. Every problem is named with its node, so a client can fix them all at once."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from comfyfleet.comfy.capabilities import Capabilities, NodeSpec
from comfyfleet.workflows.api_format import UI_FORMAT_HINT

ASSET_TYPE = "core/ASSET"

V = TypeVar("V")

# The shape label's JSON: the standard library's text, keys sorted at every level (labels
# already stored are its digests), by one encoder made once.
_SHAPE_JSON = json.JSONEncoder(sort_keys=True)


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one node; `field` is the input concerned, if any."""

    reason: str
    message: str
    field: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return {"field": self.field, "reason": self.reason, "message": self.message}


class UiFormatGraph(ValueError):
    """A UI-format export (with `nodes` and `links`) where an API-format graph belongs."""

    def __init__(self) -> None:
        super().__init__(UI_FORMAT_HINT)


class InvalidGraph(ValueError):
    """A graph no backend of the fleet would accept: per node, what is wrong."""

    def __init__(self, message: str, node_errors: dict[str, list[Problem]] | None = None,
                 **details: Any) -> None:
        super().__init__(message)
        self.node_errors = node_errors or {}
        self.details = details


def is_asset_reference(value: Any) -> bool:
    """`{"__type": "core/ASSET", "info": {...}}`, where a file name would otherwise go."""
    return isinstance(value, dict) and value.get("__type") == ASSET_TYPE


def check_graph(document: Any, fleet: Sequence[Capabilities]) -> dict[str, Any]:
    """The graph, if the fleet could run it; raises UiFormatGraph or InvalidGraph.

    `fleet` holds the capabilities of the backends known so far. With none known (no backend
    has answered yet) only the graph's own structure is checked, as for catalog jobs, which
    wait for a backend able to run them.
    """
    if not isinstance(document, dict):
        raise InvalidGraph("the workflow must be a JSON object mapping node ids to nodes")
    if "nodes" in document and "links" in document:
        raise UiFormatGraph()
    if not document:
        raise InvalidGraph("the workflow has no nodes")
    classes = _fleet_classes(fleet)
    errors: dict[str, list[Problem]] = {}
    for node_id, node in document.items():
        problems = _check_node(document, node, classes)
        if problems:
            errors[str(node_id)] = problems
    if errors:
        raise InvalidGraph(_summary(document, errors), errors)
    if classes is not None:
        _check_runnable(document, classes)
    return document


def shape_label(graph: dict[str, Any]) -> str:
    """`graph:<digest>` of the nodes and their links, literal values left out: jobs of the
    same graph with other seeds or texts share it, so run times learnt for one (placement,
    ETAs, metrics) apply to the others."""
    shape = {
        str(node_id): [node.get("class_type"),
                       {name: value for name, value in (node.get("inputs") or {}).items()
                        if isinstance(value, list)}]
        for node_id, node in graph.items()
    }
    digest = hashlib.sha256(_SHAPE_JSON.encode(shape).encode()).hexdigest()
    return f"graph:{digest[:16]}"


@dataclass(frozen=True)
class _ClassCheck:
    """What the fleet's backends that have a node class take of it (the first one's spec, as
    ComfyUI on it would check a node, and per input each one's choices and range), gathered
    once per class for the fleet's capabilities, not per node and input of every graph."""

    spec: NodeSpec
    choices: dict[str, list[frozenset[str]]]  # input -> the options of each backend having it
    bounds: dict[str, list[tuple[float | None, float | None]]]  # input -> each one's (min, max)


class _FleetClasses:
    """The fleet's distinct capabilities (like servers share one object: Capabilities.shared)
    and a `_ClassCheck` of each class a graph named, made as it is first asked for."""

    def __init__(self, capabilities: tuple[Capabilities, ...]) -> None:
        self.capabilities = capabilities
        self._checks: dict[str, _ClassCheck] = {}

    def check(self, class_type: Any) -> _ClassCheck | None:
        """None: no backend has the class (or it is not a class name). Only the classes some
        backend has are kept: a client's made-up names would otherwise grow this without
        bound."""
        if not isinstance(class_type, str):
            return None
        check = self._checks.get(class_type)
        if check is None:
            having = [caps for caps in self.capabilities if class_type in caps.nodes]
            if not having:
                return None
            # Every backend's inputs of the class: their specs may differ between versions.
            inputs = {name for caps in having for name in caps.nodes[class_type].input_types}
            check = self._checks[class_type] = _ClassCheck(
                having[0].nodes[class_type],
                _per_input(class_type, inputs, [caps.combos for caps in having]),
                _per_input(class_type, inputs, [caps.ranges for caps in having]))
        return check


def _per_input(class_type: str, inputs: Iterable[str], tables: list[dict[tuple[str, str], V]]
               ) -> dict[str, list[V]]:
    """Input name -> the value each of `tables` has for (`class_type`, input), in order, for
    the `inputs` some table has."""
    gathered = {name: [table[(class_type, name)] for table in tables
                       if (class_type, name) in table] for name in inputs}
    return {name: values for name, values in gathered.items() if values}


# The fleet's classes as the latest check made them, kept while its capabilities are the same
# objects: a backend's change of /object_info makes it new Capabilities.
_latest: list[_FleetClasses] = []


def _fleet_classes(fleet: Sequence[Capabilities]) -> _FleetClasses | None:
    """`fleet`'s classes; None for no capabilities known."""
    if not fleet:
        return None
    distinct = tuple({id(caps): caps for caps in fleet}.values())
    if not _latest or len(_latest[0].capabilities) != len(distinct) or any(
            mine is not theirs for mine, theirs in zip(_latest[0].capabilities, distinct,
                                                       strict=True)):
        _latest[:] = [_FleetClasses(distinct)]
    return _latest[0]


def _check_node(graph: dict[str, Any], node: Any, classes: _FleetClasses | None
                ) -> list[Problem]:
    if not isinstance(node, dict):
        return [Problem("invalid_node", "a node must be an object with class_type and inputs")]
    class_type = node.get("class_type")
    if not isinstance(class_type, str) or not class_type:
        return [Problem("missing_class_type", "the node has no class_type", "class_type")]
    inputs = node.get("inputs", {})
    if not isinstance(inputs, dict):
        return [Problem("invalid_inputs", "inputs must be an object", "inputs")]
    bad_links = {name: problem for name, value in inputs.items()
                 if (problem := _check_link(graph, str(name), value, classes)) is not None}
    problems = list(bad_links.values())
    if classes is None:
        return problems
    check = classes.check(class_type)
    if check is None:
        return [Problem("unknown_class",
                        f"no backend of the fleet has the node class {class_type}",
                        "class_type")]
    for name in sorted(check.spec.required - inputs.keys()):
        problems.append(Problem("missing_input", f"required input {name!r} is missing", name))
    for name, value in inputs.items():
        if name in bad_links:
            continue
        if isinstance(value, list):
            problem = _check_link_type(graph, name, value, check.spec, classes)
        else:
            problem = _check_value(name, value, check)
        if problem is not None:
            problems.append(problem)
    return problems


def _check_link(graph: dict[str, Any], name: str, value: Any, classes: _FleetClasses | None
                ) -> Problem | None:
    """A list is a link `[node_id, output_index]` to a node of this graph."""
    if not isinstance(value, list):
        return None
    if (len(value) != 2 or not isinstance(value[0], str | int) or isinstance(value[1], bool)
            or not isinstance(value[1], int)):
        return Problem("bad_link", "a link must be [node_id, output_index]", name)
    source = graph.get(str(value[0]))
    if not isinstance(source, dict):
        return Problem("bad_link", f"links to node {value[0]}, which is not in the graph", name)
    source_spec = _spec(source.get("class_type"), classes)
    if source_spec is not None and not 0 <= value[1] < len(source_spec.output_types):
        return Problem("bad_link", f"links to output {value[1]} of node {value[0]} "
                                   f"({source.get('class_type')}), which has "
                                   f"{len(source_spec.output_types)}", name)
    return None


def _check_link_type(graph: dict[str, Any], name: str, link: list[Any], spec: NodeSpec,
                     classes: _FleetClasses) -> Problem | None:
    expected = spec.input_types.get(name)
    source_spec = _spec(graph[str(link[0])].get("class_type"), classes)
    if expected is None or source_spec is None:
        return None
    received = source_spec.output_types[link[1]]
    if _types_match(received, expected):
        return None
    return Problem("type_mismatch", f"gets {received} from node {link[0]} but takes {expected}",
                   name)


def _check_value(name: str, value: Any, check: _ClassCheck) -> Problem | None:
    """A literal value: one of the choices of a combo input, within a number's range, on at
    least one backend that has the class (backends hold different model files)."""
    if is_asset_reference(value):
        return None
    choices = check.choices.get(name)
    if choices and isinstance(value, str) and not any(value in options for options in choices):
        return Problem("value_not_in_list",
                       f"{value!r} is not one of the choices any backend has", name)
    bounds = check.bounds.get(name)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and bounds and not any((low is None or value >= low)
                                     and (high is None or value <= high)
                                     for low, high in bounds):
        low, high = bounds[0]
        return Problem("value_out_of_range", f"{value} is outside [{low}, {high}]", name)
    return None


def _check_runnable(graph: dict[str, Any], classes: _FleetClasses) -> None:
    specs = [_spec(node["class_type"], classes) for node in graph.values()]
    if not any(spec is not None and spec.output_node for spec in specs):
        raise InvalidGraph("the workflow has no output node (SaveImage, PreviewAny, ...)",
                           reason="prompt_no_outputs")
    lacking = [caps.missing(graph) for caps in classes.capabilities]
    if all(lacking):
        everything = sorted({piece for pieces in lacking for piece in pieces})
        raise InvalidGraph(
            f"no single backend of the fleet can run this workflow; missing: "
            f"{', '.join(everything)}", reason="no_capable_backend", missing=everything)


def _spec(class_type: Any, classes: _FleetClasses | None) -> NodeSpec | None:
    check = classes.check(class_type) if classes is not None else None
    return check.spec if check is not None else None


def _types_match(received: str, expected: str) -> bool:
    """ComfyUI's validate_node_input: equal, `*` on either side, or overlapping unions."""
    if received == expected or "*" in (received, expected):
        return True
    return bool(set(received.split(",")) & set(expected.split(",")))


def _summary(graph: dict[str, Any], errors: dict[str, list[Problem]]) -> str:
    node_id, problems = next(iter(errors.items()))
    node = graph.get(node_id)
    class_type = node.get("class_type") if isinstance(node, dict) else None
    first = f"Node {node_id}" + (f" ({class_type})" if isinstance(class_type, str) else "")
    more = sum(len(p) for p in errors.values()) - 1
    return f"{first}: {problems[0].message}" + (f" (and {more} more)" if more else "")
