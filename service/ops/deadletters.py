"""What a dead letter in ``Q.dlq`` says about itself, and how operators choose among them.

A dead letter was put there by a hutch worker (``x-hutch-*`` headers: reason, error, attempts) or
by RabbitMQ itself (``x-first-death-*`` and ``x-death``, when its own delivery limit or a TTL
dead-lettered it). `DeadLetter` reads either into one summary; `Filter` and `parse_since` are
what ``hutch dlq --task/--reason/--id/--flow/--since`` build; `replay_copy` is the fresh task a
replay publishes. Nothing here talks to the broker (`service.ops.dlq` does).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fnmatch
import hashlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from service import protocol
from service.protocol import Reason
from service.republish import copy_message, is_broker_header, publisher_headers
from service.settings import parse_duration


class BrokerReason(StrEnum):
    """What RabbitMQ itself writes in ``x-first-death-reason`` when it dead-letters from Q."""

    DELIVERY_LIMIT = "delivery_limit"
    EXPIRED = "expired"
    MAXLEN = "maxlen"
    REJECTED = "rejected"


UNKNOWN_REASON: Final = "unknown"  # in Q.dlq, but dead-lettered by neither hutch nor the broker
# Every reason a dead letter can show, for ``--reason`` and its help text.
REASONS: Final = tuple(sorted({*Reason, *BrokerReason, UNKNOWN_REASON}))

# What a dead letter carries about its death; a replay starts afresh without them.
_DEATH_HEADERS: Final = frozenset(
    {
        protocol.ATTEMPT_HEADER,
        protocol.REASON_HEADER,
        protocol.ERROR_TYPE_HEADER,
        protocol.ERROR_MESSAGE_HEADER,
        protocol.QUEUE_HEADER,
        protocol.DEAD_AT_HEADER,
    }
)


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return None


def _anonymous_id(message: AbstractIncomingMessage) -> str:
    """A stable id for a message without message_id: a digest of what does not change."""
    digest = hashlib.sha256(message.body)
    headers = sorted(
        (k, repr(v)) for k, v in (message.headers or {}).items() if not is_broker_header(k)
    )
    digest.update(repr((headers, message.timestamp, message.content_type)).encode())
    return "anon-" + digest.hexdigest()[:12]


def _broker_death_time(headers: dict[str, Any]) -> dt.datetime | None:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        when = deaths[0].get("time")
        if isinstance(when, dt.datetime):
            return when if when.tzinfo else when.replace(tzinfo=dt.UTC)
    return None


@dataclass(frozen=True)
class DeadLetter:
    """The summary of one message in ``Q.dlq``.

    ``source`` is ``hutch`` (a worker dead-lettered it: ``x-hutch-*`` headers), ``broker``
    (RabbitMQ did: ``x-first-death-*`` and ``x-death``) or ``unknown``.
    """

    id: str  # message_id, or "anon-" + a digest of the message when it has none
    message_id: str | None
    queue: str
    task: str | None
    reason: str
    source: str
    attempts: int
    error_type: str | None
    error_message: str | None
    dead_lettered_at: dt.datetime | None
    replays: int
    content_type: str | None
    size: int
    flow: str | None = None  # a flow's step: the flow id and the step's path
    step: str | None = None

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage, queue: str) -> DeadLetter:
        headers = dict(message.headers or {})
        reason = _text(headers.get(protocol.REASON_HEADER))
        when: dt.datetime | None = None
        if reason is not None:
            source = "hutch"
            origin = _text(headers.get(protocol.QUEUE_HEADER)) or queue
            ms = protocol.int_header(headers, protocol.DEAD_AT_HEADER)
            if ms is not None:
                with contextlib.suppress(OverflowError, OSError, ValueError):
                    when = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
        elif (broker_reason := _text(headers.get("x-first-death-reason"))) is not None:
            source, reason = "broker", broker_reason
            origin = _text(headers.get("x-first-death-queue")) or queue
            when = _broker_death_time(headers)
        else:
            source, reason, origin = UNKNOWN_REASON, UNKNOWN_REASON, queue
        return cls(
            id=message.message_id or _anonymous_id(message),
            message_id=message.message_id,
            queue=origin,
            task=_text(headers.get(protocol.TASK_HEADER)),
            reason=reason,
            source=source,
            attempts=max(1, protocol.int_header(headers, protocol.ATTEMPT_HEADER) or 1),
            error_type=_text(headers.get(protocol.ERROR_TYPE_HEADER)),
            error_message=_text(headers.get(protocol.ERROR_MESSAGE_HEADER)),
            dead_lettered_at=when,
            replays=max(0, protocol.int_header(headers, protocol.REPLAYS_HEADER) or 0),
            content_type=message.content_type,
            size=len(message.body),
            flow=_text(headers.get(protocol.FLOW_HEADER)),
            step=_text(headers.get(protocol.FLOW_STEP_HEADER)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "message_id": self.message_id,
            "queue": self.queue,
            "task": self.task,
            "reason": self.reason,
            "source": self.source,
            "attempts": self.attempts,
            "error_type": self.error_type,
            "error_message": self.error_message,
            "dead_lettered_at": iso(self.dead_lettered_at, ms=True)
            if self.dead_lettered_at
            else None,
            "replays": self.replays,
            "content_type": self.content_type,
            "size": self.size,
            "flow": self.flow,
            "step": self.step,
        }


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """A point in time from ``2026-05-01T12:00`` (UTC unless it has an offset) or ``10m``.

    Durations are counted back from ``now``: ``30s``, ``10m``, ``2h``, ``1d``, ``1w``, ``1h30m``.
    """
    now = now or dt.datetime.now(dt.UTC)
    try:
        ago = parse_duration(text)
    except ValueError:
        pass
    else:
        try:
            return now - ago
        except OverflowError:
            return dt.datetime.min.replace(tzinfo=dt.UTC)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"--since {text!r} is not a time: use a duration such as 30s, 10m, 2h, 1d or an ISO "
            "date-time such as 2026-05-01T12:00 (UTC unless it has an offset)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Filter:
    """Which dead letters an operation applies to: all criteria must hold.

    Within one criterion any value may match. ``tasks`` are shell-style patterns
    (``myapp.tasks.*``); ``since`` keeps dead letters whose time is known and not earlier.
    """

    tasks: tuple[str, ...] = ()
    reasons: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()
    since: dt.datetime | None = None
    flows: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for reason in self.reasons:
            if reason not in REASONS:
                raise ValueError(
                    f"--reason {reason!r} is not a dead-letter reason; use one of "
                    + ", ".join(REASONS)
                )

    def matches(self, letter: DeadLetter) -> bool:
        if self.ids and letter.id not in self.ids:
            return False
        if self.flows and letter.flow not in self.flows:
            return False
        if self.reasons and letter.reason not in self.reasons:
            return False
        if self.tasks and not any(
            fnmatch.fnmatchcase(letter.task or "", pattern) for pattern in self.tasks
        ):
            return False
        return self.since is None or (
            letter.dead_lettered_at is not None and letter.dead_lettered_at >= self.since
        )

    def __str__(self) -> str:
        parts = [f"id={i}" for i in self.ids]
        parts += [f"flow={f}" for f in self.flows]
        parts += [f"task={t}" for t in self.tasks]
        parts += [f"reason={r}" for r in self.reasons]
        if self.since is not None:
            parts.append(f"since {iso(self.since)}")
        return ", ".join(parts) or "none"


def replay_copy(
    message: AbstractIncomingMessage, letter: DeadLetter, now_ms: int
) -> aio_pika.Message:
    """A dead letter as a fresh task: attempts start again, and it says what it replays.

    Drops the broker's headers and the ``x-hutch-*`` death headers, adds ``x-hutch-replay-of``,
    ``x-hutch-replayed-at`` and ``x-hutch-replays``, sets ``x-hutch-due`` to now; keeps
    message_id (the idempotency key) and the properties a retry copy keeps (protocol §3.5). A
    message without message_id gets its ``anon-`` id as one, so that every replay of it has the
    same key (the AMQP library would otherwise invent a random one).
    """
    headers = {k: v for k, v in publisher_headers(message).items() if k not in _DEATH_HEADERS}
    headers[protocol.REPLAY_OF_HEADER] = letter.id
    headers[protocol.REPLAYED_AT_HEADER] = now_ms
    headers[protocol.REPLAYS_HEADER] = letter.replays + 1
    # Runnable from now: the worker's queue-wait metric counts from here, not from the original
    # timestamp (which replay keeps, and which may be days old).
    headers[protocol.DUE_HEADER] = now_ms
    return copy_message(message, headers, message_id=message.message_id or letter.id)


def iso(when: dt.datetime, *, ms: bool = False) -> str:
    """``2026-05-01T12:00:03Z``: UTC, to the second (or millisecond)."""
    text = when.astimezone(dt.UTC).isoformat(timespec="milliseconds" if ms else "seconds")
    return text.replace("+00:00", "Z")
