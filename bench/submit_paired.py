"""This checkout's `comfyfleet serve` against another checkout's: the service's CPU per
POST /api/v1/jobs (or, with --v2, POST /api/v2/jobs of an API-format graph), side by side on
one machine, in turns so that both see the same load.

Embedded PostgreSQL (a database for each service), local storage, no backends: the jobs stay
queued, so what is measured is the submit alone (the request served, the job built and
inserted). Sequential submits of the benchmark's workflow with a callback URL, in blocks of
100 per service, alternating which goes first; the first block of each warms up. The CPU
each service process used is read from /proc.

Run from the repository root:
    .venv/bin/python -m bench.submit_paired --other ../main/src [--blocks 10] [--v2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp

from bench.harness import (
    PARAMS,
    WORKFLOW,
    bench_root,
    comfyfleet_serve,
    embedded_postgres,
    fresh_database,
)
from bench.v2_overhead import graph
from bench.v2_paired import cpu_seconds
from comfyfleet.webhooks.signing import new_secret
from tests.support import LOOPBACK, REPO

BLOCK = 100  # submits to one service before the other's turn


async def run(other: Path, blocks: int, v2: bool) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        root = stack.enter_context(bench_root())
        postgres = await stack.enter_async_context(embedded_postgres(root))
        secret = new_secret()
        checkouts = {"this checkout": None, f"--other {other}": {
            "PYTHONPATH": os.pathsep.join([str(other), str(REPO)])}}
        serves = {
            name: await stack.enter_async_context(comfyfleet_serve(
                await fresh_database(postgres), root / f"data-{index}", [], secret=secret,
                env_overrides=env))
            for index, (name, env) in enumerate(checkouts.items())}
        # Never called: no backend runs the jobs.
        body = {"workflow": WORKFLOW, "params": PARAMS,
                "callback_url": f"http://{LOOPBACK}:9/webhook"}
        path, accepted = "/api/v1/jobs", 202
        if v2:  # with no backend known, only the graph's structure is checked
            body, path, accepted = {"workflow": graph(0)}, "/api/v2/jobs", 201
        used = dict.fromkeys(serves, 0.0)
        names = list(serves)
        async with aiohttp.ClientSession() as http:
            for block in range(blocks + 1):
                for name in names if block % 2 == 0 else reversed(names):
                    before = cpu_seconds(serves[name].process.pid)
                    for _ in range(BLOCK):
                        async with http.post(serves[name].base + path,
                                             json=body) as response:
                            if response.status != accepted:
                                raise RuntimeError(f"{name}: {response.status} "
                                                   f"{await response.text()}")
                    if block > 0:
                        used[name] += cpu_seconds(serves[name].process.pid) - before
    return {"submits": blocks * BLOCK, "path": path,
            "serve_cpu_ms_per_submit": {name: round(1000 * used[name] / (blocks * BLOCK), 3)
                                        for name in serves},
            "load": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--other", type=Path, required=True,
                        help="the `src` directory of the checkout to compare with")
    parser.add_argument("--blocks", type=int, default=10, help="blocks of 100 submits, each")
    parser.add_argument("--v2", action="store_true", help="submit through the Comfy API v2")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.other.resolve(), args.blocks, args.v2))))


if __name__ == "__main__":
    main()
