"""CPU per job of the tracker's part of a zero-duration job, from its dispatch to its end of
executing, as `bench.throughput`'s jobs go: no I/O.

A job of the throughput bench's `invert` prompt (the loader and the invert served from the
backend's cache, the save run) is followed as the dispatcher starts it (`isolate_outputs`,
`ExecutionTracker.track` with the queued prompt's keys, `submitted` once its POST would be
answered) and its frames as the simulator words them (`status`, `execution_start`,
`execution_cached`, `executing` of the save, `executed` with its image, `progress_state`,
`execution_success`, `status`, `executing` with no node) go through
`BackendSession._read` to the tracker, which ends its execution (deferred, as at saturation)
and hands it to a collector that stores nothing (the collection is measured elsewhere). CPU
time of this process (`time.process_time`) per job, `--jobs` a round, `--inflight` jobs
followed at once on 16 backends.

With `--other SRC`, the same in a process whose PYTHONPATH puts SRC first (a `git archive` of
main's `src`, say), in turns with this checkout's.

Run from the repository root:
    .venv/bin/python -m bench.tracker_cpu [--other /tmp/main/src] [--turns 3] [--rounds 7]
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import time
import uuid
from typing import Any

import uvloop

from bench.harness import measured_runs, paired_parser, print_turns, workflow_job
from comfyfleet.comfy.capabilities import Capabilities
from comfyfleet.comfy.endpoints import Backend
from comfyfleet.comfy.prompts import isolate_outputs
from comfyfleet.execution.costs import NodeCosts
from comfyfleet.execution.run_times import RunTimes
from comfyfleet.execution.session import BackendSession
from comfyfleet.execution.signals import DispatchSignals
from comfyfleet.execution.tracker import ExecutionTracker
from comfyfleet.execution.warm import PromptKeys
from comfyfleet.fleet.fleet import Fleet
from comfyfleet.jobs.models import Job, JobStatus, constructed, utcnow
from comfyfleet.jobs.notices import JobNotices
from comfyfleet.peers import SlotTalk
from comfyfleet.sim.frames import status_frame, text_frame
from comfyfleet.sim.nodes import load_specs

BACKENDS = 16
TEXT = 0x1  # RFC 6455's opcode of a text frame, as comfy/websocket.py hands one over


def job_frames(prompt_id: str) -> list[bytes]:
    """A job's text frames, as the simulator words them for the invert prompt."""
    def frame(kind: str, **data: Any) -> bytes:
        return text_frame(kind, {**data, "prompt_id": prompt_id}).encode()
    output = {"images": [{"filename": "invert_00001_.png", "subfolder": "", "type": "output"}]}
    state = {"3": {"value": 1, "max": 1, "state": "finished", "node_id": "3",
                   "prompt_id": prompt_id, "display_node_id": "3", "parent_node_id": None,
                   "real_node_id": "3"}}
    return [status_frame(1).encode(), frame("execution_start", timestamp=1765100000000),
            frame("execution_cached", nodes=["1", "2"], timestamp=1765100000000),
            frame("executing", node="3", display_node="3"),
            frame("executed", node="3", display_node="3", output=output),
            frame("progress_state", nodes=state),
            frame("execution_success", timestamp=1765100000001),
            status_frame(0).encode(), frame("executing", node=None)]


class Socket:
    """Hands a job's frames over as comfy/websocket.py's `receive` does, then ends."""

    def __init__(self, frames: list[bytes]) -> None:
        self._frames = iter(frames)

    async def receive(self) -> tuple[int, bytes] | None:
        frame = next(self._frames, None)
        return None if frame is None else (TEXT, frame)


class Listener(Fleet):
    """Tells the tracker as the fleet does (its `backend_message`), made without the rest of a
    fleet: only its tracker."""

    def __init__(self) -> None:  # not the fleet's: nothing but the tracker is asked for
        pass


class Collector:
    """Stores nothing: the end of executing it is handed is settled at once, as the job's end
    would."""

    def store_early(self, *_: Any) -> bool:
        return False

    async def collect(self, client: Any, job: Job, *, unrecorded: Any = None,
                      **_: Any) -> None:
        if unrecorded is not None:
            unrecorded.drop()


async def measure(jobs: int, inflight: int, rounds: int) -> dict[str, Any]:
    listener = Listener()
    capabilities = Capabilities.shared(load_specs())
    sessions = []
    for index in range(BACKENDS):
        session = BackendSession(Backend(f"gpu{index}", f"http://127.0.0.1:{9000 + index}"),
                                 listener)
        session.capabilities, session.connected = capabilities, True
        sessions.append(session)
    tracker = listener.tracker = ExecutionTracker(
        None, Collector(), max_attempts=3, endings=None,  # type: ignore[arg-type]
        signals=DispatchSignals(SlotTalk()), quiet_seconds=30.0, grace_seconds=30.0,
        events=JobNotices(), run_times=RunTimes(), node_costs=NodeCosts(),
        lease=None, extra_data=None, queued=None)  # type: ignore[arg-type]
    _, prompt = workflow_job()
    keys = PromptKeys(prompt, capabilities.keyed_by_id)

    model = Job(id=uuid.uuid4(), workflow="invert", prompt=prompt, status=JobStatus.DISPATCHED,
                attempts=1, dispatched_at=utcnow()).__dict__
    fields = {name: value for name, value in model.items() if name != "_sa_instance_state"}

    def made(index: int) -> tuple[Job, list[bytes]]:
        """A job as a claim makes it (`constructed`, not validated), and its frames."""
        prompt_id = str(uuid.uuid4())
        return constructed(Job, {**fields, "id": uuid.uuid4(), "prompt_id": prompt_id,
                                 "backend": f"gpu{index % BACKENDS}"}), job_frames(prompt_id)

    async def job(index: int, job: Job, frames: list[bytes]) -> None:
        session = sessions[index % BACKENDS]
        prompt_id = job.prompt_id
        assert prompt_id is not None
        sent = isolate_outputs(job.prompt, prompt_id)
        tracker.track(session, job, submitting=True, keys=keys, sent=sent)
        await asyncio.sleep(0)  # its POST /prompt
        tracker.submitted(prompt_id)
        await session._read(Socket(frames))  # type: ignore[arg-type]

    async def batch(first: int, made: list[tuple[Job, list[bytes]]]) -> None:
        await asyncio.gather(*(job(first + index, *job_made)
                               for index, job_made in enumerate(made)))
        await asyncio.sleep(0)  # the collections end
        await asyncio.sleep(0)

    gc.collect()  # and the passes as `comfyfleet serve` sets them (cli/main.py)
    gc.freeze()
    gc.set_threshold(7000, 10, 10)
    per_job = []
    for round_ in range(rounds + 1):  # the first warms up
        jobs_made = [made(index) for index in range(jobs)]
        began = time.process_time()
        for first in range(0, jobs, inflight):
            await batch(first, jobs_made[first:first + inflight])
        if round_:
            per_job.append((time.process_time() - began) / jobs * 1e6)
    assert not tracker._runs and not tracker._collecting and not tracker._ending
    for session in sessions:
        await session.close()
    return {"us a job": per_job}


def main() -> None:
    parser = paired_parser(__doc__)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    def here() -> dict[str, Any]:
        return uvloop.run(measure(args.jobs, args.inflight, args.rounds))
    if args.child:
        print(json.dumps(here()))
        return
    print(f"load average {os.getloadavg()[0]:.2f}")
    runs = measured_runs("bench.tracker_cpu", args.other, args.turns,
                         [f"--jobs={args.jobs}", f"--inflight={args.inflight}",
                          f"--rounds={args.rounds}"], here)
    print_turns(runs, "us a job", "us a job")


if __name__ == "__main__":
    main()
