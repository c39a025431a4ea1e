"""The named queries of the hot path: fixed SQL kept in the `.sql` files beside this module,
run on asyncpg, which prepares each statement once per connection and reuses it.

A file holds queries each under a `-- name: <name>` line; the comment lines that follow it
say what the query does and what its `$n` parameters are. A query is sent with the first of
those lines only, which names it where PostgreSQL shows what runs (pg_stat_activity, its logs):
asyncpg keeps no statement longer than 15 KB (its max_cacheable_statement_size) but prepares it
again at every call, and the comments alone take a query past that (sql/claim.sql `claim`:
15.9 KB with them, 8.3 KB without; prepared at every claim, a third more of the claiming
process's CPU).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

_HERE = Path(__file__).parent
_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_COMMENT_LINE = re.compile(r"^\s*--.*\n", re.MULTILINE)


@cache
def queries(file: str) -> dict[str, str]:
    """The queries of `<file>.sql`, by name."""
    text = (_HERE / f"{file}.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)[1:]  # name, body, name, body, ...
    named = {name: _sent(body) for name, body in zip(parts[::2], parts[1::2], strict=True)}
    if not named or any(not body for body in named.values()):
        raise ValueError(f"{file}.sql: every query needs a `-- name:` line and a body")
    return named


def _sent(body: str) -> str:
    """A query as it is sent: its first line of comment, then its SQL without the others."""
    first, _, rest = body.strip().partition("\n")
    if not first.startswith("--"):
        return _COMMENT_LINE.sub("", body).strip()
    return f"{first}\n{_COMMENT_LINE.sub('', rest).strip()}"
