"""The worker's metrics as Prometheus sees them: families built from `service.metrics` at
scrape time, and the text exposition.

Kept apart from the counting so that prometheus-client (about 60 ms to import) stays off the
worker's start-up path: the worker loads this module in a thread once it is consuming, or at
the first scrape, whichever comes first.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    disable_created_metrics,
    generate_latest,
)
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

if TYPE_CHECKING:
    from service.metrics import Counts, Histogram, Metrics, State

# The *_created series would double the series count and nothing here queries them.
disable_created_metrics()  # type: ignore[no-untyped-call]


def registry(metrics: Metrics) -> CollectorRegistry:
    """A registry exporting ``metrics`` (and those of the worker's other queues,
    ``metrics.others``), the process, the platform and the GC."""
    r = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=r)
    PlatformCollector(registry=r)
    GCCollector(registry=r)
    r.register(_Queues([_queue_collectors(m) for m in (metrics, *metrics.others)]))
    build = GaugeMetricFamily(
        "hutch_build_info", "hutch version.", labels=["version", "python_version"]
    )
    build.add_metric([__version__, platform.python_version()], 1)
    r.register(_Constant(build))
    return r


def _queue_collectors(metrics: Metrics) -> list[Collector]:
    # Joins worker series to RabbitMQ's {vhost, queue} series, and labels per-worker
    # gauges (ready, connected, pool) with the queue they serve.
    info = GaugeMetricFamily(
        "hutch_worker_info", "The queue and vhost this worker consumes.", labels=["queue", "vhost"]
    )
    info.add_metric([metrics.queue, metrics.vhost], 1)
    return [
        _StateCollector(metrics.queue, metrics.state),
        _CountsCollector(metrics.queue, metrics.counts),
        _Constant(info),
    ]


class _Queues(Collector):
    """The families of every queue a worker consumes, one family per name.

    The first queue's collectors export everything; a later queue's add only samples that
    carry a ``queue`` label: the rest (the pool, the connection, restarts, the fan-in) are
    the worker's, not a queue's, and are exported once.
    """

    def __init__(self, queues: list[list[Collector]]) -> None:
        self._queues = queues

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for index, collectors in enumerate(self._queues):
            for collector in collectors:
                for family in collector.collect():
                    have = families.get(family.name)
                    if have is None and index == 0:
                        families[family.name] = family
                    elif have is not None:
                        have.samples.extend(s for s in family.samples if "queue" in s.labels)
        yield from families.values()


def exposition(r: CollectorRegistry) -> tuple[str, bytes]:
    """The content type and body of ``GET /metrics``."""
    return CONTENT_TYPE_LATEST, generate_latest(r)


def _add_histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    buckets, total = [], 0
    for bound, count in zip((*histogram.bounds, math.inf), histogram.counts, strict=True):
        total += count
        buckets.append(("+Inf" if bound == math.inf else repr(float(bound)), total))
    family.add_metric(labels, buckets, histogram.sum)


class _StateCollector(Collector):
    """Gauges of current state, read from the stages at scrape time (zeros until watched)."""

    def __init__(self, queue: str, state: State) -> None:
        self._queue = queue
        self._state = state

    def collect(self) -> Iterable[Metric]:
        pool, consumer, q = self._state.pool, self._state.consumer, [self._queue]

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
            "Deliveries the consumer may hold unacked; it follows the measured task run time "
            "and broker round trip.",
            consumer.prefetch if consumer else 0,
        )
        yield gauge(
            "hutch_broker_rtt_seconds",
            "Smoothed round trip to the broker on the consuming connection (0 until measured).",
            self._state.rtt(),
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
        # By node (host:port from the broker URL list), every node from 0: a cluster of a few
        # nodes is a few series, and a failover shows as which node was lost.
        reconnects = CounterMetricFamily(
            "hutch_broker_reconnects",
            "Consuming connections lost (the worker then reconnects, to the next node), "
            "by the node lost.",
            labels=["node"],
        )
        current = GaugeMetricFamily(
            "hutch_broker_node",
            "1 for the broker node the consuming connection is open to, 0 for the others.",
            labels=["node"],
        )
        counted = consumer.reconnects if consumer else {}
        on = consumer.current_node if consumer else None
        for node in self._state.nodes:
            reconnects.add_metric([node], counted.get(node, 0))
            current.add_metric([node], 1 if node == on else 0)
        yield reconnects
        yield current
        yield gauge(
            "hutch_ready",
            "1 while consuming and not draining (as /readyz).",
            self._state.ready(),
            False,
        )


class _CountsCollector(Collector):
    """What the message path counted, as families."""

    def __init__(self, queue: str, counts: Counts) -> None:
        self.queue = queue
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        q, c = self.queue, self._counts

        def counter(name: str, doc: str, labels: list[str], values: Iterable[tuple]) -> Metric:  # type: ignore[type-arg]
            family = CounterMetricFamily(name, doc, labels=labels)
            for *label_values, value in values:
                family.add_metric([str(v) for v in label_values], value)
            return family

        yield counter(
            "hutch_tasks_received",
            "Deliveries received.",
            ["queue", "task"],
            ((q, task, n) for task, n in c.received.items()),
        )
        yield counter(
            "hutch_tasks_finished",
            "Task runs finished, by outcome.",
            ["queue", "task", "outcome"],
            ((q, task, outcome, n) for (task, outcome), n in c.finished.items()),
        )
        yield counter(
            "hutch_messages_settled",
            "Deliveries settled, by action.",
            ["queue", "action"],
            ((q, action, n) for action, n in c.settled.items()),
        )
        yield counter(
            "hutch_dead_letters",
            "Messages dead-lettered, by reason.",
            ["queue", "reason"],
            ((q, reason, n) for reason, n in c.dead_letters.items()),
        )
        yield counter(
            "hutch_messages_redelivered",
            "Deliveries the broker marked as redelivered.",
            ["queue"],
            [(q, c.redelivered)],
        )
        duration = HistogramMetricFamily(
            "hutch_task_duration_seconds",
            "Wall time of a task run in its child.",
            labels=["queue", "task"],
        )
        for task, histogram in c.duration.items():
            _add_histogram(duration, [q, task], histogram)
        yield duration
        wait = HistogramMetricFamily(
            "hutch_task_queue_wait_seconds",
            "Time from publish (AMQP timestamp) to the start of the run.",
            labels=["queue"],
        )
        _add_histogram(wait, [q], c.queue_wait)
        yield wait
        yield counter(
            "hutch_task_cpu_seconds",
            "CPU time used by task runs, by task.",
            ["queue", "task"],
            ((q, task, seconds) for task, seconds in c.task_cpu.items()),
        )
        yield counter(
            "hutch_child_restarts",
            "Pool children replaced, by reason.",
            ["reason"],
            ((reason, n) for reason, n in c.restarts.items()),
        )
        yield counter(
            "hutch_schedule_fires",
            "Fires of periodic tasks published by this worker while it led, by schedule.",
            ["queue", "schedule"],
            ((q, task, n) for task, n in c.fires.items()),
        )
        last_fire = GaugeMetricFamily(
            "hutch_schedule_last_fire_timestamp_seconds",
            "Slot (Unix time) of a schedule's last fire, as the leader knows it.",
            labels=["queue", "schedule"],
        )
        for task, slot in c.last_fire.items():
            last_fire.add_metric([q, task], slot / 1000)
        yield last_fire
        # From the last fire to the slot after it (the leader), else between the next two
        # slots: a weekday schedule's period is 72 h over a weekend.
        period = GaugeMetricFamily(
            "hutch_schedule_period_seconds",
            "Seconds from a schedule's last fire to its next slot.",
            labels=["queue", "schedule"],
        )
        now = int(time.time() * 1000)
        for task, schedule in c.schedules.items():
            fired = c.last_fire.get(task)
            seconds = (
                (schedule.next_after(fired) - fired) / 1000
                if fired is not None
                else schedule.period(now)
            )
            period.add_metric([q, task], seconds)
        yield period
        leader = GaugeMetricFamily(
            "hutch_schedule_leader",
            "1 while this worker leads its queue's schedules.",
            labels=["queue"],
        )
        if c.schedules:  # only a worker with schedules takes part
            leader.add_metric([q], 1 if c.leader else 0)
        yield leader
        yield counter(
            "hutch_flows_started",
            "Flows whose entry step arrived at this worker.",
            ["queue"],
            [(q, c.flows_started)],
        )
        yield counter(
            "hutch_flows_ended",
            "Flows that ended at this worker: finished (last step done) or failed.",
            ["queue", "outcome"],
            ((q, outcome, n) for outcome, n in c.flows_ended.items()),
        )
        yield counter(
            "hutch_blob_offloads",
            "Blobs this worker's children put in the store for results and flow messages too "
            "large to send inline.",
            ["queue"],
            [(q, c.offloads)],
        )
        yield counter(
            "hutch_blob_ref_failures",
            "Blob references a child could not resolve, by kind.",
            ["queue", "kind"],
            ((q, kind, n) for kind, n in c.ref_failures.items()),
        )
        # The fan-in is held by one worker per vhost at a time; the others report 0.
        for name, doc, value in (
            ("hutch_flow_joins_open", "Fan-ins of flows open in this worker.", c.joins_open),
            (
                "hutch_flow_join_records",
                "Fan-in records this worker holds unacked (at most its capacity).",
                c.join_records,
            ),
            (
                "hutch_flow_join_oldest_seconds",
                "Age of the oldest fan-in this worker holds that still waits for members "
                "(0 with none; failed flows' fan-ins, kept for a replay, are left out).",
                c.join_oldest_seconds,
            ),
            (
                "hutch_flow_join_capacity",
                "The most fan-in records one worker holds (--join-capacity).",
                c.join_capacity,
            ),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=[])
            gauge.add_metric([], value)
            yield gauge
        last = GaugeMetricFamily(
            "hutch_last_success_timestamp_seconds",
            "Unix time of the last successful task.",
            labels=["queue"],
        )
        if c.last_success is not None:  # absent until the first success
            last.add_metric([q], c.last_success)
        yield last


class _Constant(Collector):
    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterable[Metric]:
        yield self._metric
