"""The parity suite: every scenario runs on the in-memory stand-in and on a real broker with a
real ``hutch worker``, and must end the same way (results, errors, dead-letter reasons,
attempts, flow outcomes). A scenario that passes one way and fails the other is a bug in the
stand-in (`service.testing`).

The real side shares one worker per module (on a queue of its own in the default vhost, deleted
afterwards); retry backoffs and time limits are a second or so there and fake time in memory.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from service import TaskError, chain, group, step, testing
from service.errors import EncodeError
from service.testing.live import LiveWorker
from tests import parity_tasks as t
from tests.conftest import BROKER

LOG = Path(os.environ.setdefault("HUTCH_PARITY_LOG", f"/tmp/hutch-parity-{os.getpid()}.jsonl"))


@pytest.fixture(scope="module")
def live() -> Iterator[LiveWorker]:
    with LiveWorker(
        f"amqp://{BROKER}/", ["tests.parity_tasks"], env={"HUTCH_PARITY_LOG": str(LOG)}
    ) as worker:
        yield worker
    LOG.unlink(missing_ok=True)


@pytest.fixture(params=["memory", "broker"])
def w(request: pytest.FixtureRequest) -> Iterator[Any]:
    LOG.unlink(missing_ok=True)
    if request.param == "memory":
        # isolate: each task in a forked child, so a crash is a crash, as on the broker.
        with testing.worker(tasks=["tests.parity_tasks"], isolate=True) as worker:
            yield worker
        return
    worker = request.getfixturevalue("live")
    worker.begin()
    yield worker
    worker.run_until_idle()


@pytest.fixture
def client(w: Any) -> Iterator[Any]:
    c = w.client()
    yield c
    c.close()


def notes(event: str = "on_error") -> list[dict[str, Any]]:
    if not LOG.exists():
        return []
    found = [json.loads(line) for line in LOG.read_text().splitlines()]
    return [note for note in found if note.pop("event") == event]


def letters(w: Any, count: int) -> list[tuple[Any, ...]]:
    """The dead letters once ``count`` are in: (task, reason, attempts, error type)."""
    w.wait_until(lambda: len(w.dead_letters()) >= count)
    return [(d.task, d.reason, d.attempts, d.error_type) for d in w.dead_letters()]


def raises(call: Callable[[], Any]) -> tuple[str, str]:
    with pytest.raises(TaskError) as info:
        call()
    return info.value.type, info.value.message


# -- results through the codec -----------------------------------------------------------


def test_call_returns_result(client: Any) -> None:
    assert client.call(t.add, 2, 3) == 5


def test_call_by_name_and_keyword(client: Any) -> None:
    assert client.call("parity.add", 2, b=3.5) == 5.5


def test_tuple_comes_back_as_list(client: Any) -> None:
    assert client.call(t.echo, (1, (2, 3))) == [1, [2, 3]]


def test_aware_datetime_round_trip(client: Any) -> None:
    when = dt.datetime(2026, 3, 29, 1, 30, tzinfo=dt.UTC)
    assert client.call(t.echo, when) == when


def test_bytes_round_trip_msgpack(client: Any) -> None:
    assert client.call(t.echo, b"\x00\xff") == b"\x00\xff"


def test_json_client(w: Any) -> None:
    with w.client(content_type="application/json") as c:
        assert c.call(t.echo, {"a": [1, 2.5, None, True]}) == {"a": [1, 2.5, None, True]}


def test_json_refuses_bytes_before_sending(w: Any) -> None:
    with w.client(content_type="application/json") as c, pytest.raises(EncodeError):
        c.submit(t.echo, b"raw")
    assert w.dead_letters() == []


def test_naive_datetime_refused_by_the_codec(client: Any) -> None:
    with pytest.raises(EncodeError):
        client.submit(t.echo, dt.datetime(2026, 1, 1))


def test_int_map_keys_in_arguments_are_malformed(client: Any, w: Any) -> None:
    assert raises(lambda: client.call(t.echo, {1: "a"}))[0] == "malformed"
    assert letters(w, 1) == [("parity.echo", "malformed", 1, "malformed")]


def test_int_map_keys_in_a_result_pass(client: Any) -> None:
    # Results may have non-string keys (msgpack); requests may not.
    assert client.call(t.add, [1], [2]) == [1, 2]


def test_map_and_starmap(client: Any) -> None:
    assert client.map(t.echo, [1, "two", None]) == [1, "two", None]
    assert client.starmap(t.add, [(1, 2), (3, 4)]) == [3, 7]


def test_map_return_exceptions(client: Any) -> None:
    results = client.map(t.echo, [1, {2: 2}], return_exceptions=True)
    assert results[0] == 1
    assert isinstance(results[1], TaskError) and results[1].type == "malformed"


# -- bad input: dead-lettered at once -------------------------------------------------------


def test_unknown_task(client: Any, w: Any) -> None:
    assert raises(lambda: client.call("parity.nope"))[0] == "unknown_task"
    assert letters(w, 1) == [("parity.nope", "unknown_task", 1, "unknown_task")]


def test_bad_args(client: Any, w: Any) -> None:
    kind, message = raises(lambda: client.call(t.add))
    assert kind == "bad_args" and "missing a required argument" in message
    assert letters(w, 1) == [("parity.add", "bad_args", 1, "bad_args")]


def test_too_many_args(client: Any, w: Any) -> None:
    assert raises(lambda: client.call(t.echo, 1, 2))[0] == "bad_args"


# -- failures, retries, limits ----------------------------------------------------------------


def test_retries_then_succeeds(client: Any, w: Any) -> None:
    assert client.call(t.fails_until, 3) == 3
    assert w.dead_letters() == []


def test_retries_exhausted(client: Any, w: Any) -> None:
    assert raises(lambda: client.call(t.always_fails)) == ("ValueError", "attempt 3")
    assert letters(w, 1) == [("parity.always_fails", "failed", 3, "ValueError")]


def test_submitted_failure_is_dead_lettered(client: Any, w: Any) -> None:
    client.submit(t.always_fails)
    assert letters(w, 1) == [("parity.always_fails", "failed", 3, "ValueError")]


def test_no_retry(client: Any, w: Any) -> None:
    assert raises(lambda: client.call(t.no_retry)) == ("KeyError", "'missing'")
    assert letters(w, 1) == [("parity.no_retry", "failed", 1, "KeyError")]


def test_type_error_inside_is_a_failure_not_bad_args(client: Any, w: Any) -> None:
    assert raises(lambda: client.call(t.type_error))[0] == "TypeError"
    assert letters(w, 1) == [("parity.type_error", "failed", 1, "TypeError")]


def test_system_exit_is_a_failure(client: Any, w: Any) -> None:
    assert raises(lambda: client.call(t.exits)) == ("SystemExit", "3")


def test_hard_time_limit(client: Any, w: Any) -> None:
    assert raises(lambda: client.call(t.sleepy, 5)) == (
        "TimeLimitExceeded",
        "hard time limit of 1s exceeded",
    )
    assert letters(w, 1) == [("parity.sleepy", "timeout", 1, "TimeLimitExceeded")]


def test_hard_time_limit_retried(client: Any, w: Any) -> None:
    assert raises(lambda: client.call(t.sleepy_retry, 5))[0] == "TimeLimitExceeded"
    assert letters(w, 1) == [("parity.sleepy_retry", "timeout", 2, "TimeLimitExceeded")]


def test_within_time_limit(client: Any) -> None:
    assert client.call(t.sleepy, 0.1) == "woke"


def test_soft_time_limit(client: Any) -> None:
    assert client.call(t.soft, 3) == "cleaned up"


def test_unserializable_result_is_not_retried(client: Any, w: Any) -> None:
    assert raises(lambda: client.call(t.returns_set))[0] == "UnserializableResult"
    assert letters(w, 1) == [("parity.returns_set", "failed", 1, "UnserializableResult")]


def test_crash_reaches_the_delivery_limit(client: Any, w: Any) -> None:
    assert raises(lambda: client.call(t.crash))[0] == "delivery_limit"
    assert letters(w, 1) == [("parity.crash", "delivery_limit", 1, "delivery_limit")]


def test_context(client: Any) -> None:
    assert client.call(t.context) == {
        "task": "parity.context",
        "attempt": 1,
        "redelivered": False,
        "delayed": False,
        "flow": False,
        "step": None,
    }


# -- delayed tasks -----------------------------------------------------------------------------


def test_countdown(client: Any) -> None:
    assert client.call(step(t.context, countdown=1))["delayed"] is True


def test_eta(client: Any, w: Any) -> None:
    eta = dt.datetime.fromtimestamp(w.clock.time() + 1, dt.UTC)
    assert client.call(step(t.add, 1, kwargs={"b": 1}, eta=eta)) == 2


def test_eta_in_the_past_runs_now(client: Any, w: Any) -> None:
    eta = dt.datetime.fromtimestamp(w.clock.time() - 60, dt.UTC)
    assert client.call(step(t.echo, "late", eta=eta)) == "late"


# -- flows -------------------------------------------------------------------------------------


def test_chain(client: Any) -> None:
    assert client.call(chain(step(t.add, 1, 2), step(t.add, 10))) == 13


def test_group(client: Any) -> None:
    assert client.call(group(step(t.add, 1, 1), step(t.add, 2, 2))) == [2, 4]


def test_fan_in(client: Any) -> None:
    flow = chain(step(t.add, 1, 1), group(step(t.add, 10), step(t.add, 20)), step(t.total))
    assert client.call(flow) == 34


def test_nested_chain_in_group(client: Any) -> None:
    flow = group(chain(step(t.add, 1, 1), step(t.add, 1)), step(t.echo, "x"))
    assert client.call(flow) == [3, "x"]


def test_flow_step_context(client: Any) -> None:
    result = client.call(chain(step(t.echo, 0), step(t.context)))
    assert (result["flow"], result["step"]) == (True, "1")


def test_chain_with_countdown_step(client: Any) -> None:
    assert client.call(chain(step(t.add, 1, 2), step(t.add, 3, countdown=1))) == 6


def test_failed_step_ends_flow_with_on_error(client: Any, w: Any) -> None:
    flow = chain(
        step(t.add, 1, 2),
        step(t.no_retry),
        step(t.add, 100),
        on_error=step(t.on_error, "tag-1"),
    )
    kind, message = raises(lambda: client.call(flow))
    assert kind == "KeyError" and "failed at step 1 (parity.no_retry)" in message
    assert w.wait_until(lambda: len(notes()) == 1)
    assert notes() == [
        {
            "tag": "tag-1",
            "step": "1",
            "task": "parity.no_retry",
            "type": "KeyError",
        }
    ]
    assert letters(w, 1) == [("parity.no_retry", "failed", 1, "KeyError")]


def test_fan_in_member_fails(client: Any, w: Any) -> None:
    flow = chain(
        group(step(t.add, 1, 1), step(t.always_fails), step(t.no_retry)),
        step(t.total),
        on_error=step(t.on_error, "tag-2"),
    )
    kind, message = raises(lambda: client.call(flow))
    assert kind in ("ValueError", "KeyError") and "failed at step 0." in message
    assert w.wait_until(lambda: len(notes()) >= 1 and len(w.dead_letters()) >= 2)
    w.run_until_idle()
    assert len(notes()) == 1  # the flow ends once, however many members fail
    assert sorted(letters(w, 2)) == [
        ("parity.always_fails", "failed", 3, "ValueError"),
        ("parity.no_retry", "failed", 1, "KeyError"),
    ]


def test_submitted_flow_runs_on_error(client: Any, w: Any) -> None:
    client.submit(chain(step(t.type_error), on_error=step(t.on_error, "tag-3")))
    assert w.wait_until(lambda: len(notes()) == 1)
    assert notes()[0]["type"] == "TypeError"


# -- schedules -----------------------------------------------------------------------------------


def test_schedule_fires_each_slot_once(w: Any) -> None:
    began = w.clock.time() * 1000
    w.clock.advance(seconds=5)
    assert w.wait_until(lambda: len([n for n in notes("tick") if n["slot"] > began]) >= 2)
    ticks = [n for n in notes("tick") if n["slot"] > began]
    slots = [n["slot"] for n in ticks]
    assert len(slots) == len(set(slots))  # once per slot
    assert all(slot % 2000 == 0 for slot in slots)  # aligned to the epoch
    assert all(n["id"] == f"cron:parity.tick:{n['slot']}" for n in ticks)
