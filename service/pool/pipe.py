"""The byte protocol between the parent and one pool child.

Each frame is a 4-byte big-endian length and a msgpack array. Only bytes and builtins cross the
pipe, so nothing a task returns or raises can break the parent's decoding (the stdlib
`ProcessPoolExecutor` breaks the whole pool when one result fails to unpickle). Parent and child
always come from the same installation, so the arrays are positional and unversioned.

What the child needs to know about a task beyond its name (time limits, options) it reads from
its own registry, which the same task modules filled: a job frame carries only what the message
says.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from service.continuation import FlowEvent, Publish
from service.pool.jobs import Job, Outcome, OutcomeKind
from service.protocol import Reason
from service.store.errors import RefFailure

HEADER: Final = struct.Struct("!I")
READY: Final = b"ready"
# Instead of READY when the task modules do not import: this prefix, then the error as text.
FAILED: Final = b"failed: "


def frame(data: bytes) -> bytes:
    return HEADER.pack(len(data)) + data


@dataclass(frozen=True, slots=True)
class JobFrame:
    """A job as the child receives it."""

    job_id: int
    task: str
    content_type: str
    body: bytes
    message_id: str
    attempt: int
    deliveries: int
    redelivered: bool
    want_result: bool
    headers: dict[str, Any]
    reply_to: str | None = None
    correlation_id: str | None = None

    @classmethod
    def from_job(cls, job: Job) -> JobFrame:
        return cls(
            job_id=job.id,
            task=job.spec.name,
            content_type=job.content_type,
            body=job.body,
            message_id=job.message_id,
            attempt=job.attempt,
            deliveries=job.deliveries,
            redelivered=job.redelivered,
            want_result=job.want_result,
            headers=job.headers,
            reply_to=job.reply_to,
            correlation_id=job.correlation_id,
        )

    def pack(self) -> bytes:
        return frame(
            msgpack.packb(
                (
                    self.job_id,
                    self.task,
                    self.content_type,
                    self.body,
                    self.message_id,
                    self.attempt,
                    self.deliveries,
                    self.redelivered,
                    self.want_result,
                    self.headers,
                    self.reply_to,
                    self.correlation_id,
                )
            )
        )

    @classmethod
    def unpack(cls, data: bytes) -> JobFrame:
        return cls(*msgpack.unpackb(data))


@dataclass(frozen=True, slots=True)
class ResultFrame:
    """A job's outcome as the child reports it, with the child's running totals."""

    job_id: int
    outcome: Outcome
    cpu_seconds: float = 0.0  # the child's total CPU time so far
    rss_bytes: int = 0  # the child's resident memory after the job
    run_seconds: float = 0.0  # wall time of the job in the child, from reading it to its result

    def pack(self) -> bytes:
        o = self.outcome
        return frame(
            msgpack.packb(
                (
                    self.job_id,
                    o.kind.value,
                    o.payload,
                    o.error_type,
                    o.error_message,
                    o.retryable,
                    o.reason.value if o.reason is not None else None,
                    self.cpu_seconds,
                    self.rss_bytes,
                    self.run_seconds,
                    [publish.to_tuple() for publish in o.publishes],
                    o.flow.value if o.flow is not None else None,
                    o.offloads,
                    o.ref_failure.value if o.ref_failure is not None else None,
                )
            )
        )

    @classmethod
    def unpack(cls, data: bytes) -> ResultFrame:
        fields: list[Any] = msgpack.unpackb(data)
        (
            job_id,
            kind,
            payload,
            error_type,
            error_message,
            retryable,
            reason,
            cpu,
            rss,
            run,
            publishes,
            flow,
            offloads,
            ref_failure,
        ) = fields
        outcome = Outcome(
            OutcomeKind(kind),
            payload,
            error_type,
            error_message,
            retryable,
            Reason(reason) if reason is not None else None,
            tuple(Publish.from_tuple(p) for p in publishes),
            FlowEvent(flow) if flow is not None else None,
            offloads,
            RefFailure(ref_failure) if ref_failure is not None else None,
        )
        return cls(job_id, outcome, cpu, rss, run)
