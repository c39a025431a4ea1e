"""Presigned output URLs (DESIGN §6) as AWS accepts them: Signature Version 4 under the
bucket's region, lasting S3_URL_TTL, naming S3_PUBLIC_URL when clients reach the store under
another name. The S3 server checks them as AWS does (tests/s3_server.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from calendar import timegm
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from aiobotocore.session import get_session
from botocore.config import Config

from comfyfleet.settings import Settings
from comfyfleet.storage import S3Storage
from comfyfleet.storage.s3 import GetSigning
from tests.conftest import S3_CREDENTIALS
from tests.support import LOOPBACK

KEY = "job/3_0.png"
BODY = b"\x89PNG not really"


async def one_chunk() -> AsyncIterator[bytes]:
    yield BODY


async def fetch(url: str) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.read()


def query(url: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}


async def stored_url(s3_endpoint: str, bucket: str, **settings: Any) -> str:
    """The URL comfyfleet's storage gives for an object it has just stored."""
    fields: dict[str, Any] = {**S3_CREDENTIALS, **settings}
    storage = await S3Storage.open(
        Settings(_env_file=None, s3_bucket=bucket, s3_endpoint_url=s3_endpoint, **fields))
    try:
        await storage.put_stream(KEY, one_chunk(), "image/png")
        url = await storage.url(KEY)
    finally:
        await storage.close()
    assert url is not None
    return url


@pytest.fixture
async def europe_bucket(s3_endpoint: str) -> str:
    bucket = f"test-eu-{uuid.uuid4().hex[:12]}"
    async with get_session().create_client(
        "s3", region_name="eu-west-1", endpoint_url=s3_endpoint, **S3_CREDENTIALS
    ) as client:
        await client.create_bucket(
            Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    return bucket


async def test_the_test_s3_server_refuses_what_aws_refuses(
    s3_endpoint: str, s3_bucket: str
) -> None:
    """Without this, a test that fetches a presigned URL proves nothing."""
    async def presigned(signature_version: str, region: str = "us-east-1") -> str:
        async with get_session().create_client(
            "s3", region_name=region, endpoint_url=s3_endpoint, **S3_CREDENTIALS,
            config=Config(signature_version=signature_version),
        ) as client:
            url: str = await client.generate_presigned_url(
                "get_object", Params={"Bucket": s3_bucket, "Key": KEY}, ExpiresIn=60)
            await client.put_object(Bucket=s3_bucket, Key=KEY, Body=BODY)
            return url

    good = await presigned("s3v4")
    assert await fetch(good) == (200, BODY)
    status, body = await fetch(good.replace(LOOPBACK, "localhost"))
    assert (status, b"SignatureDoesNotMatch" in body) == (403, True)
    tampered = good[:-1] + ("0" if good[-1] != "0" else "1")
    status, body = await fetch(tampered)
    assert (status, b"SignatureDoesNotMatch" in body) == (403, True)
    status, body = await fetch(await presigned("s3"))  # Signature Version 2
    assert (status, b"Please use AWS4-HMAC-SHA256" in body) == (400, True)
    status, body = await fetch(await presigned("s3v4", region="eu-west-1"))
    assert (status, b"expecting 'us-east-1'" in body) == (400, True)


async def test_urls_are_signature_version_4_in_the_buckets_region_for_s3_url_ttl(
    s3_endpoint: str, europe_bucket: str
) -> None:
    url = await stored_url(s3_endpoint, europe_bucket, s3_region_name="eu-west-1",
                           s3_url_ttl=900)
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{s3_endpoint}/{europe_bucket}/{KEY}"
    params = query(url)
    assert params["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    access_key, _date, *scope = params["X-Amz-Credential"].split("/")
    assert access_key == S3_CREDENTIALS["aws_access_key_id"]
    assert scope == ["eu-west-1", "s3", "aws4_request"]
    assert params["X-Amz-Expires"] == "900"
    assert params["X-Amz-SignedHeaders"] == "host"
    assert not {"AWSAccessKeyId", "Signature", "Expires"} & set(params)
    assert await fetch(url) == (200, BODY)


async def test_a_url_is_refused_once_s3_url_ttl_has_passed(
    s3_endpoint: str, s3_bucket: str
) -> None:
    ttl = 3
    url = await stored_url(s3_endpoint, s3_bucket, s3_url_ttl=ttl)
    assert await fetch(url) == (200, BODY)
    signed_at = timegm(time.strptime(query(url)["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
    await asyncio.sleep(signed_at + ttl + 1 - time.time())  # waiting for the TTL itself
    status, body = await fetch(url)
    assert (status, b"Request has expired" in body) == (403, True)


async def test_urls_name_the_public_endpoint_and_verify_there(
    s3_endpoint: str, s3_bucket: str
) -> None:
    """The service reaches the store at 127.0.0.1, its clients at localhost: the URL names
    localhost, signed for that host."""
    public = s3_endpoint.replace(LOOPBACK, "localhost")
    url = await stored_url(s3_endpoint, s3_bucket, s3_public_url=public)
    assert url.startswith(f"{public}/{s3_bucket}/{KEY}?")
    assert await fetch(url) == (200, BODY)
    status, _ = await fetch(url.replace("localhost", LOOPBACK))
    assert status == 403


def expiry_of(url: str) -> float:
    """When AWS stops taking `url`: its signing time (a whole second) plus its lifetime."""
    fields = query(url)
    signed_at = timegm(time.strptime(fields["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
    return signed_at + int(fields["X-Amz-Expires"])


async def test_a_url_is_handed_out_again_until_half_its_lifetime_is_left(
    s3_endpoint: str, s3_bucket: str
) -> None:
    """A client polling a finished job gets the URL signed at its first poll (signing is a
    fifth of such a poll's CPU), with its true expiry, until half of S3_URL_TTL is left of
    it; then a new one."""
    ttl = 4
    fields: dict[str, Any] = {**S3_CREDENTIALS, "s3_url_ttl": ttl}
    storage = await S3Storage.open(
        Settings(_env_file=None, s3_bucket=s3_bucket, s3_endpoint_url=s3_endpoint, **fields))
    try:
        await storage.put_stream(KEY, one_chunk(), "image/png")
        first = await storage.signed_url(KEY)
        # The URL's own expiry is never before the one told.
        assert first.expires_at.timestamp() <= expiry_of(first.url)
        assert first.expires_at.timestamp() >= time.time() + ttl - 1
        # Signed anew, a URL of the next second would differ (X-Amz-Date).
        await asyncio.sleep(int(time.time()) + 1.01 - time.time())  # waiting for the clock
        assert time.time() < first.expires_at.timestamp() - ttl / 2  # still more than half
        assert await storage.signed_url(KEY) == first
        assert await storage.url(KEY) == first.url
        assert await fetch(first.url) == (200, BODY)
        await asyncio.sleep(first.expires_at.timestamp() - ttl / 2 + 0.01 - time.time())
        renewed = await storage.signed_url(KEY)
        assert renewed.url != first.url
        assert renewed.expires_at > first.expires_at
        assert renewed.expires_at.timestamp() <= expiry_of(renewed.url)
        assert await fetch(renewed.url) == (200, BODY)
    finally:
        await storage.close()


@pytest.mark.parametrize(("bucket", "endpoint"), [
    ("outputs-eu", None),  # AWS: the bucket's regional virtual host
    ("outputs.eu", None),  # a dotted name: path style on the regional host
    ("outputs-eu", f"http://{LOOPBACK}:9"),  # an endpoint of its own (never connected to)
])
async def test_a_url_is_the_one_the_sdk_presigns(bucket: str, endpoint: str | None) -> None:
    """Signed without the SDK's call, a URL is still exactly the SDK's: the same URL, key
    quoted alike, signed in the same second. Nothing connects: signing is local."""
    fields: dict[str, Any] = {**S3_CREDENTIALS, "s3_region_name": "eu-west-1"}
    storage = await S3Storage.open(Settings(_env_file=None, s3_bucket=bucket,
                                            s3_endpoint_url=endpoint, s3_url_ttl=600, **fields))
    addressing = "path" if endpoint or "." in bucket else "virtual"
    try:
        async with get_session().create_client(
                "s3", region_name="eu-west-1", endpoint_url=endpoint, **S3_CREDENTIALS,
                config=Config(signature_version="s3v4", s3={"addressing_style": addressing}),
        ) as sdk:
            for attempt in range(3):  # until both fall in one second (X-Amz-Date)
                key = f"job/ä b+c~({attempt}).png"
                ours = (await storage.signed_url(key)).url
                theirs = await sdk.generate_presigned_url(
                    "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=600)
                if query(ours)["X-Amz-Date"] == query(theirs)["X-Amz-Date"]:
                    break
    finally:
        await storage.close()
    assert ours == theirs
    assert isinstance(storage._get_signing, GetSigning)  # signed here, not by the SDK's call


async def test_a_url_signed_with_a_session_token_is_the_one_the_sdk_presigns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Credentials with a session token (an assumed role, a shared credentials file): the
    token is signed into the URL as the SDK signs it, and the URL is still signed here."""
    token = "FwoGZXIvYXdzE/token+with/slashes=="
    credentials = tmp_path / "credentials"
    credentials.write_text("[default]\naws_access_key_id = testing\n"
                           "aws_secret_access_key = testing\n"
                           f"aws_session_token = {token}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    storage = await S3Storage.open(Settings(_env_file=None, s3_bucket="outputs-eu",
                                            s3_region_name="eu-west-1", s3_url_ttl=600))
    try:
        async with get_session().create_client(
                "s3", region_name="eu-west-1", aws_access_key_id="testing",
                aws_secret_access_key="testing", aws_session_token=token,
                config=Config(signature_version="s3v4", s3={"addressing_style": "virtual"}),
        ) as sdk:
            for attempt in range(3):  # until both fall in one second (X-Amz-Date)
                key = f"job/{attempt}.png"
                ours = (await storage.signed_url(key)).url
                theirs = await sdk.generate_presigned_url(
                    "get_object", Params={"Bucket": "outputs-eu", "Key": key}, ExpiresIn=600)
                if query(ours)["X-Amz-Date"] == query(theirs)["X-Amz-Date"]:
                    break
    finally:
        await storage.close()
    assert query(ours)["X-Amz-Security-Token"] == token
    assert ours == theirs
    assert isinstance(storage._get_signing, GetSigning)  # signed here, not by the SDK's call
