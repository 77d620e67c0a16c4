"""The fan-in of flows: one worker at a time holds every group's member records until all are in.

When a member of a group succeeds (or fails for good), its pool child writes a *record* to
``hutch.joins`` (`service.continuation`): a quorum queue with single active consumer, one per
vhost. Every worker consumes it; the broker delivers to one of them, the active consumer, and
moves that role on when its connection goes. The pending state of every open fan-in *is* the set
of records held unacked by the active consumer, so it survives the death of whichever process
holds it: the broker hands the records, still unacked, to the next::

    member done ──▶ record ──▶ hutch.joins ──▶ Joins (active consumer) holds it, unacked
                                                 │ all n members in (by index; repeats replace)
                                                 ├─ publish hutch.flow.join to the queue (confirm)
                                                 └─ ack the n records
                                                 │ a member failed for good (first of its flow)
                                                 ├─ publish hutch.flow.abort (confirm)
                                                 ├─ publish the record marked handled (confirm)
                                                 └─ ack the original (the marked copy is held)

- **Bytes only.** Everything the fan-in needs is in the records' headers; the follow-up task's
  body is the records' bodies put together (`protocol.request_of_bodies`), decoded only by the
  pool child that runs it. The rules are `service.fanin`'s (pure, tested with random crash
  points); this module receives the records and carries out its effects.
- **Once, or twice with the same id.** A follow-up is published on the connection that holds the
  records: once the broker has closed it, nothing more from it is routed. The one repeat
  possible (the holder died between the follow-up's confirm and the acks) carries the same
  ``message_id``; so does a repeated member record, and the later one replaces the earlier.
- **A failed flow ends once**, however many members fail: its first failed record fires the
  abort, and its copy, marked handled, stays held so that neither a later failure nor the next
  holder fires again. The failed records stay until `max_age`, so that replaying the failed
  member from ``Q.dlq`` (`hutch dlq replay`) completes the fan-in and resumes the flow.
- **Never waiting forever.** A fan-in still open after `max_age` ends its flow as failed
  (``JoinTimeout``); records of a fan-in that already completed (a member repeated after a lost
  ack) are acked as they arrive. Records held longer than `compact_after` are republished and the
  originals acked, so none meets RabbitMQ's consumer_timeout.
- **Capacity.** The consumer's prefetch (`capacity`) bounds the records held; the metrics report
  how many are held and the age of the oldest open fan-in, and an alert fires before it is full.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any, Final

import aio_pika
import aiormq.abc

from service import continuation, protocol, routing, topology
from service.broker import CONNECTION_ERRORS, Node, Nodes, as_nodes, connect_node, open_channel
from service.delivery import Delivery
from service.errors import PublishError
from service.fanin import Ack, Done, Effect, FanIn, FollowUp, Keep, Refuse, read_record
from service.observer import Observer
from service.protocol import Reason
from service.republish import copy_message, publisher_headers

log = logging.getLogger(__name__)

TICK: Final = 5.0  # seconds between housekeeping rounds (compaction, max age, metrics)
_BACKOFF_START, _BACKOFF_MAX = 0.5, 15.0


class Joins:
    """Holds, or stands by to hold, the fan-in records of every flow in the vhost.

    Options (keyword arguments):

    - ``capacity``: the most records held at once (the consumer's prefetch), default 10,000;
    - ``max_age``: seconds a fan-in may stay open before its flow ends as failed, default one
      day (also how long a failed flow's records stay replayable);
    - ``compact_after``: seconds a record is held before it is republished, default 600, well
      under RabbitMQ's consumer_timeout (30 min by default);
    - ``observer`` hears `Observer.on_joins`.
    """

    def __init__(
        self,
        nodes: Nodes | str,
        *,
        capacity: int = 10_000,
        max_age: float = 86_400.0,
        compact_after: float = 600.0,
        observer: Observer | None = None,
        name: str = "hutch-joins",
    ) -> None:
        self._nodes = as_nodes(nodes)
        self._node: Node | None = None  # the node of the open connection
        self.capacity = capacity
        self.book: FanIn[Delivery] = FanIn(max_age=max_age, compact_after=compact_after)
        self._observer = observer or Observer()
        self._name = name
        self._closed = False
        self._wake = asyncio.Event()
        self._inbox: asyncio.Queue[Delivery] = asyncio.Queue()
        self._last_report: tuple[int, int, float] | None = None

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        """Hold or stand by until `close`; reconnects with capped, jittered backoff."""
        delay = _BACKOFF_START
        while not self._closed:
            try:
                await self._session()
                delay = _BACKOFF_START
            except (PublishError, *CONNECTION_ERRORS) as exc:
                # A refused publish (the follow-up's queue is gone, say) also starts again:
                # the records come back, and it is tried anew after the backoff.
                if self._closed:
                    break
                log.warning(
                    "fan-in on %s failed: %r; reconnecting in %.1fs",
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
        """Stop: the connection closes and the broker hands the records to another worker."""
        self._closed = True
        self._wake.set()

    def _lost(self) -> None:
        # The broker requeues every record held on a closed connection: start again empty.
        self.book.lost()
        while not self._inbox.empty():
            self._inbox.get_nowait()
        self._report()

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
            await topology.declare_joins(channel)
            amqp = await channel.get_underlay_channel()
            await amqp.basic_qos(prefetch_count=self.capacity)
            await amqp.basic_consume(routing.JOINS_QUEUE, self._deliver, no_ack=False)
            loop = asyncio.get_running_loop()
            next_tick = loop.time() + TICK
            while not lost.is_set() and not self._closed:
                while not self._inbox.empty():
                    message = self._inbox.get_nowait()
                    record = read_record(message.headers, message.content_type)
                    await self._carry_out(
                        channel, self.book.take(message, record, message.body, loop.time())
                    )
                if loop.time() >= next_tick:
                    now_ms = int(time.time() * 1000)
                    await self._carry_out(channel, self.book.housekeep(now_ms, loop.time()))
                    next_tick = loop.time() + TICK
                self._report()
                await self._sleep(next_tick - loop.time())
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

    # -- effects ----------------------------------------------------------------------------

    async def _carry_out(
        self, channel: aio_pika.abc.AbstractChannel, effects: list[Effect[Delivery]]
    ) -> None:
        """Each effect in order; a failure ends the session (what is unacked comes back)."""
        for effect in effects:
            if isinstance(effect, Ack):
                await effect.token.ack()
            elif isinstance(effect, FollowUp):
                await _publish(channel, _follow_up_message(effect), effect.queue)
                if effect.task == continuation.ABORT_TASK:
                    log.info("fan-in ends flow %s as failed", effect.flow)
            elif isinstance(effect, Done):
                self.book.done(effect.key)
            elif isinstance(effect, Keep):
                headers = publisher_headers(effect.token)
                if effect.handled:
                    headers[protocol.JOIN_HANDLED_HEADER] = True
                await _publish(channel, copy_message(effect.token, headers), routing.JOINS_QUEUE)
            elif isinstance(effect, Refuse):
                await self._refuse(channel, effect.token, effect.detail)

    async def _refuse(
        self, channel: aio_pika.abc.AbstractChannel, message: Delivery, detail: str
    ) -> None:
        log.warning("dead-lettering fan-in record %s: %s", message.message_id, detail)
        headers = publisher_headers(message)
        headers.update(
            {
                protocol.REASON_HEADER: str(Reason.BAD_FLOW),
                protocol.ERROR_TYPE_HEADER: str(Reason.BAD_FLOW),
                protocol.ERROR_MESSAGE_HEADER: protocol.truncate(detail),
                protocol.QUEUE_HEADER: routing.JOINS_QUEUE,
                protocol.DEAD_AT_HEADER: int(time.time() * 1000),
            }
        )
        await _publish(
            channel, copy_message(message, headers), routing.dlq_name(routing.JOINS_QUEUE)
        )
        await message.ack()

    def _report(self) -> None:
        book = self.book
        oldest = book.oldest_seconds(int(time.time() * 1000))
        report = (book.open, book.held, round(oldest))
        if report != self._last_report:
            self._last_report = report
            self._observer.on_joins(book.open, book.held, max(0.0, oldest))


def _follow_up_message(effect: FollowUp) -> aio_pika.Message:
    return aio_pika.Message(
        effect.body,
        headers={
            protocol.TASK_HEADER: effect.task,
            protocol.FLOW_HEADER: effect.flow,
            protocol.FLOW_STEP_HEADER: effect.step,
        },
        content_type=effect.content_type,
        message_id=effect.message_id,
        timestamp=time.time(),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def _publish(
    channel: aio_pika.abc.AbstractChannel, message: aio_pika.Message, queue: str
) -> None:
    """Publish on the channel that holds the records (the fence: see the module docstring)."""
    try:
        await channel.default_exchange.publish(message, queue, mandatory=True)
    except aio_pika.exceptions.DeliveryError as exc:
        raise PublishError(f"the broker refused or could not route it: {exc}") from exc
