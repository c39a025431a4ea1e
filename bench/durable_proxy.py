"""comfy-api-proxy with its SQLite state synced at every commit, for bench.v2_overhead
--explain.

As shipped, `--state-dir` opens its database with `journal_mode=WAL` and `synchronous=NORMAL`
(comfy_api_proxy/persist.py): in WAL mode that syncs the log at checkpoints only, so a
commit is in the kernel's page cache, not on disk, when the proxy answers; a crash of the
process loses nothing, a crash of the machine may. `synchronous=FULL` syncs the log at every
commit, as PostgreSQL's default (`synchronous_commit=on`) flushes its WAL: the proxy's
durability made comfyfleet's, to see what that costs it.

    python -m bench.durable_proxy [comfy-api-proxy's arguments]
"""

from __future__ import annotations

from pathlib import Path

from comfy_api_proxy import app, cli
from comfy_api_proxy.persist import StateStore


class SyncedStateStore(StateStore):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        with self._lock:
            self._conn.execute("PRAGMA synchronous=FULL")


def main() -> None:
    app.StateStore = SyncedStateStore  # type: ignore[attr-defined]  # the name Proxy looks up
    raise SystemExit(cli.main())


if __name__ == "__main__":
    main()
