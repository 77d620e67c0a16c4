"""The process pool, driven directly: real children running tests/pool_tasks.py, no broker."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

import tests.pool_tasks  # noqa: F401  (registers the tasks in this process too)
from service import protocol, registry
from service.errors import PoolStartError
from service.pool.jobs import Job, Outcome, OutcomeKind, RestartReason
from service.pool.pipelining import MAX_JOBS_PER_CHILD, PIPELINE_BELOW
from service.pool.supervisor import Pool
from service.protocol import JSON, MSGPACK, Reason
from service.registry import TaskSpec

REPO = Path(__file__).resolve().parent.parent
TASKS = "tests.pool_tasks"
MiB = 1 << 20


def spec(name: str) -> TaskSpec:
    found = registry.lookup(f"{TASKS}.{name}")
    assert found is not None, name
    return found


def job(
    name: str,
    *args: Any,
    content_type: str = MSGPACK,
    body: bytes | None = None,
    message_id: str = "m1",
    attempt: int = 1,
    deliveries: int = 0,
    redelivered: bool = False,
    want_result: bool = True,
    **kwargs: Any,
) -> Job:
    return Job(
        spec=spec(name),
        content_type=content_type,
        body=protocol.encode_request(content_type, args, kwargs) if body is None else body,
        message_id=message_id,
        attempt=attempt,
        deliveries=deliveries,
        redelivered=redelivered,
        want_result=want_result,
        delivery=None,
    )


def result_of(outcome: Outcome, content_type: str = MSGPACK) -> Any:
    assert outcome.kind is OutcomeKind.OK, outcome
    assert outcome.payload is not None
    envelope = protocol.decode(content_type, outcome.payload)
    assert envelope["ok"] is True, envelope
    return envelope["result"]


class Harness:
    """A pool plus everything it reported: outcomes per job and restart reasons."""

    def __init__(self, modules: tuple[str, ...] = (TASKS,), **options: Any) -> None:
        self.done: asyncio.Queue[tuple[Job, Outcome]] = asyncio.Queue()
        self.outcomes: dict[int, Outcome] = {}
        self.order: list[Job] = []
        self.restarts: list[RestartReason] = []
        settings: dict[str, Any] = {
            "size": 1,
            "time_limit": 30.0,
            "max_depth": 32,
            "max_result_size": MiB,
        }
        settings.update(options)
        self.pool = Pool(
            list(modules), on_done=self._on_done, on_restart=self.restarts.append, **settings
        )

    def _on_done(self, job: Job, outcome: Outcome) -> None:
        self.done.put_nowait((job, outcome))

    def submit(self, *jobs: Job) -> None:
        for j in jobs:
            self.pool.submit(j)

    async def wait(self, *jobs: Job, timeout: float = 15.0) -> list[Outcome]:
        async with asyncio.timeout(timeout):
            while not all(id(j) in self.outcomes for j in jobs):
                finished, outcome = await self.done.get()
                assert id(finished) not in self.outcomes, "a job was reported twice"
                self.outcomes[id(finished)] = outcome
                self.order.append(finished)
        return [self.outcomes[id(j)] for j in jobs]

    async def run(self, j: Job, timeout: float = 15.0) -> Outcome:
        self.submit(j)
        (outcome,) = await self.wait(j, timeout=timeout)
        return outcome


@contextlib.asynccontextmanager
async def running_pool(**options: Any) -> AsyncIterator[Harness]:
    harness = Harness(**options)
    await harness.pool.start()
    try:
        yield harness
    finally:
        await harness.pool.close()


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def gone_or_zombie(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # Reparented to an init that has not reaped it yet: dead, only the table entry is left.
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    # Children run `python -m service.pool.child --tasks tests.pool_tasks` in our working directory.
    monkeypatch.chdir(REPO)


# -- results ---------------------------------------------------------------------------------------


async def test_ok_result_msgpack_and_json() -> None:
    async with running_pool() as h:
        assert result_of(await h.run(job("add", 2, 3))) == 5
        outcome = await h.run(job("add", "a", "b", content_type=JSON))
        assert result_of(outcome, JSON) == "ab"
        assert outcome.payload == b'{"ok":true,"result":"ab"}'
        assert result_of(await h.run(job("add", a=[1], b=[2]))) == [1, 2]


async def test_no_result_wanted() -> None:
    async with running_pool() as h:
        outcome = await h.run(job("add", 1, 2, want_result=False))
        assert outcome.kind is OutcomeKind.OK
        assert outcome.payload is None


async def test_task_sees_its_delivery_context() -> None:
    async with running_pool() as h:
        j = job("context", message_id="msg-42", attempt=3, deliveries=2, redelivered=True)
        assert result_of(await h.run(j)) == ["msg-42", f"{TASKS}.context", 3, 2, True]


async def test_children_are_separate_processes() -> None:
    async with running_pool(size=2) as h:
        pids = h.pool.child_pids()
        assert len(pids) == 2
        assert os.getpid() not in pids
        assert h.pool.alive == 2
        assert result_of(await h.run(job("pid"))) in pids


async def test_jobs_beyond_size_wait_and_run_in_order() -> None:
    async with running_pool(size=1) as h:
        jobs = [job("sleep_then", 0.1, i) for i in range(3)]
        h.submit(*jobs)
        assert h.pool.in_flight == 3
        await asyncio.sleep(0)  # jobs go out to children once per loop turn
        assert h.pool.running == 1
        outcomes = await h.wait(*jobs)
        assert [result_of(o) for o in outcomes] == [0, 1, 2]
        assert h.order == jobs
        assert h.pool.in_flight == 0


# -- failures inside the task ----------------------------------------------------------------------


async def test_task_raises() -> None:
    async with running_pool() as h:
        outcome = await h.run(job("fail", "boom"))
        assert outcome.kind is OutcomeKind.ERROR
        assert (outcome.error_type, outcome.error_message) == ("ValueError", "boom")
        assert outcome.retryable is True
        assert outcome.payload is None


async def test_unpicklable_exception_is_reported_and_child_survives() -> None:
    async with running_pool() as h:
        pids = h.pool.child_pids()
        outcome = await h.run(job("fail_unpicklable"))
        assert outcome.kind is OutcomeKind.ERROR
        assert outcome.error_type == "TwoArgError"
        assert outcome.error_message == "code 7: needs two args"
        assert result_of(await h.run(job("add", 1, 1))) == 2
        assert h.pool.child_pids() == pids
        assert h.restarts == []


async def test_exception_whose_str_raises() -> None:
    async with running_pool() as h:
        outcome = await h.run(job("fail_unprintable"))
        assert outcome.kind is OutcomeKind.ERROR
        assert outcome.error_type == "UnprintableError"
        assert outcome.error_message == "<unprintable UnprintableError>"


async def test_system_exit_in_a_task_is_an_error_not_a_crash() -> None:
    async with running_pool() as h:
        pids = h.pool.child_pids()
        outcome = await h.run(job("exit_task"))
        assert outcome.kind is OutcomeKind.ERROR
        assert outcome.error_type == "SystemExit"
        assert result_of(await h.run(job("add", 1, 2))) == 3
        assert h.pool.child_pids() == pids


async def test_type_error_inside_a_task_is_a_failure_not_bad_args() -> None:
    async with running_pool() as h:
        outcome = await h.run(job("inner_type_error"))
        assert outcome.kind is OutcomeKind.ERROR
        assert outcome.error_type == "TypeError"
        assert outcome.retryable is True


@pytest.mark.parametrize("content_type", [MSGPACK, JSON])
async def test_unserializable_result(content_type: str) -> None:
    async with running_pool() as h:
        outcome = await h.run(job("unserializable", content_type=content_type))
        assert outcome.kind is OutcomeKind.ERROR
        assert outcome.error_type == "UnserializableResult"
        assert "object" in outcome.error_message
        assert outcome.retryable is False
        assert result_of(await h.run(job("add", 1, 2))) == 3


async def test_result_too_large() -> None:
    async with running_pool(max_result_size=4096) as h:
        assert result_of(await h.run(job("huge", 4000))) == "x" * 4000
        outcome = await h.run(job("huge", 100_000))
        assert outcome.kind is OutcomeKind.ERROR
        assert outcome.error_type == "ResultTooLarge"
        assert "4096" in outcome.error_message
        assert outcome.retryable is False
        assert outcome.payload is None


# -- bad input -------------------------------------------------------------------------------------


async def test_wrong_arity_is_rejected_as_bad_args() -> None:
    async with running_pool() as h:
        bad = [
            job("add", 1),
            job("add", 1, 2, 3),
            job("add", 1, 2, c=3),
            job("add", 1, a=2),
            job("pid", 1),
        ]
        h.submit(*bad)
        for outcome in await h.wait(*bad):
            assert outcome.kind is OutcomeKind.REJECTED
            assert outcome.reason is Reason.BAD_ARGS
            assert outcome.retryable is False
            assert f"{TASKS}." in outcome.error_message
        assert result_of(await h.run(job("add", 1, 2))) == 3


@pytest.mark.parametrize(
    ("content_type", "body", "reason"),
    [
        (MSGPACK, b"\xc1", Reason.MALFORMED),
        (MSGPACK, msgpack.packb([1, 2]), Reason.MALFORMED),
        (MSGPACK, msgpack.packb({"args": {"a": 1}}), Reason.MALFORMED),
        (JSON, b'{"args": [1, 2]', Reason.MALFORMED),
        (JSON, b'{"args": ' + b"[" * 10 + b"]" * 10 + b"}", Reason.TOO_DEEP),
        (MSGPACK, b"\x91" * 2000 + b"\x01", Reason.TOO_DEEP),
        ("text/plain", b"{}", Reason.BAD_CONTENT_TYPE),
    ],
)
async def test_bad_body_is_rejected(content_type: str, body: bytes, reason: Reason) -> None:
    async with running_pool(max_depth=8) as h:
        outcome = await h.run(job("add", content_type=content_type, body=body))
        assert outcome.kind is OutcomeKind.REJECTED
        assert outcome.reason is reason
        assert outcome.retryable is False
        assert h.restarts == []


async def test_unknown_task_is_rejected_by_the_child() -> None:
    ghost = TaskSpec(f"{TASKS}.not_registered", lambda: None)
    async with running_pool() as h:
        j = job("add", 1, 2)
        j.spec = ghost
        outcome = await h.run(j)
        assert outcome.kind is OutcomeKind.REJECTED
        assert outcome.reason is Reason.UNKNOWN_TASK


async def test_timestamp_out_of_range_is_rejected_not_a_crash() -> None:
    body = msgpack.packb({"args": [msgpack.Timestamp(253402300800, 0)], "kwargs": {}})
    async with running_pool() as h:
        outcome = await h.run(job("echo", body=body))
        assert outcome.kind is OutcomeKind.REJECTED, outcome
        assert outcome.reason is Reason.MALFORMED


# -- crashes and time limits -----------------------------------------------------------------------


async def test_crash_fails_only_its_own_job() -> None:
    async with running_pool(size=2) as h:
        before = set(h.pool.child_pids())
        survivor = job("sleep_then", 1.0, "survivor", message_id="slow")
        victim = job("crash", message_id="victim")
        h.submit(survivor, victim)
        await asyncio.sleep(0)  # jobs go out to children once per loop turn
        assert h.pool.running == 2
        crashed, finished = await h.wait(victim, survivor)
        assert crashed.kind is OutcomeKind.CRASHED
        assert crashed.error_type == "ChildDied"
        assert "SIGKILL" in crashed.error_message
        assert result_of(finished) == "survivor"
        assert h.order == [victim, survivor]
        assert h.restarts == [RestartReason.CRASH]
        await eventually(lambda: h.pool.alive == 2)
        after = set(h.pool.child_pids())
        assert len(after) == 2
        assert after != before
        assert len(after & before) == 1  # the survivor's child kept running
        assert result_of(await h.run(job("add", 2, 2))) == 4


async def test_hard_time_limit_kills_and_replaces_the_child() -> None:
    async with running_pool(size=1) as h:
        (old_pid,) = h.pool.child_pids()
        started = time.monotonic()
        outcome = await h.run(job("sleep_forever"))
        elapsed = time.monotonic() - started
        assert outcome.kind is OutcomeKind.TIMEOUT
        assert outcome.error_type == "TimeLimitExceeded"
        assert "0.5s" in outcome.error_message
        assert 0.5 <= elapsed < 1.5
        assert h.restarts == [RestartReason.TIMEOUT]
        await eventually(lambda: h.pool.alive == 1)
        assert h.pool.child_pids() != [old_pid]
        assert gone_or_zombie(old_pid)
        assert result_of(await h.run(job("add", 1, 2))) == 3


async def test_pool_default_time_limit_applies_to_tasks_without_one() -> None:
    async with running_pool(time_limit=0.5) as h:
        started = time.monotonic()
        outcome = await h.run(job("sleep_then", 60, "late"))
        assert outcome.kind is OutcomeKind.TIMEOUT
        assert time.monotonic() - started < 1.5


async def test_hard_time_limit_kills_c_code() -> None:
    async with running_pool(size=1) as h:
        started = time.monotonic()
        outcome = await h.run(job("pbkdf2_forever"))
        assert outcome.kind is OutcomeKind.TIMEOUT
        assert 1.0 <= time.monotonic() - started < 2.0
        await eventually(lambda: h.pool.alive == 1)


async def test_soft_time_limit_lets_the_task_clean_up() -> None:
    async with running_pool(size=1) as h:
        started = time.monotonic()
        outcome = await h.run(job("soft_limited"))
        assert result_of(outcome) == "cleaned"
        assert time.monotonic() - started < 2.0
        assert h.restarts == []
        # The alarm is disarmed afterwards: a later job in the same child is not interrupted.
        assert result_of(await h.run(job("sleep_then", 0.5, "calm"))) == "calm"


# -- output, memory, recycling ---------------------------------------------------------------------


async def test_stdout_from_a_task_does_not_corrupt_the_pipe() -> None:
    async with running_pool(size=1) as h:
        pids = h.pool.child_pids()
        assert result_of(await h.run(job("chatty", 5000))) == 5000
        assert result_of(await h.run(job("add", 20, 22))) == 42
        assert h.pool.child_pids() == pids
        assert h.restarts == []


async def test_memory_limit_gives_memory_error_and_the_child_survives() -> None:
    async with running_pool(size=1, memory_limit=256 * MiB) as h:
        pids = h.pool.child_pids()
        outcome = await h.run(job("allocate", 1 << 30))
        assert outcome.kind is OutcomeKind.ERROR
        assert outcome.error_type == "MemoryError"
        assert result_of(await h.run(job("allocate", 16 * MiB))) == 16 * MiB
        assert result_of(await h.run(job("add", 1, 2))) == 3
        assert h.pool.child_pids() == pids
        assert h.restarts == []


async def test_max_tasks_per_child_recycles() -> None:
    async with running_pool(size=1, max_tasks_per_child=2) as h:
        jobs = [job("pid") for _ in range(3)]
        h.submit(*jobs)
        first, second, third = (result_of(o) for o in await h.wait(*jobs))
        assert first == second
        assert third != first
        assert h.restarts == [RestartReason.RECYCLE_TASKS]
        assert gone_or_zombie(first)
        await eventually(lambda: h.pool.alive == 1)


async def test_max_memory_per_child_recycles() -> None:
    async with running_pool(size=1, max_memory_per_child=32 * MiB) as h:
        first = await h.run(job("hold", MiB))  # sets the baseline
        assert result_of(first) == MiB
        (pid,) = h.pool.child_pids()
        assert result_of(await h.run(job("hold", 64 * MiB))) == 65 * MiB
        await eventually(lambda: h.restarts == [RestartReason.RECYCLE_MEMORY])
        await eventually(lambda: h.pool.alive == 1 and h.pool.child_pids() != [pid])
        assert result_of(await h.run(job("hold", 1))) == 1  # a fresh child holds nothing


# -- pipelining ------------------------------------------------------------------------------------


def held(pool: Pool) -> list[int]:
    """How many jobs each child holds (running plus queued), largest first."""
    return sorted((len(c.jobs) for c in pool._children), reverse=True)


def seed_mean(pool: Pool, name: str, seconds: float = 0.001) -> None:
    """Make the pool believe ``name`` usually takes ``seconds``, so pipelining is decided now."""
    pool.pipelining.means[f"{TASKS}.{name}"] = seconds


def spy_depths(pool: Pool) -> list[int]:
    """Record, for every job sent, how many jobs its child held right after."""
    depths: list[int] = []
    write = pool._write

    def spying(child: Any, jobs: list[Job]) -> None:
        write(child, jobs)
        depths.append(len(child.jobs))

    pool._write = spying  # type: ignore[method-assign]
    return depths


async def settle_down(h: Harness) -> None:
    """Give a late (wrong) second report time to arrive, then check there was none."""
    await asyncio.sleep(0.3)
    assert h.done.empty(), "a job was reported twice"


async def test_short_tasks_are_pipelined() -> None:
    async with running_pool(size=2) as h:
        depths = spy_depths(h.pool)
        jobs = [job("add", i, 1) for i in range(200)]
        h.submit(*jobs)
        await asyncio.sleep(0)  # busy children are topped up once per loop turn
        assert held(h.pool) == [1, 1]  # nothing measured yet: one each
        outcomes = await h.wait(*jobs)
        assert [result_of(o) for o in outcomes] == [i + 1 for i in range(200)]
        assert h.pool.pipelining.means[f"{TASKS}.add"] < PIPELINE_BELOW
        assert max(depths) >= 2, "no job was ever queued behind a short one"
        assert max(depths) <= MAX_JOBS_PER_CHILD
        assert h.pool.in_flight == 0


async def test_idle_children_come_first_and_counts_stay_truthful() -> None:
    async with running_pool(size=2) as h:
        seed_mean(h.pool, "sleep_then")
        jobs = [job("sleep_then", 0.2, i) for i in range(5)]
        h.submit(jobs[0], jobs[1])
        await asyncio.sleep(0)  # busy children are topped up once per loop turn
        assert held(h.pool) == [1, 1]  # both children busy before either gets a second job
        h.submit(*jobs[2:])
        await asyncio.sleep(0)  # busy children are topped up once per loop turn
        assert held(h.pool) == [2, 2]  # then one queued each, at most
        assert (h.pool.running, h.pool.waiting, h.pool.in_flight) == (2, 3, 5)
        outcomes = await h.wait(*jobs)
        assert [result_of(o) for o in outcomes] == [0, 1, 2, 3, 4]
        assert (h.pool.running, h.pool.waiting, h.pool.in_flight) == (0, 0, 0)


async def test_nothing_is_queued_behind_a_long_task() -> None:
    async with running_pool(size=2) as h:
        depths = spy_depths(h.pool)
        assert result_of(await h.run(job("sleep_then", 0.1, "learn"))) == "learn"
        assert h.pool.pipelining.means[f"{TASKS}.sleep_then"] >= PIPELINE_BELOW
        one = job("sleep_then", 0.3, 1)
        h.submit(one)
        await asyncio.sleep(0)  # busy children are topped up once per loop turn
        await asyncio.sleep(0.05)
        h.submit(job("add", 1, 1))  # goes to the idle child, not behind `one`
        await asyncio.sleep(0)  # busy children are topped up once per loop turn
        assert held(h.pool) == [1, 1]
        jobs = [job("sleep_then", 0.1, i) for i in range(6)]
        h.submit(*jobs)
        await asyncio.sleep(0)  # busy children are topped up once per loop turn
        assert held(h.pool)[0] == 1
        assert h.pool.waiting == 6
        await h.wait(one, *jobs)
        assert set(depths) == {1}, "a job was queued behind a long task"


async def test_killed_child_blames_only_its_running_job() -> None:
    async with running_pool(size=1) as h:
        seed_mean(h.pool, "sleep_then")
        (old_pid,) = h.pool.child_pids()
        head = job("sleep_then", 30, "head", message_id="head")
        queued = job("pid", message_id="queued")
        h.submit(head, queued)
        await asyncio.sleep(0)  # busy children are topped up once per loop turn
        assert held(h.pool) == [2]
        first_id = queued.id
        await asyncio.sleep(0.2)  # the child is inside `head`
        os.kill(old_pid, signal.SIGKILL)
        crashed, ran = await h.wait(head, queued)
        assert crashed.kind is OutcomeKind.CRASHED
        assert crashed.error_type == "ChildDied"
        assert result_of(ran) != old_pid  # ran on the replacement, and was reported once
        assert queued.id != first_id
        assert h.order == [head, queued]
        assert h.restarts == [RestartReason.CRASH]
        await settle_down(h)


async def test_timed_out_child_blames_only_its_running_job() -> None:
    async with running_pool(size=1) as h:
        seed_mean(h.pool, "sleep_forever")
        head = job("sleep_forever", message_id="head")
        queued = job("add", 2, 3, message_id="queued")
        h.submit(head, queued)
        await asyncio.sleep(0)  # busy children are topped up once per loop turn
        assert held(h.pool) == [2]
        timed_out, ran = await h.wait(head, queued)
        assert timed_out.kind is OutcomeKind.TIMEOUT
        assert result_of(ran) == 5
        assert h.restarts == [RestartReason.TIMEOUT]
        # A timeout counts as a long run: nothing is queued behind that task any more.
        assert h.pool.pipelining.means[f"{TASKS}.sleep_forever"] >= PIPELINE_BELOW
        await settle_down(h)


async def test_queued_job_time_limit_starts_when_it_runs() -> None:
    # Each job takes 0.5s, under the 0.8s limit; both together take 1s, over it.
    async with running_pool(size=1, time_limit=0.8) as h:
        seed_mean(h.pool, "sleep_then")
        first = job("sleep_then", 0.5, "first")
        second = job("sleep_then", 0.5, "second")
        h.submit(first, second)
        await asyncio.sleep(0)  # busy children are topped up once per loop turn
        assert held(h.pool) == [2]
        assert second.started == 0.0  # queued, not running: no clock yet
        outcomes = await h.wait(first, second)
        assert [result_of(o) for o in outcomes] == ["first", "second"]
        assert second.started - first.started >= 0.45
        assert h.restarts == []


async def test_abort_with_a_doomed_queued_job() -> None:
    async with running_pool(size=1) as h:
        seed_mean(h.pool, "sleep_then")
        head = job("sleep_then", 0.5, "head", message_id="keep")
        queued = job("add", 1, 1, message_id="doomed")
        pending_doomed = job("add", 2, 2, message_id="doomed")
        pending_kept = job("add", 3, 3, message_id="keep")
        h.submit(head, queued, pending_doomed, pending_kept)
        await asyncio.sleep(0)  # busy children are topped up once per loop turn
        assert held(h.pool) == [2]
        await asyncio.sleep(0.1)
        h.pool.abort(lambda j: j.message_id == "doomed")
        reported, outcome = h.done.get_nowait()  # dropped from the local queue at once
        assert reported is pending_doomed
        assert outcome.kind is OutcomeKind.RETURNED
        ran, returned, kept = await h.wait(head, queued, pending_kept)
        assert returned.kind is OutcomeKind.RETURNED
        assert result_of(ran) == "head"  # cut short by the kill, so it ran again elsewhere
        assert result_of(kept) == 6
        assert h.restarts == [RestartReason.ABORT]
        await settle_down(h)


async def test_abort_after_a_time_limit_still_blames_the_timeout() -> None:
    async with running_pool(size=1) as h:
        seed_mean(h.pool, "sleep_then")
        head = job("sleep_then", 30, "late", message_id="keep")
        queued = job("add", 1, 1, message_id="doomed")
        h.submit(head, queued)
        await asyncio.sleep(0)  # busy children are topped up once per loop turn
        (child,) = h.pool._children
        # The limit passes and, before the child's exit is seen, the queued job is abandoned.
        h.pool._on_time_limit(child, head)
        h.pool.abort(lambda j: j.message_id == "doomed")
        timed_out, returned = await h.wait(head, queued)
        assert timed_out.kind is OutcomeKind.TIMEOUT
        assert returned.kind is OutcomeKind.RETURNED
        assert h.restarts == [RestartReason.TIMEOUT]
        await settle_down(h)


async def test_abort_running_returns_queued_jobs_too() -> None:
    async with running_pool(size=1) as h:
        seed_mean(h.pool, "sleep_then")
        head = job("sleep_then", 30, "never")
        queued = job("add", 1, 2)
        h.submit(head, queued)
        await asyncio.sleep(0)  # busy children are topped up once per loop turn
        assert h.pool.take_pending() == []  # queued in the child, not in the local queue
        h.pool.abort_running()
        outcomes = await h.wait(head, queued, timeout=5)
        assert [o.kind for o in outcomes] == [OutcomeKind.RETURNED] * 2
        assert h.pool.in_flight == 0


async def test_max_tasks_per_child_is_exact_with_pipelining() -> None:
    async with running_pool(size=1, max_tasks_per_child=2) as h:
        seed_mean(h.pool, "pid")
        jobs = [job("pid") for _ in range(3)]
        h.submit(*jobs)
        await asyncio.sleep(0)  # busy children are topped up once per loop turn
        assert held(h.pool) == [2]
        first, second, third = (result_of(o) for o in await h.wait(*jobs))
        assert first == second != third
        assert h.restarts == [RestartReason.RECYCLE_TASKS]


# -- start, drain, close ---------------------------------------------------------------------------


async def test_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Pool(
            [TASKS],
            size=0,
            on_done=lambda j, o: None,
            time_limit=1,
            max_depth=32,
            max_result_size=MiB,
        )


async def test_start_fails_when_task_module_does_not_import() -> None:
    pool = Pool(
        ["no_such_module_xyz"],
        size=2,
        on_done=lambda j, o: None,
        time_limit=1,
        max_depth=32,
        max_result_size=MiB,
    )
    try:
        with pytest.raises(PoolStartError, match="no_such_module_xyz"):
            await pool.start()
        assert pool.alive == 0
    finally:
        await pool.close()


@pytest.mark.parametrize("at_once", [None, 1])
async def test_launch_fails_when_task_module_does_not_import(at_once: int | None) -> None:
    pool = Pool(
        ["no_such_module_xyz"],
        size=2,
        on_done=lambda j, o: None,
        time_limit=1,
        max_depth=32,
        max_result_size=MiB,
    )
    try:
        with pytest.raises(PoolStartError, match="no_such_module_xyz"):
            await pool.launch(at_once=at_once)
        assert pool.alive == 0
        assert pool.child_pids() == []
    finally:
        await pool.close()


def _launch_harness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> tuple[Harness, Pool]:
    monkeypatch.setenv("HUTCH_TEST_LAUNCH_LOCK", str(tmp_path / "launch.lock"))
    monkeypatch.setenv("HUTCH_TEST_LAUNCH_MODE", mode)
    harness = Harness((TASKS, "tests.launch_tasks"), size=2)
    return harness, harness.pool


async def test_launch_is_done_when_the_first_child_is_up_and_the_rest_join(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker consumes once one child can run a job; the slower one joins later."""
    h, pool = _launch_harness(tmp_path, monkeypatch, "slow")
    try:
        await pool.launch()
        assert pool.alive == 1
        assert result_of(await h.run(job("add", 2, 3))) == 5
        assert pool.alive == 1  # the other is still booting (1.5 s)
        await eventually(lambda: pool.alive == 2)
        assert h.restarts == []
    finally:
        await pool.close()


async def test_a_child_that_fails_to_boot_after_another_is_up_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, pool = _launch_harness(tmp_path, monkeypatch, "fail-once")
    try:
        await pool.launch()
        assert result_of(await h.run(job("add", 1, 1))) == 2
        await eventually(lambda: pool.alive == 2)
        assert (tmp_path / "launch.failed").exists()  # the failure did happen
        assert pool.respawn_failures == 0
        assert h.restarts == []  # a child that never ran is not a restart
    finally:
        await pool.close()


@pytest.mark.parametrize(("at_once", "saw"), [(1, "yes"), (None, "no")])
async def test_launch_at_once_holds_the_rest_until_the_first_is_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, at_once: int | None, saw: str
) -> None:
    """With ``at_once=1`` the second child is spawned only once the first (1 s to boot) is
    ready, so it finds the first's marker; spawned together (the default), it boots first."""
    h, pool = _launch_harness(tmp_path, monkeypatch, "first-slow")
    try:
        await pool.launch(at_once=at_once)
        assert result_of(await h.run(job("add", 2, 2))) == 4
        await eventually(lambda: pool.alive == 2)
        assert (tmp_path / "launch.saw").read_text() == saw + "\n"
        assert h.restarts == []
    finally:
        await pool.close()


async def test_close_while_children_boot_leaves_none_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, pool = _launch_harness(tmp_path, monkeypatch, "slow")
    await pool.launch()
    pids = pool.child_pids()
    booting = {
        int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_child_of_us(p)
    } - set(pids)
    await pool.close()
    assert booting, "the slow child should still have been booting"
    await eventually(lambda: all(gone_or_zombie(pid) for pid in booting | set(pids)))


def _is_child_of_us(proc: Path) -> bool:
    try:
        stat = (proc / "stat").read_text()
        cmdline = (proc / "cmdline").read_bytes()
    except OSError:
        return False
    parent = int(stat.rsplit(")", 1)[1].split()[1])
    return parent == os.getpid() and b"service.pool.child" in cmdline


async def test_take_pending_and_abort_running() -> None:
    async with running_pool(size=1) as h:
        running = job("sleep_then", 30, "never")
        waiting = job("add", 1, 2)
        h.submit(running, waiting)
        await asyncio.sleep(0)  # busy children are topped up once per loop turn
        assert h.pool.take_pending() == [waiting]
        assert h.pool.in_flight == 1
        h.pool.abort_running()
        (outcome,) = await h.wait(running, timeout=5)
        assert outcome.kind is OutcomeKind.RETURNED
        assert id(waiting) not in h.outcomes


async def test_children_import_no_amqp_client_and_no_metrics() -> None:
    """A child imports what it runs (``python -m service.pool.child`` is ``__main__`` there, and
    the task module does ``import service``), never the AMQP client or prometheus-client the
    parent uses. A module added to this list is a module every child pays for at start-up."""
    heavy = ["aio_pika", "aiormq", "pamqp", "prometheus_client", "uvloop"]
    async with running_pool(size=1) as h:
        assert result_of(await h.run(job("loaded_modules", heavy))) == []
        assert result_of(await h.run(job("loaded_modules", ["service."]))) == [
            "service.context",
            "service.continuation",
            "service.errors",
            "service.flow",
            "service.pool",
            "service.pool.blobs",
            "service.pool.jobs",
            "service.pool.pipe",
            "service.protocol",
            "service.registry",
            "service.routing",
            "service.schedules",
            "service.store",
            "service.store.errors",
            "service.store.refs",
        ]


async def test_close_stops_every_child() -> None:
    h = Harness(size=2)
    await h.pool.start()
    try:
        pids = h.pool.child_pids()
        assert result_of(await h.run(job("add", 1, 2))) == 3
    finally:
        await h.pool.close()
    assert h.pool.alive == 0
    assert all(gone_or_zombie(pid) for pid in pids)
    assert h.restarts == []


ORPHAN_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    sys.path.insert(0, sys.argv[1])
    import tests.pool_tasks
    from service import protocol, registry
    from service.pool.jobs import Job
    from service.pool.supervisor import Pool

    async def main():
        pool = Pool(["tests.pool_tasks"], size=2, on_done=lambda j, o: None,
                    time_limit=120, max_depth=32, max_result_size=1 << 20)
        await pool.start()
        pool.submit(Job(spec=registry.lookup("tests.pool_tasks.sleep_then"),
                        content_type=protocol.MSGPACK,
                        body=protocol.encode_request(protocol.MSGPACK, [120, "x"], {}),
                        message_id="busy", attempt=1, deliveries=0, redelivered=False,
                        want_result=True, delivery=None))
        print(*pool.child_pids(), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


async def test_children_die_with_their_parent(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(ORPHAN_SCRIPT)
    parent = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(REPO), cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), 30)
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2
        for pid in pids:
            assert b"service.pool.child" in Path(f"/proc/{pid}/cmdline").read_bytes()
            assert not gone_or_zombie(pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            parent.send_signal(signal.SIGKILL)
        await parent.wait()
    deadline = time.monotonic() + 3
    while not all(gone_or_zombie(pid) for pid in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    survivors = [pid for pid in pids if not gone_or_zombie(pid)]
    for pid in survivors:  # do not leave them behind if the test fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert survivors == [], "pool children outlived their SIGKILLed parent"


async def test_sub_millisecond_tasks_queue_deeper_in_one_write() -> None:
    """Within the time budget a child holds up to 8 jobs, sent in one write."""
    async with running_pool(size=1) as h:
        seed_mean(h.pool, "add", 0.0001)
        writes: list[int] = []
        write = h.pool._write

        def spying(child: Any, jobs: list[Job]) -> None:
            write(child, jobs)
            writes.append(len(jobs))

        h.pool._write = spying  # type: ignore[method-assign]
        jobs = [job("add", i, 1) for i in range(40)]
        h.submit(*jobs)
        await asyncio.sleep(0)
        assert held(h.pool) == [MAX_JOBS_PER_CHILD]
        assert writes == [MAX_JOBS_PER_CHILD]  # one write per child per loop turn
        outcomes = await h.wait(*jobs)
        assert [result_of(o) for o in outcomes] == [i + 1 for i in range(40)]


async def test_queue_depth_follows_the_budget() -> None:
    """1 ms tasks: two queued make the 2 ms budget, so a child holds 2 at most."""
    async with running_pool(size=1) as h:
        seed_mean(h.pool, "add", 0.001)
        h.submit(*[job("add", i, 1) for i in range(10)])
        await asyncio.sleep(0)
        assert held(h.pool) == [2]
