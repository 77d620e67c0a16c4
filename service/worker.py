"""The worker: wires consumer → pool → settler and owns start-up and the SIGTERM drain.

Drain, in order: stop receiving (basic.cancel); hand back deliveries still waiting in the
parent (nack, uncounted); let the tasks the children hold (running, or queued behind a short
one) finish until ``drain_timeout``, settling each as usual; then kill what is still running
and hand it back too; close; exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Coroutine
from typing import Any
from urllib.parse import unquote, urlsplit

from aio_pika.abc import AbstractIncomingMessage

from service.broker import Publisher, safe_url
from service.consumer import Consumer, Refusal, admit
from service.errors import ConfigError
from service.httpserver import HealthServer, parse_addr
from service.metrics import UNKNOWN_TASK, Metrics
from service.pool import Job, Outcome, OutcomeKind, Pool, RestartReason
from service.protocol import DUE_HEADER, TASK_HEADER
from service.registry import import_task_modules, lookup, registered
from service.settings import Settings
from service.settle import Action, Settler, decide, is_stale
from service.window import PrefetchWindow, worth_changing

_OUTCOME_LABELS = {
    OutcomeKind.OK: "success",
    OutcomeKind.ERROR: "failed",
    OutcomeKind.TIMEOUT: "timeout",
    OutcomeKind.CRASHED: "crashed",
    OutcomeKind.REJECTED: "rejected",
}

log = logging.getLogger(__name__)

# Each resize re-consumes, and on RabbitMQ 3.10 a delivery in flight to the cancelled consumer
# at that moment comes back with x-delivery-count one higher (seen in tests): so the window
# grows only on a settled estimate and rarely, straight to its size rather than in steps.
_GROW_EVERY = 2.0  # seconds between two growths of the prefetch window
_GROW_AFTER = 16  # tasks measured since the last resize before the window may grow
_HAND_BACK_AFTER = 1.0  # a task running this long makes surplus deliveries go back


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        name = f"hutch-worker {socket.gethostname()} pid {os.getpid()}"
        self.metrics = Metrics(settings.queue, vhost=_vhost(settings.broker_url))
        self.publisher = Publisher(settings.broker_url, name=name + " publish")
        self.consumer = Consumer(
            settings.broker_url,
            settings.queue,
            prefetch=settings.prefetch,
            on_message=self._on_message,
            on_lost=self._on_connection_lost,
            name=name + " consume",
        )
        self.settler = Settler(
            self.publisher,
            settings.queue,
            acks=self.consumer,
            on_settled=self.metrics.on_settled,
        )
        self.window = PrefetchWindow(
            concurrency=settings.concurrency,
            minimum_buffer=settings.prefetch_buffer,
            seconds=settings.prefetch_time,
        )
        self._grown_at = -_GROW_EVERY
        self._finished = 0  # tasks measured, to look at the window every 16th
        self._resized_after = 0  # the value of _finished at the last resize
        self.pool: Pool | None = None
        self.draining = False
        self._stop = asyncio.Event()
        self._deadline_now = asyncio.Event()
        self._settling: set[asyncio.Future[None]] = set()  # settle tasks and pending acks
        self._health: HealthServer | None = None

    # -- flow -----------------------------------------------------------------------------

    def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Plain function, not a coroutine: it never waits, and aio-pika would otherwise make a
        # task per delivery.
        if self.draining or self.pool is None:
            self._track(self.settler.requeue(message, counted=False))
            return
        task = message.headers.get(TASK_HEADER)
        label = task if isinstance(task, str) and lookup(task) is not None else UNKNOWN_TASK
        self.metrics.on_received(label, bool(message.redelivered), _waiting_since(message))
        verdict = admit(
            message,
            max_body_size=self.settings.max_body_size,
            max_deliveries=self.settings.max_deliveries,
        )
        if isinstance(verdict, Refusal):
            log.warning(
                "dead-lettering message %s: %s (%s)",
                message.message_id,
                verdict.reason,
                verdict.detail,
            )
            self.metrics.on_finished(label, "rejected", 0.0, 0.0)
            self._track(
                self.settler.dead_letter(message, verdict.reason, verdict.reason, verdict.detail)
            )
            return
        self.pool.submit(verdict)

    def _on_connection_lost(self) -> None:
        # A delivery from a closed channel can never be acked, and the broker has already
        # requeued it: stop its job now rather than finish work whose result is discarded.
        if self.pool is not None:
            self.pool.abort(lambda job: is_stale(job.delivery))

    def _on_done(self, job: Job, outcome: Outcome) -> None:
        loop = asyncio.get_running_loop()
        action = decide(job, outcome)
        label = _OUTCOME_LABELS.get(outcome.kind)
        if label is not None:
            if outcome.kind is OutcomeKind.ERROR and action is Action.RETRY:
                label = "retried"
            took = loop.time() - job.started
            self.metrics.on_finished(job.spec.name, label, took, job.cpu_seconds)
            if outcome.kind is not OutcomeKind.REJECTED:
                self._finished += 1
                if self.window.observe(took) or self._finished % _GROW_AFTER == 0:
                    self._fit_window()
        if action is Action.ACK and not (job.delivery.reply_to and outcome.payload is not None):
            pending = self.settler.ack_soon(job.delivery)
            if pending is not None:
                self._settling.add(pending)
                pending.add_done_callback(self._settling.discard)
        else:
            self._track(self.settler.settle(job, outcome, action))

    def _fit_window(self) -> None:
        """Resize the prefetch window to the work measured.

        It grows once `_GROW_AFTER` tasks have been measured since the last resize, and at most
        once per `_GROW_EVERY`; it shrinks at once. When a task has run longer than
        `_HAND_BACK_AFTER` and the shrunk window is in place, deliveries that have not started
        and came under the old window go back to the queue for idle hosts: a host that
        prefetched hundreds of tasks while they were fast must not sit on them once they turn
        slow.
        """
        pool = self.pool
        if pool is None or self.draining:
            return
        longest = pool.longest_running()
        wanted = self.window.size(longest)
        current = self.consumer.prefetch
        if wanted > current:
            now = asyncio.get_running_loop().time()
            settled = self._finished - self._resized_after >= _GROW_AFTER
            if settled and now - self._grown_at >= _GROW_EVERY and worth_changing(current, wanted):
                self._grown_at = now
                self._resized_after = self._finished
                self.consumer.resize(wanted)
        elif worth_changing(current, wanted) or (wanted < current and longest >= _HAND_BACK_AFTER):
            # Before handing back, the window must be the one for this long a run: a
            # half-way one would take back some of what is returned.
            self._resized_after = self._finished
            self.consumer.resize(wanted)
        if longest >= _HAND_BACK_AFTER and self.consumer.window_applied:
            # Deliveries made to an earlier consumer were taken under a wider window; the
            # current consumer's own are bounded by the one it has. Handing back only the
            # former cannot loop: the current consumer is not given more than its window.
            tag = self.consumer.tag
            surplus = pool.take_pending(lambda job: job.delivery.consumer_tag != tag)
            if surplus:
                log.info(
                    "a task has run %.1fs: prefetch window now %d; returning %d waiting "
                    "deliveries to the queue",
                    longest,
                    self.consumer.prefetch,
                    len(surplus),
                )
            for job in surplus:
                self._track(self.settler.requeue(job.delivery, counted=False))

    async def _watch_window(self) -> None:
        # A task that runs far longer than the estimate says so before it finishes.
        while True:
            await asyncio.sleep(0.5)
            self._fit_window()

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._settling.add(task)
        task.add_done_callback(self._settled)

    def _settled(self, task: asyncio.Task[None]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("settling failed", exc_info=task.exception())

    # -- life cycle -----------------------------------------------------------------------

    def check_limits(self) -> None:
        """Warn about time limits the broker's consumer_timeout would cut short.

        AMQP does not expose the broker's consumer_timeout, so it is taken from the setting
        (default: RabbitMQ's default of 30 min) and said so at start-up.
        """
        # The broker's clock starts at delivery: a delivery in the prefetch buffer can wait one
        # whole run of the task ahead of it before its own run starts.
        runs = 2 if self.settings.prefetch_buffer else 1
        budget = (self.settings.consumer_timeout - 60) / runs
        longest = max(
            (spec.time_limit or self.settings.time_limit for spec in registered().values()),
            default=self.settings.time_limit,
        )
        log.info(
            "RabbitMQ's consumer_timeout cannot be read over AMQP: assuming %gs "
            "(--consumer-timeout); the longest hard time limit is %gs",
            self.settings.consumer_timeout,
            longest,
        )
        for spec in registered().values():
            limit = spec.time_limit or self.settings.time_limit
            if limit > budget:
                log.warning(
                    "task %s has a hard time limit of %gs, but RabbitMQ's consumer_timeout "
                    "(%gs assumed; set --consumer-timeout to what the broker uses) closes the "
                    "channel of any delivery unacked that long, and a prefetched delivery can "
                    "wait one run before its own: keep limits below %gs "
                    "(or --prefetch-buffer 0, which allows %gs)",
                    spec.name,
                    limit,
                    self.settings.consumer_timeout,
                    budget,
                    self.settings.consumer_timeout - 60,
                )

    def request_stop(self) -> None:
        if self._stop.is_set():
            log.warning("second stop signal: returning running tasks now")
            self._deadline_now.set()
        self._stop.set()

    async def run(self) -> int:
        s = self.settings
        import_task_modules(s.tasks)
        if not registered():
            log.error("no @task functions found in %s", ", ".join(s.tasks))
            return 2
        self.check_limits()
        if s.insecure_tls and s.broker_url.startswith("amqps://"):
            log.warning(
                "TLS CERTIFICATE VERIFICATION IS OFF (HUTCH_INSECURE_TLS): anyone on the path "
                "to the broker can read and forge tasks"
            )
        self.pool = Pool(
            s.tasks,
            size=s.concurrency,
            on_done=self._on_done,
            time_limit=s.time_limit,
            max_depth=s.max_depth,
            max_result_size=s.max_result_size,
            memory_limit=s.memory_limit,
            max_tasks_per_child=s.max_tasks_per_child,
            max_memory_per_child=s.max_memory_per_child,
            on_restart=self._on_restart,
        )
        for name in registered():
            self.metrics.add_task(name)
        self._observe(self.pool)
        if s.metrics_addr != "off":
            host, port = parse_addr(s.metrics_addr)
            self._health = HealthServer(self.metrics.registry, live=self.live, ready=self.ready)
            try:
                bound = await self._health.start(host, port)
            except OSError as exc:
                raise ConfigError(
                    f"cannot serve metrics on {s.metrics_addr}: {exc.strerror}; "
                    "choose another --metrics-addr (or 'off')"
                ) from None
            log.info("metrics and probes on http://%s:%d/metrics", *bound[:2])
        await self.pool.start()
        log.info(
            "hutch worker: %d children, queue %r, tasks %s, broker %s",
            s.concurrency,
            s.queue,
            ", ".join(sorted(registered())),
            safe_url(s.broker_url),
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        consuming = loop.create_task(self.consumer.run())
        watching = loop.create_task(self._watch_window())
        try:
            await self._stop.wait()
            await self.drain()
        finally:
            watching.cancel()
            self.consumer.close()
            await consuming
            await self.publisher.close()
            await self.pool.close()
            if self._health is not None:
                await self._health.close()
        return 0

    def _observe(self, pool: Pool) -> None:
        state = self.metrics.state
        state.pool_size = lambda: pool.size
        state.children_alive = lambda: pool.alive
        state.in_progress = lambda: pool.running
        state.prefetched = lambda: pool.waiting
        state.prefetch_window = lambda: self.consumer.prefetch
        state.children_cpu_seconds = pool.cpu_seconds
        state.children_memory_bytes = pool.resident_bytes
        state.connected = lambda: self.consumer.connected
        state.reconnects = lambda: self.consumer.reconnects
        state.ready = lambda: self.ready()[0]

    def _on_restart(self, reason: RestartReason) -> None:
        self.metrics.on_restart(reason.value)

    def live(self) -> tuple[bool, str]:
        """The loop answers (or this would not run) and the pool can run tasks."""
        pool = self.pool
        if pool is None:
            return False, "pool not started"
        if pool.alive == 0 and pool.respawn_failures >= 3:
            return False, f"no pool child running; {pool.respawn_failures} restarts failed"
        return True, f"ok: {pool.alive}/{pool.size} children"

    def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.consumer.connected:
            return False, "not connected to the broker"
        if not self.consumer.consuming:
            return False, "connected but not consuming"
        return True, "ok: consuming"

    async def drain(self) -> None:
        assert self.pool is not None
        pool = self.pool
        self.draining = True
        log.info("draining: no new tasks; up to %gs for running ones", self.settings.drain_timeout)
        await self.consumer.pause()
        for job in pool.take_pending():
            await self.settler.requeue(job.delivery, counted=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        # in_flight, not running: jobs already queued in a child run next, and those it held
        # when it died go back to the pool's queue to run on its replacement.
        while pool.in_flight and loop.time() < deadline and not self._deadline_now.is_set():
            await _wait_any(self._deadline_now, min(0.05, deadline - loop.time()))
        if pool.in_flight:
            log.warning("drain deadline passed: returning %d unfinished task(s)", pool.in_flight)
            pool.abort_running()
            while pool.in_flight:
                await asyncio.sleep(0.01)
        while self._settling:
            await asyncio.wait(list(self._settling))
        log.info("drained")


async def _wait_any(event: asyncio.Event, timeout: float) -> Any:
    try:
        async with asyncio.timeout(max(timeout, 0)):
            await event.wait()
    except TimeoutError:
        pass


def _waiting_since(message: AbstractIncomingMessage) -> float | None:
    """Unix time the message became runnable: a retry's due time, else its publish time."""
    due = message.headers.get(DUE_HEADER)
    if isinstance(due, int) and not isinstance(due, bool):
        return due / 1000
    return message.timestamp.timestamp() if message.timestamp else None


def _vhost(url: str) -> str:
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"
