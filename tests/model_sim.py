"""A simulated ComfyUI that has model files: the model nodes the repository's GPU workflows use,
as a real ComfyUI 0.3.64 describes them (the simulator's `models`), its loaders listing the
files given. The simulator runs them as pass-throughs, so sd15_txt2img and sdxl_txt2img run on
it when it has their checkpoint, and are rejected (400, value not in list) when it has not.

`python -m tests.model_sim --port N --data-dir DIR --checkpoint NAME...` serves one until the
process is killed, for tests that kill and restart a backend.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence
from pathlib import Path

from comfyfleet.sim import SimulatedComfyUI

FULL_OBJECT_INFO = (
    Path(__file__).resolve().parent / "fixtures" / "comfyui-0.3.64" / "object_info_full.json"
)


async def serve(port: int, data_dir: Path, duration: float, checkpoints: Sequence[str]) -> None:
    sim = SimulatedComfyUI(port=port, data_dir=data_dir, duration=duration,
                           models=checkpoints)
    async with sim:
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--checkpoint", action="append", default=[])
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.data_dir, args.duration, args.checkpoint))


if __name__ == "__main__":
    main()
