"""Standard Webhooks signatures (https://www.standardwebhooks.com): its v1 signature, made as
its own package's `Webhook.sign` makes it, over the body's bytes as they are sent."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from functools import lru_cache

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@lru_cache(maxsize=4)
def _key(secret: str) -> bytes:
    """A secret's key: its base64 after the prefix, decoded once, not for every delivery's
    signature (padded, as the package pads it, should it come unpadded)."""
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX) + "==")


def signed_headers(secret: str, message_id: str, body: bytes) -> dict[str, str]:
    """`webhook-id`, `webhook-timestamp` and `webhook-signature` for `body`: the HMAC-SHA256
    of `{webhook-id}.{webhook-timestamp}.{body}` with the secret's key, in base64. (The
    package's `sign` takes the body as text, which it encodes again: the same bytes, the
    body's UTF-8.)"""
    timestamp = str(int(time.time()))
    signed = hmac.new(_key(secret), f"{message_id}.{timestamp}.".encode() + body,
                      hashlib.sha256).digest()
    return {
        "webhook-id": message_id,
        "webhook-timestamp": timestamp,
        "webhook-signature": "v1," + base64.b64encode(signed).decode(),
        "content-type": "application/json",
    }
