"""Queues, dead-letter queues and broker-held delays, declared the same way by every host.

For a work queue ``Q``:

- ``Q``: a durable quorum queue with an explicit ``x-delivery-limit`` (3.10-3.13 have none; 4.x
  defaults to 20 and drops without a dead-letter exchange) that dead-letters to ``Q.dlq``
  through the default exchange, at least once.
- ``Q.dlq``: a durable quorum queue holding dead letters with their reason headers.

Delays (retry backoff) are held by the broker in 28 quorum queues ``hutch.delay.{L}`` with TTL
2**L seconds, chained by dead-lettering: the delay in whole seconds is written as 28 binary
digits in front of the routing key, and a message waits only in the levels whose bit is 1.
A message leaves level 0 into the topic exchange ``hutch.deliver``, where ``Q`` is bound with an
exact 28-word pattern (a ``#`` pattern would also match queues whose names end in ``.Q``).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any, Final

import aiormq
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue, ExchangeType

from service.broker import CONNECTION_ERRORS, open_channel
from service.errors import QueueNotFound
from service.routing import (
    DELAY_LEVELS,
    DELIVER_EXCHANGE,
    JOINS_QUEUE,
    check_queue_name,
    delay_exchange,
    dlq_name,
)

# Must be identical on every host and in every publisher that declares the queue: a mismatch is
# refused by the broker with PRECONDITION_FAILED. hutch dead-letters poison messages itself
# well before this (``--max-deliveries``); this limit is the broker's backstop.
BROKER_DELIVERY_LIMIT: Final = 20


def queue_arguments(queue: str) -> dict[str, Any]:
    """The exact arguments of a work queue, for publishers that declare it themselves."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": BROKER_DELIVERY_LIMIT,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dlq_name(queue),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


# Dead letters are looked at by getting and returning them, which counts as a delivery. 4.x
# gives quorum queues a default limit of 20 and would drop them after that; -1 ("no limit" on
# 4.x) drops at the first return on 3.10 (tested), so the limit is just very large.
DLQ_DELIVERY_LIMIT: Final = 1_000_000
DLQ_ARGUMENTS: Final[dict[str, Any]] = {
    "x-queue-type": "quorum",
    "x-delivery-limit": DLQ_DELIVERY_LIMIT,
}


# ``hutch.joins`` (`service.joins`): quorum (replicated), single active consumer, and a delivery
# limit so high that failovers never drop a fan-in record (4.x defaults to 20); compaction
# resets the count anyway.
JOINS_ARGUMENTS: Final[dict[str, Any]] = {
    "x-queue-type": "quorum",
    "x-single-active-consumer": True,
    "x-delivery-limit": DLQ_DELIVERY_LIMIT,
}


async def declare_shared(channel: AbstractChannel) -> None:
    """Declare what every queue of a vhost shares (idempotent): the delay levels with the
    deliver exchange, and the fan-in queue of flows, ``hutch.joins``, with its dead letters.

    The 114 declarations and bindings go out with ``nowait``, then one passive declare waits
    for the broker to have handled them all: a worker or client starts about 60 ms sooner
    (the broker answers each in turn). A declaration the broker refuses (other arguments)
    closes the channel, so that last call fails with the refusal.
    """
    amqp = await channel.get_underlay_channel()
    try:
        await amqp.exchange_declare(
            DELIVER_EXCHANGE, exchange_type=ExchangeType.TOPIC.value, durable=True, nowait=True
        )
        below = DELIVER_EXCHANGE
        for level in range(DELAY_LEVELS):
            name = delay_exchange(level)
            await amqp.exchange_declare(
                name, exchange_type=ExchangeType.TOPIC.value, durable=True, nowait=True
            )
            await amqp.queue_declare(
                name,
                durable=True,
                nowait=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-message-ttl": (2**level) * 1000,
                    "x-dead-letter-exchange": below,
                    "x-dead-letter-strategy": "at-least-once",
                    "x-overflow": "reject-publish",
                },
            )
            skip = ["*"] * (DELAY_LEVELS - 1 - level)
            await amqp.queue_bind(name, name, routing_key=".".join([*skip, "1", "#"]), nowait=True)
            await amqp.exchange_bind(
                destination=below, source=name, routing_key=".".join([*skip, "0", "#"]), nowait=True
            )
            below = name
        await amqp.queue_declare(
            dlq_name(JOINS_QUEUE), durable=True, nowait=True, arguments=DLQ_ARGUMENTS
        )
        await amqp.queue_declare(JOINS_QUEUE, durable=True, nowait=True, arguments=JOINS_ARGUMENTS)
        await amqp.exchange_declare(below, exchange_type=ExchangeType.TOPIC.value, passive=True)
    except aiormq.exceptions.ChannelInvalidStateError as exc:
        # The broker closed the channel while the nowait frames went out: the later ones fail
        # with "closed", so raise what closed it (PRECONDITION_FAILED, say) instead.
        raise await _close_reason(amqp) or exc from None


async def _close_reason(channel: aiormq.abc.AbstractChannel) -> aiormq.exceptions.AMQPError | None:
    """The error the broker closed ``channel`` with (it may still be arriving), if any."""
    closing = channel.closing
    await asyncio.wait([closing], timeout=1.0)
    if closing.done() and not closing.cancelled():
        reason = closing.exception()
        if isinstance(reason, aiormq.exceptions.AMQPError):
            return reason
    return None


async def declare_queue(channel: AbstractChannel, queue: str) -> AbstractQueue:
    """Declare ``queue`` and ``queue.dlq`` and bind ``queue`` for delayed delivery.

    Declares the deliver exchange it binds to as well (`declare_shared` does too), so that it
    does not depend on another channel's declarations having arrived first.
    """
    check_queue_name(queue)
    amqp = await channel.get_underlay_channel()
    await amqp.exchange_declare(
        DELIVER_EXCHANGE, exchange_type=ExchangeType.TOPIC.value, durable=True, nowait=True
    )
    await channel.declare_queue(dlq_name(queue), durable=True, arguments=DLQ_ARGUMENTS)
    work = await channel.declare_queue(queue, durable=True, arguments=queue_arguments(queue))
    await work.bind(DELIVER_EXCHANGE, ".".join(["*"] * DELAY_LEVELS + [queue]))
    return work


async def declare_joins(channel: AbstractChannel) -> None:
    """Declare ``hutch.joins`` and its dead letters: all the fan-in's holder uses."""
    await channel.declare_queue(dlq_name(JOINS_QUEUE), durable=True, arguments=DLQ_ARGUMENTS)
    await channel.declare_queue(JOINS_QUEUE, durable=True, arguments=JOINS_ARGUMENTS)


async def declare(channel: AbstractChannel, queue: str) -> AbstractQueue:
    await declare_shared(channel)
    return await declare_queue(channel, queue)


async def passive_declare(channel: AbstractChannel, queue: str) -> AbstractQueue:
    """The existing ``queue`` (its ``declaration_result`` has the counts), or `QueueNotFound`.

    The broker closes ``channel`` when the queue does not exist, as AMQP requires.
    """
    try:
        return await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise QueueNotFound(queue) from None


@dataclass(frozen=True, slots=True)
class QueueCounts:
    ready: int  # messages ready for delivery
    consumers: int


async def queue_counts(connection: AbstractConnection, queue: str) -> QueueCounts:
    """Ready messages and consumers of ``queue`` now, on a channel of its own (so a missing
    queue, `QueueNotFound`, costs no caller its channel)."""
    channel = await open_channel(connection, publisher_confirms=False)
    try:
        result = (await passive_declare(channel, queue)).declaration_result
    finally:
        with contextlib.suppress(*CONNECTION_ERRORS):
            await channel.close()
    return QueueCounts(int(result.message_count or 0), int(result.consumer_count or 0))
