"""The last stage: turn a job's outcome into broker actions, output first and ack last.

| outcome                          | action                                                     |
|----------------------------------|------------------------------------------------------------|
| succeeded                        | result to ``reply_to`` (confirmed), then ack               |
| a flow's step succeeded          | what follows it (next steps, fan-in record; confirmed), ack|
| raised / timed out, attempts left| copy to a broker-held delay (confirmed), then ack          |
| raised / timed out, no attempts  | copy to ``Q.dlq`` and error result (confirmed), then ack   |
| bad input                        | copy to ``Q.dlq`` and error result (confirmed), then ack   |
| child died while running it      | ``reject(requeue=True)``: counted by the broker            |
| returned unfinished (drain)      | ``nack(requeue=True)``: not the message's fault            |

A flow's step that is dead-lettered is also copied to the internal task ``hutch.flow.failed``
(confirmed, before the ack), whose child ends the flow (`service.continuation`).

`decide` is that table as a pure function; `Settler` carries its answers out. If a confirm does
not come, the message is handed back to the queue instead of acked: a message is never acked
before what replaces it is safe. A delivery whose channel has closed is left alone, since the
broker has already requeued it and any ack would be for a stale tag.

Every settle runs as a task the `Settler` keeps until it is done (`idle` waits for them all),
except the common case, a success that owes nobody a result: its ack is queued at once, without
a task (`service.acks` coalesces it with its neighbours).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

import aio_pika

from service import continuation, protocol, routing, topology
from service.acks import AckRouter, is_stale
from service.broker import CONNECTION_ERRORS, Publisher
from service.continuation import FlowEvent, Publish
from service.delivery import Delivery
from service.errors import PublishError
from service.logs import task_fields
from service.observer import Observer
from service.pool.jobs import Job, Outcome, OutcomeKind
from service.protocol import Reason
from service.registry import TaskSpec
from service.republish import copy_message, publisher_headers

if TYPE_CHECKING:
    from service.admission import Refusal

log = logging.getLogger(__name__)

_PUBLISH_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)


def backoff(spec: TaskSpec, attempt: int) -> float:
    """Seconds before attempt ``attempt + 1``: exponential, capped, with equal jitter."""
    delay = min(spec.retry_backoff * 2.0 ** (attempt - 1), spec.retry_backoff_max)
    return delay / 2 + random.uniform(0, delay / 2)


class Action(StrEnum):
    """What happens to a delivery; also the ``action`` label of hutch_messages_settled_total."""

    ACK = "ack"  # succeeded: result confirmed (if wanted), then ack
    RETRY = "retry"  # copy confirmed into a broker-held delay, then ack
    DELAY = "delay"  # ETA ahead: copy confirmed into a broker-held delay until then, then ack
    DEAD_LETTER = "dead_letter"  # copy confirmed into Q.dlq, then ack
    REQUEUE = "requeue"  # reject(requeue=True): counted against the delivery limit
    RETURN = "return"  # nack(requeue=True): handed back through no fault of its own
    STALE = "stale"  # its channel closed first; the broker has requeued it already


class TaskOutcome(StrEnum):
    """How one task run ended; also the ``outcome`` label of hutch_tasks_finished_total."""

    SUCCESS = "success"
    FAILED = "failed"  # raised, and no attempt is left (dead-lettered)
    RETRIED = "retried"  # raised, and will run again after a delay
    TIMEOUT = "timeout"  # killed at its hard time limit (retried or dead-lettered)
    CRASHED = "crashed"  # its child died under it
    REJECTED = "rejected"  # bad input: never ran


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a finished job: the action, how the run counts, and why it is dead.

    ``outcome`` is None for a job that never finished (handed back); ``reason`` is set exactly
    when ``action`` is DEAD_LETTER.
    """

    action: Action
    outcome: TaskOutcome | None
    reason: Reason | None = None


def decide(job: Job, outcome: Outcome) -> Decision:
    """The settle rule for one outcome (see the module docstring's table)."""
    kind = outcome.kind
    if kind is OutcomeKind.OK:
        return Decision(Action.ACK, TaskOutcome.SUCCESS)
    if kind is OutcomeKind.ERROR or kind is OutcomeKind.TIMEOUT:
        timed_out = kind is OutcomeKind.TIMEOUT
        if outcome.retryable and job.attempt < job.spec.max_attempts:
            return Decision(Action.RETRY, TaskOutcome.TIMEOUT if timed_out else TaskOutcome.RETRIED)
        reason = outcome.reason or (Reason.TIMEOUT if timed_out else Reason.FAILED)
        return Decision(
            Action.DEAD_LETTER, TaskOutcome.TIMEOUT if timed_out else TaskOutcome.FAILED, reason
        )
    if kind is OutcomeKind.REJECTED:
        return Decision(
            Action.DEAD_LETTER, TaskOutcome.REJECTED, outcome.reason or Reason.MALFORMED
        )
    if kind is OutcomeKind.CRASHED:
        return Decision(Action.REQUEUE, TaskOutcome.CRASHED)
    return Decision(Action.RETURN, None)


class Settler:
    """Carries out settle decisions for one queue.

    ``acks`` sends the final ack, nack or reject (default: through the message itself). The
    ``observer`` is told how each run ended (`Observer.on_finished`) and what actually happened
    to each delivery (`Observer.on_settled`: a publish that fails turns a decision into RETURN).
    """

    def __init__(
        self,
        publisher: Publisher,
        queue: str,
        *,
        acks: AckRouter | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.publisher = publisher
        self.queue = queue
        self._acks = acks or AckRouter()
        self._observer = observer or Observer()
        self._loop = asyncio.get_running_loop()
        self._settling: set[asyncio.Future[None]] = set()  # settle tasks and pending acks

    # -- what the stages before this one hand over ------------------------------------------

    def finish(self, job: Job, outcome: Outcome) -> None:
        """Settle a job the pool is done with (the pool's ``on_done``). Plain function: the
        common case queues an ack and returns."""
        decision = decide(job, outcome)
        if outcome.offloads or outcome.ref_failure is not None:
            self._observer.on_blobs(outcome.offloads, outcome.ref_failure)
        if decision.outcome is not None:
            self._observer.on_finished(
                job.spec.name, decision.outcome, job.run_seconds, job.cpu_seconds
            )
        message = job.delivery
        if (
            decision.action is Action.ACK
            and not outcome.publishes
            and not (message.reply_to and outcome.payload is not None)
        ):
            self._ack_soon(message)
            if outcome.flow is not None:
                self._observer.on_flow_ended(outcome.flow)
        else:
            self._track(self._settle(job, outcome, decision))

    def refuse(self, message: Delivery, refusal: Refusal) -> None:
        """Dead-letter a delivery that admission refused; it never ran."""
        log.warning(
            "dead-lettering message %s: %s (%s)", message.message_id, refusal.reason, refusal.detail
        )
        self._observer.on_finished(refusal.task, TaskOutcome.REJECTED, 0.0, 0.0)
        self._track(
            self.dead_letter(
                message,
                reason=refusal.reason,
                error_type=str(refusal.reason),  # what a caller sees: the reason itself
                error_message=refusal.detail,
            )
        )

    def postpone(self, message: Delivery, eta_ms: int) -> None:
        """A delivery whose ETA is ahead goes back into the broker-held delay, never held
        unacked here: copy confirmed, then ack."""
        self._track(self.delay(message, eta_ms))

    def give_back(self, message: Delivery) -> None:
        """Hand a delivery back to the queue, uncounted: it is not the message's fault."""
        self._track(self.requeue(message, counted=False))

    async def idle(self) -> None:
        """Wait until every settle started so far has finished."""
        while self._settling:
            await asyncio.wait(list(self._settling))

    # -- carrying out a decision ----------------------------------------------------------

    async def _settle(self, job: Job, outcome: Outcome, decision: Decision) -> None:
        message = job.delivery
        action = decision.action
        if action is Action.ACK:
            await self.succeed(message, outcome.payload, outcome.publishes, outcome.flow)
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
            assert decision.reason is not None
            if outcome.kind is not OutcomeKind.REJECTED:
                log.warning(
                    "task %s (id %s) failed after %d attempt(s): %s: %s; dead-lettered",
                    job.spec.name,
                    job.message_id,
                    job.attempt,
                    outcome.error_type,
                    outcome.error_message,
                    extra=task_fields(job.spec.name, job.message_id, job.attempt),
                )
            await self.dead_letter(
                message,
                reason=decision.reason,
                error_type=outcome.error_type,
                error_message=outcome.error_message,
            )
        else:
            await self.requeue(message, counted=action is Action.REQUEUE)

    def _ack_soon(self, message: Delivery) -> None:
        try:
            if is_stale(message):
                raise aio_pika.exceptions.ChannelInvalidStateError("channel closed")
            pending = self._acks.ack_soon(message)
        except CONNECTION_ERRORS:
            self._observer.on_settled(Action.STALE, None)
            return
        pending.add_done_callback(self._acked)
        self._settling.add(pending)

    def _acked(self, pending: asyncio.Future[None]) -> None:
        self._settling.discard(pending)
        if pending.cancelled() or pending.exception() is not None:
            # The channel closed between the result and the ack: the broker redelivers it.
            self._observer.on_settled(Action.STALE, None)
        else:
            self._observer.on_settled(Action.ACK, None)

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._settling.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[None]) -> None:
        self._settling.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("settling failed", exc_info=task.exception())

    async def succeed(
        self,
        message: Delivery,
        payload: bytes | None,
        publishes: tuple[Publish, ...] = (),
        flow: FlowEvent | None = None,
    ) -> None:
        """Publish what follows a flow's step and the result (all confirmed), then ack."""
        if self._stale(message):
            return
        try:
            if publishes:
                await asyncio.gather(*(self._publish_next(p) for p in publishes))
            if message.reply_to and payload is not None:
                await self._reply(message, payload)
        except PublishError as exc:
            log.warning("output of %s not confirmed (%s); requeueing", message.message_id, exc)
            await self.requeue(message, counted=False)
            return
        if await self._ack(message, Action.ACK) and flow is not None:
            self._observer.on_flow_ended(flow)

    async def _publish_next(self, publish: Publish) -> None:
        """One message that follows a flow's step (`service.continuation.Publish`)."""
        message = aio_pika.Message(
            publish.body,
            headers=publish.headers,
            content_type=publish.content_type,
            message_id=publish.message_id,
            correlation_id=publish.correlation_id,
            timestamp=time.time(),
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT
            if publish.reply
            else aio_pika.DeliveryMode.PERSISTENT,
        )
        # A reply whose caller has gone must not hold up the flow; anything else unroutable
        # (a queue nobody declared) is refused, and the step is handed back to try again.
        await self._publish(
            message,
            publish.routing_key,
            exchange=publish.exchange,
            mandatory=not publish.reply,
        )

    async def retry(self, message: Delivery, attempt: int, delay: float) -> None:
        headers = publisher_headers(message)
        headers[protocol.ATTEMPT_HEADER] = attempt
        # When the copy is due again: its queue wait is measured from here, not from the
        # original publish, so backoff and earlier runs do not count as waiting.
        headers[protocol.DUE_HEADER] = int((time.time() + math.ceil(delay)) * 1000)
        await self._delayed(message, headers, delay, Action.RETRY)

    async def delay(self, message: Delivery, eta_ms: int) -> None:
        headers = publisher_headers(message)
        headers[protocol.DUE_HEADER] = eta_ms
        # Whole seconds, rounded up: it never comes back before its ETA. Should a host's clock
        # be behind, it comes back early by that much and is delayed again.
        await self._delayed(message, headers, (eta_ms - time.time() * 1000) / 1000, Action.DELAY)

    async def _delayed(
        self, message: Delivery, headers: dict[str, Any], seconds: float, action: Action
    ) -> None:
        """Publish a copy into the delay topology for ``seconds`` (confirmed), then ack."""
        if self._stale(message):
            return
        headers.pop(protocol.FLOW_START_HEADER, None)  # the flow was counted as it arrived
        exchange, routing_key = routing.delay_routing_key(self.queue, seconds)
        try:
            await self._publish(copy_message(message, headers), routing_key, exchange=exchange)
        except PublishError as exc:
            log.warning("%s of %s not confirmed (%s); requeueing", action, message.message_id, exc)
            await self.requeue(message, counted=False)
            return
        await self._ack(message, action)

    async def dead_letter(
        self,
        message: Delivery,
        *,
        reason: Reason,
        error_type: str,
        error_message: str,
    ) -> None:
        """Move a message to ``Q.dlq`` with its reason, tell a waiting caller, then ack."""
        if self._stale(message):
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
        ends_flow = _ends_flow(message, reason)
        try:
            await self._publish(copy_message(message, headers), routing.dlq_name(self.queue))
            if ends_flow:
                await self._publish(_failure_copy(message, headers), self.queue)
            elif message.reply_to:
                # A readable error even when the request's content type was not.
                content_type = protocol.media_type(message.content_type) or protocol.JSON
                body = protocol.error_result(content_type, error_type, error_message)
                await self._reply(message, body, content_type)
        except PublishError as exc:
            log.warning("dead letter %s not confirmed (%s); requeueing", message.message_id, exc)
            await self.requeue(message, counted=False)
            return
        await self._ack(message, Action.DEAD_LETTER, reason)

    async def requeue(self, message: Delivery, *, counted: bool) -> None:
        """Hand a message back. ``counted`` uses reject, which 4.3+ counts toward the limit."""
        if self._stale(message):
            return
        try:
            if counted:
                await self._acks.reject(message, requeue=True)
            else:
                await self._acks.nack(message, requeue=True)
        except CONNECTION_ERRORS:
            self._observer.on_settled(Action.STALE, None)
            return
        self._observer.on_settled(Action.REQUEUE if counted else Action.RETURN, None)

    def _stale(self, message: Delivery) -> bool:
        """True (and counted) when the delivery's channel closed: nothing may be sent for it."""
        if is_stale(message):
            self._observer.on_settled(Action.STALE, None)
            return True
        return False

    async def _reply(self, message: Delivery, body: bytes, content_type: str | None = None) -> None:
        assert message.reply_to is not None
        await self._publish(
            aio_pika.Message(
                body,
                content_type=content_type or protocol.media_type(message.content_type),
                correlation_id=message.correlation_id or message.message_id,
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            ),
            message.reply_to,
            mandatory=False,  # a caller that went away must not block the ack
        )

    async def _publish(self, message: aio_pika.Message, routing_key: str, **options: Any) -> None:
        """`Publisher.publish` with a few quick retries before giving up on this delivery.

        A refused publish (a full reply queue, a blocked connection) is usually brief. Retrying
        here keeps the finished task's output, where requeueing at once would re-run the task
        in a hot loop and burn the message's delivery count.
        """
        for delay in (*_PUBLISH_RETRY_DELAYS, None):
            try:
                await self.publisher.publish(message, routing_key, **options)
                return
            except PublishError as exc:
                if delay is None:
                    raise
                log.info("publish to %r failed (%s); retrying in %gs", routing_key, exc, delay)
                if exc.unroutable and routing_key == routing.dlq_name(self.queue):
                    await self._declare_queues()
            await asyncio.sleep(delay)

    async def _declare_queues(self) -> None:
        """Someone deleted ``Q.dlq`` (or its queue): declare both again so dead letters land."""
        try:
            await topology.declare_queue(await self.publisher.channel(), self.queue)
            log.warning("declared %r and its dead-letter queue again", self.queue)
        except CONNECTION_ERRORS as exc:
            log.warning("could not declare %r again: %r", self.queue, exc)

    async def _ack(self, message: Delivery, action: Action, reason: Reason | None = None) -> bool:
        try:
            await self._acks.ack(message)
        except CONNECTION_ERRORS:
            # The channel closed between the publish and the ack: the broker redelivers it.
            self._observer.on_settled(Action.STALE, None)
            return False
        self._observer.on_settled(action, reason)
        return True


# A flow step dead-lettered for these reasons cannot be read, so nothing can continue it: the
# dead letter (and the caller's error reply) is where it ends.
_UNREADABLE: Final = frozenset(
    {
        Reason.MALFORMED,
        Reason.BAD_CONTENT_TYPE,
        Reason.BAD_ENCODING,
        Reason.TOO_DEEP,
        Reason.BAD_FLOW,
    }
)


def _ends_flow(message: Delivery, reason: Reason) -> bool:
    """Whether dead-lettering ``message`` must also end its flow (`_failure_copy`)."""
    headers = message.headers
    return (
        protocol.FLOW_HEADER in headers
        and headers.get(protocol.FLOW_STEP_HEADER) != continuation.ON_ERROR_STEP
        and headers.get(protocol.TASK_HEADER) not in continuation.BUILTIN_TASKS
        and reason not in _UNREADABLE
    )


def _failure_copy(message: Delivery, dead_headers: dict[str, Any]) -> aio_pika.Message:
    """The failed step, addressed to `continuation.FAILED_TASK` with what the dead letter
    says: its child ends the flow (on_error and the caller's error), or tells the fan-in."""
    headers = {
        name: value
        for name, value in dead_headers.items()
        if name not in (protocol.ATTEMPT_HEADER, protocol.ETA_HEADER, protocol.DUE_HEADER)
    }
    headers[protocol.FAILED_TASK_HEADER] = headers.get(protocol.TASK_HEADER, "")
    headers[protocol.TASK_HEADER] = continuation.FAILED_TASK
    headers.pop(protocol.FLOW_START_HEADER, None)
    return copy_message(message, headers, message_id=f"{message.message_id}:failed")
