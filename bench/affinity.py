"""Cache-aware placement: jobs for several models on a fleet whose GPUs hold one model at a time.

N simulated backends (ComfyUI's classic cache: a backend holds what its last prompt loaded),
M models, J jobs of the `simulated_model` workflow in shuffled model order: a load of LOAD
seconds unless the backend's cache holds the model, then WORK seconds of work. All jobs are
submitted at once, to `comfyfleet serve` with AFFINITY_WINDOW as configured (cache-aware) and,
in the same run, with AFFINITY_WINDOW=0 (strict FIFO, blind to the cache). Reported: makespan
over the lower bound (jobs x work + distinct models x load, over backends), and how many
prompts ran the loader (the minimum is the number of models; a blind fleet loads in about
every prompt where consecutive jobs want different models), and the most later jobs any one
job saw dispatched before it (AFFINITY_WINDOW bounds it). With --timeline, each backend's
prompts in the order they ran (a capital letter: the model was loaded), to trace a run.

Run from the repository root:  .venv/bin/python -m bench.affinity [--backends 4] [--models 3]
    [--jobs 120] [--load 3] [--work 1] [--window 32, the default] [--seed 7] [--timeline]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import datetime

import aiohttp

from bench.harness import (
    bench_root,
    comfyfleet_serve,
    embedded_postgres,
    fresh_database,
    print_table,
    sim_fleet,
)
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.settings import Settings
from comfyfleet.sim.nodes import SIMULATED_MODELS
from comfyfleet.webhooks.signing import new_secret


@dataclass
class Result:
    window: int
    makespan: float
    loads: int
    busy: float  # seconds of execution over all backends
    overtaken: int  # the most later jobs dispatched before any one job
    timelines: list[str]  # per backend, the models of its prompts in order, capital: loaded


async def loads_run(http: aiohttp.ClientSession,
                    urls: list[str]) -> tuple[int, float, list[str]]:
    """Prompts on these backends that succeeded and whose loader (node 1) was not served from
    their cache, the seconds the backends spent executing prompts (from the history's
    timestamps; prompts interrupted to restart elsewhere count there only), and each
    backend's timeline: a letter per prompt in the order they ran, the model's (capital when
    it was loaded; x: interrupted)."""
    loads, busy_ms, timelines = 0, 0, []
    for url in urls:
        async with http.get(f"{url}/history", params={"max_items": "10000"}) as response:
            history = await response.json()
        ran: list[tuple[int, str]] = []
        for entry in history.values():
            messages = entry["status"]["messages"]
            cached = next(data["nodes"] for kind, data in messages if kind == "execution_cached")
            succeeded = entry["status"]["status_str"] == "success"
            loaded = "1" not in cached and succeeded
            loads += loaded
            busy_ms += messages[-1][1]["timestamp"] - messages[0][1]["timestamp"]
            letter = entry["prompt"][2]["1"]["inputs"]["ckpt_name"].removeprefix("model-")[0]
            ran.append((messages[0][1]["timestamp"],
                        (letter.upper() if loaded else letter) if succeeded else "x"))
        timelines.append("".join(letter for _, letter in sorted(ran)))
    return loads, busy_ms / 1000, timelines


async def overtaken_most(http: aiohttp.ClientSession, api: str, job_ids: list[str]) -> int:
    """The most later jobs (by submission) dispatched before any one job."""
    dispatched: list[datetime] = []
    for job_id in job_ids:
        async with http.get(f"{api}/jobs/{job_id}") as response:
            dispatched.append(datetime.fromisoformat((await response.json())["dispatched_at"]))
    return max(sum(later < at for later in dispatched[index + 1:])
               for index, at in enumerate(dispatched))


async def one_run(models: list[str], args: argparse.Namespace, window: int) -> Result:
    """Fresh simulators and a fresh database: nothing cached from the other run."""
    async with AsyncExitStack() as stack:
        root = stack.enter_context(bench_root())
        postgres = await stack.enter_async_context(embedded_postgres(root))
        fleet = await stack.enter_async_context(sim_fleet(
            args.backends, options=("--load-seconds", str(args.load))))
        receiver = WebhookReceiver(new_secret())
        await receiver.start()
        stack.push_async_callback(receiver.stop)
        serve = await stack.enter_async_context(comfyfleet_serve(
            await fresh_database(postgres), root / "data", fleet.urls, secret=receiver.secret,
            env_overrides={"AFFINITY_WINDOW": str(window)}))
        http = await stack.enter_async_context(aiohttp.ClientSession())
        started = time.perf_counter()
        job_ids = []
        for index, model in enumerate(models):
            # Each job's work differs by a tenth of a millisecond, as a real job's seed makes
            # it differ: only the loader can come from the cache, never the work.
            seconds = round(args.work + index / 10000, 4)
            body = {"workflow": "simulated_model", "callback_url": receiver.url,
                    "params": {"model": model, "seconds": seconds, "steps": 1}}
            async with http.post(f"{serve.api}/jobs", json=body) as response:
                assert response.status == 202, await response.text()
                job_ids.append((await response.json())["id"])
        await receiver.wait_for(len(models))
        makespan = time.perf_counter() - started
        failed = [e for e in receiver.verified if e["type"] != "job.succeeded"]
        assert not failed, failed[0]
        loads, busy, timelines = await loads_run(http, fleet.urls)
        return Result(window, makespan, loads, busy,
                      await overtaken_most(http, serve.api, job_ids), timelines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", type=int, default=4)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=120)
    parser.add_argument("--load", type=float, default=3.0, help="seconds of a model load")
    parser.add_argument("--work", type=float, default=1.0, help="seconds of work per job")
    parser.add_argument("--window", type=int,
                        default=Settings.model_fields["affinity_window"].default,
                        help="AFFINITY_WINDOW of the aware run (default: the setting's)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeline", action="store_true",
                        help="print each backend's prompts in the order they ran")
    args = parser.parse_args()
    names = SIMULATED_MODELS[:args.models]
    models = [names[i % args.models] for i in range(args.jobs)]
    random.Random(args.seed).shuffle(models)
    bound = (args.jobs * args.work + args.models * args.load) / args.backends
    results = [await one_run(models, args, window) for window in (args.window, 0)]
    print_table(
        ["AFFINITY_WINDOW", "makespan s", "makespan ÷ bound", "prompts that loaded",
         "loads ÷ minimum", "GPU busy s", "most overtaken"],
        [[r.window, f"{r.makespan:.1f}", f"{r.makespan / bound:.3f}", r.loads,
          f"{r.loads / args.models:.1f}", f"{r.busy:.0f}", r.overtaken] for r in results])
    if args.timeline:
        print("order of submission:", "".join(model.removeprefix("model-")[0] for model in models))
        for result in results:
            for index, timeline in enumerate(result.timelines):
                print(f"AFFINITY_WINDOW={result.window} backend {index}: {timeline}")
    print(json.dumps({
        "backends": args.backends, "models": args.models, "jobs": args.jobs, "load_s": args.load,
        "work_s": args.work, "lower_bound_s": round(bound, 2),
        "runs": [{"window": r.window, "makespan_s": round(r.makespan, 2),
                  "ratio": round(r.makespan / bound, 3), "loads": r.loads,
                  "busy_s": round(r.busy, 1), "most_overtaken": r.overtaken} for r in results],
    }))


if __name__ == "__main__":
    asyncio.run(main())
