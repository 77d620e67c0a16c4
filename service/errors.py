"""Exceptions users of hutch see."""

from __future__ import annotations


class HutchError(Exception):
    """Base class of hutch's own errors."""


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


class QueueNotFound(HutchError):
    """A queue an operator named does not exist in the broker's virtual host."""

    def __init__(self, queue: str) -> None:
        super().__init__(f"no queue named {queue!r}")
        self.queue = queue
