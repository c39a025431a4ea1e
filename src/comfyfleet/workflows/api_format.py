"""What an API-format prompt is (ComfyUI's "Export (API)"): node ids mapping to
`{class_type, inputs}`; the check every workflow file and every built prompt goes through."""

from __future__ import annotations

from typing import Any, cast

UI_FORMAT_HINT = (
    "this is a UI-format export (it has 'nodes' and 'links'); in ComfyUI enable "
    "Settings > Comfy > Dev mode, then use Workflow > Export (API) and save that file instead"
)


class WorkflowError(ValueError):
    """A workflow file that cannot be used, with a message an operator can act on."""


def check_api_format(document: Any) -> dict[str, Any]:
    if not isinstance(document, dict):
        raise WorkflowError("expected a JSON object mapping node ids to nodes")
    if "nodes" in document and "links" in document:
        raise WorkflowError(UI_FORMAT_HINT)
    if not document:
        raise WorkflowError("the workflow has no nodes")
    for node_id, node in document.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WorkflowError(f"node {node_id!r} has no class_type; is this an API export?")
        if not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"node {node_id!r}: inputs must be an object")
    return cast(dict[str, Any], document)
