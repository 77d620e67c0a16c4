"""hutch: CPU-heavy Python tasks from RabbitMQ, run on every core of every host.

Register tasks with `task`, run ``hutch worker --tasks MODULE``, and publish with `Client`.
"""

from service.client import AsyncClient, Client
from service.context import TaskContext, current_task
from service.errors import ConfigError, HutchError, SoftTimeLimitExceeded, TaskError
from service.registry import task

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "ConfigError",
    "HutchError",
    "SoftTimeLimitExceeded",
    "TaskContext",
    "TaskError",
    "__version__",
    "current_task",
    "task",
]
