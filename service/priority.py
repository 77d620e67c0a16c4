"""Strict priority between the queues of one worker: a later queue is consumed only while no
earlier queue has work waiting.

``hutch worker --queue high,default,low`` consumes every queue into one pool. Two things make
the order strict:

- The pool keeps one lane per queue (`service.pool.lanes`): a free child always takes the
  earliest queue's waiting task. That alone decides what *runs* first.
- It does not stop a later queue from being *held*: its consumer keeps a prefetch window of
  deliveries that cannot start while an earlier queue has work, and that another host could
  be running. So each later queue's consumer is paused (``basic.cancel``) as soon as an earlier
  queue has a task waiting in this worker, and the deliveries it holds that have not started
  go back to the broker (uncounted, as a drain returns them; those already queued in a child
  run). It consumes again once every earlier queue has had nothing waiting for
  ``resume_after`` seconds, which keeps a queue near saturation from pausing and resuming on
  every delivery.

Every queue keeps its own consumer and its own time-sized window (`service.prefetch`): with
the earlier queues empty a later queue runs at the speed it would alone. While paused, a later
queue holds nothing but what had already been sent to a child, so a low queue is never hoarded
while a high one waits. The price: when the earlier queues empty, the later one starts again
one round trip later (the new consumer's first deliveries).

`PriorityGate` is the rule (pure logic, tested in tests/test_priority.py); `PriorityControl`
applies it to the consumers and the pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from service.delivery import Delivery
    from service.pool.jobs import Job

log = logging.getLogger(__name__)

RESUME_AFTER = 0.5  # seconds the earlier queues must have had nothing waiting
CHECK_EVERY = 0.02  # seconds between two looks (a look counts a few jobs)


class PriorityGate:
    """Which of ``lanes`` queues may consume, from how many tasks each has waiting.

    Lane 0 always consumes. Lane ``i`` pauses at once when any lane before it has a task
    waiting, and consumes again once none has for ``resume_after`` seconds.
    """

    def __init__(self, lanes: int, *, resume_after: float = RESUME_AFTER) -> None:
        self.resume_after = resume_after
        self.paused = [False] * lanes
        # When each lane's earlier lanes last had work waiting (loop time).
        self._busy_above = [float("-inf")] * lanes

    def look(self, waiting: Sequence[int], now: float) -> tuple[list[int], list[int]]:
        """``waiting[i]``: tasks of lane ``i`` received and not started. Returns the lanes to
        pause now and the lanes to resume now."""
        pause, resume = [], []
        above = 0
        for lane, count in enumerate(waiting):
            if lane > 0:
                if above:
                    self._busy_above[lane] = now
                    if not self.paused[lane]:
                        self.paused[lane] = True
                        pause.append(lane)
                elif self.paused[lane] and now - self._busy_above[lane] >= self.resume_after:
                    self.paused[lane] = False
                    resume.append(lane)
            above += count
        return pause, resume


class GatedConsumer(Protocol):
    """What `PriorityControl` needs of a consumer (`service.consumer.Consumer`)."""

    async def pause(self) -> None: ...
    def resume(self) -> None: ...


class LaneHolder(Protocol):
    """What `PriorityControl` needs of the pool (`service.pool.supervisor.Pool`)."""

    def waiting_in(self, lane: int) -> int: ...
    def take_pending(self, where: Callable[[Job], bool] | None = None) -> list[Job]: ...


class PriorityControl:
    """Pauses and resumes the consumers of lanes 1.. as `PriorityGate` says; a paused lane's
    waiting deliveries go back through ``give_back[lane]`` (its settler's uncounted requeue)."""

    def __init__(
        self,
        gate: PriorityGate,
        consumers: Sequence[GatedConsumer],
        pool: LaneHolder,
        give_back: Sequence[Callable[[Delivery], None]],
        names: Sequence[str],
    ) -> None:
        self.gate = gate
        self._consumers = consumers
        self._pool = pool
        self._give_back = give_back
        self._names = names
        self._stopped = False

    def stop(self) -> None:
        """Leave the consumers alone from now on (the worker is draining)."""
        self._stopped = True

    async def run(self, interval: float = CHECK_EVERY) -> None:
        loop = asyncio.get_running_loop()
        lanes = range(len(self._consumers))
        while not self._stopped:
            waiting = [self._pool.waiting_in(lane) for lane in lanes]
            pause, resume = self.gate.look(waiting, loop.time())
            for lane in pause:
                await self._consumers[lane].pause()
                if self._stopped:
                    return
            for lane in resume:
                self._consumers[lane].resume()
                log.debug("queue %r consuming again", self._names[lane])
            # At every look, not only on pausing: a consume already on its way when the pause
            # came still registers (and is cancelled next), and its deliveries arrive later.
            for lane in lanes:
                if self.gate.paused[lane] and self._pool.waiting_in(lane):
                    self._hand_back(lane)
            await asyncio.sleep(interval)

    def _hand_back(self, lane: int) -> None:
        held = self._pool.take_pending(lambda job: job.lane == lane)
        for job in held:
            self._give_back[lane](job.delivery)
        if held:
            log.debug(
                "queue %r paused behind an earlier queue: %d deliveries returned",
                self._names[lane],
                len(held),
            )
