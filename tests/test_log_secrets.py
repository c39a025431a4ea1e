"""No secrets in logs (DESIGN §8): a `comfyfleet serve` logging at DEBUG through a job whose
outputs meet a missing S3 bucket, whose webhook fails once, whose database is reached with a
password and whose API needs a key, never writes the database password, the AWS keys, the
webhook secret, an API key or the node token; nor do the settings' repr and str."""

from __future__ import annotations

import asyncio
import base64
import signal
import sys
from pathlib import Path

import aiohttp
from aiobotocore.session import get_session

from comfyfleet.settings import Settings
from comfyfleet.sim import SimulatedComfyUI
from tests.conftest import S3_CREDENTIALS, StartReceiver
from tests.s3_server import UNIQUE_S3_CREDENTIALS
from tests.support import (
    LOOPBACK,
    free_ports,
    scrape,
    serve_env,
    value,
    wait_for_job,
    wait_until_answering,
)
from tests.webhook_support import Answer

DB_PASSWORD = "db-pass-6c1e0f9a77"
AWS_SECRET = UNIQUE_S3_CREDENTIALS["aws_secret_access_key"]  # the test S3 server checks it
API_KEY = "api-key-93c0d7e2b1"
ADMIN_KEY = "admin-key-5f1a8c6d04"
NODE_TOKEN = "node-token-7e2b9d4c13"
METRICS_TOKEN = "metrics-token-1d6f3a8e52"


def test_the_settings_show_no_secret() -> None:
    settings = Settings(
        _env_file=None, database_url=f"postgresql://app:{DB_PASSWORD}@db.internal/fleet",
        rdb_password=DB_PASSWORD, aws_access_key_id="AKIA-ID-0c4e2a",
        aws_secret_access_key=AWS_SECRET, webhook_secret="whsec_c2VjcmV0LXdlYmhvb2s=",
        api_keys=[API_KEY], admin_api_keys=[ADMIN_KEY],
        metrics_token=METRICS_TOKEN, comfyfleet_node_token=NODE_TOKEN, s3_bucket="outputs-bucket")
    secrets = [DB_PASSWORD, "AKIA-ID-0c4e2a", AWS_SECRET, "c2VjcmV0LXdlYmhvb2s=", API_KEY,
               ADMIN_KEY, METRICS_TOKEN, NODE_TOKEN]
    for shown in (repr(settings), str(settings), f"{settings!r}"):
        assert "outputs-bucket" in shown  # the rest is shown
        for secret in secrets:
            assert secret not in shown


async def test_no_secret_reaches_the_logs(
    settings: Settings, data_root: Path, s3_endpoint: str, receivers: StartReceiver
) -> None:
    assert settings.database_url is not None and settings.webhook_secret is not None
    # The embedded PostgreSQL trusts local connections: any password gets in, and is sent.
    database_url = settings.database_url.replace("postgres:@", f"postgres:{DB_PASSWORD}@")
    assert DB_PASSWORD in database_url
    secrets = [DB_PASSWORD, AWS_SECRET, settings.webhook_secret,
               settings.webhook_secret.removeprefix("whsec_"),
               base64.b64decode(settings.webhook_secret.removeprefix("whsec_")).hex(),
               API_KEY, ADMIN_KEY, NODE_TOKEN]
    bucket = "secrets-test"  # made only once the job has failed to store its output
    receiver = await receivers(Answer(500), Answer(200))
    port = free_ports(1)
    base = f"http://{LOOPBACK}:{port}"
    log = data_root / "serve.log"
    async with SimulatedComfyUI() as sim:
        env = serve_env(
            settings, data_root, port, DATABASE_URL=database_url, RDB_PASSWORD=DB_PASSWORD,
            COMFYUI_ENDPOINTS=f"{sim.url}#gpu", STORAGE="s3", S3_BUCKET=bucket,
            S3_ENDPOINT_URL=s3_endpoint,
            AWS_ACCESS_KEY_ID=UNIQUE_S3_CREDENTIALS["aws_access_key_id"],
            AWS_SECRET_ACCESS_KEY=AWS_SECRET, WEBHOOK_RETRY_DELAYS="0.2", API_KEYS=API_KEY,
            ADMIN_API_KEYS=ADMIN_KEY, COMFYFLEET_NODE_TOKEN=NODE_TOKEN)
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "comfyfleet", "--log-level", "DEBUG", "serve", env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=stderr)
        try:
            try:
                await wait_until_answering(base + "/healthz")
            except TimeoutError:
                raise AssertionError(f"serve did not start:\n{log.read_text()}") from None
            async with aiohttp.ClientSession(
                    headers={"Authorization": f"Bearer {API_KEY}"}) as http:
                api = base + settings.route_prefix
                body = {"workflow": "invert", "callback_url": receiver.url}
                async with http.post(f"{api}/jobs", json=body) as response:
                    assert response.status == 202, await response.text()
                    job_id = (await response.json())["id"]
                await wait_for_job(http, api, job_id, "uploading")
                async with asyncio.timeout(20):  # a failed write is logged with its error
                    while value(await scrape(http, base),  # noqa: ASYNC110
                                "comfyfleet_storage_errors_total") < 1:
                        await asyncio.sleep(0.1)  # polling /metrics: no local event to wait on
                async with get_session().create_client(
                    "s3", region_name="us-east-1", endpoint_url=s3_endpoint, **S3_CREDENTIALS
                ) as client:
                    await client.create_bucket(Bucket=bucket)
                await wait_for_job(http, api, job_id, "succeeded")
                await receiver.wait_for(2)
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                await asyncio.wait_for(process.wait(), 30)
    text = log.read_text()
    # The log did see all of it: the database, S3 (botocore's requests), the webhook.
    assert "comfyfleet ready" in text
    assert "NoSuchBucket" in text
    assert "HTTP 500" in text
    for secret in secrets:
        assert secret not in text
