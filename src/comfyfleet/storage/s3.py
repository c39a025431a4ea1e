"""Outputs in S3 (or MinIO, R2, ...) through aiobotocore.

A stream is cut into parts of PART_SIZE: a short one becomes one PUT, a longer one a
multipart upload that holds at most PART_CONCURRENCY parts in memory (about 32 MiB) and is
aborted on failure, so memory stays flat whatever the size and no half-written object is left
behind.

The one PUT of a short stream (every image a job makes) is signed as botocore's own Signature
Version 4 signer signs it and sent on the lean HTTP client (http_client.py), to the URL the
client itself would use: the client's call cost 1.1-1.3 ms more CPU per object, in its event
hooks, request building and user agent (bench/RESULTS.md, "the rest of the service's CPU per
job"), and aiohttp's request 0.1-0.2 ms more than the lean one. A presigned URL likewise:
botocore's query signer on the URL, region and service the signing client uses, checked once
against a URL the client signs (its call, endpoint rules and all, cost twice the CPU).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import itertools
import logging
import math
import random
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from functools import cached_property, lru_cache
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit
from urllib.request import getproxies, proxy_bypass

from aiobotocore.session import AioSession, get_session
from botocore.auth import _host_from_url
from botocore.config import Config
from botocore.credentials import ReadOnlyCredentials
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from comfyfleet.http_client import CertificateError, HttpClient, HttpError, Timeouts
from comfyfleet.settings import Settings
from comfyfleet.storage.base import NotInStorage, SignedUrl, StorageError

log = logging.getLogger(__name__)

PART_SIZE = 8 * 1024 * 1024  # S3's minimum part size is 5 MiB
PART_CONCURRENCY = 4
# A presigned URL is handed out again while more than this share of S3_URL_TTL is left of it:
# signing is about a fifth of the CPU of a poll of a finished job, and a client polling one
# would otherwise have every poll signed afresh.
REUSE_WHILE_LEFT = 0.5
# The objects whose URLs are kept (the most recently signed): about 0.5 KiB each.
SIGNED_URLS_KEPT = 4096
# A whole-object PUT is tried this often, as the client's standard retry mode tries a call:
# again after a lost connection, a timeout or an answer that S3 is busy or failing, waiting
# a random share of 1, 2, ... seconds; its connections and time limits are the client's too.
PUT_ATTEMPTS = 3
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_CONNECTIONS = 10
PUT_TIMEOUTS = Timeouts(connect=60.0, read=60.0)
ERROR_SNIPPET_BYTES = 1024
_URL_PROBE_KEY = "comfyfleet-url-probe"


@dataclass(frozen=True)
class GetSigning:
    """How the signing client presigns a GET, as read from a URL it signed."""

    object_url: str  # an object's URL up to its key, which is appended
    region: str  # the signature's
    service: str  # the signature's

    @cached_property
    def host(self) -> str:
        """The Host header the signature covers, as botocore derives it from the URL."""
        host: str = _host_from_url(self.object_url)
        return host

    @cached_property
    def path(self) -> str:
        """The path of `object_url`, to which a key is appended (quoted)."""
        return urlsplit(self.object_url).path


class Presigner(Enum):
    """Who presigns a GET if not botocore's query signer by a GetSigning."""

    # The signing client's own call: while a GetSigning is being read and checked, and for
    # good once one failed the check (a URL signed by it differed from the client's).
    CLIENT = "client"


class S3Storage:
    def __init__(self, client: Any, signer: Any, bucket: str, url_ttl: int,
                 exit_stack: AsyncExitStack, http: HttpClient):
        self._client = client
        self._signer = signer
        self.bucket = bucket
        self.url_ttl = url_ttl
        self._exit_stack = exit_stack
        self._signed: dict[str, SignedUrl] = {}  # by key, oldest signed first
        self._http = http
        # Where the client would PUT an object (its key appended), and the proxy it would go
        # through (HTTP(S)_PROXY, NO_PROXY), known at the first PUT.
        self._put_url: str | None = None
        self._put_host = ""  # the Host header a PUT signs, with _put_url
        self._put_path = ""  # _put_url's path, which a PUT's signature covers
        self._proxy: str | None = None
        # How a GET is presigned: None until the first URL, which reads and checks it.
        self._get_signing: GetSigning | Presigner | None = None

    @classmethod
    async def open(cls, settings: Settings) -> S3Storage:
        if not settings.s3_bucket:
            raise StorageError("S3_BUCKET is not set")
        session = get_session()
        # What is opened before a failure (a client entered, a file unreadable) is closed on
        # the way out; only a storage that opened whole keeps it.
        async with AsyncExitStack() as stack:
            credentials = {"region_name": settings.s3_region_name,
                           "aws_access_key_id": settings.aws_access_key_id,
                           "aws_secret_access_key": settings.aws_secret_access_key}
            client = await _enter_client(
                stack, session, "S3_ENDPOINT_URL or AWS_ENDPOINT_URL, S3_REGION_NAME",
                endpoint_url=settings.s3_endpoint, **credentials,
                config=Config(retries={"max_attempts": 3, "mode": "standard"}))
            # Presigned URLs are signed by a client of their own, which never connects: for
            # the endpoint clients reach, with Signature Version 4 (AWS refuses version 2 for
            # buckets made since 2020) under the bucket's region. On AWS itself, the bucket's
            # regional host (a new bucket's global name redirects, which breaks the signature),
            # unless its name has dots, which no certificate of a virtual host covers.
            public = settings.s3_public_url or settings.s3_endpoint
            addressing = "path" if public or "." in settings.s3_bucket else "virtual"
            signer = await _enter_client(
                stack, session, "S3_PUBLIC_URL, S3_REGION_NAME", endpoint_url=public,
                **credentials,
                config=Config(signature_version="s3v4", s3={"addressing_style": addressing}))
            # The PUT's TLS is the client's: its CA bundle as botocore resolved it (verify=,
            # AWS_CA_BUNDLE or ca_bundle in the config, REQUESTS_CA_BUNDLE, else certifi's),
            # and its client certificate, built by the client's own HTTP session, which reads
            # the files, off the event loop.
            tls_files = client._endpoint.http_session
            try:
                tls, _ = await asyncio.to_thread(tls_files._build_ssl_contexts, None)
            except OSError as exc:  # ssl's error names no file: say which were read
                named = ", ".join(name for name in (
                    tls_files._verify, tls_files._cert_file, tls_files._key_file)
                    if isinstance(name, str)) or "the CA bundle"
                raise StorageError(f"S3 TLS: cannot load {named}: {exc}") from exc
            http = HttpClient(limit=MAX_CONNECTIONS, tls=tls)
            stack.push_async_callback(http.close)
            return cls(client, signer, settings.s3_bucket, settings.s3_url_ttl, stack.pop_all(),
                       http)

    async def put_stream(self, key: str, chunks: AsyncIterator[bytes], content_type: str) -> int:
        try:
            return await self._upload(key, chunks, content_type)
        except (BotoCoreError, ClientError, ValueError, HttpError, TimeoutError) as exc:
            # ValueError: a retried part whose body the HTTP layer already closed; the
            # collector's own retry starts the whole upload again.
            raise StorageError(f"S3 upload of {key}: {exc}") from exc

    async def _upload(self, key: str, chunks: AsyncIterator[bytes], content_type: str) -> int:
        parts = _Parts(chunks)
        first = await parts.next()
        if first is None:  # an empty stream: an empty object
            first = io.BytesIO()
        second = await parts.next() if _size(first) == PART_SIZE else None
        if second is None:
            with first.getbuffer() as whole:  # a view, not a copy
                await self._put(key, whole, content_type)
                return whole.nbytes
        created = await self._client.create_multipart_upload(
            Bucket=self.bucket, Key=key, ContentType=content_type
        )
        upload_id: str = created["UploadId"]
        etags: dict[int, str] = {}
        size = 0
        # Memory per upload is bounded by the parts that exist at once: a slot is taken
        # before the next part is read, and only the part's own task keeps it.
        slots = asyncio.Semaphore(PART_CONCURRENCY)
        uploads: list[asyncio.Task[None]] = []
        read_ahead = [first, second]
        del first, second
        try:
            for number in itertools.count(1):
                await slots.acquire()
                failed = next((t for t in uploads if t.done() and t.exception()), None)
                if failed is not None:
                    await failed  # raises its error: stop reading the source early
                body = read_ahead.pop(0) if read_ahead else await parts.next()
                if body is None:
                    break
                size += _size(body)
                uploads.append(asyncio.create_task(
                    self._put_part(key, upload_id, number, body, etags, slots)))
                del body
            await asyncio.gather(*uploads)
            await self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n]}
                                           for n in sorted(etags)]},
            )
            return size
        except BaseException:
            for task in uploads:
                task.cancel()
            await asyncio.gather(*uploads, return_exceptions=True)
            await self._abort(key, upload_id)
            raise

    async def _put(self, key: str, body: memoryview, content_type: str) -> None:
        """One PUT of the whole object, signed as the client signs it (the body's SHA-256 in
        the signature, which S3 checks)."""
        url, path = await self._object_url(key)
        payload_hash = hashlib.sha256(body).hexdigest()
        for attempt in range(1, PUT_ATTEMPTS + 1):
            # The client's own credentials, refreshed as it refreshes them.
            credentials = self._client._get_credentials()
            if credentials is None:
                raise NoCredentialsError()
            headers = _signed_put_headers(
                path, self._put_host, content_type, payload_hash,
                await credentials.get_frozen_credentials(), self._client.meta.region_name,
                _amz_date(int(time.time())))
            try:
                async with self._http.request("PUT", url, body=body, headers=headers,
                                              timeouts=PUT_TIMEOUTS,
                                              proxy=self._proxy) as response:
                    if response.status < 300:
                        await response.read()
                        return
                    error = await response.read(ERROR_SNIPPET_BYTES)
                    failure = f"HTTP {response.status}: " + " ".join(
                        error.decode(errors="replace").split())  # S3's XML, on one line
                    if response.status not in RETRYABLE_STATUSES:
                        raise StorageError(f"S3 upload of {key}: {failure}")
            except CertificateError as exc:
                # A certificate that did not verify will not on the next try either.
                raise StorageError(f"S3 upload of {key}: {exc}") from exc
            except HttpError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            if attempt < PUT_ATTEMPTS:
                await asyncio.sleep(random.uniform(0, 2 ** (attempt - 1)))
        raise StorageError(f"S3 upload of {key}: {failure}")

    async def _object_url(self, key: str) -> tuple[str, str]:
        """The URL the client would PUT `key` to, and its path: its endpoint and addressing,
        read once from a URL it presigns (which never connects)."""
        if self._put_url is None:
            probe: str = await self._client.generate_presigned_url(
                "put_object", Params={"Bucket": self.bucket, "Key": _URL_PROBE_KEY})
            url = probe.partition("?")[0]
            if not url.endswith("/" + _URL_PROBE_KEY):
                raise StorageError(f"S3: an object's URL has an unexpected shape: {url}")
            # As botocore finds it, once.
            parts = urlsplit(url)
            proxy = None if proxy_bypass(parts.hostname or "") else getproxies().get(parts.scheme)
            if proxy and "://" not in proxy:
                proxy = "http://" + proxy
            self._proxy = proxy
            self._put_url = url.removesuffix(_URL_PROBE_KEY)
            self._put_host = _host_from_url(url)
            self._put_path = urlsplit(self._put_url).path
        quoted = quote(key, safe="/~")
        return self._put_url + quoted, self._put_path + quoted

    async def _abort(self, key: str, upload_id: str) -> None:
        try:
            await self._client.abort_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id
            )
        except (BotoCoreError, ClientError) as exc:
            # The upload's own error matters more; a bucket lifecycle rule reaps the leftover.
            log.warning("could not abort multipart upload of %s: %s", key, exc)

    async def _put_part(
        self, key: str, upload_id: str, number: int, body: io.BytesIO, etags: dict[int, str],
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            result = await self._client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body
            )
            etags[number] = result["ETag"]
        finally:
            slots.release()

    async def read(self, key: str) -> bytes:
        try:
            response = await self._client.get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as body:
                data: bytes = await body.read()
                return data
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchKey":
                raise NotInStorage(f"S3 read of {key}: {exc}") from exc
            raise StorageError(f"S3 read of {key}: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 read of {key}: {exc}") from exc

    async def delete(self, key: str) -> None:
        self._signed.pop(key, None)
        try:
            await self._client.delete_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"S3 delete of {key}: {exc}") from exc

    async def url(self, key: str) -> str | None:
        return (await self.signed_url(key)).url

    async def signed_url(self, key: str) -> SignedUrl:
        """The URL signed last for `key` while it has more than REUSE_WHILE_LEFT of its
        lifetime left, else one signed now."""
        now = time.time()
        signed = self._signed.get(key)
        if signed is not None and (
                signed.expires_at.timestamp() - now > self.url_ttl * REUSE_WHILE_LEFT):
            return signed
        # The signature's own time (X-Amz-Date) is a whole second, taken after this one:
        # the URL lives at least until then.
        expires_at = datetime.fromtimestamp(math.floor(now) + self.url_ttl, UTC)
        if self._get_signing is None:
            await self._check_get_signing()
        signing = self._get_signing
        url = await self._presign_get(key, signing) if isinstance(signing, GetSigning) \
            else await self._client_presign_get(key)
        signed = SignedUrl(url, expires_at)
        self._signed.pop(key, None)
        self._signed[key] = signed
        if len(self._signed) > SIGNED_URLS_KEPT:
            del self._signed[next(iter(self._signed))]
        return signed

    async def _client_presign_get(self, key: str) -> str:
        url: str = await self._signer.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=self.url_ttl)
        return url

    async def _presign_get(self, key: str, signing: GetSigning) -> str:
        """The URL the signing client would presign for a GET of `key`, by `signing`: what
        botocore's S3SigV4QueryAuth writes for it, written here (see _canonical_request)."""
        credentials = self._signer._get_credentials()  # refreshed as the client refreshes them
        if credentials is None:
            raise NoCredentialsError()
        frozen = await credentials.get_frozen_credentials()
        stamp = _amz_date(int(time.time()))
        scope, query, canonical_query = _presigned_query(
            stamp, frozen.access_key, frozen.token, signing.region, signing.service,
            self.url_ttl)
        quoted = quote(key, safe="/~")
        signature = _signature(frozen.secret_key, scope, stamp, _canonical_request(
            "GET", signing.path + quoted, canonical_query, {"host": signing.host},
            "UNSIGNED-PAYLOAD"))
        return f"{signing.object_url}{quoted}?{query}&X-Amz-Signature={signature}"

    async def _check_get_signing(self) -> None:
        """Read how the signing client presigns a GET from a URL it signs, and keep it only
        if the URL signed here in the same second is that very URL."""
        self._get_signing = Presigner.CLIENT  # meanwhile, and unless the check passes
        for _ in range(3):  # until both are signed within one second (X-Amz-Date)
            theirs = await self._client_presign_get(_URL_PROBE_KEY)
            url, _, query = theirs.partition("?")
            scope = parse_qs(query).get("X-Amz-Credential", [""])[0].split("/")
            if not url.endswith("/" + _URL_PROBE_KEY) or len(scope) != 5:
                break
            signing = GetSigning(url.removesuffix(_URL_PROBE_KEY), region=scope[2],
                                 service=scope[3])
            ours = await self._presign_get(_URL_PROBE_KEY, signing)
            if ours == theirs:
                self._get_signing = signing
                return
            if parse_qs(ours.partition("?")[2]).get("X-Amz-Date") == \
                    parse_qs(query).get("X-Amz-Date"):
                break
        log.info("S3: presigned URLs are signed by the client: its URLs are not as expected "
                 "(%s)", theirs.partition("?")[0])

    async def check(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise StorageError(f"S3 bucket {self.bucket}: {exc}") from exc

    async def close(self) -> None:
        await self._exit_stack.aclose()


# SigV4's timestamp (X-Amz-Date), UTC.
AMZ_DATE = "%Y%m%dT%H%M%SZ"


@lru_cache(maxsize=2)
def _amz_date(second: int) -> str:
    """X-Amz-Date of the Unix time `second`: written once a second, not at every signature."""
    return time.strftime(AMZ_DATE, time.gmtime(second))


@lru_cache(maxsize=4)
def _presigned_query(stamp: str, access_key: str, token: str | None, region: str,
                     service: str, expires: int) -> tuple[str, str, str]:
    """The credential scope, the query string (but its signature) and the canonical query of
    a GET presigned at `stamp` as botocore's S3SigV4QueryAuth writes them: the same for every
    key signed within that second (their quoting was two thirds of a presign's CPU)."""
    scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
    params = {"X-Amz-Algorithm": "AWS4-HMAC-SHA256",
              "X-Amz-Credential": f"{access_key}/{scope}", "X-Amz-Date": stamp,
              "X-Amz-Expires": str(expires), "X-Amz-SignedHeaders": "host"}
    if token is not None:
        params["X-Amz-Security-Token"] = token
    encoded = [(name, quote(value, safe="-_.~")) for name, value in params.items()]
    return (scope, "&".join(f"{name}={value}" for name, value in encoded),
            "&".join(f"{name}={value}" for name, value in sorted(encoded)))


def _signed_put_headers(path: str, host: str, content_type: str, payload_hash: str,
                        credentials: ReadOnlyCredentials, region: str,
                        stamp: str) -> dict[str, str]:
    """The headers of a PUT of a body whose SHA-256 is `payload_hash` to the URL whose path is
    `path` on `host`, signed at `stamp` (X-Amz-Date) as botocore's S3SigV4Auth signs them:
    its canonical request (see _canonical_request) written at once, the signed headers being
    always these (a dict of them, trimmed and sorted, was half a PUT's signing)."""
    scope = f"{stamp[:8]}/{region}/s3/aws4_request"
    headers = {"Content-Type": content_type, "X-Amz-Date": stamp}
    # Sorted by name, values trimmed as botocore trims them (ours have no spaces to trim but
    # the content type's and the token's).
    canonical_headers = (f"content-type:{' '.join(content_type.split())}\nhost:{host}\n"
                         f"x-amz-content-sha256:{payload_hash}\nx-amz-date:{stamp}\n")
    signed_headers = "content-type;host;x-amz-content-sha256;x-amz-date"
    if credentials.token:
        headers["X-Amz-Security-Token"] = credentials.token
        canonical_headers += f"x-amz-security-token:{' '.join(credentials.token.split())}\n"
        signed_headers += ";x-amz-security-token"
    headers["X-Amz-Content-SHA256"] = payload_hash
    signature = _signature(credentials.secret_key, scope, stamp, (
        f"PUT\n{path}\n\n{canonical_headers}\n{signed_headers}\n{payload_hash}"))
    headers["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}")
    return headers


def _canonical_request(method: str, path: str, canonical_query: str, headers: dict[str, str],
                       payload_hash: str) -> str:
    """SigV4's canonical request as botocore writes it for S3 (the URL's `path` as it is in
    the URL, `headers` lowercase, their values trimmed). Written here, not by botocore's signers,
    whose request objects, header maps and URL parsing cost four times the CPU of the
    signature itself."""
    names = sorted(headers)
    return "\n".join((method, path, canonical_query,
                      "".join(f"{name}:{headers[name]}\n" for name in names), ";".join(names),
                      payload_hash))


def _signature(secret_key: str, scope: str, stamp: str, canonical_request: str) -> str:
    """SigV4's signature: HMAC-SHA256 under the key of `scope`, a copy of an HMAC set up once
    for that key (setting one up at each signature cost as much as the rest of it)."""
    signer = _signer(secret_key, scope).copy()
    signer.update(f"AWS4-HMAC-SHA256\n{stamp}\n{scope}\n"
                  f"{hashlib.sha256(canonical_request.encode()).hexdigest()}".encode())
    return signer.hexdigest()


@lru_cache(maxsize=8)
def _signer(secret_key: str, scope: str) -> hmac.HMAC:
    """An HMAC-SHA256 under SigV4's key for `scope` (date/region/service/aws4_request, the
    same all day), with nothing signed yet."""
    key = ("AWS4" + secret_key).encode()
    for part in scope.split("/"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, digestmod=hashlib.sha256)


async def _enter_client(stack: AsyncExitStack, session: AioSession, settings_used: str,
                        **options: Any) -> Any:
    """An S3 client, closed with `stack`; a malformed endpoint or region is a StorageError
    that names the settings it came from."""
    try:
        return await stack.enter_async_context(session.create_client("s3", **options))
    except (BotoCoreError, ValueError) as exc:
        raise StorageError(f"S3 client ({settings_used}): {exc}") from exc


class _Parts:
    """A stream cut into PART_SIZE pieces (the last one shorter), each written straight into
    the BytesIO that is sent: botocore would wrap bytes in a BytesIO, whose buffer aiohttp's
    payload then copies (getbuffer() unshares it), doubling every part in flight. Not an async
    generator: the event loop's hooks add each one to a weak set and remove it again, in
    Python, and one left suspended past its last part is closed by a task of its own."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._rest = memoryview(b"")  # of the last chunk read, not yet in a part
        self._ended = False

    async def next(self) -> io.BytesIO | None:
        """The next part; None after the last."""
        part = io.BytesIO()
        while True:
            if self._rest:
                room = PART_SIZE - part.tell()
                part.write(self._rest[:room])
                self._rest = self._rest[room:]
                if part.tell() == PART_SIZE:
                    part.seek(0)
                    return part
            if self._ended:
                break
            chunk = await anext(self._chunks, None)
            if chunk is None:
                self._ended = True
            else:
                self._rest = memoryview(chunk)
        if not part.tell():
            return None
        part.seek(0)
        return part


def _size(part: io.BytesIO) -> int:
    with part.getbuffer() as view:  # a view, not a copy, and released at once
        return view.nbytes
