"""Simulated ComfyUI servers for tests, benchmarks and demos (`comfyfleet sim`)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from comfyfleet.sim.server import SimulatedComfyUI

__all__ = ["SimulatedComfyUI", "run_sim"]


async def run_sim(
    backends: int,
    port: int,
    host: str = "127.0.0.1",
    duration: float = 0.0,
    speeds: list[float] | None = None,
    data_dir: Path | None = None,
) -> None:
    """Serve `backends` simulators on ports `port`, `port + 1`, ... until cancelled.

    `speeds` gives each backend its speed factor in order; backends beyond the list run at
    1.0. With `data_dir`, backend i keeps its files in `data_dir/sim<i>` (separate servers
    have separate directories); without it, each uses a temporary directory.
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
