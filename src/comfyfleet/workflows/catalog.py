"""The workflow catalog: API-format exports dropped into `WORKFLOWS_DIR`.

Each `<name>.json` is a workflow; an optional sidecar `<name>.params.json` (or `.params.yaml`)
declares its parameters (type, default, range, choices). Parameters that only appear as
placeholders are required and untyped. A broken file is reported in `errors` and never takes
the others down.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from comfyfleet.workflows.params import (
    PARAM_TYPES,
    ParamSpec,
    ParamType,
    placeholders,
    substitute,
    validate_params,
)

log = logging.getLogger(__name__)

SIDECAR_SUFFIXES = (".params.json", ".params.yaml", ".params.yml")
UI_FORMAT_HINT = (
    "this is a UI-format export (it has 'nodes' and 'links'); in ComfyUI enable "
    "Settings > Comfy > Dev mode, then use Workflow > Export (API) and save that file instead"
)


class WorkflowError(ValueError):
    """A workflow file that cannot be used, with a message an operator can act on."""


@dataclass(frozen=True)
class Workflow:
    name: str
    template: dict[str, Any]
    params: dict[str, ParamSpec]

    def build(self, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The validated parameter values and the filled prompt; ParamError on bad input."""
        values = validate_params(self.params, given)
        return values, self.fill(values)

    def fill(self, values: dict[str, Any]) -> dict[str, Any]:
        """The prompt with these (already validated) values substituted."""
        return cast(dict[str, Any], substitute(self.template, values))

    @property
    def image_params(self) -> list[str]:
        return [name for name, spec in self.params.items() if spec.type == "image"]

    def preview(self) -> dict[str, Any]:
        """The prompt with defaults filled in, and null where a value must come from the
        request: what can be checked against a backend before any job exists."""
        return cast(dict[str, Any], substitute(
            self.template, {name: spec.default for name, spec in self.params.items()}))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": [spec.to_json() for spec in self.params.values()],
            "nodes": len(self.template),
        }


@dataclass
class Catalog:
    workflows: dict[str, Workflow] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> Workflow | None:
        return self.workflows.get(name)


def check_api_format(document: Any) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise WorkflowError("expected a JSON object mapping node ids to nodes")
    if "nodes" in document and "links" in document:
        raise WorkflowError(UI_FORMAT_HINT)
    if not document:
        raise WorkflowError("the workflow has no nodes")
    for node_id, node in document.items():
        if not isinstance(node, dict) or "class_type" not in node:
            raise WorkflowError(f"node {node_id!r} has no class_type; is this an API export?")
        if not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"node {node_id!r}: inputs must be an object")
    return cast(dict[str, Any], document)


def _param_spec(name: str, raw: Any) -> ParamSpec:
    if not isinstance(raw, dict):
        raise WorkflowError(f"parameter {name!r}: expected an object")
    kind = raw.get("type", "any")
    if kind not in PARAM_TYPES:
        raise WorkflowError(f"parameter {name!r}: type must be one of {', '.join(PARAM_TYPES)}")
    choices = tuple(raw.get("choices") or ())
    if kind == "enum" and not choices:
        raise WorkflowError(f"parameter {name!r}: an enum needs choices")
    default = raw.get("default")
    return ParamSpec(
        name=name,
        type=cast(ParamType, kind),
        default=default,
        required=bool(raw.get("required", default is None)),
        minimum=raw.get("min"),
        maximum=raw.get("max"),
        choices=choices,
        description=str(raw.get("description", "")),
    )


def _read_sidecar(path: Path) -> Any:
    try:
        if path.suffix == ".json":
            return json.loads(path.read_text())
        return yaml.safe_load(path.read_text())
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise WorkflowError(f"{path.name}: cannot be read: {exc}") from exc


def load_workflow(path: Path) -> Workflow:
    name = path.name.removesuffix(".json")
    try:
        template = check_api_format(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"not valid JSON: {exc}") from exc
    params = {key: ParamSpec(name=key) for key in placeholders(template)}
    sidecar = next((path.with_name(name + suffix) for suffix in SIDECAR_SUFFIXES
                    if path.with_name(name + suffix).exists()), None)
    if sidecar is not None:
        declared = _read_sidecar(sidecar)
        if not isinstance(declared, dict):
            raise WorkflowError(f"{sidecar.name}: expected an object of parameters")
        for key, raw in declared.items():
            if key not in params:
                raise WorkflowError(f"{sidecar.name}: parameter {key!r} is not used in {path.name}")
            params[key] = _param_spec(key, raw)
    return Workflow(name=name, template=template, params=params)


def load_catalog(directory: Path) -> Catalog:
    """Every workflow in `directory` (blocking file reads: call it through a thread)."""
    catalog = Catalog()
    if not directory.is_dir():
        log.warning("workflows directory %s does not exist", directory)
        return catalog
    for path in sorted(directory.glob("*.json")):
        if path.name.endswith(SIDECAR_SUFFIXES):
            continue
        name = path.name.removesuffix(".json")
        try:
            catalog.workflows[name] = load_workflow(path)
        except (WorkflowError, OSError) as exc:
            catalog.errors[name] = str(exc)
            log.error("workflow %s not loaded: %s", path, exc)
    return catalog
