"""`comfyfleet workflows import-seed PATH`: a ComfyUI-server checkout's workflows as comfyfleet
workflow files, and a plain report of what was converted and what was not, and why.

The reading is `workflows/seed_import.py` (with `ast`: nothing of the checkout is run). Each
file written is then loaded the way `serve` loads it, so what the report says loads does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from comfyfleet.workflows.api_format import WorkflowError
from comfyfleet.workflows.catalog import load_workflow
from comfyfleet.workflows.params import ParamSpec
from comfyfleet.workflows.seed_import import Conversion, convert_seed, find_layout


def _json_text(document: Any) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def _param_line(spec: ParamSpec) -> str:
    if spec.source is None:
        kind = "type from the fleet's /object_info once a backend connects"
    else:
        kind = spec.type
    if spec.type == "image":
        kind += ": base64 as before, or an http(s) URL or data: URI; uploaded for the job"
    default = "" if spec.default is None else f", default {spec.default!r}"
    return f"{spec.name} ({kind}{default})"


def _write(conversion: Conversion, out: Path, force: bool) -> list[str]:
    """Write one converted workflow; its report lines."""
    assert conversion.workflow is not None
    name = conversion.name
    files = {out / f"{name}.json": _json_text(conversion.workflow)}
    if conversion.sidecar:
        files[out / f"{name}.params.json"] = _json_text(conversion.sidecar)
    there = [path for path in files if path.exists()]
    if there and not force:
        return [f"FAIL {name}: {', '.join(str(p) for p in there)} already there; not "
                "overwritten (--force replaces)"]
    out.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    written = " + ".join(path.name for path in files)
    try:
        workflow = load_workflow(out / f"{name}.json")
    except (WorkflowError, OSError) as exc:
        return [f"FAIL {name}: wrote {written} but it does not load: {exc}"]
    lines = [f"OK   {name}: {out}/{written} (from {conversion.origin})"]
    lines.append("     params: " + (", ".join(_param_line(spec)
                                             for spec in workflow.params.values()) or "none"))
    lines.extend(f"     note: {note}" for note in conversion.notes)
    return lines


def import_seed(path: Path, out: Path, *, force: bool = False) -> tuple[list[str], bool]:
    """Report lines, and whether every workflow clients can call was converted."""
    try:
        layout = find_layout(path)
    except WorkflowError as exc:
        return [f"FAIL {exc}"], False
    lines = [f"templates: {layout.workflows}",
             f"service functions: {layout.services or 'none found (api/service.py)'}"]
    ok = True
    for conversion in convert_seed(layout):
        if conversion.workflow is not None:
            written = _write(conversion, out, force)
            ok = ok and written[0].startswith("OK")
            lines.extend(written)
        elif conversion.not_needed:
            lines.append(f"SKIP {conversion.name}: {conversion.problem}")
        else:
            ok = False
            lines.append(f"FAIL {conversion.name}: not converted: {conversion.problem}")
    return lines, ok
