"""Reading and preparing API-format prompts for ComfyUI."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


def isolate_outputs(prompt: dict[str, Any], tag: str) -> dict[str, Any]:
    """A copy whose saving nodes write under `comfyfleet/<tag>/`.

    ComfyUI serves an identical prompt from its cache with an *old* file name, and reuses
    deleted SaveImage counters; a unique prefix per attempt makes every run write new files.
    """
    isolated: dict[str, Any] = {}
    for node_id, node in prompt.items():
        inputs = node.get("inputs", {})
        prefix = inputs.get("filename_prefix")
        if isinstance(prefix, str):
            base = _UNSAFE_NAME.sub("_", prefix.rsplit("/", 1)[-1]).strip("._") or "output"
            node = {**node, "inputs": {**inputs, "filename_prefix": f"comfyfleet/{tag}/{base}"}}
        isolated[node_id] = node
    return isolated


@dataclass(frozen=True)
class OutputFile:
    node_id: str
    filename: str
    subfolder: str
    type: str


@dataclass(frozen=True)
class OutputText:
    node_id: str
    text: str


def output_items(outputs: Any) -> tuple[list[OutputFile], list[OutputText]]:
    """Files and texts from a history entry's `outputs`: any UI key whose items are
    `{filename, subfolder, type}` (images, gifs, videos, audio, ...) and `text` values."""
    files: list[OutputFile] = []
    texts: list[OutputText] = []
    if not isinstance(outputs, dict):
        return files, texts
    for node_id, ui in outputs.items():
        if not isinstance(ui, dict):
            continue
        for key, items in ui.items():
            if not isinstance(items, list):
                continue
            for item in items:
                if key == "text" and isinstance(item, str):
                    texts.append(OutputText(str(node_id), item))
                elif isinstance(item, dict) and isinstance(item.get("filename"), str):
                    files.append(
                        OutputFile(
                            node_id=str(node_id),
                            filename=item["filename"],
                            subfolder=str(item.get("subfolder") or ""),
                            type=str(item.get("type") or "output"),
                        )
                    )
    return files, texts
