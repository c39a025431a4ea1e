"""Collecting a finished prompt's outputs: history (unless its events told them) -> /view ->
storage -> job succeeded -> the files deleted from the backend (when it has comfyui_nodes/).

A node's files are stored as soon as the node reports them (`executed`), while the prompt
still runs, and added to the job's outputs then (EarlyOutputs); the collection at the end
takes those as stored and keeps them first, in the order they came, so that an output's place
among the job's outputs (its v2 asset id) never changes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from comfyfleet import metrics
from comfyfleet.comfy.cleanup import BackendCleanup, BackendFile
from comfyfleet.comfy.client import ComfyClient, ComfyError, OutputMissing
from comfyfleet.comfy.prompts import OutputFile, OutputText, output_items
from comfyfleet.db import unavailable
from comfyfleet.execution.endings import Endings, JobEnded
from comfyfleet.execution.starts import ExecutionEnd, UnrecordedEnd, UnrecordedStart
from comfyfleet.jobs.models import ON_BACKEND_STATES, Job, JobStatus, job_error
from comfyfleet.jobs.repository import JobRepository
from comfyfleet.logs import job_fields
from comfyfleet.storage import Storage, StorageError, content_type_for, output_key

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024
# A text output kept as a file (one with NUL, which jsonb cannot hold).
TEXT_TYPE = "text/plain; charset=utf-8"
# ComfyUI records history just before it announces the end; allow a short lag.
HISTORY_ATTEMPTS = 10
HISTORY_DELAY = 0.2
# The longest wait between attempts while storage or the database is away.
RETRY_MAX_DELAY = 60.0
# A collection failing otherwise (storage or the database refusing in a way that is no
# outage, the backend's answer not what it should be, a bug) is tried this many times in all,
# the first wait COLLECT_RETRY_DELAY seconds, doubled after each try; then the job fails.
COLLECT_ATTEMPTS = 3
COLLECT_RETRY_DELAY = 1.0


@dataclass
class EarlyOutputs:
    """The files of one run stored while it ran: the records, and the storing under way."""

    stored: list[dict[str, Any]] = field(default_factory=list)
    storing: asyncio.Task[None] | None = None
    # The run is over (finished, failed, lost, moved): nothing more is stored or recorded
    # early; what is missing is the final collection's, if there is one.
    closed: bool = False

    async def settled(self) -> list[dict[str, Any]]:
        """The records, once the storing under way has ended (a failure there is the final
        collection's to redo)."""
        if self.storing is not None:
            with contextlib.suppress(Exception):
                await self.storing
        return self.stored


class Collector:
    def __init__(
        self,
        repository: JobRepository,
        storage: Storage,
        key_prefix: str,
        endings: Endings,
    ) -> None:
        self._repository = repository
        self._storage = storage
        self._key_prefix = key_prefix
        self._endings = endings

    def store_early(
        self, client: ComfyClient, running: Job, node_output: dict[str, Any],
        early: EarlyOutputs, start: UnrecordedStart,
    ) -> bool:
        """Store the files of `node_output` (`{node_id: ui}`, a node's `executed`) after those
        already under way, and add them to the job's outputs while it runs (recording its
        `start` too when no write has yet); whether it has files to store."""
        files, _ = output_items(node_output)
        if files:
            early.storing = asyncio.create_task(
                self._store_early(client, running, files, early, start, early.storing))
        return bool(files)

    async def _store_early(
        self, client: ComfyClient, running: Job, files: list[OutputFile], early: EarlyOutputs,
        start: UnrecordedStart, before: asyncio.Task[None] | None,
    ) -> None:
        if before is not None:
            with contextlib.suppress(Exception):
                await before
        try:
            if early.closed:
                return
            early.stored.extend(await self._store_outputs(client, running, files, []))
            # Closed meanwhile: ended (the collection records them with the job's end), or
            # moved (they are not the new run's).
            if early.closed:
                return
            async with start.recording() as started_at:
                if started_at is None:
                    if not early.closed:  # (as above, while it waited for the start's write)
                        await self._repository.transition(running, {JobStatus.RUNNING},
                                                          outputs=list(early.stored))
                    return
                started = await self._repository.transition(
                    running, {JobStatus.DISPATCHED}, event="job.started",
                    status=JobStatus.RUNNING, started_at=started_at,
                    outputs=list(early.stored))
            if started is not None:
                metrics.job_started(started)
        except Exception as exc:  # the collection at the end stores them
            log.warning("storing outputs of job %s early failed: %s", running.id, exc)

    async def collect(
        self, client: ComfyClient, uploading: Job, cleanup: BackendCleanup | None = None,
        early: EarlyOutputs | None = None, unrecorded: UnrecordedEnd | None = None,
        history_outputs: dict[str, Any] | None = None,
    ) -> None:
        """Store the outputs of a job in `uploading` (those in `early` are stored already)
        and mark it succeeded (or failed); then delete the stored files from the backend
        through `cleanup`. The end of executing `unrecorded` (the job still `dispatched` or
        `running` in the database) is recorded with the job's end, unless its own write
        (tracker.END_WRITE_DELAY) took it first. Its outputs are `history_outputs` (the
        `outputs` of its history entry, or the same from its `executed` messages) when given,
        else read from the history.

        Outages of storage and of the database are waited out, and a file missing on the
        backend fails the job at once (`output_unavailable`); any other failure (the backend
        answering an error or breaking off, storage or the database refusing otherwise, a
        bug) is tried again, COLLECT_ATTEMPTS times in all, and then fails the job
        (`output_unavailable`, `collection_failed`): nothing else follows the job once its
        prompt has ended, so it must not be left where it was. Raises only when cancelled,
        or when even that failure cannot be written."""
        delay = COLLECT_RETRY_DELAY
        try:
            for attempt in range(1, COLLECT_ATTEMPTS + 1):
                try:
                    stored = await self._collect_once(client, uploading, early, unrecorded,
                                                      history_outputs)
                    break
                except OutputMissing as exc:  # never an empty stand-in; asking again is vain
                    await self._finish(uploading, JobStatus.FAILED, unrecorded,
                                       error=job_error("output_unavailable", str(exc)))
                    return
                except Exception as exc:
                    metrics.collection_failed()
                    if attempt == COLLECT_ATTEMPTS:
                        log.exception("collecting the outputs of job %s failed %d times; it "
                                      "fails", uploading.id, attempt, extra=job_fields(uploading))
                        await self._finish(uploading, JobStatus.FAILED, unrecorded,
                                           error=_collection_failed(exc, attempt))
                        return
                    log.warning("collecting the outputs of job %s failed (try %d of %d), "
                                "trying again in %.0f s: %r", uploading.id, attempt,
                                COLLECT_ATTEMPTS, delay, exc, extra=job_fields(uploading))
                    await asyncio.sleep(delay)
                    delay *= 2
        finally:
            if unrecorded is not None:  # cut short: the job's prompt is read from /history
                unrecorded.drop()       # again by whichever process follows it next
        # Only once the success is recorded: a crash before this leaves a file on the backend,
        # never a job without its output. Not when a cancel or another attempt won the job.
        if stored and cleanup is not None:
            await cleanup.delete(BackendFile(f.filename, f.subfolder, f.type) for f in stored)

    async def _collect_once(
        self, client: ComfyClient, uploading: Job, early: EarlyOutputs | None,
        unrecorded: UnrecordedEnd | None, history_outputs: dict[str, Any] | None,
    ) -> list[OutputFile]:
        """One try of `collect`: the files stored, once the job's success is recorded (none
        when the job had moved on)."""
        if history_outputs is None:
            history_outputs = (await self._history(client, uploading)).get("outputs")
        files, texts = output_items(history_outputs)
        stored_early = await early.settled() if early is not None else []
        outputs = await self._store_outputs(client, uploading, files, texts, stored_early)
        if await self._finish(uploading, JobStatus.SUCCEEDED, unrecorded, outputs=outputs):
            return files
        return []

    async def _history(self, client: ComfyClient, job: Job) -> dict[str, Any]:
        assert job.prompt_id is not None
        for _ in range(HISTORY_ATTEMPTS):
            entry = await client.history(job.prompt_id)
            if entry is not None:
                return entry
            await asyncio.sleep(HISTORY_DELAY)
        raise ComfyError(f"prompt {job.prompt_id} finished but has no history entry")

    async def _store_outputs(
        self, client: ComfyClient, job: Job, files: list[OutputFile], texts: list[OutputText],
        stored_early: list[dict[str, Any]] | None = None,
    ) -> list[dict[str, Any]]:
        """The records of `files` (stored now, unless `stored_early` has them: those come
        first, in their order) and of `texts`."""
        early = {(record["key"], record["filename"]): place
                 for place, record in enumerate(stored_early or [])}
        stored: list[dict[str, Any]] = []
        per_node: dict[str, int] = {}
        for item in files:
            index = per_node.get(item.node_id, 0)
            per_node[item.node_id] = index + 1
            key = output_key(self._key_prefix, str(job.id), item.node_id, index, item.filename)
            if (key, item.filename) in early:
                assert stored_early is not None
                stored.append(stored_early[early[key, item.filename]])
                continue
            content_type = content_type_for(item.filename)
            size = await self._store_with_retry(client, item, key, content_type)
            stored.append(
                {
                    "node_id": item.node_id,
                    "filename": item.filename,
                    "content_type": content_type,
                    "size": size,
                    "key": key,
                }
            )
        stored.sort(key=lambda record: early.get((record["key"], record["filename"]),
                                                  len(early)))
        for text in texts:
            if "\x00" not in text.text:
                stored.append({"node_id": text.node_id, "text": text.text})
                continue
            # jsonb cannot hold NUL: such a text is kept as a file, its bytes intact.
            index = per_node.get(text.node_id, 0)
            per_node[text.node_id] = index + 1
            filename = f"{text.node_id}_{index}.txt"
            key = output_key(self._key_prefix, str(job.id), text.node_id, index, filename)
            size = await self._store_with_retry(client, text.text.encode(), key, TEXT_TYPE)
            stored.append({"node_id": text.node_id, "filename": filename,
                           "content_type": TEXT_TYPE, "size": size, "key": key})
        return stored

    async def _store_with_retry(
        self, client: ComfyClient, source: OutputFile | bytes, key: str, content_type: str,
    ) -> int:
        """Store one output: a file streamed from the backend, or a text's bytes; storage
        outages are waited out."""
        delay = 1.0
        while True:
            try:
                if isinstance(source, bytes):
                    return await self._storage.put_stream(key, _once(source), content_type)
                async with client.view(source.filename, source.subfolder, source.type,
                                       CHUNK_BYTES) as chunks:
                    return await self._storage.put_stream(key, chunks, content_type)
            except StorageError as exc:
                metrics.storage_error()
                log.warning("storing %s failed, retrying in %.0f s: %s", key, delay, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)

    async def _finish(self, job: Job, status: JobStatus, unrecorded: UnrecordedEnd | None,
                      **values: Any) -> bool:
        """Record the end (with the end of executing `unrecorded`, unless its own write took
        it); False when the job had moved on (cancelled, or another attempt's). A database
        outage is waited out: the outputs are stored, only this write is missing."""
        delay = 1.0
        recording = unrecorded.recording() if unrecorded is not None \
            else contextlib.nullcontext(None)
        async with recording as end:
            while True:
                try:
                    finished = await self._repository.finish(
                        job, status, _states(end), **_end_values(end), **values)
                    break
                except Exception as exc:
                    if not unavailable(exc):
                        raise
                    log.warning("recording job %s %s failed, retrying in %.0f s: %s", job.id,
                                status, delay, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_DELAY)
        if finished is None:
            return False
        self._endings.tell(JobEnded(finished))
        return True


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _collection_failed(exc: Exception, attempts: int) -> dict[str, Any]:
    """The error of a job whose outputs could not be collected in `attempts` tries, the last
    failing with `exc`: what the backend answered, when it failed to give them; else what
    failed by its kind only (its text, which may name the service's own paths or data, is in
    the service's log)."""
    if isinstance(exc, ComfyError):  # never stored as an empty stand-in
        return job_error("output_unavailable", f"{exc} (the last of {attempts} tries)",
                         details={"attempts": attempts})
    return job_error("collection_failed",
                     f"the outputs could not be stored in {attempts} tries, the last failing "
                     f"with {type(exc).__name__} (the service's log has the details); they "
                     "are kept on the backend", details={"attempts": attempts,
                                                         "exception_type": type(exc).__name__})


def _states(end: ExecutionEnd | None) -> set[JobStatus]:
    """Where a job whose outputs are stored is: `uploading`, unless its end of executing
    `end` is still to be recorded (then still where its prompt left it, or `uploading` if a
    write of this prompt's end not ours came first)."""
    return {JobStatus.UPLOADING} if end is None else set(ON_BACKEND_STATES)


def _end_values(end: ExecutionEnd | None) -> dict[str, Any]:
    """What the write of the end of executing `end` would have written (tracker
    `_record_end`), for the job's end to write instead."""
    return {} if end is None else {"uploading_at": end.uploading_at, "started_at": end.started_at,
                                   "progress": 1.0, "progress_detail": None}
