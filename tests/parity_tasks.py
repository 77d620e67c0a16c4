"""Tasks of the parity suite (tests/test_parity.py): run by the in-memory stand-in and by a
real ``hutch worker``. Side effects go to the file named by ``HUTCH_PARITY_LOG``."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from service import SoftTimeLimitExceeded, current_task, every, task


def _note(event: str, **fields: Any) -> None:
    with open(os.environ["HUTCH_PARITY_LOG"], "a") as f:
        f.write(json.dumps({"event": event, **fields}) + "\n")


@task(name="parity.add")
def add(a: Any, b: Any = 0) -> Any:
    return a + b


@task(name="parity.echo")
def echo(value: Any) -> Any:
    return value


@task(name="parity.total")
def total(values: list[int]) -> int:
    return sum(values)


@task(name="parity.fails_until", max_attempts=3, retry_backoff=0.1)
def fails_until(n: int) -> int:
    attempt = current_task().attempt
    if attempt < n:
        raise RuntimeError(f"attempt {attempt} of {n}")
    return attempt


@task(name="parity.always_fails", max_attempts=3, retry_backoff=0.1)
def always_fails(*_: Any) -> None:
    raise ValueError(f"attempt {current_task().attempt}")


@task(name="parity.no_retry", max_attempts=1)
def no_retry(*_: Any) -> None:
    raise KeyError("missing")


@task(name="parity.type_error", max_attempts=1)
def type_error() -> None:
    len(5)  # type: ignore[arg-type]


@task(name="parity.exits", max_attempts=1)
def exits() -> None:
    raise SystemExit(3)


@task(name="parity.sleepy", time_limit=1, max_attempts=1)
def sleepy(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


@task(name="parity.sleepy_retry", time_limit=1, max_attempts=2, retry_backoff=0.1)
def sleepy_retry(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


@task(name="parity.soft", soft_time_limit=1, time_limit=4, max_attempts=1)
def soft(seconds: float) -> str:
    try:
        time.sleep(seconds)
    except SoftTimeLimitExceeded:
        return "cleaned up"
    return "finished"


@task(name="parity.returns_set")
def returns_set() -> Any:
    return {1, 2}


@task(name="parity.crash")
def crash() -> None:
    os._exit(1)


@task(name="parity.context")
def context(*_: Any) -> dict[str, Any]:
    ctx = current_task()
    return {
        "task": ctx.task,
        "attempt": ctx.attempt,
        "redelivered": ctx.redelivered,
        "delayed": ctx.eta is not None,
        "flow": ctx.flow is not None,
        "step": ctx.step,
    }


@task(name="parity.on_error")
def on_error(flow_id: str, failed: dict[str, Any], error: dict[str, Any], tag: str) -> None:
    _note("on_error", tag=tag, step=failed["id"], task=failed["task"], type=error["type"])


@task(name="parity.tick", schedule=every(seconds=2))
def tick() -> None:
    ctx = current_task()
    assert ctx.slot is not None
    _note("tick", id=ctx.id, slot=int(ctx.slot.timestamp() * 1000))
