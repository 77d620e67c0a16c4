"""When a busy child may be sent another job behind the ones it holds (pure logic).

A child that finishes a job waits a round trip through the parent for its next one; for tasks of
a millisecond or less that round trip is most of the time. So behind a job whose task is known
to be short the pool queues more, and the child starts each the moment it sends the previous
result. Queueing behind a long task would be wrong twice: the queued job waits that long,
while another child could take it as soon as it is free. Hence the rules below, which look only
at the measured mean run time of each task the child holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

# A second job is queued behind a running one only if the running job's task has a known mean
# run time below this: it bounds the latency the queued job gains (about this much, on average).
PIPELINE_BELOW: Final = 0.02
# Sub-millisecond tasks get a deeper queue, while the known means of everything the child holds
# add up to less than this: the child then reads several jobs per wake-up and the parent writes
# them in one system call, and no queued job waits more than about this long.
QUEUE_BUDGET: Final = 0.002
MAX_JOBS_PER_CHILD: Final = 8
# A busy child is topped up only once it holds this many or fewer: each write to its pipe is a
# system call that wakes it (a fifth of the parent's time per no-op task when every result was
# answered with a write of one job), so jobs go in batches of about half the queue. Tasks for
# which the budget allows fewer queued jobs than this are topped up after every result.
TOP_UP_BELOW: Final = MAX_JOBS_PER_CHILD // 2
MEAN_WEIGHT: Final = 0.2  # weight of the newest duration in a task's moving mean


class Pipelining:
    """Moving mean run time per task, and the rule for queueing behind a running job."""

    def __init__(self) -> None:
        self.means: dict[str, float] = {}  # task name -> moving mean run time in seconds

    def observe(self, task: str, seconds: float) -> None:
        mean = self.means.get(task)
        self.means[task] = seconds if mean is None else mean + MEAN_WEIGHT * (seconds - mean)

    def may_queue(self, held: Sequence[str]) -> bool:
        """Whether a child holding jobs of the tasks ``held`` (running first, in order, and at
        least one) may take one more."""
        if len(held) >= MAX_JOBS_PER_CHILD:
            return False
        means = [self.means.get(task) for task in held]
        known = [mean for mean in means if mean is not None]
        if len(known) < len(means):
            return False  # never queue behind a task not yet measured
        if len(known) == 1:
            return known[0] < PIPELINE_BELOW
        return sum(known) < QUEUE_BUDGET
