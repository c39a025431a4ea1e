"""The fleet as every process shares it: backends and their drain state, in PostgreSQL.

COMFYUI_ENDPOINTS seeds it at each start (a listed backend comes back if it was removed);
`POST`/`PATCH`/`DELETE /backends` change it; each process follows it as soon as a change
commits (a trigger notifies every process, see peers.py), so a backend drained through one
process is drained in all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Column, String
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import Field, SQLModel

from comfyfleet import sql
from comfyfleet.comfy.endpoints import Backend
from comfyfleet.db import check_storable, driver_connection
from comfyfleet.jobs.repository import lock_backend

_SQL = sql.queries("backends")


class BackendRow(SQLModel, table=True):
    """The table's columns, as the migrations made them: what `BackendRegistry.add` checks a
    name and a URL against (their lengths) before they go into the statement."""

    __tablename__ = "backends"

    name: str = Field(primary_key=True, max_length=100)
    url: str = Field(sa_column=Column(String(500), nullable=False))
    draining: bool = False
    # The COMFYUI_DISCOVERY that added it (e.g. "dns:comfyui:8188"), which alone may remove
    # it; null for backends configured or added through the API.
    discovered_by: str | None = Field(default=None, max_length=300)
    # Its address left DNS: discovery drained it (or found it drained), and only discovery
    # enables it again should the address return. A drain by hand or by a pod's preStop hook
    # while the address is still listed leaves this false, so discovery never undoes it.
    vanished: bool = False


class BackendExists(Exception):
    """A backend of that name, or at that URL, is in the fleet already; `field` says which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class BackendBusy(Exception):
    """The backend still has work or takes new work: drain it first."""


@dataclass(frozen=True)
class Registered:
    backend: Backend
    draining: bool
    discovered_by: str | None = None
    vanished: bool = False


class BackendRegistry:
    """The fleet's table, read and changed through fixed SQL (`sql/backends.sql`) on the
    engine's asyncpg connections (`driver_connection`). A task cancelled in one of its
    statements (DNS discovery's pass, at every shutdown) ends at once: asyncpg gives way and
    cancels the statement on the server, and the connection is closed, not handed on. Over
    SQLAlchemy's asyncpg adapter such a task was once parked for good in `bind_execute`,
    holding a shutdown (app.py CANCEL_WAIT_SECONDS)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def seed(self, configured: Sequence[Backend]) -> None:
        """Make sure the configured backends are there, with their configured URLs; their
        drain state is kept. BackendExists when another name has one of those URLs (two
        names for one server would double its slots)."""
        if not configured:
            return
        names = {b.url: b.name for b in configured}
        async with driver_connection(self._engine) as connection, connection.transaction():
            await connection.execute(_SQL["lock_fleet"])
            for name, url in await connection.fetch(
                    _SQL["seed"], [b.name for b in configured], [b.url for b in configured]):
                raise BackendExists("url", (
                    f"COMFYUI_ENDPOINTS names {url} {names[url]!r}, but the fleet has it "
                    f"as {name!r} (configured so by another process, or added through the "
                    f"API): give one server one name, or remove {name!r} from the fleet"))

    async def all(self) -> list[Registered]:
        async with driver_connection(self._engine) as connection:
            rows = await connection.fetch(_SQL["all"])
        return [Registered(Backend(name, url), draining, discovered_by, vanished)
                for name, url, draining, discovered_by, vanished in rows]

    async def add(self, backend: Backend, discovered_by: str | None = None) -> None:
        """BackendExists when a backend of that name, or at that URL, is there already;
        NotStorable when its URL or name cannot be stored."""
        check_storable({"url": backend.url, "name": backend.name},
                       BackendRow.__table__)  # type: ignore[attr-defined]
        async with driver_connection(self._engine) as connection, connection.transaction():
            await connection.execute(_SQL["lock_fleet"])
            for name, url in await connection.fetch(
                    _SQL["add"], backend.name, backend.url, discovered_by):
                if name == backend.name:
                    raise BackendExists("name", f"a backend named {name!r} exists already")
                raise BackendExists("url", f"{url} is in the fleet already, as {name!r}")

    async def set_draining(self, name: str, draining: bool, *, vanished: bool = False) -> None:
        """`vanished`: drained because its address left DNS (see BackendRow.vanished)."""
        async with driver_connection(self._engine) as connection:
            await connection.execute(_SQL["set_draining"], name, draining, vanished)

    async def remove(self, name: str) -> None:
        """Take a drained backend out of the fleet once no job is on it, whichever process
        sent the job; BackendBusy otherwise. Claims for the backend wait for this (they take
        its lock) and find it gone: nothing is sent to it afterwards."""
        async with driver_connection(self._engine) as connection, connection.transaction():
            await lock_backend(connection, name)
            on_it, removed = await connection.fetchrow(_SQL["remove"], name)
        if not removed:
            raise BackendBusy(f"backend {name} must be drained and idle before removal "
                              f"({on_it} jobs on it, in all comfyfleet processes)")
