"""End-to-end throughput: jobs per second through comfyfleet and 16 backends.

16 zero-duration simulated backends (`comfyfleet sim`, `--sim-processes` processes), one
`comfyfleet serve` (embedded PostgreSQL, outputs in S3 on a moto server, defaults otherwise:
MAX_INFLIGHT_PER_BACKEND 2, log level WARNING) and a webhook receiver in this process that
verifies every signature. `--jobs` invert jobs (64x64 PNG) are submitted by `--window`
concurrent clients; the clock runs from the first POST to the last verified webhook.

`--storage local` stores the outputs in a local directory instead (STORAGE=local; no moto).
`--serve-processes 2` runs two `comfyfleet serve` processes on the one database, each
connected to all 16 backends (the slots shared through the database), the submitting clients
split between their APIs: their combined rate, and their CPU per job added up. On a 2-core
machine that shows what a second process costs, not a speed-up: the machine is already busy
with one.

In the same run, each on its own, what the parts cost without comfyfleet:
- the simulators alone: the same prompts (comfyfleet's unique output prefix included) POSTed
  straight to the 16 backends, 2 in flight on each (as comfyfleet keeps them), each waited
  for on the websocket: the most jobs per second these backends can run here;
- moto alone (S3 storage only): the same PNG PUT into the bucket and its URL presigned, 32 in
  flight.

While comfyfleet runs, the service's Python stacks are sampled at every tick of its CPU time
(bench.cpu_sampled; `--sampler py-spy`: by py-spy, 100 a second while it holds the GIL, which
counts the time it waits for a core too) and the CPU time of every process is read from
/proc: where the time goes, by component in ms per job, and what bounds the rate (on 2 cores:
the one process that needs a whole core, or the machine).

In each measured window (the two baselines' and comfyfleet's), the CPU seconds of each
process group, read before and after by psutil over its whole process tree (children that
ended in the window included): comfyfleet serve, PostgreSQL (the postmaster and every
backend and helper under it), moto, the simulators, this process (the submitting clients
and the webhook receiver; or the baselines' clients), and "not ours", the rest of the
machine's busy time. Per item (a job, a PUT, a prompt), they give the ceiling the machine
puts on each workload: cores / the CPU per item of all our processes (and the same with the
cores the rest of the machine left us), and the lowest rate of a group whose processes run
on one core each at most (the GIL). For the issue's target (80% of moto alone, or 400 jobs/s
locally) the most CPU per job serve may take, the others' as measured: at or below zero, the
target is out of reach on this machine whatever serve does; and the most serve and
PostgreSQL may take together (our SQL moves PostgreSQL's share): at or below zero, out of
reach whatever comfyfleet does. With S3 the target is given
twice: from moto alone's rate as measured (the rest of the machine's load moves it) and from
moto alone's ceiling (its rate on idle cores). And in comfyfleet's window, PostgreSQL's WAL
per job (bytes, records, full-page images) and each table's rows written per job: inserted,
updated (of them HOT, writing no index entry), deleted, and its autovacuum runs; and the WAL
records per job by relation and record type (pg_walinspect): a B-tree's INSERT_LEAF records
are the entries written into that index.

Run from the repository root:  .venv/bin/python -m bench.throughput [--jobs 1500] [--window 64]
[--storage s3|local] [--serve-processes 1]
[--sampler cpu|py-spy] (py-spy: .venv/bin/pip install py-spy; --no-profile runs without a
profile, and with several serve processes only the first is profiled; --by-statement also
counts the transactions by the statement that opens each)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack, nullcontext
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.harness import (
    MACHINE,
    NOT_OURS,
    PARAMS,
    STATS_FLUSH_SECONDS,
    WORKFLOW,
    S3Server,
    Serve,
    TimedReceiver,
    bench_root,
    cpu_sampling,
    deploy,
    print_table,
    profile_breakdown,
    py_spy,
    s3_client,
    table_writes,
    transaction_ids,
    transactions,
    transactions_by_statement,
    wal_records_by_relation,
    workflow_job,
    writes_between,
)
from bench.sim_throughput import run_prompts
from comfyfleet.comfy.prompts import isolate_outputs

BACKENDS = 16
SLOTS_PER_BACKEND = 2  # comfyfleet's default MAX_INFLIGHT_PER_BACKEND
WARM_UP_JOBS = 200
WEBHOOK_WAIT_SECONDS = 300.0
MOTO_IN_FLIGHT = 32
MOTO_ALONE = "moto alone (PUT + presign)"
END_TO_END = "comfyfleet, end to end"
SERVE = "comfyfleet serve"
POSTGRES = "postgres"
# The targets (#17): with S3, a share of what moto alone does; locally, a rate.
TARGET_SHARE_OF_MOTO = 0.8
TARGET_LOCAL_PER_SECOND = 400.0


async def simulators_alone(urls: list[str], count: int) -> float:
    """Prompts per second straight to the backends, SLOTS_PER_BACKEND in flight on each."""
    prompt = workflow_job()[1]

    def make(_: int) -> dict[str, Any]:
        return isolate_outputs(prompt, uuid.uuid4().hex)

    started = time.perf_counter()
    await asyncio.gather(*(run_prompts(url, make, count // len(urls), SLOTS_PER_BACKEND)
                           for url in urls))
    return count // len(urls) * len(urls) / (time.perf_counter() - started)


async def moto_alone(s3: S3Server, body: bytes, count: int) -> float:
    """PUTs (each with its URL presigned) per second, MOTO_IN_FLIGHT at once."""
    async with s3_client(s3.endpoint) as client:
        numbers = iter(range(count))

        async def putter() -> None:
            for n in numbers:
                key = f"alone/{n}/3_0.png"
                await client.put_object(Bucket=s3.bucket, Key=key, Body=body,
                                        ContentType="image/png")
                await client.generate_presigned_url(
                    "get_object", Params={"Bucket": s3.bucket, "Key": key})

        started = time.perf_counter()
        await asyncio.gather(*(putter() for _ in range(MOTO_IN_FLIGHT)))
        return count / (time.perf_counter() - started)


async def through_comfyfleet(
    http: aiohttp.ClientSession, apis: list[str], receiver: TimedReceiver, count: int,
    window: int,
) -> tuple[float, float]:
    """(jobs per second end to end, jobs per second accepted by the API); the `window`
    submitting clients take turns over `apis` (one per serve process)."""
    before = len(receiver.verified)
    numbers = iter(range(count))

    async def submitter(api: str) -> None:
        for _ in numbers:
            body = {"workflow": WORKFLOW, "params": PARAMS, "callback_url": receiver.url}
            async with http.post(f"{api}/jobs", json=body) as response:
                assert response.status == 202, await response.text()

    started = time.monotonic()
    await asyncio.gather(*(submitter(apis[i % len(apis)]) for i in range(window)))
    submitted = time.monotonic()
    await receiver.wait_until(before + count, WEBHOOK_WAIT_SECONDS)
    events = receiver.verified[before:]
    failed = [event for event in events if event["type"] != "job.succeeded"]
    assert not failed, failed[0]
    finished = max(receiver.verified_at[event["webhook_id"]] for event in events)
    return count / (finished - started), count / (submitted - started)


def one_core_each(serve_processes: int, sim_processes: int, storage: str) -> dict[str, int]:
    """The process groups whose every process runs its Python on one core at most (the GIL),
    with how many processes each has: a group needing more cores than that for a rate keeps
    it out of reach whatever the rest costs. PostgreSQL is not one (a process a connection)."""
    groups = {SERVE: serve_processes, "simulators": sim_processes, "benchmark client": 1}
    if storage == "s3":
        groups["moto (S3)"] = 1
    return groups


def ceiling(ms_per_item: dict[str, float], not_ours_cores: float, rate: float,
            one_core: dict[str, int]) -> dict[str, Any]:
    """What the machine allows a workload whose processes cost `ms_per_item` of CPU per item:
    every core for our processes (cores / the CPU per item of them all), the cores the rest of
    the machine left them in the window, and the lowest bound of a one-core-each group."""
    cores = psutil.cpu_count() or 1
    ours = sum(ms for name, ms in ms_per_item.items() if name not in (MACHINE, NOT_OURS))
    bounds = {name: processes / ms_per_item[name] * 1000
              for name, processes in one_core.items() if ms_per_item.get(name, 0.0) > 0}
    lowest = min(bounds, key=bounds.__getitem__)
    return {"cores": cores, "ours_ms_per_item": round(ours, 3),
            "per_second": round(cores / ours * 1000, 1),
            "per_second_beside_the_rest": round((cores - not_ours_cores) / ours * 1000, 1),
            "reached": round(rate / (cores / ours * 1000), 3),
            "one_core_each": {name: round(bound, 1) for name, bound in bounds.items()},
            "lowest_one_core_bound": [lowest, round(bounds[lowest], 1)]}


def serve_budget(ms_per_job: dict[str, float], not_ours_cores: float, rate: float,
                 target_rate: float, one_core: dict[str, int]) -> dict[str, Any]:
    """The most CPU per job `comfyfleet serve` may cost for `target_rate` on this machine, the
    other processes' CPU per job as measured: cores / the rate, less theirs (at or below zero:
    out of reach on these cores whatever serve does), and within one core per serve process;
    the same beside the rest of the machine's load; the most serve and PostgreSQL may cost
    together (what our SQL moves too), the rest as measured; one-core-each groups that
    cannot reach the rate at their measured cost."""
    cores = psutil.cpu_count() or 1
    per_job = cores / target_rate * 1000
    others = sum(ms for name, ms in ms_per_job.items() if name not in (MACHINE, NOT_OURS, SERVE))
    budget = per_job - others
    beside = (cores - not_ours_cores) / target_rate * 1000 - others
    serve_core = one_core[SERVE] / target_rate * 1000
    with_postgres = budget + ms_per_job.get(POSTGRES, 0.0)
    blocked_by = {name: round(processes / ms_per_job[name] * 1000, 1)
                  for name, processes in one_core.items()
                  if name != SERVE and ms_per_job.get(name, 0.0) > processes / target_rate * 1000}
    serve_ms = ms_per_job[SERVE]
    ours_ms = serve_ms + ms_per_job.get(POSTGRES, 0.0)
    allowed = min(budget, serve_core)
    verdict = (
        "met" if rate >= target_rate
        else f"out of reach on {cores} cores whatever comfyfleet costs" if with_postgres <= 0
        or blocked_by
        else f"out of reach on {cores} cores whatever serve costs; serve and PostgreSQL "
             f"together would have to shrink {ours_ms / with_postgres:.2g}x" if budget <= 0
        else f"serve's CPU per job already fits {cores} idle cores (less than the rest's load "
             "leaves: the rate is held back by that load, or by waiting)" if serve_ms <= allowed
        else f"within reach on {cores} idle cores if serve's CPU per job shrinks "
             f"{serve_ms / allowed:.2g}x")
    return {"target_per_second": round(target_rate, 1), "others_ms_per_job": round(others, 3),
            "serve_ms_per_job": serve_ms, "serve_at_most_ms": round(budget, 3),
            "serve_at_most_ms_beside_the_rest": round(beside, 3),
            "serve_at_most_ms_on_its_cores": round(serve_core, 3),
            "serve_and_postgres_ms_per_job": round(ours_ms, 3),
            "serve_and_postgres_at_most_ms": round(with_postgres, 3),
            "blocked_by_one_core_groups": blocked_by, "verdict": verdict}


def serve_budgets(rates: dict[str, float], ceilings: dict[str, dict[str, Any]],
                  ms_per_job: dict[str, float], not_ours_cores: float,
                  one_core: dict[str, int]) -> dict[str, dict[str, Any]]:
    """serve_budget for the issue's target: locally TARGET_LOCAL_PER_SECOND; with S3 a share of
    moto alone's rate as measured (which the rest of the machine's load moves), and the same
    share of moto alone's ceiling (its rate on idle cores, from its CPU per PUT)."""
    rate = rates[END_TO_END]
    if MOTO_ALONE not in rates:
        return {"STORAGE=local": serve_budget(
            ms_per_job, not_ours_cores, rate, TARGET_LOCAL_PER_SECOND, one_core)}
    idle_moto = min(ceilings[MOTO_ALONE]["per_second"],
                    ceilings[MOTO_ALONE]["lowest_one_core_bound"][1])
    return {f"{TARGET_SHARE_OF_MOTO:.0%} of {MOTO_ALONE}, as measured": serve_budget(
                ms_per_job, not_ours_cores, rate, TARGET_SHARE_OF_MOTO * rates[MOTO_ALONE],
                one_core),
            f"{TARGET_SHARE_OF_MOTO:.0%} of {MOTO_ALONE} on idle cores": serve_budget(
                ms_per_job, not_ours_cores, rate, TARGET_SHARE_OF_MOTO * idle_moto, one_core)}


async def dispatch_claims(http: aiohttp.ClientSession, serves: list[Serve]) -> Counter[str]:
    """The dispatchers' claims so far by outcome (comfyfleet_dispatch_claims), summed over
    the serve processes."""
    counts = Counter[str]()
    for serve in serves:
        async with http.get(f"{serve.base}/metrics") as response:
            text = await response.text()
        for line in text.splitlines():
            if line.startswith("comfyfleet_dispatch_claims_total{"):
                labels, value = line.rsplit(" ", 1)
                counts[labels.split('"')[1]] += round(float(value))
    return counts


def against_baselines(rates: dict[str, float], storage: str) -> dict[str, Any]:
    """comfyfleet's end-to-end rate as a share of each baseline's, and the issue's target
    for this storage with whether it is met."""
    ours = rates[END_TO_END]
    shares = {name: round(ours / rate, 3) for name, rate in rates.items()
              if not name.startswith("comfyfleet")}
    if storage == "s3":
        what, at_least, reached = f"share of {MOTO_ALONE}", TARGET_SHARE_OF_MOTO, shares[MOTO_ALONE]
    else:
        what, at_least, reached = "jobs per second", TARGET_LOCAL_PER_SECOND, ours
    return {"share_of_baseline": shares, "target": {
        "what": what, "at_least": at_least, "reached": round(reached, 3),
        "met": reached >= at_least}}


async def run(jobs: int, window: int, processes: int, profile: Path | None,
              root: Path, by_statement: bool = False, storage: str = "s3",
              serve_processes: int = 1, sampler: str = "cpu") -> dict[str, Any]:
    async with AsyncExitStack() as stack:
        deployed = await deploy(stack, root, BACKENDS, processes=processes, storage=storage,
                                serve_processes=serve_processes,
                                cpu_profile=profile if sampler == "cpu" else None)
        sims, receiver, http, meter = (deployed.sims, deployed.receiver, deployed.http,
                                       deployed.meter)
        serves, database_url = deployed.serves, deployed.database_url
        apis = [serve.api for serve in serves]
        rates: dict[str, float] = {}
        cpu: dict[str, dict[str, float]] = {}

        ms_per_item: dict[str, dict[str, float]] = {}
        one_core = one_core_each(serve_processes, processes, storage)
        ceilings: dict[str, dict[str, Any]] = {}

        def measured(phase: str, count: int) -> None:
            """The phase's cores busy, CPU per item and ceiling, from the meter just stopped."""
            cpu[phase] = meter.as_json()
            ms_per_item[phase] = meter.ms_per_item(count)
            ceilings[phase] = ceiling(ms_per_item[phase], cpu[phase][NOT_OURS], rates[phase],
                                      one_core)

        await simulators_alone(sims.urls, WARM_UP_JOBS)
        meter.start()
        rates["simulators alone"] = await simulators_alone(sims.urls, jobs)
        meter.stop()
        measured("simulators alone", jobs // len(sims.urls) * len(sims.urls))

        await through_comfyfleet(http, apis, receiver, WARM_UP_JOBS, window)
        output_bytes = None
        if deployed.s3 is not None:
            output = receiver.verified[-1]["data"]["outputs"][0]
            async with http.get(output["url"]) as response:
                png = await response.read()  # the very bytes comfyfleet stored, for moto alone
            output_bytes = len(png)
            meter.start()
            rates[MOTO_ALONE] = await moto_alone(deployed.s3, png, jobs)
            meter.stop()
            measured(MOTO_ALONE, jobs)

        profiling = (nullcontext() if profile is None
                     else cpu_sampling(serves[0].process, profile) if sampler == "cpu"
                     else py_spy(serves[0].process.pid, profile))
        counting = transactions_by_statement(deployed.postgres, database_url) if by_statement \
            else nullcontext(Counter[str]())
        committed = await transactions(database_url)
        writing = await transaction_ids(database_url)
        written_before = await table_writes(database_url)
        claims = await dispatch_claims(http, serves)
        async with profiling, counting as opened_by:
            meter.start()
            rates[END_TO_END], rates["comfyfleet, submits accepted"] = (
                await through_comfyfleet(http, apis, receiver, jobs, window))
            meter.stop()
        measured(END_TO_END, jobs)
        serve_ms = meter.ms_per(SERVE, jobs)
        budgets = serve_budgets(rates, ceilings, ms_per_item[END_TO_END],
                                cpu[END_TO_END][NOT_OURS], one_core)
        claims = await dispatch_claims(http, serves) - claims
        await asyncio.sleep(STATS_FLUSH_SECONDS)
        committed = await transactions(database_url) - committed
        writing = await transaction_ids(database_url) - writing - 1  # less the one it took
        written_after = await table_writes(database_url)
        written = writes_between(written_before, written_after, jobs)
        written["wal_records"] = await wal_records_by_relation(
            database_url, written_before, written_after, jobs)
    return {"jobs": jobs, "window": window, "backends": BACKENDS, "storage": storage,
            "serve_processes": serve_processes, "output_bytes": output_bytes,
            "per_second": {name: round(rate, 1) for name, rate in rates.items()},
            **against_baselines(rates, storage), "cores_busy": cpu,
            "cpu_ms_per_item": ms_per_item, "ceiling": ceilings, "serve_budget": budgets,
            "serve_cpu_ms_per_job": serve_ms,
            "transactions_per_job": round(committed / jobs, 1),
            "writing_transactions_per_job": round(writing / jobs, 1),
            "written_per_job": written,
            "dispatch_claims_per_job": {
                outcome: round(count / jobs, 2) for outcome, count in claims.most_common()},
            "transactions_per_job_by_statement": {
                statement: round(count / jobs, 2) for statement, count in opened_by.most_common()
                if count / jobs >= 0.01} if by_statement else None,
            "profile": {"sampler": sampler, **profile_breakdown(profile)} if profile else None}


def report(result: dict[str, Any], profile: Path | None) -> None:
    shares = result["share_of_baseline"]
    print_table(["workload", "per second", "comfyfleet end to end ÷ this"],
                [(name, f"{rate:.0f}", f"{shares[name]:.0%}" if name in shares else "")
                 for name, rate in result["per_second"].items()])
    target = result["target"]
    print(f"\nstorage {result['storage']}: comfyfleet end to end, {target['what']}: "
          f"{target['reached']:.3g} (target at least {target['at_least']:.3g}: "
          f"{'met' if target['met'] else 'not met'})")
    processes = result["serve_processes"]
    serves = "comfyfleet serve" if processes == 1 else (
        f"{processes} comfyfleet serve processes on one database, added up (on "
        f"{os.cpu_count()} cores a second process shows its overhead, not a speed-up)")
    print(f"{serves}: {result['serve_cpu_ms_per_job']} ms of CPU per job; "
          f"{result['transactions_per_job']} PostgreSQL transactions per job, "
          f"{result['writing_transactions_per_job']} of them writing (a commit flushed)\n")
    wal = result["written_per_job"]["wal"]
    print(f"PostgreSQL's WAL per job: {wal['bytes']:.0f} bytes, {wal['records']} records, "
          f"{wal['full_page_images']} full-page images\n")
    entries = ("Btree/INSERT_LEAF", "Btree/INSERT_POST")
    rows = []
    for table, relations in result["written_per_job"]["wal_records"].items():
        by_index = {relation: round(sum(records.get(entry, 0) for entry in entries), 2)
                    for relation, records in relations.items() if relation != table}
        if any(by_index.values()):
            rows.append((table, "(all its indexes)", round(sum(by_index.values()), 2)))
            rows.extend(("", index, count) for index, count in by_index.items() if count)
    print_table(["index entries written per job (WAL)", "index", "per job"], rows)
    print()
    tables = result["written_per_job"]["tables"]
    columns = list(next(iter(tables.values()), {}))
    print_table(["rows written per job, by table", *columns],
                [(name, *(counts[key] for key in columns)) for name, counts in tables.items()])
    print()
    print_table(["the dispatcher's claims per job, by outcome", "per job"],
                list(result["dispatch_claims_per_job"].items()))
    print()
    if result["transactions_per_job_by_statement"] is not None:
        print_table(["transactions per job, by the statement opening each", "per job"],
                    list(result["transactions_per_job_by_statement"].items()))
        print()
    cpu = result["cores_busy"]
    phases = list(cpu)
    print_table(["cores busy", *phases],
                [(name, *(cpu[phase][name] for phase in phases)) for name in cpu[phases[-1]]])
    print()
    report_ceilings(result)
    if result["profile"] is not None:
        profile_result = result["profile"]
        which = "" if result["serve_processes"] == 1 else " (the first process only)"
        samples = ("of its CPU time" if profile_result["sampler"] == "cpu"
                   else "holding the GIL")
        print(f"\nprofile of comfyfleet serve{which}: {profile_result['samples']} samples "
              f"{samples} (collapsed stacks in {profile})")
        print()
        ms_per_job = result["serve_cpu_ms_per_job"] / result["serve_processes"]
        print_table(["component", "% of samples", "ms of CPU per job"],
                    [(name, share, f"{share * ms_per_job / 100:.2f}")
                     for name, share in profile_result["by_component"].items()])
        for title, key in (("activity", "by_activity"), ("innermost frame in", "by_library"),
                           ("named cost (anywhere on the stack)", "named_costs")):
            print()
            print_table([title, "% of samples"],
                        [(name, share) for name, share in profile_result[key].items()])


def report_ceilings(result: dict[str, Any]) -> None:
    """CPU per item of every process group in each phase, the ceiling the machine puts on
    each, and what serve would have to cost for the target."""
    ms, ceilings, rates = result["cpu_ms_per_item"], result["ceiling"], result["per_second"]
    phases = list(ms)
    cores = ceilings[END_TO_END]["cores"]
    ours = [name for name in ms[END_TO_END] if name not in (MACHINE, NOT_OURS)]

    def row(title: str, cell: Callable[[str], str]) -> tuple[str, ...]:
        return (title, *(cell(phase) for phase in phases))

    print_table(
        ["ms of CPU per item: a prompt (simulators alone), a PUT (moto alone), a job", *phases],
        [*((name, *(f"{ms[phase][name]:.2f}" for phase in phases)) for name in ours),
         row("ours, added up", lambda phase: f"{ceilings[phase]['ours_ms_per_item']:.2f}"),
         *((name, *(f"{ms[phase][name]:.2f}" for phase in phases))
           for name in (NOT_OURS, MACHINE)),
         row("cores busy, the whole machine",
             lambda phase: f"{result['cores_busy'][phase][MACHINE]:.2f}"),
         row("per second, measured", lambda phase: f"{rates[phase]:.0f}"),
         row(f"ceiling: {cores} cores ÷ ours",
             lambda phase: f"{ceilings[phase]['per_second']:.0f}"),
         row(f"ceiling: {cores} cores less not ours, ÷ ours",
             lambda phase: f"{ceilings[phase]['per_second_beside_the_rest']:.0f}"),
         row("measured ÷ ceiling", lambda phase: f"{ceilings[phase]['reached']:.0%}"),
         row("lowest bound of one process on one core (GIL)",
             lambda phase: "{}: {:.0f}".format(*ceilings[phase]["lowest_one_core_bound"]))])
    for target_name, budget in result["serve_budget"].items():
        target = budget["target_per_second"]
        blocked = "; ".join(f"{name}, one core a process, reaches only {bound:.0f}/s"
                            for name, bound in budget["blocked_by_one_core_groups"].items())
        print(f"\ntarget, {target_name}: {target:.0f} jobs/s. At that rate {cores} cores give "
              f"{cores / target * 1000:.2f} ms of CPU a job; all but serve took "
              f"{budget['others_ms_per_job']:.2f} ms a job, so serve may take at most "
              f"{budget['serve_at_most_ms']:.2f} ms (beside the rest of the machine's load "
              f"{budget['serve_at_most_ms_beside_the_rest']:.2f}; one core a serve process caps "
              f"it at {budget['serve_at_most_ms_on_its_cores']:.2f}), serve and PostgreSQL "
              f"together {budget['serve_and_postgres_at_most_ms']:.2f}; they took "
              f"{budget['serve_ms_per_job']} and {budget['serve_and_postgres_ms_per_job']:.2f}"
              f" ms: {budget['verdict']}"
              + (f" ({blocked})" if blocked else ""))


async def main(jobs: int, window: int, processes: int, profile: Path | None,
               by_statement: bool, storage: str, serve_processes: int, sampler: str) -> None:
    print(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                      "cpus": os.cpu_count(), "load_average": os.getloadavg()}), flush=True)
    with bench_root() as root:
        result = await run(jobs, window, processes, profile, root, by_statement, storage,
                           serve_processes, sampler)
    report(result, profile)
    print(json.dumps({**result, "load_average_after": os.getloadavg()}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1500)
    parser.add_argument("--window", type=int, default=64, help="submits in flight (default 64)")
    parser.add_argument("--sim-processes", type=int, default=2,
                        help="processes the 16 simulators run in (default 2)")
    parser.add_argument("--profile", type=Path,
                        default=Path(tempfile.gettempdir()) / "comfyfleet-throughput.pyspy",
                        help="where the collapsed stacks go")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--sampler", choices=("cpu", "py-spy"), default="cpu",
                        help="how the service is profiled: samples of its CPU time "
                             "(bench.cpu_sampled; default), or py-spy's of its thread holding "
                             "the GIL, which count time it waited for a core too")
    parser.add_argument("--by-statement", action="store_true",
                        help="count the transactions by the statement opening each, from "
                             "PostgreSQL's log of every statement (slows it: not for timing)")
    parser.add_argument("--storage", choices=("s3", "local"), default="s3",
                        help="where outputs go: S3 on moto (default), or a local directory "
                             "(STORAGE=local; no moto, so no moto-alone baseline)")
    parser.add_argument("--serve-processes", type=int, default=1,
                        help="comfyfleet serve processes on the one database (default 1); "
                             "their rate and CPU per job are added up")
    args = parser.parse_args()
    if args.serve_processes < 1:
        parser.error("--serve-processes is at least 1")
    asyncio.run(main(args.jobs, args.window, args.sim_processes,
                     None if args.no_profile else args.profile, args.by_statement,
                     args.storage, args.serve_processes, args.sampler))
