"""Tasks for tests/test_testing.py: a week of retries, a daily schedule in Berlin, a pipeline."""

from __future__ import annotations

from typing import Any

from service import current_task, task

fires: list[Any] = []


@task(name="testing.flaky", max_attempts=25, retry_backoff=60, retry_backoff_max=86_400)
def flaky() -> None:
    raise ConnectionError(f"still down at attempt {current_task().attempt}")


@task(name="testing.report", schedule="30 2 * * *", schedule_tz="Europe/Berlin")
def report() -> None:
    slot = current_task().slot
    assert slot is not None
    fires.append(slot)


@task(name="testing.part")
def part(n: int) -> int:
    if n < 0:
        raise ValueError(f"negative part {n}")
    return n * 2


@task(name="testing.combine")
def combine(parts: list[int]) -> int:
    return sum(parts)


@task(name="testing.failed")
def failed(flow_id: str, step: dict[str, Any], error: dict[str, Any]) -> None:
    fires.append(("failed", step["id"], error["type"]))
