"""ComfyUI's cache keys ("node signatures") for the nodes of an API-format prompt.

ComfyUI 0.3.64 (comfy_execution/caching.py, CacheKeySetInputSignature) serves a node from its
cache when a cached result has the same key. The key of a node is the list of the *immediate*
signatures of the node and of all its ancestors, the ancestors in a fixed order: depth first
through the inputs sorted by name, each ancestor listed once, where it is first reached.
An immediate signature is
  [class_type, IS_CHANGED value, (node id, for some classes), (input name, value)...]
with the inputs sorted by name, and a linked input written as ("ANCESTOR", position of the
linked node in that ancestor list, output index) - so node ids do not matter, only the shape.
- The IS_CHANGED value is False for a class without IS_CHANGED (or `fingerprint_inputs`);
  otherwise the list of what it returned for the node's literal inputs (a file hash for
  LoadImage), or NaN when it raised. NaN never equals anything: such a node, and every node
  downstream of it, is never served from the cache. SaveImageWebsocket returns the time.
- The node id is part of the key for classes with a hidden UNIQUE_ID input or NOT_IDEMPOTENT.
- A link to a node missing from the prompt makes the key NaN as well.
- Keys are compared with Python equality after ComfyUI's `to_hashable`: lists and tuples alike,
  dicts by their sorted items, and numbers by value (1 == 1.0 == True).
- Every input in the node's `inputs` counts, declared or not. ComfyUI compares the prompt as
  validation left it: literal values of declared inputs converted to the declared type.

Here a key is a SHA-256 over a canonical encoding of that structure, so equal keys mean what
ComfyUI's equality means; None stands for a key that matches nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Callable, Collection, Mapping
from typing import Any

# A node's IS_CHANGED value as the caller determines it: False when the class has none, any
# JSON-like value otherwise, or NEVER_EQUAL when it differs on every run (NaN, the time).
NEVER_EQUAL = object()

# Core classes whose IS_CHANGED differs on every run (SaveImageWebsocket returns the time).
CHANGED_EVERY_RUN = frozenset({"SaveImageWebsocket"})

IsChanged = Callable[[str, Mapping[str, Any]], object]
KeyedById = Callable[[str], bool]


def is_link(value: Any) -> bool:
    """ComfyUI's is_link: [node id (str), output index (int or float)]."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int | float) and not isinstance(value[1], bool))


def node_signatures(
    prompt: Mapping[str, Any], *, is_changed: IsChanged, keyed_by_id: KeyedById,
    only: Collection[str] | None = None, parts: Parts | None = None,
) -> dict[str, str | None]:
    """The cache key of every node of `prompt` (None: it can never be served from cache), or
    of the nodes `only` names.

    `is_changed(node_id, node)` gives the node's IS_CHANGED value (False if its class has
    none); `keyed_by_id(class_type)` whether the class puts the node id into its key.
    `parts`: the nodes' parts made so far (`_Part`), by node id, taken as they are and added
    to (a node's does not depend on the nodes it links to: those of a prompt serve a copy of
    it for the nodes not changed).
    """
    # A node's immediate signature is the same in every key it is part of but for its links'
    # positions, so its canonical text is made once, in pieces around the links: a key is a
    # join of those texts (the same text, byte for byte), not a canonical encoding of the
    # node and all its ancestors anew.
    if parts is None:
        parts = {}
    signatures: dict[str, str | None] = {}
    for node_id in prompt if only is None else [node for node in prompt if node in only]:
        part = parts.get(node_id)
        if part is None:
            part = parts[node_id] = _part(prompt, node_id, is_changed, keyed_by_id)
        # The ancestors depth first through the inputs sorted by name, each once, where it is
        # first reached (as ComfyUI orders them), each one's place in that order with it. A
        # stack of the nodes being visited, not a recursive closure: a closure that calls
        # itself refers to itself, a reference cycle only the garbage collector frees.
        order: dict[str, str] = {}  # as text
        members = [part]
        visiting = [iter(part.sources)] if part.sources else []
        while visiting:
            for source in visiting[-1]:
                if source not in order:
                    order[source] = str(len(members) - 1)
                    reached = parts.get(source)
                    if reached is None:
                        reached = parts[source] = _part(prompt, source, is_changed, keyed_by_id)
                    members.append(reached)
                    visiting.append(iter(reached.sources))
                    break
            else:
                visiting.pop()
        # The key's text: the list of the members' texts, each with its links' positions.
        text = ['["l",[']
        for member in members:
            if member.head is None:
                signatures[node_id] = None
                break
            text.append(member.head)
            for source, tail in member.links:
                text += (order[source], tail)
            text.append(",")
        else:
            text[-1] = "]]"
            signatures[node_id] = hashlib.sha256("".join(text).encode()).hexdigest()
    return signatures


def predicted_signatures(
    prompt: Mapping[str, Any], keyed_by_id: frozenset[str], only: Collection[str] | None = None,
    parts: Parts | None = None,
) -> dict[str, str | None]:
    """The keys a server will give `prompt`'s nodes, as far as a client can tell: the
    IS_CHANGED of a file loader (the file's hash) is taken to follow its file name, and
    other IS_CHANGED methods of custom nodes are unknown (what the server then reports
    corrects the prediction)."""
    def is_changed(node_id: str, node: Mapping[str, Any]) -> object:
        return NEVER_EQUAL if node.get("class_type") in CHANGED_EVERY_RUN else False

    return node_signatures(prompt, is_changed=is_changed,
                           keyed_by_id=keyed_by_id.__contains__, only=only, parts=parts)


def downstream(prompt: Mapping[str, Any], nodes: Collection[str],
               parts: Parts | None = None) -> set[str]:
    """`nodes` and every node of `prompt` linked to one of them through its inputs, however
    far: the nodes whose keys change when those nodes change. `parts`: those of some of
    `prompt`'s nodes, as `node_signatures` made them (the others' inputs are read)."""
    found = set(nodes)
    users: dict[str, list[str]] = {}
    for node_id in prompt:
        if node_id in found:
            continue  # found already, whatever its inputs link to
        part = parts.get(node_id) if parts is not None else None
        for source in part.sources if part is not None else _sources(prompt, node_id):
            users.setdefault(source, []).append(node_id)
    stack = list(found)
    while stack:
        for user in users.get(stack.pop(), ()):
            if user not in found:
                found.add(user)
                stack.append(user)
    return found


def cache_keys(signatures: Mapping[str, str | None]) -> dict[str, str]:
    """Signatures as keys of a NodeCache: a node whose key matches nothing still takes a
    place in ComfyUI's cache, under a key of its own."""
    return {node_id: signature if signature is not None else f"unequal-{uuid.uuid4().hex}"
            for node_id, signature in signatures.items()}


def _sources(prompt: Mapping[str, Any], node_id: str) -> list[str]:
    node = prompt.get(node_id)
    if not isinstance(node, dict | Mapping):
        return []
    inputs = _inputs(node)
    return _linked(inputs, sorted(inputs))


def _linked(inputs: Mapping[str, Any], names: list[str]) -> list[str]:
    """The nodes a node's `inputs` link to, in the order of `names` (theirs, sorted)."""
    return [value[0] for value in map(inputs.__getitem__, names) if is_link(value)]


def _inputs(node: Mapping[str, Any]) -> Mapping[str, Any]:
    """A node's inputs, as they are: only read (a copy of each node's, two or three times a
    key, was a good part of a small prompt's keys)."""
    inputs = node.get("inputs")
    return inputs if isinstance(inputs, dict | Mapping) else {}


# One encoder for every text (json.dumps with options builds a new one at each call).
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


class _Unequal(Exception):
    """A value that equals nothing (NaN): the whole key matches nothing."""


def _canonical(value: Any) -> Any:
    """A JSON value whose text is equal exactly when ComfyUI's to_hashable values are equal."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        if isinstance(value, float):
            if math.isnan(value):
                raise _Unequal
            if math.isinf(value):
                return ["inf", value > 0]
            if value.is_integer():
                return ["n", str(int(value))]
            return ["n", repr(value)]
        return ["n", str(int(value))]
    if isinstance(value, Mapping):
        return ["d", [[_canonical(k), _canonical(v)] for k, v in sorted(value.items())]]
    if isinstance(value, list | tuple):
        return ["l", [_canonical(item) for item in value]]
    raise _Unequal  # anything else is Unhashable in ComfyUI: a NaN


class _Part:
    """What a node gives the keys it is part of: the nodes its inputs link to (`sources`, in
    the order of the inputs' names) and its immediate signature as canonical text, made once,
    in pieces around those links: a link's position in the ancestry of the key goes between
    the text before it (`head`, or the tail of the link before) and its tail. No head when
    the node equals nothing."""

    __slots__ = ("head", "links", "sources")

    def __init__(self, head: str | None, sources: list[str],
                 links: list[tuple[str, str]]) -> None:
        self.head = head
        self.sources = sources
        self.links = links  # each source with the text after its position


# The nodes' parts, by node id.
Parts = dict[str, _Part]


def _part(prompt: Mapping[str, Any], node_id: str, is_changed: IsChanged,
          keyed_by_id: KeyedById) -> _Part:
    """[class_type, IS_CHANGED, (node id), (input name, value or ("ANCESTOR", position,
    output index))...] in pieces of canonical text; no head when it equals nothing (a
    missing node, a NEVER_EQUAL IS_CHANGED, a NaN)."""
    node = prompt.get(node_id)
    if not isinstance(node, dict | Mapping):
        return _Part(None, [], [])  # a link to a missing node: NaN in ComfyUI
    inputs = _inputs(node)
    # The names alone sorted (they are unique): strings compare faster than pairs.
    names = sorted(inputs)
    changed = is_changed(node_id, node)
    if changed is NEVER_EQUAL:
        return _Part(None, _linked(inputs, names), [])
    class_type = node.get("class_type")
    sources: list[str] = []
    pieces: list[str] = []  # the text before each link, then the text after the last
    try:
        text = f'["l",[{_text(class_type)},{_text(changed)}'
        if isinstance(class_type, str) and keyed_by_id(class_type):
            text += f",{_text(node_id)}"
        for name in names:
            value = inputs[name]
            if is_link(value):
                # [name, ["ANCESTOR", position, output index]], the position an int
                sources.append(value[0])
                pieces.append(f'{text},["l",[{_text(name)},["l",["ANCESTOR",["n","')
                text = f'"],{_text(value[1])}]]]]'
            else:
                text += f',["l",[{_text(name)},{_text(value)}]]'  # _text([name, value])
    except _Unequal:
        return _Part(None, _linked(inputs, names), [])
    pieces.append(f"{text}]]")
    return _Part(pieces[0], sources, list(zip(sources, pieces[1:], strict=True)))


def _text(value: Any) -> str:
    """`value`'s canonical encoding as compact JSON text; _Unequal for a value equal to
    nothing."""
    # Most inputs are strings and numbers: their text written straight (as the encoder would
    # write `_canonical`'s), not through a list and the encoder's generic walk.
    if isinstance(value, str):
        return _encode_string(value)
    if isinstance(value, int):  # bool too: 1 == True
        return f'["n","{int(value)}"]'
    if isinstance(value, float) and math.isfinite(value):
        return f'["n","{int(value)}"]' if value.is_integer() else f'["n","{value!r}"]'
    return _ENCODER.encode(_canonical(value))


# What the encoder writes for a string (ensure_ascii=False).
_encode_string = json.encoder.encode_basestring
