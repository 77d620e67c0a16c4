"""Connections to RabbitMQ, and a publisher that waits for the broker's confirm.

hutch consumes and publishes on separate connections: a memory or disk alarm blocks publishing
connections, and acks on a blocked connection would stall too.

This is where the AMQP library's errors meet hutch: `CONNECTION_ERRORS` is the one list of
what "this connection or channel is gone" looks like, and the one plain `RuntimeError` the
library raises for it (a channel asked of a closed connection) is translated into
`BrokerConnectionError` by `open_channel`, so no other `RuntimeError` is ever taken for a lost
connection.

Every connection goes to one of the process's broker nodes (`service.nodes.Nodes`): `connect`
tries them in order from the current one, each for at most ``timeout`` seconds, and raises
`BrokerUnavailable` naming every URL it tried (passwords masked) when none answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from service.errors import BrokerConnectionError, BrokerUnavailable, PublishError
from service.nodes import Node, Nodes, safe_url, vhost_of

__all__ = [
    "CONNECTION_ERRORS",
    "HEARTBEAT",
    "Node",
    "Nodes",
    "Publisher",
    "connect",
    "connect_node",
    "open_channel",
    "safe_url",
    "vhost_of",
]

log = logging.getLogger(__name__)


# Heartbeats every 5 s detect a stalled link in about 18 s (aiormq gives up after
# 3 * (heartbeat + 1) s); the server's suggested 60 s would take three minutes.
HEARTBEAT = 5


# Errors that mean "this connection or channel is gone": reconnect and carry on.
CONNECTION_ERRORS = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,  # a RuntimeError: the channel has closed
    OSError,  # ConnectionError and BrokerConnectionError among them
    TimeoutError,
)


# Seconds one node may take to accept a connection and finish the AMQP handshake before the
# next is tried: long enough for a loaded broker, short enough that a black-holed node does
# not hold up a failover for long.
CONNECT_TIMEOUT = 10.0


def as_nodes(nodes: Nodes | str) -> Nodes:
    """``nodes``, or the nodes a URL (list) names."""
    return nodes if isinstance(nodes, Nodes) else Nodes(nodes)


async def connect_node(
    nodes: Nodes | str, *, name: str, timeout: float = CONNECT_TIMEOUT
) -> tuple[AbstractConnection, Node]:
    """One plain (non-robust) connection to the first node that answers, and that node.

    Nodes are tried once each, from the current one on; a node that fails is passed over
    (`Nodes.failed`) and the one that answers becomes current. Callers own reconnecting, so no
    state is replayed. Raises `BrokerUnavailable` when no node answered.
    """
    nodes = as_nodes(nodes)
    failures: list[tuple[Node, BaseException]] = []
    for node in nodes.order():
        try:
            async with asyncio.timeout(timeout):
                connection = await aio_pika.connect(
                    node.url,
                    client_properties={"connection_name": name},
                    heartbeat=HEARTBEAT,
                    timeout=timeout,
                )
        except CONNECTION_ERRORS as exc:
            failures.append((node, exc))
            nodes.failed(node)
            if len(nodes) > 1:
                log.debug("broker node %s did not answer: %r", node.safe, exc)
            continue
        nodes.use(node)
        return connection, node
    raise BrokerUnavailable([node.safe for node, _ in failures], [exc for _, exc in failures])


async def connect(
    nodes: Nodes | str, *, name: str, timeout: float = CONNECT_TIMEOUT
) -> AbstractConnection:
    """`connect_node` without the node."""
    connection, _ = await connect_node(nodes, name=name, timeout=timeout)
    return connection


async def open_channel(connection: AbstractConnection, **options: Any) -> AbstractChannel:
    """``connection.channel(**options)``, with the library's "connection closed"
    `RuntimeError` raised as `BrokerConnectionError`."""
    if connection.is_closed:
        raise BrokerConnectionError("the connection to the broker is closed")
    try:
        return await connection.channel(**options)
    except RuntimeError as exc:
        if connection.is_closed:
            raise BrokerConnectionError(f"the connection closed: {exc}") from exc
        raise


class Publisher:
    """Publishes persistent or transient messages with publisher confirms.

    Every publish waits for the broker's confirm, at most ``timeout`` seconds, and raises
    `PublishError` otherwise, so a caller acks its input only after its output is safe. The
    connection is opened on first use and again after it is lost.
    """

    def __init__(self, nodes: Nodes | str, *, name: str, timeout: float = 15.0) -> None:
        self._nodes = as_nodes(nodes)
        self._node: Node | None = None
        self._name = name
        self._timeout = timeout
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._lock = asyncio.Lock()

    async def channel(self) -> AbstractChannel:
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._lock:
            if self._channel is not None and not self._channel.is_closed:
                return self._channel
            # A channel that closed without `_drop` was lost: the broker or the network closed
            # it (a node shutting down, say), so the next connection goes to the next node.
            await self._drop(failed=self._channel is not None)
            connection, self._node = await connect_node(self._nodes, name=self._name)
            try:
                self._channel = await open_channel(
                    connection, publisher_confirms=True, on_return_raises=True
                )
            except BaseException:
                await connection.close()
                raise
            self._connection = connection
            return self._channel

    async def publish(
        self,
        message: aio_pika.Message,
        routing_key: str,
        *,
        exchange: str = "",
        mandatory: bool = True,
    ) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                channel = await self.channel()
                target = self._exchanges.get(exchange) if exchange else channel.default_exchange
                if target is None:  # the cache is cleared whenever the channel changes
                    target = await channel.get_exchange(exchange, ensure=False)
                    self._exchanges[exchange] = target
                await target.publish(message, routing_key, mandatory=mandatory)
        except TimeoutError as exc:
            await self._drop(failed=True)
            raise PublishError(f"no confirm within {self._timeout:g}s") from exc
        except aio_pika.exceptions.PublishError as exc:  # a subclass of DeliveryError
            raise PublishError(
                f"the message was returned as unroutable: {exc}", unroutable=True
            ) from exc
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishError(f"the broker refused the message: {exc}") from exc
        except CONNECTION_ERRORS as exc:
            await self._drop(failed=True)
            raise PublishError(f"connection lost while publishing: {exc!r}") from exc

    async def _drop(self, *, failed: bool = False) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if failed and self._node is not None:
            self._nodes.failed(self._node)  # the next connection tries the next node
        self._exchanges.clear()
        if connection is not None and not connection.is_closed:
            # A black-holed node never answers the close: do not wait on it.
            with contextlib.suppress(*CONNECTION_ERRORS):
                async with asyncio.timeout(1.0):
                    await connection.close()

    async def close(self) -> None:
        async with self._lock:
            await self._drop()
