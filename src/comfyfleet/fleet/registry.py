"""The fleet as every process shares it: backends and their drain state, in PostgreSQL.

COMFYUI_ENDPOINTS seeds it at each start (a listed backend comes back if it was removed);
`POST`/`PATCH`/`DELETE /backends` change it; each process follows it as soon as a change
commits (a trigger notifies every process, see peers.py), so a backend drained through one
process is drained in all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import Column, String, delete, func, or_, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import Field, SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from comfyfleet.comfy.endpoints import Backend
from comfyfleet.db import check_storable, single_statements
from comfyfleet.jobs.models import ON_BACKEND_STATES, Job
from comfyfleet.jobs.repository import lock_backend


class BackendRow(SQLModel, table=True):
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
    def __init__(self, engine: AsyncEngine) -> None:
        self._sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)
        self._statements = single_statements(engine)

    async def seed(self, configured: Sequence[Backend]) -> None:
        """Make sure the configured backends are there, with their configured URLs; their
        drain state is kept. BackendExists when another name has one of those URLs (two
        names for one server would double its slots)."""
        if not configured:
            return
        names = {b.url: b.name for b in configured}
        statement = insert(BackendRow).values(
            [{"name": b.name, "url": b.url, "draining": False} for b in configured])
        statement = statement.on_conflict_do_update(
            index_elements=["name"], set_={"url": statement.excluded.url})
        async with self._sessions.begin() as session:
            await _lock_fleet(session)
            for name, url in (await session.exec(
                    select(col(BackendRow.name), col(BackendRow.url))
                    .where(col(BackendRow.url).in_(names)))).all():
                if names[url] != name:
                    raise BackendExists("url", (
                        f"COMFYUI_ENDPOINTS names {url} {names[url]!r}, but the fleet has it "
                        f"as {name!r} (configured so by another process, or added through the "
                        f"API): give one server one name, or remove {name!r} from the fleet"))
            await session.exec(statement)

    async def all(self) -> list[Registered]:
        # Read by every process at every change: plain rows in one round trip, no ORM objects.
        # sqlmodel's select is typed for up to four columns; these five are plain values.
        columns = select(  # type: ignore[call-overload]
            col(BackendRow.name), col(BackendRow.url), col(BackendRow.draining),
            col(BackendRow.discovered_by), col(BackendRow.vanished))
        async with self._statements() as session:
            rows = (await session.exec(columns.order_by(col(BackendRow.name)))).all()
        return [Registered(Backend(name, url), draining, discovered_by, vanished)
                for name, url, draining, discovered_by, vanished in rows]

    async def add(self, backend: Backend, discovered_by: str | None = None) -> None:
        """BackendExists when a backend of that name, or at that URL, is there already;
        NotStorable when its URL or name cannot be stored."""
        check_storable({"url": backend.url, "name": backend.name},
                       BackendRow.__table__)  # type: ignore[attr-defined]
        async with self._sessions.begin() as session:
            await _lock_fleet(session)
            for name, url in (await session.exec(
                    select(col(BackendRow.name), col(BackendRow.url))
                    .where(or_(col(BackendRow.name) == backend.name,
                               col(BackendRow.url) == backend.url)))).all():
                if name == backend.name:
                    raise BackendExists("name", f"a backend named {name!r} exists already")
                raise BackendExists("url", f"{url} is in the fleet already, as {name!r}")
            session.add(BackendRow(name=backend.name, url=backend.url,
                                   discovered_by=discovered_by))

    async def set_draining(self, name: str, draining: bool, *, vanished: bool = False) -> None:
        """`vanished`: drained because its address left DNS (see BackendRow.vanished)."""
        async with self._sessions.begin() as session:
            await session.exec(update(BackendRow).where(col(BackendRow.name) == name)
                               .values(draining=draining, vanished=draining and vanished))

    async def remove(self, name: str) -> None:
        """Take a drained backend out of the fleet once no job is on it, whichever process
        sent the job; BackendBusy otherwise. Claims for the backend wait for this (they take
        its lock) and find it gone: nothing is sent to it afterwards."""
        async with self._sessions.begin() as session:
            await lock_backend(session, name)
            draining = (await session.exec(
                select(col(BackendRow.draining)).where(col(BackendRow.name) == name))).first()
            on_it = (await session.exec(
                select(func.count()).select_from(Job)
                .where(col(Job.backend) == name,
                       col(Job.status).in_([str(s) for s in ON_BACKEND_STATES])))).one()
            if not draining or on_it:
                raise BackendBusy(f"backend {name} must be drained and idle before removal "
                                  f"({on_it} jobs on it, in all comfyfleet processes)")
            await session.exec(delete(BackendRow).where(col(BackendRow.name) == name))


async def _lock_fleet(session: AsyncSession) -> None:
    """Serialise the changes that check names and URLs (in every process) until the
    transaction ends; readers go on."""
    connection = await session.connection()
    await connection.execute(text("LOCK TABLE backends IN SHARE ROW EXCLUSIVE MODE"))
