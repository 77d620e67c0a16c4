"""Where messages go: queue names and routing keys, with nothing that talks to the broker.

Shared by the stages that declare queues (`service.topology`) and by those that only address
them: a pool child builds the next step of a flow, with its delay, without importing an AMQP
client. The delay routing is described in `service.topology`.
"""

from __future__ import annotations

import math
from typing import Final

DELAY_LEVELS: Final = 28
MAX_DELAY: Final = 2**DELAY_LEVELS - 1
DELIVER_EXCHANGE: Final = "hutch.deliver"
DELAY_PREFIX: Final = "hutch.delay."
FORBIDDEN_IN_NAMES: Final = frozenset("*#")
# One per vhost: the fan-in records of every flow (`service.joins`).
JOINS_QUEUE: Final = "hutch.joins"


def dlq_name(queue: str) -> str:
    return f"{queue}.dlq"


def check_queue_name(queue: str) -> None:
    """Refuse names the delay routing cannot carry (it uses topic patterns)."""
    if not queue or any(ch in FORBIDDEN_IN_NAMES for ch in queue):
        raise ValueError(f"queue name {queue!r} must be non-empty and contain no '*' or '#'")
    if len(queue.encode()) > 255 - 2 * DELAY_LEVELS - 4:
        raise ValueError(f"queue name {queue!r} is too long (at most 195 bytes)")


def delay_exchange(level: int) -> str:
    return f"{DELAY_PREFIX}{level}"


def delay_routing_key(queue: str, seconds: float) -> tuple[str, str]:
    """Exchange and routing key that deliver to ``queue`` after ``seconds`` (rounded up to
    whole seconds; float noise below a millisecond does not cost a whole second)."""
    delay = min(max(1, math.ceil(round(seconds, 3))), MAX_DELAY)
    bits = format(delay, f"0{DELAY_LEVELS}b")
    return delay_exchange(DELAY_LEVELS - 1), ".".join(bits) + "." + queue
