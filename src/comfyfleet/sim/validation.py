"""POST /prompt validation: a port of validate_prompt / validate_inputs from ComfyUI's execution.py.

The port keeps ComfyUI's control flow on purpose, including the parts that look odd: literal
values are converted in place (so queue and history show the converted prompt), a malformed
node raises a Python exception that is reported as `exception_during_validation`, and
node_errors collects every failing node seen so far for each failed output.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Any

from comfyfleet.sim.blocking import Disk
from comfyfleet.sim.files import Folders
from comfyfleet.sim.nodes import IMAGE_FILE_NODES, declared_inputs

# (valid, errors of the node itself); a node that is only invalid upstream has no errors.
Verdict = tuple[bool, list[dict[str, Any]]]


@dataclass
class ValidationResult:
    ok: bool
    error: dict[str, Any] | None
    outputs: list[str]
    node_errors: dict[str, Any] = field(default_factory=dict)


def full_type_name(cls: type) -> str:
    """ComfyUI's exception type names: `KeyError`, `PIL.UnidentifiedImageError`, ..."""
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _error(kind: str, message: str, details: str) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


def _node_error(kind: str, message: str, details: str, **extra_info: Any) -> dict[str, Any]:
    return {"type": kind, "message": message, "details": details, "extra_info": extra_info}


def _exception_info(ex: Exception) -> dict[str, Any]:
    return {
        "exception_type": full_type_name(type(ex)),
        "traceback": traceback.format_tb(ex.__traceback__),
    }


def is_output_node(spec: dict[str, Any]) -> bool:
    return spec.get("output_node") is True


def types_match(received: Any, expected: Any) -> bool:
    """validate_node_input: equal, `*` on either side, or overlapping comma-separated unions."""
    if received == expected:
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    received_set = {t.strip() for t in received.split(",")}
    expected_set = {t.strip() for t in expected.split(",")}
    if "*" in received_set or "*" in expected_set:
        return True
    return bool(received_set & expected_set)


async def validate_prompt(
    prompt: dict[str, Any],
    specs: dict[str, Any],
    folders: Folders,
    disk: Disk,
    partial_targets: Any = None,
) -> ValidationResult:
    outputs = _output_nodes(prompt, specs, partial_targets)
    if isinstance(outputs, ValidationResult):
        return outputs
    if not outputs:
        return ValidationResult(False, _error("prompt_no_outputs", "Prompt has no outputs", ""), [])

    validator = _Validator(prompt, specs, folders, disk)
    good_outputs: list[str] = []
    output_errors: list[dict[str, Any]] = []
    node_errors: dict[str, Any] = {}
    for output in outputs:
        valid, reasons = await _validate_output(validator, output)
        if valid:
            good_outputs.append(output)
            continue
        output_errors += reasons
        # Like ComfyUI, this walks every node validated so far, so a failing node is also
        # listed as a dependency of later failing outputs it may not feed.
        for node_id, (node_valid, node_reasons) in validator.validated.items():
            if node_valid or not node_reasons:
                continue
            entry = node_errors.setdefault(
                node_id,
                {
                    "errors": node_reasons,
                    "dependent_outputs": [],
                    "class_type": prompt[node_id]["class_type"],
                },
            )
            entry["dependent_outputs"].append(output)

    if not good_outputs:
        details = "\n".join(f"{e['message']}: {e['details']}" for e in output_errors)
        message = "Prompt outputs failed validation"
        error = _error("prompt_outputs_failed_validation", message, details)
        return ValidationResult(False, error, [], node_errors)
    return ValidationResult(True, None, good_outputs, node_errors)


def _output_nodes(
    prompt: dict[str, Any], specs: dict[str, Any], partial_targets: Any
) -> list[str] | ValidationResult:
    """The output nodes to run, or the failure of the first node ComfyUI cannot even read."""
    outputs = []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            message = "Cannot execute because a node is missing the class_type property."
            return ValidationResult(
                False, _error("invalid_prompt", message, f"Node ID '#{node_id}'"), []
            )
        class_type = node["class_type"]
        spec = specs.get(class_type) if isinstance(class_type, str) else None
        if spec is None:
            message = f"Cannot execute because node {class_type} does not exist."
            return ValidationResult(
                False, _error("invalid_prompt", message, f"Node ID '#{node_id}'"), []
            )
        if is_output_node(spec) and (partial_targets is None or node_id in partial_targets):
            outputs.append(node_id)
    return outputs


async def _validate_output(validator: _Validator, output: str) -> tuple[bool, list[Any]]:
    try:
        return await validator.node(output)
    except Exception as ex:  # ComfyUI reports it as this output's failure, and goes on
        reasons = [
            {
                "type": "exception_during_validation",
                "message": "Exception when validating node",
                "details": str(ex),
                "extra_info": _exception_info(ex),
            }
        ]
        validator.validated[output] = (False, reasons)
        return False, reasons


class _Validator:
    def __init__(
        self, prompt: dict[str, Any], specs: dict[str, Any], folders: Folders, disk: Disk
    ) -> None:
        self.prompt = prompt
        self.specs = specs
        self.folders = folders
        self.disk = disk
        self.validated: dict[str, Verdict] = {}
        self._active: set[str] = set()  # on the current path: a link back to one is a cycle

    async def node(self, node_id: str) -> Verdict:
        if node_id not in self.validated:
            self._active.add(node_id)
            try:
                self.validated[node_id] = await self._check(node_id)
            finally:
                self._active.discard(node_id)
        return self.validated[node_id]

    async def _check(self, node_id: str) -> Verdict:
        node = self.prompt[node_id]
        inputs = node["inputs"]
        class_type = node["class_type"]
        custom_validated = class_type in IMAGE_FILE_NODES  # their `image` skips the combo check
        errors: list[dict[str, Any]] = []
        valid = True
        for name, category, config in declared_inputs(self.specs[class_type]):
            input_type = config[0]
            options = config[1] if len(config) > 1 else {}
            info = [input_type, options]
            if name not in inputs:
                if category == "required":
                    errors.append(
                        _node_error(
                            "required_input_missing",
                            "Required input is missing",
                            name,
                            input_name=name,
                        )
                    )
                continue
            value = inputs[name]
            if isinstance(value, list):
                link_ok, link_error = await self._check_link(name, value, input_type, info)
                if link_error is not None:
                    errors.append(link_error)
                valid = valid and link_ok
                continue
            error = self._check_literal(
                inputs, name, input_type, options, info, custom_validated and name == "image"
            )
            if error is not None:
                errors.append(error)

        if custom_validated and "image" in inputs and not isinstance(inputs["image"], list):
            image = inputs["image"]
            if not await self.disk.run(0, self.folders.image_input_exists, str(image)):
                errors.append(
                    _node_error(
                        "custom_validation_failed",
                        "Custom validation failed for node",
                        f"image - Invalid image file: {image}",
                        input_name="image",
                    )
                )
        return (not errors and valid), errors

    async def _check_link(
        self, name: str, link: list[Any], input_type: Any, info: list[Any]
    ) -> tuple[bool, dict[str, Any] | None]:
        """(link usable, error of this node). Lookups of a missing node or slot raise, as in
        ComfyUI, and surface as `exception_during_validation` on the output being validated."""
        if len(link) != 2:
            message = "Bad linked input, must be a length-2 list of [node_id, slot_index]"
            return False, _node_error(
                "bad_linked_input",
                message,
                name,
                input_name=name,
                input_config=info,
                received_value=link,
            )
        source_id, slot = link
        received_type = self.specs[self.prompt[source_id]["class_type"]]["output"][slot]
        if not types_match(received_type, input_type):
            details = f"{name}, received_type({received_type}) mismatch input_type({input_type})"
            return False, _node_error(
                "return_type_mismatch",
                "Return type mismatch between linked nodes",
                details,
                input_name=name,
                input_config=info,
                received_type=received_type,
                linked_node=link,
            )
        if source_id in self._active:
            # ComfyUI 0.3.64 would recurse until RecursionError; report the cycle instead,
            # with the error type newer versions use.
            return False, _node_error(
                "dependency_cycle",
                "Dependency cycle detected",
                name,
                input_name=name,
                linked_node=link,
            )
        try:
            source_valid, _ = await self.node(source_id)
        except Exception as ex:
            self.validated[source_id] = (
                False,
                [
                    {
                        "type": "exception_during_inner_validation",
                        "message": "Exception when validating inner node",
                        "details": str(ex),
                        "extra_info": {
                            "input_name": name,
                            "input_config": info,
                            "exception_message": str(ex),
                            **_exception_info(ex),
                            "linked_node": link,
                        },
                    }
                ],
            )
            return False, None
        return source_valid, None

    def _check_literal(
        self,
        inputs: dict[str, Any],
        name: str,
        input_type: Any,
        options: dict[str, Any],
        info: list[Any],
        custom_validated: bool,
    ) -> dict[str, Any] | None:
        value = inputs[name]
        try:
            # {"__value__": [...]} is how a list literal avoids being read as a link.
            if isinstance(value, dict) and "__value__" in value:
                value = inputs[name] = value["__value__"]
            converter = _CONVERTERS.get(input_type) if isinstance(input_type, str) else None
            if converter is not None:
                value = inputs[name] = converter(value)
        except Exception as ex:
            return _node_error(
                "invalid_input_type",
                f"Failed to convert an input value to a {input_type} value",
                f"{name}, {value}, {ex}",
                input_name=name,
                input_config=info,
                received_value=value,
                exception_message=str(ex),
            )
        if custom_validated:
            return None
        return _out_of_range(name, value, options, info) or _not_a_choice(
            name, value, input_type, options, info)


def _out_of_range(
    name: str, value: Any, options: dict[str, Any], info: list[Any]
) -> dict[str, Any] | None:
    if "min" in options and value < options["min"]:
        return _node_error(
            "value_smaller_than_min",
            f"Value {value} smaller than min of {options['min']}",
            name,
            input_name=name,
            input_config=info,
            received_value=value,
        )
    if "max" in options and value > options["max"]:
        return _node_error(
            "value_bigger_than_max",
            f"Value {value} bigger than max of {options['max']}",
            name,
            input_name=name,
            input_config=info,
            received_value=value,
        )
    return None


def _not_a_choice(
    name: str, value: Any, input_type: Any, options: dict[str, Any], info: list[Any]
) -> dict[str, Any] | None:
    if not (isinstance(input_type, list) or input_type == "COMBO"):
        return None
    choices = input_type if isinstance(input_type, list) else options.get("options", [])
    if value in choices:
        return None
    # Long lists (think scanned model files) are not echoed back.
    long_list = len(choices) > 20
    list_info = f"(list of length {len(choices)})" if long_list else str(choices)
    return _node_error(
        "value_not_in_list",
        "Value not in list",
        f"{name}: '{value}' not in {list_info}",
        input_name=name,
        input_config=None if long_list else info,
        received_value=value,
    )


_CONVERTERS: dict[str, Any] = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
