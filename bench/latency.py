"""Added latency at a steady offered load, as a user of comfyfleet sees it.

Jobs arrive open loop (Poisson arrivals at each of `--rates` per second, each sent whatever
the earlier ones are doing) for `--seconds` per rate; each is an `invert` job (64x64 PNG, a
few hundred bytes) with a callback URL. Measured per job:

- dispatch: POST /api/v1/jobs sent -> the prompt accepted by a zero-duration simulated backend
  (for comfyfleet also in three legs, split by the job's own created_at and dispatched_at);
- completion: the backend's `execution_success` -> the webhook verified at the receiver
  (Standard Webhooks, comfyfleet.cli.demo's receiver), outputs stored in S3 (moto).

Also per run: jobs completed per second (an offered load above it is an overload: latency is
then mostly the backlog), the CPU each process used, and for comfyfleet's runs the service's
CPU per job and PostgreSQL transactions per job. The issue's loads are 50 and 200 per
second; 10 per second is there to show the latency of a comfyfleet that keeps up.

Clocks: the simulators run as `bench.timed_sim`, which notes `time.monotonic()` when a prompt
enters its queue (in the POST /prompt handler, right before the 200) and when it hands
`execution_success` to the websocket hub; the client notes the same clock before each POST
and once each webhook has verified. CLOCK_MONOTONIC is one clock for all processes of the
machine, so the differences are exact; stamps are joined through the job's `prompt_id`
(carried by the webhook).

Baseline, same run, same simulators, same receiver and load: the benchmark acts as the
thinnest gateway there can be, with no database: it POSTs the same prompt (comfyfleet's
unique output prefix included) straight to a backend's /prompt, and when the backend's
websocket says the prompt ended it reads the history, GETs the output from /view, PUTs it
into the same S3 bucket, presigns its URL and POSTs a signed webhook. That is the floor the
simulator, loopback, moto and the receiver impose; what comfyfleet adds is the difference.

The service runs in its own process (`comfyfleet serve`, 8 backends, MAX_INFLIGHT_PER_BACKEND
2, embedded PostgreSQL, log level WARNING); CPU time per process is reported for each run.

Run from the repository root:  .venv/bin/python -m bench.latency [--rates 10,50,200] [--seconds 8]
[--by-statement]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Mapping
from contextlib import AsyncExitStack, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.harness import (
    PARAMS,
    STATS_FLUSH_SECONDS,
    WORKFLOW,
    CpuMeter,
    SimFleet,
    TimedReceiver,
    bench_root,
    deploy,
    latency_ms,
    open_loop,
    print_table,
    s3_client,
    transactions,
    transactions_by_statement,
    workflow_job,
)
from comfyfleet.comfy.client import ComfyClient
from comfyfleet.comfy.messages import Executing, parse_text
from comfyfleet.comfy.prompts import isolate_outputs, output_items
from comfyfleet.comfy.websocket import TEXT, WebSocket
from comfyfleet.http_client import HttpClient
from comfyfleet.webhooks.signing import signed_headers

BACKENDS = 8
TARGETS_MS = {"dispatch": (5, 25), "completion": (20, 100)}  # p50, p99
# The last webhook of a run is waited for this long, plus as long as the jobs would take at
# 5 per second: above what it can complete, comfyfleet works off a backlog after the run.
WEBHOOK_WAIT_SECONDS = 60.0
SLOWEST_RATE = 5.0
WARM_UP_JOBS = 100
# The dispatch leg of a comfyfleet job, by the times it records (see `dispatch_legs`).
DISPATCH_LEGS = ("POST sent -> job built (created_at)",
                 "-> claim's take began (dispatched_at)",
                 "-> prompt accepted (take, commit, POST /prompt)")


@dataclass
class Measured:
    """One run's samples, in seconds."""

    dispatch: list[float] = field(default_factory=list)
    completion: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)
    lag: float = 0.0  # the load generator's largest delay behind its schedule
    completed_per_second: float = 0.0  # jobs / (last webhook verified - first job sent)
    transactions_per_job: float | None = None  # PostgreSQL's count, comfyfleet runs only
    serve_cpu_ms_per_job: float | None = None  # comfyfleet runs only
    # By the statement opening each (--by-statement), comfyfleet runs only.
    by_statement: dict[str, float] | None = None
    cpu: dict[str, float] = field(default_factory=dict)


class DirectGateway:
    """The least any gateway has to do, without comfyfleet (see the module's docstring)."""

    def __init__(self, http: aiohttp.ClientSession, lean_http: HttpClient, urls: list[str],
                 s3: Any, bucket: str, secret: str, callback_url: str) -> None:
        self._http = http
        self._clients = [ComfyClient(url, http, lean_http) for url in urls]
        self._s3 = s3
        self._bucket = bucket
        self._secret = secret
        self._callback_url = callback_url
        self._client_id = f"bench-{uuid.uuid4().hex}"
        self._prompt = workflow_job()[1]
        self._readers: list[asyncio.Task[None]] = []
        self._finishing: set[asyncio.Task[None]] = set()
        self.sent: dict[str, float] = {}  # prompt id -> POST /prompt sent
        self.heard: dict[str, float] = {}  # prompt id -> its end seen on the websocket
        self.stored: dict[str, float] = {}  # prompt id -> output in S3, webhook about to go

    async def start(self) -> None:
        for client in self._clients:
            ws = await client.connect_websocket(self._client_id)
            self._readers.append(asyncio.create_task(self._read(client, ws)))

    async def stop(self) -> None:
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

    async def submit(self, index: int) -> None:
        client = self._clients[index % len(self._clients)]
        prompt_id = str(uuid.uuid4())
        self.sent[prompt_id] = time.monotonic()
        await client.queue_prompt(isolate_outputs(self._prompt, prompt_id), prompt_id=prompt_id,
                                  client_id=self._client_id)

    async def _read(self, client: ComfyClient, ws: WebSocket) -> None:
        while (received := await ws.receive()) is not None:
            kind, data = received
            message = parse_text(data) if kind == TEXT else None
            if isinstance(message, Executing) and message.node is None and message.prompt_id:
                self.heard[message.prompt_id] = time.monotonic()
                task = asyncio.create_task(self._finish(client, message.prompt_id))
                self._finishing.add(task)
                task.add_done_callback(self._finishing.discard)

    async def _finish(self, client: ComfyClient, prompt_id: str) -> None:
        entry = await client.history(prompt_id)
        assert entry is not None, prompt_id
        files, _ = output_items(entry.get("outputs"))
        outputs = []
        for item in files:
            key = f"direct/{prompt_id}/{item.filename}"
            async with client.view(item.filename, item.subfolder, item.type,
                                   1 << 30) as chunks:
                body = b"".join([chunk async for chunk in chunks])
            await self._s3.put_object(Bucket=self._bucket, Key=key, Body=body,
                                      ContentType="image/png")
            url = await self._s3.generate_presigned_url(
                "get_object", Params={"Bucket": self._bucket, "Key": key})
            outputs.append({"node_id": item.node_id, "key": key, "url": url})
        self.stored[prompt_id] = time.monotonic()
        event = {"type": "job.succeeded", "timestamp": datetime.now(UTC).isoformat(),
                 "data": {"id": prompt_id, "prompt_id": prompt_id, "outputs": outputs}}
        body = json.dumps(event, separators=(",", ":")).encode()
        headers = signed_headers(self._secret, f"msg_{uuid.uuid4().hex}", body)
        async with self._http.post(self._callback_url, data=body,
                                   headers=headers) as response:
            assert response.status == 204, response.status


async def measure(
    fire: Callable[[int], Coroutine[Any, Any, None]], count: int, rate: float,
    sent: Callable[[dict[str, Any]], float], receiver: TimedReceiver, sims: SimFleet,
    http: aiohttp.ClientSession, meter: CpuMeter,
) -> Measured:
    """Offer `count` jobs at `rate` through `fire`, wait for their webhooks, join the stamps.
    `sent` gives the send time of a webhook's job."""
    before = len(receiver.verified)
    meter.start()
    lag = await open_loop(rate, count, fire)
    await receiver.wait_until(before + count, WEBHOOK_WAIT_SECONDS + count / SLOWEST_RATE)
    meter.stop()
    stamps = await sims.stamps(http)
    measured = Measured(lag=lag, cpu=meter.as_json())
    events = receiver.verified[before:]
    for event in events:
        prompt_id = event["data"]["prompt_id"]
        measured.dispatch.append(stamps["accepted"][prompt_id] - sent(event))
        measured.completion.append(
            receiver.verified_at[event["webhook_id"]] - stamps["succeeded"][prompt_id])
    span = (max(receiver.verified_at[event["webhook_id"]] for event in events)
            - min(sent(event) for event in events))
    measured.completed_per_second = count / span
    return measured


async def direct(
    gateway: DirectGateway, count: int, rate: float, receiver: TimedReceiver, sims: SimFleet,
    http: aiohttp.ClientSession, meter: CpuMeter,
) -> Measured:
    measured = await measure(gateway.submit, count, rate,
                             lambda event: gateway.sent[event["data"]["prompt_id"]],
                             receiver, sims, http, meter)
    stamps = await sims.stamps(http)
    events = [(e["data"]["prompt_id"], e["webhook_id"]) for e in receiver.verified[-count:]]
    measured.extra = {
        "execution_success -> end seen on the websocket": [
            gateway.heard[i] - stamps["succeeded"][i] for i, _ in events],
        "-> history read, output in S3, URL presigned": [
            gateway.stored[i] - gateway.heard[i] for i, _ in events],
        "-> webhook signed, POSTed, verified": [
            receiver.verified_at[hook] - gateway.stored[i] for i, hook in events],
    }
    return measured


async def through_comfyfleet(
    api: str, database_url: str, count: int, rate: float, receiver: TimedReceiver,
    sims: SimFleet, http: aiohttp.ClientSession, meter: CpuMeter, postgres: Any = None,
) -> Measured:
    """`postgres`: the server, to count the transactions by statement (its log)."""
    sent: dict[str, float] = {}
    answered: list[float] = []

    async def submit(_: int) -> None:
        body = {"workflow": WORKFLOW, "params": PARAMS, "callback_url": receiver.url}
        started = time.monotonic()
        async with http.post(f"{api}/jobs", json=body) as response:
            job = await response.json()
            assert response.status == 202, job
        answered.append(time.monotonic() - started)
        sent[job["id"]] = started

    counting = transactions_by_statement(postgres, database_url) if postgres is not None \
        else nullcontext(Counter[str]())
    committed = await transactions(database_url)
    async with counting as opened_by:
        measured = await measure(submit, count, rate, lambda event: sent[event["data"]["id"]],
                                 receiver, sims, http, meter)
    measured.serve_cpu_ms_per_job = meter.ms_per("comfyfleet serve", count)
    if postgres is not None:
        measured.by_statement = {statement: round(n / count, 2)
                                 for statement, n in opened_by.most_common() if n / count >= 0.01}
    failed = [e for e in receiver.verified[-count:] if e["type"] != "job.succeeded"]
    assert not failed, failed[0]
    await asyncio.sleep(STATS_FLUSH_SECONDS)
    measured.transactions_per_job = (await transactions(database_url) - committed) / count
    measured.extra = {"POST /jobs answered (202)": answered,
                      **dispatch_legs(await recorded_times(database_url, sent), sent,
                                      await sims.stamps(http))}
    return measured


async def recorded_times(database_url: str, ids: Iterable[str]) -> dict[str, Mapping[str, Any]]:
    """`created_at`, `dispatched_at` and `prompt_id` of each job, read on a connection of the
    bench's own, closed at once: its transaction reaches PostgreSQL's statistics as it closes,
    after this rate's count of transactions and before the next's. (A GET /jobs/{id} of each
    through the service was counted in this rate's or the next rate's transactions, as the
    service's reading connection flushed its statistics, up to 10 s later.)"""
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = await conn.fetch(
            "SELECT id, created_at, dispatched_at, prompt_id FROM jobs WHERE id = ANY($1)",
            [uuid.UUID(job_id) for job_id in ids])
    finally:
        await conn.close()
    return {str(row["id"]): row for row in rows}


def dispatch_legs(jobs: Mapping[str, Mapping[str, Any]], sent: dict[str, float],
                  stamps: dict[str, dict[str, float]]) -> dict[str, list[float]]:
    """Where each job's dispatch leg went, by the times each of `jobs` records
    (`recorded_times`): `created_at` (the intake built the job, right before its insert),
    `dispatched_at` (the statement of the claim's take began), then the backend's stamp of the
    prompt accepted. The first leg is the request's reading and validation; the second the
    insert (and its commit, unless the take commits with it), the dispatcher's wake and the
    claim's read and pick; the last the take and its commit, and POST /prompt. The records'
    wall clock is brought to `time.monotonic()` by one offset taken here: one machine, one
    minute."""
    offset = time.time() - time.monotonic()
    legs: dict[str, list[float]] = {name: [] for name in DISPATCH_LEGS}
    for job_id, started in sent.items():
        job = jobs[job_id]
        created, dispatched = (job[name].timestamp() - offset
                               for name in ("created_at", "dispatched_at"))
        times = [started, created, dispatched, stamps["accepted"][job["prompt_id"]]]
        for name, start, end in zip(DISPATCH_LEGS, times, times[1:], strict=False):
            legs[name].append(end - start)
    return legs


async def run(rates: list[float], seconds: float, root: Path, by_statement: bool
              ) -> dict[str, Any]:
    results: dict[str, Any] = {}
    async with AsyncExitStack() as stack:
        deployed = await deploy(stack, root, BACKENDS, timed=True)
        sims, receiver, http, meter = (deployed.sims, deployed.receiver, deployed.http,
                                       deployed.meter)
        api, database_url = deployed.serve.api, deployed.database_url
        assert deployed.s3 is not None  # deploy's default storage: S3 on moto
        s3_direct = await stack.enter_async_context(s3_client(deployed.s3.endpoint))
        lean_http = await stack.enter_async_context(HttpClient())
        gateway = DirectGateway(http, lean_http, sims.urls, s3_direct, deployed.s3.bucket,
                                receiver.secret, receiver.url)
        await gateway.start()
        stack.push_async_callback(gateway.stop)
        # Warm-up: connections, caches, the first S3 and database round trips of each.
        await direct(gateway, WARM_UP_JOBS, 50, receiver, sims, http, meter)
        await through_comfyfleet(api, database_url, WARM_UP_JOBS, 50, receiver, sims, http,
                                 meter)
        for rate in rates:
            count = round(rate * seconds)
            results[f"{rate:g}/s"] = {
                "baseline": await direct(gateway, count, rate, receiver, sims, http, meter),
                "comfyfleet": await through_comfyfleet(
                    api, database_url, count, rate, receiver, sims, http, meter,
                    deployed.postgres if by_statement else None),
            }
    return results


def report(results: dict[str, Any], seconds: float) -> dict[str, Any]:
    def cells(samples: list[float]) -> str:
        figures = latency_ms(samples)
        return f"{figures['p50']} / {figures['p95']} / {figures['p99']}" if samples else "-"

    rows = []
    for rate, runs in results.items():
        base, ours = runs["baseline"], runs["comfyfleet"]
        for leg in ("dispatch", "completion"):
            p50, p99 = TARGETS_MS[leg]
            rows.append((f"{rate} {leg}", cells(getattr(base, leg)), cells(getattr(ours, leg)),
                         f"{p50} / - / {p99}"))
        for name, samples in [*base.extra.items(), *ours.extra.items()]:
            in_base = name in base.extra
            rows.append((f"{rate}   {name}", cells(samples) if in_base else "-",
                         "-" if in_base else cells(samples), ""))
    print_table(["offered load, leg (ms)", "baseline p50 / p95 / p99",
                 "comfyfleet p50 / p95 / p99", "target"], rows)
    print()
    names = list(next(iter(results.values()))["comfyfleet"].cpu)
    runs = [(f"{rate} {kind}", measured) for rate, pair in results.items()
            for kind, measured in (("baseline", pair["baseline"]),
                                   ("comfyfleet", pair["comfyfleet"]))]
    print_table(["cores busy", *(label for label, _ in runs)],
                [(name, *(m.cpu[name] for _, m in runs)) for name in names])
    print()
    print_table(["", *(label for label, _ in runs)],
                [("jobs completed per second", *(f"{m.completed_per_second:.1f}" for _, m in runs)),
                 ("comfyfleet serve CPU per job (ms)",
                  *("-" if m.serve_cpu_ms_per_job is None else f"{m.serve_cpu_ms_per_job:.1f}"
                    for _, m in runs)),
                 ("PostgreSQL transactions per job",
                  *("-" if m.transactions_per_job is None else f"{m.transactions_per_job:.1f}"
                    for _, m in runs)),
                 ("load generator's largest lag (ms)", *(f"{m.lag * 1000:.1f}" for _, m in runs))])
    for label, m in runs:
        if m.by_statement is not None:
            print()
            print_table([f"{label}: transactions per job, by the statement opening each",
                         "per job"], list(m.by_statement.items()))
    return {
        "seconds_per_rate": seconds, "backends": BACKENDS,
        "runs": {label: {"dispatch_ms": latency_ms(m.dispatch),
                         "completion_ms": latency_ms(m.completion),
                         **{name: latency_ms(samples) for name, samples in m.extra.items()},
                         "completed_per_second": round(m.completed_per_second, 1),
                         "transactions_per_job": m.transactions_per_job,
                         "serve_cpu_ms_per_job": m.serve_cpu_ms_per_job,
                         "transactions_per_job_by_statement": m.by_statement,
                         "generator_lag_ms": round(m.lag * 1000, 1), "cores_busy": m.cpu}
                 for label, m in runs},
    }


async def main(rates: list[float], seconds: float, by_statement: bool) -> None:
    print(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                      "cpus": os.cpu_count(), "load_average": os.getloadavg()}), flush=True)
    with bench_root() as root:
        results = await run(rates, seconds, root, by_statement)
    print(json.dumps(report(results, seconds)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default="10,50,200",
                        help="offered jobs per second (default 10,50,200)")
    parser.add_argument("--seconds", type=float, default=8.0, help="per rate (default 8)")
    parser.add_argument("--by-statement", action="store_true",
                        help="also count the transactions by the statement opening each "
                             "(PostgreSQL's log of every statement: slows it down)")
    args = parser.parse_args()
    asyncio.run(main([float(rate) for rate in args.rates.split(",")], args.seconds,
                     args.by_statement))
