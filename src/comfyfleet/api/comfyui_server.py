"""The edge of ComfyUI-server's request shape (`POST ROUTE_PREFIX`, COMFYUI_SERVER_COMPAT): its
leniency at intake. ComfyUI-server's service functions read the parameters they use and never
look at the rest, so its clients may send more (a `seed` the workflow does not take); here
those are left out of the job, each with a warning in it, where `POST /jobs` answers 422.
The other half, the answer and callback body, is `jobs/comfyui_server.py`."""

from __future__ import annotations

from typing import Any

from comfyfleet.workflows.catalog import Catalog


def known_params(
    catalog: Catalog, workflow: str, params: dict[str, Any]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The parameters `workflow` takes, and a warning for each one left out. An unknown or
    broken workflow keeps them all: intake says what is wrong with it."""
    found = catalog.get(workflow)
    if found is None:
        return params, []
    taken = ", ".join(found.params) or "none"
    warnings = [{"type": "param_ignored", "param": name,
                 "message": f"{name!r} is not a parameter of workflow {workflow!r} (it takes: "
                            f"{taken}); ignored, as ComfyUI-server did (COMFYUI_SERVER_COMPAT)"}
                for name in params if name not in found.params]
    return {name: value for name, value in params.items() if name in found.params}, warnings
