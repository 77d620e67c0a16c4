"""The first stage: keep a consumer on the queue, and admit or refuse each delivery.

One loop owns the consuming connection: connect, declare, consume, and wait until the
connection is lost, the broker cancels the consumer, or the worker drains. A lost connection
means reconnecting with backoff on a brand-new channel (the broker has already requeued
everything unacked, so old delivery tags are never reused); a server-side cancel (the queue was
deleted, say) means declaring the queue again and consuming again, so the worker never sits
connected but silently consuming nothing.

Admission looks only at properties, headers and the body's length: the parent never decodes
task arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from service import protocol, topology
from service.acks import ChannelAcks
from service.broker import CONNECTION_ERRORS, connect, safe_url
from service.pool import Job
from service.protocol import Reason
from service.registry import lookup

log = logging.getLogger(__name__)

_BACKOFF_START = 0.5
_BACKOFF_MAX = 15.0


@dataclass(frozen=True, slots=True)
class Refusal:
    """A delivery that is dead-lettered without running."""

    reason: Reason
    detail: str


def admit(
    message: AbstractIncomingMessage, *, max_body_size: int, max_deliveries: int
) -> Job | Refusal:
    """Build a job from a delivery, or say why it must not run."""
    if message.content_type not in protocol.CONTENT_TYPES:
        return Refusal(
            Reason.BAD_CONTENT_TYPE,
            f"content type {message.content_type!r}; use application/msgpack or application/json",
        )
    if message.content_encoding not in (None, "", "identity", "utf-8", "binary"):
        return Refusal(
            Reason.BAD_ENCODING,
            f"content encoding {message.content_encoding!r} is not supported",
        )
    name = message.headers.get(protocol.TASK_HEADER)
    if isinstance(name, bytes):
        name = name.decode("utf-8", "replace")
    if not isinstance(name, str) or not name:
        return Refusal(Reason.UNKNOWN_TASK, "the 'task' header is missing or not a string")
    spec = lookup(name)
    if spec is None:
        return Refusal(Reason.UNKNOWN_TASK, f"no task named {protocol.truncate(name, 200)!r}")
    if len(message.body) > max_body_size:
        return Refusal(
            Reason.TOO_LARGE,
            f"body is {len(message.body)} bytes, over the {max_body_size}-byte cap",
        )
    deliveries = _int_header(message, "x-delivery-count", 0)
    if deliveries >= max_deliveries:
        return Refusal(
            Reason.DELIVERY_LIMIT,
            f"delivered {deliveries + 1} times without finishing: "
            "its task keeps killing the pool child, its workers keep dying, "
            "or its result cannot be published",
        )
    return Job(
        spec=spec,
        content_type=message.content_type,
        body=message.body,
        message_id=message.message_id or "",
        attempt=max(1, _int_header(message, protocol.ATTEMPT_HEADER, 1)),
        deliveries=deliveries,
        redelivered=bool(message.redelivered),
        want_result=bool(message.reply_to),
        delivery=message,
    )


def _int_header(message: AbstractIncomingMessage, name: str, default: int) -> int:
    value = message.headers.get(name, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


class Consumer:
    """Keeps one consumer on ``queue`` until `close` is called.

    ``prefetch`` is the first window; `resize` changes it while consuming.
    """

    def __init__(
        self,
        url: str,
        queue: str,
        *,
        prefetch: int,
        on_message: Callable[[AbstractIncomingMessage], Any],
        on_lost: Callable[[], None] = lambda: None,
        name: str = "hutch-worker",
    ) -> None:
        self._url = url
        self._queue_name = queue
        self.prefetch = prefetch  # the window wanted; the consumer on the broker follows it
        self._applied = 0  # the window of the consumer registered now (0: none)
        self._on_message = on_message
        self._on_lost = on_lost
        self._name = name
        self._wake = asyncio.Event()
        self._paused = False
        self._closed = False
        self._queue: AbstractQueue | None = None
        self._acks: ChannelAcks | None = None
        self._tag: str | None = None
        self.consuming = False
        self.connected = False
        self._ever_connected = False
        self.reconnects = 0
        self.started = asyncio.Event()  # set once the first consumer is registered

    async def run(self) -> None:
        """Consume until `close`; reconnects forever with capped, jittered backoff."""
        delay = _BACKOFF_START
        while not self._closed:
            try:
                await self._session()
                delay = _BACKOFF_START
            except aiormq.exceptions.ChannelPreconditionFailed as exc:
                # Not a network problem: the queue exists with other arguments. Retrying lets
                # an operator fix it without restarting, but say plainly what is wrong.
                log.error(
                    "cannot declare queue %r or its dead-letter queue: %s. It exists with "
                    "other arguments (declared by another tool or an older hutch); delete it "
                    "or declare it as docs/protocol.md section 9 says. Retrying in %.1fs",
                    self._queue_name,
                    exc.args[0] if exc.args else exc,
                    delay,
                )
            except CONNECTION_ERRORS as exc:
                if self._closed:
                    return
                log.warning(
                    "broker connection to %s failed: %r; reconnecting in %.1fs",
                    safe_url(self._url),
                    exc,
                    delay,
                )
            self.consuming = self.connected = False
            if self._closed:
                return
            await self._sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _session(self) -> None:
        connection = await connect(self._url, name=self._name)
        try:
            lost = asyncio.Event()

            def on_lost(*_: Any) -> None:
                if not lost.is_set():
                    lost.set()
                    self._wake.set()
                    self._on_lost()

            connection.close_callbacks.add(on_lost)
            channel = await connection.channel(publisher_confirms=False)
            channel.close_callbacks.add(on_lost)
            await topology.declare_delays(channel)
            cancelled = asyncio.Event()

            def on_cancel(frame: Any) -> None:
                cancelled.set()
                self._wake.set()

            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(on_cancel)
            self._acks = ChannelAcks(underlay)
            if self._ever_connected:
                self.reconnects += 1
            self.connected = self._ever_connected = True
            while not lost.is_set() and not self._closed:
                if not self._paused and not self.consuming:
                    cancelled.clear()
                    self._queue = await topology.declare_queue(channel, self._queue_name)
                    self._applied = await self._consume(channel)
                    self.consuming = True
                    self.started.set()
                    log.info(
                        "consuming from %r (prefetch %d) at %s",
                        self._queue_name,
                        self._applied,
                        safe_url(self._url),
                    )
                elif self._paused and self.consuming:
                    await self._cancel_consumer()
                elif self.consuming and self.prefetch != self._applied:
                    await self._reconsume(channel)
                await self._wake.wait()
                self._wake.clear()
                if cancelled.is_set() and self.consuming:
                    log.warning(
                        "the broker cancelled the consumer on %r (queue deleted?); "
                        "declaring it again",
                        self._queue_name,
                    )
                    self.consuming = False
                    await self._sleep(_BACKOFF_START)
        finally:
            self.consuming = self.connected = False
            if not connection.is_closed:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    await connection.close()

    async def _consume(self, channel: AbstractChannel) -> int:
        assert self._queue is not None
        prefetch = self.prefetch
        await channel.set_qos(prefetch_count=prefetch)
        self._tag = await self._queue.consume(self._deliver, no_ack=False)
        return prefetch

    async def _reconsume(self, channel: AbstractChannel) -> None:
        """Apply a new window: a second consumer with it, then cancel the first.

        RabbitMQ (3.10 at least) applies ``basic.qos`` only to consumers registered after it on
        a quorum queue. Deliveries already made to the old consumer stay valid on the channel,
        and the broker sends none after its cancel-ok, so nothing is lost or stuck; but one in
        flight at the cancel comes back with x-delivery-count one higher (3.10, seen in tests),
        which is why the worker resizes rarely.
        """
        old, before = self._tag, self._applied
        prefetch = await self._consume(channel)
        if self._queue is not None and old is not None:
            async with asyncio.timeout(5):
                await self._queue.cancel(old)
        self._applied = prefetch
        log.debug("prefetch window %d -> %d on %r", before, prefetch, self._queue_name)

    @property
    def tag(self) -> str | None:
        """The consumer tag deliveries come to now."""
        return self._tag

    @property
    def window_applied(self) -> bool:
        """True when the one consumer on the broker has the window asked for."""
        return self.consuming and self._applied == self.prefetch

    def _deliver(self, message: AbstractIncomingMessage) -> Any:
        if self._acks is not None and message.channel is self._acks.channel:
            assert message.delivery_tag is not None
            self._acks.delivered(message.delivery_tag)
        return self._on_message(message)

    # Settling (the `service.settle.Acks` interface): through the channel's `ChannelAcks`, so
    # acks that fall due together go out as one.

    def _tracker(self, message: AbstractIncomingMessage) -> ChannelAcks | None:
        acks = self._acks
        # message.channel raises once its channel has closed: the caller treats that as stale.
        if acks is not None and message.channel is acks.channel:
            return acks
        return None

    def ack_soon(self, message: AbstractIncomingMessage) -> asyncio.Future[None]:
        acks = self._tracker(message)
        if acks is None:
            return asyncio.ensure_future(message.ack())
        assert message.delivery_tag is not None
        return acks.ack_soon(message.delivery_tag)

    async def ack(self, message: AbstractIncomingMessage) -> None:
        await self.ack_soon(message)

    async def nack(self, message: AbstractIncomingMessage, *, requeue: bool) -> None:
        await self._refuse(message, requeue=requeue, reject=False)

    async def reject(self, message: AbstractIncomingMessage, *, requeue: bool) -> None:
        await self._refuse(message, requeue=requeue, reject=True)

    async def _refuse(
        self, message: AbstractIncomingMessage, *, requeue: bool, reject: bool
    ) -> None:
        acks = self._tracker(message)
        if acks is None:
            await (message.reject if reject else message.nack)(requeue=requeue)
            return
        assert message.delivery_tag is not None
        await (acks.reject if reject else acks.nack)(message.delivery_tag, requeue=requeue)

    def resize(self, prefetch: int) -> None:
        """Ask for a new window; applied by re-consuming, never by dropping deliveries."""
        if prefetch != self.prefetch:
            self.prefetch = prefetch
            self._wake.set()

    async def _cancel_consumer(self) -> None:
        queue, tag = self._queue, self._tag
        self.consuming = False
        self._applied = 0
        if queue is not None and tag is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                async with asyncio.timeout(5):
                    await queue.cancel(tag)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                while not self._closed:
                    await self._wake.wait()
                    self._wake.clear()

    async def pause(self) -> None:
        """Stop receiving (basic.cancel); unacked deliveries stay valid on the channel."""
        self._paused = True
        if self.consuming:
            await self._cancel_consumer()
        self._wake.set()

    def close(self) -> None:
        """End the loop and close the connection (unsettled deliveries are requeued)."""
        self._closed = True
        self._wake.set()
