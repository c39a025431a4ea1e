"""Workflow parameters: their declared types, validation, and substitution into a template.

Placeholders follow string.Template (`$name`, `${name}`, `$$` for a dollar sign) and are
substituted in the parsed JSON values, never in the raw text, so no input can add nodes or
break the JSON. A value that is exactly one placeholder is replaced by the typed value itself.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from string import Template
from typing import Any, Literal

ParamType = Literal["any", "string", "int", "float", "bool", "enum", "image"]
PARAM_TYPES: tuple[ParamType, ...] = ("any", "string", "int", "float", "bool", "enum", "image")
# Where a parameter's type comes from: its sidecar entry, the /object_info of the node input it
# fills, or the template (a placeholder inside a longer string is a string).
TypeSource = Literal["sidecar", "object_info", "template"]

# An error message lists at most this many choices (a loader may offer thousands of files).
CHOICES_SHOWN = 20


@dataclass(frozen=True)
class ParamSpec:
    name: str
    type: ParamType = "any"
    default: Any = None
    required: bool = True
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None  # the node's UI increment; shown, not enforced (as ComfyUI)
    choices: tuple[Any, ...] = ()
    description: str = ""
    # None: the type is not known ("any"), and `note` says why.
    source: TypeSource | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "default": self.default,
            "required": self.required,
            "min": self.minimum,
            "max": self.maximum,
            "step": self.step,
            "choices": list(self.choices) or None,
            "description": self.description,
            "type_source": self.source,
            "type_note": self.note or None,
        }


@dataclass
class ParamError(Exception):
    """One or more parameters are wrong; `problems` maps each parameter name to what is wrong."""

    problems: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return "; ".join(f"{name}: {problem}" for name, problem in self.problems.items())


_FORM_BOOLEANS = {"true": True, "false": False, "1": True, "0": False}


def _number(value: Any, expected: str) -> float:
    """A JSON number, or a numeric string (a form field is always text), as a float."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {expected}, got {value!r}")
    try:
        return float(value)
    except (ValueError, OverflowError):
        raise ValueError(f"expected {expected}, got {value!r}") from None


def _integer(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value  # as given: through a float, seeds above 2**53 would change
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    number = _number(value, "an integer")  # "1e3", 64.0
    if not number.is_integer():
        raise ValueError(f"expected an integer, got {value!r}")
    return int(number)


def _choices_text(choices: tuple[Any, ...]) -> str:
    shown = list(choices[:CHOICES_SHOWN])
    more = len(choices) - len(shown)
    return f"{shown}" + (f" and {more} more" if more else "")


def _coerce(spec: ParamSpec, value: Any) -> Any:
    """The value converted to the parameter's type; ValueError says what is wrong."""
    if spec.type == "int":
        value = _integer(value)
    elif spec.type == "float":
        value = _number(value, "a number")
        if not math.isfinite(value):
            raise ValueError("expected a finite number")
    elif spec.type == "bool":
        if isinstance(value, str) and value.lower() in _FORM_BOOLEANS:
            value = _FORM_BOOLEANS[value.lower()]  # a form field is always text
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
    elif spec.type == "string":
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
    elif spec.type == "image":
        # Fetched or decoded by the API before the job is stored (comfyfleet.intake.inputs); bytes
        # come from a multipart upload.
        if not isinstance(value, str | bytes) or not value:
            raise ValueError("expected an http(s) URL, base64 or a data: URI")
        return value
    elif spec.type == "any" and not isinstance(value, str | int | float | bool):
        raise ValueError(f"expected a string, number or boolean, got {value!r}")
    if spec.minimum is not None and value < spec.minimum:
        raise ValueError(f"must be at least {spec.minimum}")
    if spec.maximum is not None and value > spec.maximum:
        raise ValueError(f"must be at most {spec.maximum}")
    if spec.choices and value not in spec.choices:
        raise ValueError(f"must be one of {_choices_text(spec.choices)}")
    return value


def validate_params(specs: Mapping[str, ParamSpec], given: Mapping[str, Any]) -> dict[str, Any]:
    """Typed values for every declared parameter, or ParamError naming each bad one."""
    problems: dict[str, str] = {}
    values: dict[str, Any] = {}
    for name in given:
        if name not in specs:
            problems[name] = "unknown parameter"
    for name, spec in specs.items():
        if name not in given or given[name] is None:
            if spec.required and spec.default is None:
                problems[name] = "required parameter is missing"
            else:
                values[name] = spec.default
            continue
        try:
            values[name] = _coerce(spec, given[name])
        except (ValueError, TypeError) as exc:
            problems[name] = str(exc)
    if problems:
        raise ParamError(problems)
    return values


def placeholders(template: Any) -> Iterator[str]:
    """Every placeholder name used in the string values of a parsed JSON document."""
    if isinstance(template, str):
        yield from Template(template).get_identifiers()
    elif isinstance(template, dict):
        for value in template.values():
            yield from placeholders(value)
    elif isinstance(template, list):
        for value in template:
            yield from placeholders(value)


def whole_placeholder(value: str) -> str | None:
    """The name of the placeholder that is all of `value` (`"$seed"`, `"${seed}"`), or None."""
    identifiers = Template(value).get_identifiers()
    if len(identifiers) == 1 and value in (f"${identifiers[0]}", f"${{{identifiers[0]}}}"):
        return identifiers[0]
    return None


def substitute(template: Any, values: Mapping[str, Any]) -> Any:
    """A copy of `template` with every placeholder replaced; the input is left untouched."""
    return template_filler(template)(values)


Filler = Callable[[Mapping[str, Any]], Any]


def template_filler(template: Any) -> Filler:
    """`substitute` for one template, its placeholders found once (a workflow fills its
    template for every job): each container copied, each string without a placeholder
    shared, as `substitute` leaves them. A container is copied whole, in C, and only its
    items to fill (containers, placeholders) are set again: most of a prompt's values are
    numbers and names, a call each when every item was filled."""
    if isinstance(template, dict | list):
        keys = template.keys() if isinstance(template, dict) else range(len(template))
        items = [(key, template_filler(template[key])) for key in keys
                 if _filled(template[key])]
        return lambda values: _copy_filled(template, items, values)
    if isinstance(template, str) and "$" in template:  # most strings have no placeholder
        whole = whole_placeholder(template)
        if whole is not None:
            return lambda values: values[whole]
        text = Template(template)
        return lambda values: text.substitute({k: _as_text(v) for k, v in values.items()})
    return lambda _: template


def _filled(value: Any) -> bool:
    """Whether a template's `value` is made anew for each job: a container (copied) or a
    string with a placeholder."""
    return isinstance(value, dict | list) or (isinstance(value, str) and "$" in value)


def _copy_filled(template: dict[Any, Any] | list[Any], items: list[tuple[Any, Filler]],
                 values: Mapping[str, Any]) -> Any:
    """A copy of the container `template`, each of its `items` (key or index, filler)
    filled from `values`, the others shared."""
    copy = template.copy()
    for key, fill in items:
        copy[key] = fill(values)
    return copy


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
