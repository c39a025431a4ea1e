"""moto's S3 server, checking presigned URLs as AWS does.

moto serves a presigned GET without looking at its signature or its expiry: a URL signed with
Signature Version 2 (which AWS refuses), for the wrong host or region, or long expired, would
pass every test. Here a request authenticated by its query string is checked first, as AWS
checks it: Signature Version 4 only, the signature over the method, host, path and query it
arrived with, the credential scope's region that of the bucket, and X-Amz-Date + X-Amz-Expires
not passed. A PUT of a whole object signed in its Authorization header (comfyfleet signs
those itself) is checked too: the signature over its method, path and signed headers, and its
body against the SHA-256 it was signed with. Other requests go to moto as before.

Run:  python -m tests.s3_server -H 127.0.0.1 -p PORT
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import io
import logging
import time
from calendar import timegm
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

# The credentials the tests use, and a pair whose secret is a string found nowhere else (a
# test that the secret never reaches the logs); the only ones this server knows the secret of.
S3_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
UNIQUE_S3_CREDENTIALS = {"aws_access_key_id": "unique-id",
                         "aws_secret_access_key": "aws-secret-2b8d4e1f5a"}
SECRETS = {pair["aws_access_key_id"]: pair["aws_secret_access_key"]
           for pair in (S3_CREDENTIALS, UNIQUE_S3_CREDENTIALS)}
ALGORITHM = "AWS4-HMAC-SHA256"
MAX_EXPIRES = 7 * 24 * 3600

StartResponse = Callable[..., Any]
App = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


class Refused(Exception):
    def __init__(self, status: str, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _encode(text: str) -> str:
    return quote(text, safe="-_.~")


def check_presigned(method: str, host: str, raw_path: str, query: str,
                    bucket_region: Callable[[str], str | None]) -> None:
    """Raises Refused unless the query-string authentication is one AWS would accept."""
    params = dict(parse_qsl(query, keep_blank_values=True))
    if "Signature" in params and "AWSAccessKeyId" in params:
        raise Refused("400 Bad Request", "InvalidRequest",
                      "The authorization mechanism you have provided is not supported. "
                      "Please use AWS4-HMAC-SHA256.")
    if params.get("X-Amz-Algorithm") != ALGORITHM:
        raise Refused("400 Bad Request", "AuthorizationQueryParametersError",
                      "X-Amz-Algorithm only supports \"AWS4-HMAC-SHA256\"")
    try:
        access_key, date, region, service, terminal = params["X-Amz-Credential"].split("/")
        amz_date = params["X-Amz-Date"]
        expires = int(params["X-Amz-Expires"])
        signed_headers = params["X-Amz-SignedHeaders"].split(";")
        signature = params["X-Amz-Signature"]
    except (KeyError, ValueError) as exc:
        raise Refused("400 Bad Request", "AuthorizationQueryParametersError",
                      f"Query-string authentication version 4 requires {exc}") from exc
    if not 0 < expires <= MAX_EXPIRES:
        raise Refused("400 Bad Request", "AuthorizationQueryParametersError",
                      "X-Amz-Expires must be less than a week (in seconds) that is 604800")
    if access_key not in SECRETS:
        raise Refused("403 Forbidden", "InvalidAccessKeyId",
                      "The AWS Access Key Id you provided does not exist in our records.")
    bucket = unquote(raw_path).lstrip("/").split("/", 1)[0]
    expected_region = bucket_region(bucket)
    if expected_region is not None and region != expected_region:
        raise Refused("400 Bad Request", "AuthorizationQueryParametersError",
                      f"Error parsing the X-Amz-Credential parameter; the region '{region}' "
                      f"is wrong; expecting '{expected_region}'")

    headers = {"host": host}
    canonical_query = "&".join(
        f"{_encode(name)}={_encode(value)}"
        for name, value in sorted(params.items()) if name != "X-Amz-Signature")
    canonical_request = "\n".join([
        method,
        quote(unquote(raw_path), safe="/~"),
        canonical_query,
        *(f"{name}:{headers.get(name, '').strip()}" for name in signed_headers),
        "",
        ";".join(signed_headers),
        "UNSIGNED-PAYLOAD",
    ])
    _check_signature(canonical_request, access_key, f"{date}/{region}/{service}/{terminal}",
                     amz_date, signature)
    signed_at = timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
    if time.time() > signed_at + expires:
        raise Refused("403 Forbidden", "AccessDenied", "Request has expired")


def _check_signature(canonical_request: str, access_key: str, scope: str, amz_date: str,
                     signature: str) -> None:
    date, region, service, terminal = scope.split("/")
    string_to_sign = "\n".join(
        [ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()])
    key = _hmac(f"AWS4{SECRETS[access_key]}".encode(), date)
    for part in (region, service, terminal):
        key = _hmac(key, part)
    if not hmac.compare_digest(hmac.new(key, string_to_sign.encode(), hashlib.sha256)
                               .hexdigest(), signature):
        raise Refused("403 Forbidden", "SignatureDoesNotMatch",
                      "The request signature we calculated does not match the signature you "
                      "provided. Check your key and signing method.")


def _header(environ: dict[str, Any], name: str) -> str:
    key = name.upper().replace("-", "_")
    value = environ.get(key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else f"HTTP_{key}", "")
    return " ".join(str(value).split())


def check_signed_put(environ: dict[str, Any], raw_path: str, body: bytes) -> None:
    """Raises Refused unless a PUT signed in its Authorization header is one AWS would
    accept (its body included)."""
    fields = dict(part.strip().split("=", 1) for part in
                  environ["HTTP_AUTHORIZATION"].removeprefix(ALGORITHM).split(","))
    access_key, scope = fields["Credential"].split("/", 1)
    if access_key not in SECRETS:
        raise Refused("403 Forbidden", "InvalidAccessKeyId",
                      "The AWS Access Key Id you provided does not exist in our records.")
    signed_headers = fields["SignedHeaders"].split(";")
    payload = _header(environ, "x-amz-content-sha256")
    if payload != "UNSIGNED-PAYLOAD" and payload != hashlib.sha256(body).hexdigest():
        raise Refused("400 Bad Request", "XAmzContentSHA256Mismatch",
                      "The provided 'x-amz-content-sha256' header does not match what was "
                      "computed.")
    canonical_request = "\n".join([
        "PUT",
        quote(unquote(raw_path), safe="/~"),
        "",
        *(f"{name}:{_header(environ, name)}" for name in signed_headers),
        "",
        ";".join(signed_headers),
        payload,
    ])
    _check_signature(canonical_request, access_key, scope, _header(environ, "x-amz-date"),
                     fields["Signature"])


def _refusal(refused: Refused, start_response: StartResponse) -> Iterable[bytes]:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{refused.code}'
            f"</Code><Message>{refused.message}</Message></Error>").encode()
    start_response(refused.status, [("Content-Type", "application/xml"),
                                    ("Content-Length", str(len(body)))])
    return [body]


def verifying(app: App, bucket_region: Callable[[str], str | None]) -> App:
    """`app` behind the check of presigned requests and of signed whole-object PUTs."""

    def checked(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        query = environ.get("QUERY_STRING", "")
        raw_path = (environ.get("RAW_URI") or environ.get("REQUEST_URI") or "/").split("?", 1)[0]
        try:
            if "Signature=" in query:  # SigV4's X-Amz-Signature or SigV2's Signature
                check_presigned(environ["REQUEST_METHOD"], environ.get("HTTP_HOST", ""),
                                raw_path, query, bucket_region)
            elif (environ["REQUEST_METHOD"] == "PUT" and not query
                  and environ.get("HTTP_AUTHORIZATION", "").startswith(ALGORITHM)):
                body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
                environ["wsgi.input"] = io.BytesIO(body)  # moto reads it again
                check_signed_put(environ, raw_path, body)
        except Refused as refused:
            return _refusal(refused, start_response)
        return app(environ, start_response)

    return checked


def main() -> None:
    from moto.core.models import DEFAULT_ACCOUNT_ID
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.s3.models import s3_backends
    from werkzeug.serving import run_simple

    def bucket_region(name: str) -> str | None:
        bucket = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets.get(name)
        return None if bucket is None else str(bucket.region_name)

    parser = argparse.ArgumentParser()
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    run_simple(args.host, args.port, verifying(DomainDispatcherApplication(create_backend_app),
                                               bucket_region), threaded=True)


if __name__ == "__main__":
    main()
