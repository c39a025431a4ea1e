"""The package's JSON encoder and decoder for everything a job passes through: websocket frames,
the backends' requests and answers, prompts stored and read, webhook bodies, event streams.
orjson, which reads and writes a job's prompt (tens of KB) 3-6x as fast as the standard
library, and a frame of a few hundred bytes 4x; the standard library for what orjson refuses,
so that what was read before is read still.

What differs from the standard library's defaults: the text is compact (no spaces) and UTF-8
(non-ASCII characters as they are, not escaped); a number that is not finite is written `null`
(JSON has no NaN; the standard library wrote `NaN`, which strict readers refuse); an integer
beyond 64 bits is read as a float (orjson's reading; it is written as the integer it is).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import orjson


def dumps(value: Any) -> bytes:
    """`value` as JSON text, encoded in UTF-8. What orjson does not write (an integer beyond
    64 bits, a key that is not a string, a lone surrogate, nesting deeper than 254) the standard
    library writes, as compact (a number that is not finite as `NaN` there); TypeError for a
    value neither writes."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError
        return json.dumps(value, separators=(",", ":")).encode()


def dumps_text(value: Any) -> str:
    """`dumps` as a str, for what takes text (a database's JSON parameter, an event's data)."""
    return dumps(value).decode()


def datetime_text(moment: datetime) -> str:
    """`moment.isoformat()`, as orjson writes it (RFC 3339, the same text for any offset of
    whole minutes, as every timestamp here has: UTC), in a fifth of the time: six of them in
    every job rendered took a third of its rendering."""
    return orjson.dumps(moment)[1:-1].decode()


def loads(text: str | bytes | bytearray) -> Any:
    """The value of JSON `text`; ValueError when it is not JSON. What orjson refuses but the
    standard library reads (NaN and Infinity, which ComfyUI writes for a node's non-finite
    number; a lone surrogate, which `api.json_text` must find to refuse; UTF-16 bytes) is
    read as before."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
