"""schemathesis hooks of the fuzz pass (tests/test_api_fuzz.py), loaded by its `st run`
through SCHEMATHESIS_HOOKS.

Generated bodies, queries and path parameters may each get one value that has made such
services fail (a NUL character, a number past any float) in place of one of theirs.

Whatever is generated, the service under test connects only to loopback: just before each
request is sent, every URL it could fetch or call (an image parameter, a callback URL, a new
backend) is pointed at a closed port on 127.0.0.1, the rest of the generated text kept in
its path. `?wait=` is dropped: it only makes a request hold on to a job that never runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import schemathesis
from hypothesis import strategies as st

# What goes into a URL (a query, a path) is text.
NASTY_TEXT = ["a\u0000b", "\u0000", "9" * 400, "-" + "9" * 400]
NASTY: list[Any] = [*NASTY_TEXT, 10**400, -(10**400), 1e308]
Path = tuple[str | int, ...]


def _leaves(value: Any, path: Path = ()) -> Iterator[Path]:
    """The path of every value in a JSON-like document that is not a container."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, (*path, index))
    else:
        yield path


def _replaced(value: Any, path: Path, new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replaced(value[head], rest, new)}
    return [_replaced(item, rest, new) if index == head else item
            for index, item in enumerate(value)]


def with_a_nasty_value(value: Any, nasty: list[Any] = NASTY) -> st.SearchStrategy[Any]:
    """`value` as generated, or with one of its values replaced by one of `nasty`."""
    paths = list(_leaves(value))
    if not paths:  # {} or []
        return st.just(value)
    return st.one_of(st.just(value), st.builds(
        lambda path, new: _replaced(value, path, new), st.sampled_from(paths),
        st.sampled_from(nasty)))


@schemathesis.hook
def flatmap_body(context: Any, body: Any) -> st.SearchStrategy[Any]:
    return with_a_nasty_value(body)


@schemathesis.hook
def flatmap_query(context: Any, query: Any) -> st.SearchStrategy[Any]:
    return with_a_nasty_value(query, NASTY_TEXT) if query else st.just(query)


@schemathesis.hook
def flatmap_path_parameters(context: Any, path_parameters: Any) -> st.SearchStrategy[Any]:
    if not path_parameters:
        return st.just(path_parameters)
    return with_a_nasty_value(path_parameters, NASTY_TEXT)


# Nothing listens there: a connection is refused at once.
CLOSED = "http://127.0.0.1:1/"


def confined(value: Any) -> Any:
    """`value` with every string the service could take for a URL (leading blanks and any
    case of the scheme included, as URL parsers allow) pointed at CLOSED."""
    if isinstance(value, str):
        if value.strip().lower().startswith("http"):
            return CLOSED + quote(value, safe="")
        return value
    if isinstance(value, dict):
        return {key: confined(item) for key, item in value.items()}
    if isinstance(value, list):
        return [confined(item) for item in value]
    return value


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: Any) -> None:
    if case.method.upper() == "POST" and case.operation.path.endswith("/backends"):
        # A backend's URL needs no scheme ("gpu1:8188"): every one gets a loopback host.
        if isinstance(case.body, dict) and isinstance(case.body.get("url"), str):
            case.body["url"] = CLOSED + case.body["url"]
    elif isinstance(case.body, dict | list):
        case.body = confined(case.body)
    if isinstance(case.query, dict):
        case.query.pop("wait", None)
