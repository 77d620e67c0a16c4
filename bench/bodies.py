"""The task bodies every contender runs: ``noop`` and ``spin``, and the calibration of ``spin``.

Plain functions importing no queue library, so hutch (`bench.tasks`), `multiprocessing.Pool`
and the peers (`bench.peers`) all run exactly the same code. ``spin`` takes an iteration count,
not milliseconds: the benchmark calibrates iterations per ms once, in its own process, and
passes the same count to every contender.
"""

from __future__ import annotations

import time


def noop() -> None:
    return None


def spin(iterations: int) -> None:
    """About ``iterations / calibrate()`` ms of CPU: a loop the interpreter cannot skip."""
    x = 0
    for i in range(iterations):
        x = (x * 31 + i) & 0xFFFF
    return None


def calibrate(target_ms: float = 50.0, trials: int = 7) -> float:
    """Iterations of `spin` per millisecond on this machine, from the fastest of ``trials``.

    The fastest trial is the one least disturbed by other load, so tasks built from it take
    at least the nominal time.
    """
    iterations = 20_000
    while True:  # grow until one run takes about target_ms
        started = time.perf_counter()
        spin(iterations)
        elapsed_ms = (time.perf_counter() - started) * 1000
        if elapsed_ms >= target_ms / 4:
            break
        iterations *= 2
    iterations = max(1, int(iterations * target_ms / elapsed_ms))
    best = float("inf")
    for _ in range(trials):
        started = time.perf_counter()
        spin(iterations)
        best = min(best, time.perf_counter() - started)
    return iterations / (best * 1000)


def relay(value: object = None) -> object:
    """A no-op step of a flow: returns its input (the previous step's result), so a chain of
    relays passes one value along and a fan-in's list comes out whole."""
    return value
