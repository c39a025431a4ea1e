"""The webhook delivery worker: takes due deliveries from the outbox and runs them side by side.

- Concurrency is bounded overall and per receiver (host:port), and the bounds are applied when
  claiming: a delivery is only leased when there is room to send it at once, so a slow or
  dead receiver holds its own slots and never delays anyone else's deliveries. A sender per
  slot (a task for the worker's life) sends the deliveries leased, one after another.
- A delivery this process writes while it has room to send it is leased to it by the very
  statement that writes it and handed over in memory (jobs/deliveries.py `DeliverySlots`):
  no claim of its own, no NOTIFY.
- Claims use `FOR UPDATE SKIP LOCKED` and a lease, so several processes can share the outbox
  and a delivery whose process died mid-attempt (or before it, leased as it was written) is
  taken up again when its lease runs out.
- It wakes when an unleased delivery is committed (Postgres NOTIFY, from any process, this one
  included: a wake of its own as well would only add a claim that finds nothing) and when the
  next retry falls due; the periodic pass is only a safety net.
- Attempts are recorded in batches by the claim loop's own passes (one statement records, leases
  and finds the next due delivery): an attempt made waits for the next pass, at most
  ACK_DELAY_SECONDS. A process that dies meanwhile leaves the delivery leased; it is sent
  again when the lease runs out (at least once, as ever: receivers deduplicate by
  `webhook-id`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from comfyfleet import metrics
from comfyfleet.db import listening, unavailable
from comfyfleet.jobs.deliveries import (
    NOTIFY_CHANNEL,
    DeliverySlots,
    DeliveryStatus,
    OutgoingDelivery,
)
from comfyfleet.jobs.models import utcnow
from comfyfleet.jobs.render import UrlFor
from comfyfleet.settings import Settings
from comfyfleet.webhooks.delivery import (
    SNIPPET_BYTES,
    AttemptResult,
    WebhookSender,
    event_body,
)
from comfyfleet.webhooks.outbox import Attempt, Outbox, Pass, Settled
from comfyfleet.webhooks.schedule import RetrySchedule

log = logging.getLogger(__name__)

SAFETY_PASS_SECONDS = 5.0
# A due delivery that could not be claimed is being claimed by another process right now.
MIN_WAIT_SECONDS = 0.05
# A lease covers one attempt (at most the timeout) plus rendering and recording it.
LEASE_MARGIN_SECONDS = 30.0
LISTEN_RETRY_SECONDS = 2.0
# The longest an attempt made waits for the next pass to record it: at 10 webhooks a second,
# five or so are recorded by one statement. (Their rows say `pending` meanwhile.)
ACK_DELAY_SECONDS = 0.5
# The passes that try to record an attempt the database refuses (not an outage: what that
# attempt holds, or its delivery deleted meanwhile) before it is dropped.
RECORD_TRIES = 3


class WebhookWorker:
    def __init__(
        self,
        engine: AsyncEngine,
        sender: WebhookSender,
        url_for: UrlFor,
        *,
        schedule: RetrySchedule,
        timeout: float,
        slots: DeliverySlots,
    ) -> None:
        """`slots`: the process's sending slots (`WebhookWorker.slots`), shared with the
        repository, which leases deliveries to this worker as it writes them."""
        self._engine = engine
        self._outbox = Outbox(engine)
        self._sender = sender
        self._url_for = url_for
        self._schedule = schedule
        self._timeout = timeout
        self._slots = slots
        self._wake = asyncio.Event()
        self._senders: list[asyncio.Task[None]] = []
        # The senders under way with an attempt, and its delivery.
        self._sending: dict[asyncio.Task[None], OutgoingDelivery] = {}
        self._settled: list[Settled] = []  # attempts made, for the next pass to record
        self._ack_timer: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    @staticmethod
    def slots(settings: Settings) -> DeliverySlots:
        """The sending slots of a process's worker, for it and its repository."""
        return DeliverySlots(
            concurrency=settings.webhook_concurrency,
            per_host=settings.webhook_concurrency_per_host,
            lease=timedelta(seconds=settings.webhook_timeout + LEASE_MARGIN_SECONDS))

    @classmethod
    def from_settings(
        cls, settings: Settings, engine: AsyncEngine, secret: str, url_for: UrlFor,
        slots: DeliverySlots,
    ) -> WebhookWorker:
        sender = WebhookSender(
            secret,
            timeout=settings.webhook_timeout,
            allow_private=settings.allow_private_callbacks,
            concurrency=settings.webhook_concurrency,
        )
        schedule = RetrySchedule(
            delays=tuple(settings.webhook_retry_delays),
            max_age=timedelta(seconds=settings.webhook_max_age),
        )
        return cls(
            engine, sender, url_for, schedule=schedule, timeout=settings.webhook_timeout,
            slots=slots,
        )

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._slots.open()
        self._tasks = [asyncio.create_task(self._run()), asyncio.create_task(self._listen())]
        self._senders = [asyncio.create_task(self._send_handed())
                         for _ in range(self._slots.concurrency)]

    async def close(self) -> None:
        """Stop claiming; give attempts in flight their time limit to finish. Those cut short
        give their leases back, for whichever process is there to send them at once."""
        # The claim loop stops between passes, not inside one: a claim cancelled while its
        # commit is on the way leases deliveries no attempt of ours will make, and every
        # other process then waits a whole lease before sending them.
        self._closing = True
        self._wake.set()
        not_started = self._slots.close()
        if self._tasks:
            runner, listener = self._tasks
            listener.cancel()
            await asyncio.wait([runner], timeout=self._timeout)
            runner.cancel()  # a claim stuck on a database that is away
            await asyncio.gather(runner, listener, return_exceptions=True)
        # The senders waiting stop (those under way stop after their attempt), and the
        # deliveries the last pass handed over that none took are given back with the rest.
        idle = [sender for sender in self._senders if sender not in self._sending]
        for sender in idle:
            sender.cancel()
        await asyncio.gather(*idle, return_exceptions=True)
        not_started += self._slots.close()
        if self._sending:
            await asyncio.wait(self._sending, timeout=self._timeout + 1)
        cut_short = not_started + list(self._sending.values())
        for sender in self._senders:
            sender.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)
        try:
            if self._settled:  # attempts made and not recorded yet
                await self._pass(room=0)
        except Exception:  # the database is away: their leases run out, they go out again
            log.exception("could not record %d webhook attempts", len(self._settled))
        try:
            await self._outbox.release(cut_short)
        except Exception:  # the database is away: the leases run out by themselves
            log.exception("could not give back the leases of %d webhooks", len(cut_short))
        await self._sender.close()

    async def _run(self) -> None:
        while not self._closing:
            self._wake.clear()
            try:
                wait = await self._start_due()
            except Exception:  # the database may be away for a while; keep the loop alive
                log.exception("webhook claim pass failed")
                wait = SAFETY_PASS_SECONDS
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def _start_due(self) -> float:
        """Record the attempts made, start every due delivery there is room for; returns the
        seconds until the next one falls due (a delivery ending where it held others back,
        an attempt to record, or a retry scheduled wakes the loop earlier)."""
        done = None
        while (room := max(self._slots.concurrency - self._slots.taken, 0)) or self._settled:
            done = await self._pass(room)
            if len(done.leased) < room or not room:
                break  # that was everything due now
        # With no room left, the first delivery to finish wakes the loop to look again.
        if self._slots.taken >= self._slots.concurrency or done is None \
                or done.next_due is None:
            return SAFETY_PASS_SECONDS
        wait = (done.next_due - utcnow()).total_seconds()
        return min(max(wait, MIN_WAIT_SECONDS), SAFETY_PASS_SECONDS)

    async def _pass(self, room: int) -> Pass:
        """One statement: record the attempts made, lease up to `room` due deliveries and
        start them. Attempts it could not record are kept for the next pass while the
        database is away; when it answered and refused them, they are recorded one by one
        (`_record_apart`), so that what one attempt holds cannot stop every pass after."""
        settled, self._settled = self._settled, []
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        try:
            done = await self._lease(settled, room)
        except BaseException as exc:
            self._settled[:0] = settled
            if not settled or not isinstance(exc, Exception) or unavailable(exc):
                raise
            log.warning("recording %d webhook attempts failed, recording each alone: %s",
                        len(settled), exc)
            done = await self._lease([], room)  # (the database away after all: all kept)
            del self._settled[:len(settled)]  # (only appended to meanwhile)
            await self._record_apart(settled)
        else:
            for attempt in settled:
                _log_attempt(attempt, attempt.delivery.id in done.kept)
        for delivery in done.leased:
            self._slots.take(delivery.host)
            self._slots.written(delivery)
        return done

    async def _lease(self, settled: list[Settled], room: int) -> Pass:
        return await self._outbox.settle(
            settled, limit=room, per_host=self._slots.per_host, busy=self._slots.busy,
            lease=self._slots.lease_for)

    async def _record_apart(self, settled: list[Settled]) -> None:
        """Record each attempt of `settled` in a statement of its own: those the database
        takes are recorded whatever another one holds. One it refuses is tried again by the
        next passes, and dropped (logged) once refused RECORD_TRIES times: its delivery
        stays leased as the attempt left it and comes due again when that lease runs out
        (sql/outbox.sql `pass` takes a lease run out as due), so it is sent again, not lost
        (DESIGN §5: at least once, as after a crash mid-attempt)."""
        for index, one in enumerate(settled):
            try:
                kept = await self._outbox.record([one])
            except Exception as exc:
                if unavailable(exc):  # gone away since: these and the rest wait, uncounted
                    self._settled.extend(settled[index:])
                    return
                if one.refusals + 1 < RECORD_TRIES:
                    self._settled.append(one._replace(refusals=one.refusals + 1))
                    self._record_soon()
                else:
                    _log_dropped(one, exc)
            except BaseException:
                self._settled[:0] = settled[index:]
                raise
            else:
                _log_attempt(one, one.delivery.id in kept)

    async def _send_handed(self) -> None:
        """A sender: sends the deliveries handed over (leased to this worker as they were
        written, or by its passes; their slots taken), one at a time, until the worker
        closes. (A long-lived task per slot: a task per delivery, registered in asyncio's
        WeakSet of tasks, with a done callback and the hop through a task taking them, cost
        ~5 us a delivery against ~1.5 for a hand-over to a waiting sender.)"""
        sender = asyncio.current_task()
        assert sender is not None
        while not self._closing:
            delivery = await self._slots.handed()
            self._sending[sender] = delivery
            try:
                await self._deliver(delivery)
            finally:
                del self._sending[sender]
                # Only a slot that held deliveries back frees room for them: with room to
                # spare, a pass claims all that is due, and the rest wake the loop when they
                # are due.
                held_back = self._slots.full(delivery.host)
                self._slots.free(delivery.host)
                if held_back:
                    self.wake()

    async def _deliver(self, delivery: OutgoingDelivery) -> None:
        attempted_at = utcnow()
        try:
            body = await event_body(delivery.payload, self._url_for)
            result = await self._sender.send(delivery.url, delivery.message_id, body)
        except Exception as exc:
            # The receiver's failures come back as results; this is ours (an event whose
            # body cannot be made, a presigning that fails). Recorded as a failed attempt,
            # the delivery follows its retry schedule and ends dead at WEBHOOK_MAX_AGE: not
            # recorded, it came due again at each lease's end, for ever.
            log.exception("webhook %s for job %s: not sent", delivery.message_id,
                          delivery.job_id)
            result = AttemptResult(
                None, 0, f"not sent: {type(exc).__name__}: {exc}"[:SNIPPET_BYTES])
        try:
            metrics.webhook_attempt(delivery, result.delivered, result.status_code)
            outcome = self._schedule.after(result, attempts=delivery.attempts + 1,
                                           pending_since=delivery.pending_since, now=utcnow())
            attempt = Attempt(delivery.id, delivery.lease_token, attempted_at,
                              result.status_code, result.latency_ms, result.error,
                              result.snippet, outcome.status, outcome.next_attempt_at)
        except Exception:  # its lease runs out and the delivery is tried again
            log.exception("webhook %s for job %s: attempt not recorded",
                          delivery.message_id, delivery.job_id)
            return
        self._settled.append(Settled(delivery, attempt))
        if outcome.status == DeliveryStatus.PENDING:
            self.wake()  # a retry the loop's timer does not know of yet
        else:
            self._record_soon()

    def _record_soon(self) -> None:
        """Have a pass record the attempts made within ACK_DELAY_SECONDS."""
        if self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(
                ACK_DELAY_SECONDS, self.wake)

    async def _listen(self) -> None:
        """Wake on NOTIFY from any process committing a delivery; reconnect when cut off."""
        while True:
            try:
                await self._listen_once()
            except Exception as exc:  # the database is away; the safety pass covers the gap
                log.warning("webhook listener: %s; reconnecting", exc)
            await asyncio.sleep(LISTEN_RETRY_SECONDS)

    async def _listen_once(self) -> None:
        """Listen on one connection until it is lost."""
        def notified(*_: Any) -> None:
            self.wake()

        async with listening(self._engine, [NOTIFY_CHANNEL], notified) as lost:
            self.wake()  # deliveries committed while nobody listened
            await lost.wait()


def _log_attempt(settled: Settled, kept: bool) -> None:
    delivery, attempt = settled.delivery, settled.attempt
    delivered = attempt.status_code is not None and 200 <= attempt.status_code < 300
    level = logging.INFO if delivered else logging.WARNING
    if not log.isEnabledFor(level):
        return
    log.log(level, "webhook %s %s for job %s, attempt %d: %s in %d ms -> %s%s",
            delivery.event_type, delivery.message_id, delivery.job_id, delivery.attempts + 1,
            attempt.error or f"HTTP {attempt.status_code}", attempt.latency_ms,
            attempt.status, "" if kept else " (lease lost: another worker has it)",
            extra={"job_id": str(delivery.job_id)})


def _log_dropped(settled: Settled, exc: Exception) -> None:
    metrics.webhook_attempt_unrecorded()
    delivery = settled.delivery
    log.error("webhook %s %s for job %s (delivery %s): the database refused its attempt's "
              "record %d times, dropped; sent again when its lease runs out: %s",
              delivery.event_type, delivery.message_id, delivery.job_id, delivery.id,
              RECORD_TRIES, exc, extra={"job_id": str(delivery.job_id)})
