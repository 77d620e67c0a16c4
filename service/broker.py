"""Connections to RabbitMQ, and a publisher that waits for the broker's confirm.

hutch consumes and publishes on separate connections: a memory or disk alarm blocks publishing
connections, and acks on a blocked connection would stall too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

log = logging.getLogger(__name__)

# Heartbeats every 5 s detect a stalled link in about 18 s (aiormq gives up after
# 3 * (heartbeat + 1) s); the server's suggested 60 s would take three minutes.
HEARTBEAT = 5


class PublishError(Exception):
    """The broker did not confirm a publish (nack, return, timeout or lost connection)."""

    def __init__(self, message: str, *, unroutable: bool = False) -> None:
        super().__init__(message)
        self.unroutable = unroutable


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
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,  # aiormq raises it for writes on a closed transport
)


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
                self._channel = await connection.channel(
                    publisher_confirms=True, on_return_raises=True
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
