"""The records that travel through the pool: a `Job` in, an `Outcome` out.

Both are plain data, shared by the stages around the pool (admission builds jobs, settling reads
outcomes) and by the child (which produces outcomes), so this module imports nothing that talks
to the broker.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from service.continuation import FlowEvent, Publish
from service.protocol import Reason
from service.registry import TaskSpec
from service.store.errors import RefFailure

if TYPE_CHECKING:
    from service.delivery import Delivery


class OutcomeKind(StrEnum):
    """How a job ended; the first three are reported by the child, the rest by the pool."""

    OK = "ok"
    ERROR = "error"  # the task raised (or its result could not be sent)
    REJECTED = "rejected"  # bad input found in the child: `Outcome.reason` says which
    CRASHED = "crashed"  # the child died while running this job
    TIMEOUT = "timeout"  # the hard time limit passed and the child was killed
    RETURNED = "returned"  # never finished through no fault of its own (drain, lost channel)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one job.

    ``payload`` is the encoded result envelope, when the job succeeded and a result is owed.
    ``retryable`` is False for failures another attempt cannot fix (an unserializable result).
    ``reason`` is the dead-letter reason when the one who found the problem knows it (bad
    input, say); settling falls back to ``failed`` or ``timeout``. ``publishes`` are what
    follows a flow's step (`service.continuation`), published before the ack; ``flow`` says
    whether the flow ended with it. ``offloads`` counts the blobs the child put in the store
    for this job's output; ``ref_failure`` says why a blob reference could not be resolved.
    """

    kind: OutcomeKind
    payload: bytes | None = None
    error_type: str = ""
    error_message: str = ""
    retryable: bool = True
    reason: Reason | None = None
    publishes: tuple[Publish, ...] = ()
    flow: FlowEvent | None = None
    offloads: int = 0
    ref_failure: RefFailure | None = None


def timeout_outcome(limit: float) -> Outcome:
    """The outcome of a job killed at its hard time limit of ``limit`` seconds."""
    return Outcome(
        OutcomeKind.TIMEOUT,
        error_type="TimeLimitExceeded",
        error_message=f"hard time limit of {limit:g}s exceeded",
    )


@dataclass(slots=True, eq=False)
class Job:
    """One delivery on its way through the pool.

    The first fields come from the message and never change. ``delivery`` is the consumer's
    handle, used only to settle it; ``headers`` are the ones a task may learn about through
    `service.context` (`service.protocol.CHILD_HEADERS`). The pool fills in the rest: ``id``
    when a child is sent the job, ``started`` when the child starts it (loop time; 0 until
    then), ``run_seconds`` and ``cpu_seconds`` once it ends.
    """

    spec: TaskSpec
    content_type: str
    body: bytes
    message_id: str
    attempt: int
    deliveries: int
    redelivered: bool
    want_result: bool
    delivery: Delivery
    headers: dict[str, Any] = field(default_factory=dict)  # the ones the child needs
    # A flow's entry step carries its caller's address; the child puts it in the continuation.
    reply_to: str | None = None
    correlation_id: str | None = None
    lane: int = 0  # the priority of its queue: 0 for the first one given the worker
    id: int = 0
    started: float = 0.0
    run_seconds: float = 0.0
    cpu_seconds: float = 0.0


class RestartReason(StrEnum):
    """Why a pool child was replaced; also the ``reason`` label of hutch_child_restarts_total."""

    CRASH = "crash"
    TIMEOUT = "timeout"
    ABORT = "abort"  # its job was abandoned (the delivery's connection was lost)
    RECYCLE_TASKS = "recycle_tasks"
    RECYCLE_MEMORY = "recycle_memory"
