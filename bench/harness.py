"""What the benchmarks share: services on loopback, open-loop load, timing and accounting.

Everything listens on 127.0.0.1 and stops with the benchmark: embedded PostgreSQL, a moto S3
server, simulated ComfyUI processes (`comfyfleet sim`, or `bench.timed_sim` where a benchmark
needs to know when a backend accepted or finished a prompt) and `comfyfleet serve` in a
process of its own, so that its CPU time and its profile are its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil
from aiobotocore.session import get_session
from aiohttp import web
from sqlalchemy import make_url

from comfyfleet import db
from comfyfleet.cli.demo import WebhookReceiver
from comfyfleet.settings import Settings
from comfyfleet.webhooks.signing import new_secret
from comfyfleet.workflows.catalog import load_catalog
from tests.conftest import S3_CREDENTIALS
from tests.support import LOOPBACK, REPO, free_ports, new_database, python_process, serve_env

READY_SECONDS = 120.0  # for every backend of a large fleet to be connected
# The job the benchmarks submit: a 64x64 invert, its output a PNG of a few hundred bytes.
WORKFLOW = "invert"
PARAMS = {"width": 64, "height": 64}
STATS_FLUSH_SECONDS = 2.5  # for PostgreSQL's backends to add their last transactions


def workflow_job() -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's validated parameters and filled prompt, as POST /jobs builds them."""
    return load_catalog(REPO / "workflows").workflows[WORKFLOW].build(PARAMS)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest value with `fraction` of them at or below."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(math.ceil(fraction * len(ordered)) - 1, 0))]


def latency_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Sample count and p50/p95/p99 in milliseconds."""
    if not seconds:
        return {"samples": 0}
    return {"samples": len(seconds),
            **{f"p{p}": round(percentile(seconds, p / 100) * 1000, 2) for p in (50, 95, 99)}}


def paired_parser(description: str | None) -> argparse.ArgumentParser:
    """The options of a bench that measures this checkout alone, or it and another's `src`
    in turns (`measured_runs`): --other, --turns, and --child, what each turn runs."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--other", type=Path, help="another checkout's src, in turns")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return parser


def measured_runs(module: str, other: Path | None, turns: int, child_args: Sequence[str],
                  here: Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
    """With `other`, `in_turns`' runs of `module`; else one run of `here` in this process,
    labelled as `in_turns` labels this checkout's."""
    if other is not None:
        return in_turns(module, other.resolve(), turns, child_args)
    return [{"turn": 1, "code": "this checkout", **here()}]


def in_turns(module: str, other: Path, turns: int,
             child_args: Sequence[str]) -> list[dict[str, Any]]:
    """`python -m module --child *child_args`, `turns` times, this checkout's and then
    another's (`other`, a `src` put first on PYTHONPATH): the JSON each run prints, with its
    turn and which code ran it."""
    checkouts = {"this checkout": None, f"--other {other}": os.pathsep.join([str(other),
                                                                            str(REPO)])}
    runs: list[dict[str, Any]] = []
    for turn in range(turns):
        for label, path in checkouts.items():
            env = dict(os.environ) if path is None else {**os.environ, "PYTHONPATH": path}
            done = subprocess.run([sys.executable, "-m", module, "--child", *child_args],
                                  env=env, cwd=REPO, check=True, capture_output=True, text=True)
            runs.append({"turn": turn + 1, "code": label, **json.loads(done.stdout)})
    return runs


def print_turns(runs: Sequence[dict[str, Any]], figure: str, unit: str) -> None:
    """The least and the median of each code's rounds' `figure` (`unit`, say "ms per job")
    from `in_turns`' runs, and with two codes each turn's ratio of their medians. The least
    says what the work costs, the median what it cost under the load there was; on a busy
    machine, the codes' medians of each turn (run one after the other) compare best."""
    codes = list(dict.fromkeys(run["code"] for run in runs))
    print_table(["code", f"{unit}, least", "median"],
                [[code, *(f"{pick(values):.3f}" for values in [
                    [value for run in runs if run["code"] == code for value in run[figure]]]
                    for pick in (min, statistics.median))] for code in codes])
    if len(codes) == 2:
        medians = {(run["turn"], run["code"]): statistics.median(run[figure]) for run in runs}
        ratios = [medians[turn, codes[0]] / medians[turn, codes[1]]
                  for turn in sorted({run["turn"] for run in runs})]
        print(f"{codes[0]} / {codes[1]}, each turn's medians: "
              + " ".join(f"{ratio:.3f}" for ratio in ratios)
              + f" (median {statistics.median(ratios):.3f})")


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table, first column left-aligned and the others right-aligned."""
    cells = [[str(cell) for cell in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                                 for i, cell in enumerate(row)) + " |"

    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|")
    for row in cells[1:]:
        print(line(row))


@contextmanager
def bench_root() -> Iterator[Path]:
    """A scratch directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="comfyfleet-bench-") as root:
        os.chmod(root, 0o755)  # as root, embedded PostgreSQL runs as another user
        yield Path(root)


@asynccontextmanager
async def embedded_postgres(root: Path) -> AsyncIterator[Any]:
    server = await asyncio.to_thread(db.start_embedded_postgres, root / "pg")
    try:
        yield server
    finally:
        await asyncio.to_thread(server.cleanup)


async def fresh_database(server: Any) -> str:
    """A new, empty database on the embedded server; its SQLAlchemy URL."""
    return await new_database(server, prefix="bench")


async def transactions(database_url: str) -> int:
    """Transactions committed or rolled back in this database so far, from PostgreSQL's
    statistics (each backend adds its own at most once a second)."""
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return int(await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database"
            " WHERE datname = current_database()"))
    finally:
        await conn.close()


async def transaction_ids(database_url: str) -> int:
    """The next transaction id of the server: each transaction that writes takes one (and
    waits at its commit for its WAL to be flushed), a read-only one none. Taking it takes one."""
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return int(await conn.fetchval("SELECT pg_current_xact_id()::text::bigint"))
    finally:
        await conn.close()


async def table_writes(database_url: str) -> dict[str, Any]:
    """The server's WAL so far (bytes, records, full-page images) and, for each table of this
    database, the rows inserted, updated (of them HOT: no index entry written), deleted, and
    the autovacuum and autoanalyze runs, from PostgreSQL's statistics (flushed as
    `transactions`'). Subtract two readings (`writes_between`) for a window's writes."""
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        # pg_walinspect (contrib, in the embedded build) reads the WAL between two readings
        # (wal_records_by_relation).
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
        wal = await conn.fetchrow(
            "SELECT pg_current_wal_lsn() - '0/0' AS bytes, wal_records AS records,"
            " wal_fpi AS full_page_images FROM pg_stat_wal")
        tables = await conn.fetch(
            "SELECT relname, n_tup_ins AS inserted, n_tup_upd AS updated,"
            " n_tup_hot_upd AS hot, n_tup_del AS deleted, autovacuum_count AS autovacuums,"
            " autoanalyze_count AS autoanalyzes FROM pg_stat_user_tables")
    finally:
        await conn.close()
    return {"wal": {key: int(value) for key, value in wal.items()},
            "tables": {row["relname"]: {key: int(row[key]) for key in list(row.keys())[1:]}
                       for row in tables}}


async def wal_records_by_relation(
    database_url: str, before: dict[str, Any], after: dict[str, Any], per: int
) -> dict[str, dict[str, dict[str, float]]]:
    """The WAL records written between two `table_writes` readings per item (`per` items in
    the window), by table of this database, relation (the table, or one of its indexes) and
    record type ("Btree/INSERT_LEAF" and "Btree/INSERT_POST": an index entry written; "Heap/
    HOT_UPDATE"), each counted by the relation of its first block; under 0.01 per item left out.
    """
    conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        rows = await conn.fetch(
            "SELECT coalesce(indexed.relname, relation.relname) AS table_name,"
            "       relation.relname AS relation,"
            "       block.resource_manager || '/' || block.record_type AS record,"
            "       count(*) AS count"
            " FROM pg_get_wal_block_info($1::pg_lsn, $2::pg_lsn) AS block"
            " JOIN pg_database ON pg_database.oid = block.reldatabase"
            "                 AND pg_database.datname = current_database()"
            " JOIN pg_class AS relation ON relation.relfilenode = block.relfilenode"
            " LEFT JOIN pg_index ON pg_index.indexrelid = relation.oid"
            " LEFT JOIN pg_class AS indexed ON indexed.oid = pg_index.indrelid"
            " WHERE block.block_id = 0"
            " GROUP BY 1, 2, 3 ORDER BY 4 DESC", before["wal"]["bytes"], after["wal"]["bytes"])
    finally:
        await conn.close()
    found: dict[str, dict[str, dict[str, float]]] = {}
    for row in rows:
        if row["count"] / per >= 0.01:
            found.setdefault(row["table_name"], {}).setdefault(row["relation"], {})[
                row["record"]] = round(row["count"] / per, 2)
    return found


def writes_between(before: dict[str, Any], after: dict[str, Any], per: int) -> dict[str, Any]:
    """The WAL and the tables' writes between two `table_writes` readings, per item (`per`
    items in the window); tables nothing wrote are left out."""
    wal = {key: round((after["wal"][key] - before["wal"][key]) / per, 2) for key in after["wal"]}
    tables = {}
    for name, counts in after["tables"].items():
        earlier = before["tables"].get(name, {})
        delta = {key: round((value - earlier.get(key, 0)) / per, 2)
                 for key, value in counts.items()}
        if any(delta.values()):
            tables[name] = delta
    return {"wal": wal, "tables": tables}


def s3_client(endpoint: str) -> Any:
    """An aiobotocore S3 client for the moto server (an async context manager)."""
    return get_session().create_client("s3", region_name="us-east-1", endpoint_url=endpoint,
                                       **S3_CREDENTIALS)


@dataclass
class S3Server:
    endpoint: str
    bucket: str
    process: asyncio.subprocess.Process


@asynccontextmanager
async def moto_s3() -> AsyncIterator[S3Server]:
    """A moto S3 server in its own process, with one bucket."""
    port = free_ports(1)
    endpoint = f"http://{LOOPBACK}:{port}"
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    async with python_process("bench.quiet_moto", "-H", LOOPBACK, "-p", str(port),
                              ready_url=endpoint) as process:
        async with s3_client(endpoint) as s3:
            await s3.create_bucket(Bucket=bucket)
        yield S3Server(endpoint, bucket, process)


@dataclass
class SimFleet:
    urls: list[str]
    processes: list[asyncio.subprocess.Process]
    stamps_urls: list[str]  # one per process, with timed simulators

    async def stamps(self, http: aiohttp.ClientSession) -> dict[str, dict[str, float]]:
        """Every timed simulator's stamps: {"accepted": {prompt_id: t}, "started": {...},
        "succeeded": {...}}."""
        merged: dict[str, dict[str, float]] = {"accepted": {}, "started": {}, "succeeded": {}}
        for url in self.stamps_urls:
            async with http.get(f"{url}/stamps") as response:
                for kind, stamps in (await response.json()).items():
                    merged[kind].update(stamps)
        return merged

    async def accepted(self, http: aiohttp.ClientSession) -> int:
        total = 0
        for url in self.stamps_urls:
            async with http.get(f"{url}/accepted") as response:
                total += int(await response.json())
        return total


@asynccontextmanager
async def sim_fleet(
    backends: int, *, processes: int = 1, data_dir: Path | None = None, timed: bool = False,
    options: Sequence[str] = (),
) -> AsyncIterator[SimFleet]:
    """`backends` simulators spread over `processes` processes, started one after the other
    (each takes its ports once the one before has bound its own). `timed`: through
    bench.timed_sim, which notes when each prompt was accepted and succeeded."""
    fleet = SimFleet([], [], [])
    shares = [backends // processes + (i < backends % processes) for i in range(processes)]
    async with AsyncExitStack() as stack:
        for index, count in enumerate(shares):
            port = free_ports(count + timed)  # the stamps' port after the simulators'
            urls = [f"http://{LOOPBACK}:{port + i}" for i in range(count)]
            args = ["--backends", str(count), "--port", str(port), *options]
            if data_dir is not None:
                args += ["--data-dir", str(data_dir / f"process{index}")]
            if timed:
                fleet.stamps_urls.append(f"http://{LOOPBACK}:{port + count}")
                command = ["bench.timed_sim", "--stamps-port", str(port + count), *args]
            else:
                command = ["comfyfleet", "sim", *args]
            fleet.processes.append(await stack.enter_async_context(
                python_process(*command, ready_url=urls[-1] + "/prompt")))
            fleet.urls += urls
        yield fleet


@dataclass
class Serve:
    process: asyncio.subprocess.Process
    base: str

    @property
    def api(self) -> str:
        return self.base + "/api/v1"


@asynccontextmanager
async def comfyfleet_serve(
    database_url: str, data_dir: Path, backends: Sequence[str], *, secret: str,
    s3: S3Server | None = None, env_overrides: Mapping[str, str] | None = None,
    api_key: str | None = None, cpu_profile: Path | None = None, step_trace: Path | None = None,
) -> AsyncIterator[Serve]:
    """`comfyfleet serve` in its own process (log level WARNING, so that the benchmark's output
    stays readable), ready once every backend is connected. Storage is S3 on `s3`, else a
    local directory; `env_overrides` are more settings (e.g. AFFINITY_WINDOW); `api_key`, one
    of its API_KEYS when it has any; `cpu_profile`: run under bench.cpu_sampled, its samples
    written there (see cpu_sampling); `step_trace`: run under bench.step_trace, its stamps
    written there on SIGUSR2."""
    port = free_ports(1)
    settings = Settings(_env_file=None, database_url=database_url, webhook_secret=secret)
    storage = {} if s3 is None else {
        "STORAGE": "s3", "S3_BUCKET": s3.bucket, "S3_ENDPOINT_URL": s3.endpoint,
        "AWS_ACCESS_KEY_ID": S3_CREDENTIALS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": S3_CREDENTIALS["aws_secret_access_key"],
    }
    env = serve_env(settings, data_dir, port, COMFYUI_ENDPOINTS=",".join(backends), **storage,
                    **(env_overrides or {}))
    base = f"http://{LOOPBACK}:{port}"
    sampled = ("bench.cpu_sampled", str(cpu_profile), "-m") if cpu_profile else \
        ("bench.step_trace", str(step_trace), "-m") if step_trace else ()
    async with python_process(*sampled, "comfyfleet", "--log-level", "WARNING", "serve", env=env,
                              ready_url=base + "/healthz") as process:
        serve = Serve(process, base)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key is not None else {}
        async with aiohttp.ClientSession() as http, asyncio.timeout(READY_SECONDS):
            while True:
                async with http.get(f"{serve.api}/backends", headers=headers) as response:
                    healthy = sum(backend["healthy"] for backend in await response.json())
                if healthy >= len(backends):  # discovery may add more
                    break
                await asyncio.sleep(0.2)  # polling the service: no local event to wait on
        yield serve


@dataclass
class TimedReceiver(WebhookReceiver):
    """comfyfleet.cli.demo's verifying receiver that also notes when each webhook had verified."""

    verified_at: dict[str, float] = field(default_factory=dict)  # webhook-id -> monotonic

    async def _receive(self, request: web.Request) -> web.Response:
        response = await super()._receive(request)
        if response.status == 204:
            self.verified_at[request.headers["webhook-id"]] = time.monotonic()
        return response

    async def wait_until(self, count: int, seconds: float) -> None:
        """Until `count` webhooks in all have verified; TimeoutError after `seconds`."""
        async with asyncio.timeout(seconds):
            await self.wait_for(count)


@dataclass
class Deployment:
    """`comfyfleet serve` in front of simulators, storing in S3 on moto (or in a local
    directory), with embedded PostgreSQL and a verifying webhook receiver in this process."""

    postgres: Any
    s3: S3Server | None  # None: local storage
    sims: SimFleet
    receiver: TimedReceiver
    database_url: str
    serves: list[Serve]  # one or more processes on the one database
    http: aiohttp.ClientSession
    meter: CpuMeter  # every process of it, and this one

    @property
    def serve(self) -> Serve:
        return self.serves[0]


async def deploy(
    stack: AsyncExitStack, root: Path, backends: int, *, processes: int = 1, timed: bool = False,
    storage: str = "s3", serve_processes: int = 1, cpu_profile: Path | None = None,
    step_trace: Path | None = None,
) -> Deployment:
    """Start it all; `stack` stops it. The simulators are zero-duration, `timed` as in
    sim_fleet. `storage`: "s3" (moto) or "local" (a directory the service processes share,
    as a volume would be); `serve_processes`: `comfyfleet serve` processes on the one
    database, each connected to every backend; `cpu_profile`: the first of them under
    bench.cpu_sampled (see cpu_sampling); `step_trace`: the first under bench.step_trace."""
    if storage not in ("s3", "local"):
        raise ValueError(f"storage is s3 or local, not {storage!r}")
    postgres = await stack.enter_async_context(embedded_postgres(root))
    s3 = await stack.enter_async_context(moto_s3()) if storage == "s3" else None
    sims = await stack.enter_async_context(
        sim_fleet(backends, processes=processes, data_dir=root / "sims", timed=timed))
    receiver = TimedReceiver(new_secret())
    await receiver.start()
    stack.push_async_callback(receiver.stop)
    database_url = await fresh_database(postgres)
    serves = [await stack.enter_async_context(comfyfleet_serve(
        database_url, root / "data", sims.urls, secret=receiver.secret, s3=s3,
        cpu_profile=cpu_profile if n == 0 else None,
        step_trace=step_trace if n == 0 else None))
        for n in range(serve_processes)]
    http = await stack.enter_async_context(aiohttp.ClientSession())
    meter = CpuMeter(standard_components(serves, sims, postgres, s3))
    return Deployment(postgres, s3, sims, receiver, database_url, serves, http, meter)


async def serve_beside(
    stack: AsyncExitStack, deployment: Deployment, data_dir: Path, backends: Sequence[str], *,
    s3: S3Server | None = None, env_overrides: Mapping[str, str] | None = None,
    step_trace: Path | None = None, database_settings: Mapping[str, str] | None = None,
) -> Serve:
    """Another `comfyfleet serve` beside `deployment`'s, for comparing the two: a database of
    its own on the same PostgreSQL (`database_settings`: its own values of PostgreSQL's
    settings, ALTER DATABASE ... SET), webhooks signed for the same receiver; `stack` stops
    it. Storage, `env_overrides` and `step_trace` as in comfyfleet_serve."""
    database_url = await fresh_database(deployment.postgres)
    if database_settings:
        conn = await asyncpg.connect(database_url.replace("postgresql+asyncpg://",
                                                          "postgresql://"))
        try:
            name = await conn.fetchval("SELECT current_database()")
            for setting, value in database_settings.items():
                await conn.execute(f'ALTER DATABASE "{name}" SET {setting} = {value}')
        finally:
            await conn.close()
    return await stack.enter_async_context(comfyfleet_serve(
        database_url, data_dir, backends, secret=deployment.receiver.secret, s3=s3,
        env_overrides=env_overrides, step_trace=step_trace))


async def open_loop(
    rate: float, count: int, fire: Callable[[int], Coroutine[Any, Any, None]], *,
    seed: int = 1,
) -> float:
    """Call `fire(0..count-1)` at Poisson arrivals of `rate` per second, each in its own task
    whatever the earlier ones are doing (open loop); returns once all have finished (when
    cancelled, those still running are cancelled too). The result is the largest lag behind
    the schedule, in seconds: the load generator's own delay, which should stay far below the
    latencies it measures."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    due = loop.time()
    lag = 0.0
    tasks: list[asyncio.Task[None]] = []
    try:
        for index in range(count):
            due += rng.expovariate(rate)
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = max(lag, loop.time() - due)
            tasks.append(asyncio.create_task(fire(index)))
        await asyncio.gather(*tasks)
    finally:  # cancelled, or one failed: none is left running
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return lag


# --- CPU accounting ---------------------------------------------------------------------------

@dataclass
class Component:
    name: str
    pids: list[int]
    # Each pid's whole process tree, the children that ended included (e.g. a PostgreSQL
    # postmaster and its backends); else the processes themselves only.
    with_children: bool = False


def descendants(pid: int) -> list[int]:
    """Every process under `pid`, children and theirs."""
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _process_seconds(process: psutil.Process, *, ended_children: bool) -> float:
    """User + system time of `process`; with `ended_children`, its children's that ended
    (and were waited for) too."""
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0  # gone: what it used is in its parent's ended children's time
    own = float(times.user + times.system)
    return own + float(times.children_user + times.children_system) if ended_children else own


def _component_seconds(component: Component) -> float:
    seconds = 0.0
    for pid in component.pids:
        try:
            root = psutil.Process(pid)
            tree = [root, *root.children(recursive=True)] if component.with_children else [root]
        except psutil.NoSuchProcess:
            continue
        seconds += sum(_process_seconds(process, ended_children=component.with_children)
                       for process in tree)
    return seconds


def _machine_busy_seconds() -> float:
    """CPU time spent by every process on the machine and by the kernel for them (interrupts,
    and steal: time the hypervisor gave to other machines), idle and iowait left out."""
    times = psutil.cpu_times()
    return float(times.user + times.nice + times.system + sum(
        getattr(times, name, 0.0) for name in ("irq", "softirq", "steal")))


MACHINE = "machine (all processes)"
NOT_OURS = "not ours (other users, kernel threads)"


class CpuMeter:
    """CPU seconds each component used between start() and stop(), and the machine's busy
    time in the same interval (other users' processes included)."""

    def __init__(self, components: Sequence[Component]) -> None:
        self.components = list(components)
        self._started: dict[str, float] = {}
        self._wall = 0.0
        self.used: dict[str, float] = {}
        self.seconds = 0.0

    def _snapshot(self) -> dict[str, float]:
        snapshot = {c.name: _component_seconds(c) for c in self.components}
        snapshot[MACHINE] = _machine_busy_seconds()
        return snapshot

    def start(self) -> None:
        self._started = self._snapshot()
        self._wall = time.monotonic()

    def stop(self) -> None:
        ended = self._snapshot()
        self.seconds = time.monotonic() - self._wall
        self.used = {name: ended[name] - self._started[name] for name in ended}
        ours = sum(seconds for name, seconds in self.used.items() if name != MACHINE)
        self.used[NOT_OURS] = self.used[MACHINE] - ours

    def ms_per(self, name: str, count: int) -> float:
        """Milliseconds of CPU component `name` used per item, `count` items in the interval."""
        return round(self.used[name] / count * 1000, 1)

    def ms_per_item(self, count: int) -> dict[str, float]:
        """Milliseconds of CPU per item of every component, of the machine and of the rest of
        it ("not ours"), `count` items in the interval."""
        return {name: round(used / count * 1000, 3) for name, used in self.used.items()}

    def as_json(self) -> dict[str, float]:
        """Cores each component kept busy on average (CPU seconds / wall seconds)."""
        return {name: round(used / self.seconds, 2) for name, used in self.used.items()}

    def print(self) -> None:
        print_table(["component", "CPU s", "cores busy"],
                    [(name, f"{used:.1f}", f"{used / self.seconds:.2f}")
                     for name, used in self.used.items()])


def standard_components(
    serves: Sequence[Serve], sims: SimFleet, postgres: Any, moto: S3Server | None = None,
) -> list[Component]:
    """The benchmark's processes, each with its process tree but this one's (the others are
    its children); every `comfyfleet serve` of `serves` counted as one."""
    components = [
        Component("benchmark client", [os.getpid()]),
        Component("simulators", [p.pid for p in sims.processes], with_children=True),
        Component("postgres", [postgres.get_pid()], with_children=True),
    ]
    if serves:
        components.insert(0, Component("comfyfleet serve", [s.process.pid for s in serves],
                                       with_children=True))
    if moto is not None:
        components.append(Component("moto (S3)", [moto.process.pid], with_children=True))
    return components


# --- profiling ----------------------------------------------------------------------------------

PY_SPY = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


@asynccontextmanager
async def py_spy(pid: int, output: Path) -> AsyncIterator[None]:
    """Sample `pid`'s Python stacks 100 times a second while the block runs, without pausing
    it, and only while it holds the GIL: time spent waiting (for the CPU too, on a busy
    machine) is left out. Collapsed stacks ("frame;frame;... count" lines) go to `output`."""
    if PY_SPY is None:
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    process = await asyncio.create_subprocess_exec(
        PY_SPY, "record", "--pid", str(pid), "--rate", "100", "--nonblocking", "--gil",
        "--format", "raw", "--output", str(output), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        yield
    finally:
        process.send_signal(signal.SIGINT)  # py-spy writes its output and exits
        await process.wait()


CPU_SAMPLES_WRITE_SECONDS = 1.0


@asynccontextmanager
async def cpu_sampling(process: asyncio.subprocess.Process, output: Path) -> AsyncIterator[None]:
    """Sample the CPU time of `process` (started under bench.cpu_sampled, writing to `output`)
    while the block runs: collapsed stacks in `output` afterwards, as py_spy writes them."""
    await asyncio.to_thread(output.unlink, missing_ok=True)
    process.send_signal(signal.SIGUSR1)
    try:
        yield
    finally:
        process.send_signal(signal.SIGUSR2)
        # Written (whole: renamed into place) by the process's signal handler, which runs as
        # soon as its event loop wakes, with nothing else to do by now.
        await asyncio.sleep(CPU_SAMPLES_WRITE_SECONDS)
        if not await asyncio.to_thread(output.exists):
            raise RuntimeError(f"no CPU samples from process {process.pid} in {output}")


# What a stack is doing: its outermost frame in one of comfyfleet's parts; failing that, what
# the library it is in does. SQLAlchemy's async layer runs each statement in a greenlet, whose
# stack does not show the comfyfleet call that made it.
ACTIVITIES = [
    ("comfyfleet/api/", "API requests (validate, store, render)"),
    ("comfyfleet/dispatch/", "dispatch (claim, POST /prompt)"),
    ("comfyfleet/execution/collector.py", "collect (history, /view, storage, finish)"),
    ("comfyfleet/execution/", "backend events (websocket -> job transitions)"),
    ("comfyfleet/fleet/", "backend events (websocket -> job transitions)"),
    ("comfyfleet/webhooks/", "webhook delivery (claim, sign, POST, record)"),
]
LIBRARY_ACTIVITIES = [
    ("sqlalchemy/", "SQL statements (in a greenlet: caller not visible)"),
    ("sqlmodel/", "SQL statements (in a greenlet: caller not visible)"),
    ("asyncpg/", "SQL statements (in a greenlet: caller not visible)"),
    ("uvicorn/", "API requests (validate, store, render)"),
    ("starlette/", "API requests (validate, store, render)"),
    ("fastapi/", "API requests (validate, store, render)"),
    ("aiohttp/", "aiohttp callbacks (websocket and HTTP client reads)"),
    ("comfyfleet/http_client.py", "lean HTTP client callbacks (its reads)"),
    ("comfyfleet/comfy/websocket.py", "websocket client callbacks (its reads)"),
]
# The library of a sample's innermost frame: where the CPU time itself goes.
LIBRARIES = [
    ("comfyfleet/http_client.py", "lean HTTP client"),
    ("comfyfleet/", "comfyfleet"), ("sqlalchemy/", "SQLAlchemy"), ("sqlmodel/", "SQLAlchemy"),
    ("asyncpg/", "asyncpg"), ("botocore/", "botocore (S3 client)"),
    ("aiohttp/", "aiohttp"), ("yarl/", "aiohttp"), ("multidict/", "aiohttp"),
    ("pydantic", "pydantic"), ("fastapi/", "FastAPI/Starlette"),
    ("starlette/", "FastAPI/Starlette"), ("uvicorn/", "uvicorn"), ("h11/", "uvicorn"),
    ("json/", "json"), ("logging/", "logging"), ("asyncio/", "asyncio"),
    ("selectors.py", "asyncio"), ("standardwebhooks/", "signing"), ("hmac.py", "signing"),
    ("uuid.py", "uuid"), ("datetime", "datetime"), ("copy.py", "copy"),
]
# What a sample's CPU time was for: the first of these (in this order) with a fragment in any
# frame of its stack. The service's parts on a job's path, each with the HTTP requests,
# statements and other libraries' work below it.
COMPONENTS = [
    ("gc (generation", "garbage collector"),
    ("S3Storage._put (", "storage: S3 PUT (signing, the request, a connection if new)"),
    ("S3Storage.signed_url", "storage: S3 presigned GET URLs"),
    ("LocalStorage.", "storage: local file"),
    ("ComfyClient.view", "backend: GET /view"),
    ("ComfyClient.history", "backend: GET /history"),
    ("ComfyClient.queue_prompt", "backend: POST /prompt"),
    ("WebhookSender.send", "webhook: signing and POST"),
    ("Dispatcher._pick", "dispatch: placement (in the claim)"),
    ("JobRepository.claim_next", "SQL: the claim"),
    ("JobRepository.insert", "SQL: the insert (POST /jobs)"),
    ("JobRepository.finish", "SQL: the finish (with its webhook's outbox row)"),
    ("JobRepository.transition", "SQL: other transitions (running, ...)"),
    ("Outbox.", "SQL: webhook outbox"),
    ("comfyfleet/jobs/repository.py", "SQL: other repository statements"),
    ("sqlalchemy/pool/", "SQL: SQLAlchemy's pool (checkout, checkin)"),
    ("Engine.raw_connection", "SQL: SQLAlchemy's pool (checkout, checkin)"),
    ("comfyfleet/webhooks/", "webhook: the worker's own work"),
    ("BackendSession._read", "websocket: frames -> tracker (transitions' SQL apart)"),
    ("comfyfleet/api/", "HTTP server: POST /jobs (route, intake, render)"),
    ("uvicorn/", "HTTP server: uvicorn, FastAPI"),
    ("Collector.", "collector: the rest"),
    ("Dispatcher.", "dispatch: the rest"),
    ("_jsonb_decoder", "SQL: decoding JSONB columns (caller not visible)"),
    ("asyncpg/", "SQL: asyncpg (caller not visible)"),
    ("aiohttp/", "aiohttp callbacks: reads, body writes (caller not visible)"),
    ("comfyfleet/http_client.py", "lean HTTP client callbacks: reads (caller not visible)"),
    ("comfyfleet/comfy/websocket.py", "websocket client callbacks: reads (frames cut out)"),
]
# Costs worth naming, counted wherever one of their frames is on the stack (so they overlap).
NAMED_COSTS = [
    (("sqlalchemy/", "sqlmodel/", "asyncpg/"), "SQLAlchemy + asyncpg, all of it"),
    (("_async_ping",), "pool_pre_ping: BEGIN; ';'; ROLLBACK before each transaction"),
    (("_jsonb_decoder",), "decoding JSONB columns (json.loads)"),
    (("botocore/",), "S3 client (botocore: signing, serialising, parsing)"),
    (("h11/",), "h11, the pure-Python HTTP/1.1 parser uvicorn runs on here"),
]


def _frame_file(frame: str) -> str:
    """`func (path/file.py:12)` -> `path/file.py`."""
    return frame.rsplit(" (", 1)[-1].rsplit(":", 1)[0]


def _first_match(frame_files: Sequence[str], table: Sequence[tuple[str, str]]) -> str | None:
    for path in frame_files:
        for fragment, name in table:
            if fragment in path:
                return name
    return None


def profile_breakdown(raw: Path) -> dict[str, Any]:
    """Shares (%) of the profiled process's samples: by activity, by component, by the
    library of the innermost frame, and the named costs."""
    activities: Counter[str] = Counter()
    components: Counter[str] = Counter()
    libraries: Counter[str] = Counter()
    named: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue  # a frame's text may hold a newline: the rest of it is on this line
        count = int(count_text)
        frames = stack.split(";")
        files = [_frame_file(frame) for frame in frames]
        total += count
        activity = _first_match(files, ACTIVITIES) or _first_match(files, LIBRARY_ACTIVITIES)
        activities[activity or "event loop and the rest"] += count
        component = next((name for fragment, name in COMPONENTS
                          if any(fragment in frame for frame in frames)), None)
        components[component or "event loop and the rest"] += count
        libraries[_first_match(files[-1:], LIBRARIES) or "other"] += count
        for fragments, name in NAMED_COSTS:
            if any(fragment in frame for frame in frames for fragment in fragments):
                named[name] += count

    def shares(counter: Counter[str]) -> dict[str, float]:
        return {name: round(100 * n / total, 1) for name, n in counter.most_common()}

    return {"samples": total, "by_activity": shares(activities),
            "by_component": shares(components),
            "by_library": shares(libraries), "named_costs": shares(named)}


# --- Transactions by statement ----------------------------------------------------------------

_STATEMENT_LOGGING = {"log_min_duration_statement": "0", "log_parameter_max_length": "0",
                      "log_line_prefix": "'%p %v %d '"}
# A log record's first line: pid, virtual transaction id (one per transaction, autocommit
# statements and asyncpg's Parse-only prepares included), database, then what was run.
_LOGGED = re.compile(r"^(\d+) (\S+) (\S+) LOG:  duration: [\d.]+ ms  "
                     r"(?:(parse|bind|execute) [^:]*|statement): (.*)$")


@asynccontextmanager
async def transactions_by_statement(server: Any, database_url: str) -> AsyncIterator[Counter[str]]:
    """Count the transactions `database_url` commits meanwhile by the statement that opens
    each (BEGIN skipped; a transaction that only prepared a statement is "prepare: ..."),
    from PostgreSQL's own log of every statement. Slows PostgreSQL down: count, don't time."""
    counts: Counter[str] = Counter()
    log = Path(server.log)
    database = make_url(database_url).database
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://")

    async def configure(reset: bool) -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for name, value in _STATEMENT_LOGGING.items():
                await conn.execute(f"ALTER SYSTEM RESET {name}" if reset
                                   else f"ALTER SYSTEM SET {name} = {value}")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()

    await configure(reset=False)
    start = await asyncio.to_thread(os.path.getsize, log)
    try:
        yield counts
    finally:
        await configure(reset=True)
        records = _log_records(await asyncio.to_thread(_read_from, log, start))
        opened: dict[tuple[str, str], str] = {}
        for pid, vxid, db_name, kind, sql in records:
            if db_name != database or not vxid or vxid.endswith("/0"):
                continue
            statement = " ".join(sql.split())[:100]
            first = opened.get((pid, vxid))
            if first is None or (first.startswith("prepare: ") and kind != "parse"):
                if kind == "parse":
                    statement = "prepare: " + statement
                elif statement.upper().startswith(("BEGIN", "START", "COMMIT")):
                    continue
                opened[pid, vxid] = statement
        counts.update(opened.values())


def _read_from(path: Path, offset: int) -> str:
    with path.open(encoding="utf-8", errors="replace") as text:
        text.seek(offset)
        return text.read()


def _log_records(text: str) -> list[tuple[str, str, str, str, str]]:
    """(pid, vxid, database, parse|bind|execute|"", statement) of each logged statement."""
    records: list[tuple[str, str, str, str, str]] = []
    for line in text.splitlines():
        if line.startswith("\t") and records and records[-1][0]:
            pid, vxid, db_name, kind, sql = records[-1]
            if not line.strip().startswith("--"):  # the comments of the named queries
                records[-1] = (pid, vxid, db_name, kind, f"{sql} {line.strip()}".strip())
            continue
        match = _LOGGED.match(line)
        pid, vxid, db_name, kind, sql = match.groups(default="") if match else ("",) * 5
        records.append((pid, vxid, db_name, kind, "" if sql.startswith("--") else sql))
    return [record for record in records if record[0]]
