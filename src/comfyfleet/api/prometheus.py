"""GET /metrics in the Prometheus text format; open unless METRICS_TOKEN is set."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from comfyfleet.api.errors import ApiError
from comfyfleet.metrics import Scrape
from comfyfleet.services import ServicesDep

router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def get_metrics(request: Request, svc: ServicesDep) -> Response:
    token = svc.settings.metrics_token
    if token is not None:
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(401, "invalid_metrics_token",
                           "/metrics needs `Authorization: Bearer <METRICS_TOKEN>`",
                           headers={"WWW-Authenticate": "Bearer"})
    scrape = request.app.state.scrape
    assert isinstance(scrape, Scrape)
    return Response(await scrape.render(), media_type=CONTENT_TYPE_LATEST)
