"""Failure injection settings of one simulator.

They are set through the constructor (and `comfyfleet sim` options) and changed at run time
through the control API (control.py). They are configuration, not server state: a simulated
crash and restart keeps them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Faults:
    """What goes wrong, and how often.

    - `fail_rate`: the probability that a prompt fails with an `execution_error` (a simulated
      out-of-memory error), drawn from a generator seeded with `seed` (None: unseeded).
    - `hang`: the websockets stay open but the server writes nothing to them; prompts still
      run and reach the history.
    - `view_bytes_per_second`: /view sends its body at this rate (None: as fast as it can).
    - `output_size`: every image file SaveImage or PreviewImage writes is padded to this many
      bytes (None: the plain PNG).
    - `prompt_delay`: POST /prompt holds each request this many seconds before it looks at it
      (None: at once), by the current value: lowering or clearing it releases those held. A
      request whose client disconnects meanwhile is dropped unread: its prompt is never
      queued, as if the client had died before sending it.
    - `system_stats_status`: GET /system_stats answers with this HTTP status (an error page)
      instead of the stats (None: the stats), while the websocket and every other route go
      on as usual: a server whose monitoring endpoint fails.
    - `prompt_status`: POST /prompt answers with this HTTP status (an error page) instead of
      queueing the prompt (None: it queues it), as it is when the request is read (after
      `prompt_delay`): a server failing to take prompts.
    - `view_status`: GET /view answers with this HTTP status (an error page) instead of the
      file (None: the file): a server failing to serve its outputs.
    - `view_cut_bytes`: GET /view promises the whole file (its Content-Length) but sends only
      this many bytes of it, then drops the connection (None: all of it): a server that dies
      mid-file. A file no longer than that is sent whole.
    """

    fail_rate: float = 0.0
    seed: int | None = None
    hang: bool = False
    view_bytes_per_second: int | None = None
    output_size: int | None = None
    prompt_delay: float | None = None
    system_stats_status: int | None = None
    prompt_status: int | None = None
    view_status: int | None = None
    view_cut_bytes: int | None = None
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Validate by applying every field as a change.
        self.update(self.as_json())

    def draw_failure(self) -> bool:
        """Whether the next prompt fails. Draws for every prompt, so that a seed gives the same
        sequence of failures whatever the rate is set to later."""
        return self._rng.random() < self.fail_rate

    def as_json(self) -> dict[str, Any]:
        return {
            "fail_rate": self.fail_rate,
            "seed": self.seed,
            "hang": self.hang,
            "view_bytes_per_second": self.view_bytes_per_second,
            "output_size": self.output_size,
            "prompt_delay": self.prompt_delay,
            "system_stats_status": self.system_stats_status,
            "prompt_status": self.prompt_status,
            "view_status": self.view_status,
            "view_cut_bytes": self.view_cut_bytes,
        }

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a partial settings object; ValueError (nothing applied) if any value is bad."""
        unknown = set(changes) - set(self.as_json())
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(sorted(unknown))}")
        checked = {name: _CHECKS[name](name, value) for name, value in changes.items()}
        for name, value in checked.items():
            setattr(self, name, value)
        if "seed" in checked:
            self._rng = random.Random(self.seed)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rate(name: str, value: Any) -> float:
    if not (_is_int(value) or isinstance(value, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number from 0 to 1")
    return float(value)


def _seed(name: str, value: Any) -> int | None:
    if value is not None and not _is_int(value):
        raise ValueError(f"{name} must be an integer or null")
    return value  # type: ignore[no-any-return]


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false")
    return value


def _positive(name: str, value: Any) -> int | None:
    if value is not None and not (_is_int(value) and value > 0):
        raise ValueError(f"{name} must be a positive integer or null")
    return value  # type: ignore[no-any-return]


def _size(name: str, value: Any) -> int | None:
    if value is not None and not (_is_int(value) and value >= 0):
        raise ValueError(f"{name} must be a non-negative integer or null")
    return value  # type: ignore[no-any-return]


def _seconds(name: str, value: Any) -> float | None:
    if value is not None and not (
        (_is_int(value) or isinstance(value, float)) and 0 <= value < float("inf")
    ):
        raise ValueError(f"{name} must be a non-negative number of seconds or null")
    return float(value) if value is not None else None


def _error_status(name: str, value: Any) -> int | None:
    if value is not None and not (_is_int(value) and 400 <= value <= 599):
        raise ValueError(f"{name} must be an HTTP error status (400-599) or null")
    return value  # type: ignore[no-any-return]


_CHECKS = {
    "fail_rate": _rate,
    "seed": _seed,
    "hang": _flag,
    "view_bytes_per_second": _positive,
    "output_size": _size,
    "prompt_delay": _seconds,
    "system_stats_status": _error_status,
    "prompt_status": _error_status,
    "view_status": _error_status,
    "view_cut_bytes": _size,
}
