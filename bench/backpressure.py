"""Honest backpressure (issue #18): with MAX_QUEUED=100, --jobs submissions as fast as
--submitters POSTs in flight allow; then a client that honours Retry-After resubmits the
refused ones until every job is done.

One tenant (an API key of weight 1) on --backends simulated backends (`comfyfleet sim`),
`comfyfleet serve` with MAX_QUEUED=--max-queued and MAX_INFLIGHT_PER_BACKEND=2, embedded
PostgreSQL, local storage; jobs of the `simulated_work` workflow of --seconds each.

First pass: each of --submitters workers POSTs its next job as soon as the one before is
answered, whatever the answer. Reported: the answers by status, whether every 429 carried a
Retry-After, and whether every job accepted reached `succeeded` (none lost). Retry pass: the
same number of workers take the refused jobs from a shared queue; after a 429 a worker puts the
job back and sleeps the Retry-After it was given before its next POST. Reported: its answers,
the time until all --jobs jobs had succeeded, and how each Retry-After compared with the actual
wait until the backlog had room: from the 429's answer to the first job leaving `queued` after
it (its dispatched_at, from the database; one clock for the whole machine).

Run from the repository root:  .venv/bin/python -m bench.backpressure [--backends 8]
    [--jobs 1000] [--max-queued 100] [--seconds 1] [--submitters 16]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import time
from collections import Counter
from contextlib import AsyncExitStack
from dataclasses import dataclass

import aiohttp
import asyncpg

from bench.fairness import deployment, work
from bench.harness import percentile, print_table

DONE_TIMEOUT_MARGIN = 300.0  # seconds beyond the fleet's own time for the whole run


@dataclass
class Answer:
    number: int  # the job's
    status: int
    at: float  # unix seconds, once answered
    took: float  # seconds from sending to the answer
    retry_after: str | None  # the header, as sent
    job_id: str | None  # when accepted


async def post(http: aiohttp.ClientSession, api: str, key: str, seconds: float,
               number: int) -> Answer:
    sent = time.monotonic()
    async with http.post(f"{api}/jobs", json=work(seconds, number),
                         headers={"Authorization": f"Bearer {key}"}) as response:
        body = await response.json(content_type=None)
        return Answer(number, response.status, time.time(), time.monotonic() - sent,
                      response.headers.get("Retry-After"),
                      body["id"] if response.status == 202 else None)


async def first_pass(http: aiohttp.ClientSession, api: str, key: str, args: argparse.Namespace
                     ) -> list[Answer]:
    """Every job once, --submitters POSTs in flight, none waiting for anything but its turn."""
    numbers = iter(range(args.jobs))
    answers: list[Answer] = []

    async def worker() -> None:
        for number in numbers:  # shared: each job is taken by one worker
            answers.append(await post(http, api, key, args.seconds, number))

    await asyncio.gather(*(worker() for _ in range(args.submitters)))
    return answers


async def retry_pass(http: aiohttp.ClientSession, api: str, key: str, args: argparse.Namespace,
                     refused: list[int]) -> list[Answer]:
    """The refused jobs again, each worker sleeping its Retry-After after a 429; until each is
    accepted (or answered otherwise, which the report shows)."""
    todo: asyncio.Queue[int] = asyncio.Queue()
    for number in refused:
        todo.put_nowait(number)
    answers: list[Answer] = []

    async def worker() -> None:
        while True:
            number = await todo.get()
            answer = await post(http, api, key, args.seconds, number)
            answers.append(answer)
            if answer.status == 429 and answer.retry_after is not None:
                todo.put_nowait(number)
                todo.task_done()
                await asyncio.sleep(float(answer.retry_after))  # as it asks
            else:
                todo.task_done()

    workers = [asyncio.create_task(worker()) for _ in range(args.submitters)]
    try:
        await todo.join()
    finally:
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return answers


async def statuses(dsn: str, ids: list[str]) -> Counter[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT status, count(*) AS n FROM jobs WHERE id = ANY($1::uuid[])"
                                " GROUP BY status", ids)
    finally:
        await conn.close()
    return Counter({row["status"]: row["n"] for row in rows})


async def until_ended(dsn: str, ids: list[str], seconds: float) -> Counter[str]:
    """The jobs' statuses once none is unfinished; TimeoutError after `seconds`."""
    async with asyncio.timeout(seconds):
        while True:  # polling the database: the benchmark has no event to wait on
            found = await statuses(dsn, ids)
            if sum(found[s] for s in ("succeeded", "failed", "cancelled")) == len(ids):
                return found
            await asyncio.sleep(0.5)


async def dispatch_times(dsn: str) -> list[float]:
    """When each job left the backlog (unix seconds), in order."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT extract(epoch FROM dispatched_at)::float8 AS t FROM jobs"
                                " WHERE dispatched_at IS NOT NULL ORDER BY 1")
    finally:
        await conn.close()
    return [row["t"] for row in rows]


@dataclass
class Comparison:
    """Retry-After against the wait until the backlog had room, over the 429s."""

    refusals: int
    too_short: int  # the backlog was still full when the Retry-After ran out
    too_long: int  # by a second or more
    waits: list[float]
    retry_afters: list[float]


def compare(refusals: list[Answer], dispatched: list[float]) -> Comparison:
    waits, given = [], []
    for answer in refusals:
        assert answer.retry_after is not None
        index = bisect.bisect_right(dispatched, answer.at)
        if index < len(dispatched):
            waits.append(dispatched[index] - answer.at)
            given.append(float(answer.retry_after))
    return Comparison(len(refusals), sum(r < w for r, w in zip(given, waits, strict=True)),
                      sum(r - w >= 1 for r, w in zip(given, waits, strict=True)), waits, given)


def tally(answers: list[Answer]) -> dict[str, int | str]:
    counts = Counter(str(a.status) if a.status in (202, 429) else "other" for a in answers)

    def answered_ms(status: int) -> str:
        took = [a.took for a in answers if a.status == status]
        return " / ".join(f"{percentile(took, f) * 1000:.0f}" for f in (0.5, 0.99)) if took \
            else "-"

    return {"202": counts["202"], "429": counts["429"], "other": counts["other"],
            "429 without Retry-After": sum(a.status == 429 and a.retry_after is None
                                           for a in answers),
            "202 answered p50 / p99 ms": answered_ms(202),
            "429 answered p50 / p99 ms": answered_ms(429)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--max-queued", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=1.0, help="of work per job")
    parser.add_argument("--submitters", type=int, default=16, help="POSTs in flight at once")
    args = parser.parse_args()
    budget = args.jobs * args.seconds / args.backends + DONE_TIMEOUT_MARGIN
    async with AsyncExitStack() as stack:
        tenants = await deployment(stack, args.backends, {"A": 1}, fair=True,
                                   settings={"MAX_QUEUED": str(args.max_queued)})
        key = tenants.keys["A"]
        http = await stack.enter_async_context(aiohttp.ClientSession())
        began = time.time()
        first = await first_pass(http, tenants.api, key, args)
        first_seconds = time.time() - began
        first_ids = [a.job_id for a in first if a.job_id is not None]
        refused = [a.number for a in first if a.status == 429 and a.retry_after is not None]
        retried = await retry_pass(http, tenants.api, key, args, refused)
        ids = first_ids + [a.job_id for a in retried if a.job_id is not None]
        ended = await until_ended(tenants.database, ids, budget)
        total_seconds = time.time() - began
        # Nothing accepted is lost: every job the first pass got a 202 for has succeeded.
        first_ended = await statuses(tenants.database, first_ids)
        dispatched = await dispatch_times(tenants.database)
    refusals = [a for a in first + retried if a.status == 429 and a.retry_after is not None]
    c = compare(refusals, dispatched)
    passes = {"first pass": tally(first), "retry pass": tally(retried)}
    print_table(["pass", *passes["first pass"]],
                [[name, *counts.values()] for name, counts in passes.items()])
    print()
    print_table(["jobs", "first pass s", "accepted in first pass, succeeded", "all done s",
                 "distinct jobs succeeded"],
                [[args.jobs, f"{first_seconds:.1f}",
                  f"{first_ended['succeeded']} of {len(first_ids)}", f"{total_seconds:.1f}",
                  f"{ended['succeeded']} of {len(set(ids))}"]])
    print()
    print_table(["429s compared", "Retry-After p50 / max s", "actual wait p50 / p95 / max s",
                 "too short", "too long by >= 1 s"],
                [[len(c.waits), f"{percentile(c.retry_afters, 0.5):g} / {max(c.retry_afters):g}",
                  " / ".join(f"{percentile(c.waits, f):.2f}" for f in (0.5, 0.95, 1.0)),
                  c.too_short, c.too_long]])
    print(json.dumps({
        "args": vars(args), "passes": passes, "first_pass_s": round(first_seconds, 2),
        "first_accepted": len(first_ids), "first_ended": dict(first_ended),
        "all_done_s": round(total_seconds, 2), "ended": dict(ended), "jobs": len(set(ids)),
        "retry_after": {"compared": len(c.waits), "too_short": c.too_short,
                        "too_long": c.too_long,
                        "given_p50": percentile(c.retry_afters, 0.5),
                        "wait_p50": round(percentile(c.waits, 0.5), 3),
                        "wait_p95": round(percentile(c.waits, 0.95), 3),
                        "wait_max": round(max(c.waits), 3)},
    }))


if __name__ == "__main__":
    asyncio.run(main())
