"""Faults against the real broker, each judged by the checker: lost = 0, unexpected = 0,
duplicates only for tasks that were in flight when the fault hit."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from service import AsyncClient, TaskError, protocol
from tests.conftest import (
    Broker,
    Vhost,
    WorkerProcess,
    alive,
    check,
    executions,
    rabbitmqctl,
    until,
)


def started(log: Path, task_id: str | None = None) -> list[dict[str, Any]]:
    return [
        r
        for r in executions(log)
        if r["event"] == "start" and (task_id is None or r["id"] == task_id)
    ]


def done_ids(log: Path) -> set[str]:
    return {r["id"] for r in executions(log) if r["event"] == "done"}


async def publish_work(broker: Broker, queue: str, n: int, seconds: float) -> list[str]:
    return [await broker.publish(queue, "tests.tasks.work", seconds) for _ in range(n)]


async def wait_all_done(log: Path, ids: list[str], timeout: float) -> None:
    assert await until(lambda: set(ids) <= done_ids(log), timeout, 0.1), (
        f"not done: {set(ids) - done_ids(log)}"
    )


def running_ids(log: Path) -> set[str]:
    return {r["id"] for r in started(log)} - done_ids(log)


async def test_child_sigkill_blames_only_its_task(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    worker = await start_worker()
    victim, bystander = await publish_work(broker, queue, 2, 3)
    assert await until(lambda: len(started(exec_log)) == 2, 10)
    before = worker.children()
    victim_pid = started(exec_log, victim)[0]["pid"]
    bystander_pid = started(exec_log, bystander)[0]["pid"]
    assert victim_pid in before
    os.kill(victim_pid, signal.SIGKILL)
    await wait_all_done(exec_log, [victim, bystander], 20)

    victim_runs = started(exec_log, victim)
    assert len(victim_runs) == 2
    assert victim_runs[1]["deliveries"] == 1  # counted by the broker
    assert victim_runs[1]["redelivered"] is True
    bystander_runs = started(exec_log, bystander)
    assert len(bystander_runs) == 1 and bystander_runs[0]["pid"] == bystander_pid
    # The dead child was replaced; the other kept running throughout.
    assert await until(lambda: len(worker.children()) == 2, 5)
    after = worker.children()
    assert victim_pid not in after and bystander_pid in after
    report = check({victim, bystander}, exec_log)
    print(f"checker: {report}")  # shown with pytest -s
    assert (report.lost, report.duplicated, report.unexpected) == (set(), {}, set()), report


async def test_poison_message_reaches_dlq_after_bounded_deliveries(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    worker = await start_worker()
    ok = await publish_work(broker, queue, 3, 0)
    poison = await broker.publish(queue, "tests.tasks.kill_own_child")
    dead = await broker.wait_for(f"{queue}.dlq", 1, 60)
    assert len(dead) == 1, worker.log()
    assert dead[0].message_id == poison
    assert dead[0].headers[protocol.REASON_HEADER] == "delivery_limit"
    runs = started(exec_log, poison)
    assert [r["deliveries"] for r in runs] == [0, 1, 2, 3, 4]  # --max-deliveries 5
    await wait_all_done(exec_log, ok, 10)
    report = check(set(ok) | {poison}, exec_log, {poison})
    print(f"checker: {report}")  # shown with pytest -s
    assert (report.lost, report.unexpected) == (set(), set()), report
    assert await until(lambda: len(worker.children()) == 2, 5)


async def test_hard_time_limit_kills_and_counts_a_failed_attempt(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    worker = await start_worker()
    sleeper = await broker.publish(queue, "tests.tasks.sleep_forever")  # limit 1 s, 2 attempts
    spinner = await broker.publish(queue, "tests.tasks.spin_in_c")  # limit 1 s, inside C code
    t0 = time.monotonic()
    dead = await broker.wait_for(f"{queue}.dlq", 2, 30)
    elapsed = time.monotonic() - t0
    assert {m.message_id for m in dead} == {sleeper, spinner}, worker.log()
    for message in dead:
        assert message.headers[protocol.REASON_HEADER] == "timeout"
        assert message.headers[protocol.ERROR_TYPE_HEADER] == "TimeLimitExceeded"
    assert [r["attempt"] for r in started(exec_log, sleeper)] == [1, 2]
    assert len(started(exec_log, spinner)) == 1
    assert elapsed < 15  # 2**31 pbkdf2 rounds take many minutes: it was killed
    assert await until(lambda: len(worker.children()) == 2, 5)
    async with AsyncClient(vhost.url, queue=queue, timeout=20) as client:
        assert await client.call("tests.tasks.add", 2, 2) == 4


async def test_soft_time_limit_lets_the_task_clean_up(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    await start_worker()
    async with AsyncClient(vhost.url, queue=queue, timeout=20) as client:
        assert await client.call("tests.tasks.soft_limited") == "cleaned up"
    assert [r["event"] for r in executions(exec_log)] == ["start", "cleanup"]


@pytest.mark.parametrize("whole_group", [False, True], ids=["main-process", "process-group"])
async def test_service_sigkill_redelivers_and_leaves_no_orphans(
    vhost: Vhost,
    queue: str,
    broker: Broker,
    start_worker: Any,
    exec_log: Path,
    whole_group: bool,
) -> None:
    worker: WorkerProcess = await start_worker()
    ids = await publish_work(broker, queue, 6, 2)
    assert await until(lambda: len(started(exec_log)) >= 2, 10)
    children = worker.children()
    assert len(children) == 2
    in_flight = running_ids(exec_log)
    if whole_group:
        worker.killpg(signal.SIGKILL)
    else:
        worker.send(signal.SIGKILL)
    worker.wait(5)
    # The children die with the parent (PR_SET_PDEATHSIG), not when their task ends.
    assert await until(lambda: not any(alive(pid) for pid in children), 3)

    await start_worker()
    await wait_all_done(exec_log, ids, 40)
    report = check(set(ids), exec_log)
    print(f"checker: {report}")  # shown with pytest -s
    assert report.lost == set() and report.unexpected == set(), report
    assert set(report.duplicated) <= in_flight | running_ids(exec_log), report


async def test_sigterm_drains_running_tasks_and_returns_the_rest(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    worker: WorkerProcess = await start_worker("--drain-timeout", "20")
    ids = await publish_work(broker, queue, 6, 2)
    assert await until(lambda: len(started(exec_log)) == 2, 10)
    first_two = {r["id"] for r in started(exec_log)}
    worker.send(signal.SIGTERM)
    assert worker.wait(20) == 0
    # The running tasks finished and were acked before exit; nothing else started.
    assert done_ids(exec_log) == first_two
    assert await broker.ready(queue) == 4
    await start_worker()
    await wait_all_done(exec_log, ids, 30)
    report = check(set(ids), exec_log)
    print(f"checker: {report}")  # shown with pytest -s
    assert (report.lost, report.duplicated, report.unexpected) == (set(), {}, set()), report
    assert "drained" in worker.log()


async def test_drain_deadline_returns_unfinished_tasks(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    worker: WorkerProcess = await start_worker("--drain-timeout", "1")
    ids = await publish_work(broker, queue, 3, 6)
    assert await until(lambda: len(started(exec_log)) == 2, 10)
    t0 = time.monotonic()
    worker.send(signal.SIGTERM)
    assert worker.wait(15) == 0
    assert time.monotonic() - t0 < 6  # did not wait for the 6 s tasks
    assert done_ids(exec_log) == set()
    ready = 0
    for _ in range(50):
        if (ready := await broker.ready(queue)) == 3:
            break
        await asyncio.sleep(0.1)
    assert ready == 3
    await start_worker()
    await wait_all_done(exec_log, ids, 30)
    report = check(set(ids), exec_log)
    print(f"checker: {report}")  # shown with pytest -s
    assert (report.lost, report.duplicated, report.unexpected) == (set(), {}, set()), report


async def survives_connection_loss(
    vhost: Vhost, queue: str, broker: Broker, worker: WorkerProcess, exec_log: Path, fault: Any
) -> None:
    """Run 8 tasks, apply ``fault`` while two run; then lost = 0, duplicates only in flight,
    and the worker consumes again on a fresh connection."""
    ids = await publish_work(broker, queue, 8, 1)
    assert await until(lambda: len(started(exec_log)) >= 2, 10)
    in_flight = running_ids(exec_log)
    await fault()
    await wait_all_done(exec_log, ids, 90)
    report = check(set(ids), exec_log)
    print(f"checker: {report}")  # shown with pytest -s
    assert report.lost == set() and report.unexpected == set(), report
    assert set(report.duplicated) <= in_flight, report
    async with await aio_pika.connect(vhost.url) as connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        assert q.declaration_result.consumer_count == 1, worker.log()
    assert "unknown delivery tag" not in worker.log()  # no stale tag closed a channel


async def test_connection_closed_by_broker_reconnects_and_loses_nothing(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    worker: WorkerProcess = await start_worker()

    async def close_all() -> None:
        vhost.close_all_connections()

    await survives_connection_loss(vhost, queue, broker, worker, exec_log, close_all)
    assert "connection" in worker.log().lower()


async def test_queue_deleted_under_consumer_is_declared_again(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    worker: WorkerProcess = await start_worker()
    await broker.channel.queue_delete(queue)
    assert await until(lambda: "cancelled the consumer" in worker.log(), 10)
    for _ in range(100):
        try:
            if await broker.consumers(queue) == 1:
                break
        except aio_pika.exceptions.ChannelClosed:
            broker.channel = await broker.connection.channel(publisher_confirms=True)
        await asyncio.sleep(0.1)
    assert await broker.consumers(queue) == 1
    ids = await publish_work(broker, queue, 2, 0)
    await wait_all_done(exec_log, ids, 15)


@pytest.mark.broker_restart
async def test_broker_restart_reconnects_and_loses_nothing(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    worker: WorkerProcess = await start_worker()

    async def restart() -> None:
        try:
            rabbitmqctl("stop_app")
            await asyncio.sleep(2)
        finally:
            rabbitmqctl("start_app")
            rabbitmqctl("await_startup")

    await survives_connection_loss(vhost, queue, broker, worker, exec_log, restart)


async def test_deleted_dead_letter_queue_is_declared_again(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    worker: WorkerProcess = await start_worker()
    await broker.channel.queue_delete(f"{queue}.dlq")
    task_id = await broker.publish(queue, "tests.tasks.nope")
    dead: list[Any] = []
    deadline = time.monotonic() + 15
    while not dead and time.monotonic() < deadline:
        # Reading a quorum queue declared a moment ago can fail with a connection-level
        # INTERNAL_ERROR (noproc) on 3.10 until its process is up: read on a fresh connection.
        try:
            async with await aio_pika.connect(vhost.url) as connection:
                reader = Broker(connection, await connection.channel())
                dead = await reader.wait_for(f"{queue}.dlq", 1, 2)
        except aio_pika.exceptions.AMQPError:
            await asyncio.sleep(0.2)
    assert [m.message_id for m in dead] == [task_id], worker.log()
    assert dead[0].headers[protocol.REASON_HEADER] == "unknown_task"


async def test_memory_blow_up_is_a_clean_failure(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    worker: WorkerProcess = await start_worker("--memory-limit", "512MiB")
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        with pytest.raises(TaskError) as info:
            await client.call("tests.tasks.hog_memory", 2)
        assert info.value.type == "MemoryError"
        assert await client.call("tests.tasks.add", 1, 2) == 3
    assert worker.proc is not None and worker.proc.poll() is None
    dead = await broker.wait_for(f"{queue}.dlq", 1, 10)
    assert dead and dead[0].headers[protocol.ERROR_TYPE_HEADER] == "MemoryError"
