"""Standard Webhooks signatures (https://www.standardwebhooks.com), through its own package."""

from __future__ import annotations

import base64
import secrets
from datetime import UTC, datetime
from functools import lru_cache

from standardwebhooks.webhooks import Webhook

# A secret decoded (base64) once, not for every delivery's signature.
_signer = lru_cache(maxsize=4)(Webhook)


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def signed_headers(
    secret: str, message_id: str, body: str, now: datetime | None = None
) -> dict[str, str]:
    """`webhook-id`, `webhook-timestamp` and `webhook-signature` for `body`."""
    moment = now or datetime.now(UTC)
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": _signer(secret).sign(message_id, moment, body),
        "content-type": "application/json",
    }
