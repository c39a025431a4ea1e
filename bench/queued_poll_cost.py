"""What a GET of a queued job costs comfyfleet's serve process: its queue position and ETA.

One zero-duration simulated ComfyUI behind `comfyfleet serve` (embedded PostgreSQL, S3 on
moto), as `bench.v2_poll_cost` deploys it. A few jobs run (so that the workflow's run time is
known and a queued job has an ETA), the backend is drained, and one more job stays queued;
then `--polls` GETs of it, one at a time, through /api/v1 and /api/v2: serve's and
PostgreSQL's CPU per GET, and the load average at the end.
To compare with another checkout, run it from there (PYTHONPATH=<its src>:<it>), in turns.

Run from the repository root:  .venv/bin/python -m bench.queued_poll_cost [--polls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from contextlib import AsyncExitStack
from typing import Any

from bench.harness import PARAMS, WORKFLOW, bench_root, deploy

SERVE = "comfyfleet serve"


async def run(polls: int) -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        root = stack.enter_context(bench_root())
        deployment = await deploy(stack, root, 1)
        api, http, meter = deployment.serve.api, deployment.http, deployment.meter
        for _ in range(3):  # the workflow's run time learned
            async with http.post(f"{api}/jobs?wait=20",
                                 json={"workflow": WORKFLOW, "params": PARAMS}) as response:
                assert (await response.json())["status"] == "succeeded"
        async with http.get(f"{api}/backends") as response:
            name = (await response.json())[0]["name"]
        async with http.post(f"{api}/backends/{name}/drain", json={}) as response:
            assert response.status < 300, await response.text()
        async with http.post(f"{api}/jobs", json={"workflow": WORKFLOW, "params": PARAMS}
                             ) as response:
            job_id = (await response.json())["id"]
        per_get: dict[str, dict[str, float]] = {}
        for path in (f"/api/v1/jobs/{job_id}", f"/api/v2/jobs/{job_id}"):
            url = deployment.serve.base + path
            for _ in range(50):  # warm up
                async with http.get(url) as response:
                    body = await response.json()
            assert body.get("status") in ("queued", "pending"), body
            meter.start()
            for _ in range(polls):
                async with http.get(url) as response:
                    assert response.status == 200, await response.text()
                    await response.read()
            meter.stop()
            per_get[path.replace(job_id, "{id}")] = {
                name: round(1000 * meter.used[name] / polls, 3) for name in (SERVE, "postgres")}
    return {"polls": polls, "cpu_ms_per_get": per_get, "load": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--polls", type=int, default=2000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.polls))))


if __name__ == "__main__":
    main()
