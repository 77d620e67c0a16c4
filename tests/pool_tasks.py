"""Tasks for tests/test_pool.py, imported by the pool's children as ``tests.pool_tasks``.

Each one exercises one way a task can end: a value, an exception, a crash, a time-out, too
much memory, output on stdout.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from typing import Any

import service


@service.task
def add(a: int, b: int) -> int:
    return a + b


@service.task
def pid() -> int:
    return os.getpid()


@service.task
def sleep_then(seconds: float, value: Any) -> Any:
    time.sleep(seconds)
    return value


@service.task
def fail(message: str) -> None:
    raise ValueError(message)


class TwoArgError(Exception):
    """Needs two arguments, so ``pickle`` cannot rebuild it from ``args`` alone."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(f"code {code}: {detail}")
        self.code = code
        self.detail = detail


@service.task
def fail_unpicklable() -> None:
    raise TwoArgError(7, "needs two args")


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no string for you")


@service.task
def fail_unprintable() -> None:
    raise UnprintableError()


@service.task
def exit_task() -> None:
    sys.exit(3)


@service.task
def inner_type_error() -> None:
    # A TypeError raised by the task's own code is a failure, not bad arguments.
    len(5)  # type: ignore[arg-type]


@service.task
def unserializable() -> object:
    return object()


@service.task
def huge(n: int) -> str:
    return "x" * n


@service.task
def crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@service.task(time_limit=0.5)
def sleep_forever() -> None:
    time.sleep(60)


@service.task(time_limit=5, soft_time_limit=0.3)
def soft_limited() -> str:
    try:
        time.sleep(10)
    except service.SoftTimeLimitExceeded:
        return "cleaned"
    return "never interrupted"


@service.task(time_limit=1)
def pbkdf2_forever() -> bytes:
    # Hours of C code that never returns to the interpreter loop: only a kill stops it.
    return hashlib.pbkdf2_hmac("sha256", b"password", b"salt", 10**9)


@service.task
def chatty(lines: int) -> int:
    for i in range(lines):
        print(f"line {i} of chatter that must not reach the result pipe")
    # Bytes that look like a frame header, written straight to fd 1 and to sys.stdout.
    os.write(1, b"\x00\x00\x00\x05ready\x00\x00\x00\x01")
    sys.stdout.write("\x00\x00\x00\x02hi\n")
    sys.stdout.flush()
    return lines


@service.task
def allocate(n: int) -> int:
    return len(bytearray(n))


@service.task
def context() -> list[Any]:
    ctx = service.current_task()
    return [ctx.id, ctx.task, ctx.attempt, ctx.deliveries, ctx.redelivered]


@service.task
def echo(value: Any) -> Any:
    return value


_held: list[bytes] = []


@service.task
def hold(n: int) -> int:
    """Keep ``n`` touched bytes alive in this child, so its resident memory grows."""
    _held.append(b"x" * n)
    return sum(len(b) for b in _held)


@service.task
def loaded_modules(prefixes: list[str]) -> list[str]:
    """The modules this child has imported whose names start with one of ``prefixes``."""
    return sorted(name for name in sys.modules if name.startswith(tuple(prefixes)))
