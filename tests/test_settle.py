"""`settle.decide`: one case per row of the delivery-semantics table (DESIGN.md §2), and the
settler's narrow catch of connection errors (pure logic, fake acks)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from service.acks import AckRouter
from service.broker import CONNECTION_ERRORS
from service.observer import Observer
from service.pool.jobs import Job, Outcome, OutcomeKind
from service.protocol import Reason
from service.registry import TaskSpec
from service.settle import Action, Decision, Settler, TaskOutcome, decide

SPEC = TaskSpec("t", lambda: None, max_attempts=3)


def job(attempt: int = 1) -> Job:
    return Job(
        spec=SPEC,
        content_type="application/msgpack",
        body=b"",
        message_id="m",
        attempt=attempt,
        deliveries=0,
        redelivered=False,
        want_result=False,
        delivery=None,  # type: ignore[arg-type]
    )


ERROR = Outcome(OutcomeKind.ERROR, error_type="ValueError", error_message="x")
TIMEOUT = Outcome(OutcomeKind.TIMEOUT, error_type="TimeLimitExceeded", error_message="y")
SOFT = Outcome(OutcomeKind.ERROR, error_type="SoftTimeLimitExceeded", error_message="z")

# (DESIGN.md §2 event, job, outcome, expected decision)
TABLE = [
    ("task returned", job(), Outcome(OutcomeKind.OK), Decision(Action.ACK, TaskOutcome.SUCCESS)),
    (
        "task raised, attempts left",
        job(1),
        ERROR,
        Decision(Action.RETRY, TaskOutcome.RETRIED),
    ),
    (
        "task raised, no attempts left",
        job(3),
        ERROR,
        Decision(Action.DEAD_LETTER, TaskOutcome.FAILED, Reason.FAILED),
    ),
    (
        "a non-retryable error (its result cannot be sent)",
        job(1),
        Outcome(OutcomeKind.ERROR, error_type="ResultTooLarge", retryable=False),
        Decision(Action.DEAD_LETTER, TaskOutcome.FAILED, Reason.FAILED),
    ),
    (
        "child died (SIGKILL, OOM, segfault)",
        job(1),
        Outcome(OutcomeKind.CRASHED, error_type="ChildDied"),
        Decision(Action.REQUEUE, TaskOutcome.CRASHED),
    ),
    (
        "hard time limit passed, attempts left: a failed attempt",
        job(1),
        TIMEOUT,
        Decision(Action.RETRY, TaskOutcome.TIMEOUT),
    ),
    (
        "hard time limit passed, no attempts left",
        job(3),
        TIMEOUT,
        Decision(Action.DEAD_LETTER, TaskOutcome.TIMEOUT, Reason.TIMEOUT),
    ),
    (
        "soft time limit passed: the task raised SoftTimeLimitExceeded",
        job(2),
        SOFT,
        Decision(Action.RETRY, TaskOutcome.RETRIED),
    ),
    (
        "whole service killed / connection lost: the job is abandoned",
        job(1),
        Outcome(OutcomeKind.RETURNED),
        Decision(Action.RETURN, None),
    ),
    (
        "SIGTERM: handed back unfinished",
        job(2),
        Outcome(OutcomeKind.RETURNED),
        Decision(Action.RETURN, None),
    ),
    (
        "bad input found in the child: dead-lettered at once, never retried",
        job(1),
        Outcome(OutcomeKind.REJECTED, retryable=False, reason=Reason.BAD_ARGS),
        Decision(Action.DEAD_LETTER, TaskOutcome.REJECTED, Reason.BAD_ARGS),
    ),
]


@pytest.mark.parametrize(("event", "j", "outcome", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_decide_follows_the_delivery_table(
    event: str, j: Job, outcome: Outcome, expected: Decision
) -> None:
    assert decide(j, outcome) == expected


def test_an_outcome_carries_its_own_dead_letter_reason() -> None:
    """A reason decided in the child reaches the dead letter unchanged: decide adds none."""
    outcome = Outcome(OutcomeKind.ERROR, retryable=False, reason=Reason.TOO_LARGE)
    assert decide(job(1), outcome).reason is Reason.TOO_LARGE


def test_reason_is_set_exactly_when_dead_lettered() -> None:
    for _, j, outcome, _ in TABLE:
        decision = decide(j, outcome)
        assert (decision.reason is not None) == (decision.action is Action.DEAD_LETTER)


# -- the settler surfaces bugs instead of counting them as stale deliveries -------------------


def test_runtime_error_is_not_a_connection_error() -> None:
    assert not any(issubclass(RuntimeError, kind) for kind in CONNECTION_ERRORS)


@dataclass
class Recorder(Observer):
    settled: list[tuple[Action, Reason | None]] = field(default_factory=list)

    def on_settled(self, action: Action, reason: Reason | None) -> None:
        self.settled.append((action, reason))


class BuggyAcks(AckRouter):
    async def nack(self, message: Any, *, requeue: bool) -> None:
        raise RuntimeError("a bug on the settle path")


class Message:
    """What the settler reads of a delivery whose channel is open."""

    channel = object()
    reply_to = None
    message_id = "m"


async def test_a_bug_on_the_settle_path_surfaces() -> None:
    recorder = Recorder()
    settler = Settler(None, "q", acks=BuggyAcks(), observer=recorder)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="a bug on the settle path"):
        await settler.requeue(Message(), counted=False)  # type: ignore[arg-type]
    assert recorder.settled == []  # not counted as STALE


async def test_a_closed_channel_is_stale() -> None:
    class ClosedAcks(AckRouter):
        async def nack(self, message: Any, *, requeue: bool) -> None:
            raise ConnectionResetError("gone")

    recorder = Recorder()
    settler = Settler(None, "q", acks=ClosedAcks(), observer=recorder)  # type: ignore[arg-type]
    await settler.requeue(Message(), counted=False)  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert recorder.settled == [(Action.STALE, None)]
