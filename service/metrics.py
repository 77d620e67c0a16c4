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
from typing import Any, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from service import __version__
from service.protocol import Reason

# CPU tasks run from milliseconds to the 25-minute default hard limit; 60 s is the latency
# objective the alert rules use, so it must stay a bucket boundary.
DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800,
)  # fmt: skip
QUEUE_WAIT_BUCKETS: Final = (
    0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800,
)  # fmt: skip

OUTCOMES: Final = ("success", "failed", "retried", "timeout", "crashed", "rejected")
ACTIONS: Final = ("ack", "retry", "dead_letter", "requeue", "return", "stale")
RESTART_REASONS: Final = ("crash", "timeout", "recycle_tasks", "recycle_memory", "abort")
UNKNOWN_TASK: Final = "unknown"


class State:
    """What the scrape-time collector reads; the worker fills in the callables."""

    def __init__(self) -> None:
        self.pool_size: Callable[[], int] = lambda: 0
        self.children_alive: Callable[[], int] = lambda: 0
        self.in_progress: Callable[[], int] = lambda: 0
        self.prefetched: Callable[[], int] = lambda: 0
        self.prefetch_window: Callable[[], int] = lambda: 0
        self.children_cpu_seconds: Callable[[], float] = lambda: 0.0
        self.children_memory_bytes: Callable[[], int] = lambda: 0
        self.connected: Callable[[], bool] = lambda: False
        self.reconnects: Callable[[], int] = lambda: 0
        self.ready: Callable[[], bool] = lambda: False


class _StateCollector(Collector):
    def __init__(self, state: State, queue: str) -> None:
        self._state = state
        self._queue = queue

    def collect(self) -> Iterable[Metric]:
        s, q = self._state, [self._queue]

        def gauge(name: str, doc: str, value: float, labels: bool = True) -> Metric:
            g = GaugeMetricFamily(name, doc, labels=["queue"] if labels else [])
            g.add_metric(q if labels else [], value)
            return g

        yield gauge("hutch_tasks_in_progress", "Tasks running in pool children.", s.in_progress())
        yield gauge(
            "hutch_tasks_prefetched",
            "Deliveries received and not running yet (in the worker, or queued in a child).",
            s.prefetched(),
        )
        yield gauge(
            "hutch_prefetch_window",
            "Deliveries the consumer may hold unacked; it follows the measured task run time.",
            s.prefetch_window(),
        )
        yield gauge("hutch_pool_processes", "Configured pool size.", s.pool_size(), False)
        yield gauge(
            "hutch_pool_processes_alive", "Pool children running.", s.children_alive(), False
        )
        yield gauge(
            "hutch_pool_resident_memory_bytes",
            "Resident memory of the live pool children, as last reported.",
            s.children_memory_bytes(),
            False,
        )
        cpu = CounterMetricFamily(
            "hutch_pool_cpu_seconds", "CPU time used by pool children, including retired ones."
        )
        cpu.add_metric([], s.children_cpu_seconds())
        yield cpu
        yield gauge(
            "hutch_broker_connected",
            "1 while the consuming connection is open.",
            s.connected(),
            False,
        )
        reconnects = CounterMetricFamily(
            "hutch_broker_reconnects", "Consuming connections re-established after a loss."
        )
        reconnects.add_metric([], s.reconnects())
        yield reconnects
        yield gauge(
            "hutch_ready", "1 while consuming and not draining (as /readyz).", s.ready(), False
        )


class Metrics:
    """The worker's registry and the recording calls used on the message path."""

    def __init__(self, queue: str, *, vhost: str = "/", state: State | None = None) -> None:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            raise RuntimeError(
                "PROMETHEUS_MULTIPROC_DIR is set, which switches prometheus-client to mmap "
                "files; hutch keeps all metrics in the parent: unset it"
            )
        # The *_created series would double the series count and nothing here queries them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.queue = queue
        self.state = state or State()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        r.register(_StateCollector(self.state, queue))

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
        for outcome in OUTCOMES:
            self.finished.labels(queue, UNKNOWN_TASK, outcome)
        for action in ACTIONS:
            self.settled.labels(queue, action)
        for reason in Reason:
            self.dead_letters.labels(queue, reason.value)
        for restart in RESTART_REASONS:
            self.restarts.labels(restart)
        self._redelivered = self.redelivered.labels(queue)
        self._queue_wait = self.queue_wait.labels(queue)
        # Labelled children by (metric, labels): `.labels()` takes a lock and builds a key on
        # every call, a measurable share of the parent's per-message time.
        self._series: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def add_task(self, task: str) -> None:
        """Create a task's series up front, so its counters exist at 0."""
        self.received.labels(self.queue, task)
        for outcome in OUTCOMES:
            self.finished.labels(self.queue, task, outcome)
        self.duration.labels(self.queue, task)
        self.task_cpu.labels(self.queue, task)

    # -- the message path -----------------------------------------------------------------

    def _series_of(self, metric: Any, *labels: str) -> Any:
        key = (metric, labels)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = metric.labels(self.queue, *labels)
        return series

    def on_received(self, task: str, redelivered: bool, published: float | None) -> None:
        self._series_of(self.received, task).inc()
        if redelivered:
            self._redelivered.inc()
        if published is not None:
            self._queue_wait.observe(max(0.0, time.time() - published))

    def on_finished(self, task: str, outcome: str, seconds: float, cpu_seconds: float) -> None:
        self._series_of(self.finished, task, outcome).inc()
        if outcome != "rejected":
            self._series_of(self.duration, task).observe(seconds)
            self._series_of(self.task_cpu, task).inc(cpu_seconds)
        if outcome == "success":
            self.last_success.set(time.time())

    def on_settled(self, action: str, reason: str | None = None) -> None:
        self._series_of(self.settled, action).inc()
        if reason is not None:
            self._series_of(self.dead_letters, reason).inc()

    def on_restart(self, reason: str) -> None:
        self.restarts.labels(reason).inc()


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
