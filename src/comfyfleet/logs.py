"""Logging setup: text for a terminal, or JSON lines for a log pipeline (LOG_FORMAT=json).

A JSON line has `time`, `level`, `logger` and `message`, plus `job_id`, `backend` and
`prompt_id` when the call passed them (`log.info(..., extra=job_fields(job))`).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from comfyfleet.jobs.models import Job

CONTEXT_FIELDS = ("job_id", "backend", "prompt_id")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def job_fields(job: Job) -> dict[str, Any]:
    """`extra=` for a log call about one job."""
    return {"job_id": str(job.id), "backend": job.backend, "prompt_id": job.prompt_id}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, default=str)


def configure_logging(level: str, log_format: Literal["text", "json"]) -> None:
    """The root logger's one handler, on stderr; uvicorn's loggers propagate to it."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
