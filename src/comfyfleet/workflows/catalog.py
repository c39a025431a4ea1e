"""The workflow catalog: API-format exports dropped into `WORKFLOWS_DIR`.

Each `<name>.json` is a workflow; an optional sidecar `<name>.params.json` (or `.params.yaml`)
declares its parameters (type, default, range, choices; the node and input each one sets, when
the template has no placeholder for it) and whether its outputs may be reused;
an optional `<name>.py` is its service function. What a sidecar leaves unsaid about a
parameter comes from the node inputs it fills (inference.py), as the backends report them:
the catalog is typed again whenever a backend's `/object_info` arrives. A broken file is
reported in `errors`, and to a request for it; it never takes the others down.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, cast

import yaml

from comfyfleet import json_codec
from comfyfleet.workflows.api_format import WorkflowError, check_api_format
from comfyfleet.workflows.inference import (
    FleetNodes,
    NodeInputs,
    Use,
    inferred_spec,
    placeholder_uses,
)
from comfyfleet.workflows.params import (
    PARAM_TYPES,
    Filler,
    ParamSpec,
    ParamType,
    substitute,
    template_filler,
    validate_params,
)
from comfyfleet.workflows.service_functions import ServiceFunction, load_service_function

log = logging.getLogger(__name__)

# The sample workflows, shipped inside the package (in the repository: workflows/).
SAMPLES_DIR = Path(__file__).resolve().parent.parent / "sample_workflows"
SIDECAR_SUFFIXES = (".params.json", ".params.yaml", ".params.yml")
# A sidecar's one key that is not a parameter: true lets every request reuse earlier outputs.
REUSE_KEY = "reuse_outputs"


@dataclass(frozen=True)
class Workflow:
    name: str
    template: dict[str, Any]
    params: dict[str, ParamSpec]
    # SHA-256 of the files that define the workflow: an edit makes its earlier outputs
    # different work, never reused for the new definition.
    digest: str
    reuse_outputs: bool = False
    service_function: ServiceFunction | None = None
    # Where each placeholder is used, and what the sidecar says of each parameter: what the
    # parameters are typed from again when the fleet's nodes change.
    uses: Mapping[str, tuple[Use, ...]] = field(default_factory=dict)
    declared: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def typed(self, nodes: FleetNodes) -> Workflow:
        """This workflow with its parameters typed from the sidecar, then from `nodes`."""
        names = [*self.uses, *(name for name in self.declared if name not in self.uses)]
        params = {name: _declared_over(inferred_spec(name, self.uses.get(name, ()), nodes),
                                       self.declared.get(name))
                  for name in names}
        return replace(self, params=params)

    @property
    def types_known(self) -> bool:
        return all(spec.source is not None for spec in self.params.values())

    def validate(self, given: dict[str, Any]) -> dict[str, Any]:
        """Typed values of every parameter, defaults included; ParamError on bad input."""
        return validate_params(self.params, given)

    def build(self, given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The validated values and the filled template (the template alone: a service
        function runs in `make_prompt`)."""
        values = self.validate(given)
        return values, self.fill(values)

    def fill(self, values: dict[str, Any]) -> dict[str, Any]:
        """The prompt with these (already validated) values substituted."""
        return cast(dict[str, Any], self._filler(values))

    @cached_property
    def _filler(self) -> Filler:
        return template_filler(self.template)

    async def make_prompt(self, values: dict[str, Any]) -> dict[str, Any]:
        """The prompt to run for validated values: the filled template, passed through the
        service function when there is one (BuildError when that fails)."""
        filled = self.fill(values)
        if self.service_function is None:
            return filled
        return await self.service_function(dict(values), filled)

    async def sample_prompt(self) -> dict[str, Any]:
        """What can be checked against a backend before any job exists: the prompt built
        from the defaults when every parameter has one, else the template with the defaults
        it has and null for the rest."""
        if all(spec.default is not None for spec in self.params.values()):
            return await self.make_prompt(self.validate({}))
        return self.preview()

    def fingerprint(self, params_by_content: dict[str, Any]) -> str:
        """SHA-256 of the work a job asks for: this workflow as it is defined now and the
        typed parameters, images by the digest of their bytes (see inputs.by_content)."""
        return hashlib.sha256(json_codec.canonical(
            {"workflow": self.name, "definition": self.digest, "params": params_by_content},
        )).hexdigest()

    @property
    def image_params(self) -> list[str]:
        return [name for name, spec in self.params.items() if spec.type == "image"]

    def preview(self) -> dict[str, Any]:
        """The template with defaults filled in, and null where a value must come from the
        request."""
        return cast(dict[str, Any], substitute(
            self.template, {name: spec.default for name, spec in self.params.items()}))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": [spec.to_json() for spec in self.params.values()],
            "nodes": len(self.template),
            "service_function": (self.service_function.path.name
                                 if self.service_function is not None else None),
            "reuse_outputs": self.reuse_outputs,
            # false: some parameter is untyped (see its type_note), e.g. until a backend
            # has reported the nodes it fills
            "types_known": self.types_known,
        }


class UnknownWorkflow(LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"no workflow named {name!r} (known: {', '.join(known) or 'none'})")


class BrokenWorkflow(LookupError):
    """The workflow's files are there but could not be loaded."""

    def __init__(self, name: str, error: str) -> None:
        super().__init__(f"workflow {name!r} could not be loaded: {error}")


@dataclass
class Catalog:
    workflows: dict[str, Workflow] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    nodes: FleetNodes = field(default_factory=FleetNodes)

    def get(self, name: str) -> Workflow | None:
        return self.workflows.get(name)

    def find(self, name: str) -> Workflow:
        """The workflow; BrokenWorkflow naming its load error, or UnknownWorkflow."""
        workflow = self.workflows.get(name)
        if workflow is not None:
            return workflow
        if name in self.errors:
            raise BrokenWorkflow(name, self.errors[name])
        raise UnknownWorkflow(name, sorted(self.workflows))

    def take_files(self, loaded: Catalog) -> None:
        """The workflows as read again from the directory, typed from what the fleet says."""
        self.errors = loaded.errors
        self.workflows = {name: w.typed(self.nodes) for name, w in loaded.workflows.items()}

    def backend_reported(self, backend: str, inputs: NodeInputs) -> None:
        """A backend's /object_info arrived (on every connect): type the workflows again."""
        self.nodes.report(backend, inputs)
        self._retype()

    def backend_removed(self, backend: str) -> None:
        self.nodes.forget(backend)
        self._retype()

    def _retype(self) -> None:
        self.workflows = {name: w.typed(self.nodes) for name, w in self.workflows.items()}


# What a sidecar entry may say; what it leaves out comes from the node inputs.
DECLARABLE = ("type", "default", "required", "min", "max", "step", "choices", "description")


def _check_declared(name: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise WorkflowError(f"parameter {name!r}: expected an object")
    kind = raw.get("type")
    if kind is not None and kind not in PARAM_TYPES:
        raise WorkflowError(f"parameter {name!r}: type must be one of {', '.join(PARAM_TYPES)}")
    if kind == "enum" and not raw.get("choices"):
        raise WorkflowError(f"parameter {name!r}: an enum needs choices")
    return {key: raw[key] for key in DECLARABLE if key in raw}


def _declared_over(inferred: ParamSpec, declared: Mapping[str, Any] | None) -> ParamSpec:
    """The sidecar's word wins; it leaves the rest to what was inferred, unless it declares
    another type (then the inferred range and choices would not fit)."""
    if declared is None:
        return inferred
    kind = declared.get("type")
    if kind is None:
        base = inferred
    elif kind == inferred.type:
        base = replace(inferred, source="sidecar")
    else:
        base = ParamSpec(inferred.name, type=cast(ParamType, kind), source="sidecar")
    default = declared.get("default", base.default)
    return replace(
        base,
        default=default,
        required=bool(declared.get("required", default is None)),
        minimum=declared.get("min", base.minimum),
        maximum=declared.get("max", base.maximum),
        step=declared.get("step", base.step),
        choices=tuple(declared["choices"]) if declared.get("choices") else base.choices,
        description=str(declared.get("description", base.description)),
    )


def _bind_input(
    template: dict[str, Any], name: str, raw: dict[str, Any], sidecar: str
) -> dict[str, Any]:
    """A sidecar entry naming its node and input: that input of the template becomes the
    parameter (a placeholder the export did not need to have). Without a default of its own
    (or `required: true`) the parameter defaults to the value the export has there."""
    node_id, input_name = raw.get("node"), raw.get("input")
    where = f"{sidecar}: parameter {name!r}"
    if node_id is None or input_name is None:
        raise WorkflowError(f"{where}: give both node and input")
    node = template.get(str(node_id))
    if node is None:
        raise WorkflowError(f"{where}: the template has no node {str(node_id)!r}")
    inputs = node.get("inputs", {})
    if input_name not in inputs:
        raise WorkflowError(f"{where}: node {str(node_id)!r} ({node.get('class_type')}) has no "
                            f"input {input_name!r}")
    exported = inputs[input_name]
    if isinstance(exported, list):
        raise WorkflowError(f"{where}: input {input_name!r} of node {str(node_id)!r} is a link "
                            "to another node, not a value")
    if not name.isidentifier():
        raise WorkflowError(f"{where}: a parameter's name must be an identifier")
    inputs[input_name] = f"${{{name}}}"
    if "default" in raw or raw.get("required"):
        return raw
    return {**raw, "default": exported}


def _read_sidecar(path: Path, text: str) -> dict[str, Any]:
    try:
        declared = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise WorkflowError(f"{path.name}: cannot be read: {exc}") from exc
    if not isinstance(declared, dict):
        raise WorkflowError(f"{path.name}: expected an object of parameters")
    return declared


def load_workflow(path: Path) -> Workflow:
    name = path.name.removesuffix(".json")
    source = path.read_bytes()
    digest = hashlib.sha256(b"template\0" + source)
    try:
        template = check_api_format(json.loads(source))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WorkflowError(f"not valid JSON: {exc}") from exc
    code = path.with_suffix(".py")
    service_function = None
    if code.exists():
        code_source = code.read_bytes()
        digest.update(b"\0service function\0" + code_source)
        service_function = load_service_function(code, code_source)
    declared: dict[str, dict[str, Any]] = {}
    reuse_outputs = False
    sidecar = next((path.with_name(name + suffix) for suffix in SIDECAR_SUFFIXES
                    if path.with_name(name + suffix).exists()), None)
    entries: dict[str, Any] = {}
    if sidecar is not None:
        text = sidecar.read_text()
        digest.update(b"\0sidecar\0" + text.encode())
        entries = _read_sidecar(sidecar, text)
        reuse_outputs = entries.pop(REUSE_KEY, False)
        if not isinstance(reuse_outputs, bool):
            raise WorkflowError(f"{sidecar.name}: {REUSE_KEY} must be true or false")
        for key, raw in entries.items():
            if isinstance(raw, dict) and ("node" in raw or "input" in raw):
                entries[key] = _bind_input(template, key, raw, sidecar.name)
    uses = placeholder_uses(template)
    for key, raw in entries.items():
        # A service function may take parameters the template does not name.
        if key not in uses and service_function is None:
            assert sidecar is not None
            raise WorkflowError(f"{sidecar.name}: parameter {key!r} is not used in {path.name}")
        declared[key] = _check_declared(key, raw)
    return Workflow(name=name, template=template, params={}, digest=digest.hexdigest(),
                    reuse_outputs=reuse_outputs, service_function=service_function,
                    uses=uses, declared=declared).typed(FleetNodes())


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
    for code in sorted(directory.glob("*.py")):
        if not code.with_suffix(".json").exists():
            catalog.errors[code.stem] = (f"{code.name} has no template {code.stem}.json: a "
                                         "service function builds on its workflow's template")
            log.error("workflow %s not loaded: %s", code, catalog.errors[code.stem])
    return catalog


def served_directory(configured: Path) -> Path:
    """Where the service reads its workflows: WORKFLOWS_DIR, or the samples when it does not
    exist (a fresh install, run from any directory, serves the demo's workflows)."""
    if configured.is_dir():
        return configured
    log.warning("WORKFLOWS_DIR %s does not exist: serving the sample workflows (%s)",
                configured, SAMPLES_DIR)
    return SAMPLES_DIR


def load_served_catalog(configured: Path) -> Catalog:
    """The service's catalog, from WORKFLOWS_DIR or the samples (blocking: through a thread)."""
    return load_catalog(served_directory(configured))
