"""Copies of a delivered message, for re-publishing it (retry, dead letter, replay).

A copy keeps the body and the publisher's properties and headers, minus what the broker owns:
a re-published copy carrying an old ``x-death`` can be silently dropped by 3.10's dead-letter
cycle detection, and ``user_id`` is refused when it differs from the publishing connection's.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Final, Protocol

import aio_pika

BROKER_HEADERS: Final = frozenset({"x-death", "x-delivery-count", "x-acquired-count"})
BROKER_HEADER_PREFIXES: Final = ("x-first-death-", "x-last-death-")


class Received(Protocol):
    """What a copy is made from: a worker's `service.delivery.Delivery`, or an aio-pika
    ``IncomingMessage`` (the operator tools read queues through aio-pika)."""

    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> Any: ...
    @property
    def content_type(self) -> str | None: ...
    @property
    def content_encoding(self) -> str | None: ...
    @property
    def priority(self) -> int | None: ...
    @property
    def correlation_id(self) -> str | None: ...
    @property
    def reply_to(self) -> str | None: ...
    @property
    def message_id(self) -> str | None: ...
    @property
    def timestamp(self) -> dt.datetime | None: ...
    @property
    def type(self) -> str | None: ...
    @property
    def app_id(self) -> str | None: ...


def is_broker_header(name: str) -> bool:
    return name in BROKER_HEADERS or name.startswith(BROKER_HEADER_PREFIXES)


def publisher_headers(message: Received) -> dict[str, Any]:
    """The message's headers without the broker's own."""
    return {k: v for k, v in (message.headers or {}).items() if not is_broker_header(k)}


def copy_message(
    message: Received, headers: dict[str, Any], *, message_id: str | None = None
) -> aio_pika.Message:
    """A persistent copy of ``message`` with ``headers``, ready to publish."""
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message_id or message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )
