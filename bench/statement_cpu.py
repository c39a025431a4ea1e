"""Client CPU of one hot-path SQL statement, taken apart: the connection's checkout and checkin
(`db.driver_connection` with nothing run in it), a statement's round trip on a connection held
(asyncpg's Python and C before and after the wire, and its C alone), the JSON codecs, the
arrays' encoding (a group-committed statement sends one array a column), and the whole (a
checkout and a statement), one process on uvloop, embedded PostgreSQL, statements that touch
no table.

Each step runs `--calls` times, one call at a time, in `--rounds` rounds; the figure is the CPU
time of this process (`time.process_time`: waiting for PostgreSQL is not counted) per call,
the least and the median of the rounds. With `--callgrind`, in a process run under
`valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=/tmp/statement_cpu.%p`:
user-space instructions per call instead, counted for each step's calls alone
(`callgrind_control` switches the counting on and off and dumps the counts there).

With `--other SRC`, the same in a process whose PYTHONPATH puts SRC first (a `git archive` of
main's `src`, say), in turns with this checkout's.

Run from the repository root:
    .venv/bin/python -m bench.statement_cpu [--other /tmp/main/src] [--turns 3]
    valgrind --tool=callgrind --instr-atstart=no \\
        --callgrind-out-file=/tmp/statement_cpu.%p \\
        .venv/bin/python -m bench.statement_cpu --callgrind --calls 1000 --rounds 1
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import uvloop
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.harness import (
    bench_root,
    embedded_postgres,
    fresh_database,
    measured_runs,
    paired_parser,
    print_table,
)
from comfyfleet import db, json_codec
from comfyfleet.cli.main import _tune_garbage_collector

# A fenced change's shape: a job's id, attempt and prompt in, as many values out.
FENCE = "SELECT $1::uuid AS id, $2::int AS attempts, $3::text AS prompt_id"
# A job's row holds about ten JSON documents of some hundred bytes (hot_path's jobs: 131 B).
DOCUMENTS = 10
JSONB = "SELECT " + ", ".join(f"v AS v{n}" for n in range(DOCUMENTS)) + \
    " FROM (SELECT $1::jsonb AS v) AS one"
TEXT = JSONB.replace("::jsonb", "::text")
DOCUMENT = json_codec.dumps_text({"node": "3", "class_type": "KSampler", "step": 5,
                                  "steps": 20, "key": "0b0e6b1e-4f5e-4d6e/3_0.png",
                                  "size": 590, "content_type": "image/png"})
# sql/jobs.sql `finish`'s fourteen arrays, for one job, and the same values as scalars.
TYPES = ("uuid", "int", "text", "text", "text", "timestamptz", "jsonb", "jsonb", "timestamptz",
         "timestamptz", "float8", "boolean", "jsonb", "jsonb")
ARRAYS = "SELECT " + " + ".join(f"cardinality(${n}::{kind}[])"
                                for n, kind in enumerate(TYPES, 1))
SCALARS = "SELECT " + " + ".join(f"(${n}::{kind} IS NULL)::int"
                                 for n, kind in enumerate(TYPES, 1))
NOW = datetime.now(UTC)
VALUES = (uuid.uuid4(), 1, "p", "running", "succeeded", NOW, DOCUMENT, None, NOW, None, 1.0,
          False, None, DOCUMENT)


async def measure(calls: int, rounds: int, callgrind: bool) -> dict[str, Any]:
    figures: dict[str, list[float]] = {}
    with bench_root() as root:
        async with embedded_postgres(root) as server:
            engine = db.make_engine(await fresh_database(server))
            try:
                # One connection held for the steps that need no checkout; the others
                # take another of the pool's.
                async with db.driver_connection(engine) as held:
                    await held.fetchrow(FENCE, *_arguments(FENCE))  # prepared, cached
                    _tune_garbage_collector()  # as `comfyfleet serve` does once started
                    for _ in range(rounds):
                        for step, call in _steps(engine, held).items():
                            figures.setdefault(step, []).append(
                                await _per_call(call, calls, callgrind))
            finally:
                await engine.dispose()
    return {"per_call": figures, "unit": "instructions" if callgrind else "us"}


def _arguments(query: str) -> tuple[Any, ...]:
    if query == FENCE:
        return VALUES[:3]
    if query in (JSONB, TEXT):
        return (DOCUMENT,)
    if query == ARRAYS:
        return tuple([value] for value in VALUES)
    return VALUES


def _steps(engine: AsyncEngine, held: asyncpg.Connection
           ) -> dict[str, Callable[[], Awaitable[Any]]]:
    """Each step's call, by what it measures."""

    fence = _arguments(FENCE)

    async def checkout() -> None:
        async with db.driver_connection(engine):
            pass

    async def whole() -> None:
        async with db.driver_connection(engine) as connection:
            await connection.fetchrow(FENCE, *fence)

    def on_held(query: str) -> Callable[[], Awaitable[Any]]:
        arguments = _arguments(query)

        async def call() -> Any:
            return await held.fetchrow(query, *arguments)
        return call

    async def protocol() -> Any:
        # What asyncpg's Python around the wire leaves: its protocol's bind and execute (C)
        # of the statement it prepared and keeps (private: a measure, not a way to run SQL).
        state = held._stmt_cache.get((FENCE, held._protocol.get_record_class(), False))
        return await held._protocol.bind_execute(state, fence, "", 1, False, None)

    return {
        "checkout and checkin (driver_connection, nothing run)": checkout,
        "a fenced change's shape (3 values in and out), connection held": on_held(FENCE),
        "the same by asyncpg's protocol alone (no Python of asyncpg's)": protocol,
        "ten jsonb values out, connection held": on_held(JSONB),
        "the same ten as text (no JSON codec)": on_held(TEXT),
        "finish's 14 arrays of one value, connection held": on_held(ARRAYS),
        "the same 14 values as scalars": on_held(SCALARS),
        "checkout, the fenced change's shape, checkin": whole,
    }


async def _per_call(call: Callable[[], Awaitable[Any]], calls: int, callgrind: bool) -> float:
    """CPU microseconds (or, counted by callgrind, instructions) per call of `call`."""
    for _ in range(calls // 10):  # the warm-up
        await call()
    if callgrind:
        _callgrind("--zero", "--instr=on")
    started = time.process_time()
    for _ in range(calls):
        await call()
    spent = time.process_time() - started
    if callgrind:
        _callgrind("--instr=off")
        return _callgrind_instructions() / calls
    return spent * 1e6 / calls


def _callgrind(*options: str) -> None:
    for option in options:
        subprocess.run(["callgrind_control", option, str(os.getpid())], check=True,
                       capture_output=True)


def _callgrind_instructions() -> int:
    """The instructions counted since the counters were zeroed: the newest dump's totals."""
    _callgrind("--dump")
    dumps = Path("/tmp").glob(f"statement_cpu.{os.getpid()}.*")
    newest = max(dumps, key=lambda path: int(path.suffix[1:]))
    for line in newest.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {newest}")


def main() -> None:
    parser = paired_parser(__doc__)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--callgrind", action="store_true")
    args = parser.parse_args()
    if args.child or args.callgrind:
        print(json.dumps(uvloop.run(measure(args.calls, args.rounds, args.callgrind))))
        return
    print(f"load average {os.getloadavg()[0]:.2f}")
    runs = measured_runs("bench.statement_cpu", args.other, args.turns,
                         [f"--calls={args.calls}", f"--rounds={args.rounds}"],
                         lambda: uvloop.run(measure(args.calls, args.rounds, False)))
    codes = list(dict.fromkeys(run["code"] for run in runs))
    steps = list(runs[0]["per_call"])
    print_table(["CPU us per call (least, median of rounds)", *codes],
                [[step, *(_least_and_median(runs, code, step) for code in codes)]
                 for step in steps])
    print(json.dumps(runs))


def _least_and_median(runs: list[dict[str, Any]], code: str, step: str) -> str:
    values = [value for run in runs if run["code"] == code for value in run["per_call"][step]]
    return f"{min(values):.2f}, {statistics.median(values):.2f}"


if __name__ == "__main__":
    main()
