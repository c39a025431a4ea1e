"""What execution tells the dispatcher, as named signals instead of callbacks.

The dispatcher sleeps until `changed` is set. A queued job or a freed slot makes a claim worth
its database round trip (`claim_due`), a freed slot only while jobs may be queued (`queued`:
one may have joined the backlog); a running prompt whose length became clearer only calls
for a rebalance. A slot is freed for this process's claims as soon as its prompt is known to
be off the backend (its end read, or it was withdrawn, given up), and released once the
database counts it off too: `released` beats then, which a drain waiting for its backend to
go idle listens to (the claims count a freed slot out already: nothing new to claim).
Between processes (peers.py carries it, `SlotTalk`): a slot another process frees counts free
in the database only once that process has written its prompt's end. The dispatcher's claim may
find the jobs it could take held up by slots other processes hold (`short_of_slots`): it says
so, once until it hears of a slot freed. Told that another waits (`wanted_elsewhere`), the
tracker writes the ends of prompts at once, and a slot released here (`slot_released`) that
this process's claims leave free is told of (`tell_freed`), which wakes the claims of the
others (`freed_elsewhere`).
The fleet makes one and hands it to the tracker, which sends, and to the dispatcher, which
waits: both sit above this module, neither knows the other.
"""

from __future__ import annotations

import asyncio

from comfyfleet.peers import SlotTalk
from comfyfleet.pulse import Pulse


class DispatchSignals:
    def __init__(self, slots: SlotTalk) -> None:
        self.changed = asyncio.Event()
        self.claim_due = True  # else the wake-up is for a rebalance only
        # A job may have joined the backlog since the last pass began (else a freed slot
        # finds nothing a claim that saw the backlog empty did not).
        self.queued = True
        self.released = Pulse()
        self.wanted = Pulse()  # beats when another process says it waits for a slot
        self.slots = slots  # what the processes say of slots (peers.py)
        # Another process said it waits for a slot, and none said since that it freed one.
        self.peer_waiting = False
        # A slot was released here while it did, not told of yet.
        self._released_for_peer = False
        self._short_told = False  # this process said it waits, and heard of no slot freed since

    def job_queued(self) -> None:
        """A job joined the backlog, or a backend began taking work: claim what can start."""
        self.queued = True
        self._claim()

    def slot_freed(self) -> None:
        """A prompt is off its backend (its end read; or withdrawn, given up): its slot can
        take a job. The database may count it there until `slot_released`; this process's
        claims count out the prompts whose end was read (the tracker's `ended`)."""
        self._claim()

    def slot_released(self) -> None:
        """A freed slot is off its backend in the database's count too: a drain waiting for
        its backend to go idle may hear it; nothing new to claim, but another process waiting
        for a slot is told of it unless the dispatcher's claims fill it."""
        self.released.beat()
        if self.peer_waiting:
            self._released_for_peer = True
            self.changed.set()

    def short_of_slots(self) -> None:
        """The dispatcher's claims leave jobs they could take queued, for slots that other
        processes' prompts hold in the database's count: say so, once until a slot is said to
        be freed."""
        if not self._short_told:
            self._short_told = True
            self.slots.wanted_here.beat()

    def take_released_for_peer(self) -> bool:
        """Whether a slot was released here since the last call while another process
        waited for one."""
        released, self._released_for_peer = self._released_for_peer, False
        return released

    def tell_freed(self) -> None:
        """A slot released here is left free by this process's claims: tell the process that
        waits for one."""
        self.peer_waiting = False
        self.slots.freed_here.beat()

    def wanted_elsewhere(self) -> None:
        """Another process waits for a slot: the ends of prompts are to be written at once
        (`wanted` beats), and the slots they free told of."""
        self.peer_waiting = True
        self.wanted.beat()

    def freed_elsewhere(self) -> None:
        """Another process freed a slot (after one was wanted): claim now; a process that
        still waits says so again."""
        self.peer_waiting = self._released_for_peer = False
        self._short_told = False
        self._claim()

    def short_heard(self) -> None:
        """The others have heard that this process waits: a slot freed before they did is in
        the database's count by now (they tell of those freed after); claim once more."""
        self._claim()

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
