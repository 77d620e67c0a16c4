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

- **Bytes only.** Everything this module needs is in the records' headers; the follow-up task's
  body is the records' bodies put together (`protocol.request_of_bodies`), decoded only by the
  pool child that runs it.
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
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final

import aio_pika
import aiormq.abc

from service import continuation, protocol, routing, topology
from service.broker import CONNECTION_ERRORS, connect, open_channel, safe_url
from service.delivery import Delivery
from service.errors import PublishError
from service.flow import MAX_GROUP_WIDTH
from service.observer import Observer
from service.protocol import Reason
from service.republish import copy_message, publisher_headers

log = logging.getLogger(__name__)

TICK: Final = 5.0  # seconds between housekeeping rounds (compaction, max age, metrics)
DONE_REMEMBERED: Final = 100_000  # completed fan-ins remembered, to drop their late repeats
_BACKOFF_START, _BACKOFF_MAX = 0.5, 15.0


@dataclass(slots=True)
class _Held:
    delivery: Delivery
    since: float  # loop time it was received: when it must be compacted
    ok: bool


@dataclass(slots=True)
class _Join:
    """One open fan-in: the latest record of each member seen so far."""

    key: str
    flow: str
    size: int
    queue: str
    content_type: str
    opened_ms: int  # the earliest record's write time (Unix ms): the fan-in's age
    members: dict[int, _Held] = field(default_factory=dict)

    def complete(self) -> bool:
        return len(self.members) == self.size and all(h.ok for h in self.members.values())


@dataclass(frozen=True, slots=True)
class _Record:
    """What a record's headers say."""

    key: str
    flow: str
    index: int
    size: int
    ok: bool
    queue: str
    at_ms: int
    handled: bool


def _record_of(message: Delivery) -> _Record | str:
    """The record a delivery is, or what is wrong with it."""
    h = message.headers
    key, flow = h.get(protocol.JOIN_HEADER), h.get(protocol.FLOW_HEADER)
    index = protocol.int_header(h, protocol.JOIN_INDEX_HEADER)
    size = protocol.int_header(h, protocol.JOIN_SIZE_HEADER)
    ok, queue = h.get(protocol.JOIN_OK_HEADER), h.get(protocol.JOIN_QUEUE_HEADER)
    if not (isinstance(key, str) and key and isinstance(flow, str) and flow):
        return f"{protocol.JOIN_HEADER} and {protocol.FLOW_HEADER} must be strings"
    if size is None or not 1 <= size <= MAX_GROUP_WIDTH:
        return f"{protocol.JOIN_SIZE_HEADER} must be 1 to {MAX_GROUP_WIDTH}"
    if index is None or not 0 <= index < size:
        return f"{protocol.JOIN_INDEX_HEADER} must be 0 to {protocol.JOIN_SIZE_HEADER} - 1"
    if not isinstance(ok, bool) or not (isinstance(queue, str) and queue):
        return (
            f"{protocol.JOIN_OK_HEADER} must be a boolean and {protocol.JOIN_QUEUE_HEADER} a queue"
        )
    if protocol.media_type(message.content_type) is None:
        return f"content type {message.content_type!r} is not one hutch reads"
    at = protocol.int_header(h, protocol.JOIN_AT_HEADER) or int(time.time() * 1000)
    return _Record(key, flow, index, size, ok, queue, at, bool(h.get(protocol.JOIN_HANDLED_HEADER)))


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
        url: str,
        *,
        capacity: int = 10_000,
        max_age: float = 86_400.0,
        compact_after: float = 600.0,
        observer: Observer | None = None,
        name: str = "hutch-joins",
    ) -> None:
        self._url = url
        self.capacity = capacity
        self.max_age = max_age
        self.compact_after = compact_after
        self._observer = observer or Observer()
        self._name = name
        self._closed = False
        self._wake = asyncio.Event()
        self._inbox: asyncio.Queue[Delivery] = asyncio.Queue()
        self._joins: dict[str, _Join] = {}
        self._failed: dict[str, set[tuple[str, int]]] = {}  # flow -> failed members held
        self._handled: set[str] = set()  # flows whose failure was handed on
        self._done: OrderedDict[str, None] = OrderedDict()  # completed fan-ins (survive reconnects)
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
                    safe_url(self._url),
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

    @property
    def held(self) -> int:
        return sum(len(join.members) for join in self._joins.values())

    def _lost(self) -> None:
        # The broker requeues every record held on a closed connection: start again empty.
        self._joins.clear()
        self._failed.clear()
        self._handled.clear()
        while not self._inbox.empty():
            self._inbox.get_nowait()
        self._report()

    async def _session(self) -> None:
        connection = await connect(self._url, name=self._name)
        try:
            lost = asyncio.Event()

            def on_lost(*_: Any) -> None:
                lost.set()
                self._wake.set()

            connection.close_callbacks.add(on_lost)
            channel = await open_channel(connection, publisher_confirms=True, on_return_raises=True)
            channel.close_callbacks.add(on_lost)
            await topology.declare_shared(channel)
            amqp = await channel.get_underlay_channel()
            await amqp.basic_qos(prefetch_count=self.capacity)
            await amqp.basic_consume(routing.JOINS_QUEUE, self._deliver, no_ack=False)
            loop = asyncio.get_running_loop()
            next_tick = loop.time() + TICK
            while not lost.is_set() and not self._closed:
                while not self._inbox.empty():
                    await self._take(channel, self._inbox.get_nowait())
                if loop.time() >= next_tick:
                    await self._housekeep(channel)
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

    # -- records ----------------------------------------------------------------------------

    async def _take(self, channel: aio_pika.abc.AbstractChannel, message: Delivery) -> None:
        record = _record_of(message)
        if isinstance(record, str):
            await self._dead_letter(channel, message, record)
            return
        if record.key in self._done:
            await message.ack()  # a member repeated after its fan-in completed
            return
        join = self._joins.get(record.key)
        if join is None:
            join = self._joins[record.key] = _Join(
                record.key,
                record.flow,
                record.size,
                record.queue,
                protocol.media_type(message.content_type) or protocol.MSGPACK,
                record.at_ms,
            )
        elif join.size != record.size:
            await self._dead_letter(
                channel, message, f"fan-in {record.key} has {join.size} members, not {record.size}"
            )
            return
        join.opened_ms = min(join.opened_ms, record.at_ms)
        old = join.members.get(record.index)
        join.members[record.index] = _Held(message, asyncio.get_running_loop().time(), record.ok)
        if old is not None:
            await old.delivery.ack()  # the later record of a member replaces the earlier
            if not old.ok:
                self._forget_failure(record.flow, record.key, record.index)
        if not record.ok:
            await self._failed_member(channel, join, record, message)
        elif record.flow not in self._failed:
            # Complete fan-ins of a failed flow wait: a replay of the failed member resumes it.
            for ready in [j for j in self._joins.values() if j.flow == record.flow]:
                if ready.complete():
                    await self._complete(channel, ready)

    def _forget_failure(self, flow: str, key: str, index: int) -> None:
        """A failed member's record is gone: replaced by a later one (a replay that
        succeeded), or dropped with its fan-in."""
        failed = self._failed.get(flow)
        if failed is None:
            return
        failed.discard((key, index))
        if not failed:
            # Nothing failed is held any more: a new failure of this flow ends it again.
            del self._failed[flow]
            self._handled.discard(flow)

    async def _failed_member(
        self,
        channel: aio_pika.abc.AbstractChannel,
        join: _Join,
        record: _Record,
        message: Delivery,
    ) -> None:
        self._failed.setdefault(record.flow, set()).add((record.key, record.index))
        if record.flow in self._handled:
            return
        if record.handled:
            self._handled.add(record.flow)
            return
        body = protocol.request_of_bodies(join.content_type, [message.body])
        await self._follow_up(
            channel, join, continuation.ABORT_TASK, body, f"{record.flow}:abort", step="abort"
        )
        headers = publisher_headers(message)
        headers[protocol.JOIN_HANDLED_HEADER] = True
        await _publish(channel, copy_message(message, headers), routing.JOINS_QUEUE)
        # The marked copy takes this record's place when it comes back.
        del join.members[record.index]
        self._handled.add(record.flow)
        await message.ack()
        log.info("flow %s failed in fan-in %s (member %d)", record.flow, join.key, record.index)

    async def _complete(self, channel: aio_pika.abc.AbstractChannel, join: _Join) -> None:
        bodies = [join.members[i].delivery.body for i in range(join.size)]
        body = protocol.request_of_bodies(join.content_type, bodies)
        await self._follow_up(
            channel, join, continuation.JOIN_TASK, body, f"{join.key}:join", step="join"
        )
        await self._drop(join)
        self._remember(join.key)

    async def _follow_up(
        self,
        channel: aio_pika.abc.AbstractChannel,
        join: _Join,
        task: str,
        body: bytes,
        message_id: str,
        *,
        step: str,
    ) -> None:
        message = aio_pika.Message(
            body,
            headers={
                protocol.TASK_HEADER: task,
                protocol.FLOW_HEADER: join.flow,
                protocol.FLOW_STEP_HEADER: f"{join.key.partition(':')[2]}:{step}",
            },
            content_type=join.content_type,
            message_id=message_id,
            timestamp=time.time(),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await _publish(channel, message, join.queue)

    async def _drop(self, join: _Join) -> None:
        """Ack every record of a fan-in that is done with (completed, or expired)."""
        for index, held in join.members.items():
            await held.delivery.ack()
            if not held.ok:
                self._forget_failure(join.flow, join.key, index)
        del self._joins[join.key]

    def _remember(self, key: str) -> None:
        self._done[key] = None
        while len(self._done) > DONE_REMEMBERED:
            self._done.popitem(last=False)

    async def _dead_letter(
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

    # -- housekeeping -----------------------------------------------------------------------

    async def _housekeep(self, channel: aio_pika.abc.AbstractChannel) -> None:
        now_ms = int(time.time() * 1000)
        for join in [j for j in self._joins.values() if now_ms - j.opened_ms > self.max_age * 1000]:
            await self._expire(channel, join, now_ms)
        cutoff = asyncio.get_running_loop().time() - self.compact_after
        for join in list(self._joins.values()):
            for index, held in list(join.members.items()):
                if held.since < cutoff:
                    await self._compact(channel, join, index, held)

    async def _expire(
        self, channel: aio_pika.abc.AbstractChannel, join: _Join, now_ms: int
    ) -> None:
        """A fan-in open past `max_age`: end its flow as failed, unless it already was."""
        if join.flow not in self._handled:
            missing = sorted(set(range(join.size)) - set(join.members))
            error = {
                "type": "JoinTimeout",
                "message": (
                    f"fan-in {join.key} was still waiting for member(s) {missing} after "
                    f"{(now_ms - join.opened_ms) / 1000:.0f}s (max age {self.max_age:g}s)"
                ),
                "reason": str(Reason.TIMEOUT),
            }
            any_member = next(iter(join.members.values())).delivery.body
            body = protocol.request_of_bodies(join.content_type, [any_member], error)
            await self._follow_up(
                channel, join, continuation.ABORT_TASK, body, f"{join.flow}:abort", step="abort"
            )
            log.warning("%s", error["message"])
        await self._drop(join)
        self._remember(join.key)

    async def _compact(
        self, channel: aio_pika.abc.AbstractChannel, join: _Join, index: int, held: _Held
    ) -> None:
        """Republish a long-held record and ack the original: the copy comes back to be held
        in its place, its delivery count and the broker's consumer_timeout clock at zero."""
        message = held.delivery
        await _publish(
            channel, copy_message(message, publisher_headers(message)), routing.JOINS_QUEUE
        )
        del join.members[index]
        if not join.members:
            del self._joins[join.key]
        await message.ack()

    def _report(self) -> None:
        now_ms = int(time.time() * 1000)
        open_joins = len(self._joins)
        oldest = max((now_ms - j.opened_ms for j in self._joins.values()), default=0) / 1000
        report = (open_joins, self.held, round(oldest))
        if report != self._last_report:
            self._last_report = report
            self._observer.on_joins(open_joins, self.held, max(0.0, oldest))


async def _publish(
    channel: aio_pika.abc.AbstractChannel, message: aio_pika.Message, queue: str
) -> None:
    """Publish on the channel that holds the records (the fence: see the module docstring)."""
    try:
        await channel.default_exchange.publish(message, queue, mandatory=True)
    except aio_pika.exceptions.DeliveryError as exc:
        raise PublishError(f"the broker refused or could not route it: {exc}") from exc
