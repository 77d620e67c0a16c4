"""Reading a queue without taking from it: every ready message seen once, then handed back.

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
(another reader holds the rest) says so (`Browser.complete`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType
from typing import Any, Final, Self

from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
    ConsumerTag,
)

from service import topology
from service.broker import CONNECTION_ERRORS, open_channel
from service.errors import BrowseError

WINDOW: Final = 500  # messages a reader has in flight at most (basic.qos prefetch-count)
RETURN_RUN: Final = 32  # messages handed back per basic.nack (see Browser._hand_back)
RUNS_IN_FLIGHT: Final = 8  # basic.nacks sent before waiting for the broker to catch up
RETURN_WAIT: Final = 5.0  # seconds a reader waits for the broker to take its messages back


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
        channel = self._channel = await open_channel(self._connection, publisher_confirms=False)
        channel.close_callbacks.add(self._on_close)
        try:
            queue = await topology.passive_declare(channel, self.queue)
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
        queue = await topology.passive_declare(channel, self.queue)
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
