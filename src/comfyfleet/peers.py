"""What the other comfyfleet processes on the same database change, heard as they commit it.

Several `serve` replicas may share one database (DESIGN §7); PostgreSQL's LISTEN/NOTIFY tells
each what the others did:
- the fleet: every write to the `backends` table notifies FLEET_CHANNEL (a trigger, migration
  0025), so each process takes up a backend added, drained, enabled or removed through another
  at once (`fleet` beats; Fleet follows the table);
- the backlog: so that every process's dispatcher claims a job as it is queued, not at its
  next safety pass, a job put back in the backlog (requeued, released) notifies
  QUEUED_CHANNEL (a trigger, migration 0027; once per transaction), and each process tells
  the jobs submitted to it (the beats of `queued_here`) at once, however many while one
  notification is on its way in the next one, carrying its id: a NOTIFY in each submit's
  transaction would serialise their commits. The others hear both as `queued` (Fleet wakes
  its dispatcher; however many beat while it claims, it claims once more);
- the jobs: each process forwards the beats of its own JobNotices.here to JOBS_CHANNEL, at most
  one notification every FORWARD_SECONDS whatever its rate (a NOTIFY with every job's change
  would serialise the commits of every process), and hears the others' as
  JobNotices.changed_elsewhere, so that a dashboard's lists and a job's events on any replica
  follow every replica's jobs (and so does its snapshot of a deep backlog, for queue
  positions: `jobs_changed`);
- the slots: every process reads every backend's `status`, but a slot another process's prompt
  frees counts free in the database's count only once that process has written the prompt's
  end. So a process whose claims found the jobs they could take held up by slots other
  processes hold says so on SLOT_WANTED_CHANNEL (`wanted_here`; once, until it hears of a slot
  freed); the others, told, write the ends of their prompts at once (not with the job's end),
  and one that releases a slot its own claims leave free (they see nothing queued that they
  could take, or chose to leave that backend idle) tells of it on SLOT_FREED_CHANNEL
  (`freed_here`) once the write that freed it has committed: the waiting process claims then,
  not at its next safety pass. Nothing is said while nobody waits (a fleet with room, or whose
  processes fill the slots they free themselves): a NOTIFY with every job's end would be a
  transaction per job, and one in the end's own transaction would serialise every process's
  commits. A process hearing its own wait told back (`told`) claims once more: a slot freed
  before the others heard of the wait is in the database's count by then.
Each (re)connect of the listening connection counts as a change of all of them (a slot freed
too, but not a wait: a process waiting meanwhile finds the slots freed here at its safety
pass): what was said while nobody listened is not said again.

Nothing is told while no other process is alive to hear it (the lease table shows none, and
none has been heard from since: ProcessLease.alone), as when one `serve` runs alone: a NOTIFY
per burst of submits is a transaction of its own. A process that joins is told nothing of the
jobs queued before it: it reads the backlog in its first dispatch pass (its listener's connect
wakes it), and once listening it says so (a `queued` notification), so that the others tell it
from then on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet.db import driver_connection, listening
from comfyfleet.jobs.lease import ProcessLease
from comfyfleet.jobs.notices import JobNotices
from comfyfleet.pulse import Pulse

log = logging.getLogger(__name__)

FLEET_CHANNEL = "comfyfleet_fleet"
JOBS_CHANNEL = "comfyfleet_jobs"
QUEUED_CHANNEL = "comfyfleet_queued"
SLOT_WANTED_CHANNEL = "comfyfleet_slot_wanted"
SLOT_FREED_CHANNEL = "comfyfleet_slot_freed"
# A burst of job changes here is told to the other processes once per this long; the
# dashboards they serve send at most one event every 2 s anyway (api/dashboard.py).
FORWARD_SECONDS = 1.0
RETRY_SECONDS = 2.0


@dataclass(frozen=True)
class SlotTalk:
    """What the processes say of backend slots held by one and wanted by another."""

    # Beat when another process said it waits for a slot another holds.
    wanted: Pulse = field(default_factory=Pulse)
    # Beat when another process said it freed a slot (after one said it waited), or nobody
    # listened for a while.
    freed: Pulse = field(default_factory=Pulse)
    # Beaten by this process when it waits for a slot another holds: the others are told.
    wanted_here: Pulse = field(default_factory=Pulse)
    # Beat when this process's `wanted_here` was heard back: the others have heard it.
    told: Pulse = field(default_factory=Pulse)
    # Beaten by this process when it freed a slot one waits for: the others are told.
    freed_here: Pulse = field(default_factory=Pulse)


class PeerChanges:
    def __init__(self, engine: AsyncEngine, notices: JobNotices, lease: ProcessLease,
                 jobs_changed: Callable[[], None] = lambda: None) -> None:
        """`lease`: this process's, whose id its own notifications carry, so that it does not
        take them for another's, and which knows whether any other is alive. `jobs_changed`
        hears what `notices.changed_elsewhere` does (the repository's snapshot of the
        backlog follows it)."""
        self._engine = engine
        self._notices = notices
        self._jobs_changed = jobs_changed
        self._lease = lease
        self._process = str(lease.id)
        # Beats when another process (or this one) changed the fleet's table.
        self.fleet = Pulse()
        # Beats when another process queued a job (or any put one back).
        self.queued = Pulse()
        # Beaten by this process when it queued a job: the others are told.
        self.queued_here = Pulse()
        self.slots = SlotTalk()
        self._tasks: list[asyncio.Task[None]] = []

    def _changed_elsewhere(self) -> None:
        self._notices.changed_elsewhere()
        self._jobs_changed()

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen()),
            asyncio.create_task(self._forward(self._notices.here, JOBS_CHANNEL,
                                              FORWARD_SECONDS)),
            asyncio.create_task(self._forward(self.queued_here, QUEUED_CHANNEL, 0.0)),
            asyncio.create_task(self._forward(self.slots.wanted_here, SLOT_WANTED_CHANNEL, 0.0)),
            asyncio.create_task(self._forward(self.slots.freed_here, SLOT_FREED_CHANNEL, 0.0)),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _forward(self, here: Pulse, channel: str, pause: float) -> None:
        """Tell the other processes of the beats of `here` on `channel`, at most once every
        `pause` seconds, and never more than one notification at a time."""
        changed = here.next()
        while True:
            await changed.wait()
            changed = here.next()  # what changes from now on is told next time
            if self._lease.alone:  # nobody to tell
                # Nor woken sooner than if there were: the jobs' channel is woken by every
                # job's every change, which one serve alone would hear a few times a job.
                if pause:
                    await asyncio.sleep(pause)
                continue
            try:
                async with driver_connection(self._engine) as connection:
                    await connection.execute("SELECT pg_notify($1, $2)", channel,
                                             self._process)
            except Exception as exc:  # the database is away: its listeners re-read on return
                log.warning("telling other processes on %s: %s", channel, exc)
            await asyncio.sleep(pause)

    async def _listen(self) -> None:
        while True:
            try:
                await self._listen_once()
            except Exception as exc:
                log.warning("listening for other processes' changes: %s; reconnecting", exc)
            await asyncio.sleep(RETRY_SECONDS)

    async def _listen_once(self) -> None:
        """Listen on one connection until it is lost."""
        def notified(_connection: Any, _pid: int, channel: str, payload: str) -> None:
            if channel == FLEET_CHANNEL:
                self.fleet.beat()
                return
            if payload == self._process:  # its own: this process knows
                if channel == SLOT_WANTED_CHANNEL:
                    self.slots.told.beat()
                return
            if payload.isdigit():  # another process's id (a trigger's notification has none)
                self._lease.heard_from(int(payload))
            if channel == QUEUED_CHANNEL:
                self.queued.beat()
            elif channel == SLOT_WANTED_CHANNEL:
                self.slots.wanted.beat()
            elif channel == SLOT_FREED_CHANNEL:
                self.slots.freed.beat()
            else:
                self._changed_elsewhere()

        async with listening(self._engine, [FLEET_CHANNEL, JOBS_CHANNEL, QUEUED_CHANNEL,
                                            SLOT_WANTED_CHANNEL, SLOT_FREED_CHANNEL],
                             notified) as lost:
            self.fleet.beat()  # changes made while nobody listened
            self.queued.beat()
            # A slot freed unheard: claim; and a wait told before may have gone unheard: it is
            # told again if still due. Another's wait told meanwhile is not (nothing says so):
            # its safety pass finds the slots freed here.
            self.slots.freed.beat()
            self._changed_elsewhere()
            self.queued_here.beat()  # this process listens: the others are to tell it now
            await lost.wait()
