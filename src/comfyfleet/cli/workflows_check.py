"""`comfyfleet workflows check`: every workflow file (service functions included: one whose
parameters all have defaults is run with them), and what live backends would say of it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from comfyfleet.comfy.capabilities import Capabilities
from comfyfleet.comfy.client import ComfyClient, ComfyError
from comfyfleet.comfy.endpoints import parse_endpoint
from comfyfleet.http_client import HttpClient
from comfyfleet.workflows.catalog import load_catalog
from comfyfleet.workflows.service_functions import BuildError


async def check_workflows(directory: Path, endpoints: list[str]) -> tuple[list[str], bool]:
    """Report lines, and whether everything is fine."""
    catalog = await asyncio.to_thread(load_catalog, directory)
    lines: list[str] = []
    ok = not catalog.errors
    for name, error in sorted(catalog.errors.items()):
        lines.append(f"FAIL {name}: {error}")
    backends: dict[str, Capabilities] = {}
    async with aiohttp.ClientSession() as http, HttpClient() as lean_http:
        for text in endpoints:
            backend = parse_endpoint(text)
            try:
                info = await ComfyClient(backend.url, http, lean_http).object_info()
            except ComfyError as exc:
                lines.append(f"FAIL backend {backend.name}: {exc}")
                ok = False
                continue
            backends[backend.name] = Capabilities.from_object_info(info)
    for name, workflow in sorted(catalog.workflows.items()):
        try:
            prompt = await workflow.sample_prompt()
        except BuildError as exc:
            lines.append(f"FAIL {name}: with the default parameters, {exc}")
            ok = False
            continue
        runs_on, notes, failed = [], [], False
        for backend_name, capabilities in backends.items():
            missing = capabilities.missing(prompt)
            out_of_range = capabilities.out_of_range(prompt)
            failed = failed or bool(out_of_range)
            if not missing:
                runs_on.append(backend_name)
            notes += [f"{backend_name}: {issue}" for issue in missing + out_of_range]
        failed = failed or (bool(backends) and not runs_on)
        ok = ok and not failed
        params = ", ".join(workflow.params) or "no parameters"
        where = f"; runs on {', '.join(runs_on) or 'no backend'}" if backends else ""
        lines.append(f"{'FAIL' if failed else 'ok  '} {name} ({params}){where}")
        lines += [f"     {note}" for note in notes]
    return lines, ok
