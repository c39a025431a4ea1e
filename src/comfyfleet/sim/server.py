"""SimulatedComfyUI: one simulated ComfyUI 0.3.64 server on an aiohttp web server."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import tempfile
import urllib.parse
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from comfyfleet.comfy.cache import CLASSIC, CachePolicy
from comfyfleet.sim.blocking import Disk
from comfyfleet.sim.control import ControlRoutes
from comfyfleet.sim.custom_nodes import CustomNodes, load_custom_nodes
from comfyfleet.sim.executor import Executor
from comfyfleet.sim.faults import Faults
from comfyfleet.sim.file_routes import FileRoutes
from comfyfleet.sim.files import Folders
from comfyfleet.sim.frames import binary_frame, text_frame
from comfyfleet.sim.hub import Hub
from comfyfleet.sim.nodes import load_specs, model_specs
from comfyfleet.sim.prompt_queue import PromptQueue
from comfyfleet.sim.routes import Routes, with_api_copies

MAX_UPLOAD_SIZE = 100 * 1024 * 1024  # ComfyUI's default --max-upload-size, for every request


@dataclass
class _Boot:
    """The server state a restart loses."""

    hub: Hub
    queue: PromptQueue
    executor: Executor
    tasks: list[asyncio.Task[None]]


class SimulatedComfyUI:
    """A fake ComfyUI speaking the real HTTP + websocket protocol, without a GPU.

    `speed` divides every simulated duration (a slower or faster GPU); `duration` is the time
    each prompt without a SimulatedWork node takes. Files live in `data_dir` (output/, input/,
    temp/); without one, a temporary directory is created and removed again by stop(). Queue,
    history and the prompt counter are in memory, so a new instance on the same data_dir
    behaves like a restarted server. An instance can be started once.

    Failure injection (see faults.py; changeable at run time through `faults` or the control
    API in control.py): `fail_rate` with `fail_seed`, `hang`, `view_bytes_per_second` and
    `output_size`. `max_upload_size` is ComfyUI's `--max-upload-size` (bigger bodies get 413).
    `custom_nodes` are package paths or custom_nodes folders, loaded as ComfyUI does
    (custom_nodes.py). `node_specs` adds (or replaces) node classes, given as /object_info
    describes them (e.g. a real server's loaders, listing the model files it has): they are
    listed and validated like the others, and run as pass-throughs unless simulated.
    `cache` is ComfyUI's cache option (classic, `--cache-lru N`, `--cache-none`), shown in
    system_stats argv. `models` are the model files the server has: given, it offers the model
    nodes the sample SD workflows use and the common loaders (CheckpointLoaderSimple,
    LoraLoader, VAELoader, CLIPLoader, UNETLoader), as real ComfyUI 0.3.64 describes them, each
    loader listing these files. `load_seconds` is what a loader, these or SimulatedLoader,
    takes (divided by `speed`) when the cache does not hold it.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        duration: float = 0.0,
        speed: float = 1.0,
        data_dir: Path | None = None,
        name: str = "sim",
        fail_rate: float = 0.0,
        fail_seed: int | None = None,
        hang: bool = False,
        view_bytes_per_second: int | None = None,
        output_size: int | None = None,
        max_upload_size: int = MAX_UPLOAD_SIZE,
        custom_nodes: Sequence[Path] = (),
        node_specs: Mapping[str, Any] | None = None,
        cache: CachePolicy = CLASSIC,
        load_seconds: float = 0.0,
        models: Sequence[str] | None = None,
    ) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, not {speed}")
        self.host = host
        self.port = port
        self.duration = duration
        self.speed = speed
        self.cache = cache
        self.load_seconds = load_seconds
        self.name = name
        self.faults = Faults(
            fail_rate=fail_rate,
            seed=fail_seed,
            hang=hang,
            view_bytes_per_second=view_bytes_per_second,
            output_size=output_size,
        )
        self.max_upload_size = max_upload_size
        self.restarts = 0
        # The requests it answered, by method and route ("GET /history/{prompt_id}"): what a
        # client asked, for tests to check.
        self.requests: Counter[str] = Counter()
        self._custom_node_paths = list(custom_nodes)
        self._node_specs = {**(model_specs(models) if models is not None else {}),
                            **(node_specs or {})}
        self._data_dir = data_dir
        self._owns_data_dir = data_dir is None
        self._runner: web.AppRunner | None = None
        self._folders: Folders | None = None
        self._specs: dict[str, Any] = {}
        self._routes: Routes | None = None
        self._boot: _Boot | None = None
        self._custom_nodes: CustomNodes | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._restart_lock = asyncio.Lock()
        self._disk = Disk()  # what it learns about the disk outlives a simulated restart

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RuntimeError("the data directory is created by start()")
        return self._data_dir

    async def start(self) -> None:
        """Bind and serve; with port 0 an ephemeral port is chosen and stored in `port`."""
        if self._routes is not None:
            raise RuntimeError(f"{self.name} was already started")
        self._loop = asyncio.get_running_loop()
        if self._data_dir is None:
            prefix = f"comfyfleet-{self.name}-"
            self._data_dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=prefix))
        folders, specs = await asyncio.to_thread(_prepare, self._data_dir)
        self._specs = {**specs, **self._node_specs}
        self._folders = folders
        routes = self._routes = Routes(
            specs=self._specs, folders=folders, disk=self._disk,
            max_upload_size=self.max_upload_size, faults=self.faults,
        )
        files = FileRoutes(
            folders=folders, faults=self.faults, max_upload_size=self.max_upload_size
        )
        comfy = routes.routes() + files.routes()
        @web.middleware
        async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
            route = request.match_info.route.resource
            self.requests[f"{request.method} {route.canonical if route else request.path}"] += 1
            return await handler(request)

        app = web.Application(client_max_size=self.max_upload_size,
                              middlewares=[count, _origin_guard])
        app.add_routes(with_api_copies(comfy))
        app.add_routes(ControlRoutes(self).routes())
        if self._custom_node_paths:
            self._custom_nodes = await asyncio.to_thread(
                load_custom_nodes, self._custom_node_paths, folders, self._send_sync
            )
            app.add_routes(with_api_copies(self._custom_nodes.routes))

        async def close_sockets(_: web.Application) -> None:
            if self._boot is not None:
                await self._boot.hub.close_all()

        app.on_shutdown.append(close_sockets)
        self._boot = self._new_boot()
        # A short shutdown_timeout: stop() closes the websockets, nothing else lingers.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await self._stop_boot()
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    def _new_boot(self) -> _Boot:
        assert self._folders is not None and self._routes is not None
        hub = Hub(self.faults)
        queue = PromptQueue(hub)
        executor = Executor(
            specs=self._specs,
            folders=self._folders,
            disk=self._disk,
            hub=hub,
            queue=queue,
            faults=self.faults,
            speed=self.speed,
            duration=self.duration,
            cache=self.cache,
            load_seconds=self.load_seconds,
        )
        self._routes.attach(hub, queue, executor)
        tasks = [
            asyncio.create_task(hub.publish(), name=f"{self.name}-publish"),
            asyncio.create_task(executor.run(), name=f"{self.name}-worker"),
        ]
        return _Boot(hub, queue, executor, tasks)

    async def _stop_boot(self) -> None:
        if self._boot is not None:
            for task in self._boot.tasks:
                task.cancel()
            await asyncio.gather(*self._boot.tasks, return_exceptions=True)

    async def stop(self) -> None:
        """Stop serving; running and pending prompts are dropped, as on a real shutdown."""
        await self._stop_boot()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._custom_nodes is not None:
            self._custom_nodes.unload()
        if self._folders is not None:
            # ComfyUI wipes temp at a clean shutdown; a directory we created goes entirely.
            if self._owns_data_dir:
                await asyncio.to_thread(shutil.rmtree, self._folders.root, True)
            else:
                await asyncio.to_thread(self._folders.wipe_temp)

    async def __aenter__(self) -> SimulatedComfyUI:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # --- failure injection (the control API calls these) ----------------------------------------

    def state(self) -> dict[str, Any]:
        boot = self._running()
        return {
            "name": self.name,
            "faults": self.faults.as_json(),
            "clients": sorted(boot.hub.sockets),
            "queue_remaining": boot.queue.remaining(),
            "restarts": self.restarts,
        }

    def drop_websockets(self) -> int:
        """Cut every websocket connection now, without a close frame; returns how many."""
        return self._running().hub.drop_all()

    async def crash_and_restart(self) -> None:
        """What a killed and restarted ComfyUI looks like to its clients, without the downtime:
        connections cut, queue, history, counter and cache gone, temp wiped, files kept."""
        async with self._restart_lock:
            boot = self._running()
            await self._stop_boot()
            boot.hub.drop_all()
            assert self._folders is not None
            await asyncio.to_thread(self._folders.prepare)
            self._boot = self._new_boot()
            self.restarts += 1

    def _running(self) -> _Boot:
        if self._boot is None:
            raise RuntimeError(f"{self.name} is not running")
        return self._boot

    def _send_sync(self, event: Any, data: Any, sid: str | None) -> None:
        """PromptServer.send_sync for custom nodes: callable from any thread."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, event, data, sid)

    def _deliver(self, event: Any, data: Any, sid: str | None) -> None:
        if self._boot is None:
            return  # stopped meanwhile
        if isinstance(data, bytes | bytearray):
            frame: str | bytes = binary_frame(int(event), bytes(data))
        else:
            frame = text_frame(str(event), data)
        self._boot.hub.send_frame(frame, sid)


def _prepare(data_dir: Path) -> tuple[Folders, dict[str, Any]]:
    folders = Folders(os.path.abspath(data_dir))
    folders.prepare()
    return folders, load_specs()


@web.middleware
async def _origin_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ComfyUI's CSRF guard: on a loopback Host, an Origin naming another host gets 403.

    Clients that send no Origin (aiohttp, requests) are never affected.
    """
    host, origin = request.headers.get("Host"), request.headers.get("Origin")
    if host is not None and origin is not None:
        host_domain: Any = host.lower()
        parsed_origin = urllib.parse.urlparse(origin)
        origin_domain: Any = parsed_origin.netloc.lower()
        parsed_host = urllib.parse.urlsplit("//" + host_domain)
        loopback = _is_loopback(parsed_host.hostname)
        # A side without a port is compared by host name only.
        if parsed_origin.port is None:
            host_domain = parsed_host.hostname
        if parsed_host.port is None:
            origin_domain = parsed_origin.hostname
        if loopback and host_domain and origin_domain and host_domain != origin_domain:
            return web.Response(status=403)
    if request.method == "OPTIONS":
        return web.Response()
    return await handler(request)


def _is_loopback(host: str | None) -> bool:
    # ComfyUI resolves names through DNS; the simulator only knows "localhost" by name, so as
    # not to block the event loop on a resolver.
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
