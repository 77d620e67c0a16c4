"""Strict priority between a worker's queues: the pool's lanes and the consumer gate (pure
logic; the broker tests are in tests/test_queues.py)."""

from __future__ import annotations

from typing import Any

from service.pool.jobs import Job
from service.pool.lanes import Lanes
from service.priority import PriorityGate


def job(lane: int, name: str) -> Any:
    # Only the lane and an identity matter to the lanes.
    j = Job.__new__(Job)
    j.lane = lane
    j.message_id = name
    return j


def names(jobs: list[Job]) -> list[str]:
    return [j.message_id for j in jobs]


def test_the_earliest_lane_goes_first_and_each_lane_keeps_its_order() -> None:
    lanes = Lanes(3)
    for j in (job(2, "low1"), job(0, "high1"), job(1, "mid1"), job(0, "high2"), job(2, "low2")):
        lanes.append(j)
    assert len(lanes) == 5 and lanes.waiting(0) == 2 and lanes.waiting(2) == 2
    assert [lanes.popleft().message_id for _ in range(5)] == [
        "high1",
        "high2",
        "mid1",
        "low1",
        "low2",
    ]
    assert not lanes


def test_a_bystander_goes_back_to_the_front_of_its_own_lane() -> None:
    lanes = Lanes(2)
    lanes.append(job(1, "low1"))
    lanes.append(job(0, "high1"))
    lanes.appendleft(job(1, "low0"))
    assert names([lanes.popleft() for _ in range(3)]) == ["high1", "low0", "low1"]


def test_take_by_lane_leaves_the_others() -> None:
    lanes = Lanes(2)
    for j in (job(0, "h1"), job(1, "l1"), job(0, "h2"), job(1, "l2")):
        lanes.append(j)
    assert names(lanes.take(lambda j: j.lane == 1)) == ["l1", "l2"]
    assert len(lanes) == 2 and names(list(lanes)) == ["h1", "h2"]
    assert names(lanes.take()) == ["h1", "h2"] and len(lanes) == 0


def test_one_lane_is_a_plain_queue() -> None:
    lanes = Lanes()
    lanes.append(job(0, "a"))
    lanes.append(job(0, "b"))
    assert names([lanes.popleft(), lanes.popleft()]) == ["a", "b"]


def test_a_later_queue_pauses_at_once_and_resumes_after_a_quiet_spell() -> None:
    gate = PriorityGate(3, resume_after=0.5)
    assert gate.look([0, 5, 5], now=0.0) == ([2], [])  # only the middle queue waits above low
    assert gate.look([3, 5, 5], now=0.1) == ([1], [])  # now high waits too
    assert gate.look([0, 0, 0], now=0.2) == ([], [])  # quiet, but not for long enough
    assert gate.look([0, 0, 0], now=0.75) == ([], [1, 2])
    assert gate.paused == [False, False, False]


def test_the_first_queue_never_pauses() -> None:
    gate = PriorityGate(1)
    assert gate.look([100], now=0.0) == ([], [])
    assert gate.paused == [False]


def test_a_brief_dip_in_the_earlier_queue_does_not_resume_the_later_one() -> None:
    gate = PriorityGate(2, resume_after=0.5)
    gate.look([4, 1], now=0.0)
    for step in range(1, 20):  # high empties for a moment every other look
        assert gate.look([step % 2 * 4, 0], now=step * 0.1) == ([], [])
    assert gate.paused == [False, True]
