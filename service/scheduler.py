"""Periodic tasks: one leader per work queue fires each schedule once per slot, on any number
of hosts, with RabbitMQ as the only shared state.

Every worker that has schedules runs a `Scheduler` on a connection of its own. They all consume
``Q.scheduler``, a quorum queue with single active consumer: the broker picks one consumer to
receive messages, and moves that role to another when its connection goes. That queue holds one
*baton*: a message whose body records, per schedule, the last slot fired. The worker holding the
baton (delivered, not yet acked) is the leader::

    leader                                  Q.scheduler (quorum, single active consumer)
      │  holds the baton unacked                 ┌──────────────────────────────┐
      │  at each due slot:                       │ baton {task: last slot, ...} │
      ├─ publish the fire to Q (confirm) ──▶ Q   └──────────────────────────────┘
      ├─ publish the next baton (confirm) ──────────────▲        │ delivered back to the
      └─ ack the old baton                                        ▼ leader (the active one)

- **One fire per slot.** Only the leader fires, and it publishes its fires on the connection
  that holds the baton: once the broker has closed that connection (the leader died, stalled
  past its heartbeats, or was cut off), nothing it sends is routed, and the broker has already
  handed the baton to the next consumer. A fire's ``message_id`` is ``cron:<task>:<slot ms>``:
  the one duplicate possible (the leader died between a fire's confirm and the next baton's)
  carries the same id, so tasks can be idempotent by ``current_task().id``.
- **No missed slot across a failover.** The new leader fires every slot after the baton's
  record. If the baton was renewed less than `HANDOVER_WITHIN` ago, that is all of them; after a
  longer gap (every worker was down) each schedule's ``schedule_catchup`` decides.
- **The baton stays young.** It is renewed (republished, the old one acked) at least every
  `RENEW_EVERY` and at once by a new leader, so it never meets RabbitMQ's consumer_timeout and
  its delivery count starts again (4.x dead-letters a quorum queue message after 20 returns).
- **Bootstrap.** AMQP says nothing to a consumer that has become the active one, so every
  scheduler publishes a *join* message when it connects. The active consumer receives the joins;
  if it then holds no baton for `MINT_AFTER` and none is waiting in the queue, it mints one
  (every schedule starting from now). Two batons (a mint racing a baton in flight, or a leader
  that died between publishing the next baton and acking the old) are merged: the later slot
  wins per schedule.

The leader also publishes a status snapshot to ``Q.schedules`` (a one-message queue) for
``hutch schedule ls``. Design and tests: research/wave2.md §2, tests/test_schedules.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import aio_pika
import aiormq
import aiormq.abc

from service import protocol, topology
from service.broker import CONNECTION_ERRORS, Node, Nodes, as_nodes, connect_node, open_channel
from service.delivery import Delivery
from service.errors import PublishError
from service.observer import Observer
from service.schedules import Schedule

log = logging.getLogger(__name__)

RENEW_EVERY: Final = 10.0  # seconds between two renewals of an idle baton
HANDOVER_WITHIN: Final = 60.0  # a baton renewed more recently than this was handed over
MINT_AFTER: Final = 2.0  # seconds an active scheduler waits for a baton before minting one
KIND_HEADER: Final = "x-hutch-scheduler"  # "baton" or "join"
BATON_VERSION: Final = 1
_BACKOFF_START, _BACKOFF_MAX = 0.5, 15.0


def scheduler_queue(queue: str) -> str:
    return f"{queue}.scheduler"


def status_queue(queue: str) -> str:
    return f"{queue}.schedules"


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class Baton:
    """The leader's record: the last slot fired per schedule, and when it was written."""

    last: dict[str, int] = field(default_factory=dict)  # task -> slot ms
    updated_at: int = 0  # Unix ms
    holder: str = ""

    def to_body(self) -> bytes:
        return json.dumps(
            {
                "v": BATON_VERSION,
                "last": self.last,
                "updated_at": self.updated_at,
                "holder": self.holder,
            }
        ).encode()

    @classmethod
    def from_body(cls, body: bytes) -> Baton:
        """A baton from its body; an unreadable one counts as empty (its slots start anew)."""
        try:
            data = json.loads(body)
            last = {str(k): int(v) for k, v in data.get("last", {}).items()}
            return cls(last, int(data.get("updated_at", 0)), str(data.get("holder", "")))
        except (ValueError, TypeError, AttributeError):
            log.error("unreadable scheduler baton %r; schedules start from now", body[:200])
            return cls()

    def merged(self, other: Baton) -> Baton:
        last = dict(self.last)
        for task, slot in other.last.items():
            last[task] = max(slot, last.get(task, slot))
        return Baton(last, max(self.updated_at, other.updated_at), self.holder or other.holder)


class Scheduler:
    """Leads, or stands by to lead, the schedules of ``queue``'s tasks.

    ``observer`` hears `Observer.on_leader`, `Observer.on_fire` and `Observer.on_last_fire`.
    Fires are published as ``content_type`` (msgpack by default) with each schedule's args.
    """

    def __init__(
        self,
        nodes: Nodes | str,
        queue: str,
        schedules: Iterable[Schedule],
        *,
        observer: Observer | None = None,
        content_type: str = protocol.MSGPACK,
        name: str = "hutch-scheduler",
    ) -> None:
        self._nodes = as_nodes(nodes)
        self._node: Node | None = None  # the node of the open connection
        self._queue = queue
        self.schedules = {s.task: s for s in schedules}
        self._observer = observer or Observer()
        self._content_type = content_type
        self._name = name
        self.holder = f"{socket.gethostname()} pid {os.getpid()}"
        self._closed = False
        self._wake = asyncio.Event()
        self._inbox: asyncio.Queue[Delivery] = asyncio.Queue()
        self._baton: Delivery | None = None  # held (delivered, unacked) while leading
        self._state = Baton()
        self._active_since: float | None = None  # loop time we learned we are the active one
        self._expecting = False  # we published a baton that has not come back to us yet
        self.leading = False

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Lead or stand by until `close`; reconnects with capped, jittered backoff."""
        delay = _BACKOFF_START
        while not self._closed:
            try:
                await self._session()
                delay = _BACKOFF_START
            except CONNECTION_ERRORS as exc:
                if self._closed:
                    break
                log.warning(
                    "scheduler connection to %s failed: %r; reconnecting in %.1fs",
                    (self._node or self._nodes.current).safe,
                    exc,
                    delay,
                )
            self._lost()
            if self._closed:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay * random.uniform(0.8, 1.2)):
                    await self._wake.wait()
            delay = min(delay * 2, _BACKOFF_MAX)
        self._lost()

    def close(self) -> None:
        """Stop: the connection closes and the broker hands the baton to another worker."""
        self._closed = True
        self._wake.set()

    def _lost(self) -> None:
        # The broker requeues a baton held on a closed connection: nothing to settle here.
        self._baton, self._active_since, self._expecting = None, None, False
        while not self._inbox.empty():
            self._inbox.get_nowait()
        if self.leading:
            self.leading = False
            self._observer.on_leader(False)
            log.info("no longer leading the schedules of %r", self._queue)

    async def _session(self) -> None:
        connection, self._node = await connect_node(self._nodes, name=self._name)
        node = self._node
        try:
            lost = asyncio.Event()

            def on_lost(*_: Any) -> None:
                lost.set()
                self._wake.set()
                if not self._closed:
                    self._nodes.failed(node)  # the next session starts at the next node

            connection.close_callbacks.add(on_lost)
            channel = await open_channel(connection, publisher_confirms=True, on_return_raises=True)
            channel.close_callbacks.add(on_lost)
            await declare(channel, self._queue)
            amqp = await channel.get_underlay_channel()
            await amqp.basic_qos(prefetch_count=100)
            await amqp.basic_consume(scheduler_queue(self._queue), self._deliver, no_ack=False)
            await self._send(channel, scheduler_queue(self._queue), b"{}", kind="join")
            while not lost.is_set() and not self._closed:
                await self._handle(channel)
                await self._sleep(self._next_wake())
        finally:
            if not connection.is_closed:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    await connection.close()

    async def _deliver(self, message: aiormq.abc.DeliveredMessage) -> None:
        self._inbox.put_nowait(Delivery(message))
        self._wake.set()

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        if not self._inbox.empty() or self._closed:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await self._wake.wait()

    def _next_wake(self) -> float:
        """Seconds until something is due: a slot, a renewal, or the mint check."""
        loop = asyncio.get_running_loop()
        if self._baton is None:
            if self._active_since is None or self._expecting:
                return 3600.0  # a delivery wakes it: the first one, or the baton coming back
            return max(0.05, self._active_since + MINT_AFTER - loop.time())
        now = _now_ms()
        wake = self._state.updated_at + RENEW_EVERY * 1000
        for task, schedule in self.schedules.items():
            wake = min(wake, schedule.next_after(self._state.last.get(task, now)))
        return max(0.0, (wake - now) / 1000)

    # -- what arrives ---------------------------------------------------------------------

    async def _handle(self, channel: aio_pika.abc.AbstractChannel) -> None:
        loop = asyncio.get_running_loop()
        while not self._inbox.empty():
            message = self._inbox.get_nowait()
            if self._active_since is None:
                self._active_since = loop.time()
            if message.headers.get(KIND_HEADER) == "baton":
                await self._take(channel, message)
            else:  # a join (or anything else): the active consumer just acknowledges it
                await message.ack()
        if self._baton is not None:
            await self._tick(channel)
        elif (
            self._active_since is not None
            and not self._expecting
            and loop.time() - self._active_since >= MINT_AFTER
        ):
            await self._mint(channel)

    async def _take(self, channel: aio_pika.abc.AbstractChannel, message: Delivery) -> None:
        baton = Baton.from_body(message.body)
        self._expecting = False
        if self._baton is None:
            self._baton, self._state = message, baton
            if not self.leading:
                self.leading = True
                self._observer.on_leader(True)
                log.info(
                    "leading the schedules of %r (baton from %s, %.1fs old)",
                    self._queue,
                    baton.holder or "nobody",
                    (_now_ms() - baton.updated_at) / 1000,
                )
                for task, slot in baton.last.items():
                    if task in self.schedules:
                        self._observer.on_last_fire(task, slot)
                await self._tick(channel, renew=True)  # a fresh copy, its count at 0
            return
        # A second baton: keep the later slot of each schedule, and one baton.
        log.warning("two scheduler batons for %r; merging them", self._queue)
        held, self._baton = self._baton, None
        self._state = self._state.merged(baton)
        await self._publish_baton(channel, self._state)
        await held.ack()
        await message.ack()

    async def _mint(self, channel: aio_pika.abc.AbstractChannel) -> None:
        """Active, and no baton anywhere: start every schedule from now."""
        ready = (
            await topology.passive_declare(channel, scheduler_queue(self._queue))
        ).declaration_result
        if ready.message_count:
            return  # something is on its way to us
        now = _now_ms()
        baton = Baton({task: now for task in self.schedules}, now, self.holder)
        log.info("no scheduler baton for %r: starting one", self._queue)
        await self._publish_baton(channel, baton)

    # -- firing ---------------------------------------------------------------------------

    async def _tick(self, channel: aio_pika.abc.AbstractChannel, *, renew: bool = False) -> None:
        """Fire what is due, then pass the baton on to ourselves (renewed)."""
        assert self._baton is not None
        state, now = self._state, _now_ms()
        outage = now - state.updated_at > HANDOVER_WITHIN * 1000
        last = dict(state.last)
        fired = False
        for task, schedule in self.schedules.items():
            if task not in last:
                last[task] = now  # a new schedule: from its next slot on
                continue
            due = schedule.due(last[task], now, limit=1)
            if not due:
                continue
            for slot in schedule.to_fire(last[task], now, outage=outage):
                try:
                    await self._fire(channel, schedule, slot)
                except PublishError as exc:
                    log.warning("fire of %s for %d not confirmed (%s); again soon", task, slot, exc)
                    break
                last[task] = slot
                fired = True
            else:
                last[task] = due[-1]  # slots the catch-up policy skipped count as done
        if not (
            fired or renew or last != state.last or now - state.updated_at >= RENEW_EVERY * 1000
        ):
            return
        held, self._baton = self._baton, None
        baton = Baton(last, now, self.holder)
        await self._publish_baton(channel, baton)
        self._state = baton
        await held.ack()
        await self._publish_status(channel, baton)

    async def _fire(
        self, channel: aio_pika.abc.AbstractChannel, schedule: Schedule, slot: int
    ) -> None:
        body = protocol.encode_request(self._content_type, schedule.args, dict(schedule.kwargs))
        message = aio_pika.Message(
            body,
            headers={protocol.TASK_HEADER: schedule.task, protocol.SLOT_HEADER: slot},
            content_type=self._content_type,
            message_id=fire_id(schedule.task, slot),
            timestamp=time.time(),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await _publish(channel, message, self._queue)
        self._observer.on_fire(schedule.task, slot)

    async def _publish_baton(self, channel: aio_pika.abc.AbstractChannel, baton: Baton) -> None:
        # Until it comes back (to us: we are the active consumer), we neither fire nor mint.
        self._expecting = True
        await self._send(channel, scheduler_queue(self._queue), baton.to_body(), kind="baton")

    async def _publish_status(self, channel: aio_pika.abc.AbstractChannel, baton: Baton) -> None:
        now = _now_ms()
        status = {
            "queue": self._queue,
            "holder": self.holder,
            "updated_at": baton.updated_at,
            "schedules": [
                {
                    "task": task,
                    "expression": schedule.expression,
                    "tz": schedule.tz,
                    "last_fire": baton.last.get(task),
                    "next_fire": schedule.next_after(baton.last.get(task, now)),
                }
                for task, schedule in sorted(self.schedules.items())
            ],
        }
        with contextlib.suppress(PublishError, *CONNECTION_ERRORS):
            await self._send(channel, status_queue(self._queue), json.dumps(status).encode())

    async def _send(
        self, channel: aio_pika.abc.AbstractChannel, queue: str, body: bytes, *, kind: str = ""
    ) -> None:
        message = aio_pika.Message(
            body,
            headers={KIND_HEADER: kind} if kind else {},
            content_type=protocol.JSON,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await _publish(channel, message, queue)


def fire_id(task: str, slot: int) -> str:
    """The ``message_id`` of a schedule's fire: the same for every copy of one slot."""
    return f"cron:{task}:{slot}"


async def _publish(
    channel: aio_pika.abc.AbstractChannel, message: aio_pika.Message, queue: str
) -> None:
    """Publish on the scheduler's own channel (the fence: see the module docstring), confirmed."""
    try:
        await channel.default_exchange.publish(message, queue, mandatory=True)
    except aio_pika.exceptions.DeliveryError as exc:
        raise PublishError(f"the broker refused or could not route it: {exc}") from exc


# Quorum, single active consumer, and a delivery limit so high it never drops the baton (4.x
# defaults to 20 and drops without a dead-letter exchange; renewals reset the count anyway).
SCHEDULER_ARGUMENTS: Final[dict[str, Any]] = {
    "x-queue-type": "quorum",
    "x-single-active-consumer": True,
    "x-delivery-limit": topology.DLQ_DELIVERY_LIMIT,
}
# The latest status only: a classic queue that keeps one message (losing it costs nothing).
STATUS_ARGUMENTS: Final[dict[str, Any]] = {"x-max-length": 1, "x-overflow": "drop-head"}


async def declare(channel: aio_pika.abc.AbstractChannel, queue: str) -> None:
    """Declare ``Q.scheduler`` and ``Q.schedules`` for work queue ``queue`` (idempotent)."""
    await channel.declare_queue(scheduler_queue(queue), durable=True, arguments=SCHEDULER_ARGUMENTS)
    await channel.declare_queue(status_queue(queue), durable=True, arguments=STATUS_ARGUMENTS)
