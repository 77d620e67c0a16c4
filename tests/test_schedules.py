"""Periodic tasks: slots (pure), one leader across workers, no slot missed or doubled across
kills of the leader, catch-up after every worker was down, ``hutch schedule ls``."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from service import ConfigError, every, protocol, task
from service.scheduler import HANDOVER_WITHIN, Baton, Scheduler, fire_id, scheduler_queue
from service.schedules import Catchup, Schedule
from tests.cli_helpers import hutch
from tests.conftest import ROOT, Broker, Vhost, WorkerProcess, executions, until

EVERY_TWO = "tests.scheduled_tasks.every_two_seconds"
BERLIN = "Europe/Berlin"


def utc_ms(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp() * 1000)


def utc(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%dT%H:%M")


# -- slots ----------------------------------------------------------------------------------------


def test_intervals_are_aligned_to_the_epoch() -> None:
    s = Schedule("t", every(seconds=2))
    assert s.due(0, 10_000) == [2000, 4000, 6000, 8000, 10000]
    assert s.due(10_000, 10_000) == []
    assert s.next_after(10_001) == 12000
    assert s.due(0, 10**13, limit=3) == [10**13 - 4000, 10**13 - 2000, 10**13]


def test_cron_in_utc_and_a_long_outage_is_cheap() -> None:
    s = Schedule("t", "*/15 * * * *")
    assert [utc(m) for m in s.due(utc_ms(2026, 1, 1), utc_ms(2026, 1, 1, 1))] == [
        "2026-01-01T00:15", "2026-01-01T00:30", "2026-01-01T00:45", "2026-01-01T01:00",
    ]  # fmt: skip
    started = time.monotonic()
    assert len(Schedule("t", "* * * * *").due(0, utc_ms(2026, 1, 1))) == 1000  # the last 1000
    assert time.monotonic() - started < 1


def test_daily_schedule_across_dst() -> None:
    s = Schedule("t", "30 2 * * *", tz=BERLIN)
    # Fall back (2026-10-25): 02:30 happens twice in Berlin; the schedule fires once.
    autumn = s.due(utc_ms(2026, 10, 24), utc_ms(2026, 10, 27))
    assert [utc(m) for m in autumn] == ["2026-10-24T00:30", "2026-10-25T00:30", "2026-10-26T01:30"]
    # Spring forward (2026-03-29): 02:30 does not exist; it fires at 03:00 local (01:00 UTC).
    spring = s.due(utc_ms(2026, 3, 28), utc_ms(2026, 3, 31))
    assert [utc(m) for m in spring] == ["2026-03-28T01:30", "2026-03-29T01:00", "2026-03-30T00:30"]


def test_catchup_policies_apply_only_after_an_outage() -> None:
    last, now = 0, 10_000
    for policy, after_outage in [
        (Catchup.LATEST, [10_000]),
        (Catchup.ALL, [2000, 4000, 6000, 8000, 10_000]),
        (Catchup.NONE, []),
    ]:
        s = Schedule("t", every(seconds=2), catchup=policy, catchup_max=100)
        assert s.to_fire(last, now, outage=False) == [2000, 4000, 6000, 8000, 10_000]
        assert s.to_fire(last, now, outage=True) == after_outage
    capped = Schedule("t", every(seconds=2), catchup=Catchup.ALL, catchup_max=2)
    assert capped.to_fire(last, now, outage=True) == [8000, 10_000]


def test_weekday_period_follows_the_week() -> None:
    s = Schedule("t", "0 8 * * 1-5")
    friday = utc_ms(2026, 12, 4, 8)
    assert s.next_after(friday) - friday == 3 * 86400 * 1000  # to Monday


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"schedule": "61 * * * *"}, "is not a cron expression"),
        ({"schedule": "* * * *"}, "5-field"),
        ({"schedule": "* * * * *", "schedule_tz": "Mars/Olympus"}, "not an IANA time zone"),
        ({"schedule": "* * * * *", "schedule_catchup": "some"}, "schedule_catchup must be"),
        ({"schedule_args": [1]}, "need a schedule"),
    ],
)
def test_bad_schedules_name_the_task(options: dict[str, Any], problem: str) -> None:
    name = f"tests.bad_schedule_{abs(hash(problem))}"
    with pytest.raises(ConfigError, match=f"task {name}: .*{problem}"):
        task(name=name, **options)(lambda: None)


def test_every_refuses_nonsense() -> None:
    for bad in (0, -5, 0.5, float("nan")):
        with pytest.raises(ValueError, match="interval"):
            every(seconds=bad)


def test_batons_merge_by_the_later_slot() -> None:
    a = Baton({"x": 10, "y": 5}, 100, "a")
    b = Baton({"y": 7, "z": 1}, 50, "b")
    assert a.merged(b).last == {"x": 10, "y": 7, "z": 1}
    assert a.merged(b).updated_at == 100
    assert Baton.from_body(b"not json").last == {}
    assert Baton.from_body(a.to_body()) == a


# -- a bad schedule stops the worker at once ------------------------------------------------------


def test_worker_with_a_bad_schedule_exits_2_naming_the_task(tmp_path: Path) -> None:
    (tmp_path / "badsched.py").write_text(
        "from service import task\n\n@task(schedule='every five minutes')\ndef report(): pass\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "worker", "--tasks", "badsched"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "HUTCH_METRICS_ADDR": "off"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hutch: error: task badsched.report: "), lines
    assert "5-field cron expression" in lines[0]


# -- one leader, every slot once, across kills ----------------------------------------------------


def scrape(worker: WorkerProcess) -> str:
    try:
        with urllib.request.urlopen(worker.metrics_url() + "/metrics", timeout=3) as response:
            return str(response.read().decode())
    except OSError:
        return ""


def is_leader(worker: WorkerProcess, queue: str) -> bool:
    return f'hutch_schedule_leader{{queue="{queue}"}} 1.0' in scrape(worker)


def fires(log: Path, name: str = EVERY_TWO) -> Counter[int]:
    """Slot (ms) -> how many times a fire of it ran."""
    return Counter(
        round(r["slot"] * 1000)
        for r in executions(log)
        if r["event"] == "done" and r["task"] == name and r["slot"] is not None
    )


async def schedule_soak(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path, *,
    seconds: float, kills: int, stop_one: float = 0.0, restart_all: bool = False,
) -> None:  # fmt: skip
    env = {"HUTCH_TASKS": "tests.tasks,tests.scheduled_tasks", "HUTCH_CONCURRENCY": "1"}
    workers = [await start_worker(**env) for _ in range(3)]
    begin = time.time()
    assert await until(lambda: sum(is_leader(w, queue) for w in workers) == 1, 15)
    killed = 0
    stopped = False
    end = begin + seconds
    while time.time() < end:
        if killed < kills and time.time() > begin + (killed + 1) * seconds / (kills + 2):
            (leader,) = [w for w in workers if is_leader(w, queue)]
            # Right at a fire instant: the even second, plus a few ms into the fire.
            await asyncio.sleep(2 - time.time() % 2 + 0.003)
            leader.killpg(signal.SIGKILL)
            workers[workers.index(leader)] = await start_worker(**env)
            killed += 1
            assert await until(lambda: sum(is_leader(w, queue) for w in workers) == 1, 30)
        elif stop_one and not stopped and time.time() > begin + seconds / 2:
            victim = next(w for w in workers if is_leader(w, queue))
            os.killpg(victim.pid, signal.SIGSTOP)
            await asyncio.sleep(stop_one)
            os.killpg(victim.pid, signal.SIGCONT)
            stopped = True
        await asyncio.sleep(0.2)
    if restart_all:
        for w in workers:
            w.stop()
        await asyncio.sleep(3)
        workers = [await start_worker(**env) for _ in range(3)]
        await asyncio.sleep(10)
    for w in workers:
        w.stop()
    got = fires(exec_log)
    first = min(got)
    last_checked = int((time.time() - 6) // 2 * 2 * 1000)
    expected = set(range(first, last_checked + 1, 2000))
    missing = sorted(expected - set(got))
    duplicated = {slot: n for slot, n in got.items() if n > 1}
    runs = [r for r in executions(exec_log) if r["task"] == EVERY_TWO and r["event"] == "done"]
    print(
        f"schedules: slots expected {len(expected)}, fired {len(got)}, missing {len(missing)}, "
        f"duplicated {len(duplicated)} (kills {killed}); minute slots "
        f"{dict(fires(exec_log, 'tests.scheduled_tasks.every_minute'))}"
    )  # shown with pytest -s
    assert missing == []
    assert len(duplicated) <= killed, duplicated
    # Every copy of a slot's fire, duplicates included, carries the slot's one id.
    assert all(r["id"] == fire_id(EVERY_TWO, round(r["slot"] * 1000)) for r in runs)


async def test_one_fire_per_slot_across_leader_kills(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    await schedule_soak(vhost, queue, broker, start_worker, exec_log, seconds=30, kills=2)


@pytest.mark.slow
async def test_one_fire_per_slot_soak(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    await schedule_soak(
        vhost, queue, broker, start_worker, exec_log,
        seconds=190, kills=5, stop_one=30, restart_all=True,
    )  # fmt: skip


# -- catch-up after every worker was down ---------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "fired"), [("latest", 1), ("all", 5), ("none", 0)], ids=["latest", "all", "none"]
)
async def test_catchup_after_an_outage_follows_the_policy(
    vhost: Vhost, queue: str, broker: Broker, policy: str, fired: int
) -> None:
    """A baton last renewed long ago (every worker was down): the policy decides the missed."""
    name = f"tests.catchup_{policy}"
    schedule = Schedule(name, every(seconds=60), catchup=Catchup(policy))
    now = int(time.time() * 1000)
    current = now // 60_000 * 60_000
    old = current - 5 * 60_000  # five slots missed
    connection = await aio_pika.connect(vhost.url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        from service import scheduler as scheduler_module

        await scheduler_module.declare(channel, queue)
        baton = Baton({name: old}, now - int(HANDOVER_WITHIN * 1000) - 60_000, "gone")
        await channel.default_exchange.publish(
            aio_pika.Message(baton.to_body(), headers={"x-hutch-scheduler": "baton"}),
            scheduler_queue(queue),
        )
        leader = Scheduler(vhost.url, queue, [schedule])
        running = asyncio.create_task(leader.run())
        try:
            assert await until(lambda: leader.leading, 10)
            await asyncio.sleep(1)
        finally:
            leader.close()
            await running
        got = await broker.drain(queue)
        every_slot = sorted(m.headers[protocol.SLOT_HEADER] for m in got)
        # The test may run across a minute boundary: that next slot is an ordinary fire, not
        # a catch-up, and at most one of them fits in these seconds.
        slots = [slot for slot in every_slot if slot <= current]
        assert every_slot[len(slots) :] in ([], [current + 60_000]), every_slot
        assert len(slots) == fired, every_slot
        if fired:
            assert slots[-1] == current
            assert all(m.message_id == fire_id(name, m.headers[protocol.SLOT_HEADER]) for m in got)
    finally:
        await connection.close()


async def test_a_short_gap_is_a_handover_every_slot_fires(
    vhost: Vhost, queue: str, broker: Broker
) -> None:
    name = "tests.handover"
    schedule = Schedule(name, every(seconds=1), catchup=Catchup.NONE)
    now = int(time.time() * 1000)
    connection = await aio_pika.connect(vhost.url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        from service import scheduler as scheduler_module

        await scheduler_module.declare(channel, queue)
        baton = Baton({name: now // 1000 * 1000 - 5000}, now - 5000, "gone")  # 5 s ago
        await channel.default_exchange.publish(
            aio_pika.Message(baton.to_body(), headers={"x-hutch-scheduler": "baton"}),
            scheduler_queue(queue),
        )
        leader = Scheduler(vhost.url, queue, [schedule])
        running = asyncio.create_task(leader.run())
        try:
            assert await until(lambda: leader.leading, 10)
            await asyncio.sleep(0.5)
        finally:
            leader.close()
            await running
        slots = [m.headers[protocol.SLOT_HEADER] for m in await broker.drain(queue)]
        assert len(slots) >= 5 and len(set(slots)) == len(slots), slots  # none skipped, none twice
    finally:
        await connection.close()


# -- hutch schedule ls ----------------------------------------------------------------------------


async def test_schedule_ls_shows_each_schedule_and_its_leader(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    await start_worker(HUTCH_TASKS="tests.tasks,tests.scheduled_tasks")
    assert await until(lambda: len(fires(exec_log)) >= 1, 15)
    run = await hutch(vhost, "schedule", "ls", "--queue", queue, "--json")
    assert run.code == 0, run
    rows = {row["task"]: row for row in run.json_lines()}
    assert set(rows) == {EVERY_TWO, "tests.scheduled_tasks.every_minute"}
    two = rows[EVERY_TWO]
    assert two["expression"] == "every 2s" and two["tz"] == "UTC" and two["queue"] == queue
    assert two["leader"].endswith(f"pid {two['leader'].split()[-1]}")
    assert two["next_fire"] > two["last_fire"]
    text = await hutch(vhost, "schedule", "ls", "--queue", queue)
    assert text.code == 0 and EVERY_TWO in text.out and "every 2s" in text.out, text
