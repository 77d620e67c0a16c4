"""The worker: builds the stages, wires them in flow order, and owns start-up and the drain.

One delivery, from the broker to its ack (each arrow is one call; docs/architecture.md has
the state table)::

    RabbitMQ ─▶ Consumer ─▶ Intake ─▶ Pool ═pipe═▶ child ═pipe═▶ Pool ─▶ Settler ─▶ AckRouter
               consumer.py  admission.py  pool/supervisor.py  pool/child.py  settle.py  acks.py
                              │ refused                                       ▲
                              └───────────────────────────────────────────────┘

Observers (metrics.py, prefetch.py) are told what each stage did; none of them calls a stage
back except `PrefetchControl`, which resizes the consumer's window.

Given several queues (``--queue high,default,low``), the worker builds the stages from the
consumer to the settler once per queue (a `_Lane`: its own consumer, window, settler and
counts), around the one pool and publisher; each job carries its queue's lane, the pool runs
the earliest lane first and `service.priority` pauses a later queue's consumer while an
earlier queue has work waiting.

This module decides nothing about a message: every policy lives in its stage. What it does is
the order of start-up and of the drain. Start-up: spawn the pool's children first, since each is
a fresh interpreter that takes longer to boot than anything else; while they do, load the task
modules and the broker side (the AMQP client is most of the parent's import time, which is why
those stages are imported in `_build`, not at the top), serve the metrics endpoint, connect and
declare; consume once the first child is ready (the others join as they boot). The SIGTERM
drain: stop receiving (basic.cancel); hand back deliveries still waiting in the parent (nack,
uncounted); let the tasks the children hold (running, or queued behind a short one) finish
until ``drain_timeout``, settling each as usual; then kill what is still running and hand it
back too; close; exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.cpus import usable_cpus
from service.errors import ConfigError
from service.observer import Observers
from service.pool.supervisor import Pool
from service.registry import import_task_modules, registered
from service.settings import Settings, parse_addr, time_limit_report

if TYPE_CHECKING:
    from service.admission import Intake
    from service.consumer import Consumer
    from service.health import HealthServer
    from service.joins import Joins
    from service.metrics import Metrics
    from service.nodes import Nodes
    from service.prefetch import PrefetchControl
    from service.scheduler import Scheduler
    from service.settle import Settler

log = logging.getLogger(__name__)

# prometheus-client is imported this long after the worker starts consuming, in a thread: long
# before the first scrape needs it (Prometheus scrapes every 15 s by default; one that comes
# sooner builds the registry itself), and after the first tasks, since the importing thread
# competes with the loop for the GIL (it put 20 ms between a start-up's connection and its
# first ack).
_PREPARE_METRICS_AFTER = 1.0


@dataclass(frozen=True)
class _Lane:
    """The stages of one queue; the worker has one per queue, in priority order."""

    queue: str
    metrics: Metrics
    settler: Settler
    intake: Intake
    consumer: Consumer
    prefetch: PrefetchControl


class Worker:
    """One host's worker for its queues (one, or several in priority order:
    `service.priority`); `run` returns the exit status."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.draining = False
        self._stop = asyncio.Event()
        self._deadline_now = asyncio.Event()

    def _build(self) -> None:
        """The broker-side stages, wired in flow order (see the module docstring): one
        consumer, intake, settler, prefetch control and set of counts per queue, in priority
        order, around the one pool and publisher."""
        # Imported here, once the children are booting (see the module docstring).
        from service.broker import Nodes, Publisher
        from service.joins import Joins
        from service.priority import PriorityControl, PriorityGate
        from service.scheduler import Scheduler

        s = self.settings
        name = f"hutch-worker {socket.gethostname()} pid {os.getpid()}"
        # One shuffled order for every connection of this process, so they fail over together.
        nodes = Nodes(s.broker_url)
        self.publisher = Publisher(nodes, name=name + " publish")
        self.lanes = [
            self._build_lane(lane, queue, name, nodes, self.observers if lane == 0 else None)
            for lane, queue in enumerate(s.queues)
        ]
        first = self.lanes[0]
        self.metrics, self.consumer = first.metrics, first.consumer
        self.metrics.others = [lane.metrics for lane in self.lanes[1:]]
        settlers = [lane.settler for lane in self.lanes]
        self.pool.on_done = lambda job, outcome: settlers[job.lane].finish(job, outcome)
        self.priority = PriorityControl(
            PriorityGate(len(self.lanes)),
            [lane.consumer for lane in self.lanes],
            self.pool,
            [settler.give_back for settler in settlers],
            s.queues,
        )
        # Schedules, the fan-in and pool restarts are the worker's: they report with the
        # first queue (the observers made in `run`).
        observers = self.observers
        schedules = [spec.periodic() for spec in registered().values()]
        self.scheduler: Scheduler | None = None
        if any(schedules):
            self.scheduler = Scheduler(
                nodes,
                s.queues[0],
                [schedule for schedule in schedules if schedule is not None],
                observer=observers,
                name=name + " schedule",
            )
            for schedule in self.scheduler.schedules.values():
                self.metrics.add_schedule(schedule)
        # Every worker stands by to hold the fan-in of flows; the broker picks one at a time.
        self.joins: Joins = Joins(
            nodes,
            capacity=s.join_capacity,
            max_age=s.join_max_age,
            compact_after=min(600.0, s.consumer_timeout / 3),
            observer=observers,
            name=name + " joins",
        )
        self.metrics.counts.join_capacity = s.join_capacity

    def _build_lane(
        self, lane: int, queue: str, name: str, nodes: Nodes, observers: Observers | None
    ) -> _Lane:
        from service.acks import AckRouter
        from service.admission import Intake
        from service.consumer import Consumer
        from service.metrics import Metrics
        from service.prefetch import PrefetchControl, PrefetchWindow, WindowPolicy
        from service.settle import Settler

        s = self.settings
        metrics = Metrics(queue, vhost=nodes.vhost, nodes=[node.address for node in nodes.all])
        acks = AckRouter()
        # Stages report to the observers; the list is filled once every stage exists, since
        # the prefetch control observes the settler and acts on the consumer and the pool.
        observers = observers if observers is not None else Observers()
        settler = Settler(self.publisher, queue, acks=acks, observer=observers)
        intake = Intake(
            self.pool,
            settler,
            observers,
            max_body_size=s.max_body_size,
            max_deliveries=s.max_deliveries,
            lane=lane,
        )
        suffix = f" consume {queue}" if len(s.queues) > 1 else " consume"
        consumer = Consumer(
            nodes,
            queue,
            prefetch=s.prefetch,
            on_message=intake,
            acks=acks,
            on_lost=self._on_connection_lost,
            name=name + suffix,
            paused=True,  # until the pool is up (see run)
        )
        window = PrefetchWindow(
            concurrency=s.concurrency, minimum_buffer=s.prefetch_buffer, seconds=s.prefetch_time
        )
        prefetch = PrefetchControl(
            WindowPolicy(window), consumer, self.pool, settler.give_back, lane=lane
        )
        observers.add(metrics)
        observers.add(prefetch)
        metrics.watch(
            self.pool, consumer, ready=lambda: self.ready()[0], rtt=lambda: window.rtt.seconds
        )
        for task in registered():
            metrics.add_task(task)
        return _Lane(queue, metrics, settler, intake, consumer, prefetch)

    def _on_connection_lost(self) -> None:
        from service.acks import is_stale

        # A delivery from a closed channel can never be acked, and the broker has already
        # requeued it: stop its job now rather than finish work whose result is discarded.
        self.pool.abort(lambda job: is_stale(job.delivery))

    # -- life cycle -----------------------------------------------------------------------

    def request_stop(self) -> None:
        if self._stop.is_set():
            log.warning("second stop signal: returning running tasks now")
            self._deadline_now.set()
        self._stop.set()

    async def run(self) -> int:
        s = self.settings
        assert s.tasks is not None
        loop = asyncio.get_running_loop()
        self.observers = Observers()
        self.pool = Pool(
            s.tasks,
            lanes=len(s.queues),
            size=s.concurrency,
            time_limit=s.time_limit,
            max_depth=s.max_depth,
            max_result_size=s.max_result_size,
            memory_limit=s.memory_limit,
            max_tasks_per_child=s.max_tasks_per_child,
            max_memory_per_child=s.max_memory_per_child,
            on_restart=self.observers.on_restart,
        )
        # One core stays with this process: its imports below are the start-up's critical path.
        starting = self.pool.launch(at_once=usable_cpus() - 1)
        await asyncio.sleep(0)  # the children fork now, before the imports below
        try:
            import_task_modules(s.tasks)
            if not registered():
                log.error("no @task functions found in %s", ", ".join(s.tasks))
                await self._abandon(starting)
                return 2
            self._build()
        except BaseException:
            await self._abandon(starting)
            raise
        info, warnings = time_limit_report(s, registered().values())
        log.info("%s", info)
        for warning in warnings:
            log.warning("%s", warning)
        if s.insecure_tls and "amqps://" in s.broker_url:
            log.warning(
                "TLS CERTIFICATE VERIFICATION IS OFF (HUTCH_INSECURE_TLS): anyone on the path "
                "to the broker can read and forge tasks"
            )
        # The consumer connects and declares while the children finish booting; it starts
        # consuming once they are ready.
        consuming = [loop.create_task(lane.consumer.run()) for lane in self.lanes]
        try:
            health = await self._serve_health()
            await starting
        except BaseException:
            await self._close_consumers(consuming)
            await self.publisher.close()
            await self._abandon(starting)
            raise
        for lane in self.lanes:
            lane.consumer.resume()
        preparing = loop.create_task(self._prepare_metrics())
        log.info(
            "hutch worker: %d children, %s %s, tasks %s, broker %s",
            s.concurrency,
            "queues (highest priority first)" if len(s.queues) > 1 else "queue",
            ", ".join(repr(queue) for queue in s.queues),
            ", ".join(sorted(registered())),
            self.consumer.url,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        watching = [loop.create_task(lane.prefetch.watch()) for lane in self.lanes]
        gating = loop.create_task(self.priority.run()) if len(self.lanes) > 1 else None
        scheduling = loop.create_task(self.scheduler.run()) if self.scheduler else None
        joining = loop.create_task(self.joins.run())
        try:
            await self._stop.wait()
            # The baton and the fan-in records go to another worker at once.
            if self.scheduler is not None and scheduling is not None:
                self.scheduler.close()
                await scheduling
            self.joins.close()
            await joining
            await self.drain()
        finally:
            preparing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await preparing
            for watch in watching:
                watch.cancel()
            if gating is not None:
                self.priority.stop()
                gating.cancel()
            if self.scheduler is not None and scheduling is not None:
                self.scheduler.close()
                await scheduling
            self.joins.close()
            await joining
            await self._close_consumers(consuming)
            await self.publisher.close()
            await self.pool.close()
            if health is not None:
                await health.close()
        return 0

    async def _close_consumers(self, consuming: list[asyncio.Task[None]]) -> None:
        for lane in self.lanes:
            lane.consumer.close()
        await asyncio.gather(*consuming)

    async def _abandon(self, starting: asyncio.Task[None]) -> None:
        """Start-up failed: stop the children, started or starting."""
        with contextlib.suppress(Exception):
            await starting
        await self.pool.close(timeout=0)

    async def _prepare_metrics(self) -> None:
        await asyncio.sleep(_PREPARE_METRICS_AFTER)
        await asyncio.get_running_loop().run_in_executor(None, self.metrics.prepare)

    async def _serve_health(self) -> HealthServer | None:
        from service.health import HealthServer

        addr = self.settings.metrics_addr
        if addr == "off":
            return None
        host, port = parse_addr(addr)
        health = HealthServer(metrics=self.metrics.exposition, live=self.live, ready=self.ready)
        try:
            bound = await health.start(host, port)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {addr}: {exc.strerror}; "
                "choose another --metrics-addr (or 'off')"
            ) from None
        log.info("metrics and probes on http://%s:%d/metrics", *bound[:2])
        return health

    def live(self) -> tuple[bool, str]:
        """The loop answers (or this would not run) and the pool can run tasks."""
        pool = self.pool
        if pool.alive == 0 and pool.respawn_failures >= 3:
            return False, f"no pool child running; {pool.respawn_failures} restarts failed"
        return True, f"ok: {pool.alive}/{pool.size} children"

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        for lane in self.lanes:
            if not lane.consumer.connected:
                return False, f"not connected to the broker (queue {lane.queue!r})"
        # A later queue paused behind an earlier one (service.priority) is working as meant.
        if not self.consumer.consuming:
            return False, "connected but not consuming"
        return True, "ok: consuming"

    async def drain(self) -> None:
        pool = self.pool
        self.draining = True
        self.priority.stop()
        for lane in self.lanes:
            lane.intake.open = False
            lane.prefetch.stop()
        log.info("draining: no new tasks; up to %gs for running ones", self.settings.drain_timeout)
        await asyncio.gather(*(lane.consumer.pause() for lane in self.lanes))
        for job in pool.take_pending():
            self.lanes[job.lane].settler.give_back(job.delivery)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        # in_flight, not running: jobs already queued in a child run next, and those it held
        # when it died go back to the pool's queue to run on its replacement.
        while pool.in_flight and loop.time() < deadline and not self._deadline_now.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, min(0.05, deadline - loop.time()))):
                    await self._deadline_now.wait()
        if pool.in_flight:
            log.warning("drain deadline passed: returning %d unfinished task(s)", pool.in_flight)
            pool.abort_running()
            while pool.in_flight:
                await asyncio.sleep(0.01)
        await asyncio.gather(*(lane.settler.idle() for lane in self.lanes))
        log.info("drained")
