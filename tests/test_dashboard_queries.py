"""The dashboard's reads stay bounded however many jobs and deliveries there are: each statement
they run walks an index to the rows it shows, never the whole jobs or deliveries table.

Real statements, seen as the service sends them to PostgreSQL (SQLAlchemy's cursor events),
explained by PostgreSQL itself on a database holding a few thousand jobs after ANALYZE, enough
for the planner to prefer a full scan and a sort wherever no index serves, and with the generic
plan a pooled connection settles on for a statement it has prepared (so a partial index serves
only statements whose own text implies its condition).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg
from sqlalchemy import event
from sqlalchemy.engine import Engine

from comfyfleet.api.jobs import encode_cursor
from comfyfleet.api_keys import key_hash
from comfyfleet.app import serving
from comfyfleet.settings import Settings

KEY_A, KEY_B, ADMIN = "tenant-a-40b1c9", "tenant-b-77e2d0", "admin-c3f95a"
JOBS = 6000
SCANNED = ("jobs", "webhook_deliveries")

# Copies of the one job POST /jobs wrote: four workflows, two tenants, most finished over
# the last day, one in ten with a webhook delivery, one delivery in fifty dead.
COPY_JOBS = """
INSERT INTO jobs (id, workflow, params, prompt, status, progress, priority, attempts,
    created_at, finished_at, outputs, api_key_hash, source)
SELECT gen_random_uuid(),
    (ARRAY['invert', 'blur_image', 'sd15_txt2img', 'simulated_work'])[1 + n % 4],
    params, prompt, CASE WHEN n % 20 = 0 THEN 'queued' ELSE 'succeeded' END, 0, 0, 0,
    now() - n * interval '10 s', CASE WHEN n % 20 <> 0 THEN now() - n * interval '10 s' END,
    '[]', CASE WHEN n % 2 = 0 THEN $2 ELSE $3 END, source
FROM jobs, generate_series(1, $1) AS n
"""
DELIVERIES = """
INSERT INTO webhook_deliveries (id, job_id, event_type, message_id, url, host, payload, status,
    attempts, pending_since, created_at)
SELECT gen_random_uuid(), id, 'job.succeeded', 'msg_' || md5(id::text), 'https://hooks.invalid/',
    'hooks.invalid:443', '{}', CASE WHEN k % 50 = 0 THEN 'dead' ELSE 'delivered' END, 1,
    created_at, created_at
FROM (SELECT id, created_at, row_number() OVER (ORDER BY created_at) AS k FROM jobs
      WHERE finished_at IS NOT NULL) AS finished WHERE k % 10 = 0
"""


@contextmanager
def statements() -> Iterator[list[tuple[str, Any]]]:
    """Every statement this process sends meanwhile to answer an HTTP request (in uvicorn's
    task for it, not in the service's own background tasks), with its parameters."""
    seen: list[tuple[str, Any]] = []

    def note(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        task = asyncio.current_task()
        if task is not None and getattr(task.get_coro(), "__qualname__", "").endswith(
                ".run_asgi"):
            seen.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", note)


def scans(plan: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(node type, relation) of every node of an EXPLAIN (FORMAT JSON) plan."""
    yield plan["Node Type"], plan.get("Relation Name", "")
    for child in plan.get("Plans", []):
        yield from scans(child)


def literal(value: Any) -> str:
    """A statement's parameter as SQL (EXECUTE takes no bound parameters)."""
    if isinstance(value, int | float):
        return str(value)
    text = value.isoformat() if isinstance(value, datetime) else str(value)
    return "'" + text.replace("'", "''") + "'"


async def full_scans(db: asyncpg.Connection, seen: list[tuple[str, Any]]) -> list[str]:
    """The statements in `seen` that read all of the jobs or deliveries table, planned as
    PostgreSQL plans a prepared statement after its first few runs: once for any values."""
    await db.execute("SET plan_cache_mode = force_generic_plan")
    found = []
    for statement, parameters in seen:
        if not statement.lstrip().upper().startswith("SELECT") or not any(
                table in statement for table in SCANNED):
            continue
        await db.execute(f"PREPARE read AS {statement}")
        try:
            values = ", ".join(map(literal, parameters))
            explained = await db.fetchval(
                f"EXPLAIN (FORMAT JSON) EXECUTE read({values})" if values else
                "EXPLAIN (FORMAT JSON) EXECUTE read")
        finally:
            await db.execute("DEALLOCATE read")
        plan = json.loads(explained)[0]["Plan"]
        if any(kind == "Seq Scan" and table in SCANNED for kind, table in scans(plan)):
            found.append(statement)
    return found


async def seed(db: asyncpg.Connection) -> None:
    await db.execute(COPY_JOBS, JOBS, key_hash(KEY_A), key_hash(KEY_B))
    await db.execute(DELIVERIES)
    await db.execute("ANALYZE")


async def test_every_dashboard_read_walks_an_index(settings: Settings) -> None:
    settings.api_keys = [KEY_A, KEY_B]
    settings.admin_api_keys = [ADMIN]
    async with serving(settings) as base, aiohttp.ClientSession() as http:  # no backends
        prefix = base + settings.route_prefix
        async with http.post(f"{prefix}/jobs", json={"workflow": "invert", "params": {}},
                             headers={"Authorization": f"Bearer {KEY_A}"}) as response:
            assert response.status == 202, await response.text()
        db = await asyncpg.connect(
            (settings.database_url or "").replace("postgresql+asyncpg://", "postgresql://"))
        try:
            await seed(db)
            middle = await db.fetchrow("SELECT created_at, id FROM jobs ORDER BY created_at "
                                       "DESC, id DESC OFFSET $1 LIMIT 1", JOBS // 2)
            reads = {
                ADMIN: ["/jobs?limit=50", "/jobs?limit=50&workflow=sd15_txt2img",
                        "/jobs?limit=50&status=queued",
                        f"/jobs?limit=50&cursor={encode_cursor(*middle)}",
                        "/jobs?limit=50&created_after=2026-01-01T00:00:00Z"
                        "&created_before=2099-01-01T00:00:00Z",
                        "/jobs?limit=50&tenant=API_KEYS%232",
                        "/dashboard/backlog", "/dashboard/activity", "/dashboard/deliveries",
                        "/tenants"],
                KEY_A: ["/jobs?limit=50", "/dashboard/backlog", "/dashboard/activity",
                        "/dashboard/deliveries"],
            }
            for key, paths in reads.items():
                for path in paths:
                    with statements() as seen:
                        async with http.get(prefix + path, headers={
                                "Authorization": f"Bearer {key}"}) as response:
                            assert response.status == 200, (path, await response.text())
                    assert seen, path
                    assert await full_scans(db, seen) == [], (key, path)
        finally:
            await db.close()
