"""Prometheus metrics, all kept in the parent process (pool children never touch them).

Children report their CPU time and resident memory with each result, so no prometheus
multiprocess mode (mmap files, per-PID cleanup) is needed. Label values come from fixed sets
or from the task registry; ids, arguments and error messages never become labels.

Gauges that describe current state (pool size, busy children, connection) are read at scrape
time by a collector instead of being updated on every message.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
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

        self.received = Counter(
            "hutch_tasks_received", "Deliveries received.", ["queue", "task"], registry=r
        )
        self.finished = Counter(
            "hutch_tasks_finished",
            "Task runs finished, by outcome.",
            ["queue", "task", "outcome"],
            registry=r,
        )
        self.settled = Counter(
            "hutch_messages_settled", "Deliveries settled, by action.", ["queue", "action"],
            registry=r,
        )  # fmt: skip
        self.dead_letters = Counter(
            "hutch_dead_letters", "Messages dead-lettered, by reason.", ["queue", "reason"],
            registry=r,
        )  # fmt: skip
        self.redelivered = Counter(
            "hutch_messages_redelivered",
            "Deliveries the broker marked as redelivered.",
            ["queue"],
            registry=r,
        )
        self.duration = Histogram(
            "hutch_task_duration_seconds",
            "Wall time of a task run in its child.",
            ["queue", "task"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "hutch_task_queue_wait_seconds",
            "Time from publish (AMQP timestamp) to the start of the run.",
            ["queue"],
            buckets=QUEUE_WAIT_BUCKETS,
            registry=r,
        )
        self.task_cpu = Counter(
            "hutch_task_cpu_seconds",
            "CPU time used by task runs, by task.",
            ["queue", "task"],
            registry=r,
        )
        self.restarts = Counter(
            "hutch_child_restarts", "Pool children replaced, by reason.", ["reason"], registry=r
        )
        self.last_success = _LastSuccess(queue)
        r.register(self.last_success)
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
            self.finished.labels(queue, UNKNOWN_TASK, outcome.value)
        for action in Action:
            self.settled.labels(queue, action.value)
        for reason in Reason:
            self.dead_letters.labels(queue, reason.value)
        for restart in RestartReason:
            self.restarts.labels(restart.value)
        self._redelivered = self.redelivered.labels(queue)
        self._queue_wait = self.queue_wait.labels(queue)
        # Labelled children by (metric, labels): `.labels()` takes a lock and builds a key on
        # every call, a measurable share of the parent's per-message time.
        self._series: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def watch(self, pool: PoolGauges, consumer: ConsumerGauges, ready: Callable[[], bool]) -> None:
        """Read the state gauges from these at every scrape."""
        self._state.pool, self._state.consumer, self._state.ready = pool, consumer, ready

    def add_task(self, task: str) -> None:
        """Create a task's series up front, so its counters exist at 0."""
        self.received.labels(self.queue, task)
        for outcome in TaskOutcome:
            self.finished.labels(self.queue, task, outcome.value)
        self.duration.labels(self.queue, task)
        self.task_cpu.labels(self.queue, task)

    # -- the message path -----------------------------------------------------------------

    def _series_of(self, metric: Any, *labels: str) -> Any:
        key = (metric, labels)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = metric.labels(self.queue, *labels)
        return series

    def on_received(
        self, task: str | None, *, redelivered: bool, runnable_since: float | None
    ) -> None:
        self._series_of(self.received, task or UNKNOWN_TASK).inc()
        if redelivered:
            self._redelivered.inc()
        if runnable_since is not None:
            self._queue_wait.observe(max(0.0, time.time() - runnable_since))

    def on_finished(
        self, task: str | None, outcome: TaskOutcome, seconds: float, cpu_seconds: float
    ) -> None:
        task = task or UNKNOWN_TASK
        self._series_of(self.finished, task, outcome.value).inc()
        if outcome is not TaskOutcome.REJECTED:  # it never ran: no duration to speak of
            self._series_of(self.duration, task).observe(seconds)
            self._series_of(self.task_cpu, task).inc(cpu_seconds)
        if outcome is TaskOutcome.SUCCESS:
            self.last_success.set(time.time())

    def on_settled(self, action: Action, reason: Reason | None) -> None:
        self._series_of(self.settled, action.value).inc()
        if reason is not None:
            self._series_of(self.dead_letters, reason.value).inc()

    def on_restart(self, reason: RestartReason) -> None:
        self.restarts.labels(reason.value).inc()


class _Constant(Collector):
    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterable[Metric]:
        yield self._metric


class _LastSuccess(Collector):
    """hutch_last_success_timestamp_seconds: absent until the first success, then its time."""

    def __init__(self, queue: str) -> None:
        self._queue = queue
        self._value: float | None = None

    def set(self, value: float) -> None:
        self._value = value

    def collect(self) -> Iterable[Metric]:
        g = GaugeMetricFamily(
            "hutch_last_success_timestamp_seconds",
            "Unix time of the last successful task.",
            labels=["queue"],
        )
        if self._value is not None:
            g.add_metric([self._queue], self._value)
        yield g
