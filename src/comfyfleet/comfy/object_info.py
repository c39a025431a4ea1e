"""How ComfyUI's `/object_info` declares a node class's inputs, read in one place: for what a
backend can run (capabilities.py) and for the types of the parameters a workflow's placeholders
fill (workflows/inference.py).

An input is `[TYPE, {config}]`, or a combo of choices: `[[choices...], {config}]`, or for newer
nodes `["COMBO", {"options": [choices...]}]`. Reports are read leniently: a part of unexpected
shape reads as absent."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

SECTIONS = ("required", "optional")


@dataclass(frozen=True)
class InputSpec:
    """One input of a node class."""

    kind: str | None  # "INT", "IMAGE", ...; "COMBO" for either shape; None: none declared
    config: Mapping[str, Any]
    options: Any = None  # a combo's choices as declared (a list when well formed)

    @classmethod
    def parse(cls, spec: Any) -> InputSpec:
        if not isinstance(spec, list) or not spec:
            return cls(None, {})
        config = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if isinstance(spec[0], list):
            return cls("COMBO", config, spec[0])
        if spec[0] == "COMBO":
            return cls("COMBO", config, config.get("options"))
        return cls(spec[0] if isinstance(spec[0], str) else None, config)


def node_inputs(node: Any) -> Iterator[tuple[str, InputSpec, bool]]:
    """Each input a node class declares, required ones first: its name, its spec, and whether
    it is required."""
    sections = node.get("input") if isinstance(node, dict) else None
    for section in SECTIONS:
        specs = sections.get(section) if isinstance(sections, dict) else None
        for name, spec in (specs if isinstance(specs, dict) else {}).items():
            yield name, InputSpec.parse(spec), section == "required"


def hidden_inputs(node: Any) -> Mapping[str, Any]:
    """The hidden inputs ComfyUI fills itself (UNIQUE_ID, PROMPT, ...), by name."""
    sections = node.get("input") if isinstance(node, dict) else None
    hidden = sections.get("hidden") if isinstance(sections, dict) else None
    return hidden if isinstance(hidden, dict) else {}
