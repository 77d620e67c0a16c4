"""The first stage: keep a consumer on the queue, through every loss and cancel.

One loop owns the consuming connection: connect, declare, consume, and wait until the
connection is lost, the broker cancels the consumer, or the worker drains. A lost connection
means reconnecting with backoff on a brand-new channel (the broker has already requeued
everything unacked, so old delivery tags are never reused: `service.acks.AckRouter` settles a
delivery only through the channel that delivered it); a server-side cancel (the queue was
deleted, say) means declaring the queue again and consuming again, so the worker never sits
connected but silently consuming nothing.

Each delivery goes to ``on_message`` (`service.admission.Intake`) as it arrives, as a
`service.delivery.Delivery`: the consumer is registered on aiormq's channel directly, so a
delivery costs one small object and one task (aiormq's), not aio-pika's message and its second
task.

`Consumer.ping` times one request on its own idle channel of the consuming connection: the
prefetch window (`service.prefetch`) needs the broker round trip, and AMQP heartbeats are
never answered, so they cannot measure it.

With several broker nodes (`service.nodes`), a lost connection moves on to the next node: the
session on it declares the topology again and consumes again, and `reconnects` counts the
losses by the node lost, `node` says which node the consumer is on now.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from typing import Any

import aiormq
import aiormq.abc
from aio_pika.abc import AbstractConnection

from service import topology
from service.acks import AckRouter
from service.broker import CONNECTION_ERRORS, Node, Nodes, as_nodes, connect_node, open_channel
from service.delivery import Delivery

log = logging.getLogger(__name__)

_BACKOFF_START = 0.5
_BACKOFF_MAX = 15.0


class Consumer:
    """Keeps one consumer on ``queue`` until `close` is called.

    ``prefetch`` is the first window; `resize` changes it while consuming. With ``paused`` it
    connects and declares but consumes only after `resume`. ``acks`` is told
    of each consuming channel and delivery, so the settler can settle through it; ``on_lost``
    is called once per lost connection, before reconnecting.
    """

    def __init__(
        self,
        nodes: Nodes | str,
        queue: str,
        *,
        prefetch: int,
        on_message: Callable[[Delivery], None],
        acks: AckRouter | None = None,
        on_lost: Callable[[], None] = lambda: None,
        name: str = "hutch-worker",
        paused: bool = False,
    ) -> None:
        self.nodes = as_nodes(nodes)
        self._queue_name = queue
        self.prefetch = prefetch  # the window wanted; the consumer on the broker follows it
        self._applied = 0  # the window of the consumer registered now (0: none)
        self._on_message = on_message
        self._on_lost = on_lost
        self._name = name
        self._wake = asyncio.Event()
        self._paused = paused
        self._closed = False
        self._channel: aiormq.abc.AbstractChannel | None = None
        self._ping_channel: aiormq.abc.AbstractChannel | None = None
        self._tag: str | None = None
        self.acks = acks or AckRouter()
        self.consuming = False
        self.connected = False
        self.node: Node | None = None  # the node of the open connection
        # Established connections lost, by the node's address (every node listed, from 0).
        self.reconnects: dict[str, int] = {node.address: 0 for node in self.nodes.all}

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
                    self.nodes.current.safe if self.node is None else self.node.safe,
                    exc,
                    delay,
                )
            self.consuming = self.connected = False
            if self._closed:
                return
            await self._sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _session(self) -> None:
        connection, node = await connect_node(self.nodes, name=self._name)
        sharing: asyncio.Future[None] | None = None
        try:
            lost = asyncio.Event()

            def on_lost(*_: Any) -> None:
                if not lost.is_set():
                    lost.set()
                    # Not ready from this instant (/readyz), not from when the loop wakes.
                    self.consuming = self.connected = False
                    self._wake.set()
                    if not self._closed:
                        self.reconnects[node.address] += 1
                        self.nodes.failed(node)  # the next session starts at the next node
                    self._on_lost()

            connection.close_callbacks.add(on_lost)
            channel = await open_channel(connection, publisher_confirms=False)
            channel.close_callbacks.add(on_lost)
            # The delay levels and the fan-in queue go out on a channel of their own while
            # this one declares the work queue and consumes (the broker handles channels in
            # parallel): no delivery needs them, only what a settle may publish after it, and
            # a publish that comes too early (a new vhost's first milliseconds) is refused,
            # so its message is requeued, not lost. A refusal ends the session as before.
            sharing = asyncio.ensure_future(_declare_shared(connection))
            sharing.add_done_callback(lambda _: self._wake.set())
            cancelled = asyncio.Event()

            def on_cancel(frame: Any) -> None:
                cancelled.set()
                self._wake.set()

            underlay = self._channel = await channel.get_underlay_channel()
            # Its own channel: a ping on the consuming one could slip between the basic.qos
            # and the basic.consume of a resize and give the new consumer the old window.
            pinging = await open_channel(connection, publisher_confirms=False)
            self._ping_channel = await pinging.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(on_cancel)
            self.acks.opened(underlay)
            self.node = node
            self.connected = True
            while not lost.is_set() and not self._closed:
                if sharing is not None and sharing.done():
                    sharing.result()  # raises what the broker refused
                    sharing = None
                if not self._paused and not self.consuming:
                    cancelled.clear()
                    await topology.declare_queue(channel, self._queue_name)
                    self._applied = await self._consume()
                    self.consuming = not lost.is_set()
                    log.info(
                        "consuming from %r (prefetch %d) at %s",
                        self._queue_name,
                        self._applied,
                        node.safe,
                    )
                elif self._paused and self.consuming:
                    await self._cancel_consumer()
                elif self.consuming and self.prefetch != self._applied:
                    await self._reconsume()
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
            if sharing is not None and not sharing.done():
                sharing.cancel()
            self.consuming = self.connected = False
            self.node = None
            if not connection.is_closed:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    await connection.close()

    async def _consume(self) -> int:
        assert self._channel is not None
        prefetch = self.prefetch
        await self._channel.basic_qos(prefetch_count=prefetch)
        ok = await self._channel.basic_consume(self._queue_name, self._deliver, no_ack=False)
        self._tag = ok.consumer_tag
        return prefetch

    async def _cancel(self, tag: str) -> None:
        assert self._channel is not None
        async with asyncio.timeout(5):
            await self._channel.basic_cancel(tag)

    async def _reconsume(self) -> None:
        """Apply a new window: a second consumer with it, then cancel the first.

        RabbitMQ (3.10 at least) applies ``basic.qos`` only to consumers registered after it on
        a quorum queue. Deliveries already made to the old consumer stay valid on the channel,
        and the broker sends none after its cancel-ok, so nothing is lost or stuck; but one in
        flight at the cancel comes back with x-delivery-count one higher (3.10, seen in tests),
        which is why the worker resizes rarely.
        """
        old, before = self._tag, self._applied
        prefetch = await self._consume()
        if old is not None:
            await self._cancel(old)
        self._applied = prefetch
        log.debug("prefetch window %d -> %d on %r", before, prefetch, self._queue_name)

    @property
    def url(self) -> str:
        """The broker URLs, passwords masked, in the order they are tried."""
        return str(self.nodes)

    @property
    def current_node(self) -> str | None:
        """``host:port`` of the node of the open connection."""
        return self.node.address if self.node is not None else None

    @property
    def tag(self) -> str | None:
        """The consumer tag deliveries come to now."""
        return self._tag

    @property
    def window_applied(self) -> bool:
        """True when the one consumer on the broker has the window asked for."""
        return self.consuming and self._applied == self.prefetch

    async def _deliver(self, message: aiormq.abc.DeliveredMessage) -> None:
        # A coroutine function, so that aiormq runs it as the one task it makes per delivery
        # (it would wrap a plain function in another coroutine); it never waits.
        delivery = Delivery(message)
        self.acks.delivered(delivery)
        self._on_message(delivery)

    async def ping(self, timeout: float) -> float | None:
        """Seconds for one round trip to the broker on the consuming connection, or None when
        not consuming, or no answer came within ``timeout``.

        The request is a ``basic.qos`` on an idle channel: every broker answers it at once, it
        changes nothing (no consumer is on that channel) and it cannot fail on a missing queue.
        """
        channel = self._ping_channel
        if channel is None or channel.is_closed or not self.consuming:
            return None
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            async with asyncio.timeout(timeout):
                await channel.basic_qos(prefetch_count=0)
        except CONNECTION_ERRORS:
            return None
        return loop.time() - start

    def resize(self, prefetch: int) -> None:
        """Ask for a new window; applied by re-consuming, never by dropping deliveries."""
        if prefetch != self.prefetch:
            self.prefetch = prefetch
            self._wake.set()

    async def _cancel_consumer(self) -> None:
        tag = self._tag
        self.consuming = False
        self._applied = 0
        if self._channel is not None and tag is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self._cancel(tag)

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

    def resume(self) -> None:
        """Start (or start again) receiving."""
        self._paused = False
        self._wake.set()

    def close(self) -> None:
        """End the loop and close the connection (unsettled deliveries are requeued)."""
        self._closed = True
        self._wake.set()


async def _declare_shared(connection: AbstractConnection) -> None:
    channel = await open_channel(connection, publisher_confirms=False)
    await topology.declare_shared(channel)
    with contextlib.suppress(*CONNECTION_ERRORS):
        await channel.close()
