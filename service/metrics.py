"""What the worker counts, kept in the parent process (pool children never touch it).

Children report their CPU time and resident memory with each result, so no prometheus
multiprocess mode (mmap files, per-PID cleanup) is needed. Label values come from fixed sets
or from the task registry; ids, arguments and error messages never become labels.

The message path adds to plain ints and floats (and a histogram's bucket list): `Metrics` is an
`service.observer.Observer`, and `service.prometheus` turns the counts into metric families when
scraped, on the same event loop, so no lock is needed. prometheus-client's own ``Counter`` takes
a lock and looks up its labelled child on every call, a measurable share of the parent's time
per message. Gauges of current state (pool size, busy children, connection) are read from the
stages at scrape time.
"""

from __future__ import annotations

import os
import threading
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from service.continuation import FlowEvent
from service.observer import Observer
from service.pool.jobs import RestartReason
from service.protocol import Reason
from service.schedules import Schedule
from service.settle import Action, TaskOutcome
from service.store.errors import RefFailure

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# CPU tasks run from milliseconds to the 840 s default hard limit and beyond; 60 s is the
# latency objective the alert rules use, so it must stay a bucket boundary.
DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800,
)  # fmt: skip
QUEUE_WAIT_BUCKETS: Final = (
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800,
)  # fmt: skip

# The node of the default broker URL, for counts made before (or without) a worker's list.
DEFAULT_NODE: Final = "localhost:5672"

# The label value of deliveries whose task header names no registered task.
UNKNOWN_TASK: Final = "unknown"


class PoolGauges(Protocol):
    """What the scrape reads from the pool (`service.pool.supervisor.Pool`)."""

    @property
    def size(self) -> int: ...
    @property
    def alive(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    def cpu_seconds(self) -> float: ...
    def resident_bytes(self) -> int: ...


class ConsumerGauges(Protocol):
    """What the scrape reads from the consumer (`service.consumer.Consumer`)."""

    @property
    def prefetch(self) -> int: ...
    @property
    def connected(self) -> bool: ...
    @property
    def reconnects(self) -> Mapping[str, int]: ...  # by node address, every node listed
    @property
    def current_node(self) -> str | None: ...  # the address consumed from now


@dataclass
class State:
    """Where the state gauges are read from (nothing until `Metrics.watch`)."""

    pool: PoolGauges | None = None
    consumer: ConsumerGauges | None = None
    ready: Callable[[], bool] = lambda: False
    rtt: Callable[[], float] = lambda: 0.0
    # The broker nodes (host:port) the per-node series are exported for, each from the start.
    nodes: tuple[str, ...] = ()


class Histogram:
    """Bucket counts (not cumulative; the last is +Inf), their sum, for one series."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le is inclusive
        self.sum += value


@dataclass
class Counts:
    """Everything the message path counts, by label value."""

    received: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))  # task
    finished: defaultdict[tuple[str, str], int] = field(  # task, outcome
        default_factory=lambda: defaultdict(int)
    )
    settled: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))  # action
    dead_letters: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    redelivered: int = 0
    duration: dict[str, Histogram] = field(default_factory=dict)  # task
    queue_wait: Histogram = field(default_factory=lambda: Histogram(QUEUE_WAIT_BUCKETS))
    task_cpu: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    restarts: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))  # reason
    last_success: float | None = None
    # Schedules, by task: fires published, the slot last fired (Unix ms, known to the leader).
    fires: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    last_fire: dict[str, int] = field(default_factory=dict)
    schedules: dict[str, Schedule] = field(default_factory=dict)
    leader: bool = False
    # Flows: entry steps seen, flows ended by outcome, and the fan-in this worker holds.
    flows_started: int = 0
    flows_ended: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    joins_open: int = 0
    join_records: int = 0
    join_oldest_seconds: float = 0.0
    join_capacity: int = 0
    # Claim checks: blobs the children put in the store for output, and references they could
    # not resolve, by kind.
    offloads: int = 0
    ref_failures: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))


class Metrics(Observer):
    """The worker's counts; it observes the stages (`service.observer`) and picks the labels.

    Every label value comes from an enumeration (`TaskOutcome`, `Action`, `Reason`,
    `RestartReason`) or the task registry, so the label sets cannot drift from what the code
    decides; every value is exported at 0 from the start so ``rate()`` and ``absent()`` behave.
    """

    def __init__(
        self, queue: str, *, vhost: str = "/", nodes: Sequence[str] = (DEFAULT_NODE,)
    ) -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            raise RuntimeError(
                "PROMETHEUS_MULTIPROC_DIR is set, which switches prometheus-client to mmap "
                "files; hutch keeps all metrics in the parent: unset it"
            )
        self.queue = queue
        self.vhost = vhost
        # The metrics of the worker's later queues, exported with these (`service.prometheus`).
        self.others: list[Metrics] = []
        self.counts = counts = Counts()
        self.state = State(nodes=tuple(nodes))
        self._registry: CollectorRegistry | None = None
        self._registry_lock = threading.Lock()  # `prepare` may run in a thread

        # Every label value shows 0 from the start, so rate() and absent() behave.
        for outcome in TaskOutcome:
            counts.finished[UNKNOWN_TASK, outcome.value] = 0
        for action in Action:
            counts.settled[action.value] = 0
        for reason in Reason:
            counts.dead_letters[reason.value] = 0
        for restart in RestartReason:
            counts.restarts[restart.value] = 0
        for event in FlowEvent:
            counts.flows_ended[event.value] = 0
        for failure in RefFailure:
            counts.ref_failures[failure.value] = 0

    def watch(
        self,
        pool: PoolGauges,
        consumer: ConsumerGauges,
        ready: Callable[[], bool],
        rtt: Callable[[], float] = lambda: 0.0,
    ) -> None:
        """Read the state gauges from these at every scrape (``rtt``: the smoothed broker
        round trip the prefetch window is sized by)."""
        self.state.pool, self.state.consumer, self.state.ready = pool, consumer, ready
        self.state.rtt = rtt

    @property
    def registry(self) -> CollectorRegistry:
        """The Prometheus registry exporting these counts (built, and prometheus-client
        imported, on first use: `prepare` does it ahead of the first scrape)."""
        with self._registry_lock:
            if self._registry is None:
                from service import prometheus

                self._registry = prometheus.registry(self)
            return self._registry

    def prepare(self) -> None:
        """Build the registry now (the worker calls this in a thread once it consumes)."""
        self.registry  # noqa: B018 - built on first access

    def exposition(self) -> tuple[str, bytes]:
        """Content type and body of ``GET /metrics``."""
        from service import prometheus

        return prometheus.exposition(self.registry)

    def add_task(self, task: str) -> None:
        """Create a task's series up front, so its counters exist at 0."""
        counts = self.counts
        counts.received[task] += 0
        for outcome in TaskOutcome:
            counts.finished[task, outcome.value] += 0
        counts.duration.setdefault(task, Histogram(DURATION_BUCKETS))
        counts.task_cpu[task] += 0.0

    # -- the message path -----------------------------------------------------------------

    def on_received(
        self, task: str | None, *, redelivered: bool, runnable_since: float | None
    ) -> None:
        counts = self.counts
        counts.received[task or UNKNOWN_TASK] += 1
        if redelivered:
            counts.redelivered += 1
        if runnable_since is not None:
            counts.queue_wait.observe(max(0.0, time.time() - runnable_since))

    def on_finished(
        self, task: str | None, outcome: TaskOutcome, seconds: float, cpu_seconds: float
    ) -> None:
        counts = self.counts
        task = task or UNKNOWN_TASK
        counts.finished[task, outcome.value] += 1
        if outcome is not TaskOutcome.REJECTED:  # it never ran: no duration to speak of
            histogram = counts.duration.get(task)
            if histogram is None:
                histogram = counts.duration[task] = Histogram(DURATION_BUCKETS)
            histogram.observe(seconds)
            counts.task_cpu[task] += cpu_seconds
        if outcome is TaskOutcome.SUCCESS:
            counts.last_success = time.time()

    def on_settled(self, action: Action, reason: Reason | None) -> None:
        counts = self.counts
        counts.settled[action.value] += 1
        if reason is not None:
            counts.dead_letters[reason.value] += 1

    def on_restart(self, reason: RestartReason) -> None:
        self.counts.restarts[reason.value] += 1

    def on_blobs(self, offloads: int, failure: RefFailure | None) -> None:
        self.counts.offloads += offloads
        if failure is not None:
            self.counts.ref_failures[failure.value] += 1

    # -- schedules ------------------------------------------------------------------------

    def add_schedule(self, schedule: Schedule) -> None:
        """Export a schedule's series (fires at 0, its period) from the start."""
        self.counts.fires[schedule.task] += 0
        self.counts.schedules[schedule.task] = schedule

    def on_leader(self, leading: bool) -> None:
        self.counts.leader = leading
        if not leading:
            self.counts.last_fire.clear()  # the new leader exports it

    def on_fire(self, task: str, slot_ms: int) -> None:
        self.counts.fires[task] += 1
        self.counts.last_fire[task] = slot_ms

    def on_last_fire(self, task: str, slot_ms: int) -> None:
        self.counts.last_fire[task] = slot_ms

    # -- flows ----------------------------------------------------------------------------

    def on_flow_started(self) -> None:
        self.counts.flows_started += 1

    def on_flow_ended(self, event: FlowEvent) -> None:
        self.counts.flows_ended[event.value] += 1

    def on_joins(self, open_joins: int, records: int, oldest_seconds: float) -> None:
        counts = self.counts
        counts.joins_open, counts.join_records = open_joins, records
        counts.join_oldest_seconds = oldest_seconds
