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
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractConnection

from service import routing, topology
from service.errors import ManagementRequired, ManagementUnavailable, QueueNotFound
from service.ops.management import ManagementAPI, rate


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
            for name in (queue, routing.dlq_name(queue)):
                found = await asyncio.to_thread(api.queue, vhost, name)
                if found is not None:
                    listed[name] = found
    except ManagementUnavailable as exc:
        if queue is None:
            raise ManagementRequired(str(exc)) from None
        error = str(exc)

    if queue is None:
        names = sorted(name for name in listed if routing.dlq_name(name) in listed)
    else:
        names = [queue]
    stats: list[QueueStats] = []
    for name in names:
        try:
            work = await topology.queue_counts(connection, name)
            dead = await topology.queue_counts(connection, routing.dlq_name(name))
        except QueueNotFound:
            if queue is None:
                continue  # deleted since the management API listed it
            raise
        api_work, api_dlq = listed.get(name), listed.get(routing.dlq_name(name))
        unacked = api_work.get("messages_unacknowledged") if api_work is not None else None
        stats.append(
            QueueStats(
                queue=name,
                ready=work.ready,
                consumers=work.consumers,
                dead_letters=dead.ready,
                unacked=unacked if isinstance(unacked, int) else None,
                rates=None
                if api_work is None
                else Rates(
                    publish=rate(api_work, "publish"),
                    deliver=rate(api_work, "deliver_get"),
                    ack=rate(api_work, "ack"),
                    dead_letter=rate(api_dlq, "publish") if api_dlq is not None else 0.0,
                ),
            )
        )
    return Inspection(stats, error)
