"""Webhook delivery log and replay (DESIGN §4, §5)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from comfyfleet.api.depends import ServicesDep
from comfyfleet.api.errors import ApiError
from comfyfleet.api.security import CallerDep, visible_job
from comfyfleet.jobs.deliveries import Delivery, DeliveryAttempt
from comfyfleet.webhooks.outbox import Outbox

router = APIRouter(tags=["webhooks"])


async def _outbox(svc: ServicesDep) -> Outbox:
    return Outbox(svc.engine)


OutboxDep = Annotated[Outbox, Depends(_outbox)]


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def delivery_json(delivery: Delivery, attempts: list[DeliveryAttempt]) -> dict[str, Any]:
    return {
        "id": str(delivery.id),
        "job_id": str(delivery.job_id),
        "event_type": delivery.event_type,
        "webhook_id": delivery.message_id,
        "url": delivery.url,
        "status": delivery.status,
        "created_at": _iso(delivery.created_at),
        "next_attempt_at": _iso(delivery.next_attempt_at),
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "attempts": [
            {
                "attempted_at": _iso(attempt.attempted_at),
                "status_code": attempt.status_code,
                "latency_ms": attempt.latency_ms,
                "error": attempt.error,
                "response_snippet": attempt.response_snippet,
            }
            for attempt in attempts
        ],
    }


@router.get("/jobs/{job_id}/deliveries", summary="A job's webhook deliveries and attempts")
async def job_deliveries(
    job_id: uuid.UUID, svc: ServicesDep, outbox: OutboxDep, caller: CallerDep
) -> dict[str, Any]:
    await visible_job(svc, caller, job_id)
    found = await outbox.for_job(job_id)
    return {"deliveries": [delivery_json(delivery, attempts) for delivery, attempts in found]}


@router.post(
    "/deliveries/{delivery_id}/redeliver", status_code=202, summary="Send a webhook again"
)
async def redeliver(
    delivery_id: uuid.UUID, outbox: OutboxDep, svc: ServicesDep, caller: CallerDep
) -> dict[str, Any]:
    """A new attempt now, with the same `webhook-id`, whatever the delivery's status; if it
    fails, it is retried on the usual schedule."""
    found = await outbox.get(delivery_id)
    job = await svc.repository.get(found[0].job_id) if found is not None else None
    redelivered = await outbox.redeliver(delivery_id) if job and caller.sees(job) else None
    if found is None or redelivered is None:
        raise ApiError(404, "delivery_not_found", f"no delivery {delivery_id}")
    # As the redelivery left it: read again, it may already show the new attempt's outcome.
    return delivery_json(redelivered, found[1])
