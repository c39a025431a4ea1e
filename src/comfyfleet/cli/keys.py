"""`comfyfleet keys create|update|list|revoke`: API keys kept in the database (see api_keys.py),
with each tenant's weight and limits, and the default callback URL of its jobs."""

from __future__ import annotations

import argparse
import sys
from typing import Any

# `--max-queued default`: the key follows MAX_QUEUED_PER_KEY (and likewise for concurrency).
DEFAULT = "default"
# `--callback-url none`: the key's jobs that name no callback URL get no webhook.
NONE = "none"


def _limit(text: str) -> int | None:
    """A positive number, or `default` (None in the keys table: the environment's default)."""
    if text == DEFAULT:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1, or {DEFAULT!r}: {text!r}")
    return value


def _weight(text: str) -> int:
    value = _limit(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"a whole number of at least 1: {text!r}")
    return value


def _add_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weight", type=_weight,
                        help="its share of the GPUs against other keys with work (default 1)")
    parser.add_argument("--max-concurrent", type=_limit, default=argparse.SUPPRESS,
                        metavar="N|default", help="jobs on backends at once (default: "
                        "MAX_CONCURRENT_PER_KEY, unset: no limit)")
    parser.add_argument("--max-queued", type=_limit, default=argparse.SUPPRESS,
                        metavar="N|default", help="jobs waiting in the backlog; past it a submit "
                        "gets 429 queue_full (default: MAX_QUEUED_PER_KEY, unset: no limit)")
    parser.add_argument("--callback-url", default=argparse.SUPPRESS, metavar=f"URL|{NONE}",
                        help="the webhook of the key's jobs that name none: every Comfy API v2 "
                        "job (checked as job callback URLs are: ALLOW_PRIVATE_CALLBACKS)")


def add_parser(commands: Any) -> None:
    """The `keys` command, under the `comfyfleet` command's subparsers."""
    keys = commands.add_parser("keys", help="API keys kept in the database")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="make a key and print it (shown only once)")
    create.add_argument("name", help="who the key is for, e.g. the client application")
    create.add_argument("--admin", action="store_true", help="the key sees every key's jobs")
    _add_limits(create)
    update = actions.add_parser("update", help="change a key's weight or limits (the service "
                                "follows within seconds)")
    update.add_argument("name")
    _add_limits(update)
    actions.add_parser("list", help="every key: name, admin, created, revoked, weight, limits, "
                       "callback URL")
    revoke = actions.add_parser("revoke", help="refuse a key from now on (within seconds)")
    revoke.add_argument("name")


def _changes(args: argparse.Namespace) -> dict[str, int | str | None]:
    """The limits and callback URL given on the command line (what is not given is not in
    it)."""
    changes: dict[str, int | str | None] = {
        field: getattr(args, field) for field in ("max_concurrent", "max_queued")
        if hasattr(args, field)}
    if args.weight is not None:
        changes["weight"] = args.weight
    if hasattr(args, "callback_url"):
        changes["callback_url"] = None if args.callback_url == NONE else args.callback_url
    return changes


async def _callback_refused(changes: dict[str, int | str | None], allow_private: bool
                            ) -> str | None:
    """Why the callback URL given cannot be one (None: it can, or none was given)."""
    from comfyfleet.egress import UrlNotAllowed, check_url

    url = changes.get("callback_url")
    if not isinstance(url, str):
        return None
    try:
        await check_url(url, allow_private=allow_private)
    except UrlNotAllowed as exc:
        return f"--callback-url {url!r}: {exc}"
    return None


def _shown(limit: int | None) -> str:
    return DEFAULT if limit is None else str(limit)


async def run(args: argparse.Namespace) -> int:
    from comfyfleet import db
    from comfyfleet.api_keys import KeyExists, KeyLimits, KeyStore
    from comfyfleet.settings import Settings

    settings = Settings()
    changes = _changes(args) if args.keys_command in ("create", "update") else {}
    refused = await _callback_refused(changes, settings.allow_private_callbacks)
    if refused is not None:
        print(refused, file=sys.stderr)
        return 2
    async with db.open_database(settings) as engine:
        store = KeyStore(engine)
        if args.keys_command == "create":
            if not 1 <= len(args.name) <= 100:
                print("a key name has 1 to 100 characters", file=sys.stderr)
                return 2
            try:
                limits = KeyLimits(args.weight or 1, getattr(args, "max_concurrent", None),
                                   getattr(args, "max_queued", None))
                callback_url = changes.get("callback_url")
                assert callback_url is None or isinstance(callback_url, str)
                key = await store.create(args.name, admin=args.admin, limits=limits,
                                         callback_url=callback_url)
            except KeyExists:
                print(f"a key named {args.name!r} exists already", file=sys.stderr)
                return 1
            print(key)
            print(f"key {args.name!r} created{' (admin)' if args.admin else ''}; it is shown "
                  "only this once: give it to the client as `Authorization: Bearer <key>`",
                  file=sys.stderr)
            return 0
        if args.keys_command == "update":
            if not changes:
                print("nothing to change: give --weight, --max-concurrent, --max-queued or "
                      "--callback-url", file=sys.stderr)
                return 2
            updated = await store.update(args.name, changes)
            if updated is None:
                print(f"no live key named {args.name!r}", file=sys.stderr)
                return 1
            print(f"key {args.name!r}: weight {updated.weight}, max_concurrent "
                  f"{_shown(updated.max_concurrent)}, max_queued {_shown(updated.max_queued)}, "
                  f"callback_url {updated.callback_url or NONE}", file=sys.stderr)
            return 0
        if args.keys_command == "list":
            for entry in await store.all():
                revoked = entry.revoked_at.isoformat() if entry.revoked_at else "-"
                print(f"{entry.name}\t{'admin' if entry.admin else 'key'}\t"
                      f"created {entry.created_at.isoformat()}\trevoked {revoked}\t"
                      f"weight {entry.weight}\tmax_concurrent {_shown(entry.max_concurrent)}\t"
                      f"max_queued {_shown(entry.max_queued)}"
                      + (f"\tcallback_url {entry.callback_url}" if entry.callback_url else ""))
            return 0
        if await store.revoke(args.name):
            print(f"key {args.name!r} revoked", file=sys.stderr)
            return 0
        print(f"no live key named {args.name!r}", file=sys.stderr)
        return 1
