"""The bookkeeping of the fan-in of flows: which member records are held, and what to do next.

`service.joins` feeds every record delivered from ``hutch.joins`` to a `FanIn` and carries out
the effects it returns, in order: publish a follow-up task, keep a record (republish a copy),
ack, or dead-letter. Nothing here talks to the broker, so the rules can be tested with a crash
at any point (tests/test_fanin.py): the effects of one call are ordered so that a record is
acked only after what replaces it is published, and a crash part-way through loses nothing,
since the broker gives every unacked record to the next holder, which starts from an empty book.

Rules, for one fan-in (a group of n members, key ``{flow}:{group path}``):

- each member's latest record is kept, by index; a repeat replaces the earlier (acked), except
  that a success is never replaced by a failure (the member did succeed once);
- all n present and all succeeded: publish ``hutch.flow.join`` (the n bodies in member order),
  then ack the n records; the fan-in's key is remembered so late repeats are acked on sight;
- a failed record, the first of its flow: publish ``hutch.flow.abort``, keep a copy marked
  *handled*, ack the original. A flow with a failed record held does not fire any of its
  fan-ins (a replay of the failed member that succeeds replaces it, and the flow resumes);
- older than ``max_age``: an open fan-in of a flow that has not failed ends the flow
  (``hutch.flow.abort`` with a ``JoinTimeout`` error); either way its records are acked;
- held longer than ``compact_after``: republished and the original acked (consumer_timeout).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from service import continuation, protocol
from service.flow import MAX_GROUP_WIDTH
from service.protocol import Reason

T = TypeVar("T")  # the broker's handle of a record (a `service.delivery.Delivery`)

DONE_REMEMBERED: Final = 100_000  # completed fan-ins remembered, to ack their late repeats


@dataclass(frozen=True, slots=True)
class Record:
    """What a record's headers say (`protocol.JOIN_HEADER` and the rest)."""

    key: str
    flow: str
    index: int
    size: int
    ok: bool
    queue: str
    at_ms: int
    handled: bool
    content_type: str


def read_record(
    headers: Mapping[str, Any], content_type: str | None, *, now_ms: int | None = None
) -> Record | str:
    """The record these headers describe, or what is wrong with them."""
    h = headers
    key, flow = h.get(protocol.JOIN_HEADER), h.get(protocol.FLOW_HEADER)
    index = protocol.int_header(h, protocol.JOIN_INDEX_HEADER)
    size = protocol.int_header(h, protocol.JOIN_SIZE_HEADER)
    ok, queue = h.get(protocol.JOIN_OK_HEADER), h.get(protocol.JOIN_QUEUE_HEADER)
    media = protocol.media_type(content_type)
    if not (isinstance(key, str) and key and isinstance(flow, str) and flow):
        return f"{protocol.JOIN_HEADER} and {protocol.FLOW_HEADER} must be strings"
    if size is None or not 1 <= size <= MAX_GROUP_WIDTH:
        return f"{protocol.JOIN_SIZE_HEADER} must be 1 to {MAX_GROUP_WIDTH}"
    if index is None or not 0 <= index < size:
        return f"{protocol.JOIN_INDEX_HEADER} must be 0 to {protocol.JOIN_SIZE_HEADER} - 1"
    if not isinstance(ok, bool) or not (isinstance(queue, str) and queue):
        return (
            f"{protocol.JOIN_OK_HEADER} must be a boolean and {protocol.JOIN_QUEUE_HEADER} a queue"
        )
    if media is None:
        return f"content type {content_type!r} is not one hutch reads"
    at = protocol.int_header(h, protocol.JOIN_AT_HEADER)
    if at is None:
        at = int(time.time() * 1000) if now_ms is None else now_ms
    handled = bool(h.get(protocol.JOIN_HANDLED_HEADER))
    return Record(key, flow, index, size, ok, queue, at, handled, media)


# -- effects: what the broker side carries out, in order ------------------------------------


@dataclass(frozen=True, slots=True)
class FollowUp:
    """Publish one of hutch's own flow tasks to a work queue (confirmed)."""

    queue: str
    task: str
    body: bytes
    message_id: str
    flow: str
    step: str
    content_type: str


@dataclass(frozen=True, slots=True)
class Done:
    """The fan-in's follow-up is confirmed: call `FanIn.done` so its late repeats are acked.
    (Remembered only once confirmed: a holder that dies first must fire it again.)"""

    key: str


@dataclass(frozen=True, slots=True)
class Keep(Generic[T]):
    """Republish a copy of a record to ``hutch.joins`` (confirmed), ``handled`` marking a
    failed one whose flow was ended; it comes back to be held in the original's place."""

    token: T
    handled: bool


@dataclass(frozen=True, slots=True)
class Ack(Generic[T]):
    token: T


@dataclass(frozen=True, slots=True)
class Refuse(Generic[T]):
    """Dead-letter a record that cannot be read (``bad_flow``), then ack it."""

    token: T
    detail: str


Effect = FollowUp | Done | Keep[T] | Ack[T] | Refuse[T]


@dataclass(slots=True)
class _Held(Generic[T]):
    token: T
    body: bytes
    ok: bool
    since: float  # when it was received (monotonic seconds): when to compact it


@dataclass(slots=True)
class _Join(Generic[T]):
    """One open fan-in: the latest record of each member seen so far."""

    key: str
    flow: str
    size: int
    queue: str
    content_type: str
    opened_ms: int  # the earliest record's write time (Unix ms): the fan-in's age
    members: dict[int, _Held[T]] = field(default_factory=dict)

    def complete(self) -> bool:
        return len(self.members) == self.size and all(h.ok for h in self.members.values())


class FanIn(Generic[T]):
    """The records one holder keeps, and the rules above. ``max_age`` and ``compact_after``
    are in seconds (see `service.joins.Joins` for their defaults)."""

    def __init__(self, *, max_age: float, compact_after: float) -> None:
        self.max_age = max_age
        self.compact_after = compact_after
        self._joins: dict[str, _Join[T]] = {}
        self._failed: dict[str, set[tuple[str, int]]] = {}  # flow -> its failed members held
        self._handled: set[str] = set()  # flows whose failure was handed on
        # Completed fan-ins, kept across `lost` (the same process holds again soon, likely).
        self._done: OrderedDict[str, None] = OrderedDict()

    @property
    def open(self) -> int:
        return len(self._joins)

    @property
    def held(self) -> int:
        return sum(len(join.members) for join in self._joins.values())

    def oldest_seconds(self, now_ms: int) -> float:
        """Age of the oldest fan-in still waiting for members. A failed flow's fan-ins are
        left out: the flow has ended, they are only kept (until `max_age`) for a replay, and
        counting them would make every failure look like a stuck flow (HutchFlowJoinStuck)."""
        return (
            max(
                (now_ms - j.opened_ms for j in self._joins.values() if j.flow not in self._handled),
                default=0,
            )
            / 1000
        )

    def done(self, key: str) -> None:
        """Remember a completed fan-in (see `Done`); the oldest are forgotten first."""
        self._done[key] = None
        while len(self._done) > DONE_REMEMBERED:
            self._done.popitem(last=False)

    def lost(self) -> None:
        """The connection went: the broker has requeued every record held; start empty."""
        self._joins.clear()
        self._failed.clear()
        self._handled.clear()

    # -- a record arrives -------------------------------------------------------------------

    def take(self, token: T, record: Record | str, body: bytes, now: float) -> list[Effect[T]]:
        """Effects of one delivered record (``record``: `read_record`'s answer)."""
        if isinstance(record, str):
            return [Refuse(token, record)]
        if record.key in self._done:
            return [Ack(token)]  # a member repeated after its fan-in completed
        join = self._joins.get(record.key)
        if join is None:
            join = self._joins[record.key] = _Join(
                record.key,
                record.flow,
                record.size,
                record.queue,
                record.content_type,
                record.at_ms,
            )
        elif join.size != record.size or join.content_type != record.content_type:
            return [
                Refuse(token, f"fan-in {record.key} has {join.size} members of {join.content_type}")
            ]
        join.opened_ms = min(join.opened_ms, record.at_ms)
        old = join.members.get(record.index)
        if old is not None and old.ok and not record.ok:
            # The member succeeded once: that stands (a later run of it failing, or the
            # marked copy of a failure a replay has since made good, changes nothing).
            return [Ack(token)]
        effects: list[Effect[T]] = []
        join.members[record.index] = _Held(token, body, record.ok, now)
        if old is not None:
            effects.append(Ack(old.token))  # the later record of a member replaces the earlier
        if not record.ok:
            return effects + self._failed_member(join, record, token, body)
        self._forget_failure(record.flow, record.key, record.index)
        if record.flow not in self._failed:
            for ready in [j for j in self._joins.values() if j.flow == record.flow]:
                if ready.complete():
                    effects += self._complete(ready)
        return effects

    def _failed_member(
        self, join: _Join[T], record: Record, token: T, body: bytes
    ) -> list[Effect[T]]:
        self._failed.setdefault(record.flow, set()).add((record.key, record.index))
        if record.flow in self._handled:
            return []
        self._handled.add(record.flow)
        if record.handled:
            return []
        # The marked copy comes back to take this record's place.
        del join.members[record.index]
        return [
            _follow_up(join, continuation.ABORT_TASK, [body], f"{record.flow}:abort", "abort"),
            Keep(token, handled=True),
            Ack(token),
        ]

    def _complete(self, join: _Join[T]) -> list[Effect[T]]:
        bodies = [join.members[i].body for i in range(join.size)]
        follow_up = _follow_up(join, continuation.JOIN_TASK, bodies, f"{join.key}:join", "join")
        return [follow_up, Done(join.key), *self._drop(join)]

    def _drop(self, join: _Join[T]) -> list[Effect[T]]:
        """Ack every record of a fan-in that is done with (completed, or expired)."""
        effects: list[Effect[T]] = []
        for index, held in join.members.items():
            effects.append(Ack(held.token))
            if not held.ok:
                self._forget_failure(join.flow, join.key, index)
        del self._joins[join.key]
        return effects

    def _forget_failure(self, flow: str, key: str, index: int) -> None:
        """A failed member's record is gone: replaced by a later one (a replay that
        succeeded), or dropped with its fan-in."""
        failed = self._failed.get(flow)
        if failed is None:
            return
        failed.discard((key, index))
        if not failed:
            # Nothing failed is held any more: a new failure of this flow ends it again.
            del self._failed[flow]
            self._handled.discard(flow)

    # -- as time passes ---------------------------------------------------------------------

    def housekeep(self, now_ms: int, now: float) -> list[Effect[T]]:
        """Expire fan-ins past `max_age`, and compact records held past `compact_after`."""
        effects: list[Effect[T]] = []
        for join in [j for j in self._joins.values() if now_ms - j.opened_ms > self.max_age * 1000]:
            effects += self._expire(join, now_ms)
        cutoff = now - self.compact_after
        for join in list(self._joins.values()):
            for index, held in list(join.members.items()):
                if held.since < cutoff:
                    # The copy comes back to be held in its place, its delivery count and the
                    # broker's consumer_timeout clock at zero.
                    del join.members[index]
                    effects += [Keep(held.token, handled=False), Ack(held.token)]
            if not join.members:
                del self._joins[join.key]
        return effects

    def _expire(self, join: _Join[T], now_ms: int) -> list[Effect[T]]:
        effects: list[Effect[T]] = []
        if join.flow not in self._handled and join.members:
            missing = sorted(set(range(join.size)) - set(join.members))
            error = {
                "type": "JoinTimeout",
                "message": (
                    f"fan-in {join.key} was still waiting for member(s) {missing} after "
                    f"{(now_ms - join.opened_ms) / 1000:.0f}s (max age {self.max_age:g}s)"
                ),
                "reason": str(Reason.TIMEOUT),
            }
            any_member = next(iter(join.members.values())).body
            effects.append(
                _follow_up(
                    join,
                    continuation.ABORT_TASK,
                    [any_member],
                    f"{join.flow}:abort",
                    "abort",
                    error,
                )
            )
        return [*effects, Done(join.key), *self._drop(join)]


def _follow_up(
    join: _Join[Any], task: str, bodies: list[bytes], message_id: str, step: str, *extra: Any
) -> FollowUp:
    group = join.key.rpartition(":")[2]
    return FollowUp(
        join.queue,
        task,
        protocol.request_of_bodies(join.content_type, bodies, *extra),
        message_id,
        join.flow,
        f"{group}:{step}",
        join.content_type,
    )
