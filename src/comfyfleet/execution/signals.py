"""What execution tells the dispatcher, as named signals instead of callbacks.

The dispatcher sleeps until `changed` is set. A queued job or a freed slot makes a claim worth
its database round trip (`claim_due`), a freed slot only while jobs may be queued (`queued`:
one may have joined the backlog); a running prompt whose length became clearer only calls
for a rebalance. A slot is freed for this process's claims as soon as its prompt is known to
be off the backend (its end read, or it was withdrawn, given up), and released once the
database counts it off too: `released` beats then, which a drain waiting for its backend to
go idle listens to (the claims count a freed slot out already: nothing new to claim).
`backlog_empty` goes the other way: the dispatcher's last claim saw nothing queued and nothing
was queued since, so no claim waits for a slot the tracker frees.
The fleet makes one and hands it to the tracker, which sends, and to the dispatcher, which
waits: both sit above this module, neither knows the other.
"""

from __future__ import annotations

import asyncio

from comfyfleet.pulse import Pulse


class DispatchSignals:
    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.claim_due = True  # else the wake-up is for a rebalance only
        # A job may have joined the backlog since the last pass began (else a freed slot
        # finds nothing a claim that saw the backlog empty did not).
        self.queued = True
        self.released = Pulse()
        self.backlog_empty = False

    def claimed(self, *, backlog_empty: bool) -> None:
        """The dispatcher's claim saw the backlog (empty or not): unless a job was queued
        since its pass began."""
        self.backlog_empty = backlog_empty and not self.queued

    def job_queued(self) -> None:
        """A job joined the backlog, or a backend began taking work: claim what can start."""
        self.queued = True
        self.backlog_empty = False
        self._claim()

    def slot_freed(self) -> None:
        """A prompt is off its backend (its end read; or withdrawn, given up): its slot can
        take a job. The database may count it there until `slot_released`; this process's
        claims count out the prompts whose end was read (the tracker's `ended`)."""
        self._claim()

    def slot_released(self) -> None:
        """A freed slot is off its backend in the database's count too: a drain waiting for
        its backend to go idle may hear it; nothing new to claim."""
        self.released.beat()

    def length_known(self) -> None:
        """A running prompt's length became clearer: it may be worth moving; no claim."""
        self.changed.set()

    def take(self) -> tuple[bool, bool]:
        """Start a pass: clear the wake-up; whether it must claim, and whether a job may have
        been queued since the last pass began."""
        self.changed.clear()
        claim, queued = self.claim_due, self.queued
        self.claim_due = self.queued = False
        return claim, queued

    def _claim(self) -> None:
        self.claim_due = True
        self.changed.set()
