"""Log set-up: human-readable lines, or one JSON object per line for containers.

``HUTCH_LOG_FORMAT=json`` gives ``{"time", "level", "logger", "message"}`` plus ``task``,
``task_id`` and ``attempt`` where a record is about one task (passed as ``extra``). Task
arguments and the broker password never reach a log record in the first place: URLs are logged
through `service.nodes.safe_url` and bodies are never logged.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Final

TASK_FIELDS: Final = ("task", "task_id", "attempt")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in TASK_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def task_fields(task: str, task_id: str, attempt: int) -> dict[str, Any]:
    """``extra=`` for a record about one task run."""
    return {"task": task, "task_id": task_id, "attempt": attempt}


def configure(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stdout if fmt == "json" else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiormq logs every broker-side consumer cancel and reconnect attempt with a traceback;
    # hutch logs those events itself, once, in plain words.
    logging.getLogger("aiormq").setLevel(max(logging.getLevelName(level), logging.ERROR))
