"""A simulated ComfyUI that has model files: the model nodes the repository's GPU workflows use,
as a real ComfyUI 0.3.64 describes them (tests/fixtures), its checkpoint loader listing the
files given. The simulator runs them as pass-throughs, so sd15_txt2img and sdxl_txt2img run on
it when it has their checkpoint, and are rejected (400, value not in list) when it has not.

`python -m tests.model_sim --port N --data-dir DIR --checkpoint NAME...` serves one until the
process is killed, for tests that kill and restart a backend.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from comfyfleet.sim import SimulatedComfyUI

FULL_OBJECT_INFO = (
    Path(__file__).resolve().parent / "fixtures" / "comfyui-0.3.64" / "object_info_full.json"
)
# What sd15_txt2img, sdxl_txt2img and sd15_img2img use beyond the simulator's own nodes.
MODEL_NODES = ("CheckpointLoaderSimple", "CLIPTextEncode", "KSampler", "VAEDecode", "VAEEncode")


def model_nodes(checkpoints: Sequence[str]) -> dict[str, Any]:
    """Node specs for SimulatedComfyUI(node_specs=...): a server with these checkpoints."""
    info: dict[str, Any] = json.loads(FULL_OBJECT_INFO.read_text())
    specs = {name: info[name] for name in MODEL_NODES}
    specs["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] = list(checkpoints)
    return specs


async def serve(port: int, data_dir: Path, duration: float, checkpoints: Sequence[str]) -> None:
    sim = SimulatedComfyUI(port=port, data_dir=data_dir, duration=duration,
                           node_specs=model_nodes(checkpoints))
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
