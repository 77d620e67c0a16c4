"""Periodic tasks for tests/test_schedules.py, imported by its workers beside tests.tasks.

Each fire records itself (with its slot) to HUTCH_TEST_LOG through `tests.tasks.record`, so the
checker can count fires per slot across workers.
"""

from __future__ import annotations

from service import current_task, every, task
from tests.tasks import record


@task(schedule=every(seconds=2))
def every_two_seconds() -> None:
    slot = current_task().slot
    record("done", slot=slot.timestamp() if slot else None)


@task(schedule="* * * * *")
def every_minute() -> None:
    slot = current_task().slot
    record("done", slot=slot.timestamp() if slot else None)
