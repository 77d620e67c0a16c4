"""Prometheus metrics, all kept in the parent process (pool children never touch them).

Children report their CPU time and resident memory with each result, so no prometheus
multiprocess mode (mmap files, per-PID cleanup) is needed. Label values come from fixed sets
or from the task registry; ids, arguments and error messages never become labels.

Nothing on the message path touches prometheus-client: a delivery adds to plain ints and
floats (and a histogram's bucket list) that collectors turn into metric families at scrape
time, on the same event loop, so no lock is needed. prometheus-client's own ``Counter`` takes a
lock and, per labelled series, builds a key on every call: a measurable share of the parent's
time per message. Gauges of current state (pool size, busy children, connection) are read from
the stages at scrape time too.
"""

from __future__ import annotations

import math
import os
import platform
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from service import __version__
from service.observer import Observer
from service.pool.jobs import RestartReason
from service.protocol import Reason
from service.settle import Action, TaskOutcome

# CPU tasks run from milliseconds to the 840 s default hard limit and beyond; 60 s is the
# latency objective the alert rules use, so it must stay a bucket boundary.
DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800,
)  # fmt: skip
QUEUE_WAIT_BUCKETS: Final = (
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800,
)  # fmt: skip

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
    def reconnects(self) -> int: ...


class _StateCollector(Collector):
    """Gauges of current state, read at scrape time (zeros until `Metrics.watch`)."""

    def __init__(self, queue: str) -> None:
        self._queue = queue
        self.pool: PoolGauges | None = None
        self.consumer: ConsumerGauges | None = None
        self.ready: Callable[[], bool] = lambda: False

    def collect(self) -> Iterable[Metric]:
        pool, consumer, q = self.pool, self.consumer, [self._queue]

        def gauge(name: str, doc: str, value: float, labels: bool = True) -> Metric:
            g = GaugeMetricFamily(name, doc, labels=["queue"] if labels else [])
            g.add_metric(q if labels else [], value)
            return g

        yield gauge(
            "hutch_tasks_in_progress",
            "Tasks running in pool children.",
            pool.running if pool else 0,
        )
        yield gauge(
            "hutch_tasks_prefetched",
            "Deliveries received and not running yet (in the worker, or queued in a child).",
            pool.waiting if pool else 0,
        )
        yield gauge(
            "hutch_prefetch_window",
            "Deliveries the consumer may hold unacked; it follows the measured task run time.",
            consumer.prefetch if consumer else 0,
        )
        yield gauge(
            "hutch_pool_processes", "Configured pool size.", pool.size if pool else 0, False
        )
        yield gauge(
            "hutch_pool_processes_alive", "Pool children running.", pool.alive if pool else 0, False
        )
        yield gauge(
            "hutch_pool_resident_memory_bytes",
            "Resident memory of the live pool children, as last reported.",
            pool.resident_bytes() if pool else 0,
            False,
        )
        cpu = CounterMetricFamily(
            "hutch_pool_cpu_seconds", "CPU time used by pool children, including retired ones."
        )
        cpu.add_metric([], pool.cpu_seconds() if pool else 0.0)
        yield cpu
        yield gauge(
            "hutch_broker_connected",
            "1 while the consuming connection is open.",
            consumer.connected if consumer else False,
            False,
        )
        reconnects = CounterMetricFamily(
            "hutch_broker_reconnects", "Consuming connections re-established after a loss."
        )
        reconnects.add_metric([], consumer.reconnects if consumer else 0)
        yield reconnects
        yield gauge(
            "hutch_ready", "1 while consuming and not draining (as /readyz).", self.ready(), False
        )


class _Histogram:
    """Bucket counts (not cumulative; the last is +Inf), their sum, for one series."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le is inclusive
        self.sum += value

    def add_to(self, family: HistogramMetricFamily, labels: list[str]) -> None:
        buckets, total = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), total))
        family.add_metric(labels, buckets, self.sum)


class _Counts(Collector):
    """What the message path counts, as families at scrape time."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.received: defaultdict[str, int] = defaultdict(int)  # task
        self.finished: defaultdict[tuple[str, str], int] = defaultdict(int)  # task, outcome
        self.settled: defaultdict[str, int] = defaultdict(int)  # action
        self.dead_letters: defaultdict[str, int] = defaultdict(int)  # reason
        self.redelivered = 0
        self.duration: dict[str, _Histogram] = {}  # task
        self.queue_wait = _Histogram(QUEUE_WAIT_BUCKETS)
        self.task_cpu: defaultdict[str, float] = defaultdict(float)  # task
        self.restarts: defaultdict[str, int] = defaultdict(int)  # reason
        self.last_success: float | None = None

    def collect(self) -> Iterable[Metric]:
        q = self.queue

        def counter(name: str, doc: str, labels: list[str], values: Iterable[tuple]) -> Metric:  # type: ignore[type-arg]
            family = CounterMetricFamily(name, doc, labels=labels)
            for *label_values, value in values:
                family.add_metric([str(v) for v in label_values], value)
            return family

        yield counter(
            "hutch_tasks_received",
            "Deliveries received.",
            ["queue", "task"],
            ((q, task, n) for task, n in self.received.items()),
        )
        yield counter(
            "hutch_tasks_finished",
            "Task runs finished, by outcome.",
            ["queue", "task", "outcome"],
            ((q, task, outcome, n) for (task, outcome), n in self.finished.items()),
        )
        yield counter(
            "hutch_messages_settled",
            "Deliveries settled, by action.",
            ["queue", "action"],
            ((q, action, n) for action, n in self.settled.items()),
        )
        yield counter(
            "hutch_dead_letters",
            "Messages dead-lettered, by reason.",
            ["queue", "reason"],
            ((q, reason, n) for reason, n in self.dead_letters.items()),
        )
        yield counter(
            "hutch_messages_redelivered",
            "Deliveries the broker marked as redelivered.",
            ["queue"],
            [(q, self.redelivered)],
        )
        duration = HistogramMetricFamily(
            "hutch_task_duration_seconds",
            "Wall time of a task run in its child.",
            labels=["queue", "task"],
        )
        for task, histogram in self.duration.items():
            histogram.add_to(duration, [q, task])
        yield duration
        wait = HistogramMetricFamily(
            "hutch_task_queue_wait_seconds",
            "Time from publish (AMQP timestamp) to the start of the run.",
            labels=["queue"],
        )
        self.queue_wait.add_to(wait, [q])
        yield wait
        yield counter(
            "hutch_task_cpu_seconds",
            "CPU time used by task runs, by task.",
            ["queue", "task"],
            ((q, task, seconds) for task, seconds in self.task_cpu.items()),
        )
        yield counter(
            "hutch_child_restarts",
            "Pool children replaced, by reason.",
            ["reason"],
            ((reason, n) for reason, n in self.restarts.items()),
        )
        last = GaugeMetricFamily(
            "hutch_last_success_timestamp_seconds",
            "Unix time of the last successful task.",
            labels=["queue"],
        )
        if self.last_success is not None:  # absent until the first success
            last.add_metric([q], self.last_success)
        yield last


class _Constant(Collector):
    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterable[Metric]:
        yield self._metric


class Metrics(Observer):
    """The worker's registry; it observes the stages (`service.observer`) and picks the labels.

    Every label value comes from an enumeration (`TaskOutcome`, `Action`, `Reason`,
    `RestartReason`) or the task registry, so the label sets cannot drift from what the code
    decides; every value is exported at 0 from the start so ``rate()`` and ``absent()`` behave.
    """

    def __init__(self, queue: str, *, vhost: str = "/") -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            raise RuntimeError(
                "PROMETHEUS_MULTIPROC_DIR is set, which switches prometheus-client to mmap "
                "files; hutch keeps all metrics in the parent: unset it"
            )
        # The *_created series would double the series count and nothing here queries them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.queue = queue
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._state = _StateCollector(queue)
        r.register(self._state)
        self._counts = counts = _Counts(queue)
        r.register(counts)
        build = GaugeMetricFamily(
            "hutch_build_info", "hutch version.", labels=["version", "python_version"]
        )
        build.add_metric([__version__, platform.python_version()], 1)
        r.register(_Constant(build))
        # Joins worker series to RabbitMQ's {vhost, queue} series, and labels per-worker
        # gauges (ready, connected, pool) with the queue they serve.
        info = GaugeMetricFamily(
            "hutch_worker_info",
            "The queue and vhost this worker consumes.",
            labels=["queue", "vhost"],
        )
        info.add_metric([queue, vhost], 1)
        r.register(_Constant(info))

        # Every label value shows 0 from the start, so rate() and absent() behave.
        for outcome in TaskOutcome:
            counts.finished[UNKNOWN_TASK, outcome.value] = 0
        for action in Action:
            counts.settled[action.value] = 0
        for reason in Reason:
            counts.dead_letters[reason.value] = 0
        for restart in RestartReason:
            counts.restarts[restart.value] = 0

    def watch(self, pool: PoolGauges, consumer: ConsumerGauges, ready: Callable[[], bool]) -> None:
        """Read the state gauges from these at every scrape."""
        self._state.pool, self._state.consumer, self._state.ready = pool, consumer, ready

    def add_task(self, task: str) -> None:
        """Create a task's series up front, so its counters exist at 0."""
        counts = self._counts
        counts.received[task] += 0
        for outcome in TaskOutcome:
            counts.finished[task, outcome.value] += 0
        counts.duration.setdefault(task, _Histogram(DURATION_BUCKETS))
        counts.task_cpu[task] += 0.0

    # -- the message path -----------------------------------------------------------------

    def on_received(
        self, task: str | None, *, redelivered: bool, runnable_since: float | None
    ) -> None:
        counts = self._counts
        counts.received[task or UNKNOWN_TASK] += 1
        if redelivered:
            counts.redelivered += 1
        if runnable_since is not None:
            counts.queue_wait.observe(max(0.0, time.time() - runnable_since))

    def on_finished(
        self, task: str | None, outcome: TaskOutcome, seconds: float, cpu_seconds: float
    ) -> None:
        counts = self._counts
        task = task or UNKNOWN_TASK
        counts.finished[task, outcome.value] += 1
        if outcome is not TaskOutcome.REJECTED:  # it never ran: no duration to speak of
            histogram = counts.duration.get(task)
            if histogram is None:
                histogram = counts.duration[task] = _Histogram(DURATION_BUCKETS)
            histogram.observe(seconds)
            counts.task_cpu[task] += cpu_seconds
        if outcome is TaskOutcome.SUCCESS:
            counts.last_success = time.time()

    def on_settled(self, action: Action, reason: Reason | None) -> None:
        counts = self._counts
        counts.settled[action.value] += 1
        if reason is not None:
            counts.dead_letters[reason.value] += 1

    def on_restart(self, reason: RestartReason) -> None:
        self._counts.restarts[reason.value] += 1
