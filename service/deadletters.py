"""Dead letters: list, show, replay and purge the messages in a work queue's ``Q.dlq``.

Reading without taking
----------------------
AMQP 0-9-1 has no "peek", so `Browser` reads a queue like this: a passive declare gives the number
M of ready messages; consumers with manual acks receive them and every one is held unacked; at
the end the reader hands back everything it did not settle with ``basic.nack(requeue=True)`` and
closes its channel. Holding them all is what lets each message be seen exactly once: a message
handed back early would be delivered again at once.

The prefetch bounds how much is in flight: a consumer gets a prefetch of `WINDOW` (the broker
sends it that many and then waits, since nothing is acked); once the reader has worked through
them, that consumer is cancelled (its messages stay held) and a new one gets the next window.
So a 100 000-message ``Q.dlq`` never sits in the client's memory at once, a ``--limit 3`` stops
after one window, and at most M messages are taken, so dead letters that arrive during a read are
left for the next one. Messages go back in their order (see `Browser._hand_back`).

The cost: every read adds one to ``x-delivery-count`` of each copy in ``Q.dlq`` (on 4.3+
``basic.nack`` is not counted). That is harmless because ``Q.dlq`` is declared with a delivery
limit of 1,000,000 (`topology.DLQ_DELIVERY_LIMIT`), not 4.x's default of 20. While a read runs,
the messages it holds are invisible to other readers; a read that receives fewer than M messages
(another reader holds the rest) says so (`Scan.complete`).

Replaying safely
----------------
`replay` re-publishes each matching dead letter to Q with publisher confirms and acks it in
``Q.dlq`` only after its copy is confirmed. An interruption at any point (SIGKILL, lost connection,
a refused publish) therefore leaves each dead letter in ``Q.dlq``, in Q, or in both, never in
neither: at worst a task runs once more than intended, which tasks must tolerate anyway.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import decimal
import fnmatch
import hashlib
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Self

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
    ConsumerTag,
)

from service import protocol, topology
from service.broker import CONNECTION_ERRORS, Publisher, PublishError
from service.copies import copy_message, is_broker_header, publisher_headers
from service.errors import HutchError, QueueNotFound
from service.protocol import Reason

# What RabbitMQ itself writes in x-first-death-reason when it dead-letters a message from Q.
BROKER_REASONS: Final = ("delivery_limit", "expired", "maxlen", "rejected")
UNKNOWN_REASON: Final = "unknown"  # in Q.dlq, but dead-lettered by neither hutch nor the broker
REASONS: Final = tuple(sorted({*(str(r) for r in Reason), *BROKER_REASONS, UNKNOWN_REASON}))

WINDOW: Final = 500  # messages a reader has in flight at most (basic.qos prefetch-count)
RETURN_RUN: Final = 32  # messages handed back per basic.nack (see Browser._hand_back)
RUNS_IN_FLIGHT: Final = 8  # basic.nacks sent before waiting for the broker to catch up
RETURN_WAIT: Final = 5.0  # seconds a reader waits for the broker to take its messages back

# The broker owns these; a copy re-published with an old x-death can be silently dropped by
# 3.10's dead-letter cycle detection (protocol §3.5 lists the same set).
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


class BrowseError(HutchError):
    """Reading a dead-letter queue stopped part-way (the channel or connection closed)."""


# -- what a dead letter says about itself ----------------------------------------------------


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


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

    @classmethod
    def from_message(cls, message: AbstractIncomingMessage, queue: str) -> DeadLetter:
        headers = dict(message.headers or {})
        reason = _text(headers.get(protocol.REASON_HEADER))
        when: dt.datetime | None = None
        if reason is not None:
            source = "hutch"
            origin = _text(headers.get(protocol.QUEUE_HEADER)) or queue
            ms = _int(headers.get(protocol.DEAD_AT_HEADER))
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
            attempts=max(1, _int(headers.get(protocol.ATTEMPT_HEADER)) or 1),
            error_type=_text(headers.get(protocol.ERROR_TYPE_HEADER)),
            error_message=_text(headers.get(protocol.ERROR_MESSAGE_HEADER)),
            dead_lettered_at=when,
            replays=max(0, _int(headers.get(protocol.REPLAYS_HEADER)) or 0),
            content_type=message.content_type,
            size=len(message.body),
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
        }


# -- choosing dead letters -------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """A point in time from ``2026-05-01T12:00`` (UTC unless it has an offset) or ``10m``.

    Durations are counted back from ``now``: ``30s``, ``10m``, ``2h``, ``1d``, ``1w``, ``1h30m``.
    """
    spec = text.strip().lower()
    now = now or dt.datetime.now(dt.UTC)
    if spec and _DURATION.sub("", spec) == "":
        seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION.findall(spec))
        try:
            return now - dt.timedelta(seconds=seconds)
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
        parts += [f"task={t}" for t in self.tasks]
        parts += [f"reason={r}" for r in self.reasons]
        if self.since is not None:
            parts.append(f"since {iso(self.since)}")
        return ", ".join(parts) or "none"


# -- reading a queue without taking from it --------------------------------------------------


class Browser:
    """Receives every message ready in ``queue`` once, holding each unacked until the end.

    ``async with Browser(connection, "q.dlq") as browser: async for message in browser: ...``
    Messages not settled with `ack` go back to the queue on exit. Iteration stops after
    ``total`` messages, or when none arrives for ``idle_timeout`` seconds (then ``complete`` is
    False: another reader holds the rest). See the module docstring for the windows.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        queue: str,
        *,
        idle_timeout: float = 5.0,
        window: int = WINDOW,
    ) -> None:
        self.queue = queue
        self.total = 0
        self.seen = 0
        self.complete = True
        self._connection = connection
        self._idle_timeout = idle_timeout
        self._window = window
        self._delivered = 0  # deliveries received, over all consumers
        self._requested = 0  # deliveries the consumers so far were allowed
        self._queue: AbstractQueue | None = None
        self._inbox: asyncio.Queue[AbstractIncomingMessage | None] = asyncio.Queue()
        # delivery tag -> consumer tag of every message held; bodies are not kept around
        self._unsettled: dict[int, str] = {}
        self._channel: AbstractChannel | None = None
        self._consumer: ConsumerTag | None = None
        self._closing = False
        self._lost: BaseException | None = None

    async def __aenter__(self) -> Self:
        channel = self._channel = await self._connection.channel(publisher_confirms=False)
        channel.close_callbacks.add(self._on_close)
        try:
            try:
                queue = await channel.declare_queue(self.queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise QueueNotFound(self.queue) from None
            self.total = int(queue.declaration_result.message_count or 0)
            self._queue = queue
        except BaseException:
            await self._close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> AbstractIncomingMessage:
        if self.seen >= self.total:
            raise StopAsyncIteration
        if self._inbox.empty() and self._delivered >= self._requested:
            await self._next_window()
        try:
            async with asyncio.timeout(self._idle_timeout):
                message = await self._inbox.get()
        except TimeoutError:
            self.complete = False
            raise StopAsyncIteration from None
        if message is None:
            raise BrowseError(
                f"the connection closed while reading {self.queue!r} ({self._lost!r}); "
                "every message not yet settled is back in the queue"
            )
        self.seen += 1
        self._hold(message)
        return message

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Remove ``message`` from the queue for good."""
        self._unsettled.pop(message.delivery_tag or 0, None)
        await message.ack()

    async def _ready(self, channel: AbstractChannel) -> int:
        queue = await channel.declare_queue(self.queue, passive=True)
        return int(queue.declaration_result.message_count or 0)

    async def _until_ready(self, channel: AbstractChannel, count: int, timeout: float) -> bool:
        """Wait until the queue shows at least ``count`` ready messages; False on timeout."""
        deadline = time.monotonic() + timeout
        while await self._ready(channel) < count:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _hand_back(self, channel: AbstractChannel, held: dict[int, str]) -> None:
        """Return held messages to the queue in their order.

        With basic.nack rather than by closing the channel: 4.3+ does not count a nack toward
        the delivery limit. RabbitMQ 3.x returns the messages of one return command in no
        particular order once there are more than 32, and merges returns into one command when
        a channel has many queue commands outstanding. So: runs of `RETURN_RUN` tags, a few at a
        time, waiting until the broker shows them ready again before sending more. If that
        wait times out (another reader is taking messages), the rest go back unpaced. A run
        never spans two consumers: the broker would split it and return the halves in either
        order.
        """
        runs: list[list[int]] = []
        for tag in sorted(held):
            if runs and len(runs[-1]) < RETURN_RUN and held[runs[-1][-1]] == held[tag]:
                runs[-1].append(tag)
            else:
                runs.append([tag])
        underlay = await channel.get_underlay_channel()
        target = await self._ready(channel)
        paced = True
        for number, run in enumerate(runs, 1):
            await underlay.basic_nack(delivery_tag=run[-1], multiple=True, requeue=True)
            target += len(run)
            if paced and number % RUNS_IN_FLIGHT == 0:
                paced = await self._until_ready(channel, target, timeout=2.0)
        if paced:  # closing before the broker has them back would requeue the rest unordered
            await self._until_ready(channel, target, timeout=RETURN_WAIT)

    async def _next_window(self) -> None:
        """Cancel the current consumer (what it delivered stays held) and start the next."""
        assert self._channel is not None and self._queue is not None
        if self._consumer is not None:
            # Deliveries sent before cancel-ok still reach _deliver.
            await self._queue.cancel(self._consumer)
            self._consumer = None
        size = min(self._window, self.total - self.seen)
        await self._channel.set_qos(prefetch_count=size)  # applies to consumers started later
        self._requested = self._delivered + size
        self._consumer = await self._queue.consume(self._deliver, no_ack=False)

    def _hold(self, message: AbstractIncomingMessage) -> None:
        self._unsettled[message.delivery_tag or 0] = message.consumer_tag or ""

    async def _deliver(self, message: AbstractIncomingMessage) -> None:
        self._delivered += 1
        self._inbox.put_nowait(message)

    def _on_close(self, _sender: Any, exc: BaseException | None = None) -> None:
        if not self._closing:
            self._lost = exc
            self._inbox.put_nowait(None)

    async def _close(self) -> None:
        self._closing = True
        channel, self._channel = self._channel, None
        if channel is None or channel.is_closed:
            return
        try:
            if self._consumer is not None and self._queue is not None:
                await self._queue.cancel(self._consumer)
                self._consumer = None
            for _ in range(3):  # let deliveries sent before cancel-ok reach the inbox
                await asyncio.sleep(0)
            while not self._inbox.empty():
                message = self._inbox.get_nowait()
                if message is not None:
                    self._hold(message)
            held, self._unsettled = self._unsettled, {}
            if held:
                await self._hand_back(channel, held)
        except CONNECTION_ERRORS:
            pass  # the broker requeues whatever this channel held when it closes
        finally:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await channel.close()


# -- operations ------------------------------------------------------------------------------


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
        return topology.dlq_name(self.queue)

    def record(self, browser: Browser) -> None:
        self.total, self.seen, self.complete = browser.total, browser.seen, browser.complete


async def _check_exists(connection: AbstractConnection, queue: str) -> None:
    channel = await connection.channel(publisher_confirms=False)
    try:
        await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise QueueNotFound(queue) from None
    finally:
        with contextlib.suppress(*CONNECTION_ERRORS):
            await channel.close()


async def list_letters(
    connection: AbstractConnection,
    queue: str,
    where: Filter = Filter(),
    *,
    limit: int | None = None,
) -> Scan:
    """The dead letters of ``queue`` that match, in queue order; nothing is removed."""
    scan = Scan(queue)
    async with Browser(connection, topology.dlq_name(queue)) as browser:
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
        content_type = self.letter.content_type or ""
        if content_type not in protocol.CONTENT_TYPES:
            return None, f"content type {content_type!r} is not one hutch decodes"
        try:
            return protocol.decode(content_type, self.body, max_depth=None, string_keys=False), None
        except protocol.ProtocolError as exc:
            return None, exc.detail

    def to_json(self) -> dict[str, Any]:
        body, error = self.decoded()
        out: dict[str, Any] = {
            **self.letter.to_json(),
            "properties": jsonable(self.properties),
            "headers": jsonable(self.headers),
            "body": jsonable(body),
        }
        if error is not None:
            out["body_error"] = error
            out["raw_body"] = raw_text(self.body)
        return out


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
    async with Browser(connection, topology.dlq_name(queue)) as browser:
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
class Outcome:
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
) -> Outcome:
    """Publish matching dead letters back to ``queue``, each removed once its copy is confirmed.

    Stops at the first publish the broker does not confirm (queue full, queue deleted, no
    confirm within the publisher's timeout): what was not replayed stays in ``Q.dlq``. Up to
    ``window`` publishes await their confirms at once; ``rate`` caps replays per second.
    """
    await _check_exists(connection, queue)
    outcome = Outcome(Scan(queue))
    done = outcome.scan.letters
    gate = asyncio.Semaphore(window)
    pace = _Pace(rate)
    in_flight: set[asyncio.Task[None]] = set()

    async def one(browser: Browser, message: AbstractIncomingMessage, letter: DeadLetter) -> None:
        try:
            now_ms = int(time.time() * 1000)
            try:
                await publisher.publish(replay_copy(message, letter, now_ms), queue)
            except PublishError as exc:
                outcome.error = outcome.error or f"replay of {letter.id} not confirmed: {exc}"
                return
            try:
                await browser.ack(message)
            except CONNECTION_ERRORS as exc:
                outcome.error = outcome.error or (
                    f"the connection to the broker was lost ({type(exc).__name__}) after "
                    f"{letter.id} was replayed: it is now in both {queue} and "
                    f"{topology.dlq_name(queue)}"
                )
                return
            done.append(letter)
            if on_replayed is not None:
                on_replayed(letter)
        finally:
            gate.release()

    async with Browser(connection, topology.dlq_name(queue)) as browser:
        matched = 0
        try:
            async for message in browser:
                if outcome.error is not None:
                    break
                letter = DeadLetter.from_message(message, queue)
                if not where.matches(letter):
                    continue
                if limit is not None and matched >= limit:
                    break
                matched += 1
                await pace.wait()
                await gate.acquire()
                if outcome.error is not None:
                    gate.release()
                    break
                task = asyncio.create_task(one(browser, message, letter))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        finally:
            # Every ack must be sent before the browser hands the rest back.
            if in_flight:
                await asyncio.wait(list(in_flight))
        outcome.scan.record(browser)
    return outcome


async def purge(
    connection: AbstractConnection,
    queue: str,
    where: Filter = Filter(),
    *,
    limit: int | None = None,
    on_purged: Callable[[DeadLetter], None] | None = None,
) -> Outcome:
    """Delete the matching dead letters of ``queue`` for good; the others stay, in order."""
    outcome = Outcome(Scan(queue))
    async with Browser(connection, topology.dlq_name(queue)) as browser:
        async for message in browser:
            letter = DeadLetter.from_message(message, queue)
            if not where.matches(letter):
                continue
            if limit is not None and len(outcome.scan.letters) >= limit:
                break
            await browser.ack(message)
            outcome.scan.letters.append(letter)
            if on_purged is not None:
                on_purged(letter)
        outcome.scan.record(browser)
    return outcome


# -- showing values --------------------------------------------------------------------------


def iso(when: dt.datetime, *, ms: bool = False) -> str:
    """``2026-05-01T12:00:03Z``: UTC, to the second (or millisecond)."""
    text = when.astimezone(dt.UTC).isoformat(timespec="milliseconds" if ms else "seconds")
    return text.replace("+00:00", "Z")


def raw_text(body: bytes) -> Any:
    """A body that did not decode: as text if it is UTF-8, else as base64."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return {"$base64": base64.b64encode(body).decode()}


def jsonable(value: Any) -> Any:
    """Header, property and body values as plain JSON (bytes as ``{"$base64": ...}``)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$base64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dt.datetime):
        return iso(value if value.tzinfo else value.replace(tzinfo=dt.UTC))
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
