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


def canonical(value: Any) -> bytes:
    """`value` as the standard library writes it with sorted keys, compact and in UTF-8
    (`json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`), the
    text of digests kept in the database (a job's fingerprint): by orjson, 5x faster, where
    it writes those very bytes (text, whole numbers within 64 bits, booleans, null, lists and
    dicts of them keyed by text), else by the standard library (a float: it writes 1e-05
    where orjson writes 1e-5)."""
    if _orjson_writes_as_json(value):
        try:
            return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # orjson.JSONEncodeError: a lone surrogate, nesting too deep
            pass
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


def _orjson_writes_as_json(value: Any) -> bool:
    """Whether orjson's sorted text of `value` is the standard library's (`canonical`)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-2**63 <= value < 2**64)
    # No generator: this walks every submit's parameters for its fingerprint, and one made
    # at each dict and list took most of the walk (3.4 against 1.2 us for a small job's).
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not _orjson_writes_as_json(item):
                return False
        return True
    if kind is list:
        return all(map(_orjson_writes_as_json, value))
    return False


def loads(text: str | bytes | bytearray) -> Any:
    """The value of JSON `text`; ValueError when it is not JSON. What orjson refuses but the
    standard library reads (NaN and Infinity, which ComfyUI writes for a node's non-finite
    number; a lone surrogate, which `api.json_text` must find to refuse; UTF-16 bytes) is
    read as before."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
