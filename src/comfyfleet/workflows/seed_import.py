"""Reading a ComfyUI-server deployment's workflows (`comfyfleet workflows import-seed`).

ComfyUI-server keeps each workflow as a Python module in `src/workflows/`: the API-format export
as text for `string.Template` (`X = Template(_TEXT)`), its placeholders quoted where a string
goes (`"text": "$text"`) and often bare where a number goes (`"seed": $seed`), so the text is
JSON only once substituted. Each workflow has a service function in `src/api/service.py`, a
static method of `Service` named as the `service_type` clients send, that reads `params`
(`params.get("text")`), uploads an image to ComfyUI when there is one (base64 in the request,
its file name into the template) and substitutes.

The modules are read with `ast`, never imported or executed. They are someone else's code:
importing them runs whatever they do at import (ComfyUI-server's own modules read its `.env`
and build database engines and HTTP clients), needs their dependencies installed, and could
touch anything. What a conversion needs is literal text and the shape of a few calls, which a
syntax tree gives exactly. Whatever cannot be read that way (template text built at run time,
a service function that computes, chooses, loops or edits the prompt) is reported with the
line it is on, never guessed at.

The result is comfyfleet's form: a template that is valid JSON, every placeholder a string
(a bare one becomes `"$seed"`, a whole-value placeholder that is replaced by the typed value),
placeholders renamed to the parameter the service function fills them from, and a sidecar
where the service function says a type or default (`int(params.get("steps"))`,
`params.get("seed", 42)`, an uploaded image). The rest is typed from the fleet's `/object_info`.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from comfyfleet.workflows.api_format import WorkflowError, check_api_format

# string.Template's placeholder syntax (its default `idpattern`, ASCII, any case).
_PLACEHOLDER = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<named>[_a-z][_a-z0-9]*)|\{(?P<braced>[_a-z][_a-z0-9]*)\})",
    re.IGNORECASE | re.ASCII)
# ComfyUI-server's own prompt for deleting files on a ComfyUI (its ComfyUI-fileCleaner node);
# comfyfleet deletes files through comfyui_nodes/ instead.
FILE_CLEANER_CLASS = "Clean input and output file"
# Calls a service function makes that are ComfyUI-server's plumbing, which comfyfleet does
# itself: reading params, decoding and uploading an image, parsing the filled text, queueing
# the prompt and deleting the uploaded input.
_PLUMBING_CALLS = frozenset({"get", "substitute", "safe_substitute", "loads", "b64decode",
                             "upload_image", "queue_prompt", "clean_local_file", "clean_file"})
_CASTS = {"str": "string", "int": "int", "float": "float", "bool": "bool"}
_LITERAL_TYPES = {bool: "bool", int: "int", float: "float", str: "string"}


@dataclass(frozen=True)
class SeedTemplate:
    """A `string.Template` of a module in `src/workflows/`."""

    module: str  # the file name
    variable: str
    text: str
    line: int


@dataclass(frozen=True)
class Param:
    """A placeholder filled from `params[name]`, maybe with a default or a cast."""

    name: str
    default: Any = None
    type: str | None = None


@dataclass(frozen=True)
class Upload:
    """A placeholder filled with the file name of `params[name]`'s image, uploaded to ComfyUI."""

    name: str


@dataclass(frozen=True)
class Fixed:
    """A placeholder always filled with the same literal."""

    value: Any


@dataclass(frozen=True)
class Computed:
    """A placeholder filled with something worked out at run time."""

    source: str


Source = Param | Upload | Fixed | Computed


@dataclass
class ServiceReading:
    """What a service function does, as far as a conversion is concerned."""

    name: str
    line: int
    template: str | None = None  # the variable it substitutes
    fills: dict[str, Source] = field(default_factory=dict)
    passes_all_params: bool = False  # substitute(**params)
    reads: set[str] = field(default_factory=set)  # every params key it reads
    beyond: list[str] = field(default_factory=list)  # why it is more than a substitution


@dataclass
class Conversion:
    """One workflow: converted (`workflow` set) or not (`problem` says why)."""

    name: str
    origin: str
    workflow: dict[str, Any] | None = None
    sidecar: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    problem: str | None = None
    # Not a workflow clients call (ComfyUI-server's file cleaner): nothing to convert.
    not_needed: bool = False


@dataclass
class SeedLayout:
    """Where a ComfyUI-server checkout keeps its templates and its service functions."""

    workflows: Path
    services: Path | None


def find_layout(path: Path) -> SeedLayout:
    """`path` may be the checkout, its `src/` or its `src/workflows/`."""
    for workflows in (path / "src" / "workflows", path / "workflows", path):
        if workflows.is_dir() and any(workflows.glob("*.py")):
            services = workflows.parent / "api" / "service.py"
            return SeedLayout(workflows, services if services.is_file() else None)
    raise WorkflowError(f"{path}: no src/workflows/*.py here (the ComfyUI-server checkout, its "
                        "src/ or its src/workflows/)")


def _line(node: ast.AST) -> int:
    return getattr(node, "lineno", 0)


def _called_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def read_templates(module: str, source: str) -> tuple[list[SeedTemplate], list[str]]:
    """The module's module-level `string.Template`s of literal text, and what could not be
    read (a template of text built at run time)."""
    tree = ast.parse(source, filename=module)
    texts: dict[str, str] = {}
    templates: list[SeedTemplate] = []
    problems: list[str] = []
    for node in tree.body:
        if not (isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None):
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        names = [target.id for target in targets if isinstance(target, ast.Name)]
        value = node.value
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            texts.update(dict.fromkeys(names, value.value))
        elif isinstance(value, ast.Call) and _called_name(value) == "Template":
            argument = value.args[0] if len(value.args) == 1 and not value.keywords else None
            text = None
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                text = argument.value
            elif isinstance(argument, ast.Name):
                text = texts.get(argument.id)
            for name in names:
                if text is None:
                    problems.append(f"{module} line {_line(node)}: {name}'s text is not a literal "
                                    "string in the module (it is built when the module runs)")
                else:
                    templates.append(SeedTemplate(module, name, text, _line(node)))
    return templates, problems


class _ServiceReader:
    """Follows one service function's values from `params` to the `substitute` call."""

    def __init__(self, function: ast.FunctionDef | ast.AsyncFunctionDef, schedulers: set[str]
                 ) -> None:
        self.function = function
        self.schedulers = schedulers
        arguments = [a.arg for a in function.args.args + function.args.kwonlyargs]
        self.params = "params" if "params" in arguments else (arguments[-1] if arguments else "")
        self.assigned: dict[str, list[ast.expr]] = {}
        for node in ast.walk(function):
            if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        self.assigned.setdefault(target.id, []).append(node.value)

    def read(self) -> ServiceReading:
        reading = ServiceReading(self.function.name, _line(self.function))
        substitutions = [node for node in ast.walk(self.function) if isinstance(node, ast.Call)
                         and _called_name(node) in ("substitute", "safe_substitute")]
        if len(substitutions) != 1:
            reading.beyond.append(
                "it substitutes no template" if not substitutions else
                f"it substitutes {len(substitutions)} templates (lines "
                f"{', '.join(str(_line(call)) for call in substitutions)}): a choice or a "
                "combination of templates")
        else:
            self._read_substitution(substitutions[0], reading)
        reading.beyond.extend(self._logic())
        return reading

    def _read_substitution(self, call: ast.Call, reading: ServiceReading) -> None:
        assert isinstance(call.func, ast.Attribute)
        holder = call.func.value
        reading.template = (holder.id if isinstance(holder, ast.Name) else
                            holder.attr if isinstance(holder, ast.Attribute) else None)
        given: list[tuple[str, ast.expr]] = []
        for keyword in call.keywords:
            if keyword.arg is not None:
                given.append((keyword.arg, keyword.value))
            elif self._is_params(keyword.value):
                reading.passes_all_params = True
            else:
                reading.beyond.append(f"line {_line(call)}: substitute(**...) of something "
                                      "other than params")
        for argument in call.args:
            if self._is_params(argument):
                reading.passes_all_params = True
            elif isinstance(argument, ast.Dict) and all(
                    isinstance(k, ast.Constant) and isinstance(k.value, str)
                    for k in argument.keys):
                given.extend((k.value, v) for k, v in zip(argument.keys, argument.values,
                                                            strict=True)
                             if isinstance(k, ast.Constant) and isinstance(k.value, str))
            else:
                reading.beyond.append(f"line {_line(call)}: substitute() of a mapping built at "
                                      "run time")
        for placeholder, value in given:
            source = self._source(value, set())
            reading.fills[placeholder] = source
            if isinstance(source, Computed):
                reading.beyond.append(f"line {_line(value)}: ${placeholder} is filled with "
                                      f"{source.source!r}, worked out at run time")
        reading.reads = {key for node in ast.walk(self.function)
                         if (key := self._param_key(node)) is not None}

    def _is_params(self, node: ast.AST) -> bool:
        return isinstance(node, ast.Name) and node.id == self.params

    def _param_key(self, node: ast.AST) -> str | None:
        """`k` of `params.get("k", ...)` or `params["k"]`."""
        if (isinstance(node, ast.Call) and _called_name(node) == "get"
                and isinstance(node.func, ast.Attribute) and self._is_params(node.func.value)
                and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)):
            return node.args[0].value
        if (isinstance(node, ast.Subscript) and self._is_params(node.value)
                and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
            return node.slice.value
        return None

    def _source(self, value: ast.expr, seen: set[str]) -> Source:
        """Where a value put into the template comes from."""
        if isinstance(value, ast.Await):
            value = value.value
        key = self._param_key(value)
        if key is not None:
            return self._param(key, value)
        if isinstance(value, ast.Constant):
            return Fixed(value.value)
        if (isinstance(value, ast.Call) and _called_name(value) in _CASTS
                and isinstance(value.func, ast.Name) and len(value.args) == 1):
            inner = self._source(value.args[0], seen)
            if isinstance(inner, Param):
                return Param(inner.name, inner.default, _CASTS[value.func.id])
        if isinstance(value, ast.Name):
            if value.id in seen or value.id not in self.assigned:
                return Computed(value.id)
            found = {self._source(v, seen | {value.id}) for v in self.assigned[value.id]}
            return found.pop() if len(found) == 1 else Computed(value.id)
        upload = self._uploaded(value, seen)
        return upload if upload is not None else Computed(ast.unparse(value))

    def _param(self, key: str, access: ast.expr) -> Param:
        default = None
        if isinstance(access, ast.Call) and len(access.args) > 1:
            try:
                default = ast.literal_eval(access.args[1])
            except ValueError:
                default = None
        kind = _LITERAL_TYPES.get(type(default)) if default is not None else None
        return Param(key, default, kind)

    def _uploaded(self, value: ast.expr, seen: set[str]) -> Upload | None:
        """The image parameter whose uploaded file `value` names: the result of an
        `upload_image(...)` call, or built only from such results (`resp["name"]`,
        f"{resp['subfolder']}/{name}")."""
        for node in ast.walk(value):
            if isinstance(node, ast.Call) and _called_name(node) == "upload_image":
                image = self._image_param(node.args[0], set()) if node.args else None
                return Upload(image) if image is not None else None
        # A name met again (image_path = f"{resp['subfolder']}/{image_path}") adds nothing.
        names = {node.id for node in ast.walk(value) if isinstance(node, ast.Name)} - seen
        if not names:
            return None
        sources = {self._source(ast.Name(id=name), seen) for name in names}
        only = sources.pop() if len(sources) == 1 else None
        return only if isinstance(only, Upload) else None

    def _image_param(self, value: ast.expr, seen: set[str]) -> str | None:
        """The parameter whose decoded bytes `value` is (`base64.b64decode(params.get(k))`)."""
        key = self._param_key(value)
        if key is not None:
            return key
        if isinstance(value, ast.Call) and _called_name(value) == "b64decode" and value.args:
            return self._image_param(value.args[0], seen)
        if isinstance(value, ast.Name) and value.id not in seen:
            found = {self._image_param(v, seen | {value.id})
                     for v in self.assigned.get(value.id, [])}
            return found.pop() if len(found) == 1 else None
        return None

    def _logic(self) -> Iterator[str]:
        """Everything in the function that is more than reading, uploading and substituting."""
        from_params = {name for name, values in self.assigned.items()
                       if any(isinstance(self._source(v, {name}), Param) for v in values)}
        for node in ast.walk(self.function):
            where = f"line {_line(node)}"
            if isinstance(node, ast.For | ast.AsyncFor | ast.While | ast.comprehension):
                yield f"{where}: a loop"
            elif isinstance(node, ast.If | ast.IfExp | ast.Match):
                test = node.subject if isinstance(node, ast.Match) else node.test
                used = {n.id for n in ast.walk(test) if isinstance(n, ast.Name)}
                if used & (from_params | {self.params}):
                    yield f"{where}: chooses by a parameter ({ast.unparse(test)})"
            elif isinstance(node, ast.Assign) and any(
                    isinstance(target, ast.Subscript | ast.Attribute) for target in node.targets):
                yield f"{where}: changes a value in place ({ast.unparse(node.targets[0])} = ...)"
            elif isinstance(node, ast.AugAssign):
                yield f"{where}: computes a value ({ast.unparse(node)})"
            elif isinstance(node, ast.Call):
                name = _called_name(node)
                if name not in _PLUMBING_CALLS and name not in _CASTS and (
                        name not in self.schedulers or node.args):
                    yield f"{where}: calls {ast.unparse(node.func)}()"


def _schedulers(tree: ast.Module) -> set[str]:
    """Module-level functions that pick a ComfyUI server (they read `queue_remaining`):
    comfyfleet's dispatcher does that."""
    return {node.name for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and "queue_remaining" in ast.unparse(node)}


def read_services(source: str, filename: str = "service.py") -> list[ServiceReading]:
    """Every service function: the methods of `class Service` (ComfyUI-server calls
    `getattr(Service, service_type)`)."""
    tree = ast.parse(source, filename=filename)
    schedulers = _schedulers(tree)
    readings = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Service":
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    readings.append(_ServiceReader(item, schedulers).read())
    return readings


@dataclass(frozen=True)
class Filled:
    """The template text in JSON: every placeholder quoted, and the ones that were bare."""

    document: dict[str, Any]
    bare: list[str]


def template_to_json(text: str, fill: Callable[[str], str | Fixed]) -> Filled:
    """Quote each bare placeholder (`$seed` -> `"$seed"`), rename each to `fill(name)` (or put
    in the literal `fill` gives), and parse; WorkflowError saying why the text is no workflow."""
    out: list[str] = []
    bare: list[str] = []
    in_string = False
    index = 0
    while index < len(text):
        char = text[index]
        if in_string and char == "\\":
            out.append(text[index:index + 2])
            index += 2
            continue
        if char == '"':
            in_string = not in_string
        match = _PLACEHOLDER.match(text, index) if char == "$" else None
        if match is None or match["escaped"]:
            chunk = match.group() if match else char
            out.append(chunk)
            index += len(chunk)
            continue
        placeholder = match["named"] or match["braced"]
        given = fill(placeholder)
        if isinstance(given, Fixed):
            # As ComfyUI-server put it in: the text of the value, a string escaped inside quotes.
            literal = given.value if isinstance(given.value, str) else json.dumps(given.value)
            out.append(json.dumps(literal)[1:-1] if in_string else literal)
        elif in_string:
            out.append(match.group() if given == placeholder else f"${{{given}}}")
        else:
            out.append(json.dumps(f"${given}"))
            bare.append(given)
        index = match.end()
    converted = "".join(out)
    try:
        document = json.loads(converted)
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"not JSON even with its placeholders quoted: {exc.msg} at line "
                            f"{exc.lineno} column {exc.colno} of the template text") from exc
    return Filled(check_api_format(document), bare)


def _where(document: dict[str, Any], name: str) -> str:
    """The node inputs a placeholder is the whole value of, e.g. `KSampler.seed`."""
    uses = [f"{node.get('class_type')}.{key}" for node in document.values()
            for key, value in node.get("inputs", {}).items()
            if value in (f"${name}", f"${{{name}}}")]
    return ", ".join(uses) or "inside text"


def convert(name: str, template: SeedTemplate, service: ServiceReading | None) -> Conversion:
    """`template` as comfyfleet's workflow `name`, filled the way `service` fills it."""
    origin = f"{template.module} {template.variable}" + (
        f", Service.{service.name} (service.py line {service.line})" if service else "")
    conversion = Conversion(name, origin)
    if service is not None and service.beyond:
        conversion.problem = _beyond(service)
        return conversion
    fills = service.fills if service is not None else {}
    declared = set(Template(template.text).get_identifiers())
    sidecar: dict[str, dict[str, Any]] = {}

    def fill(placeholder: str) -> str | Fixed:
        source = fills.get(placeholder)
        if isinstance(source, Fixed):
            return source
        if isinstance(source, Upload):
            sidecar[source.name] = {"type": "image"}
            return source.name
        if isinstance(source, Param):
            entry = {key: value for key, value in (("type", source.type),
                                                   ("default", source.default))
                     if value is not None}
            if entry:
                sidecar[source.name] = entry
            return source.name
        return placeholder

    try:
        filled = template_to_json(template.text, fill)
    except WorkflowError as exc:
        conversion.problem = f"{template.module} {template.variable}: {exc}"
        return conversion
    conversion.workflow, conversion.sidecar = filled.document, sidecar
    if service is not None:
        for placeholder in sorted(declared - set(fills)):
            if not service.passes_all_params:
                conversion.notes.append(
                    f"${placeholder} is not filled by Service.{service.name} (its substitute() "
                    f"would fail): here it is the parameter {placeholder}")
        for placeholder in sorted(set(fills) - declared):
            conversion.notes.append(f"Service.{service.name} gives {placeholder}, which the "
                                    "template does not use: left out")
        used = {s.name for s in fills.values() if isinstance(s, Param | Upload)}
        for key in sorted(service.reads - used - declared):
            conversion.notes.append(f"params[{key!r}] is read but never reaches the template: "
                                    "sent anyway, it is ignored (COMFYUI_SERVER_COMPAT)")
        for placeholder, source in sorted(fills.items()):
            if isinstance(source, Param | Upload) and source.name != placeholder:
                conversion.notes.append(f"${placeholder} renamed ${source.name}, the parameter "
                                        "that fills it")
            elif isinstance(source, Fixed):
                conversion.notes.append(f"${placeholder} is always {source.value!r}: written in")
    for bare in dict.fromkeys(filled.bare):
        typed = (f"typed {sidecar[bare]['type']} by Service.{service.name}"
                 if service is not None and "type" in sidecar.get(bare, {}) else
                 f"its type from the fleet's /object_info ({_where(filled.document, bare)})")
        conversion.notes.append(f"${bare} was a bare JSON value, now \"${bare}\": replaced by "
                                f"the typed value, {typed}")
    return conversion


FILE_CLEANER_SKIPPED = ("ComfyUI-server's own file-cleaner prompt: comfyfleet deletes files on "
                        "the backends itself (comfyui_nodes/)")


def _beyond(service: ServiceReading) -> str:
    return (f"Service.{service.name} does more than substitute values: "
            f"{'; '.join(service.beyond)}. Write that logic as workflows/{service.name}.py "
            "(build(params, template)), see docs/workflows.md, 'Service functions'")


def _is_file_cleaner(template: SeedTemplate) -> bool:
    return f'"{FILE_CLEANER_CLASS}"' in template.text


def convert_seed(layout: SeedLayout) -> list[Conversion]:
    """Every workflow of a ComfyUI-server checkout: one per service function (named as its
    `service_type`); without `api/service.py`, one per template (named after its module)."""
    templates: list[SeedTemplate] = []
    unreadable: list[Conversion] = []
    for path in sorted(layout.workflows.glob("*.py")):
        try:
            found, problems = read_templates(path.name, path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
            unreadable.append(Conversion(path.stem, path.name, problem=f"cannot be read: {exc}"))
            continue
        templates.extend(found)
        unreadable.extend(Conversion(path.stem, path.name, problem=problem)
                          for problem in problems)
    if layout.services is None:
        per_module: dict[str, int] = {}
        for template in templates:
            per_module[template.module] = per_module.get(template.module, 0) + 1
        conversions = [_unserved(template, per_module[template.module] > 1)
                       for template in templates]
        return conversions + unreadable
    services = read_services(layout.services.read_text(encoding="utf-8"), layout.services.name)
    by_variable: dict[str, list[SeedTemplate]] = {}
    for template in templates:
        by_variable.setdefault(template.variable, []).append(template)
    conversions = []
    used: set[str] = set()
    for service in services:
        candidates = by_variable.get(service.template or "", [])
        if len(candidates) == 1:
            used.add(candidates[0].variable)
            conversions.append(convert(service.name, candidates[0], service))
        elif service.template is None or service.beyond:
            conversions.append(Conversion(
                service.name, f"Service.{service.name} (service.py line {service.line})",
                problem=_beyond(service)))
        else:
            conversions.append(Conversion(
                service.name, f"Service.{service.name} (service.py line {service.line})",
                problem=f"it substitutes {service.template}, which "
                        + ("no module in workflows/ defines as a literal string.Template"
                           if not candidates else "several modules define (ambiguous)")))
    for template in templates:
        if template.variable not in used:
            conversions.append(Conversion(
                template.module.removesuffix(".py"), f"{template.module} {template.variable}",
                not_needed=True,
                problem=FILE_CLEANER_SKIPPED if _is_file_cleaner(template) else
                "no service function in service.py substitutes it, so no service_type "
                "reaches it"))
    return conversions + unreadable


def _unserved(template: SeedTemplate, several: bool) -> Conversion:
    name = template.module.removesuffix(".py")
    if several:
        name = f"{name}_{template.variable.lower()}"
    if _is_file_cleaner(template):
        return Conversion(name, f"{template.module} {template.variable}", not_needed=True,
                          problem=FILE_CLEANER_SKIPPED)
    conversion = convert(name, template, None)
    conversion.notes.append("no api/service.py found: named after its module, each "
                            "placeholder a parameter of its own name")
    return conversion
