"""comfyfleet-cleanup: lets comfyfleet delete the files of a job it has stored elsewhere.

A ComfyUI custom node package (copy this directory into `ComfyUI/custom_nodes/`). It adds
two HTTP routes, also served under `/api/...` as ComfyUI does for every route:

- `GET /comfyfleet/ping` -> `{"package": "comfyfleet-cleanup", "version": ...}`, no token.
- `POST /comfyfleet/delete` with `{"filename", "subfolder", "type"}` and
  `Authorization: Bearer <COMFYFLEET_NODE_TOKEN>`: deletes that file from ComfyUI's output,
  input or temp directory. See README.md for every answer it gives.

It uses only what ComfyUI itself provides (aiohttp, `server`, `folder_paths`) and defines no
nodes. The token is read from the environment at each request, so the route is disabled
(403) until the variable is set in ComfyUI's environment, and nothing is cached.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import stat

import folder_paths
from aiohttp import web
from server import PromptServer

__version__ = "0.1.0"

# ComfyUI skips a package without NODE_CLASS_MAPPINGS; this one only adds routes.
NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}

TOKEN_VARIABLE = "COMFYFLEET_NODE_TOKEN"
DIR_TYPES = ("output", "input", "temp")

log = logging.getLogger(__name__)
routes: web.RouteTableDef = PromptServer.instance.routes


class Refused(Exception):
    """The request cannot be honoured; carries the HTTP status and the reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@routes.get("/comfyfleet/ping")
async def ping(request: web.Request) -> web.Response:
    return web.json_response({"package": "comfyfleet-cleanup", "version": __version__})


@routes.post("/comfyfleet/delete")
async def delete(request: web.Request) -> web.Response:
    try:
        check_token(request.headers.get("Authorization", ""))
        filename, subfolder, dir_type = await read_body(request)
        base, target = resolve(dir_type, subfolder, filename)
        remove(target)
        remove_if_empty(os.path.dirname(target), base)
    except Refused as refused:
        if refused.status == 403:
            log.warning("comfyfleet-cleanup refused a delete: %s", refused.reason)
        headers = {"WWW-Authenticate": "Bearer"} if refused.status == 401 else None
        return web.json_response({"error": refused.reason}, status=refused.status,
                                 headers=headers)
    return web.json_response({"deleted": True})


def check_token(authorization: str) -> None:
    expected = os.environ.get(TOKEN_VARIABLE, "")
    if not expected:
        # Never open by default: an unset token disables deleting altogether.
        raise Refused(403, f"{TOKEN_VARIABLE} is not set on this ComfyUI server, so deleting "
                           "is disabled; set it to the token comfyfleet uses")
    scheme, _, given = authorization.partition(" ")
    # Compared as bytes: compare_digest rejects non-ASCII str, and a header may hold anything.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        raise Refused(401, "missing or wrong bearer token")


async def read_body(request: web.Request) -> tuple[str, str, str]:
    try:
        body = await request.json()
    except ValueError:
        raise Refused(400, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise Refused(400, "the body must be a JSON object")
    filename, subfolder, dir_type = (body.get("filename"), body.get("subfolder", ""),
                                     body.get("type"))
    if not isinstance(filename, str) or not filename:
        raise Refused(400, "filename must be a non-empty string")
    if not isinstance(subfolder, str):
        raise Refused(400, "subfolder must be a string")
    if dir_type not in DIR_TYPES:
        raise Refused(400, f"type must be one of {', '.join(DIR_TYPES)}")
    if "\x00" in filename or "\x00" in subfolder:
        raise Refused(400, "names must not contain NUL")
    return filename, subfolder, dir_type


def resolve(dir_type: str, subfolder: str, filename: str) -> tuple[str, str]:
    """The type's directory and the path to delete: `subfolder/filename` strictly inside it.

    Names are used exactly as sent (never URL-decoded). Symlinks are resolved before the
    containment checks, both in the directories leading to the file and in the file itself,
    so neither `..`, an absolute path nor a link can reach outside. A link inside that points
    inside is deleted itself, not its target.
    """
    directory = folder_paths.get_directory_by_type(dir_type)
    if directory is None:
        raise Refused(400, f"ComfyUI has no {dir_type} directory")
    base = os.path.realpath(directory)
    requested = os.path.join(base, subfolder, filename)
    parent = os.path.realpath(os.path.dirname(requested))
    name = os.path.basename(requested)
    outside = Refused(403, f"subfolder {subfolder!r}, filename {filename!r} does not name a "
                           f"file inside the {dir_type} directory")
    if name in ("", ".", "..") or not is_within(base, parent):
        raise outside
    target = os.path.join(parent, name)
    resolved = os.path.realpath(target)
    if resolved == base or not is_within(base, resolved):
        raise outside
    return base, target


def is_within(base: str, path: str) -> bool:
    try:
        return os.path.commonpath((base, path)) == base
    except ValueError:  # on Windows, paths on different drives
        return False


def remove(target: str) -> None:
    try:
        mode = os.lstat(target).st_mode
    except FileNotFoundError:
        raise Refused(404, "no such file") from None
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise Refused(400, "not a file")
    try:
        os.unlink(target)
    except FileNotFoundError:
        raise Refused(404, "no such file") from None  # someone else deleted it first
    except OSError as error:
        raise Refused(500, f"could not delete: {error.strerror}") from None
    log.debug("comfyfleet-cleanup deleted %s", target)


def remove_if_empty(directory: str, base: str) -> None:
    """Remove the file's directory once it is empty: comfyfleet gives every prompt a
    subfolder of its own, which would otherwise pile up. Never the type's directory itself,
    nor any above the file's own, which other prompts may be writing into."""
    if directory != base:
        # Not empty (or already gone) is the common case and nothing to report.
        with contextlib.suppress(OSError):
            os.rmdir(directory)
