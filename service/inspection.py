"""What hutch's queues are doing: depth, consumers, dead letters and, if available, rates.

A hutch queue is a queue Q for which ``Q.dlq`` exists too. Ready messages, consumers and the
dead-letter depth come from passive declares over AMQP, so they are exact at the moment of asking.
Unacked messages (tasks running or waiting in a worker's prefetch), message rates and the list of
queues need the management API: without it a named queue is still inspected and the rest is left
out (`Inspection.management_error` says why); listing every queue is impossible
(`ManagementRequired`). The management API samples every 5 s by default, so its figures can
trail the AMQP ones by that much.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Any

import aiormq
from aio_pika.abc import AbstractConnection

from service import topology
from service.broker import CONNECTION_ERRORS
from service.errors import HutchError, QueueNotFound
from service.management import ManagementAPI, ManagementUnavailable, rate


class ManagementRequired(HutchError):
    """Listing queues needs the management API, and it did not answer."""


@dataclass(frozen=True)
class Rates:
    """Messages per second, as the management API last sampled them."""

    publish: float  # into Q: new tasks, and retries coming back from the delay queues
    deliver: float  # handed to workers (basic.deliver and basic.get)
    ack: float  # finished: succeeded, retried or dead-lettered
    dead_letter: float  # into Q.dlq


@dataclass(frozen=True)
class QueueStats:
    queue: str
    ready: int
    consumers: int
    dead_letters: int
    unacked: int | None = None  # None: the management API was not available
    rates: Rates | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "ready": self.ready,
            "unacked": self.unacked,
            "consumers": self.consumers,
            "dead_letters": self.dead_letters,
            "rates": None
            if self.rates is None
            else {
                "publish": self.rates.publish,
                "deliver": self.rates.deliver,
                "ack": self.rates.ack,
                "dead_letter": self.rates.dead_letter,
            },
        }


@dataclass(frozen=True)
class Inspection:
    queues: list[QueueStats]
    management_error: str | None = None  # why unacked counts and rates are missing


async def _counts(connection: AbstractConnection, queue: str) -> tuple[int, int]:
    """Ready messages and consumers of ``queue``, from a passive declare."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise QueueNotFound(queue) from None
    finally:
        with contextlib.suppress(*CONNECTION_ERRORS):
            await channel.close()
    result = declared.declaration_result
    return int(result.message_count or 0), int(result.consumer_count or 0)


async def inspect(
    connection: AbstractConnection, api: ManagementAPI, vhost: str, queue: str | None = None
) -> Inspection:
    """Statistics of ``queue``, or of every hutch queue in ``vhost`` when it is None.

    Raises `QueueNotFound` for a named queue (or its ``.dlq``) that does not exist, and
    `ManagementRequired` when listing queues is impossible.
    """
    listed: dict[str, dict[str, Any]] = {}
    error: str | None = None
    try:
        if queue is None:
            answer = await asyncio.to_thread(api.queues, vhost)
            listed = {q["name"]: q for q in answer if isinstance(q.get("name"), str)}
        else:
            for name in (queue, topology.dlq_name(queue)):
                found = await asyncio.to_thread(api.queue, vhost, name)
                if found is not None:
                    listed[name] = found
    except ManagementUnavailable as exc:
        if queue is None:
            raise ManagementRequired(str(exc)) from None
        error = str(exc)

    if queue is None:
        names = sorted(name for name in listed if topology.dlq_name(name) in listed)
    else:
        names = [queue]
    stats: list[QueueStats] = []
    for name in names:
        try:
            ready, consumers = await _counts(connection, name)
            dead_letters, _ = await _counts(connection, topology.dlq_name(name))
        except QueueNotFound:
            if queue is None:
                continue  # deleted since the management API listed it
            raise
        work, dlq = listed.get(name), listed.get(topology.dlq_name(name))
        unacked = work.get("messages_unacknowledged") if work is not None else None
        stats.append(
            QueueStats(
                queue=name,
                ready=ready,
                consumers=consumers,
                dead_letters=dead_letters,
                unacked=unacked if isinstance(unacked, int) else None,
                rates=None
                if work is None
                else Rates(
                    publish=rate(work, "publish"),
                    deliver=rate(work, "deliver_get"),
                    ack=rate(work, "ack"),
                    dead_letter=rate(dlq, "publish") if dlq is not None else 0.0,
                ),
            )
        )
    return Inspection(stats, error)
