"""moto's S3 server, checking presigned URLs as AWS does.

moto serves a presigned GET without looking at its signature or its expiry: a URL signed with
Signature Version 2 (which AWS refuses), for the wrong host or region, or long expired, would
pass every test. Here a request authenticated by its query string is checked first, as AWS
checks it: Signature Version 4 only, the signature over the method, host, path and query it
arrived with, the credential scope's region that of the bucket, and X-Amz-Date + X-Amz-Expires
not passed. Requests signed in their Authorization header (the SDK's own) go to moto as before.

Run:  python -m tests.s3_server -H 127.0.0.1 -p PORT
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import time
from calendar import timegm
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

# The credentials the tests use; the only ones this server knows the secret of.
S3_CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
SECRETS = {S3_CREDENTIALS["aws_access_key_id"]: S3_CREDENTIALS["aws_secret_access_key"]}
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
    scope = f"{date}/{region}/{service}/{terminal}"
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
    signed_at = timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
    if time.time() > signed_at + expires:
        raise Refused("403 Forbidden", "AccessDenied", "Request has expired")


def verifying(app: App, bucket_region: Callable[[str], str | None]) -> App:
    """`app` behind the check of presigned requests."""

    def checked(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        query = environ.get("QUERY_STRING", "")
        if "Signature=" in query:  # SigV4's X-Amz-Signature or SigV2's Signature
            raw_path = environ.get("RAW_URI") or environ.get("REQUEST_URI") or "/"
            try:
                check_presigned(environ["REQUEST_METHOD"], environ.get("HTTP_HOST", ""),
                                raw_path.split("?", 1)[0], query, bucket_region)
            except Refused as refused:
                body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{refused.code}'
                        f"</Code><Message>{refused.message}</Message></Error>").encode()
                start_response(refused.status, [("Content-Type", "application/xml"),
                                                ("Content-Length", str(len(body)))])
                return [body]
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
