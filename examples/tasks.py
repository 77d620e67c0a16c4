"""Example CPU-bound tasks for the demo (`python examples/demo.py`)."""

from __future__ import annotations

import logging

from service import current_task, every, task


@task
def count_primes(limit: int) -> int:
    """Count primes below ``limit`` by trial division: pure-Python CPU work."""
    count = 0
    for n in range(2, limit):
        if all(n % d for d in range(2, int(n**0.5) + 1)):
            count += 1
    return count


@task(name="add")
def add(a: float, b: float) -> float:
    return a + b


@task(schedule=every(seconds=10))
def heartbeat() -> None:
    """A periodic task: one fire every 10 s across all workers of the queue, logged."""
    slot = current_task().slot
    logging.getLogger("examples.heartbeat").warning("heartbeat for slot %s", slot)
