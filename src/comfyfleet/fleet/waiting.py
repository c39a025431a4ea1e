"""Why a queued job cannot start soon, worked out once per change of the fleet, not per job.

Every queued job an answer shows says why it waits (GET /jobs lists fifty), and with the whole
fleet drained that meant checking each job's prompt against each backend's capabilities: 38 ms
of CPU for a page of jobs with 200 backends (bench/dashboard.py). Backends nearly always
report the same nodes, so at each change of the fleet they are grouped by what they can run
and by whether they take work, and a prompt is checked once per group; the reason, which
names every backend able to run the job, is worded once per set of groups able to run it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from comfyfleet.comfy.capabilities import Capabilities
from comfyfleet.execution.session import BackendSession
from comfyfleet.pulse import Pulse

# A reason names how long a backend has been unreachable: worded again after this long.
REWORD_SECONDS = 1.0


@dataclass(frozen=True)
class _Group:
    """Backends that can run the same prompts (None: not known yet, so any) and that all
    take work, or all do not."""

    capabilities: Capabilities | None
    accepting: bool


class WaitingReasons:
    def __init__(self, sessions: Sequence[BackendSession], changes: Pulse) -> None:
        """`sessions`: the fleet's own list (backends come and go); `changes` beats when any
        of them connects, disconnects, is drained or enabled."""
        self._sessions = sessions
        self._changes = changes
        self._as_of: asyncio.Event | None = None
        self._groups: list[_Group] = []
        self._members: list[tuple[BackendSession, int]] = []  # each backend, its group
        # id -> (that Capabilities, the equal one standing for it): a backend's capabilities
        # are a new object at every connect, equal to many others'.
        self._canonical: dict[int, tuple[Capabilities, Capabilities]] = {}
        self._worded: dict[tuple[int, ...], tuple[str, float]] = {}
        # What the groups were made of: each backend, its capabilities, whether it took work.
        self._made_of: list[tuple[BackendSession, Capabilities | None, bool]] = []

    def why(self, prompt: dict[str, Any]) -> str | None:
        """Why a queued job with this prompt cannot start soon: every backend that could run
        it is out of service. None while one of them takes work."""
        groups = self._current()
        runs: dict[int, bool] = {}  # by id of the capabilities, checked once each
        able: list[int] = []
        for index, group in enumerate(groups):
            caps = group.capabilities
            if caps is not None and id(caps) not in runs:
                runs[id(caps)] = caps.can_run(prompt)
            if caps is None or runs[id(caps)]:
                if group.accepting:
                    return None
                able.append(index)
        if not able:
            return "no backend of the fleet can run it"
        key = tuple(able)
        now = time.monotonic()
        worded = self._worded.get(key)
        if worded is None or worded[1] <= now:
            worded = self._worded[key] = (self._word(set(able)), now + REWORD_SECONDS)
        return worded[0]

    def _word(self, able: set[int]) -> str:
        return "every backend that can run it is out of service: " + "; ".join(
            f"{session.name} {out_of_service(session)}"
            for session, group in self._members if group in able)

    def _current(self) -> list[_Group]:
        """The groups as of the fleet's latest change."""
        as_of = self._changes.next()
        if as_of is self._as_of:
            return self._groups
        self._as_of = as_of
        self._worded.clear()  # a backend away may be worded otherwise now (its last error)
        # Most beats change no group (a prompt held or released, a queue's length: a few a
        # job): at saturation nearly every submit's answer came after one, and regrouping
        # took as long as the rest of the reason.
        made_of = [(session, session.capabilities, session.accepts_work)
                   for session in self._sessions]
        if made_of == self._made_of:
            return self._groups
        canonical: dict[int, tuple[Capabilities, Capabilities]] = {}
        standing: list[Capabilities] = []  # one of each kind, this time
        index_of: dict[tuple[int | None, bool], int] = {}
        groups: list[_Group] = []
        members: list[tuple[BackendSession, int]] = []
        for session in self._sessions:
            caps = session.capabilities
            if caps is not None:
                caps = self._standing_for(caps, canonical, standing)
            group = _Group(caps, session.accepts_work)
            key = (None if caps is None else id(caps), group.accepting)
            if key not in index_of:
                index_of[key] = len(groups)
                groups.append(group)
            members.append((session, index_of[key]))
        self._canonical, self._members, self._groups, self._made_of = (
            canonical, members, groups, made_of)
        return groups

    def _standing_for(self, caps: Capabilities,
                      canonical: dict[int, tuple[Capabilities, Capabilities]],
                      standing: list[Capabilities]) -> Capabilities:
        """The one Capabilities standing for every equal one: as at the last change, or
        (a backend connected since) the first equal one seen now."""
        known = self._canonical.get(id(caps))
        if known is not None and known[0] is caps and any(s is known[1] for s in standing):
            stand = known[1]
        else:
            stand = next((s for s in standing if s == caps), caps)
        if stand is caps and not any(s is caps for s in standing):
            standing.append(caps)
        canonical[id(caps)] = (caps, stand)
        return stand


def out_of_service(session: BackendSession) -> str:
    if session.connected:
        return "is draining"
    if session.capabilities is None:
        state = "has not connected yet"
    else:
        state = f"unreachable for {session.unreachable_for():.0f} s"
    return state + (f" ({session.last_error})" if session.last_error else "")
