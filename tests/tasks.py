"""Tasks the broker tests run in real workers. Each records what happened to HUTCH_TEST_LOG.

Records are single JSON lines appended with O_APPEND, so concurrent children never interleave
them, and a SIGKILL loses nothing already written.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from typing import Any

from service import SoftTimeLimitExceeded, current_task, task


def record(event: str, **extra: Any) -> None:
    path = os.environ.get("HUTCH_TEST_LOG")
    if not path:
        return
    ctx = current_task()
    line = json.dumps(
        {
            "event": event,
            "id": ctx.id,
            "task": ctx.task,
            "attempt": ctx.attempt,
            "deliveries": ctx.deliveries,
            "redelivered": ctx.redelivered,
            "pid": os.getpid(),
            "time": time.time(),
            **extra,
        }
    )
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@task
def add(a: float, b: float) -> float:
    return a + b


@task
def slow_square(x: int) -> int:
    time.sleep((5 - x) * 0.05)
    return x * x


@task
def noop() -> None:
    return None


@task
def work(seconds: float = 0.0) -> str:
    """Sleep (holding a pool slot), recording start and done: the checker's unit of work."""
    record("start")
    time.sleep(seconds)
    record("done")
    return current_task().id


@task
def spin(seconds: float) -> int:
    """Burn CPU for ``seconds``."""
    record("start")
    end = time.process_time() + seconds
    n = 0
    while time.process_time() < end:
        n += 1
    record("done")
    return n


@task(max_attempts=3, retry_backoff=1.0)
def always_fails() -> None:
    record("start")
    raise ValueError("this task always fails")


@task(max_attempts=4, retry_backoff=1.0)
def fails_until(attempt: int) -> int:
    """Raise on attempts before ``attempt``; then succeed, returning the attempt number."""
    record("start")
    if current_task().attempt < attempt:
        raise RuntimeError(f"attempt {current_task().attempt} fails on purpose")
    record("done")
    return current_task().attempt


@task
def kill_own_child() -> None:
    """Poison: SIGKILLs the pool child running it, on every delivery."""
    record("start")
    os.kill(os.getpid(), signal.SIGKILL)


@task
def crash_first_delivery(seconds: float = 0.0) -> str:
    """SIGKILLs its child on the first delivery only; succeeds when redelivered."""
    record("start")
    time.sleep(seconds)
    if current_task().deliveries == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    record("done")
    return current_task().id


@task(time_limit=1.0, max_attempts=2, retry_backoff=1.0)
def sleep_forever() -> None:
    record("start")
    time.sleep(3600)


@task(time_limit=1.0, max_attempts=1)
def spin_in_c() -> bytes:
    """Minutes of work inside one C call: only a kill can stop it."""
    record("start")
    return hashlib.pbkdf2_hmac("sha256", b"password", b"salt", 2**31 - 1)


@task(time_limit=10.0, soft_time_limit=0.5, max_attempts=1)
def soft_limited() -> str:
    record("start")
    try:
        time.sleep(5)
    except SoftTimeLimitExceeded:
        record("cleanup")
        return "cleaned up"
    return "not interrupted"


class NeedsTwoArgs(Exception):
    """Cannot be unpickled: its __init__ needs two arguments, pickling passes one."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"needs two args: {a}, {b}")


@task(max_attempts=1)
def unpicklable_error() -> None:
    raise NeedsTwoArgs(1, 2)


@task
def unserializable_result() -> object:
    return object()


@task
def big_result(size: int) -> str:
    return "x" * size


@task
def recorded_result(size: int) -> str:
    """A ``size``-character result, with the run recorded (tests/test_network.py)."""
    record("start")
    record("done")
    return "x" * size


@task(max_attempts=1)
def hog_memory(gib: int) -> int:
    return len(bytearray(gib << 30))


@task
def timed() -> dict[str, float | None]:
    """Record when it started and the ETA it was delayed to (for tests/test_delays.py)."""
    ctx = current_task()
    eta = ctx.eta.timestamp() if ctx.eta else None
    record("done", eta=eta)
    return {"started": time.time(), "eta": eta}
