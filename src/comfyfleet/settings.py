"""Configuration from the environment and `.env` (DESIGN §9).

Names are compatible with ComfyUI-server's `.env` (`COMFYUI_ENDPOINTS`, `RDB_*`, `S3_*`, `AWS_*`),
so its users can point comfyfleet at the same file.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import quote

from pydantic import Field, PositiveFloat, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MAX_WEBHOOK_CONCURRENCY = 1000


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Secrets (the database URL and password, S3 keys, the webhook secret, API keys, tokens)
    are left out of the settings' repr, so that printing or logging the settings shows none;
    every field marked `repr=False` is one."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    comfyui_endpoints: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # dns:<name>:<port>: every address of <name> is a backend (a headless Service, a scaled
    # Compose service), resolved again every DISCOVERY_INTERVAL seconds.
    comfyui_discovery: str | None = None
    discovery_interval: float = Field(default=10.0, gt=0)
    # host:port of the DNS server to ask; default: the system's (/etc/resolv.conf).
    discovery_nameserver: str | None = None

    database_url: str | None = Field(default=None, repr=False)
    rdb_username: str = "postgres"
    rdb_password: str = Field(default="", repr=False)
    rdb_host: str | None = None
    rdb_port: int = 5432
    rdb_name: str = "comfyfleet"
    data_dir: Path = Path(".data")

    storage: Literal["s3", "local"] | None = None
    s3_bucket: str | None = None
    s3_region_name: str = "us-east-1"
    s3_endpoint_url: str | None = None
    # The endpoint presigned URLs name, when clients reach the store under another name than
    # this service does (MinIO as http://minio:9000 inside Compose, http://localhost:9000 out).
    s3_public_url: str | None = None
    s3_prefix: str = ""
    s3_url_ttl: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    aws_access_key_id: str | None = Field(default=None, repr=False)
    aws_secret_access_key: str | None = Field(default=None, repr=False)
    aws_endpoint_url: str | None = None

    service_port: int = 8000
    # How clients reach this service (for local output URLs); default http://SERVICE_HOST:PORT.
    public_url: str | None = None
    service_host: str = "127.0.0.1"
    # Proxies whose X-Forwarded-For / -Proto are believed (uvicorn's option, comma-separated
    # addresses or "*"); from .env too, not only from the environment as uvicorn reads it.
    forwarded_allow_ips: str = "127.0.0.1"
    route_prefix: str = "/api/v1"
    # Jobs submitted to POST ROUTE_PREFIX in ComfyUI-server's request shape behave as there:
    # parameters the workflow does not take are ignored (a warning in the job), and the
    # callback body is ComfyUI-server's record (still signed). false: as POST /jobs.
    comfyui_server_compat: bool = True
    workflows_dir: Path = Path("workflows")

    # One or more whsec_ secrets, separated by commas or spaces; the first signs.
    webhook_secret: str | None = Field(default=None, repr=False)
    webhook_timeout: float = Field(default=15.0, gt=0)
    # At most a year: far past it, the time it gives a delivery overflows Python's dates.
    webhook_max_age: int = Field(default=24 * 3600, ge=0, le=366 * 24 * 3600)
    # Seconds between attempts; the last one repeats until WEBHOOK_MAX_AGE.
    webhook_retry_delays: Annotated[list[PositiveFloat], NoDecode] = Field(
        default_factory=lambda: [5.0, 30.0, 120.0, 600.0, 1800.0, 3600.0], min_length=1
    )
    # Each slot is a sender task for the process's life and a connection in flight: past a
    # thousand, a process runs out of the usual 1,024 file descriptors; run more processes.
    webhook_concurrency: int = Field(default=100, ge=1, le=MAX_WEBHOOK_CONCURRENCY)
    # (Above WEBHOOK_CONCURRENCY it never binds: the overall limit does.)
    webhook_concurrency_per_host: int = Field(default=20, ge=1, le=MAX_WEBHOOK_CONCURRENCY)
    allow_private_callbacks: bool = False

    # Bearer keys for the API (comma-separated); any key set here or in ADMIN_API_KEYS turns
    # authentication on. A key sees only the jobs it created; an admin key sees every job.
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    admin_api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list, repr=False)
    # A bearer token for /metrics; unset, /metrics is open.
    metrics_token: str | None = Field(default=None, repr=False)
    # Requests per minute per API key (per client address without keys); unset: no limit.
    rate_limit: int | None = Field(default=None, ge=1)
    # Wrong API keys one client address may send per minute; past them it gets 429 (whatever
    # key it sends) until the oldest is a minute old. Unset: no limit.
    max_auth_failures: int | None = Field(default=10, ge=1)
    # Each key's limits unless `comfyfleet keys update` gives it its own (keys of API_KEYS
    # always have these); without keys they are the one tenant's. Unset: no limit.
    # Jobs of one key waiting in the backlog; past it a submit gets 429 queue_full.
    max_queued_per_key: int | None = Field(default=None, ge=1)
    # Jobs of one key dispatched, running or uploading at once; the dispatcher skips the rest.
    max_concurrent_per_key: int | None = Field(default=None, ge=1)
    # Jobs waiting in the whole backlog; past it a submit gets 429 queue_full. Unset: no limit.
    max_queued: int | None = Field(default=None, ge=1)
    # Origins allowed to call the API from a browser (comma-separated, or *); unset: CORS off.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_format: Literal["text", "json"] = "text"
    # Seconds that stopping waits for uploads, webhook attempts and HTTP requests in flight.
    shutdown_timeout: float = Field(default=30.0, ge=0)

    max_inflight_per_backend: int = Field(default=2, ge=1)
    # Cache-aware placement: a backend may take later jobs before a job of the same priority to
    # keep to the model it has loaded, but no job is passed by more than this many: one passed
    # that often goes next, to the backend holding its model when waiting for that one is
    # sooner (the others take only jobs ahead of it meanwhile). Smaller costs throughput when
    # the models' shares of the backlog do not match the GPUs': bench.affinity (4 GPUs, 3
    # models) needs 22 passes at its seed 7 (1.49x the bound at 4, 1.17x at 16, 1.10x from
    # 24) and 31 at seed 2 (1.16x at 24, 1.10x at 32). 0 is strict FIFO (within a priority),
    # blind to the cache.
    affinity_window: int = Field(default=32, ge=0)
    # Free slots shared between tenants (API keys) by weight in estimated GPU-seconds; false:
    # one backlog for everyone, highest priority then oldest first.
    fair_share: bool = True
    max_attempts: int = Field(default=3, ge=1)
    # A backend unreachable this long loses its prompts: they are requeued to run elsewhere.
    backend_grace_seconds: float = Field(default=30.0, ge=0)
    # A prompt nothing was heard of for this long has its history checked (a silent socket).
    quiet_prompt_seconds: float = Field(default=10.0, gt=0)
    # Seconds between the dispatcher's passes of its own: a job arriving, a slot freeing or a
    # prompt's progress wakes it at once; this catches what another process changed.
    dispatch_interval: float = Field(default=2.0, gt=0)
    # Shared with the comfyui_nodes package on each backend: with it, comfyfleet deletes a
    # job's files there once they are stored. Unset: the files stay.
    comfyfleet_node_token: str | None = Field(default=None, repr=False)
    max_request_bytes: int = 16 * 1024 * 1024
    max_upload_bytes: int = 100 * 1024 * 1024
    # Seconds an image parameter's URL may take to fetch, whole (its size limit is
    # MAX_UPLOAD_BYTES).
    input_url_timeout: float = Field(default=30.0, gt=0)
    # Largest image input, by its header's width x height: 8192 x 8192.
    max_image_pixels: int = Field(default=8192 * 8192, ge=1)

    @field_validator("comfyui_endpoints", "api_keys", "admin_api_keys", "cors_origins",
                     "webhook_retry_delays", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        if value:
            to_asyncpg_url(value)  # refused at start, in one line that does not show it
        return value

    @field_validator("route_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        return value if not value or value.startswith("/") else "/" + value

    @cached_property
    def storage_kind(self) -> Literal["s3", "local"]:
        if self.storage:
            return self.storage
        return "s3" if self.s3_bucket else "local"

    @property
    def s3_endpoint(self) -> str | None:
        return self.s3_endpoint_url or self.aws_endpoint_url

    @property
    def webhook_secrets(self) -> list[str]:
        return self.webhook_secret.replace(",", " ").split() if self.webhook_secret else []

    @property
    def public_base_url(self) -> str:
        return (self.public_url or f"http://{self.service_host}:{self.service_port}").rstrip("/")

    def configured_database_url(self) -> str | None:
        """The external database as a SQLAlchemy asyncpg URL, or None for the embedded one."""
        if self.database_url:
            return to_asyncpg_url(self.database_url)
        if self.rdb_host:
            user = quote(self.rdb_username, safe="")
            password = quote(self.rdb_password, safe="")
            return (
                f"postgresql+asyncpg://{user}:{password}@{self.rdb_host}:{self.rdb_port}"
                f"/{self.rdb_name}"
            )
        return None


def to_asyncpg_url(url: str) -> str:
    """Accept the ordinary `postgresql://` (or `postgres://`) form and pick the asyncpg driver."""
    scheme, sep, rest = url.partition("://")
    if not sep:  # the URL itself is not shown: it may hold a password
        raise ValueError("not a database URL: expected postgresql://USER:PASSWORD@HOST:PORT/NAME")
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        return f"postgresql+asyncpg://{rest}"
    raise ValueError(f"unsupported database scheme {scheme!r}: use postgresql://")
