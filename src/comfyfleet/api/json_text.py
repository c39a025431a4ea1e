"""A JSON body's strings must be Unicode text. JSON can spell a lone surrogate ("\\ud800", or
its bytes in CESU-8), which Python's parser turns into a str that cannot be encoded: not hashed
into a fingerprint, not stored, not even sent back inside an error. Such a body is refused, as
the client's input, naming where the string is, before any route reads it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError

# What a surrogate can arrive as: an escape, or the three UTF-8-like bytes json.loads lets
# through ("surrogatepass"). Valid pairs match too; parsing tells them apart.
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\xed[\xa0-\xbf]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
MESSAGE = "is not Unicode text: it holds a lone surrogate (such as \\ud800)"


def may_hold_lone_surrogate(body: bytes) -> bool:
    """Whether a JSON body may spell a lone surrogate (only parsing tells for sure)."""
    return _MAYBE_SURROGATE.search(body) is not None


async def refuse_lone_surrogates(request: Request) -> None:
    """App dependency: 422 (RequestValidationError, in the app's envelope) for a JSON body
    with a lone surrogate in any string or key. The body is read once and kept by Starlette,
    so the route reads the same bytes; only bodies that may hold one are parsed again."""
    if "json" not in request.headers.get("content-type", "").lower():
        return
    body = await request.body()
    if not may_hold_lone_surrogate(body):
        return
    try:
        document = json.loads(body)
    except ValueError:
        return  # not JSON at all: the route's own parsing answers that
    problems = [{"type": "string_unicode", "loc": ("body", *path), "msg": MESSAGE}
                for path in _lone_surrogates(document, ())]
    if problems:
        raise RequestValidationError(problems)


def _lone_surrogates(value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[str | int, ...]]:
    """The path of every string (or key) in `value` with a lone surrogate; a key is shown with
    the surrogate escaped, so that the answer naming it can be sent."""
    if isinstance(value, str):
        if _LONE_SURROGATE.search(value):
            yield path
    elif isinstance(value, dict):
        for key, item in value.items():
            if _LONE_SURROGATE.search(key):
                yield (*path, key.encode("utf-8", "backslashreplace").decode())
            else:
                yield from _lone_surrogates(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _lone_surrogates(item, (*path, index))
