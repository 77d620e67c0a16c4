"""The pool's waiting jobs in strict priority lanes, one per queue a worker consumes.

A worker given several queues (``--queue high,default,low``) runs them in one pool; lane 0 is
the first queue. A free child always takes the head of the first non-empty lane, so a
delivery of a later queue never starts while one of an earlier queue waits in the parent.
Within a lane the order is the order of arrival, as with one queue. `Lanes` has the few deque
operations the pool uses (`service.pool.supervisor`), so one queue costs what a deque did.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from service.pool.jobs import Job


class Lanes:
    """``count`` FIFO lanes of jobs; `popleft` takes from the first non-empty one."""

    def __init__(self, count: int = 1) -> None:
        self._lanes: list[deque[Job]] = [deque() for _ in range(max(1, count))]
        self._size = 0

    def _lane(self, job: Job) -> deque[Job]:
        # A job of an unknown lane (none is made) waits in the last: never ahead of others.
        return self._lanes[min(job.lane, len(self._lanes) - 1)]

    def append(self, job: Job) -> None:
        self._lane(job).append(job)
        self._size += 1

    def appendleft(self, job: Job) -> None:
        """Back to the front of its own lane (a bystander of a dead child runs next)."""
        self._lane(job).appendleft(job)
        self._size += 1

    def popleft(self) -> Job:
        for lane in self._lanes:
            if lane:
                self._size -= 1
                return lane.popleft()
        raise IndexError("pop from empty lanes")

    def take(self, where: Callable[[Job], bool] | None = None) -> list[Job]:
        """Remove and return the jobs ``where`` accepts (all without it), lane by lane."""
        taken: list[Job] = []
        for index, lane in enumerate(self._lanes):
            if where is None:
                taken.extend(lane)
                lane.clear()
                continue
            chosen = [job for job in lane if where(job)]
            if chosen:
                taken.extend(chosen)
                self._lanes[index] = deque(job for job in lane if not where(job))
        self._size -= len(taken)
        return taken

    def waiting(self, lane: int) -> int:
        """Jobs waiting in ``lane``."""
        return len(self._lanes[lane]) if 0 <= lane < len(self._lanes) else 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def __iter__(self) -> Iterator[Job]:
        for lane in self._lanes:
            yield from lane
