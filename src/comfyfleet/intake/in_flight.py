"""A request in flight under an idempotency key holds that key (the Stripe semantics of the
Comfy API v2): a concurrent retry, to this gateway process or another, is refused as
KeyInFlight until the first has its answer; a retry after that is answered as the first was.

The hold is a row of `idempotency_claims`, not a lock on a connection: a submit holding a
pooled connection while it needs another for its own work could starve the pool."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from comfyfleet.intake.errors import KeyInFlight
from comfyfleet.jobs.repository import JobRepository, KeyClaim

log = logging.getLogger(__name__)

# Far longer than a submit takes: only a holder that died keeps a key that long.
HOLD_SECONDS = 60.0
# A submit in flight is answered within a second or so; then the retry is replayed.
RETRY_AFTER = 1


@asynccontextmanager
async def holding(repository: JobRepository, scope: str, api_key_hash: str | None,
                  key: str | None) -> AsyncIterator[KeyClaim | None]:
    """Hold `key` (of the caller `api_key_hash`, among the keys of `scope`) while the block
    runs, unless a job the block stores under it takes the claim it yields along (see
    JobRepository.insert); KeyInFlight when another request holds it. No key: nothing to
    hold (None)."""
    if key is None:
        yield None
        return
    claim = await repository.claim_key(api_key_hash, scope, key, HOLD_SECONDS)
    if claim is None:
        raise KeyInFlight(f"a request under Idempotency-Key {key!r} is still in flight; "
                          f"retry once it is answered", RETRY_AFTER)
    try:
        yield claim
    finally:
        if claim.held:
            try:
                await repository.release_key(claim)
            except Exception:  # the database went away: the hold lapses after HOLD_SECONDS
                log.warning("could not let go of an Idempotency-Key; it is held for up to "
                            "%g s", HOLD_SECONDS, exc_info=True)
