"""Deleting the files comfyfleet is done with from a backend (DESIGN §6).

Through the routes of the comfyui_nodes/ package (comfyfleet-cleanup), guarded by the shared
COMFYFLEET_NODE_TOKEN. Best effort by design: a file that cannot be deleted costs disk on
the GPU host, never a job, so failures are logged and nothing is raised. Used for a job's
outputs once they are stored (collector.py), and meant for the inputs comfyfleet uploads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from comfyfleet.comfy.client import ComfyClient, ComfyError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendFile:
    """A file in one of ComfyUI's directories, as /view and the uploads name it."""

    filename: str
    subfolder: str
    type: str  # output | input | temp


class BackendCleanup:
    """One backend's cleanup: whether its ComfyUI has the package, and deleting through it."""

    def __init__(self, client: ComfyClient, backend_name: str, token: str | None) -> None:
        self._client = client
        self._backend_name = backend_name
        self._token = token or None  # an empty COMFYFLEET_NODE_TOKEN= means unset
        self.version: str | None = None  # the package's version; None: not installed

    @property
    def enabled(self) -> bool:
        return self.version is not None and self._token is not None

    async def refresh(self) -> None:
        """Ask the backend whether it has the package (at every connect: a restarted ComfyUI
        may have gained or lost it). Never fails: without an answer, cleanup is off."""
        try:
            self.version = await self._client.cleanup_version()
        except ComfyError as exc:
            self.version = None
            log.warning("backend %s: cannot tell whether comfyfleet-cleanup is installed, "
                        "files stay there: %s", self._backend_name, exc)
            return
        if self.version is not None and self._token is None:
            log.warning("backend %s has comfyfleet-cleanup %s but COMFYFLEET_NODE_TOKEN is not "
                        "set: files stay there", self._backend_name, self.version)

    async def delete(self, files: Iterable[BackendFile]) -> None:
        """Delete each file (once, however often it is listed); a no-op when cleanup is off."""
        if not self.enabled:
            return
        assert self._token is not None
        for file in dict.fromkeys(files):
            try:
                deleted = await self._client.delete_file(
                    file.filename, file.subfolder, file.type, self._token
                )
            except ComfyError as exc:
                log.warning("backend %s: could not delete %s: %s", self._backend_name,
                            file, exc)
                continue
            if not deleted:
                log.info("backend %s: %s was already gone", self._backend_name, file)
