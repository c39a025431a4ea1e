"""Run `comfyfleet serve` with a stamp at each step of a job's way (bench.v2_overhead
--explain): where the time between the job's recorded times goes, step by step.

    python -m bench.step_trace OUTPUT -m MODULE [ARGS...]

The steps, each stamped `time.time()` as it is reached (the first time, per job), "sent" as
our method making the request is called (its arguments yet to encode), "returned" or
"answered" as it returns: the v2 submit's answer begun (`submit_answer`: past uvicorn, the
body read and parsed; jobs going one at a time, it is stamped for the next job to come to the
pick), the pick begun (`Dispatcher.claim_on_submit`: the graph checked, the job built), the
insert (`JobRepository._insert_taken`, sql/claim.sql `insert_taken`) sent and returned; POST
/prompt (`ComfyClient.queue_prompt`) sent and answered; `execution_start`, `executed` and
`executing(null)` handled by the tracker; the early store begun (`Collector._store_outputs`,
its GET /view next), storage's put begun (`put_stream`: the /view answered) and returned; the
finish (`JobRepository.finish`) sent and returned; the submit's answer rendered (`_submit`
returned). Each stamp also has the CPU time the event loop's thread had used so far, which
tells a step's own work from its waiting (work in other threads, `asyncio.to_thread`'s, is
not in it). SIGUSR2 writes them to OUTPUT as JSON, {job id: {step: [t, cpu]}}. A stamp costs
a few microseconds; wrappers around our own methods, patched in before the module runs:
nothing of the service is changed.
"""

from __future__ import annotations

import functools
import json
import runpy
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from comfyfleet.api.v2 import jobs as v2_jobs
from comfyfleet.comfy.client import ComfyClient
from comfyfleet.comfy.messages import Executed, Executing, ExecutionStart
from comfyfleet.dispatch.dispatcher import Dispatcher
from comfyfleet.execution.collector import Collector
from comfyfleet.execution.tracker import ExecutionTracker
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.storage.local import LocalStorage
from comfyfleet.storage.s3 import S3Storage

STAMPS: dict[str, dict[str, tuple[float, float]]] = {}
JOB_OF_PROMPT: dict[str, str] = {}
SUBMIT_BEGUN: list[tuple[float, float]] = []  # the latest submit's, until its job is known


def now() -> tuple[float, float]:
    """The time, and the CPU time the event loop's thread has used so far."""
    return time.time(), time.thread_time()


def stamp(job_id: object, step: str, at: tuple[float, float] | None = None) -> None:
    STAMPS.setdefault(str(job_id), {}).setdefault(step, now() if at is None else at)


def around(cls: type, name: str, key: Callable[..., object | None], sent: str,
           returned: str | None = None) -> None:
    """Stamp `sent` as `cls.name` is called (and `returned` as it returns), for the job
    `key(*args, **kwargs)` names (None: not stamped)."""
    method = getattr(cls, name)

    @functools.wraps(method)
    async def stamped(*args: Any, **kwargs: Any) -> Any:
        job_id = key(*args, **kwargs)
        if job_id is not None:
            stamp(job_id, sent)
        result = await method(*args, **kwargs)
        if job_id is not None and returned is not None:
            stamp(job_id, returned)
        return result
    setattr(cls, name, stamped)


def install() -> None:
    answer = v2_jobs.submit_answer

    @functools.wraps(answer)
    async def answering(*args: Any, **kwargs: Any) -> Any:
        SUBMIT_BEGUN[:] = [now()]
        return await answer(*args, **kwargs)
    v2_jobs.submit_answer = answering

    claim_on_submit = Dispatcher.claim_on_submit

    @functools.wraps(claim_on_submit)
    async def picking(self: Dispatcher, job: Any, store: Any) -> Any:
        if SUBMIT_BEGUN:
            stamp(job.id, "v2 submit's answer begun (body parsed)", SUBMIT_BEGUN.pop())
        stamp(job.id, "pick begun (graph checked, job built)")
        return await claim_on_submit(self, job, store)
    Dispatcher.claim_on_submit = picking  # type: ignore[method-assign]

    submit = v2_jobs._submit

    @functools.wraps(submit)
    async def submitting(*args: Any, **kwargs: Any) -> Any:
        job, created = await submit(*args, **kwargs)
        stamp(job["id"], "submit's answer rendered")
        return job, created
    v2_jobs._submit = submitting

    track = ExecutionTracker.track

    @functools.wraps(track)
    def tracked(self: ExecutionTracker, session: Any, job: Any, **kwargs: Any) -> None:
        JOB_OF_PROMPT[job.prompt_id] = str(job.id)
        track(self, session, job, **kwargs)
    ExecutionTracker.track = tracked  # type: ignore[method-assign]

    around(JobRepository, "_insert_taken", lambda self, connection, job, *_: job.id,
           "insert sent", "insert returned")
    around(ComfyClient, "queue_prompt",
           lambda self, prompt, *, prompt_id, **_: JOB_OF_PROMPT.get(prompt_id),
           "POST /prompt sent", "POST /prompt answered")

    def message_step(message: object) -> str | None:
        match message:
            case ExecutionStart():
                return "execution_start handled"
            case Executed():
                return "executed handled"
            case Executing(node=None):
                return "executing(null) handled"
        return None

    on_message = ExecutionTracker.on_message

    @functools.wraps(on_message)
    async def heard(self: ExecutionTracker, session: Any, message: Any) -> None:
        step = message_step(message)
        job_id = JOB_OF_PROMPT.get(getattr(message, "prompt_id", None) or "")
        if step is not None and job_id is not None:
            stamp(job_id, step)
        await on_message(self, session, message)
    ExecutionTracker.on_message = heard  # type: ignore[method-assign]

    around(Collector, "_store_outputs",
           lambda self, client, job, files, *_: job.id if files else None,
           "store begun (GET /view sent)")
    for storage in (S3Storage, LocalStorage):
        around(storage, "put_stream", lambda self, key, *_: key.rsplit("/", 2)[-2],
               "put begun (/view answered)", "put returned")
    around(JobRepository, "finish", lambda self, job, *_, **__: job.id,
           "finish sent", "finish returned")


def write(output: Path) -> None:
    written = output.with_name(output.name + ".part")
    written.write_text(json.dumps(STAMPS))
    written.replace(output)  # whole, for whoever waits for it to appear


def main() -> None:
    output, flag, module, *args = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: python -m bench.step_trace OUTPUT -m MODULE [ARGS...]")
    install()
    signal.signal(signal.SIGUSR2, lambda *_: write(Path(output)))
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
