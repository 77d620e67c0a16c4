"""hutch: CPU-heavy Python tasks from RabbitMQ, run on every core of every host.

Register tasks with `task`, run ``hutch worker --tasks MODULE``, and publish with `Client`.

``from service import task`` is what every task module and every pool child runs, so this module
imports only what a task needs: `Client` and `AsyncClient` (and with them the AMQP client) load
on first use, through the module ``__getattr__`` below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.context import TaskContext, current_task
from service.errors import (
    BrokerUnavailable,
    ConfigError,
    HutchError,
    SoftTimeLimitExceeded,
    TaskError,
)
from service.flow import Chain, Group, Step, chain, group, step
from service.registry import task
from service.schedules import every

if TYPE_CHECKING:
    from service.client import AsyncClient, Client

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "BrokerUnavailable",
    "Chain",
    "Client",
    "ConfigError",
    "Group",
    "HutchError",
    "SoftTimeLimitExceeded",
    "Step",
    "TaskContext",
    "TaskError",
    "__version__",
    "chain",
    "current_task",
    "every",
    "group",
    "step",
    "task",
]

_LAZY = frozenset({"AsyncClient", "Client"})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from service import client

        return getattr(client, name)
    raise AttributeError(f"module 'service' has no attribute {name!r}")
