"""Every exception hutch raises on purpose, under one root: `HutchError`.

Library errors (aiormq, aio-pika, OS errors) are translated where hutch meets them, so callers
catch ``HutchError`` (or one of its families below) and never a third-party class. This module
imports nothing heavy: pool children and task modules load it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.protocol import Reason


class HutchError(Exception):
    """Base class of hutch's own errors."""


# -- raised to task code and callers ------------------------------------------------------------


class TaskError(HutchError):
    """A task failed remotely; carries the remote exception's type name and message."""

    def __init__(self, type: str, message: str) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message


class SoftTimeLimitExceeded(HutchError):
    """Raised inside a task when its soft time limit passes, so it can clean up."""


class ConfigError(HutchError):
    """A setting is invalid; the message says which and why."""


# -- the wire -----------------------------------------------------------------------------------


class ProtocolError(HutchError):
    """A message that breaks the protocol; it is dead-lettered with `reason`, never run."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class EncodeError(HutchError):
    """A value that has no representation in the chosen content type."""


class MessageTooLarge(HutchError):
    """A message body over the broker's limit (``HUTCH_MAX_MESSAGE_SIZE``), refused by the
    client before anything was published: the connection stays usable. ``size`` and ``limit``
    are in bytes."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the message body is {size} bytes, over HUTCH_MAX_MESSAGE_SIZE ({limit} bytes), "
            "and no blob store is configured to carry it: set HUTCH_STORE_URL (file:///shared "
            "or s3://bucket/prefix) so large arguments go by reference, or pass the data by "
            "reference yourself (Client.put_file)"
        )
        self.size = size
        self.limit = limit


# -- the broker ---------------------------------------------------------------------------------


class BrokerConnectionError(HutchError, ConnectionError):
    """The connection or channel to the broker is gone (translated from the AMQP library)."""


class BrokerUnavailable(BrokerConnectionError):
    """No broker node could be reached (or none confirmed a publish in the time allowed).

    ``tried`` holds the URLs tried, passwords masked, in the order tried; ``errors`` what each
    attempt ended with (the last one per URL).
    """

    def __init__(
        self,
        tried: list[str],
        errors: list[BaseException] | None = None,
        *,
        waited: float | None = None,
    ) -> None:
        self.tried = list(dict.fromkeys(tried))
        self.errors = list(errors or [])
        last: dict[str, BaseException] = {}
        for url, error in zip(tried, self.errors, strict=False):
            last[url] = error
        self.last = last
        reasons = "; ".join(f"{url}: {_reason(last[url]) if url in last else 'no answer'}"
                            for url in self.tried)  # fmt: skip
        within = f" within {waited:g}s" if waited is not None else ""
        super().__init__(
            f"no broker node answered{within} (tried {reasons}); check that RabbitMQ runs there "
            "and HUTCH_BROKER_URL (or HUTCH_BROKER_URL_FILE)"
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return repr(exc)


class PublishError(HutchError):
    """The broker did not confirm a publish (nack, return, timeout or lost connection)."""

    def __init__(self, message: str, *, unroutable: bool = False) -> None:
        super().__init__(message)
        self.unroutable = unroutable


class QueueNotFound(HutchError):
    """A queue an operator named does not exist in the broker's virtual host."""

    def __init__(self, queue: str) -> None:
        super().__init__(f"no queue named {queue!r}")
        self.queue = queue


# -- the pool -----------------------------------------------------------------------------------


class PoolStartError(HutchError):
    """A child could not start (usually: a task module failed to import in it)."""


# -- operator tools -----------------------------------------------------------------------------


class BrowseError(HutchError):
    """Reading a dead-letter queue stopped part-way (the channel or connection closed)."""


class ManagementUnavailable(HutchError):
    """The management API could not answer; the message says why and what to do."""


class ManagementRequired(HutchError):
    """Listing queues needs the management API, and it did not answer."""


class UsageError(HutchError):
    """A command cannot run as asked; the message says what to do instead (exit 2)."""
