"""When a failed webhook is tried again (DESIGN §5), and when it is given up."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

from comfyfleet.jobs.deliveries import DeliveryStatus
from comfyfleet.webhooks.delivery import AttemptResult
from comfyfleet.webhooks.outbox import Outcome


@dataclass(frozen=True)
class RetrySchedule:
    delays: tuple[float, ...]  # seconds; the last one repeats (WEBHOOK_RETRY_DELAYS)
    max_age: timedelta  # counted from when the delivery became pending (WEBHOOK_MAX_AGE)
    # ± this fraction, so deliveries that failed together (a receiver outage) spread out.
    jitter: float = 0.2

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt (1 = the first)."""
        base = self.delays[min(attempts, len(self.delays)) - 1]
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)

    def after(
        self, result: AttemptResult, *, attempts: int, pending_since: datetime, now: datetime
    ) -> Outcome:
        """Where a delivery goes after its `attempts`-th attempt gave `result`."""
        if result.delivered:
            return Outcome(DeliveryStatus.DELIVERED)
        if result.status_code == 410:  # Gone: the receiver asks us to stop
            return Outcome(DeliveryStatus.FAILED)
        if result.retry_after is not None:
            # Honoured, but never sooner than the schedule's first step: a receiver that
            # keeps answering "Retry-After: 0" must not turn this into a busy loop.
            delay = max(result.retry_after, self.delays[0])
        else:
            delay = self.delay(attempts)
        # (Compared as seconds: a Retry-After may be past the last date there is.)
        if delay > (pending_since + self.max_age - now).total_seconds():
            return Outcome(DeliveryStatus.DEAD)
        return Outcome(DeliveryStatus.PENDING, now + timedelta(seconds=delay))
