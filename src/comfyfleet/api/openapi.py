"""/openapi.json with one typed path per workflow, from the catalog as it is now (so a
workflow dropped into the directory shows up in /docs without a restart)."""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from comfyfleet.api.jobs import REUSE_DESCRIPTION
from comfyfleet.workflows.catalog import Workflow
from comfyfleet.workflows.params import ParamSpec

_JSON_TYPES = {"string": "string", "int": "integer", "float": "number", "bool": "boolean"}


def param_schema(spec: ParamSpec) -> dict[str, Any]:
    untyped = f"Type not known ({spec.note})" if spec.source is None and spec.note else ""
    description = " ".join(part for part in (spec.description, untyped) if part)
    schema: dict[str, Any] = {"description": description} if description else {}
    if spec.type in _JSON_TYPES:
        schema["type"] = _JSON_TYPES[spec.type]
    if spec.choices:
        schema["enum"] = list(spec.choices)
    if spec.minimum is not None:
        schema["minimum"] = spec.minimum
    if spec.maximum is not None:
        schema["maximum"] = spec.maximum
    if spec.default is not None:
        schema["default"] = spec.default
    return schema


def workflow_operation(workflow: Workflow) -> dict[str, Any]:
    """POST {prefix}/workflows/<name>/jobs, with this workflow's parameters spelled out."""
    params = {
        "type": "object",
        "properties": {name: param_schema(spec) for name, spec in workflow.params.items()},
        "required": [n for n, s in workflow.params.items() if s.required and s.default is None],
        "additionalProperties": False,
    }
    body = {
        "type": "object",
        "properties": {
            "params": params,
            "callback_url": {"type": "string", "format": "uri"},
            "client_task_id": {"type": "string", "minLength": 1, "maxLength": 200},
            "priority": {"type": "integer", "minimum": -1000, "maximum": 1000, "default": 0},
            "webhook_events": {"type": "array",
                               "items": {"enum": ["job.started", "job.progress"]}},
            "reuse_outputs": {"type": "boolean", "description": REUSE_DESCRIPTION,
                              "default": workflow.reuse_outputs},
        },
        "required": ["params"] if params["required"] else [],
    }
    error = {"description": "Bad input: {\"error\": {\"type\", \"message\", ...}}"}
    return {
        "tags": ["workflows"],
        "summary": f"Submit a {workflow.name} job",
        "operationId": f"submit_{workflow.name}_job",
        "security": [{"HTTPBearer": []}],  # as every route under the prefix (api/security.py)
        "parameters": [
            {"name": "wait", "in": "query", "required": False,
             "schema": {"type": "number", "minimum": 0, "maximum": 300, "default": 0}},
            {"name": "Idempotency-Key", "in": "header", "required": False,
             "schema": {"type": "string", "minLength": 1, "maxLength": 200}},
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {
            "202": {"description": "The job, queued",
                    "content": {"application/json": {"schema": {"type": "object"}}}},
            "200": {"description": "The job an earlier request with the same key made",
                    "content": {"application/json": {"schema": {"type": "object"}}}},
            "422": error,
        },
    }


def install_openapi(app: FastAPI, prefix: str) -> None:
    """Replace app.openapi: the generated schema plus a path per workflow in the catalog."""
    generated: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not generated:
            generated.update(get_openapi(title=app.title, version=app.version,
                                         routes=app.routes))
        schema = copy.deepcopy(generated)
        services = getattr(app.state, "services", None)
        if services is not None:
            for name, workflow in sorted(services.catalog.workflows.items()):
                schema["paths"][f"{prefix}/workflows/{name}/jobs"] = {
                    "post": workflow_operation(workflow)}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
