"""Acks, nacks and rejects: routed to the channel that delivered, and coalesced there.

`AckRouter` is what the settling stage talks to: it sends a delivery's ack through the
`ChannelAcks` of the consuming channel it came from, or through the message itself when that
channel is no longer the current one (the ack then fails, as it must: the broker has requeued
the delivery). `is_stale` tells the two apart before anything is published for a delivery.

Coalescing (`ChannelAcks`)
--------------------------

Every ack is a frame to write and, on a quorum queue, a Raft command for the broker. Acks that
become due within `ACK_DELAY` of each other are sent together: one ``multiple=True`` ack for
the lowest run of tags that are all settled, and a plain ack for each of the rest. The wait
halves the broker's CPU per task at a couple of thousand tasks/s (measured: 125-140 -> 70-75 us
per 0.5 ms task); the cost is that a worker killed outright runs again the tasks it finished
in its last few milliseconds, which at-least-once allows.

It stays exact because a multiple ack covers only tags at or below its own, and it is sent
only below the lowest delivery still unsettled, so everything it covers is either due now or
was settled on its own (ack, nack, reject) first. Tags on a channel are consecutive from 1 and
only this consumer receives on it, so "every delivery is tracked" is checkable: a gap (which
should never happen) switches the channel to plain acks.
"""

from __future__ import annotations

import asyncio

import aio_pika
import aiormq.abc

from service.delivery import Delivery

ACK_DELAY = 0.005  # seconds an ack may wait for others to share its frame


class ChannelAcks:
    """Tracks every delivery on ``channel`` from `delivered` until it is settled."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self._open: set[int] = set()  # delivered, not settled, not due: at most the prefetch
        self._due: set[int] = set()  # acks not yet sent
        self._last = 0  # highest tag delivered
        self.exact = True  # False after a gap in the tags: plain acks only
        self._waiters: list[asyncio.Future[None]] = []
        self._flushing: asyncio.Task[None] | None = None

    def delivered(self, tag: int) -> None:
        if tag != self._last + 1:
            self.exact = False
        self._last = max(self._last, tag)
        self._open.add(tag)

    def ack_soon(self, tag: int) -> asyncio.Future[None]:
        """Queue the ack of ``tag``; the future is done once it is written, or failed if the
        channel closed first."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._open.discard(tag)
        self._due.add(tag)
        self._waiters.append(waiter)
        if self._flushing is None:
            # Even with nothing else unsettled the ack waits: sequential calls then share ack
            # frames too, and the quorum queue's process has fewer commands to serialise with
            # the next call's enqueue (call p50 about 10 % lower than acking each at once).
            self._flushing = loop.create_task(self._flush())
        return waiter

    async def ack(self, tag: int) -> None:
        await self.ack_soon(tag)

    async def nack(self, tag: int, *, requeue: bool) -> None:
        # Unmarked and queued in this same step, so a multiple ack that covers this tag is
        # always written after it.
        self._open.discard(tag)
        await self.channel.basic_nack(tag, requeue=requeue)

    async def reject(self, tag: int, *, requeue: bool) -> None:
        self._open.discard(tag)
        await self.channel.basic_reject(tag, requeue=requeue)

    async def _flush(self) -> None:
        # Started by the first ack due; waiting a moment gathers the acks of the next few loop
        # turns too. Each ack spared is a frame and a Raft command less, and no caller waits on
        # an ack: a result or a retry copy is confirmed before its ack is even due.
        await asyncio.sleep(ACK_DELAY)
        try:
            while self._due:
                waiters, self._waiters = self._waiters, []
                try:
                    await self._send()
                except Exception as exc:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(exc)
                else:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_result(None)
        finally:
            self._flushing = None

    async def _send(self) -> None:
        due = sorted(self._due)
        self._due.clear()
        lowest_open = min(self._open, default=self._last + 1)
        covered = 0
        if self.exact:
            for tag in due:
                if tag > lowest_open:
                    break
                covered += 1
        frames = [(tag, False) for tag in due[covered:]]
        if covered:
            frames.insert(0, (due[covered - 1], covered > 1))
        for i, (tag, multiple) in enumerate(frames, 1):
            # Only the last waits until written; frames go out in order.
            await self.channel.basic_ack(tag, multiple=multiple, wait=i == len(frames))


def is_stale(message: Delivery) -> bool:
    """True once the channel that delivered ``message`` has closed."""
    try:
        message.channel  # noqa: B018 - raises once the delivering channel has closed
    except aio_pika.exceptions.ChannelInvalidStateError:
        return True
    return False


class AckRouter:
    """Settles deliveries through the current channel's `ChannelAcks`, when it delivered them.

    The consumer calls `opened` with each new consuming channel and `delivered` for every
    delivery; a delivery from any other channel (an earlier one, or none at all, as for
    `Settler` used on its own) is settled through the message itself.
    """

    def __init__(self) -> None:
        self._current: ChannelAcks | None = None

    def opened(self, channel: aiormq.abc.AbstractChannel) -> None:
        self._current = ChannelAcks(channel)

    def delivered(self, message: Delivery) -> None:
        acks = self._current
        if acks is not None and message.channel is acks.channel:
            acks.delivered(message.delivery_tag)

    def _tracker(self, message: Delivery) -> ChannelAcks | None:
        acks = self._current
        # message.channel raises once its channel has closed: the caller treats that as stale.
        if acks is not None and message.channel is acks.channel:
            return acks
        return None

    def ack_soon(self, message: Delivery) -> asyncio.Future[None]:
        """Queue the ack; the future is done once it is written, or failed if it cannot be."""
        acks = self._tracker(message)
        if acks is None:
            return asyncio.ensure_future(message.ack())
        return acks.ack_soon(message.delivery_tag)

    async def ack(self, message: Delivery) -> None:
        await self.ack_soon(message)

    async def nack(self, message: Delivery, *, requeue: bool) -> None:
        await self._refuse(message, requeue=requeue, reject=False)

    async def reject(self, message: Delivery, *, requeue: bool) -> None:
        await self._refuse(message, requeue=requeue, reject=True)

    async def _refuse(self, message: Delivery, *, requeue: bool, reject: bool) -> None:
        acks = self._tracker(message)
        if acks is None:
            await (message.reject if reject else message.nack)(requeue=requeue)
            return
        await (acks.reject if reject else acks.nack)(message.delivery_tag, requeue=requeue)
