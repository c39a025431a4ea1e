"""The Idempotency-Key header of the v2 contract, taken by the job submit and asset upload."""

from __future__ import annotations

from typing import Annotated

from fastapi import Header

IDEMPOTENCY_KEY_LENGTH = 255
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1,
                                              max_length=IDEMPOTENCY_KEY_LENGTH)]
