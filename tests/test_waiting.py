"""Why a queued job waits (fleet/waiting.py): the answer GET /jobs gives for each queued job,
worked out once per change of the fleet, not once per job and backend."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any, ClassVar

import pytest

from comfyfleet.comfy.capabilities import Capabilities
from comfyfleet.comfy.endpoints import Backend
from comfyfleet.comfy.messages import Binary, Message
from comfyfleet.execution.session import BackendSession
from comfyfleet.fleet.waiting import WaitingReasons
from comfyfleet.pulse import Pulse

BACKENDS = 30
INVERT = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
          "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
          "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0]}}}
SCALE = {"1": {"class_type": "LoadImage", "inputs": {"image": "in.png"}},
         "2": {"class_type": "ImageScale", "inputs": {
             "image": ["1", 0], "upscale_method": "lanczos", "width": 64, "height": 64,
             "crop": "disabled"}}}


@dataclass(frozen=True, eq=True)
class CountedCapabilities(Capabilities):
    """Capabilities that count the prompts checked against them, by every instance."""

    checked: ClassVar[int] = 0

    def _lacking(self, prompt: dict[str, Any]) -> Iterator[str]:  # can_run's and missing's
        CountedCapabilities.checked += 1
        return super()._lacking(prompt)


class Deaf:
    """Hears nothing: these sessions never connect."""

    async def backend_connected(self, session: BackendSession) -> None: ...

    async def backend_message(self, session: BackendSession, message: Message | Binary
                              ) -> None: ...

    async def backend_disconnected(self, session: BackendSession) -> None: ...


def object_info(without: str | None = None) -> dict[str, Any]:
    text = resources.files("comfyfleet.sim").joinpath(
        "object_info_modelfree_subset.json").read_text()
    info: dict[str, Any] = json.loads(text)
    if without is not None:
        del info[without]
    return info


@pytest.fixture
async def sessions() -> AsyncIterator[list[BackendSession]]:
    """BACKENDS connected sessions, each with its own (equal) capabilities, all draining."""
    found = [BackendSession(Backend(f"gpu-{n}", f"http://127.0.0.1:{9000 + n}"), Deaf())
             for n in range(BACKENDS)]
    for session in found:
        session.capabilities = CountedCapabilities.from_object_info(object_info())
        session.connected = True
        session.draining = True
    yield found
    for session in found:
        await session.close()


async def test_a_drained_fleet_is_checked_once_per_change_not_per_job_and_backend(
    sessions: list[BackendSession],
) -> None:
    changes = Pulse()
    reasons = WaitingReasons(sessions, changes)
    CountedCapabilities.checked = 0
    answers = {reasons.why(INVERT) for _ in range(50)}
    assert answers == {"every backend that can run it is out of service: " + "; ".join(
        f"gpu-{n} is draining" for n in range(BACKENDS))}
    # One check a job against the one kind of backend: 30 backends with equal capabilities.
    assert CountedCapabilities.checked == 50

    sessions[7].draining = False
    changes.beat()
    assert reasons.why(INVERT) is None


async def test_only_the_backends_able_to_run_a_job_are_named(
    sessions: list[BackendSession],
) -> None:
    changes = Pulse()
    reasons = WaitingReasons(sessions, changes)
    for session in sessions[1:]:
        session.capabilities = CountedCapabilities.from_object_info(
            object_info(without="ImageScale"))
    sessions[2].draining = False  # takes work, but cannot scale
    changes.beat()
    assert reasons.why(INVERT) is None
    assert reasons.why(SCALE) == (
        "every backend that can run it is out of service: gpu-0 is draining")

    sessions[0].capabilities = sessions[1].capabilities
    changes.beat()
    assert reasons.why(SCALE) == "no backend of the fleet can run it"
    assert reasons.why(INVERT) is None


async def test_a_backend_not_yet_connected_may_run_anything(
    sessions: list[BackendSession],
) -> None:
    changes = Pulse()
    reasons = WaitingReasons(sessions, changes)
    sessions[3].capabilities = None
    sessions[3].connected = False
    sessions[3].last_error = "connection refused"
    changes.beat()
    waiting = reasons.why({"1": {"class_type": "NoSuchNode", "inputs": {}}})
    assert waiting == ("every backend that can run it is out of service: "
                       "gpu-3 has not connected yet (connection refused)")


async def test_a_beat_that_changes_no_group_keeps_the_groups_but_words_the_reason_again(
    sessions: list[BackendSession],
) -> None:
    """Most beats of the fleet's changes (a prompt held or released, a queue's length: a few
    a job) leave every backend's capabilities and whether it takes work as they were: the
    groups stand (regrouping 16 backends took 70 us, at nearly every submit's answer at
    saturation), and what a reason says of a backend away is worded anew."""
    changes = Pulse()
    reasons = WaitingReasons(sessions, changes)
    sessions[3].connected = False
    sessions[3].last_error = "connection refused"
    changes.beat()
    assert "gpu-3 unreachable for 0 s (connection refused)" in (reasons.why(INVERT) or "")
    groups = reasons._groups
    sessions[3].last_error = "connection reset"
    changes.beat()
    assert "gpu-3 unreachable for 0 s (connection reset)" in (reasons.why(INVERT) or "")
    assert reasons._groups is groups
    sessions[5].draining = False
    changes.beat()
    assert reasons.why(INVERT) is None
    assert reasons._groups is not groups
