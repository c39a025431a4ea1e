"""413 for request bodies over the limit, from Content-Length or while a chunked body streams
in (DESIGN §8): JSON bodies over MAX_REQUEST_BYTES, multipart uploads over MAX_UPLOAD_BYTES."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from comfyfleet.api.errors import error_response

# HTTP/1.x, which the service's server (uvicorn) speaks: a request's body is framed by its
# Content-Length, or chunked as its Transfer-Encoding says, or there is none.
FRAMED_BY_HEADERS = ("1.1", "1.0")


class BodyTooLarge(Exception):
    """Raised from `receive` to stop the app reading; answered 413 by the middleware."""


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        content_type = declared = b""
        chunked = False
        for name, value in scope["headers"]:  # the last of each, as a dict of them has it
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                declared = value
            elif name == b"transfer-encoding":
                chunked = True
        limit = (self.max_upload_bytes
                 if content_type.lower().startswith(b"multipart/form-data") else self.max_bytes)
        if declared.isdigit() and int(declared) > limit:
            await _too_large(limit, scope, receive, send)
            return
        if not chunked and (not declared or declared.isdigit()) \
                and scope.get("http_version") in FRAMED_BY_HEADERS:
            # The server reads no more than Content-Length says (nothing without it): the
            # body is within the limit, with nothing to count as it comes.
            await self.app(scope, receive, send)
            return

        received = 0
        over = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over:
                return  # whatever the app makes of the cut-off body, the answer is the 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            pass  # the app let it through; `over` is set
        except Exception:
            if not over:
                raise
        if over and not started:
            await _too_large(limit, scope, receive, send)


async def _too_large(limit: int, scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(413, "request_too_large",
                              f"the request body is over the {limit}-byte limit",
                              limit=limit)
    # The rest of the body is not read: close the connection rather than reuse it.
    response.headers["Connection"] = "close"
    await response(scope, receive, send)
