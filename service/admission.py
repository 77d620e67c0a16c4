"""The second stage: admit each delivery as a pool `Job`, or refuse it before it runs.

Admission looks only at properties, headers and the body's length: the parent never decodes
task arguments (the child does, and reports bad ones itself). A refused delivery is
dead-lettered with its reason at once, never run and never requeued.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from service import protocol
from service.delivery import Delivery
from service.errors import ProtocolError
from service.observer import Observer
from service.pool.jobs import Job
from service.protocol import Reason
from service.registry import lookup

if TYPE_CHECKING:
    from service.settle import Settler

_IDENTITY_ENCODINGS = frozenset({None, "", "identity", "utf-8", "binary"})


@dataclass(frozen=True, slots=True)
class Refusal:
    """A delivery that is dead-lettered without running; ``task`` is its registered task, if
    the header named one."""

    reason: Reason
    detail: str
    task: str | None = None


@dataclass(frozen=True, slots=True)
class Postponement:
    """A delivery whose ETA is still ahead: it goes back into the broker-held delay."""

    eta: int  # Unix ms
    task: str


def admit(
    message: Delivery, *, max_body_size: int, max_deliveries: int, now_ms: int | None = None
) -> Job | Refusal | Postponement:
    """Build a job from a delivery, or say why it must not run (yet)."""
    name = message.headers.get(protocol.TASK_HEADER)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    spec = lookup(name) if isinstance(name, str) else None
    task = spec.name if spec is not None else None
    content_type = protocol.media_type(message.content_type)
    if content_type is None:
        return Refusal(
            Reason.BAD_CONTENT_TYPE,
            f"content type {message.content_type!r}; use application/msgpack or application/json",
            task,
        )
    if message.content_encoding not in _IDENTITY_ENCODINGS:
        return Refusal(
            Reason.BAD_ENCODING,
            f"content encoding {message.content_encoding!r} is not supported",
            task,
        )
    if not isinstance(name, str) or not name:
        return Refusal(Reason.UNKNOWN_TASK, "the 'task' header is missing or not a string")
    if spec is None:
        return Refusal(Reason.UNKNOWN_TASK, f"no task named {protocol.truncate(name, 200)!r}")
    if len(message.body) > max_body_size:
        return Refusal(
            Reason.TOO_LARGE,
            f"body is {len(message.body)} bytes, over the {max_body_size}-byte cap",
            task,
        )
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    try:
        eta = protocol.eta_of(message.headers, now_ms)
    except ProtocolError as exc:
        return Refusal(exc.reason, exc.detail, task)
    deliveries = protocol.int_header(message.headers, "x-delivery-count") or 0
    if deliveries >= max_deliveries:
        return Refusal(
            Reason.DELIVERY_LIMIT,
            f"delivered {deliveries + 1} times without finishing: "
            "its task keeps killing the pool child, its workers keep dying, "
            "or its result cannot be published",
            task,
        )
    if eta is not None and eta > now_ms:
        return Postponement(eta, spec.name)
    headers = message.headers
    return Job(
        spec=spec,
        content_type=content_type,
        body=message.body,
        message_id=message.message_id or "",
        attempt=max(1, protocol.int_header(message.headers, protocol.ATTEMPT_HEADER) or 1),
        deliveries=deliveries,
        redelivered=bool(message.redelivered),
        want_result=bool(message.reply_to),
        delivery=message,
        headers={name: headers[name] for name in protocol.CHILD_HEADERS if name in headers},
        reply_to=message.reply_to,
        correlation_id=message.correlation_id,
    )


def runnable_since(message: Delivery) -> float | None:
    """Unix time the message became runnable: a retry's due time or a delayed task's ETA,
    else its publish time."""
    headers = message.headers
    due = protocol.int_header(headers, protocol.DUE_HEADER)
    if due is None:
        due = protocol.int_header(headers, protocol.ETA_HEADER)
    if due is not None:
        return due / 1000
    return message.timestamp.timestamp() if message.timestamp else None


class JobSink(Protocol):
    """Where admitted jobs go (`service.pool.supervisor.Pool`)."""

    def submit(self, job: Job) -> None: ...


class Intake:
    """The consumer's ``on_message``: counts each delivery, admits it into the pool or has the
    settler refuse it. While closed (draining) every delivery goes straight back.

    A plain function per delivery, not a coroutine: it never waits, and aio-pika would
    otherwise make a task per delivery. ``lane`` is the priority of its queue among the
    worker's queues (`service.priority`), given to every job.
    """

    def __init__(
        self,
        pool: JobSink,
        settler: Settler,
        observer: Observer,
        *,
        max_body_size: int,
        max_deliveries: int,
        lane: int = 0,
    ) -> None:
        self._lane = lane
        self._pool = pool
        self._settler = settler
        self._observer = observer
        self._max_body_size = max_body_size
        self._max_deliveries = max_deliveries
        self.open = True

    def __call__(self, message: Delivery) -> None:
        if not self.open:
            self._settler.give_back(message)
            return
        verdict = admit(
            message, max_body_size=self._max_body_size, max_deliveries=self._max_deliveries
        )
        if protocol.FLOW_START_HEADER in message.headers and not message.redelivered:
            self._observer.on_flow_started()
        if isinstance(verdict, Job):
            self._observer.on_received(
                verdict.spec.name,
                redelivered=bool(message.redelivered),
                runnable_since=runnable_since(message),
            )
            verdict.lane = self._lane
            self._pool.submit(verdict)
        elif isinstance(verdict, Refusal):
            self._observer.on_received(
                verdict.task,
                redelivered=bool(message.redelivered),
                runnable_since=runnable_since(message),
            )
            self._settler.refuse(message, verdict)
        else:
            # Not runnable yet: no queue wait to speak of.
            self._observer.on_received(
                verdict.task, redelivered=bool(message.redelivered), runnable_since=None
            )
            self._settler.postpone(message, verdict.eta)
