"""Simulated ComfyUI servers for tests, benchmarks and demos (`comfyfleet sim`).

Failure injection and its run-time control API: faults.py and control.py; custom node
packages: custom_nodes.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from comfyfleet.comfy.cache import CLASSIC, CachePolicy
from comfyfleet.sim.server import MAX_UPLOAD_SIZE, SimulatedComfyUI

__all__ = ["SimulatedComfyUI", "run_sim"]


async def run_sim(
    backends: int,
    port: int,
    host: str = "127.0.0.1",
    duration: float = 0.0,
    speeds: list[float] | None = None,
    data_dir: Path | None = None,
    *,
    fail_rate: float = 0.0,
    fail_seed: int | None = None,
    hang: bool = False,
    view_bytes_per_second: int | None = None,
    output_size: int | None = None,
    max_upload_size: int = MAX_UPLOAD_SIZE,
    custom_nodes: Sequence[Path] = (),
    cache: CachePolicy = CLASSIC,
    load_seconds: float = 0.0,
) -> None:
    """Serve `backends` simulators on ports `port`, `port + 1`, ... until cancelled.

    `speeds` gives each backend its speed factor in order; backends beyond the list run at
    1.0. With `data_dir`, backend i keeps its files in `data_dir/sim<i>` (separate servers
    have separate directories); without it, each uses a temporary directory. The other
    options are SimulatedComfyUI's, the same for every backend, except that backend i draws
    its failures from `fail_seed + i`.
    """
    speeds = list(speeds or [])
    servers = [
        SimulatedComfyUI(
            host=host,
            port=port + i,
            duration=duration,
            speed=speeds[i] if i < len(speeds) else 1.0,
            data_dir=data_dir / f"sim{i}" if data_dir is not None else None,
            name=f"sim{i}",
            fail_rate=fail_rate,
            fail_seed=fail_seed + i if fail_seed is not None else None,
            hang=hang,
            view_bytes_per_second=view_bytes_per_second,
            output_size=output_size,
            max_upload_size=max_upload_size,
            custom_nodes=custom_nodes,
            cache=cache,
            load_seconds=load_seconds,
        )
        for i in range(backends)
    ]
    started: list[SimulatedComfyUI] = []
    try:
        for i, server in enumerate(servers):
            await server.start()
            started.append(server)
            print(f"sim {i} listening on {server.url} (speed {server.speed:g})", flush=True)
        await asyncio.Event().wait()
    finally:
        await asyncio.gather(*(server.stop() for server in started), return_exceptions=True)
