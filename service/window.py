"""How many deliveries a worker holds: its running tasks plus a buffer sized in time.

A fixed prefetch is wrong one way or the other. A small one (concurrency + 2) starves short
tasks: on a quorum queue each ack goes through Raft before the broker sends the next delivery,
so a window of 4 caps a consumer near a thousand tasks/s whatever its speed. A large one makes
a host hoard long tasks that other hosts could be running (Celery's prefetch multiplier). So
the buffer holds about ``seconds`` of *measured* work per child: hundreds of deliveries for
sub-millisecond tasks, the minimum for tasks that take seconds.

The estimate rises at once and falls slowly: one slow task (or a running one that is already
older than the estimate) shrinks the window immediately, while a run of fast ones grows it over
a few dozen samples. Pure logic; the worker feeds it and applies the answer.
"""

from __future__ import annotations

import math

MAX_PREFETCH = 1000  # RabbitMQ's own guidance: past a few hundred, prefetch buys nothing
_FALL = 0.2  # weight of a sample below the estimate


class PrefetchWindow:
    """The prefetch count for ``concurrency`` children.

    - ``minimum_buffer``: deliveries held beyond the pool size whatever the estimate (the
      window before the first task finishes, and for long tasks).
    - ``seconds``: measured work per child to hold beyond the running tasks (0: never grow).
    - ``maximum``: the largest window, however short the tasks.
    """

    def __init__(
        self,
        *,
        concurrency: int,
        minimum_buffer: int,
        seconds: float,
        maximum: int = MAX_PREFETCH,
    ) -> None:
        self.concurrency = concurrency
        self.minimum = concurrency + minimum_buffer
        self.seconds = seconds
        self.maximum = max(maximum, self.minimum)
        self.estimate: float | None = None  # seconds per task, None until one has finished

    def observe(self, run_seconds: float) -> bool:
        """Take the run time of one finished task; True if the estimate at least doubled (the
        window may have to halve now: smaller moves can wait for the next periodic look)."""
        if self.estimate is None or run_seconds > self.estimate:
            doubled = self.estimate is None or run_seconds >= 2 * self.estimate
            self.estimate = run_seconds
            return doubled
        self.estimate += _FALL * (run_seconds - self.estimate)
        return False

    def size(self, longest_running: float = 0.0) -> int:
        """The window now; ``longest_running`` is the age of the oldest task still running."""
        if self.estimate is None or self.seconds <= 0:
            return self.minimum
        per_task = max(self.estimate, longest_running, 1e-6)
        buffer = math.ceil(self.seconds * self.concurrency / per_task)
        return max(self.minimum, min(self.maximum, self.concurrency + buffer))


def worth_changing(current: int, wanted: int) -> bool:
    """Re-consuming costs a round trip: do it for a change of half or double, not for noise."""
    return wanted * 2 <= current or wanted >= current * 2
