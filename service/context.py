"""What a running task may know about its own delivery (set in the child, read by tasks)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from service.protocol import ETA_HEADER, FLOW_HEADER, FLOW_STEP_HEADER, SLOT_HEADER


@dataclass(frozen=True, slots=True)
class TaskContext:
    """The delivery a task is running for.

    ``id`` is the message id (the idempotency key; tasks run at least once). ``attempt`` counts
    runs that ended in an error or time-out, from 1. ``deliveries`` is the broker's delivery
    count: above 0 after a crash or lost connection, even on the same attempt. ``eta`` is the
    instant a delayed task was scheduled for (None if it was not delayed); ``slot`` the slot a
    periodic task's fire is for (None if it is not a fire). ``flow`` and ``step`` are the
    flow id and the step's path (``"1.0"``: the first member of the group second in the chain)
    when the task runs as a step of a flow (`service.chain`), else None.
    """

    id: str
    task: str
    attempt: int
    deliveries: int
    redelivered: bool
    eta: dt.datetime | None = None
    slot: dt.datetime | None = None
    flow: str | None = None
    step: str | None = None

    @staticmethod
    def from_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
        """The fields a message's headers give: ``eta`` and ``slot`` (Unix ms, as UTC
        datetimes), ``flow`` and ``step``."""
        return {
            "eta": _utc(headers.get(ETA_HEADER)),
            "slot": _utc(headers.get(SLOT_HEADER)),
            "flow": _text(headers.get(FLOW_HEADER)),
            "step": _text(headers.get(FLOW_STEP_HEADER)),
        }


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


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
