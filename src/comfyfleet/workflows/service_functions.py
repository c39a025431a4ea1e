"""Service functions (DESIGN §3): an optional `workflows/<name>.py` defining
`build(params, template) -> prompt`, for what a template cannot express (derived values, a
choice between parts of the template, a graph whose size depends on a parameter).

The file is executed afresh on every load, as a module with a name of its own, so a reload
runs the file as it is now: no bytecode cache (keyed on the file's mtime, which an edit within
the same second keeps), no module left over from an earlier load. A sync `build` runs in a
worker thread, so a slow one does not stall the service; either kind has BUILD_TIMEOUT_SECONDS.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import logging
import sys
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfyfleet.workflows.api_format import WorkflowError, check_api_format

log = logging.getLogger(__name__)

BUILD_TIMEOUT_SECONDS = 30.0

BuildFunction = Callable[[dict[str, Any], dict[str, Any]], Any]


class BuildError(Exception):
    """`build` raised, took too long or returned something that is not a prompt."""


def _what_failed(exc: BaseException, path: Path) -> str:
    """The exception in one line, with the line of the workflow's file it came from."""
    line = exc.lineno if isinstance(exc, SyntaxError) else next(
        (frame.lineno for frame in reversed(traceback.extract_tb(exc.__traceback__))
         if frame.filename == str(path)), None)
    where = f" ({path.name} line {line})" if line is not None else ""
    return f"{type(exc).__name__}: {exc}{where}"


@dataclass(frozen=True)
class ServiceFunction:
    path: Path
    build: BuildFunction

    async def __call__(self, params: dict[str, Any], template: dict[str, Any]
                       ) -> dict[str, Any]:
        """The prompt `build` makes; BuildError (logged, with the traceback) when it fails."""
        try:
            async with asyncio.timeout(BUILD_TIMEOUT_SECONDS) as deadline:
                built = await self._call(params, template)
        except TimeoutError as exc:
            if not deadline.expired():
                raise self._failed(exc) from exc
            log.error("%s: build() did not return within %s s", self.path.name,
                      BUILD_TIMEOUT_SECONDS)
            raise BuildError(f"build() in {self.path.name} did not return within "
                             f"{BUILD_TIMEOUT_SECONDS:g} s") from exc
        except (Exception, SystemExit) as exc:  # operator code: whatever it raises
            raise self._failed(exc) from exc
        try:
            # Through JSON and back: what is stored and sent must be plain JSON (no NaN, no
            # objects), with string node ids.
            return check_api_format(json.loads(json.dumps(built, allow_nan=False)))
        except (TypeError, ValueError) as exc:
            log.error("%s: build() returned an invalid prompt: %s", self.path.name, exc)
            raise BuildError(f"build() in {self.path.name} returned an invalid prompt: "
                             f"{exc}") from exc

    async def _call(self, params: dict[str, Any], template: dict[str, Any]) -> Any:
        if inspect.iscoroutinefunction(self.build):
            return await self.build(params, template)
        built = await asyncio.to_thread(self.build, params, template)
        return await built if inspect.isawaitable(built) else built

    def _failed(self, exc: BaseException) -> BuildError:
        log.error("%s: build() failed", self.path.name, exc_info=exc)
        return BuildError(f"build() in {self.path.name} failed: {_what_failed(exc, self.path)}")


def load_service_function(path: Path, source: bytes) -> ServiceFunction:
    """Execute `source` (read from `path`) and take its `build`; WorkflowError saying what
    is wrong otherwise. Blocking: the catalog loads through a thread."""
    name = f"comfyfleet_workflow_{path.stem}_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise WorkflowError(f"{path.name}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    # Registered while it runs, as an import would be: dataclasses and the like look it up.
    sys.modules[name] = module
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)
    except (Exception, SystemExit) as exc:  # operator code: whatever it raises
        raise WorkflowError(f"{path.name} cannot be loaded: {_what_failed(exc, path)}") from exc
    finally:
        del sys.modules[name]
    build = getattr(module, "build", None)
    if not callable(build):
        raise WorkflowError(f"{path.name} defines no build(params, template) function")
    return ServiceFunction(path, build)
