"""Storage backends against real stores: moto's S3 server and a local directory."""

from __future__ import annotations

import asyncio
import datetime
import gc
import hashlib
import ipaddress
import re
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from aiobotocore.client import AioBaseClient
from aiobotocore.session import get_session
from aiohttp import web
from botocore.auth import S3SigV4Auth, _host_from_url
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from comfyfleet.settings import Settings
from comfyfleet.storage import LocalStorage, NotInStorage, S3Storage, StorageError
from comfyfleet.storage.s3 import PART_SIZE, _signed_put_headers
from tests.conftest import S3_CREDENTIALS
from tests.support import LOOPBACK, app_on_loopback, free_ports

CHUNK = 64 * 1024


async def pattern(size: int, fail_after: int | None = None) -> AsyncIterator[bytes]:
    """`size` bytes in small chunks, like a /view response; optionally breaking midway."""
    sent = 0
    while sent < size:
        if fail_after is not None and sent >= fail_after:
            raise ConnectionResetError("the backend went away mid-file")
        chunk = bytes((sent // CHUNK + i) % 251 for i in range(min(CHUNK, size - sent)))
        sent += len(chunk)
        yield chunk


async def digest(chunks: AsyncIterator[bytes]) -> str:
    hasher = hashlib.sha256()
    async for chunk in chunks:
        hasher.update(chunk)
    return hasher.hexdigest()


def s3_settings(endpoint: str, bucket: str) -> Settings:
    return Settings(_env_file=None, s3_bucket=bucket, s3_endpoint_url=endpoint,
                    aws_access_key_id=S3_CREDENTIALS["aws_access_key_id"],
                    aws_secret_access_key=S3_CREDENTIALS["aws_secret_access_key"])


@pytest.fixture
async def s3(s3_endpoint: str, s3_bucket: str) -> AsyncIterator[S3Storage]:
    storage = await S3Storage.open(s3_settings(s3_endpoint, s3_bucket))
    yield storage
    await storage.close()


@pytest.mark.parametrize("size", [0, 1000, PART_SIZE, 2 * PART_SIZE + 12345])
async def test_s3_stores_the_exact_bytes_single_put_or_multipart(
    s3: S3Storage, s3_endpoint: str, s3_bucket: str, size: int
) -> None:
    stored = await s3.put_stream("job/9_0.bin", pattern(size), "application/octet-stream")
    assert stored == size
    async with get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url=s3_endpoint, **S3_CREDENTIALS
    ) as client:
        obj = await client.get_object(Bucket=s3_bucket, Key="job/9_0.bin")
        assert obj["ContentLength"] == size
        assert await digest(obj["Body"].iter_chunks()) == await digest(pattern(size))
        # A multipart object's ETag names its part count.
        multipart = size > PART_SIZE
        assert ("-" in obj["ETag"]) is multipart


@pytest.mark.parametrize("key", ["job/9_0.png", "a prefix/with spaces+plus/\u00fc~_0.png"])
async def test_s3_whole_object_put_is_signed_as_aws_checks_it(
    s3: S3Storage, s3_endpoint: str, s3_bucket: str, key: str
) -> None:
    """The one PUT of a short output is signed by comfyfleet itself; the test server refuses
    any PUT whose signature or body hash AWS would refuse."""
    assert await s3.put_stream(key, pattern(1000), "image/png") == 1000
    async with get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url=s3_endpoint, **S3_CREDENTIALS
    ) as client:
        obj = await client.get_object(Bucket=s3_bucket, Key=key)
        assert obj["ContentType"] == "image/png"
        assert await digest(obj["Body"].iter_chunks()) == await digest(pattern(1000))
        # The check itself, with the SDK as the reference: its PUT passes, a wrong secret not.
        await client.put_object(Bucket=s3_bucket, Key=key, Body=b"sdk")
    wrong = S3_CREDENTIALS | {"aws_secret_access_key": "not-the-secret"}
    async with get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url=s3_endpoint, **wrong
    ) as client:
        with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
            await client.put_object(Bucket=s3_bucket, Key=key, Body=b"sdk")


async def test_s3_put_signed_with_a_wrong_secret_is_a_storage_error(
    s3_endpoint: str, s3_bucket: str
) -> None:
    settings = s3_settings(s3_endpoint, s3_bucket)
    settings.aws_secret_access_key = "not-the-secret"
    storage = await S3Storage.open(settings)
    try:
        with pytest.raises(StorageError, match=r"HTTP 403.*SignatureDoesNotMatch"):
            await storage.put_stream("job/9_0.png", pattern(1000), "image/png")
    finally:
        await storage.close()


@asynccontextmanager
async def recording_proxy() -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTP proxy on loopback that answers every request 200 itself and keeps its request
    line."""
    lines: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        lines.append(head.split("\r\n", 1)[0])
        length = next((int(line.split(":", 1)[1]) for line in head.split("\r\n")
                       if line.lower().startswith("content-length:")), 0)
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, LOOPBACK, 0)
    async with server:
        yield f"http://{LOOPBACK}:{server.sockets[0].getsockname()[1]}", lines


@pytest.mark.parametrize("bypassed", [False, True])
async def test_s3_put_goes_through_the_proxy_of_the_environment_as_the_sdk_would(
    s3_endpoint: str, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, bypassed: bool
) -> None:
    async with recording_proxy() as (proxy, lines):
        for name in ("NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", proxy)
        if bypassed:
            monkeypatch.setenv("NO_PROXY", LOOPBACK)
        storage = await S3Storage.open(s3_settings(s3_endpoint, s3_bucket))
        try:
            await storage.put_stream("job/9_0.png", pattern(1000), "image/png")
        finally:
            await storage.close()
    assert lines == ([] if bypassed else [f"PUT {s3_endpoint}/{s3_bucket}/job/9_0.png HTTP/1.1"])


async def test_s3_puts_share_a_connection_the_server_keeps_open(s3_bucket: str) -> None:
    """Whole-object PUTs reuse the client's connection while S3 keeps it open (the test and
    bench S3, moto, closes every one: werkzeug's server answers `Connection: close`)."""
    peers: list[int] = []

    async def stored(request: web.Request) -> web.Response:
        await request.read()
        assert request.transport is not None
        peers.append(request.transport.get_extra_info("peername")[1])
        return web.Response()

    app = web.Application()
    app.router.add_put("/{key:.*}", stored)
    async with app_on_loopback(app) as url:
        storage = await S3Storage.open(s3_settings(url, s3_bucket))
        try:
            for index in range(5):
                await storage.put_stream(f"job/{index}.png", pattern(1000), "image/png")
        finally:
            await storage.close()
    assert len(peers) == 5
    assert len(set(peers)) == 1


def private_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A CA made here (its certificate's file) and a certificate it signed for LOOPBACK (the
    certificate's and its key's files): no system or certifi bundle trusts it."""
    now = datetime.datetime.now(datetime.UTC)

    def issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
              issuer_key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False), critical=True)
        else:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(LOOPBACK))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    files = directory / "ca.pem", directory / "server.pem", directory / "server-key.pem"
    files[0].write_bytes(issue("comfyfleet test CA", ca_key, "comfyfleet test CA", ca_key, True)
                         .public_bytes(serialization.Encoding.PEM))
    files[1].write_bytes(issue(LOOPBACK, server_key, "comfyfleet test CA", ca_key, False)
                         .public_bytes(serialization.Encoding.PEM))
    files[2].write_bytes(server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return files


@asynccontextmanager
async def tls_front(plain: str, certificate: Path, key: Path,
                    handshakes: list[str | None]) -> AsyncIterator[str]:
    """An HTTPS endpoint on loopback that ends TLS with `certificate` and passes the bytes on
    to the plain HTTP server at `plain`, as a load balancer in front of MinIO would; each
    handshake begun (its server name) is appended to `handshakes`."""
    target = urlsplit(plain)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, key)
    context.sni_callback = lambda _socket, name, _context: handshakes.append(name)
    piping: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port)
        both = [asyncio.create_task(pipe(reader, up_writer)),
                asyncio.create_task(pipe(up_reader, writer))]
        piping.update(both)
        await asyncio.gather(*both)
        piping.difference_update(both)

    server = await asyncio.start_server(relay, LOOPBACK, 0, ssl=context)
    async with server:
        yield f"https://{LOOPBACK}:{server.sockets[0].getsockname()[1]}"
        for task in piping:
            task.cancel()


@pytest.mark.parametrize("trusted", [True, False])
async def test_s3_put_trusts_the_ca_bundle_the_sdk_does(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    trusted: bool
) -> None:
    """S3 behind a private CA named by AWS_CA_BUNDLE: the one PUT of a short output verifies
    TLS against it as the client's own calls (a multipart upload's) do, and without it fails
    at once."""
    ca, certificate, key = private_ca(tmp_path)
    for name in ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    if trusted:
        monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))
    handshakes: list[str | None] = []
    async with tls_front(s3_endpoint, certificate, key, handshakes) as https:
        storage = await S3Storage.open(s3_settings(https, s3_bucket))
        try:
            if trusted:
                assert await storage.put_stream("job/9_0.png", pattern(1000), "image/png") == 1000
                size = PART_SIZE + 1000
                assert await storage.put_stream("job/9_1.bin", pattern(size),
                                                "application/octet-stream") == size
                assert await storage.read("job/9_0.png") == b"".join(
                    [chunk async for chunk in pattern(1000)])
            else:
                with pytest.raises(StorageError, match="CERTIFICATE_VERIFY_FAILED"):
                    await storage.put_stream("job/9_0.png", pattern(1000), "image/png")
                assert len(handshakes) == 1  # not tried again: it would not verify then either
        finally:
            await storage.close()


@asynccontextmanager
async def tunnelling_proxy() -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTP proxy on loopback that takes only CONNECT, keeping its request line, and pipes
    the tunnel's bytes both ways."""
    lines: list[str] = []

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(256 * 1024):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        lines.append(head.split("\r\n", 1)[0])
        host, _, port = head.split(" ")[1].rpartition(":")
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(tunnel, LOOPBACK, 0)
    async with server:
        yield f"http://{LOOPBACK}:{server.sockets[0].getsockname()[1]}", lines


async def test_s3_put_over_https_tunnels_through_the_proxy_of_the_environment(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTPS_PROXY with S3 on https: the PUT goes through a CONNECT tunnel, TLS inside it
    verified for S3's own name, as the SDK's calls go."""
    ca, certificate, key = private_ca(tmp_path)
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CA_BUNDLE", str(ca))
    handshakes: list[str | None] = []
    async with tunnelling_proxy() as (proxy, lines), tls_front(
            s3_endpoint, certificate, key, handshakes) as https:
        monkeypatch.setenv("HTTPS_PROXY", proxy)
        storage = await S3Storage.open(s3_settings(https, s3_bucket))
        try:
            for index in range(2):
                assert await storage.put_stream(f"job/9_{index}.png", pattern(1000),
                                                "image/png") == 1000
        finally:
            await storage.close()
    # Two tunnels: moto closes every connection after its answer.
    assert lines == [f"CONNECT {urlsplit(https).netloc} HTTP/1.1"] * 2
    async with get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url=s3_endpoint, **S3_CREDENTIALS
    ) as client:
        stored = await client.get_object(Bucket=s3_bucket, Key="job/9_1.png")
        async with stored["Body"] as body:
            assert await body.read() == b"".join([chunk async for chunk in pattern(1000)])


async def test_s3_upload_broken_midway_leaves_no_object_and_no_open_upload(
    s3: S3Storage, s3_endpoint: str, s3_bucket: str
) -> None:
    with pytest.raises(ConnectionResetError):
        await s3.put_stream("job/broken.bin", pattern(3 * PART_SIZE, fail_after=2 * PART_SIZE),
                            "application/octet-stream")
    async with get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url=s3_endpoint, **S3_CREDENTIALS
    ) as client:
        listed = await client.list_objects_v2(Bucket=s3_bucket)
        assert listed.get("Contents", []) == []
        uploads = await client.list_multipart_uploads(Bucket=s3_bucket)
        assert uploads.get("Uploads", []) == []


async def test_s3_unreachable_is_a_storage_error(s3_bucket: str) -> None:
    storage = await S3Storage.open(s3_settings(f"http://{LOOPBACK}:{free_ports(1)}", s3_bucket))
    try:
        with pytest.raises(StorageError):
            await storage.check()
        with pytest.raises(StorageError):
            await storage.put_stream("k", pattern(10), "text/plain")
        with pytest.raises(StorageError) as unreachable:
            await storage.read("k")
        assert not isinstance(unreachable.value, NotInStorage)  # away, not gone: retried
    finally:
        await storage.close()


async def test_reading_what_is_not_stored_says_it_is_not_there(
    s3: S3Storage, tmp_path: Path
) -> None:
    for storage in (s3, LocalStorage(tmp_path / "out")):
        await storage.put_stream("job/inputs/image.png", pattern(10), "image/png")
        assert len(await storage.read("job/inputs/image.png")) == 10
        await storage.delete("job/inputs/image.png")
        with pytest.raises(NotInStorage):
            await storage.read("job/inputs/image.png")


async def test_local_storage_renames_into_place_and_leaves_nothing_on_failure(
    tmp_path: Path,
) -> None:
    storage = LocalStorage(tmp_path / "out")
    assert await storage.put_stream("job/3_0.png", pattern(300_000), "image/png") == 300_000
    assert (tmp_path / "out" / "job" / "3_0.png").stat().st_size == 300_000
    with pytest.raises(ConnectionResetError):
        await storage.put_stream("job/3_1.png", pattern(300_000, fail_after=100_000), "image/png")
    assert sorted(p.name for p in (tmp_path / "out" / "job").iterdir()) == ["3_0.png"]
    with pytest.raises(StorageError):
        await storage.put_stream("../escape.png", pattern(1), "image/png")


async def test_s3_delete_removes_the_object_and_a_missing_one_is_no_error(
    s3: S3Storage, s3_endpoint: str, s3_bucket: str
) -> None:
    for key in ("job/inputs/image.png", "job/3_0.png"):
        await s3.put_stream(key, pattern(10), "image/png")
    await s3.delete("job/inputs/image.png")
    await s3.delete("job/inputs/image.png")
    async with get_session().create_client(
        "s3", region_name="us-east-1", endpoint_url=s3_endpoint, **S3_CREDENTIALS
    ) as client:
        listed = await client.list_objects_v2(Bucket=s3_bucket)
    assert [item["Key"] for item in listed["Contents"]] == ["job/3_0.png"]


async def test_local_delete_removes_the_file_and_the_directories_it_empties(
    tmp_path: Path,
) -> None:
    root = tmp_path / "out"
    storage = LocalStorage(root)
    for key in ("a/inputs/image.png", "b/inputs/image.png", "b/3_0.png"):
        await storage.put_stream(key, pattern(10), "image/png")
    await storage.delete("a/inputs/image.png")
    await storage.delete("b/inputs/image.png")
    await storage.delete("b/inputs/image.png")  # gone already: no error
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["b", "b/3_0.png"]
    with pytest.raises(StorageError):
        await storage.delete("../escape.png")


def open_s3_clients() -> list[object]:
    """The aiobotocore clients alive in this process that were entered and never exited (a
    client's HTTP session holds its connections until then)."""
    gc.collect()
    return [client for client in gc.get_objects()
            if isinstance(client, AioBaseClient)
            and client._endpoint.http_session._sessions is not None]


@pytest.mark.parametrize("mistake", ["AWS_CA_BUNDLE", "S3_PUBLIC_URL"])
async def test_s3_open_with_a_bad_setting_fails_clearly_and_leaves_nothing_open(
    s3_endpoint: str, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    mistake: str
) -> None:
    """A setting that fails after the first client is entered (AWS_CA_BUNDLE naming a file
    that is not there, S3_PUBLIC_URL not a URL): opening the storage is a StorageError that
    names it (startup reports it), and the clients it had entered are closed."""
    settings = s3_settings(s3_endpoint, s3_bucket)
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    if mistake == "AWS_CA_BUNDLE":
        missing = tmp_path / "no-such-ca.pem"
        monkeypatch.setenv("AWS_CA_BUNDLE", str(missing))
        named = re.escape(str(missing))
    else:
        monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
        settings.s3_public_url = "::"
        named = "S3_PUBLIC_URL"
    before = {id(client) for client in open_s3_clients()}
    # The error's traceback, kept in `failed`, holds open's frames: a client they left open
    # stays alive to be seen, not collected unclosed.
    with pytest.raises(StorageError, match=named) as failed:
        await S3Storage.open(settings)
    assert [client for client in open_s3_clients() if id(client) not in before] == [], failed


@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzE/token+with/slashes=="])
@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9000/outputs/job/%C3%A4%20b%2Bc~.png",  # path style, a port
    "https://outputs.s3.eu-west-1.amazonaws.com/job/3_0.png",  # virtual host, default port
])
def test_a_put_is_signed_as_the_sdks_signer_signs_it(url: str, token: str | None) -> None:
    """The whole-object PUT's headers are signed here, not by botocore's S3SigV4Auth: the
    same headers, Authorization and all, with a session token too (the test S3 server, which
    checks signatures, knows no tokens). Ours are signed at the second theirs were (the
    X-Amz-Date signed): signed one after the other, the two straddled a second three times in
    a row on a loaded machine."""
    body = b"\x89PNG not really"
    credentials = ReadOnlyCredentials("testing", "testing", token)
    request = AWSRequest("PUT", url, {"Content-Type": "image/png  "}, body)
    S3SigV4Auth(credentials, "s3", "eu-west-1").add_auth(request)
    theirs = dict(request.headers.items())
    ours = _signed_put_headers(urlsplit(url).path, _host_from_url(url), "image/png  ",
                               hashlib.sha256(body).hexdigest(), credentials, "eu-west-1",
                               theirs["X-Amz-Date"])
    assert ours == theirs
    assert ("X-Amz-Security-Token" in ours) == (token is not None)
