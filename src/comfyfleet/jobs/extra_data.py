"""A v2 job's `extra_data` (the partner-node key `api_key_comfy_org`), which Comfy's contract
never lets a server store: held in the memory of the gateway process that accepted the job
and nowhere else, not in PostgreSQL, not in a log, not in any answer.

The job's row names that process (`extra_data_holder`, its ProcessLease id), so only it
claims the job (sql/claim.sql `claim`) and only it sends the prompt again when its
backend is lost. When the holder stops before the job is on a backend for good, nobody can
send it: any live process's tracker fails it with `extra_data_lost` (never runs it without its
key). The key is forgotten when the job ends.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

# The error of a job whose extra_data went with the process that held it.
EXTRA_DATA_LOST = "extra_data_lost"


@dataclass(frozen=True)
class ExtraData:
    """What goes into the `extra_data` of the job's POST /prompt; never shown in a repr."""

    values: dict[str, str] = field(repr=False)


class HeldExtraData:
    """The extra_data of the jobs this process accepted and has not seen end."""

    def __init__(self, holder: int) -> None:
        self.holder = holder  # this process's ProcessLease id, written on the jobs it holds
        self._held: dict[uuid.UUID, ExtraData] = {}

    def hold(self, job_id: uuid.UUID, extra_data: ExtraData) -> None:
        self._held[job_id] = extra_data

    def get(self, job_id: uuid.UUID) -> ExtraData | None:
        return self._held.get(job_id)

    def forget(self, job_id: uuid.UUID) -> None:
        self._held.pop(job_id, None)

    def job_ids(self) -> list[uuid.UUID]:
        return list(self._held)

    def __repr__(self) -> str:
        return f"HeldExtraData(holder={self.holder}, jobs={len(self._held)})"
