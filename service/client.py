"""Publish tasks and read results: `AsyncClient` for asyncio code, `Client` for everything else.

Both speak wire protocol v1 and wait for publisher confirms, so a returned task id means the
broker has the task. Results come back through RabbitMQ's direct reply-to
(``amq.rabbitmq.reply-to``): straight to this client's channel, with no reply queue to declare,
fill and drain, the fastest request/reply path the broker has. A result for a client that has
gone is dropped by the broker, as an exclusive reply queue would be deleted with it. ``call``,
``map`` and ``starmap`` raise `TaskError` with the remote error's type and message.

With several broker nodes (a comma-separated URL list), the client connects to the first that
answers in its shuffled order. A publish that meets a lost connection or a node that does not
confirm is sent again, on the next node and with the same ``message_id``, until it is confirmed
or ``publish_timeout`` has passed; then `BrokerUnavailable` names the URLs tried. A task may so
reach the broker twice (the first copy confirmed but the confirm lost): workers run tasks at
least once anyway, and the id is the idempotency key.

``Client`` runs an `AsyncClient` on a private event-loop thread, so it works from plain scripts,
threads and notebooks alike without touching the caller's event loop::

    with Client() as client:
        client.call("crunch", 10)

    async with AsyncClient() as client:
        await client.call("crunch", 10)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import math
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Future as ThreadFuture
from types import TracebackType
from typing import Any, Final, Self, TypeVar

import aio_pika
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from service import protocol, routing, topology
from service.broker import CONNECT_TIMEOUT, Nodes, connect_node, open_channel
from service.continuation import Publish, entry
from service.errors import BrokerUnavailable, HutchError, MessageTooLarge, ProtocolError, TaskError
from service.flow import Chain, Group, Node, Step, TaskRef, step
from service.nodes import Node as BrokerNode
from service.settings import (
    broker_url_from_env,
    max_message_size_from_env,
    publish_timeout_from_env,
)
from service.store.base import Store
from service.store.config import StoreSettings
from service.store.errors import StoreError
from service.store.refs import DEFAULT_CONTENT_TYPE, Ref, embed_refs, is_marker, may_hold_refs
from service.store.refs import resolve_refs as _resolve_refs

T = TypeVar("T")
DIRECT_REPLY_TO: Final = "amq.rabbitmq.reply-to"
# A publish attempt waits at most this long (and at most a third of ``publish_timeout``) for its
# confirm before it is tried on the next node: a black-holed node would otherwise hold it until
# the heartbeat gives up (about 18 s), and the budget would end on the first node.
ATTEMPT_TIMEOUT: Final = CONNECT_TIMEOUT
_CLOSE_TIMEOUT: Final = 1.0
# First pause between rounds over the nodes, doubling up to the second value.
_RETRY_START, _RETRY_MAX = 0.1, 2.0
# What a lost connection or an unreachable node looks like while publishing: try again.
_OUTAGE = (OSError, TimeoutError, aiormq.exceptions.ChannelInvalidStateError)


class AsyncClient:
    """Publishes to one queue and collects results.

    Options (keyword arguments):

    - ``url``: AMQP URL, a comma-separated list of several nodes' URLs, or a list of them;
      default ``HUTCH_BROKER_URL`` (or ``HUTCH_BROKER_URL_FILE``), else
      ``amqp://guest:guest@localhost:5672/``. The nodes are shuffled once per client.
    - ``queue``: the work queue, default ``"default"``; declared (with its dead-letter queue)
      on connect, so tasks published before any worker starts wait for one.
    - ``content_type``: ``application/msgpack`` (default) or ``application/json``.
    - ``timeout``: seconds ``call`` and ``map`` wait for each result; None waits forever.
    - ``window``: most tasks ``map`` keeps in flight at once.
    - ``store``: the blob store for large data, a URL (``file:///shared/path``,
      ``s3://bucket/prefix``) or a `service.store.Store`; default ``HUTCH_STORE_URL``, else
      none. A task body (or a flow's message) whose encoding exceeds ``offload_threshold``
      (default ``HUTCH_OFFLOAD_THRESHOLD``, 1 MiB) goes to the store and the message carries
      its reference; results that came by reference are read back from it.
    - ``max_message_size``: the largest body published (default ``HUTCH_MAX_MESSAGE_SIZE``,
      8 MiB); over it, without a store, `MessageTooLarge` is raised before anything is sent.
    - ``publish_timeout``: seconds a publish keeps trying the nodes through an outage before
      `BrokerUnavailable`; default ``HUTCH_PUBLISH_TIMEOUT``, else 30.
    """

    def __init__(
        self,
        url: str | Sequence[str] | None = None,
        *,
        queue: str = "default",
        content_type: str = protocol.MSGPACK,
        timeout: float | None = None,
        window: int = 1000,
        store: str | Store | None = None,
        offload_threshold: int | None = None,
        max_message_size: int | None = None,
        publish_timeout: float | None = None,
    ) -> None:
        if content_type not in protocol.CONTENT_TYPES:
            raise ValueError(f"content_type must be one of {sorted(protocol.CONTENT_TYPES)}")
        routing.check_queue_name(queue)
        if publish_timeout is None:
            publish_timeout = publish_timeout_from_env()
        if not 0 < publish_timeout < math.inf:
            raise ValueError("publish_timeout must be a positive number of seconds")
        self.nodes = Nodes(url or broker_url_from_env())
        self.url = str(self.nodes)  # passwords masked
        self.publish_timeout = publish_timeout
        self.queue = queue
        self.content_type = content_type
        self.timeout = timeout
        self.window = window
        self._connection: AbstractConnection | None = None
        self._node: BrokerNode | None = None  # the node of the open connection
        self._channel: AbstractChannel | None = None
        self._listening = False  # consuming direct replies on the current channel
        self._declared: set[str] = set()  # queues declared on this connection
        self._exchanges: dict[str, AbstractExchange] = {}
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._reply_lock = asyncio.Lock()
        store_settings = StoreSettings.from_env()
        self._store_settings = dataclasses.replace(
            store_settings, url=store if isinstance(store, str) else store_settings.url
        )
        self._store: Store | None = store if isinstance(store, Store) else None
        self._owns_store = self._store is None  # a store handed in is the caller's to close
        self.offload_threshold = offload_threshold or store_settings.offload_threshold
        self.max_message_size = max_message_size or max_message_size_from_env()
        self._replies: set[asyncio.Task[None]] = set()  # results being read from the store
        self._connect_lock = asyncio.Lock()

    async def connect(self, *, timeout: float = CONNECT_TIMEOUT) -> Self:
        """Connect to the first node that answers (each tried once, for at most ``timeout``
        seconds) and declare the queue; `BrokerUnavailable` if none does."""
        async with self._connect_lock:  # concurrent publishes share one new connection
            if self._connection is None:
                await self._open(timeout)
        return self

    async def _open(self, timeout: float) -> None:
        connection, node = await connect_node(self.nodes, name="hutch-client", timeout=timeout)
        try:
            connection.close_callbacks.add(self._on_close)
            self._connection, self._node = connection, node
            self._channel = await open_channel(
                connection, publisher_confirms=True, on_return_raises=True
            )
            await topology.declare(self._channel, self.queue)
        except BaseException as exc:
            # A refused declaration (the queue exists with other arguments) is no fault of
            # the node: the next connection may go to it again.
            await self._drop(failed=isinstance(exc, _OUTAGE))
            raise
        self._declared = {self.queue}
        self._exchanges = {}

    async def _drop(self, *, failed: bool = True) -> None:
        """Give up the connection (after a failure on it): the next use connects anew, to the
        next node if this one ``failed``."""
        connection, node = self._connection, self._node
        self._connection = self._channel = self._node = None
        self._listening = False
        if node is not None and failed:
            self.nodes.failed(node)
        if connection is not None and not connection.is_closed:
            # A black-holed node never answers the close: do not wait on it.
            with contextlib.suppress(*_OUTAGE, aiormq.exceptions.AMQPError):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await connection.close()

    async def _through_outage(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """``attempt()`` until it succeeds, moving to the next node after each outage error,
        for at most ``publish_timeout`` seconds; then `BrokerUnavailable` naming the URLs
        tried. Anything else (a nack, an unroutable return) is raised at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.publish_timeout
        tried: list[str] = []
        errors: list[BaseException] = []
        pause = _RETRY_START
        while True:
            left = deadline - loop.time()
            node = self._node or self.nodes.current
            used = self._connection
            try:
                if self._connection is None:
                    bound = min(CONNECT_TIMEOUT, self.publish_timeout / 3, left)
                    await self.connect(timeout=max(0.01, bound))
                    node, used = self._node or node, self._connection
                bound = min(ATTEMPT_TIMEOUT, self.publish_timeout / 3, left)
                async with asyncio.timeout(max(0.01, bound)):
                    return await attempt()
            except BrokerUnavailable as exc:  # no node took the connection this round
                tried += exc.tried
                errors += exc.errors
            except (aiormq.exceptions.DeliveryError, aiormq.exceptions.AMQPChannelError):
                # The node is up and said no (a nack, a return, a refused declaration): not
                # an outage, and another node would say the same.
                raise
            except (*_OUTAGE, aiormq.exceptions.AMQPError) as exc:
                live = self._connection is not None and not self._connection.is_closed
                if not isinstance(exc, _OUTAGE) and live:
                    raise  # a protocol error on a live connection: not an outage
                tried.append(node.safe)
                errors.append(exc)
                if used is not None and self._connection is used:
                    await self._drop()  # not one another publish has opened meanwhile
                else:
                    self.nodes.failed(node)
            left = deadline - loop.time()
            if left <= 0:
                raise BrokerUnavailable(tried, errors, waited=self.publish_timeout)
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, _RETRY_MAX)

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._channel = self._node = None
        if connection is not None and not connection.is_closed:
            await connection.close()
        self._fail_waiting(HutchError("client closed"))
        if self._owns_store and self._store is not None:
            self._store.close()
            self._store = None

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- publishing -----------------------------------------------------------------------

    async def submit(self, task: TaskRef | Node, /, *args: Any, **kwargs: Any) -> str:
        """Publish a task and wait for the broker's confirm; returns the task id.

        ``task`` is a task (function or name) called with ``args`` and ``kwargs``, or a
        `service.step` with its own arguments and options (a countdown or ETA, another queue),
        or a flow (`service.chain`, `service.group`): then the id is the flow's, returned once
        the broker has its first step(s).
        """
        return await self._publish(_node(task, args, kwargs), reply_to=None)

    async def call(self, task: TaskRef | Node, /, *args: Any, **kwargs: Any) -> Any:
        """Run a task and return its result; raises `TaskError` if it failed. ``task`` as for
        `submit`; a delayed step's result comes once it has run (mind ``timeout``). A flow's
        result is its last step's (a list, if it ends with a group); if a step fails for good,
        `TaskError` names the step."""
        return await self._call(_node(task, args, kwargs))

    async def map(
        self,
        task: TaskRef,
        iterable: Iterable[Any],
        *,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Run ``task(item)`` for every item; results in input order, like ``Pool.map``.

        Up to ``window`` tasks are in flight at once. With ``return_exceptions=True`` a failed
        item's `TaskError` takes its place in the list instead of being raised.
        """
        return await self.starmap(
            task, ((item,) for item in iterable), return_exceptions=return_exceptions
        )

    async def starmap(
        self,
        task: TaskRef,
        iterable: Iterable[Iterable[Any]],
        *,
        return_exceptions: bool = False,
        on_result: Callable[[int, Any], None] | None = None,
    ) -> list[Any]:
        """Run ``task(*args)`` for every ``args`` in order, like ``Pool.starmap``.

        Same window and ``return_exceptions`` as `map`. ``on_result(index, value)``, if given,
        is called as each item finishes, in completion order, with its result or exception.
        """
        gate = asyncio.Semaphore(self.window)

        async def one(index: int, args: Iterable[Any]) -> Any:
            async with gate:
                try:
                    result = await self._call(_step(task, tuple(args), {}))
                except Exception as exc:
                    if on_result is not None:
                        on_result(index, exc)
                    raise
            if on_result is not None:
                on_result(index, result)
            return result

        return await asyncio.gather(
            *(one(index, args) for index, args in enumerate(iterable)),
            return_exceptions=return_exceptions,
        )

    async def _call(self, step: Node) -> Any:
        task_id = uuid.uuid4().hex
        try:
            await self._publish(step, reply_to=DIRECT_REPLY_TO, task_id=task_id)
            async with asyncio.timeout(self.timeout):
                return await self._waiting[task_id]
        finally:
            self._waiting.pop(task_id, None)

    async def _publish(
        self, step: Node, *, reply_to: str | None, task_id: str | None = None
    ) -> str:
        """Publish ``step`` (or a flow's entry steps) and wait for the confirm, through an
        outage (`_through_outage`): every attempt carries the same ``task_id``."""
        task_id = task_id or uuid.uuid4().hex
        now = time.time()
        attempts = 0

        async def attempt() -> None:
            nonlocal attempts
            attempts += 1
            channel = await self._ready_channel()
            for queue in _queues(step, self.queue):
                if queue not in self._declared:
                    await topology.declare_queue(channel, queue)
                    self._declared.add(queue)
            if reply_to is not None:
                # A result comes back on the channel that published: listen on this one, and
                # wait afresh (a lost connection failed the previous wait).
                await self._listen()
                old = self._waiting.get(task_id)
                if old is not None and old.done() and not old.cancelled():
                    old.exception()  # retrieved: it only said the old connection was lost
                self._waiting[task_id] = asyncio.get_running_loop().create_future()
            if isinstance(step, Step):
                # A re-publish counts its delay from now: the ETA stays where it was.
                await self._publish_step(
                    step, reply_to, task_id, now, sent=now if attempts == 1 else time.time()
                )
            else:
                await self._publish_flow(step, reply_to, task_id)

        await self._through_outage(attempt)
        return task_id

    async def _publish_step(
        self, step: Step, reply_to: str | None, task_id: str, now: float, *, sent: float
    ) -> None:
        channel = await self._ready_channel()
        queue = step.queue or self.queue
        headers: dict[str, Any] = {protocol.TASK_HEADER: step.task}
        exchange, routing_key = channel.default_exchange, queue
        eta = step.eta_ms(now)
        if eta is not None and eta > now * 1000:
            # Straight into the broker-held delay: no worker holds it, and none need run.
            headers[protocol.ETA_HEADER] = eta
            # From the same millisecond the ETA was rounded up from: a countdown of 2 s is
            # two seconds of delay, not three.
            delay_ms = max(0, eta - math.ceil(sent * 1000))
            name, routing_key = routing.delay_routing_key(queue, delay_ms / 1000)
            exchange = await self._exchange(name)
        elif eta is not None:
            headers[protocol.ETA_HEADER] = eta
        body = await self._fit(
            protocol.encode(
                self.content_type,
                {"args": embed_refs(list(step.args)), "kwargs": embed_refs(dict(step.kwargs))},
            )
        )
        message = aio_pika.Message(
            body,
            headers=headers,
            content_type=self.content_type,
            message_id=task_id,
            correlation_id=task_id if reply_to else None,
            reply_to=reply_to,
            timestamp=now,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await exchange.publish(message, routing_key, mandatory=True)

    async def _publish_flow(self, flow: Chain | Group, reply_to: str | None, flow_id: str) -> None:
        """Publish a flow's entry step(s), each confirmed (`service.continuation.entry`)."""
        channel = await self._ready_channel()
        now = time.time()
        publishes = [
            dataclasses.replace(publish, body=await self._fit(publish.body))
            for publish in entry(
                flow, flow_id=flow_id, queue=self.queue, content_type=self.content_type
            )
        ]

        async def one(publish: Publish) -> None:
            exchange = (
                await self._exchange(publish.exchange)
                if publish.exchange
                else channel.default_exchange
            )
            message = aio_pika.Message(
                publish.body,
                headers=publish.headers,
                content_type=publish.content_type,
                message_id=publish.message_id,
                # Every entry step carries the caller's address: the last step of the flow
                # replies to it, through the continuation.
                correlation_id=flow_id if reply_to else None,
                reply_to=reply_to,
                timestamp=now,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            )
            await exchange.publish(message, publish.routing_key, mandatory=True)

        await asyncio.gather(*(one(publish) for publish in publishes))

    async def _fit(self, body: bytes) -> bytes:
        """``body``, or a reference to it in the store when it is over the offload threshold;
        `MessageTooLarge` if it is over ``max_message_size`` and there is no store. Checked
        before publishing, so an oversize body never reaches the broker (which would close
        the channel, or worse) and the next publish goes out as usual."""
        if len(body) > self.offload_threshold and self.has_store:
            ref = await asyncio.to_thread(self.store().put_bytes, body, self.content_type)
            return protocol.encode(self.content_type, ref.to_wire())
        if len(body) > self.max_message_size:
            raise MessageTooLarge(len(body), self.max_message_size)
        return body

    # -- large data by reference ----------------------------------------------------------

    @property
    def has_store(self) -> bool:
        return self._store is not None or self._store_settings.url is not None

    def store(self) -> Store:
        """The blob store (opened on first use); `ConfigError` if none is configured."""
        if self._store is None:
            self._store = self._store_settings.open()
        return self._store

    async def put_file(
        self, path: str | os.PathLike[str], content_type: str = DEFAULT_CONTENT_TYPE
    ) -> Ref:
        """Store a local file, streamed (never read whole), and return its `Ref`: pass it as
        a task argument and the task gets a path, a stream or the ref, by its annotation."""
        return await asyncio.to_thread(self.store().put_file, path, content_type)

    async def put_bytes(self, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> Ref:
        """Store ``data`` and return its `Ref`."""
        return await asyncio.to_thread(self.store().put_bytes, data, content_type)

    def open(self, ref: Ref) -> io.BufferedReader:
        """A blob (say, a task's result by reference) as a stream, verified as it is read."""
        return self.store().open(ref)

    async def _exchange(self, name: str) -> AbstractExchange:
        exchange = self._exchanges.get(name)
        if exchange is None:
            channel = await self._ready_channel()
            exchange = self._exchanges[name] = await channel.get_exchange(name, ensure=False)
        return exchange

    async def consumer_count(self) -> int:
        """How many consumers (workers) the queue has right now."""
        await self.connect()
        assert self._connection is not None
        return (await topology.queue_counts(self._connection, self.queue)).consumers

    # -- results --------------------------------------------------------------------------

    async def _ready_channel(self) -> AbstractChannel:
        await self.connect()
        assert self._channel is not None
        return self._channel

    async def _listen(self) -> None:
        """Consume direct replies on the publishing channel (RabbitMQ requires the same one)."""
        if self._listening:
            return
        async with self._reply_lock:
            if not self._listening:
                channel = await self._ready_channel()
                underlay = await channel.get_underlay_channel()
                await underlay.basic_consume(DIRECT_REPLY_TO, self._on_reply, no_ack=True)
                self._listening = True

    async def _on_reply(self, message: aiormq.abc.DeliveredMessage) -> None:
        properties = message.header.properties
        future = self._waiting.get(properties.correlation_id or "")
        if future is None or future.done():
            return  # a late or duplicate result (tasks run at least once)
        content_type = properties.content_type or ""
        try:
            envelope = protocol.decode(
                content_type, message.body, max_depth=None, string_keys=False
            )
            if may_hold_refs(content_type, message.body) and is_marker(envelope):
                # The result came by reference: read it off the loop, then settle the future.
                reading = asyncio.get_running_loop().create_task(
                    self._read_reply(future, content_type, envelope)
                )
                self._replies.add(reading)
                reading.add_done_callback(self._replies.discard)
                return
            self._settle_reply(future, envelope, refs=may_hold_refs(content_type, message.body))
        except (ProtocolError, AttributeError, TypeError) as exc:
            future.set_exception(HutchError(f"unreadable result: {exc}"))

    async def _read_reply(
        self, future: asyncio.Future[Any], content_type: str, marker: Any
    ) -> None:
        try:
            ref = Ref.from_wire(marker)
            body = await asyncio.to_thread(self.store().get_bytes, ref)
            envelope = protocol.decode(content_type, body, max_depth=None, string_keys=False)
            if not future.done():
                self._settle_reply(future, envelope, refs=may_hold_refs(content_type, body))
        except (StoreError, HutchError, ProtocolError, AttributeError, TypeError) as exc:
            if not future.done():
                future.set_exception(HutchError(f"unreadable result by reference: {exc}"))

    @staticmethod
    def _settle_reply(future: asyncio.Future[Any], envelope: Any, *, refs: bool) -> None:
        """Settle a waiting call from a decoded result envelope; references in the result
        become `Ref` objects (open them with `open`, or ``ref.open()``)."""
        if envelope.get("ok"):
            result = envelope.get("result")
            future.set_result(_resolve_refs(result, lambda ref: ref) if refs else result)
        else:
            error = envelope.get("error") or {}
            future.set_exception(
                TaskError(str(error.get("type", "Error")), str(error.get("message", "")))
            )

    def _on_close(self, sender: Any, *_: Any) -> None:
        if sender is self._connection and self._node is not None:
            # Closed by the broker or the network, not by this client (`_drop` and `close`
            # forget the connection before closing it): a node that closes its connections
            # (one shutting down, say) is the wrong one to reconnect to at once. While it
            # stopped, publishes through it were nacked (seen in tests/test_cluster.py).
            self.nodes.failed(self._node)
        self._connection = self._channel = None
        self._listening = False
        self._fail_waiting(HutchError("connection to the broker was lost; the task may still run"))

    def _fail_waiting(self, exc: Exception) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(exc)


class Client:
    """The blocking face of `AsyncClient`; takes the same options and has the same methods."""

    def __init__(self, url: str | None = None, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="hutch-client", daemon=True
        )
        self._thread.start()
        self._async = AsyncClient(url, **options)
        try:
            self._run(self._async.connect())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coro

        future: ThreadFuture[T] = asyncio.run_coroutine_threadsafe(wrapped(), self._loop)
        return future.result()

    def submit(self, task: TaskRef | Node, /, *args: Any, **kwargs: Any) -> str:
        return self._run(self._async.submit(task, *args, **kwargs))

    def call(self, task: TaskRef | Node, /, *args: Any, **kwargs: Any) -> Any:
        return self._run(self._async.call(task, *args, **kwargs))

    def map(
        self, task: TaskRef, iterable: Iterable[Any], *, return_exceptions: bool = False
    ) -> list[Any]:
        return self._run(self._async.map(task, iterable, return_exceptions=return_exceptions))

    def starmap(
        self,
        task: TaskRef,
        iterable: Iterable[Iterable[Any]],
        *,
        return_exceptions: bool = False,
        on_result: Callable[[int, Any], None] | None = None,
    ) -> list[Any]:
        """``on_result`` runs on the client's event-loop thread."""
        return self._run(
            self._async.starmap(
                task, iterable, return_exceptions=return_exceptions, on_result=on_result
            )
        )

    def consumer_count(self) -> int:
        return self._run(self._async.consumer_count())

    def put_file(
        self, path: str | os.PathLike[str], content_type: str = DEFAULT_CONTENT_TYPE
    ) -> Ref:
        return self._run(self._async.put_file(path, content_type))

    def put_bytes(self, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> Ref:
        return self._run(self._async.put_bytes(data, content_type))

    def open(self, ref: Ref) -> io.BufferedReader:
        return self._async.open(ref)

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._run(self._async.close())
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _node(task: TaskRef | Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Node:
    if isinstance(task, Step | Chain | Group):
        if args or kwargs:
            raise TypeError(
                "a step or flow carries its own arguments: pass step(task, *args, kwargs=...)"
            )
        return task
    return step(task, *args, kwargs=kwargs)


def _step(task: TaskRef | Step, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Step:
    node = _node(task, args, kwargs)
    if not isinstance(node, Step):
        raise TypeError("map and starmap run one task per item: pass a task, not a flow")
    return node


def _queues(node: Node, default: str) -> set[str]:
    """Every queue a flow (or step) sends work to, so each is declared before it is used."""
    if isinstance(node, Step):
        return {node.queue or default}
    children = node.nodes if isinstance(node, Chain) else node.members
    queues = set().union(*(_queues(child, default) for child in children))
    if isinstance(node, Chain) and node.on_error is not None:
        queues |= _queues(node.on_error, default)
    return queues
