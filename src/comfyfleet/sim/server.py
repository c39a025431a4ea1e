"""SimulatedComfyUI: one simulated ComfyUI 0.3.64 server on an aiohttp web server."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from comfyfleet.sim.executor import Executor
from comfyfleet.sim.files import Folders
from comfyfleet.sim.hub import Hub
from comfyfleet.sim.nodes import load_specs
from comfyfleet.sim.prompt_queue import PromptQueue
from comfyfleet.sim.routes import MAX_UPLOAD_SIZE, Routes


class SimulatedComfyUI:
    """A fake ComfyUI speaking the real HTTP + websocket protocol, without a GPU.

    `speed` divides every simulated duration (a slower or faster GPU); `duration` is the time
    each prompt without a SimulatedWork node takes. Files live in `data_dir` (output/, input/,
    temp/); without one, a temporary directory is created and removed again by stop(). Queue,
    history and the prompt counter are in memory, so a new instance on the same data_dir
    behaves like a restarted server. An instance can be started once.
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
    ) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, not {speed}")
        self.host = host
        self.port = port
        self.duration = duration
        self.speed = speed
        self.name = name
        self._data_dir = data_dir
        self._owns_data_dir = data_dir is None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._folders: Folders | None = None

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
        if self._runner is not None or self._tasks:
            raise RuntimeError(f"{self.name} was already started")
        if self._data_dir is None:
            prefix = f"comfyfleet-{self.name}-"
            self._data_dir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=prefix))
        folders, specs = await asyncio.to_thread(_prepare, self._data_dir)
        self._folders = folders

        hub = Hub()
        queue = PromptQueue(hub)
        executor = Executor(
            specs=specs,
            folders=folders,
            hub=hub,
            queue=queue,
            speed=self.speed,
            duration=self.duration,
        )
        routes = Routes(specs=specs, folders=folders, hub=hub, queue=queue, executor=executor)
        app = web.Application(client_max_size=MAX_UPLOAD_SIZE, middlewares=[_origin_guard])
        app.add_routes(routes.table())

        async def close_sockets(_: web.Application) -> None:
            await hub.close_all()

        app.on_shutdown.append(close_sockets)
        # A short shutdown_timeout: stop() closes the websockets, nothing else lingers.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        self._tasks = [
            asyncio.create_task(hub.publish(), name=f"{self.name}-publish"),
            asyncio.create_task(executor.run(), name=f"{self.name}-worker"),
        ]

    async def stop(self) -> None:
        """Stop serving; running and pending prompts are dropped, as on a real shutdown."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
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
