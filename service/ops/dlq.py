"""Operations on a work queue's dead letters: list, find, replay, purge.

Each reads ``Q.dlq`` with a `service.ops.browser.Browser`, so what it does not remove stays, in
its order.

Replaying safely
----------------
`replay` re-publishes each matching dead letter to Q with publisher confirms and acks it in
``Q.dlq`` only after its copy is confirmed. An interruption at any point (SIGKILL, lost connection,
a refused publish) therefore leaves each dead letter in ``Q.dlq``, in Q, or in both, never in
neither: at worst a task runs once more than intended, which tasks must tolerate anyway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from service import protocol, routing, topology
from service.broker import CONNECTION_ERRORS, Publisher
from service.errors import ProtocolError, PublishError
from service.ops.browser import Browser
from service.ops.deadletters import DeadLetter, Filter, replay_copy

# The properties `find` shows, in this order.
_PROPERTIES: Final = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
)


@dataclass
class Scan:
    """What one pass over ``Q.dlq`` saw."""

    queue: str
    total: int = 0  # messages ready in Q.dlq when the pass started
    seen: int = 0
    complete: bool = True
    letters: list[DeadLetter] = field(default_factory=list)  # the ones the operation applied to

    @property
    def dlq(self) -> str:
        return routing.dlq_name(self.queue)

    def record(self, browser: Browser) -> None:
        self.total, self.seen, self.complete = browser.total, browser.seen, browser.complete


async def list_letters(
    connection: AbstractConnection,
    queue: str,
    where: Filter = Filter(),
    *,
    limit: int | None = None,
) -> Scan:
    """The dead letters of ``queue`` that match, in queue order; nothing is removed."""
    scan = Scan(queue)
    async with Browser(connection, routing.dlq_name(queue)) as browser:
        async for message in browser:
            letter = DeadLetter.from_message(message, queue)
            if where.matches(letter):
                scan.letters.append(letter)
                if limit is not None and len(scan.letters) >= limit:
                    break
        scan.record(browser)
    return scan


@dataclass(frozen=True)
class Detail:
    """Everything about one dead letter: properties, headers and the decoded body."""

    letter: DeadLetter
    properties: dict[str, Any]
    headers: dict[str, Any]
    body: bytes

    def decoded(self) -> tuple[Any, str | None]:
        """The decoded body and None, or None and why it could not be decoded."""
        content_type = protocol.media_type(self.letter.content_type)
        if content_type is None:
            return None, f"content type {self.letter.content_type!r} is not one hutch decodes"
        try:
            return protocol.decode(content_type, self.body, max_depth=None, string_keys=False), None
        except ProtocolError as exc:
            return None, exc.detail


@dataclass
class Found:
    """The dead letters `find` matched: by exact id if any, else by id prefix."""

    scan: Scan
    details: list[Detail]


async def find(connection: AbstractConnection, queue: str, letter_id: str) -> Found:
    """Dead letters whose id is ``letter_id``, or else starts with it; nothing is removed."""
    scan = Scan(queue)
    exact: list[Detail] = []
    prefixed: list[Detail] = []
    async with Browser(connection, routing.dlq_name(queue)) as browser:
        async for message in browser:
            letter = DeadLetter.from_message(message, queue)
            if letter.id.startswith(letter_id):
                detail = Detail(
                    letter,
                    {
                        name: value
                        for name in _PROPERTIES
                        if (value := getattr(message, name, None)) is not None
                    },
                    dict(message.headers or {}),
                    message.body,
                )
                (exact if letter.id == letter_id else prefixed).append(detail)
        scan.record(browser)
    details = exact or prefixed
    scan.letters = [d.letter for d in details]
    return Found(scan, details)


class _Pace:
    """Spaces events at most ``rate`` per second (no limit when None)."""

    def __init__(self, rate: float | None) -> None:
        self._interval = 1.0 / rate if rate else 0.0
        self._next = 0.0

    async def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        if self._next > now:
            await asyncio.sleep(self._next - now)
        self._next = max(self._next, now) + self._interval


@dataclass
class RunReport:
    """What `replay` or `purge` did; ``error`` says why it stopped early, if it did."""

    scan: Scan
    error: str | None = None


async def replay(
    connection: AbstractConnection,
    publisher: Publisher,
    queue: str,
    where: Filter = Filter(),
    *,
    limit: int | None = None,
    rate: float | None = None,
    window: int = 100,
    on_replayed: Callable[[DeadLetter], None] | None = None,
) -> RunReport:
    """Publish matching dead letters back to ``queue``, each removed once its copy is confirmed.

    Stops at the first publish the broker does not confirm (queue full, queue deleted, no
    confirm within the publisher's timeout): what was not replayed stays in ``Q.dlq``. Up to
    ``window`` publishes await their confirms at once; ``rate`` caps replays per second.
    """
    await topology.queue_counts(connection, queue)  # QueueNotFound before anything is read
    report = RunReport(Scan(queue))
    done = report.scan.letters
    gate = asyncio.Semaphore(window)
    pace = _Pace(rate)
    in_flight: set[asyncio.Task[None]] = set()

    async def one(browser: Browser, message: AbstractIncomingMessage, letter: DeadLetter) -> None:
        try:
            now_ms = int(time.time() * 1000)
            try:
                await publisher.publish(replay_copy(message, letter, now_ms), queue)
            except PublishError as exc:
                report.error = report.error or f"replay of {letter.id} not confirmed: {exc}"
                return
            try:
                await browser.ack(message)
            except CONNECTION_ERRORS as exc:
                report.error = report.error or (
                    f"the connection to the broker was lost ({type(exc).__name__}) after "
                    f"{letter.id} was replayed: it is now in both {queue} and "
                    f"{routing.dlq_name(queue)}"
                )
                return
            done.append(letter)
            if on_replayed is not None:
                on_replayed(letter)
        finally:
            gate.release()

    async with Browser(connection, routing.dlq_name(queue)) as browser:
        matched = 0
        try:
            async for message in browser:
                if report.error is not None:
                    break
                letter = DeadLetter.from_message(message, queue)
                if not where.matches(letter):
                    continue
                if limit is not None and matched >= limit:
                    break
                matched += 1
                await pace.wait()
                await gate.acquire()
                if report.error is not None:
                    gate.release()
                    break
                task = asyncio.create_task(one(browser, message, letter))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        finally:
            # Every ack must be sent before the browser hands the rest back.
            if in_flight:
                await asyncio.wait(list(in_flight))
        report.scan.record(browser)
    return report


async def purge(
    connection: AbstractConnection,
    queue: str,
    where: Filter = Filter(),
    *,
    limit: int | None = None,
    on_purged: Callable[[DeadLetter], None] | None = None,
) -> RunReport:
    """Delete the matching dead letters of ``queue`` for good; the others stay, in order."""
    report = RunReport(Scan(queue))
    async with Browser(connection, routing.dlq_name(queue)) as browser:
        async for message in browser:
            letter = DeadLetter.from_message(message, queue)
            if not where.matches(letter):
                continue
            if limit is not None and len(report.scan.letters) >= limit:
                break
            await browser.ack(message)
            report.scan.letters.append(letter)
            if on_purged is not None:
                on_purged(letter)
        report.scan.record(browser)
    return report
