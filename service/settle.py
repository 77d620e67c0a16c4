"""The last stage: turn a job's outcome into broker actions, output first and ack last.

| outcome                          | action                                                     |
|----------------------------------|------------------------------------------------------------|
| succeeded                        | result to ``reply_to`` (confirmed), then ack               |
| raised / timed out, attempts left| copy to a broker-held delay (confirmed), then ack          |
| raised / timed out, no attempts  | copy to ``Q.dlq`` and error result (confirmed), then ack   |
| bad input                        | copy to ``Q.dlq`` and error result (confirmed), then ack   |
| child died while running it      | ``reject(requeue=True)``: counted by the broker            |
| returned unfinished (drain)      | ``nack(requeue=True)``: not the message's fault            |

If a confirm does not come, the message is handed back to the queue instead of acked: a
message is never acked before what replaces it is safe. A delivery whose channel has closed is
left alone, since the broker has already requeued it and any ack would be for a stale tag.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from service import protocol, topology
from service.acks import DirectAcks
from service.broker import CONNECTION_ERRORS, Publisher, PublishError
from service.copies import copy_message, publisher_headers
from service.logs import task_fields
from service.pool import Job, Outcome, OutcomeKind
from service.protocol import Reason
from service.registry import TaskSpec

log = logging.getLogger(__name__)

_PUBLISH_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)


def backoff(spec: TaskSpec, attempt: int) -> float:
    """Seconds before attempt ``attempt + 1``: exponential, capped, with equal jitter."""
    delay = min(spec.retry_backoff * 2.0 ** (attempt - 1), spec.retry_backoff_max)
    return delay / 2 + random.uniform(0, delay / 2)


def is_stale(message: AbstractIncomingMessage) -> bool:
    """True once the channel that delivered ``message`` has closed."""
    try:
        message.channel  # noqa: B018 - raises once the delivering channel has closed
    except aio_pika.exceptions.ChannelInvalidStateError:
        return True
    return False


class Action(StrEnum):
    """What happens to a delivery; also the ``action`` label of hutch_messages_settled_total."""

    ACK = "ack"  # succeeded: result confirmed (if wanted), then ack
    RETRY = "retry"  # copy confirmed into a broker-held delay, then ack
    DEAD_LETTER = "dead_letter"  # copy confirmed into Q.dlq, then ack
    REQUEUE = "requeue"  # reject(requeue=True): counted against the delivery limit
    RETURN = "return"  # nack(requeue=True): handed back through no fault of its own
    STALE = "stale"  # its channel closed first; the broker has requeued it already


def decide(job: Job, outcome: Outcome) -> Action:
    """The settle rule for one outcome (see the module docstring's table)."""
    kind = outcome.kind
    if kind is OutcomeKind.OK:
        return Action.ACK
    if kind is OutcomeKind.ERROR or kind is OutcomeKind.TIMEOUT:
        if outcome.retryable and job.attempt < job.spec.max_attempts:
            return Action.RETRY
        return Action.DEAD_LETTER
    if kind is OutcomeKind.REJECTED:
        return Action.DEAD_LETTER
    if kind is OutcomeKind.CRASHED:
        return Action.REQUEUE
    return Action.RETURN


class Acks(Protocol):
    """Sends the ack, nack or reject of a delivery (`service.consumer.Consumer` batches them)."""

    def ack_soon(self, message: AbstractIncomingMessage) -> asyncio.Future[None]: ...

    async def ack(self, message: AbstractIncomingMessage) -> None: ...

    async def nack(self, message: AbstractIncomingMessage, *, requeue: bool) -> None: ...

    async def reject(self, message: AbstractIncomingMessage, *, requeue: bool) -> None: ...


class Settler:
    """Carries out settle decisions for one queue; ``on_settled(action, reason)`` is told what
    actually happened to each delivery (a publish that fails turns a decision into RETURN).

    ``acks`` sends the final ack, nack or reject (default: through the message itself).
    """

    def __init__(
        self,
        publisher: Publisher,
        queue: str,
        *,
        acks: Acks | None = None,
        on_settled: Callable[[str, str | None], None] = lambda action, reason: None,
    ) -> None:
        self.publisher = publisher
        self.queue = queue
        self._acks: Acks = acks or DirectAcks()
        self._on_settled = on_settled

    async def settle(self, job: Job, outcome: Outcome, action: Action) -> None:
        message: AbstractIncomingMessage = job.delivery
        if action is Action.ACK:
            await self.succeed(message, outcome.payload)
        elif action is Action.RETRY:
            log.info(
                "task %s (id %s) attempt %d/%d failed: %s: %s; retrying",
                job.spec.name,
                job.message_id,
                job.attempt,
                job.spec.max_attempts,
                outcome.error_type,
                outcome.error_message,
                extra=task_fields(job.spec.name, job.message_id, job.attempt),
            )
            await self.retry(message, job.attempt + 1, backoff(job.spec, job.attempt))
        elif action is Action.DEAD_LETTER:
            if outcome.reason is not None:
                reason = outcome.reason
            else:
                reason = Reason.TIMEOUT if outcome.kind is OutcomeKind.TIMEOUT else Reason.FAILED
                log.warning(
                    "task %s (id %s) failed after %d attempt(s): %s: %s; dead-lettered",
                    job.spec.name,
                    job.message_id,
                    job.attempt,
                    outcome.error_type,
                    outcome.error_message,
                    extra=task_fields(job.spec.name, job.message_id, job.attempt),
                )
            await self.dead_letter(message, reason, outcome.error_type, outcome.error_message)
        else:
            await self.requeue(message, counted=action is Action.REQUEUE)

    def ack_soon(self, message: AbstractIncomingMessage) -> asyncio.Future[None] | None:
        """Ack a success that owes nobody a result, without a task of its own (the common
        case, so it is kept cheap). Returns what to wait for, or None if already settled."""
        try:
            if is_stale(message):
                raise aio_pika.exceptions.ChannelInvalidStateError("channel closed")
            pending = self._acks.ack_soon(message)
        except CONNECTION_ERRORS:
            self._on_settled(Action.STALE, None)
            return None
        pending.add_done_callback(self._acked)
        return pending

    def _acked(self, pending: asyncio.Future[None]) -> None:
        if pending.cancelled() or pending.exception() is not None:
            # The channel closed between the result and the ack: the broker redelivers it.
            self._on_settled(Action.STALE, None)
        else:
            self._on_settled(Action.ACK, None)

    async def succeed(self, message: AbstractIncomingMessage, payload: bytes | None) -> None:
        if is_stale(message):
            self._on_settled(Action.STALE, None)
            return
        if message.reply_to and payload is not None:
            try:
                await self._reply(message, payload)
            except PublishError as exc:
                log.warning("result of %s not confirmed (%s); requeueing", message.message_id, exc)
                await self.requeue(message, counted=False)
                return
        await self._ack(message, Action.ACK)

    async def retry(self, message: AbstractIncomingMessage, attempt: int, delay: float) -> None:
        if is_stale(message):
            self._on_settled(Action.STALE, None)
            return
        headers = publisher_headers(message)
        headers[protocol.ATTEMPT_HEADER] = attempt
        exchange, routing_key = topology.delay_routing_key(self.queue, delay)
        # When the copy is due again: its queue wait is measured from here, not from the
        # original publish, so backoff and earlier runs do not count as waiting.
        headers[protocol.DUE_HEADER] = int((time.time() + math.ceil(delay)) * 1000)
        try:
            await self._publish(copy_message(message, headers), routing_key, exchange=exchange)
        except PublishError as exc:
            log.warning("retry of %s not confirmed (%s); requeueing", message.message_id, exc)
            await self.requeue(message, counted=False)
            return
        await self._ack(message, Action.RETRY)

    async def dead_letter(
        self,
        message: AbstractIncomingMessage,
        reason: Reason,
        error_type: str,
        error_message: str,
    ) -> None:
        """Move a message to ``Q.dlq`` with its reason, tell a waiting caller, then ack."""
        if is_stale(message):
            self._on_settled(Action.STALE, None)
            return
        headers = publisher_headers(message)
        headers.update(
            {
                protocol.REASON_HEADER: str(reason),
                protocol.ERROR_TYPE_HEADER: protocol.truncate(error_type),
                protocol.ERROR_MESSAGE_HEADER: protocol.truncate(error_message),
                protocol.QUEUE_HEADER: self.queue,
                protocol.DEAD_AT_HEADER: int(time.time() * 1000),
            }
        )
        try:
            await self._publish(copy_message(message, headers), topology.dlq_name(self.queue))
            if message.reply_to:
                content_type = message.content_type
                if content_type not in protocol.CONTENT_TYPES:
                    content_type = protocol.JSON
                body = protocol.error_result(content_type, error_type, error_message)
                await self._reply(message, body, content_type)
        except PublishError as exc:
            log.warning("dead letter %s not confirmed (%s); requeueing", message.message_id, exc)
            await self.requeue(message, counted=False)
            return
        await self._ack(message, Action.DEAD_LETTER, reason)

    async def requeue(self, message: AbstractIncomingMessage, *, counted: bool) -> None:
        """Hand a message back. ``counted`` uses reject, which 4.3+ counts toward the limit."""
        if is_stale(message):
            self._on_settled(Action.STALE, None)
            return
        try:
            if counted:
                await self._acks.reject(message, requeue=True)
            else:
                await self._acks.nack(message, requeue=True)
        except CONNECTION_ERRORS:
            self._on_settled(Action.STALE, None)
            return
        self._on_settled(Action.REQUEUE if counted else Action.RETURN, None)

    async def _reply(
        self, message: AbstractIncomingMessage, body: bytes, content_type: str | None = None
    ) -> None:
        assert message.reply_to is not None
        await self._publish(
            aio_pika.Message(
                body,
                content_type=content_type or message.content_type,
                correlation_id=message.correlation_id or message.message_id,
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            ),
            message.reply_to,
            mandatory=False,  # a caller that went away must not block the ack
        )

    async def _publish(
        self,
        message: aio_pika.Message,
        routing_key: str,
        *,
        exchange: str = "",
        mandatory: bool = True,
    ) -> None:
        """Publish with a few quick retries before giving up on this delivery.

        A refused publish (a full reply queue, a blocked connection) is usually brief. Retrying
        here keeps the finished task's output, where requeueing at once would re-run the task
        in a hot loop and burn the message's delivery count.
        """
        for delay in (*_PUBLISH_RETRY_DELAYS, None):
            try:
                await self.publisher.publish(
                    message, routing_key, exchange=exchange, mandatory=mandatory
                )
                return
            except PublishError as exc:
                if delay is None:
                    raise
                log.info("publish to %r failed (%s); retrying in %gs", routing_key, exc, delay)
                if exc.unroutable and routing_key == topology.dlq_name(self.queue):
                    await self._declare_queues()
            await asyncio.sleep(delay)

    async def _declare_queues(self) -> None:
        """Someone deleted ``Q.dlq`` (or its queue): declare both again so dead letters land."""
        try:
            await topology.declare_queue(await self.publisher.channel(), self.queue)
            log.warning("declared %r and its dead-letter queue again", self.queue)
        except CONNECTION_ERRORS as exc:
            log.warning("could not declare %r again: %r", self.queue, exc)

    async def _ack(
        self, message: AbstractIncomingMessage, action: Action, reason: Reason | None = None
    ) -> None:
        try:
            await self._acks.ack(message)
        except CONNECTION_ERRORS:
            # The channel closed between the publish and the ack: the broker redelivers it.
            self._on_settled(Action.STALE, None)
            return
        self._on_settled(action, reason)

