"""Custom node packages, imported the way ComfyUI imports them (protocol doc section 11).

A package is a directory with an `__init__.py` (or a single `.py` file). At import time it
registers HTTP routes on `server.PromptServer.instance.routes` and may read directories from
`folder_paths`; it must export NODE_CLASS_MAPPINGS, or it is skipped with a warning. An import
that raises is logged as `IMPORT FAILED` and the server starts anyway. As in ComfyUI, the
routes a package registered are served even if it was then skipped or failed, each under
`/x` and `/api/x`. The node classes themselves are not simulated: the simulator runs only its
own nodes.

Several simulators in one process. `server` and `folder_paths` are top-level modules, so
they are process-global, while every simulator needs its own routes and folders. Each
simulator therefore imports each package afresh, under a module name of its own
(`_comfyfleet_sim<N>_<package>`), with `sys.modules["server"]` and
`sys.modules["folder_paths"]` pointing at stand-ins built for that simulator while (and only
while) its packages import. `from server import PromptServer` and `import folder_paths` at the
top of a package, the usual way, thus bind that simulator's objects for good; the previous
entries are restored afterwards, so nothing else in the process sees the stand-ins. A lock
makes simultaneous loads take turns. The one thing that does not work is importing
`folder_paths` or `server` later, inside a handler.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from aiohttp import web

from comfyfleet.sim.files import Folders

logger = logging.getLogger(__name__)

# (event, data, sid): what PromptServer.send_sync queues for the websockets, from any thread.
SendSync = Callable[[Any, Any, str | None], None]

_STAND_IN_NAMES = ("server", "folder_paths")
_IMPORT_LOCK = threading.Lock()
_loads = itertools.count()


class PromptServer:
    """What `server.PromptServer.instance` offers a package inside the simulator."""

    instance: PromptServer

    def __init__(self, routes: web.RouteTableDef, send_sync: SendSync) -> None:
        self.routes = routes
        self._send_sync = send_sync

    def send_sync(self, event: Any, data: Any, sid: str | None = None) -> None:
        """Send a websocket message from any thread: JSON `data` as `{"type": event, "data"}`,
        bytes as a binary frame of event type `event`; `sid` None broadcasts."""
        self._send_sync(event, data, sid)


@dataclass
class CustomNodes:
    """What the packages of one simulator registered."""

    routes: web.RouteTableDef
    module_names: list[str]  # in sys.modules, to remove when the simulator stops

    def unload(self) -> None:
        for name in self.module_names:
            sys.modules.pop(name, None)


def load_custom_nodes(paths: Iterable[Path], folders: Folders, send_sync: SendSync) -> CustomNodes:
    """Import the packages at `paths` for one simulator (blocking: call it in a thread).

    A path that is a package (a directory with `__init__.py`, or a `.py` file) is one
    package; any other directory is searched like ComfyUI's `custom_nodes` folder.
    """
    routes = web.RouteTableDef()

    class SimulatorPromptServer(PromptServer):
        """A class per simulator, so that each has its own `PromptServer.instance`."""

    SimulatorPromptServer.instance = SimulatorPromptServer(routes, send_sync)
    server_module = ModuleType("server")
    server_module.PromptServer = SimulatorPromptServer  # type: ignore[attr-defined]
    stand_ins = {"server": server_module, "folder_paths": _folder_paths_module(folders)}
    prefix = f"_comfyfleet_sim{next(_loads)}_"
    loaded = CustomNodes(routes, [])
    import_times: list[tuple[float, str, bool]] = []
    with _IMPORT_LOCK:
        saved = {name: sys.modules.get(name) for name in _STAND_IN_NAMES}
        sys.modules.update(stand_ins)
        try:
            for package in _packages(paths):
                module_name = prefix + re.sub(r"\W", "_", package.stem)
                started = time.perf_counter()
                ok = _import_package(package, module_name)
                import_times.append((time.perf_counter() - started, str(package), ok))
                # A copy: another thread may be importing meanwhile.
                loaded.module_names += [
                    m for m in list(sys.modules) if m.split(".")[0] == module_name
                ]
        finally:
            for name, module in saved.items():
                if module is None:
                    sys.modules.pop(name, None)
                else:
                    sys.modules[name] = module
    if import_times:
        logger.info("Import times for custom nodes:")
        for seconds, package_path, ok in sorted(import_times):
            failed = "" if ok else " (IMPORT FAILED)"
            logger.info("%6.1f seconds%s: %s", seconds, failed, package_path)
    return loaded


def _packages(paths: Iterable[Path]) -> list[Path]:
    found = []
    for path in paths:
        if path.is_file() or (path / "__init__.py").is_file():
            found.append(path)
            continue
        # A custom_nodes folder: skips as ComfyUI's scan does.
        for entry in sorted(path.iterdir()):
            if entry.name == "__pycache__" or entry.name.endswith(".disabled"):
                continue
            if entry.is_file() and entry.suffix != ".py":
                continue
            found.append(entry)
    return found


def _import_package(path: Path, module_name: str) -> bool:
    """ComfyUI's load_custom_node: True if the package imported and has node mappings."""
    if path.is_file():
        spec = importlib.util.spec_from_file_location(module_name, path)
    else:
        spec = importlib.util.spec_from_file_location(
            module_name, path / "__init__.py", submodule_search_locations=[str(path)]
        )
    try:
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except Exception as error:
        logger.warning(traceback.format_exc())
        logger.warning("Cannot import %s module for custom nodes: %s", path, error)
        return False
    if getattr(module, "NODE_CLASS_MAPPINGS", None) is None:
        logger.warning(
            "Skip %s module for custom nodes due to the lack of NODE_CLASS_MAPPINGS "
            "or NODES_LIST (need one).",
            path,
        )
        return False
    if module.NODE_CLASS_MAPPINGS:
        names = ", ".join(module.NODE_CLASS_MAPPINGS)
        logger.info("%s: node classes are not simulated (%s)", path, names)
    return True


def _folder_paths_module(folders: Folders) -> ModuleType:
    """The part of ComfyUI's folder_paths a package needs to find files, for these folders."""
    module = ModuleType("folder_paths")
    directories = {"output": folders.output, "input": folders.input, "temp": folders.temp}
    values: dict[str, Any] = {
        "base_path": folders.root,
        "output_directory": folders.output,
        "input_directory": folders.input,
        "temp_directory": folders.temp,
        "get_output_directory": lambda: folders.output,
        "get_input_directory": lambda: folders.input,
        "get_temp_directory": lambda: folders.temp,
        # None for an unknown type, as in ComfyUI.
        "get_directory_by_type": lambda dir_type: directories.get(dir_type),
    }
    for name, value in values.items():
        setattr(module, name, value)
    return module
