"""In-process notices that a job changed, that its backend sent a preview image, or a line of
its execution's log.

The database stays the source of truth (a listener re-reads the job); notices only save the
listeners from polling, and previews and log lines exist nowhere else (a log line is told to
whoever listens when it happens, and kept by no one). That jobs changed in another process is
told by peers.py (`changed_elsewhere`, without saying which): every listener re-reads its job
then, and the dashboard's lists theirs.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict, defaultdict
from dataclasses import dataclass

from comfyfleet.pulse import Pulse

QUEUE_SIZE = 64  # a slow listener loses previews and log lines, never that the job changed
# Jobs whose latest preview is kept, for a listener that comes later (the Comfy API v2 stream
# starts with it); the oldest is forgotten first.
LATEST_PREVIEWS = 1024


@dataclass(frozen=True)
class PreviewImage:
    node_id: str | None
    image_type: str
    image: bytes


@dataclass(frozen=True)
class LogLine:
    """A line of the job's execution as its backend reported it (the Comfy API v2 `log`)."""

    level: str  # "info", "warning" or "error"
    message: str


Notice = PreviewImage | LogLine | None  # None: "the job changed; read it again"


class JobNotices:
    def __init__(self) -> None:
        self._listeners: dict[uuid.UUID, set[asyncio.Queue[Notice]]] = defaultdict(set)
        self._latest: OrderedDict[uuid.UUID, PreviewImage] = OrderedDict()
        # Beats on every job this process changes (told to the other processes).
        self.here = Pulse()
        # Beats on those, and when another process says its jobs changed (the dashboard's
        # lists follow it).
        self.any_job = Pulse()

    def changed(self, job_id: uuid.UUID) -> None:
        self._publish(job_id, None)
        self.here.beat()
        self.any_job.beat()

    def changed_elsewhere(self) -> None:
        """Another process changed some of its jobs: any listener's may be among them (told
        at most once a second by each process, however busy: peers.py)."""
        for job_id in list(self._listeners):
            self._publish(job_id, None)
        self.any_job.beat()

    def preview(self, job_id: uuid.UUID, preview: PreviewImage) -> None:
        self._latest[job_id] = preview
        self._latest.move_to_end(job_id)
        if len(self._latest) > LATEST_PREVIEWS:
            self._latest.popitem(last=False)
        self._publish(job_id, preview)

    def log(self, job_id: uuid.UUID, line: LogLine) -> None:
        self._publish(job_id, line)

    def followed(self, job_id: uuid.UUID) -> bool:
        """Whether anyone listens to the job's notices now (a line of its log told to nobody
        is lost: not worth making)."""
        return job_id in self._listeners

    def latest_preview(self, job_id: uuid.UUID) -> PreviewImage | None:
        """The last preview image of the job that reached this process, if it is kept."""
        return self._latest.get(job_id)

    def _publish(self, job_id: uuid.UUID, notice: Notice) -> None:
        for queue in self._listeners.get(job_id, ()):
            told = notice
            if queue.full() and queue.get_nowait() is None:
                told = None  # the change, not the preview or line: nothing re-reads otherwise
            queue.put_nowait(told)

    def listen(self, job_id: uuid.UUID) -> asyncio.Queue[Notice]:
        queue: asyncio.Queue[Notice] = asyncio.Queue(QUEUE_SIZE)
        self._listeners[job_id].add(queue)
        return queue

    def stop(self, job_id: uuid.UUID, queue: asyncio.Queue[Notice]) -> None:
        listeners = self._listeners.get(job_id)
        if listeners is not None:
            listeners.discard(queue)
            if not listeners:
                del self._listeners[job_id]
