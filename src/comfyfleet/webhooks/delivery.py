"""One webhook attempt over HTTP: signed per Standard Webhooks, through the SSRF guard, no
redirects, a time limit, and only a snippet of the answer read."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple

from comfyfleet import json_codec
from comfyfleet.egress import public_addresses
from comfyfleet.http_client import HttpClient, HttpError, HttpTimeout, Timeouts
from comfyfleet.jobs.comfyui_server import COMFYUI_SERVER_FORMAT, comfyui_server_record
from comfyfleet.jobs.render import UrlFor
from comfyfleet.webhooks.signing import signed_headers

log = logging.getLogger(__name__)

SNIPPET_BYTES = 1024
RETRY_AFTER_STATUSES = frozenset({429, 503})


class AttemptResult(NamedTuple):  # (a tuple: a quarter of a frozen dataclass's making)
    status_code: int | None  # None: no HTTP answer (refused, timed out, ...)
    latency_ms: int
    error: str | None = None
    snippet: str | None = None
    retry_after: float | None = None  # seconds, from a 429/503's Retry-After

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """`Retry-After` as seconds from now: either delay-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max((moment - now).total_seconds(), 0.0)


async def event_body(payload: dict[str, Any], url_for: UrlFor) -> bytes:
    """The stored event as JSON, with output URLs presigned now: the stored ones (if any)
    may have expired while the delivery waited. A job submitted in ComfyUI-server's shape
    (its `webhook_format`) gets ComfyUI-server's record instead, signed the same way."""
    data = payload["data"]
    outputs = [
        {**output, "url": await url_for(output["key"])}
        if isinstance(output.get("key"), str) else output
        for output in data.get("outputs", [])
    ]
    job = {**data, "outputs": outputs}
    if data.get("webhook_format") == COMFYUI_SERVER_FORMAT:
        return json_codec.dumps(comfyui_server_record(job))
    return json_codec.dumps({**payload, "data": job})


class WebhookSender:
    def __init__(
        self, secret: str, *, timeout: float, allow_private: bool, concurrency: int
    ) -> None:
        self._secret = secret
        self._timeout = timeout
        self._timeouts = Timeouts(total=timeout)
        self._http = HttpClient(limit=concurrency,
                                resolve=None if allow_private else public_addresses)

    async def send(self, url: str, message_id: str, body: bytes) -> AttemptResult:
        headers = signed_headers(self._secret, message_id, body)
        started = time.monotonic()

        def elapsed_ms() -> int:
            return round((time.monotonic() - started) * 1000)

        try:
            async with self._http.request(
                "POST", url, body=body, headers=headers, timeouts=self._timeouts
            ) as response:  # (a redirect is an answer like any other: never followed)
                # (NUL replaced as the bytes that are not UTF-8 are: PostgreSQL's text
                # cannot hold it, and the pass recording the attempt would fail on it.)
                snippet = (await response.read(SNIPPET_BYTES)).decode(
                    errors="replace").replace("\x00", "\ufffd")
                status = response.status
                retry_after = location = None
                # (Its head parsed only where a field of it is read: not for a 2xx.)
                if status in RETRY_AFTER_STATUSES:
                    retry_after = retry_after_seconds(
                        response.headers.get("retry-after"), datetime.now(UTC)
                    )
                elif 300 <= status < 400:
                    location = response.headers.get("location")
        except HttpTimeout:
            return AttemptResult(None, elapsed_ms(), f"timed out after {self._timeout:g} s")
        except HttpError as exc:
            return AttemptResult(None, elapsed_ms(), f"{type(exc).__name__}: {exc}")
        error = None
        if not 200 <= status < 300:
            error = f"HTTP {status}"
            if 300 <= status < 400:
                error += f": redirects are not followed (Location: {location})"
        return AttemptResult(status, elapsed_ms(), error, snippet, retry_after)

    async def close(self) -> None:
        await self._http.close()
