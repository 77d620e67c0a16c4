"""How many deliveries a worker holds: its running tasks plus a buffer sized in time.

A fixed prefetch is wrong one way or the other. A small one (concurrency + 2) starves short
tasks: on a quorum queue each ack goes through Raft before the broker sends the next delivery,
so a window of 4 caps a consumer near a thousand tasks/s whatever its speed. A large one makes
a host hoard long tasks that other hosts could be running (Celery's prefetch multiplier). So
the buffer holds about ``seconds`` of *measured* work per child: hundreds of deliveries for
sub-millisecond tasks, the minimum for tasks that take seconds.

Task time alone is not enough when the broker is far away. A delivery holds its place in the
window from the moment the broker sends it until the broker reads its ack: one round trip
(delivery out, ack back) on top of the run, and one more when the result is published with a
confirm before the ack. Behind 200 ms of round trip, a window sized for 50 ms tasks kept two
children busy a third of the time. So the buffer also holds `ROUND_TRIPS` measured round trips
of work per child: ``window ≈ concurrency * (1 + (seconds + ROUND_TRIPS * rtt) / task)``,
still capped by ``maximum``. The round trip is measured by `PrefetchControl.watch` with a
request that only the broker answers (`service.consumer.Consumer.ping`), on the consuming
connection, and smoothed in `RoundTrip`; a run that is long still shrinks the window to the
minimum (a long run makes the round trip small beside it), so handing back is unchanged.

The estimate rises at once and falls slowly: one slow task (of `RISE_AT_ONCE` or more, or a
running one that is already older than the estimate) shrinks the window immediately, while a
run of fast ones grows it over a few dozen samples.

Applying a new window is not free: RabbitMQ (3.10 at least) applies ``basic.qos`` only to
consumers registered after it on a quorum queue, so a resize re-consumes, and a delivery in
flight to the cancelled consumer at that moment comes back with ``x-delivery-count`` one higher
(seen in tests). So the window grows only on a settled estimate and rarely, straight to its size
rather than in steps; it shrinks at once. `WindowPolicy` holds those rules (pure logic, tested
in tests/test_prefetch.py); `PrefetchControl` feeds it the finished runs and applies its advice
to the consumer and the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from service.observer import Observer
from service.settle import TaskOutcome

if TYPE_CHECKING:
    from service.delivery import Delivery
    from service.pool.jobs import Job

log = logging.getLogger(__name__)

MAX_PREFETCH = 1000  # RabbitMQ's own guidance: past a few hundred, prefetch buys nothing
_FALL = 0.2  # weight of a sample below the estimate
# A run at least this long moves the estimate up at once: a slow task must not be hoarded
# behind. A shorter one counts for at most four times the estimate, half-weighted: on a busy
# host a sub-millisecond task now and then takes a few milliseconds (its child was preempted),
# and answering that with a window a tenth the size cost a third of a no-op drain's throughput.
# A real change to slower short tasks still shows within a few samples, and holding 0.1 s of
# them hoards nothing.
RISE_AT_ONCE = 0.05
_RISE = 0.5  # weight of a shorter sample above the estimate
_RISE_CLIP = 4.0  # a shorter sample above the estimate counts for at most this many times it
# Round trips a delivery spends in flight besides its run: the delivery out and its ack back,
# and the publisher confirm of its result (a task with no result needs one fewer; holding one
# spare round trip of work per child hoards nothing that the time buffer would not).
ROUND_TRIPS = 2
_RTT_WEIGHT = 0.3  # weight of a new round-trip sample (pings every half second)
# A round trip longer than this is taken as this: a stalled link must not open the window to
# the maximum for tasks that take seconds, and past it the cap decides anyway.
RTT_CAP = 5.0


class RoundTrip:
    """The smoothed broker round trip, in seconds (0 until the first sample).

    A sample includes any time the worker's own loop took to notice the answer, so the
    estimate errs long, which only widens the window a little.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.samples = 0

    def observe(self, sample: float) -> None:
        sample = min(max(sample, 0.0), RTT_CAP)
        if self.samples == 0:
            self.seconds = sample
        else:
            self.seconds += _RTT_WEIGHT * (sample - self.seconds)
        self.samples += 1


class PrefetchWindow:
    """The prefetch count for ``concurrency`` children.

    - ``minimum_buffer``: deliveries held beyond the pool size whatever the estimate (the
      window before the first task finishes, and for long tasks).
    - ``seconds``: measured work per child to hold beyond the running tasks (0: never grow).
    - ``maximum``: the largest window, however short the tasks.
    - ``rtt``: the broker round trip (`RoundTrip`), whose work the window holds as well.
    """

    def __init__(
        self,
        *,
        concurrency: int,
        minimum_buffer: int,
        seconds: float,
        maximum: int = MAX_PREFETCH,
        rtt: RoundTrip | None = None,
    ) -> None:
        self.concurrency = concurrency
        self.minimum = concurrency + minimum_buffer
        self.seconds = seconds
        self.maximum = max(maximum, self.minimum)
        self.estimate: float | None = None  # seconds per task, None until one has finished
        self.rtt = rtt or RoundTrip()

    def observe(self, run_seconds: float) -> bool:
        """Take the run time of one finished task; True if the estimate at least doubled (the
        window may have to halve now: smaller moves can wait for the next periodic look)."""
        old = self.estimate
        if old is None:
            self.estimate = run_seconds
            return True
        if run_seconds <= old:
            self.estimate = old + _FALL * (run_seconds - old)
        elif run_seconds >= RISE_AT_ONCE:
            self.estimate = run_seconds
        else:
            self.estimate = old + _RISE * (min(run_seconds, _RISE_CLIP * old) - old)
        return self.estimate >= 2 * old

    def size(self, longest_running: float = 0.0) -> int:
        """The window now; ``longest_running`` is the age of the oldest task still running.

        A running task counts once it is `RISE_AT_ONCE` old: younger, its age says more about
        how busy the parent's loop is than about the task.
        """
        if self.estimate is None or self.seconds <= 0:
            return self.minimum
        running = longest_running if longest_running >= RISE_AT_ONCE else 0.0
        per_task = max(self.estimate, running, 1e-6)
        held = self.seconds + ROUND_TRIPS * self.rtt.seconds
        buffer = math.ceil(held * self.concurrency / per_task)
        return max(self.minimum, min(self.maximum, self.concurrency + buffer))


def worth_changing(current: int, wanted: int) -> bool:
    """Re-consuming costs a round trip: do it for a change of half or double, not for noise."""
    return wanted * 2 <= current or wanted >= current * 2


@dataclass(frozen=True, slots=True)
class Advice:
    """What to do with the window now: apply ``resize_to`` (None: leave it), and whether
    deliveries taken under an earlier, wider window should go back to the queue."""

    resize_to: int | None
    hand_back: bool


class WindowPolicy:
    """When to resize the prefetch window, and when to hand deliveries back.

    - ``grow_every``: seconds between two growths.
    - ``grow_after``: tasks measured since the last resize before the window may grow.
    - ``hand_back_after``: a task running this long makes surplus deliveries go back: a host
      that prefetched hundreds of tasks while they were fast must not sit on them once they
      turn slow.
    """

    def __init__(
        self,
        window: PrefetchWindow,
        *,
        grow_every: float = 2.0,
        grow_after: int = 16,
        hand_back_after: float = 1.0,
    ) -> None:
        self.window = window
        self.grow_every = grow_every
        self.grow_after = grow_after
        self.hand_back_after = hand_back_after
        self.finished = 0  # runs measured
        self._resized_after = 0  # the value of `finished` at the last resize
        self._grown_at = -grow_every

    def observe(self, run_seconds: float) -> bool:
        """Take one finished run; True if the window should be looked at now."""
        self.finished += 1
        return self.window.observe(run_seconds) or self.finished % self.grow_after == 0

    def advise(self, *, now: float, longest_running: float, current: int) -> Advice:
        """``current`` is the window asked for last; ``longest_running`` the age of the oldest
        running task (0 when none is)."""
        wanted = self.window.size(longest_running)
        long_run = longest_running >= self.hand_back_after
        resize_to: int | None = None
        if wanted > current:
            settled = self.finished - self._resized_after >= self.grow_after
            if (
                settled
                and now - self._grown_at >= self.grow_every
                and worth_changing(current, wanted)
            ):
                self._grown_at = now
                self._resized_after = self.finished
                resize_to = wanted
        elif worth_changing(current, wanted) or (wanted < current and long_run):
            # Before handing back, the window must be the one for this long a run: a half-way
            # one would take back some of what is returned.
            self._resized_after = self.finished
            resize_to = wanted
        return Advice(resize_to, hand_back=long_run)


class WindowedConsumer(Protocol):
    """What `PrefetchControl` needs of the consumer (`service.consumer.Consumer`)."""

    @property
    def prefetch(self) -> int: ...
    @property
    def tag(self) -> str | None: ...
    @property
    def window_applied(self) -> bool: ...
    def resize(self, prefetch: int) -> None: ...
    async def ping(self, timeout: float) -> float | None: ...


class JobHolder(Protocol):
    """What `PrefetchControl` needs of the pool (`service.pool.supervisor.Pool`)."""

    def longest_running(self) -> float: ...
    def take_pending(self, where: Callable[[Job], bool] | None = None) -> list[Job]: ...


class PrefetchControl(Observer):
    """Applies `WindowPolicy` to the consumer, fed by every finished run.

    Deliveries handed back go through ``give_back`` (the settler's uncounted requeue). With
    several queues each has its own control; ``lane`` is its queue's lane in the shared pool
    (`service.pool.lanes`), and only that lane's deliveries are ever handed back.
    """

    def __init__(
        self,
        policy: WindowPolicy,
        consumer: WindowedConsumer,
        pool: JobHolder,
        give_back: Callable[[Delivery], None],
        lane: int = 0,
    ) -> None:
        self.lane = lane
        self.policy = policy
        self._consumer = consumer
        self._pool = pool
        self._give_back = give_back
        self._stopped = False

    def on_finished(
        self, task: str | None, outcome: TaskOutcome, seconds: float, cpu_seconds: float
    ) -> None:
        if outcome is not TaskOutcome.REJECTED and self.policy.observe(seconds):
            self.fit()

    def stop(self) -> None:
        """Leave the window alone from now on (the worker is draining)."""
        self._stopped = True

    async def watch(self, interval: float = 0.5) -> None:
        """A task that runs far longer than the estimate says so before it finishes; the
        broker round trip is measured meanwhile."""
        pinging = asyncio.create_task(self.measure_rtt(interval))
        try:
            while True:
                await asyncio.sleep(interval)
                self.fit()
        finally:
            pinging.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pinging

    async def measure_rtt(self, interval: float) -> None:
        """Time a broker round trip every ``interval`` seconds, apart from the fitting loop:
        on a stalled link a ping waits up to `RTT_CAP`, and fitting must not wait with it."""
        rtt = self.policy.window.rtt
        while True:
            await asyncio.sleep(interval)
            sample = await self._consumer.ping(RTT_CAP)
            if sample is not None:
                rtt.observe(sample)

    def fit(self) -> None:
        """Resize the window to the work measured; hand back what a shrunk one does not cover."""
        if self._stopped:
            return
        consumer = self._consumer
        longest = self._pool.longest_running()
        advice = self.policy.advise(
            now=asyncio.get_running_loop().time(),
            longest_running=longest,
            current=consumer.prefetch,
        )
        if advice.resize_to is not None:
            consumer.resize(advice.resize_to)
        if not (advice.hand_back and consumer.window_applied):
            return
        # Deliveries made to an earlier consumer were taken under a wider window; the current
        # consumer's own are bounded by the one it has. Handing back only the former cannot
        # loop: the current consumer is not given more than its window.
        tag, lane = consumer.tag, self.lane
        surplus = self._pool.take_pending(
            lambda job: job.lane == lane and job.delivery.consumer_tag != tag
        )
        if surplus:
            log.info(
                "a task has run %.1fs: prefetch window now %d; returning %d waiting "
                "deliveries to the queue",
                longest,
                consumer.prefetch,
                len(surplus),
            )
        for job in surplus:
            self._give_back(job.delivery)
