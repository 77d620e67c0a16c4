"""Example CPU-bound tasks for the demo (`python examples/demo.py`)."""

from __future__ import annotations

from service import task


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
