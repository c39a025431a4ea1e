"""Simulated ComfyUI servers for tests, benchmarks and demos (`comfyfleet sim`).

Failure injection and its run-time control API: faults.py and control.py; custom node
packages: custom_nodes.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict, Unpack

from comfyfleet.comfy.cache import CachePolicy
from comfyfleet.sim.server import SimulatedComfyUI

__all__ = ["SimOptions", "SimulatedComfyUI", "run_sim"]


class SimOptions(TypedDict, total=False):
    """SimulatedComfyUI's options that `run_sim` gives every backend alike."""

    fail_rate: float
    hang: bool
    view_bytes_per_second: int | None
    output_size: int | None
    max_upload_size: int
    custom_nodes: Sequence[Path]
    cache: CachePolicy
    load_seconds: float
    models: Sequence[str] | None


async def run_sim(
    backends: int,
    port: int,
    host: str = "127.0.0.1",
    duration: float = 0.0,
    speeds: list[float] | None = None,
    data_dir: Path | None = None,
    *,
    fail_seed: int | None = None,
    **options: Unpack[SimOptions],
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
            fail_seed=fail_seed + i if fail_seed is not None else None,
            **options,
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
