"""Connections to RabbitMQ, and a publisher that waits for the broker's confirm.

hutch consumes and publishes on separate connections: a memory or disk alarm blocks publishing
connections, and acks on a blocked connection would stall too.

This is where the AMQP library's errors meet hutch: `CONNECTION_ERRORS` is the one list of
what "this connection or channel is gone" looks like, and the one plain `RuntimeError` the
library raises for it (a channel asked of a closed connection) is translated into
`BrokerConnectionError` by `open_channel`, so no other `RuntimeError` is ever taken for a lost
connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from service.errors import BrokerConnectionError, PublishError

log = logging.getLogger(__name__)


# Heartbeats every 5 s detect a stalled link in about 18 s (aiormq gives up after
# 3 * (heartbeat + 1) s); the server's suggested 60 s would take three minutes.
HEARTBEAT = 5


def vhost_of(url: str) -> str:
    """The virtual host an AMQP URL names: its path without the leading slash, or ``/``."""
    path = urlsplit(url).path
    return unquote(path[1:]) if len(path) > 1 else "/"


def safe_url(url: str) -> str:
    """The URL with any password masked, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=netloc[0].split(":")[0] + ":******@" + netloc[1]))


async def connect(url: str, *, name: str) -> AbstractConnection:
    """One plain (non-robust) connection; callers own reconnecting, so no state is replayed."""
    return await aio_pika.connect(
        url, client_properties={"connection_name": name}, heartbeat=HEARTBEAT
    )


# Errors that mean "this connection or channel is gone": reconnect and carry on.
CONNECTION_ERRORS = (
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,  # a RuntimeError: the channel has closed
    OSError,  # ConnectionError and BrokerConnectionError among them
    TimeoutError,
)


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

    def __init__(self, url: str, *, name: str, timeout: float = 15.0) -> None:
        self._url = url
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
            await self._drop()
            connection = await connect(self._url, name=self._name)
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
            await self._drop()
            raise PublishError(f"no confirm within {self._timeout:g}s") from exc
        except aio_pika.exceptions.PublishError as exc:  # a subclass of DeliveryError
            raise PublishError(
                f"the message was returned as unroutable: {exc}", unroutable=True
            ) from exc
        except aio_pika.exceptions.DeliveryError as exc:
            raise PublishError(f"the broker refused the message: {exc}") from exc
        except CONNECTION_ERRORS as exc:
            await self._drop()
            raise PublishError(f"connection lost while publishing: {exc!r}") from exc

    async def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._exchanges.clear()
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await connection.close()

    async def close(self) -> None:
        async with self._lock:
            await self._drop()
