"""One message as the worker's consumer received it: the AMQP frames, read as they are needed.

The worker consumes through aiormq directly rather than through aio-pika's ``IncomingMessage``,
which converts all fourteen basic properties (a datetime for the timestamp, an enum for the
delivery mode) and wraps each delivery in a second task: on a no-op task that was a tenth of the
parent's time per message (bench/README.md). A `Delivery` keeps the decoded frames and reads a
property when asked; it has the attributes of ``IncomingMessage`` that hutch uses, so what takes
a delivered message (`service.republish`, `service.settle`) takes either.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import aiormq.abc
from aiormq.exceptions import ChannelInvalidStateError
from pamqp.commands import Basic


class Delivery:
    """A delivery to a consumer on ``channel``; settled through that channel, by tag."""

    __slots__ = (
        "_channel",
        "_properties",
        "body",
        "consumer_tag",
        "delivery_tag",
        "headers",
        "redelivered",
    )

    def __init__(self, message: aiormq.abc.DeliveredMessage) -> None:
        deliver = message.delivery
        assert isinstance(deliver, Basic.Deliver)
        self._channel = message.channel
        self._properties = message.header.properties
        self.body: bytes = message.body
        self.delivery_tag: int = deliver.delivery_tag or 0
        self.consumer_tag: str = deliver.consumer_tag or ""
        self.redelivered: bool = bool(deliver.redelivered)
        self.headers: dict[str, Any] = self._properties.headers or {}

    @property
    def channel(self) -> aiormq.abc.AbstractChannel:
        """The delivering channel; raises `ChannelInvalidStateError` once it has closed (as
        ``IncomingMessage.channel`` does), since nothing may be settled on another."""
        if self._channel.is_closed:
            raise ChannelInvalidStateError(f"{self._channel!r} closed")
        return self._channel

    @property
    def content_type(self) -> str | None:
        return self._properties.content_type

    @property
    def content_encoding(self) -> str | None:
        return self._properties.content_encoding

    @property
    def message_id(self) -> str | None:
        return self._properties.message_id

    @property
    def correlation_id(self) -> str | None:
        return self._properties.correlation_id

    @property
    def reply_to(self) -> str | None:
        return self._properties.reply_to

    @property
    def timestamp(self) -> dt.datetime | None:
        return self._properties.timestamp

    @property
    def priority(self) -> int | None:
        return self._properties.priority

    @property
    def type(self) -> str | None:
        return self._properties.message_type

    @property
    def app_id(self) -> str | None:
        return self._properties.app_id

    async def ack(self) -> None:
        await self.channel.basic_ack(self.delivery_tag)

    async def nack(self, *, requeue: bool) -> None:
        await self.channel.basic_nack(self.delivery_tag, requeue=requeue)

    async def reject(self, *, requeue: bool) -> None:
        await self.channel.basic_reject(self.delivery_tag, requeue=requeue)
