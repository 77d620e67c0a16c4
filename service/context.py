"""What a running task may know about its own delivery (set in the child, read by tasks)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.protocol import ETA_HEADER, SLOT_HEADER


@dataclass(frozen=True, slots=True)
class TaskContext:
    """The delivery a task is running for.

    ``id`` is the message id (the idempotency key; tasks run at least once). ``attempt`` counts
    runs that ended in an error or time-out, from 1. ``deliveries`` is the broker's delivery
    count: above 0 after a crash or lost connection, even on the same attempt. ``eta`` is the
    instant a delayed task was scheduled for (None if it was not delayed); ``slot`` the slot a
    periodic task's fire is for (None if it is not a fire).
    """

    id: str
    task: str
    attempt: int
    deliveries: int
    redelivered: bool
    eta: dt.datetime | None = None
    slot: dt.datetime | None = None

    @staticmethod
    def times(headers: Mapping[str, Any]) -> dict[str, dt.datetime | None]:
        """``eta`` and ``slot`` from a message's headers (Unix ms), as UTC datetimes."""
        return {
            field: _utc(headers.get(name))
            for field, name in (("eta", ETA_HEADER), ("slot", SLOT_HEADER))
        }


def _utc(ms: object) -> dt.datetime | None:
    if not isinstance(ms, int) or isinstance(ms, bool):
        return None
    try:
        return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None


_current: TaskContext | None = None


def current_task() -> TaskContext:
    """The context of the task running in this process; only valid inside a task."""
    if _current is None:
        raise RuntimeError("current_task() is only available inside a task run by hutch")
    return _current


def _set_current(ctx: TaskContext | None) -> None:
    global _current
    _current = ctx
