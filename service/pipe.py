"""The byte protocol between the parent and one pool child.

Each frame is a 4-byte big-endian length and a msgpack array. Only bytes and builtins cross the
pipe, so nothing a task returns or raises can break the parent's decoding (the stdlib
`ProcessPoolExecutor` breaks the whole pool when one result fails to unpickle).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final

import msgpack

HEADER: Final = struct.Struct("!I")
READY: Final = b"ready"


class Kind(IntEnum):
    """How a child says a job ended."""

    OK = 0  # payload: the encoded result envelope (or None when nobody wants it)
    ERROR = 1  # the task raised, or its result could not be sent
    REJECTED = 2  # bad input found while decoding: error_type holds the `Reason`


@dataclass(frozen=True, slots=True)
class JobFrame:
    job_id: int
    task: str
    content_type: str
    body: bytes
    message_id: str
    attempt: int
    deliveries: int
    redelivered: bool
    soft_time_limit: float | None
    want_result: bool

    def pack(self) -> bytes:
        data: bytes = msgpack.packb(
            (
                self.job_id,
                self.task,
                self.content_type,
                self.body,
                self.message_id,
                self.attempt,
                self.deliveries,
                self.redelivered,
                self.soft_time_limit,
                self.want_result,
            )
        )
        return HEADER.pack(len(data)) + data

    @classmethod
    def unpack(cls, data: bytes) -> JobFrame:
        return cls(*msgpack.unpackb(data))


@dataclass(frozen=True, slots=True)
class ResultFrame:
    job_id: int
    kind: Kind
    payload: bytes | None = None
    error_type: str = ""
    error_message: str = ""
    retryable: bool = True
    cpu_seconds: float = 0.0  # the child's total CPU time so far
    rss_bytes: int = 0  # the child's resident memory after the job

    def pack(self) -> bytes:
        data: bytes = msgpack.packb(
            (
                self.job_id,
                int(self.kind),
                self.payload,
                self.error_type,
                self.error_message,
                self.retryable,
                self.cpu_seconds,
                self.rss_bytes,
            )
        )
        return HEADER.pack(len(data)) + data

    @classmethod
    def unpack(cls, data: bytes) -> ResultFrame:
        fields: list[Any] = msgpack.unpackb(data)
        fields[1] = Kind(fields[1])
        return cls(*fields)


def frame(data: bytes) -> bytes:
    return HEADER.pack(len(data)) + data
