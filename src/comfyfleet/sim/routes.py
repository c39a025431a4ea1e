"""HTTP and websocket handlers, mirroring ComfyUI's server.py route by route."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import sys
import uuid
from collections.abc import Iterable
from typing import Any

from aiohttp import WSMsgType, web

from comfyfleet.sim.blocking import Disk
from comfyfleet.sim.executor import Executor
from comfyfleet.sim.faults import Faults
from comfyfleet.sim.file_routes import server_error
from comfyfleet.sim.files import Folders
from comfyfleet.sim.hub import Hub
from comfyfleet.sim.prompt_queue import PromptQueue, QueueItem
from comfyfleet.sim.validation import validate_prompt

COMFYUI_VERSION = "0.3.64"


def with_api_copies(routes: Iterable[web.AbstractRouteDef]) -> list[web.AbstractRouteDef]:
    """The routes plus an `/api` copy of each non-static one, as ComfyUI registers its own
    routes and those of custom nodes."""
    routes = list(routes)
    api = [
        web.RouteDef(r.method, "/api" + r.path, r.handler, r.kwargs)
        for r in routes
        if isinstance(r, web.RouteDef)
    ]
    return [*api, *routes]


class _BadBody(Exception):
    """The request body is not the JSON object the handler needs."""


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError as error:
        raise _BadBody from error
    if not isinstance(body, dict):
        raise _BadBody
    return body


async def _held(request: web.Request, faults: Faults) -> bool:
    """Hold a request while the `prompt_delay` fault says: until that many seconds have passed
    since it arrived, by the fault's current value, so that lowering or clearing it releases
    the requests held. False if the client went away meanwhile."""
    if not faults.prompt_delay:
        return True
    loop = asyncio.get_running_loop()
    arrived = loop.time()
    # aiohttp does not cancel a handler whose client left: look every few ticks.
    while not _client_gone(request):
        left = arrived + (faults.prompt_delay or 0.0) - loop.time()
        if left <= 0:
            return True
        await asyncio.sleep(min(left, 0.05))
    return False


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


class Routes:
    """The core routes except files. They work on the server state that attach() gave them,
    which a simulated restart replaces."""

    hub: Hub
    queue: PromptQueue
    executor: Executor

    def __init__(
        self,
        *,
        specs: dict[str, Any],
        folders: Folders,
        disk: Disk,
        max_upload_size: int,
        faults: Faults | None = None,
    ) -> None:
        self.specs = specs
        self.folders = folders
        self.disk = disk
        self.faults = faults if faults is not None else Faults()
        self.server_features = {
            "supports_preview_metadata": True,
            "max_upload_size": max_upload_size,
        }
        self.counter = 0  # the `number` given to prompts submitted without one

    def attach(self, hub: Hub, queue: PromptQueue, executor: Executor) -> None:
        """Serve this (new) server state, with the prompt counter back at 0."""
        self.hub, self.queue, self.executor = hub, queue, executor
        self.counter = 0

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/ws", self.websocket),
            web.get("/prompt", self.get_prompt),
            web.post("/prompt", self.post_prompt),
            web.get("/queue", self.get_queue),
            web.post("/queue", self.post_queue),
            web.post("/interrupt", self.post_interrupt),
            web.post("/free", self.post_free),
            web.get("/history", self.get_history),
            web.get("/history/{prompt_id}", self.get_history_item),
            web.post("/history", self.post_history),
            web.get("/system_stats", self.system_stats),
            web.get("/object_info", self.object_info),
            web.get("/object_info/{node_class}", self.object_info_item),
            web.get("/features", self.features),
        ]

    # --- prompts and queue -------------------------------------------------------------------

    async def post_prompt(self, request: web.Request) -> web.Response:
        if not await _held(request, self.faults):
            return web.Response(status=503)  # nobody is left to read it
        if self.faults.prompt_status is not None:  # read after the hold, as it is then
            return web.Response(status=self.faults.prompt_status, text="prompt not taken")
        try:
            body = await _json_object(request)
        except _BadBody:
            return server_error()
        number: int | float
        if "number" in body:
            try:
                number = float(body["number"])
            except (TypeError, ValueError):
                return server_error()
        else:
            # Counted even if the prompt is then rejected (a real server does the same).
            number = -self.counter if body.get("front") else self.counter
            self.counter += 1
        if "prompt" not in body:
            error = {
                "type": "no_prompt",
                "message": "No prompt provided",
                "details": "No prompt provided",
                "extra_info": {},
            }
            return web.json_response({"error": error, "node_errors": {}}, status=400)
        prompt, extra_data = body["prompt"], body.get("extra_data", {})
        if not isinstance(prompt, dict) or not isinstance(extra_data, dict):
            return server_error()
        # 0.3.64 takes any prompt_id as is (str() of it) and does not check uniqueness.
        prompt_id = str(body["prompt_id"]) if "prompt_id" in body else str(uuid.uuid4())
        result = await validate_prompt(
            prompt, self.specs, self.folders, self.disk, body.get("partial_execution_targets")
        )
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not result.ok:
            rejected = {"error": result.error, "node_errors": result.node_errors}
            return web.json_response(rejected, status=400)
        self.queue.put(QueueItem(number, prompt_id, prompt, extra_data, result.outputs))
        accepted = {"prompt_id": prompt_id, "number": number, "node_errors": result.node_errors}
        return web.json_response(accepted)

    async def get_prompt(self, request: web.Request) -> web.Response:
        return web.json_response(self.queue.exec_info())

    async def get_queue(self, request: web.Request) -> web.Response:
        running, pending = self.queue.running_json(), self.queue.pending_json()
        return web.json_response({"queue_running": running, "queue_pending": pending})

    async def post_queue(self, request: web.Request) -> web.Response:
        try:
            body = await _json_object(request)
        except _BadBody:
            return server_error()
        if body.get("clear"):
            self.queue.clear()
        for prompt_id in body.get("delete", []):
            self.queue.delete(prompt_id)
        return web.Response()

    async def post_interrupt(self, request: web.Request) -> web.Response:
        try:
            body = await _json_object(request)
        except _BadBody:
            body = {}  # the body is optional here
        prompt_id = body.get("prompt_id")
        running = self.queue.running
        # A prompt_id only interrupts if it is the running prompt; a pending one is untouched.
        if not prompt_id or (running is not None and running.prompt_id == prompt_id):
            self.executor.interrupted.set()
        return web.Response()

    async def post_free(self, request: web.Request) -> web.Response:
        try:
            body = await _json_object(request)
        except _BadBody:
            return server_error()
        if body.get("free_memory"):
            # Applied before the next prompt, so that one really runs again.
            self.executor.free_requested = True
        return web.Response()

    async def get_history(self, request: web.Request) -> web.Response:
        max_items = request.query.get("max_items")
        offset = request.query.get("offset")
        history = self.queue.history_json(
            int(max_items) if max_items is not None else None,
            int(offset) if offset is not None else -1,
        )
        return web.Response(text=history, content_type="application/json")

    async def get_history_item(self, request: web.Request) -> web.Response:
        entry = self.queue.history_item_json(request.match_info["prompt_id"])
        return web.Response(text=entry, content_type="application/json")

    async def post_history(self, request: web.Request) -> web.Response:
        try:
            body = await _json_object(request)
        except _BadBody:
            return server_error()
        if body.get("clear"):
            self.queue.history.clear()
        for prompt_id in body.get("delete", []):
            self.queue.history.pop(prompt_id, None)
        return web.Response()

    # --- server information ------------------------------------------------------------------

    async def system_stats(self, request: web.Request) -> web.Response:
        if self.faults.system_stats_status is not None:
            return web.Response(status=self.faults.system_stats_status, text="stats unavailable")
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        host, port = sockname[:2] if sockname else ("", 0)
        # argv tells instances apart, as a real server's command line does.
        argv = ["main.py", "--cpu", "--listen", host, "--port", str(port)]
        argv += ["--output-directory", self.folders.output, "--input-directory", self.folders.input]
        argv += ["--temp-directory", self.folders.root, *self.executor.cache.policy.argv()]
        ram_total, ram_free = _memory()
        system = {
            "os": os.name,
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": COMFYUI_VERSION,
            "required_frontend_version": "1.27.10",
            # Plausible values only: a simulator has no templates package and no torch.
            "installed_templates_version": "0.1.95",
            "required_templates_version": "0.1.95",
            "python_version": sys.version,
            "pytorch_version": "2.8.0+cpu",
            "embedded_python": False,
            "argv": argv,
        }
        device = {
            "name": "cpu",
            "type": "cpu",
            "index": None,
            "vram_total": ram_total,
            "vram_free": ram_free,
            "torch_vram_total": ram_total,
            "torch_vram_free": ram_free,
        }
        return web.json_response({"system": system, "devices": [device]})

    async def _object_info(self) -> dict[str, Any]:
        """The specs, with LoadImage's combos listing the input directory as it is now."""
        images = await asyncio.to_thread(self.folders.input_images)
        info = dict(self.specs)
        for class_type in ("LoadImage", "LoadImageMask"):
            spec = info[class_type] = copy.deepcopy(info[class_type])
            spec["input"]["required"]["image"][0] = images
        return info

    async def object_info(self, request: web.Request) -> web.Response:
        return web.json_response(await self._object_info())

    async def object_info_item(self, request: web.Request) -> web.Response:
        node_class = request.match_info["node_class"]
        info = await self._object_info()
        return web.json_response({node_class: info[node_class]} if node_class in info else {})

    async def features(self, request: web.Request) -> web.Response:
        return web.json_response(self.server_features)

    # --- websocket ---------------------------------------------------------------------------

    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        # `timeout` bounds the close handshake only; no compression because the hub writes
        # the frames itself.
        ws = web.WebSocketResponse(timeout=2.0, compress=False)
        await ws.prepare(request)
        # This socket belongs to the server state of now, even if a restart replaces it.
        hub, queue, executor = self.hub, self.queue, self.executor
        sid = request.query.get("clientId", "")
        if sid:
            hub.sockets.pop(sid, None)
        else:
            sid = uuid.uuid4().hex
        hub.sockets[sid] = ws
        hub.client_flags[sid] = {}
        if request.transport is not None:
            hub.connections[ws] = request.transport
        try:
            hub.send_now(sid, "status", {"status": queue.exec_info(), "sid": sid})
            node = executor.executing_node(sid)
            if node is not None:
                # The only replay on reconnect: which node runs, without prompt_id.
                hub.send_now(sid, "executing", {"node": node})
            first_message = True
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(message.data)
                except ValueError:
                    data = None
                if not isinstance(data, dict):
                    continue  # ignored, and (as in ComfyUI) the next message still counts as first
                if first_message and data.get("type") == "feature_flags":
                    flags = data.get("data")
                    hub.client_flags[sid] = flags if isinstance(flags, dict) else {}
                    hub.send_now(sid, "feature_flags", self.server_features)
                first_message = False
        finally:
            # By id, not by socket: this is what unregisters a newer socket with the same id.
            hub.sockets.pop(sid, None)
            hub.client_flags.pop(sid, None)
            hub.connections.pop(ws, None)
        return ws


def _memory() -> tuple[int, int]:
    """Total and available RAM in bytes (0 where sysconf does not know)."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return 0, 0
