"""The fan-in's rules (service.fanin), without a broker: each rule, then random crash points.

The simulation plays the broker's part: a ready queue of records, the records delivered and not
yet acked, and the follow-up tasks published. A crash can come before any effect; the broker
then requeues whatever was delivered and not acked, and the next holder starts from an empty
book. Whatever the crash points, every fan-in must fire (or its flow abort), each flow must
reach one kind of terminal follow-up, and every repeat must carry the same message id.
"""

from __future__ import annotations

import json
import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import pytest

from service import continuation, protocol
from service.fanin import Ack, Done, Effect, FanIn, FollowUp, Keep, Record, Refuse, read_record

_serial = 0


@dataclass(eq=False)
class Msg:
    """One copy of a record in the simulated ``hutch.joins``."""

    headers: dict[str, Any]
    body: bytes
    tag: int = field(default=0)

    def __post_init__(self) -> None:
        global _serial
        _serial += 1
        self.tag = _serial


def record_msg(
    flow: str, group: str, i: int, n: int, *, ok: bool = True, at_ms: int = 1_000
) -> Msg:
    headers = {
        protocol.FLOW_HEADER: flow,
        protocol.FLOW_STEP_HEADER: f"{group}.{i}",
        protocol.JOIN_HEADER: f"{flow}:{group}",
        protocol.JOIN_INDEX_HEADER: i,
        protocol.JOIN_SIZE_HEADER: n,
        protocol.JOIN_OK_HEADER: ok,
        protocol.JOIN_QUEUE_HEADER: "work",
        protocol.JOIN_AT_HEADER: at_ms,
    }
    return Msg(headers, json.dumps({"i": i, "ok": ok, "flow": flow}).encode())


def parse(msg: Msg) -> Record | str:
    return read_record(msg.headers, protocol.JSON)


def book(**options: float) -> FanIn[Msg]:
    return FanIn(
        max_age=options.get("max_age", 3600.0), compact_after=options.get("compact", 600.0)
    )


def take(fanin: FanIn[Msg], msg: Msg, now: float = 0.0) -> list[Effect[Msg]]:
    """The effects of one record, with its `Done`s carried out (as if all were confirmed)."""
    effects = fanin.take(msg, parse(msg), msg.body, now)
    for effect in effects:
        if isinstance(effect, Done):
            fanin.done(effect.key)
    return effects


def follow_ups(effects: list[Effect[Msg]]) -> list[FollowUp]:
    return [e for e in effects if isinstance(e, FollowUp)]


# -- one rule at a time -------------------------------------------------------------------------


def test_fires_once_all_members_are_in_with_bodies_in_member_order() -> None:
    fanin = book()
    a, b, c = (record_msg("f", "1", i, 3) for i in (2, 0, 1))
    assert take(fanin, a) == [] and take(fanin, b) == []
    effects = take(fanin, c)
    (join,) = follow_ups(effects)
    assert join.task == continuation.JOIN_TASK and join.message_id == "f:1:join"
    assert effects[1] == Done("f:1")  # remembered once the follow-up is confirmed
    assert join.queue == "work" and join.step == "1:join"
    records = protocol.decode_request(protocol.JSON, join.body)[0][0]
    assert [r["i"] for r in records] == [0, 1, 2]
    # The follow-up is published before any record is acked.
    assert isinstance(effects[0], FollowUp)
    assert {e.token for e in effects[2:] if isinstance(e, Ack)} == {a, b, c}
    assert fanin.open == 0 and fanin.held == 0


def test_a_repeated_member_replaces_the_earlier_record() -> None:
    fanin = book()
    first, again = record_msg("f", "1", 0, 2), record_msg("f", "1", 0, 2)
    take(fanin, first)
    assert take(fanin, again) == [Ack(first)]
    assert fanin.held == 1


def test_a_repeat_after_the_fan_in_completed_is_acked_on_sight() -> None:
    fanin = book()
    take(fanin, record_msg("f", "1", 0, 2))
    assert follow_ups(take(fanin, record_msg("f", "1", 1, 2)))
    late = record_msg("f", "1", 1, 2)
    assert take(fanin, late) == [Ack(late)]
    fanin.lost()  # remembered across a reconnect of the same holder
    late_again = record_msg("f", "1", 0, 2)
    assert take(fanin, late_again) == [Ack(late_again)]


def test_the_first_failed_member_aborts_the_flow_once() -> None:
    fanin = book()
    ok = record_msg("f", "1", 0, 3)
    bad = record_msg("f", "1", 1, 3, ok=False)
    take(fanin, ok)
    effects = take(fanin, bad)
    assert [type(e) for e in effects] == [FollowUp, Keep, Ack]
    abort = effects[0]
    assert isinstance(abort, FollowUp)
    assert abort.task == continuation.ABORT_TASK and abort.message_id == "f:abort"
    keep = effects[1]
    assert isinstance(keep, Keep) and keep.token is bad and keep.handled
    # The marked copy comes back; a second failure, and the last member, change nothing.
    marked = Msg({**bad.headers, protocol.JOIN_HANDLED_HEADER: True}, bad.body)
    assert take(fanin, marked) == []
    assert take(fanin, record_msg("f", "1", 2, 3, ok=False)) == []
    assert fanin.held == 3


def test_oldest_age_counts_fan_ins_still_waiting_not_failed_flows_kept_for_replay() -> None:
    fanin = book()
    take(fanin, record_msg("waiting", "1", 0, 2, at_ms=5_000))
    take(fanin, record_msg("failed", "1", 0, 2, at_ms=1_000))
    assert fanin.oldest_seconds(11_000) == 10.0  # "failed" is older, and still waiting
    bad = record_msg("failed", "1", 1, 2, ok=False, at_ms=1_000)
    take(fanin, bad)
    take(fanin, Msg({**bad.headers, protocol.JOIN_HANDLED_HEADER: True}, bad.body))
    # Its flow has ended; its records stay for a replay but are not a stuck fan-in.
    assert fanin.open == 2 and fanin.oldest_seconds(11_000) == 6.0
    fanin.lost()
    assert fanin.oldest_seconds(11_000) == 0.0


def test_a_marked_record_from_an_earlier_holder_does_not_abort_again() -> None:
    fanin = book()
    marked = record_msg("f", "1", 0, 2, ok=False)
    marked.headers[protocol.JOIN_HANDLED_HEADER] = True
    assert take(fanin, marked) == []
    assert take(fanin, record_msg("f", "1", 1, 2, ok=False)) == []


def test_a_replayed_member_that_succeeds_resumes_the_flow() -> None:
    fanin = book()
    take(fanin, record_msg("f", "1", 0, 2))
    failed = record_msg("f", "1", 1, 2, ok=False)
    take(fanin, failed)
    marked = Msg({**failed.headers, protocol.JOIN_HANDLED_HEADER: True}, failed.body)
    take(fanin, marked)
    effects = take(fanin, record_msg("f", "1", 1, 2))  # `hutch dlq replay` of member 1
    assert effects[0] == Ack(marked)
    (join,) = follow_ups(effects)
    assert join.message_id == "f:1:join"


def test_a_failed_flow_holds_its_other_complete_fan_ins_until_the_replay() -> None:
    fanin = book()
    take(fanin, record_msg("f", "0.0", 0, 2, ok=False))  # one branch failed
    take(fanin, record_msg("f", "0.1", 0, 2))
    assert follow_ups(take(fanin, record_msg("f", "0.1", 1, 2))) == []  # the other waits
    # The replay of the failed member succeeds before the failure's marked copy is back: the
    # flow resumes, and the copy, when it comes, changes nothing.
    effects = take(fanin, record_msg("f", "0.0", 0, 2))
    assert [f.message_id for f in follow_ups(effects)] == ["f:0.1:join"]
    marked = record_msg("f", "0.0", 0, 2, ok=False)
    marked.headers[protocol.JOIN_HANDLED_HEADER] = True
    assert take(fanin, marked) == [Ack(marked)]
    effects = take(fanin, record_msg("f", "0.0", 1, 2))
    assert [f.message_id for f in follow_ups(effects)] == ["f:0.0:join"]


def test_a_member_that_succeeded_stays_succeeded() -> None:
    fanin = book()
    take(fanin, record_msg("f", "1", 0, 2))
    later_failure = record_msg("f", "1", 0, 2, ok=False)
    assert take(fanin, later_failure) == [Ack(later_failure)]
    assert follow_ups(take(fanin, record_msg("f", "1", 1, 2)))


def test_an_open_fan_in_past_its_max_age_ends_the_flow_as_join_timeout() -> None:
    fanin = book(max_age=60)
    held = record_msg("f", "1", 0, 3, at_ms=1_000)
    take(fanin, held)
    assert fanin.housekeep(now_ms=1_000 + 59_000, now=0) == []
    effects = fanin.housekeep(now_ms=1_000 + 61_000, now=0)
    abort, done, ack = effects
    assert done == Done("f:1")
    assert isinstance(abort, FollowUp) and abort.task == continuation.ABORT_TASK
    record, error = protocol.decode_request(protocol.JSON, abort.body)[0]
    assert record[0]["i"] == 0
    assert error["type"] == "JoinTimeout" and "[1, 2]" in error["message"]
    assert ack == Ack(held)
    assert fanin.open == 0


def test_a_failed_flow_past_its_max_age_is_dropped_without_a_second_abort() -> None:
    fanin = book(max_age=60)
    bad = record_msg("f", "1", 0, 2, ok=False, at_ms=0)
    bad.headers[protocol.JOIN_HANDLED_HEADER] = True
    take(fanin, bad)
    assert fanin.housekeep(now_ms=61_000, now=0) == [Done("f:1"), Ack(bad)]


def test_records_held_long_are_republished_then_acked() -> None:
    fanin = book(compact=600)
    old = record_msg("f", "1", 0, 2)
    take(fanin, old, now=0.0)
    young = record_msg("g", "1", 0, 2)
    take(fanin, young, now=500.0)
    assert fanin.housekeep(now_ms=1_000, now=650.0) == [Keep(old, handled=False), Ack(old)]
    assert fanin.held == 1


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({protocol.JOIN_HEADER: 7}, "must be strings"),
        ({protocol.JOIN_SIZE_HEADER: 0}, "must be 1 to 1000"),
        ({protocol.JOIN_SIZE_HEADER: 1001}, "must be 1 to 1000"),
        ({protocol.JOIN_INDEX_HEADER: 2}, "must be 0 to"),
        ({protocol.JOIN_OK_HEADER: "yes"}, "must be a boolean"),
    ],
)
def test_an_unreadable_record_is_refused_with_what_is_wrong(
    change: dict[str, Any], why: str
) -> None:
    msg = record_msg("f", "1", 0, 2)
    msg.headers.update(change)
    (refuse,) = take(book(), msg)
    assert isinstance(refuse, Refuse) and why in refuse.detail


def test_a_record_disagreeing_on_the_width_is_refused() -> None:
    fanin = book()
    take(fanin, record_msg("f", "1", 0, 2))
    (refuse,) = take(fanin, record_msg("f", "1", 1, 3))
    assert isinstance(refuse, Refuse) and "has 2 members" in refuse.detail


# -- random crash points --------------------------------------------------------------------


@dataclass
class Sim:
    """The broker's side of ``hutch.joins`` and of the work queue, for one holder at a time."""

    rng: random.Random
    crash_rate: float
    ready: deque[Msg] = field(default_factory=deque)
    delivered: dict[int, Msg] = field(default_factory=dict)
    published: list[FollowUp] = field(default_factory=list)
    crashes: int = 0

    def run(self, fanin: FanIn[Msg]) -> None:
        while self.ready:
            msg = self.ready.popleft()
            self.delivered[msg.tag] = msg
            effects = fanin.take(msg, parse(msg), msg.body, 0.0)
            if not self.carry_out(fanin, effects):
                fanin.lost()

    def carry_out(self, fanin: FanIn[Msg], effects: list[Effect[Msg]]) -> bool:
        """Each effect in order, unless the holder dies first: False after a crash."""
        for effect in effects:
            if self.rng.random() < self.crash_rate:
                self.crash()
                return False
            if isinstance(effect, FollowUp):
                self.published.append(effect)
            elif isinstance(effect, Done):
                fanin.done(effect.key)
            elif isinstance(effect, Keep):
                headers = dict(effect.token.headers)
                if effect.handled:
                    headers[protocol.JOIN_HANDLED_HEADER] = True
                self.ready.append(Msg(headers, effect.token.body))
            else:
                assert isinstance(effect, Ack | Refuse)
                assert self.delivered.pop(effect.token.tag, None) is not None, "acked twice"
        return True

    def crash(self) -> None:
        """The holder's connection is gone: the broker requeues what it had not acked."""
        self.crashes += 1
        returned = list(self.delivered.values())
        self.rng.shuffle(returned)
        self.delivered.clear()
        self.ready.extendleft(returned)


@pytest.mark.parametrize("seed", range(40))
def test_random_crash_points_lose_no_fan_in_and_end_each_flow_one_way(seed: int) -> None:
    rng = random.Random(seed)
    sim = Sim(rng, crash_rate=rng.choice([0.02, 0.1, 0.25]))
    expected_join: set[str] = set()
    failing: set[str] = set()
    for f in range(30):
        flow, n = f"flow{f}", rng.randint(1, 4)
        fails = {i for i in range(n) if rng.random() < 0.1}
        (failing if fails else expected_join).add(flow)
        for i in range(n):
            for _ in range(rng.choice([1, 1, 1, 2])):  # members repeated by their own crashes
                sim.ready.append(record_msg(flow, "1", i, n, ok=i not in fails))
    records = list(sim.ready)
    rng.shuffle(records)
    sim.ready = deque(records)

    fanin: FanIn[Msg] = book()
    sim.run(fanin)

    by_flow: dict[str, Counter[str]] = {}
    for follow_up in sim.published:
        by_flow.setdefault(follow_up.flow, Counter())[follow_up.task] += 1
    for flow in expected_join:
        assert by_flow.get(flow, Counter()).keys() == {continuation.JOIN_TASK}, (flow, sim)
    for flow in failing:
        assert by_flow.get(flow, Counter()).keys() == {continuation.ABORT_TASK}, (flow, sim)
    # Repeats of a follow-up carry the same message id: one id per flow and kind.
    ids: dict[tuple[str, str], set[str]] = {}
    for follow_up in sim.published:
        ids.setdefault((follow_up.flow, follow_up.task), set()).add(follow_up.message_id)
    assert all(len(v) == 1 for v in ids.values())
    # What is still held: only the failed flows' records, kept replayable until the max age;
    # then all of them are acked and nothing fires again.
    assert {m.headers[protocol.FLOW_HEADER] for m in sim.delivered.values()} <= failing
    before = len(sim.published)
    sim.crash_rate = 0.0
    assert sim.carry_out(fanin, fanin.housekeep(now_ms=10**13, now=0.0))
    assert not sim.delivered and fanin.open == 0
    assert len(sim.published) == before
