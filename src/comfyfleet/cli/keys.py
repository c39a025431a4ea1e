"""`comfyfleet keys create|list|revoke`: API keys kept in the database (see api_keys.py)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(commands: Any) -> None:
    """The `keys` command, under the `comfyfleet` command's subparsers."""
    keys = commands.add_parser("keys", help="API keys kept in the database")
    actions = keys.add_subparsers(dest="keys_command", required=True)
    create = actions.add_parser("create", help="make a key and print it (shown only once)")
    create.add_argument("name", help="who the key is for, e.g. the client application")
    create.add_argument("--admin", action="store_true", help="the key sees every key's jobs")
    actions.add_parser("list", help="every key: name, admin, created, revoked")
    revoke = actions.add_parser("revoke", help="refuse a key from now on (within seconds)")
    revoke.add_argument("name")


async def run(args: argparse.Namespace) -> int:
    from comfyfleet import db
    from comfyfleet.api_keys import KeyExists, KeyStore
    from comfyfleet.settings import Settings

    async with db.open_database(Settings()) as engine:
        store = KeyStore(engine)
        if args.keys_command == "create":
            if not 1 <= len(args.name) <= 100:
                print("a key name has 1 to 100 characters", file=sys.stderr)
                return 2
            try:
                key = await store.create(args.name, admin=args.admin)
            except KeyExists:
                print(f"a key named {args.name!r} exists already", file=sys.stderr)
                return 1
            print(key)
            print(f"key {args.name!r} created{' (admin)' if args.admin else ''}; it is shown "
                  "only this once: give it to the client as `Authorization: Bearer <key>`",
                  file=sys.stderr)
            return 0
        if args.keys_command == "list":
            for entry in await store.all():
                revoked = entry.revoked_at.isoformat() if entry.revoked_at else "-"
                print(f"{entry.name}\t{'admin' if entry.admin else 'key'}\t"
                      f"created {entry.created_at.isoformat()}\trevoked {revoked}")
            return 0
        if await store.revoke(args.name):
            print(f"key {args.name!r} revoked", file=sys.stderr)
            return 0
        print(f"no live key named {args.name!r}", file=sys.stderr)
        return 1
