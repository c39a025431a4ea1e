"""CPU per websocket frame of a running job, read by its session and handled by the tracker.

`bench.throughput` samples the service's CPU on a shared machine; this feeds the text frames a
job's run causes (as ComfyUI words them: `status`, `execution_cached`, `progress_state` and
`executing` per node, `progress` per step, `execution_success`) through
`BackendSession._read` (from a socket that hands them over at once) to
`ExecutionTracker.on_message` again and again, with `--runs` prompts in flight on
`--backends` backends, in one process, and prints the CPU (`time.process_time`) per frame
of each type. The frames that write (`execution_start`, the
prompt's end, an `executed` with files) are left out: their SQL and storage are measured
elsewhere. Run it on two commits to compare them (or, with `--other`, on another checkout's
`src` in a second process, side by side).

Run from the repository root:  .venv/bin/python -m bench.ws_frames [--other /work/main/src]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from comfyfleet.comfy.endpoints import Backend
from comfyfleet.execution.costs import NodeCosts
from comfyfleet.execution.run_times import RunTimes
from comfyfleet.execution.session import BackendSession
from comfyfleet.execution.signals import DispatchSignals
from comfyfleet.execution.tracker import ExecutionTracker
from comfyfleet.jobs.models import Job, JobStatus, utcnow
from comfyfleet.jobs.notices import JobNotices
from comfyfleet.peers import SlotTalk

PROMPT = {
    "1": {"class_type": "SimulatedLoader", "inputs": {"ckpt_name": "a.safetensors"}},
    "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
    "3": {"class_type": "SimulatedWork", "inputs": {"model": ["1", 0], "seconds": 1.0,
                                                    "steps": 20, "cond": ["2", 0]}},
    "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0]}},
}


def frames(prompt_id: str, client_id: str) -> dict[str, list[str]]:
    """A job's text frames by type, as ComfyUI words them."""
    def frame(kind: str, data: dict[str, Any]) -> str:
        return json.dumps({"type": kind, "data": data})
    return {
        "status": [frame("status", {"status": {"exec_info": {"queue_remaining": 1}},
                                    "sid": client_id})],
        "execution_cached": [frame("execution_cached", {"nodes": ["1", "2"],
                                                        "prompt_id": prompt_id,
                                                        "timestamp": 1765100000000})],
        "executing": [frame("executing", {"node": node, "display_node": node,
                                          "prompt_id": prompt_id}) for node in ("3", "4")],
        "progress": [frame("progress", {"value": step, "max": 20, "prompt_id": prompt_id,
                                        "node": "3"}) for step in range(1, 21)],
        # As each node starts and ends: the state of the prompt's nodes so far.
        "progress_state": [frame("progress_state", {"prompt_id": prompt_id, "nodes": {
            node: {"value": 1.0 if node < last or ended else 0.0, "max": 1.0,
                   "state": "finished" if node < last or ended else "running",
                   "node_id": node, "prompt_id": prompt_id, "display_node_id": node,
                   "parent_node_id": None, "real_node_id": node}
            for node in PROMPT if node <= last}})
            for last in PROMPT for ended in (False, True)],
        "execution_success": [frame("execution_success", {"prompt_id": prompt_id,
                                                          "timestamp": 1765100001000})],
    }


# RFC 6455's opcode of a text frame, as comfy/websocket.py hands one over (not imported from
# there: `--other` may run a checkout without it).
TEXT = 0x1


class Socket:
    """Hands `frames` over as the websocket client does the frames it has read: `receive`
    as comfy/websocket.py's, or iterated as aiohttp's (`--other` on a checkout before it)."""

    def __init__(self, frames: list[str]) -> None:
        self._texts = [text.encode() for text in frames]
        self._next = 0
        self._frames = [aiohttp.WSMessage(aiohttp.WSMsgType.TEXT, text, None) for text in frames]

    async def receive(self) -> tuple[int, bytes] | None:
        if self._next == len(self._texts):
            self._next = 0  # read again in the next round
            return None
        self._next += 1
        return TEXT, self._texts[self._next - 1]

    async def __aiter__(self) -> AsyncIterator[aiohttp.WSMessage]:
        for frame in self._frames:
            yield frame


class Listener:
    """Tells the tracker, as the fleet does."""

    def __init__(self) -> None:
        self.tracker: ExecutionTracker | None = None

    async def backend_connected(self, session: BackendSession) -> None: ...

    async def backend_message(self, session: BackendSession, message: Any) -> None:
        assert self.tracker is not None
        await self.tracker.on_message(session, message)

    async def backend_disconnected(self, session: BackendSession) -> None: ...


async def measure(runs: int, backends: int, rounds: int) -> dict[str, float]:
    listener = Listener()
    sessions = [BackendSession(Backend(f"gpu{i}", f"http://127.0.0.1:{9000 + i}"), listener)
                for i in range(backends)]
    tracker = listener.tracker = ExecutionTracker(
        None, None, max_attempts=3, endings=None,  # type: ignore[arg-type]
        signals=DispatchSignals(SlotTalk()), quiet_seconds=30.0, grace_seconds=30.0,
        events=JobNotices(), run_times=RunTimes(), node_costs=NodeCosts(),
        lease=None, extra_data=None, queued=None)  # type: ignore[arg-type]
    followed = []
    for index in range(runs):
        session = sessions[index % backends]
        prompt_id = str(uuid.uuid4())
        job = Job(id=uuid.uuid4(), workflow="w", prompt=PROMPT, status=JobStatus.RUNNING,
                  backend=session.name, prompt_id=prompt_id)
        tracker.track(session, job)
        run = tracker._runs[prompt_id]
        # Started, its start written a moment ago: progress waits for the writer's interval.
        run.start.at, run.started, run.last_write = utcnow(), time.monotonic(), 1e12
        followed.append((session, frames(run.prompt_id, session.client_id)))
    per_frame: dict[str, float] = {}
    for kind in ("status", "execution_cached", "progress_state", "executing", "progress",
                 "execution_success"):
        sockets = [(session, Socket(texts[kind])) for session, texts in followed]
        count = rounds * sum(len(texts[kind]) for _, texts in followed)
        began = time.process_time()
        for _ in range(rounds):
            for session, socket in sockets:
                await session._read(socket)  # type: ignore[arg-type]
        per_frame[kind] = (time.process_time() - began) / count * 1e6
    for session in sessions:
        await session.close()
    return per_frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="prompts in flight")
    parser.add_argument("--backends", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--other", help="another checkout's src/, measured in a second process")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    mine = asyncio.run(measure(args.runs, args.backends, args.rounds))
    if args.json:
        print(json.dumps(mine))
        return
    other = None
    if args.other:
        command = [sys.executable, "-m", "bench.ws_frames", "--json", "--runs", str(args.runs),
                   "--backends", str(args.backends), "--rounds", str(args.rounds)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.other, os.getcwd()])}
        other = json.loads(subprocess.run(command, env=env, check=True, capture_output=True,
                                          text=True).stdout)
    print(f"CPU per frame (us), {args.runs} prompts in flight on {args.backends} backends, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'frame':<18}{'this':>8}" + (f"{'other':>8}" if other else ""))
    for kind, us in mine.items():
        print(f"{kind:<18}{us:8.1f}" + (f"{other[kind]:8.1f}" if other else ""))
    # The frames of one job above, each type as often as it comes.
    counts = {kind: len(texts) for kind, texts in frames("p", "c").items()}
    def per_job(figures: dict[str, float]) -> str:
        return f"{sum(us * counts[kind] for kind, us in figures.items()):8.1f}"
    print(f"{'a job (us)':<18}{per_job(mine)}" + (per_job(other) if other else ""))


if __name__ == "__main__":
    main()
