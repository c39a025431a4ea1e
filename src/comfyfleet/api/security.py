"""API keys, per-key job visibility and rate limits (DESIGN §8).

With API_KEYS or ADMIN_API_KEYS set, or a live key made with `comfyfleet keys create`, every
route under the prefix needs `Authorization: Bearer <key>`. Keys are kept and compared only as
SHA-256 digests: a job records the digest of the key that submitted it, and only that key (or
an admin key) sees it.
"""

from __future__ import annotations

import hmac
import math
import time
import uuid
from typing import Annotated, NamedTuple

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from limits import RateLimitItem, RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import MovingWindowRateLimiter

from comfyfleet.api.body_limit import BodyLimitMiddleware
from comfyfleet.api.errors import ApiError
from comfyfleet.api_keys import KeyLimits, KeyStore, LiveKey, key_hash
from comfyfleet.jobs.models import Job
from comfyfleet.services import Services
from comfyfleet.settings import Settings


class Caller(NamedTuple):
    """Who is calling: the digest of their key (None when keys are off), what they see,
    their tenant's limits and their key's default callback URL. (A tuple: one is made for
    every request, and a frozen dataclass set each field through object.__setattr__.)"""

    key_hash: str | None
    sees_all: bool
    address: str
    limits: KeyLimits
    callback_url: str | None = None  # the key's default, for its jobs that name none

    def sees(self, job: Job) -> bool:
        return self.sees_all or job.api_key_hash == self.key_hash

    @property
    def owner_filter(self) -> str | None:
        """The key whose jobs a listing shows; None: every job."""
        return None if self.sees_all else self.key_hash


class Guard:
    """The keys (configured, and kept in the database) and the rate limit of one app."""

    def __init__(self, settings: Settings) -> None:
        # The database's keys, once the app's lifespan has opened the database.
        self.store: KeyStore | None = None
        # digest -> admin; a key listed in both is an admin key.
        self._keys = {key_hash(key): False for key in settings.api_keys}
        self._keys.update({key_hash(key): True for key in settings.admin_api_keys})
        # How listings (GET /tenants, metrics) name the configured keys: by where they are
        # set, never by the key.
        self.names = {key_hash(key): f"API_KEYS#{n}"
                      for n, key in enumerate(settings.api_keys, 1)}
        self.names.update({key_hash(key): f"ADMIN_API_KEYS#{n}"
                           for n, key in enumerate(settings.admin_api_keys, 1)})
        # The limits of configured keys, of database keys without their own, and without keys.
        self.defaults = KeyLimits(max_concurrent=settings.max_concurrent_per_key,
                                  max_queued=settings.max_queued_per_key)
        self._rate: RateLimitItem | None = (
            RateLimitItemPerMinute(settings.rate_limit) if settings.rate_limit else None)
        self._auth_failures: RateLimitItem | None = (
            RateLimitItemPerMinute(settings.max_auth_failures)
            if settings.max_auth_failures else None)
        # Per process: several processes behind a load balancer each allow the full rate.
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    async def identify(self, key: str | None, address: str) -> Caller:
        """Not knowing the keys (the database away), let nobody in: its error goes up."""
        if not self._keys and (self.store is None or not await self.store.any_live()):
            return Caller(key_hash=None, sees_all=True, address=address, limits=self.defaults)
        if key is None:
            raise _unauthorized("missing_api_key",
                                "this API needs an `Authorization: Bearer <key>` header")
        await self._refuse_guessing(address)
        digest = key_hash(key)
        live: LiveKey | None = None
        # Every configured digest is compared, so the time taken says nothing about which
        # matched. The database finds its keys by digest: a digest's timing reveals nothing
        # usable about the key.
        for known, is_admin in self._keys.items():
            if hmac.compare_digest(known, digest):
                live = LiveKey(is_admin, self.defaults)
        if live is None and self.store is not None:
            live = await self.store.lookup(digest)
        if live is None:
            if self._auth_failures is not None:
                await self._limiter.hit(self._auth_failures, f"auth-failures:{address}")
            raise _unauthorized("invalid_api_key", "the API key is not valid",
                                challenge='Bearer error="invalid_token"')
        return Caller(key_hash=digest, sees_all=live.admin, address=address,
                      limits=live.limits.or_defaults(self.defaults),
                      callback_url=live.callback_url)

    async def all_names(self) -> dict[str, str]:
        """digest -> name of every key, configured or in the database (revoked or not), as
        GET /tenants names them."""
        found = dict(self.names)
        for key in await self.store.all() if self.store is not None else ():
            found.setdefault(key.key_hash, key.name)
        return found

    async def digest_of(self, name: str) -> str | None:
        """The digest of the key named `name`; None when no key has that name."""
        for digest, known in (await self.all_names()).items():
            if known == name:
                return digest
        return None

    def admin(self, digest: str) -> bool:
        """Whether the configured key with this digest is an admin key."""
        return self._keys[digest]

    async def _refuse_guessing(self, address: str) -> None:
        """429 for an address that sent MAX_AUTH_FAILURES wrong keys in the last minute,
        whatever key it sends now: were a right key let through, its answer would tell a
        guesser that it found one."""
        item = self._auth_failures
        identity = f"auth-failures:{address}"
        if item is not None and not await self._limiter.test(item, identity):
            retry_after = await self._retry_after(item, identity)
            raise _too_many("auth_failures",
                            f"over {item.amount} wrong API keys a minute from this address; "
                            f"retry in {retry_after} s", retry_after)

    async def throttle(self, caller: Caller) -> None:
        """429 with Retry-After when the caller is over RATE_LIMIT requests per minute."""
        if self._rate is None:
            return
        identity = caller.key_hash or f"address:{caller.address}"
        if await self._limiter.hit(self._rate, identity):
            return
        retry_after = await self._retry_after(self._rate, identity)
        raise _too_many("rate_limited", f"over {self._rate.amount} requests per minute; "
                                        f"retry in {retry_after} s", retry_after)

    async def _retry_after(self, item: RateLimitItem, identity: str) -> int:
        """Seconds until `identity` is under `item` again."""
        stats = await self._limiter.get_window_stats(item, identity)
        return max(1, math.ceil(stats.reset_time - time.time()))


def _too_many(type_: str, message: str, retry_after: int) -> ApiError:
    return ApiError(429, type_, message, retry_after=retry_after,
                    headers={"Retry-After": str(retry_after)})


def _unauthorized(type_: str, message: str, challenge: str = "Bearer") -> ApiError:
    return ApiError(401, type_, message, headers={"WWW-Authenticate": challenge})


# auto_error=False: a missing or malformed header gets our JSON 401, not FastAPI's 403.
_bearer = HTTPBearer(auto_error=False, description="An API key from API_KEYS")


async def authenticate(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """Router dependency of every route under the prefix: who is calling, within their rate."""
    return await _identified(request, credentials.credentials if credentials else None)


CallerDep = Annotated[Caller, Depends(authenticate)]


async def caller_of(request: Request) -> Caller:
    """`authenticate` for a request answered outside FastAPI's dependency solving (a status
    poll, a submit): the same header read as `_bearer` reads it (`bearer_key`), the same
    answers."""
    return await _identified(request, bearer_key(request.headers.get("authorization")))


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header's value, as FastAPI's HTTPBearer
    reads it (its own split, the scheme in any case), without the credentials model it
    builds; None for a missing header, another scheme, or no key."""
    scheme, key = get_authorization_scheme_param(authorization)
    return key if scheme.lower() == "bearer" and key else None


async def _identified(request: Request, key: str | None) -> Caller:
    """Who sends `key` (None: no key) from the request's address, within their rate."""
    guard = request.app.state.guard
    assert isinstance(guard, Guard)
    client = request.scope.get("client")  # (host, port), as `request.client` has it
    caller = await guard.identify(key, client[0] if client else "unknown")
    await guard.throttle(caller)
    return caller


async def require_admin(caller: CallerDep) -> Caller:
    """Changing the fleet or the catalog (adding a backend makes the gateway connect to any
    URL) is for admin keys; with keys off, everyone is."""
    if not caller.sees_all:
        raise ApiError(403, "admin_only", "this needs an admin API key (ADMIN_API_KEYS)")
    return caller


AdminDep = Depends(require_admin)


def install_security(app: FastAPI, settings: Settings) -> None:
    """The keys and rate limit (used by `authenticate`), the body size limits, and CORS when
    CORS_ORIGINS allows browsers in."""
    app.state.guard = Guard(settings)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes,
                       max_upload_bytes=settings.max_upload_bytes)
    if settings.cors_origins:
        # Added last, so it is outermost: error answers (401, 413, 429) carry its headers too.
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key",
                           "Last-Event-ID"],
            expose_headers=["Retry-After", "Location"],
        )


async def visible_job(svc: Services, caller: Caller, job_id: uuid.UUID, *,
                      ended_here: bool = False, prompt: bool = True) -> Job:
    """The job, if the caller may see it; another key's job is as absent as a missing one.
    With `ended_here` (a caller that does not show its client_task_id), a job this process
    ended, or is ending, is taken as it ended it, not read (JobRepository.ended_here).
    Without `prompt` (a caller that uses no more of the prompt than its node ids), a job read
    is read as a v2 poll shows it (JobRepository.shown)."""
    job = (await svc.repository.ended_here(job_id) if ended_here else None) \
        or await (svc.repository.get if prompt else svc.repository.shown)(job_id)
    if job is None or not caller.sees(job):
        raise ApiError(404, "job_not_found", f"no job {job_id}")
    return job
