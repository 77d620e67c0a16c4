"""What a running task may know about its own delivery (set in the child, read by tasks)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TaskContext:
    """The delivery a task is running for.

    ``id`` is the message id (the idempotency key; tasks run at least once). ``attempt`` counts
    runs that ended in an error or time-out, from 1. ``deliveries`` is the broker's delivery
    count: above 0 after a crash or lost connection, even on the same attempt.
    """

    id: str
    task: str
    attempt: int
    deliveries: int
    redelivered: bool


_current: TaskContext | None = None


def current_task() -> TaskContext:
    """The context of the task running in this process; only valid inside a task."""
    if _current is None:
        raise RuntimeError("current_task() is only available inside a task run by hutch")
    return _current


def _set_current(ctx: TaskContext | None) -> None:
    global _current
    _current = ctx
