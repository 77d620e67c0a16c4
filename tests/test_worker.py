"""End to end against the real broker: results, acks, retries, dead letters, bad input, prefetch."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
import time
import uuid
from asyncio.subprocess import PIPE
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import pytest

from service import AsyncClient, Client, TaskError, protocol
from tests.conftest import Broker, Vhost, check, executions, rabbitmqctl, until


def dlq(queue: str) -> str:
    return f"{queue}.dlq"


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


async def test_call_returns_result_and_acks(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    await start_worker()
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        assert await client.call("tests.tasks.add", 2, 3) == 5
        assert await client.call("tests.tasks.add", 2.5, b=1) == 3.5
    async with AsyncClient(vhost.url, queue=queue, timeout=30, content_type=protocol.JSON) as c:
        assert await c.call("tests.tasks.add", "a", "b") == "ab"
    assert await until(lambda: vhost.queue_counts(queue)["unacked"] == 0, 10)
    assert vhost.queue_counts(queue)["ready"] == 0


async def test_sync_client_submit_call_map(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    await start_worker()

    def use() -> tuple[str, Any, list[Any], list[Any]]:
        with Client(vhost.url, queue=queue, timeout=60) as client:
            task_id = client.submit("tests.tasks.work", 0)
            result = client.call("tests.tasks.add", 1, 1)
            squares = client.map("tests.tasks.work", [0.0] * 50)
            mixed = client.map("tests.tasks.fails_until", [1, 1], return_exceptions=True)
            return task_id, result, squares, mixed

    task_id, result, ids, mixed = await asyncio.to_thread(use)
    assert result == 2
    assert len(ids) == 50 and len(set(ids)) == 50  # input order, one result each
    assert mixed == [1, 1]
    assert await until(lambda: task_id in {r["id"] for r in executions(exec_log)}, 10)


async def test_map_keeps_input_order_and_raises_remote_error(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    await start_worker()
    async with AsyncClient(vhost.url, queue=queue, timeout=60) as client:
        # Later items finish first; results still come back in input order.
        assert await client.map("tests.tasks.slow_square", [5, 4, 3, 2, 1, 0]) == [
            25,
            16,
            9,
            4,
            1,
            0,
        ]
        with pytest.raises(TaskError) as info:
            await client.map("tests.tasks.add", [1, 2])  # add(x) lacks b
        assert info.value.type == "bad_args"


async def test_ack_waits_for_result_confirm(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    """A result the broker refuses (full reply queue) must not let the task be acked."""
    worker = await start_worker()
    replies = f"replies-{uuid.uuid4().hex[:6]}"
    await broker.channel.declare_queue(
        replies, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
    )
    await broker.channel.default_exchange.publish(aio_pika.Message(b"filler"), replies)
    task_id = await broker.publish(queue, "tests.tasks.add", 1, 2, reply_to=replies)
    await asyncio.sleep(2)
    assert "publish to" in worker.log() and "retrying" in worker.log()
    # The task has run, but its result was refused: killing the worker now must hand the
    # message back, which proves it was never acked.
    worker.killpg()
    worker.wait(5)
    ready = 0
    for _ in range(100):
        if (ready := await broker.ready(queue)) == 1:
            break
        await asyncio.sleep(0.1)
    assert ready == 1
    # Make room: a new worker runs it again, the result goes through, and then it is acked.
    assert [m.body for m in await broker.drain(replies)] == [b"filler"]
    await start_worker()
    results = await broker.wait_for(replies, 1, 20)
    assert results and results[0].correlation_id == task_id
    assert msgpack.unpackb(results[0].body) == {"ok": True, "result": 3}
    await asyncio.sleep(0.5)
    assert await broker.ready(queue) == 0


async def test_retries_with_backoff_then_dead_letters(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    await start_worker()
    task_id = await broker.publish(queue, "tests.tasks.always_fails")
    dead = await broker.wait_for(dlq(queue), 1, 30)
    assert len(dead) == 1
    headers = dead[0].headers
    assert dead[0].message_id == task_id
    assert headers[protocol.REASON_HEADER] == "failed"
    assert headers[protocol.ERROR_TYPE_HEADER] == "ValueError"
    assert headers[protocol.ERROR_MESSAGE_HEADER] == "this task always fails"
    assert headers[protocol.ATTEMPT_HEADER] == 3
    runs = [r for r in executions(exec_log) if r["id"] == task_id]
    assert [r["attempt"] for r in runs] == [1, 2, 3]  # max_attempts=3, then the DLQ
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(runs)]
    assert all(gap >= 0.9 for gap in gaps), gaps  # held by the broker, not run at once
    assert await broker.ready(queue) == 0
    assert await broker.consumers(queue) == 1


async def test_retry_then_success(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    await start_worker()
    async with AsyncClient(vhost.url, queue=queue, timeout=60) as client:
        assert await client.call("tests.tasks.fails_until", 3) == 3
    assert await broker.ready(dlq(queue)) == 0


async def test_final_failure_reaches_caller(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    await start_worker()
    async with AsyncClient(vhost.url, queue=queue, timeout=60) as client:
        with pytest.raises(TaskError) as info:
            await client.call("tests.tasks.unpicklable_error")
    assert info.value.type == "NeedsTwoArgs"
    assert "needs two args: 1, 2" in info.value.message


@pytest.mark.parametrize(
    ("task", "body", "content_type", "reason"),
    [
        ("tests.tasks.add", b"\xc1\x00garbage", protocol.MSGPACK, "malformed"),
        ("tests.tasks.add", b"{not json", protocol.JSON, "malformed"),
        ("tests.tasks.add", msgpack.packb([1, 2]), protocol.MSGPACK, "malformed"),
        (
            "tests.tasks.add",
            msgpack.packb({"args": [1, 2]}),
            "application/x-python-serialize",
            "bad_content_type",
        ),
        ("tests.tasks.add", msgpack.packb({"args": [1, 2]}), None, "bad_content_type"),
        (None, msgpack.packb({"args": [1, 2]}), protocol.MSGPACK, "unknown_task"),
        ("os.system", msgpack.packb({"args": ["true"]}), protocol.MSGPACK, "unknown_task"),
        ("tests.tasks.add", msgpack.packb({"args": [1, 2, 3]}), protocol.MSGPACK, "bad_args"),
        ("tests.tasks.add", msgpack.packb({"kwargs": {"c": 1}}), protocol.MSGPACK, "bad_args"),
        (
            "tests.tasks.add",
            msgpack.packb({"args": [_nested(40), 1]}),
            protocol.MSGPACK,
            "too_deep",
        ),
        (
            "tests.tasks.add",
            msgpack.packb({"args": ["x" * (5 << 20), 1]}),
            protocol.MSGPACK,
            "too_large",
        ),
    ],
)
async def test_bad_input_is_dead_lettered_at_once(
    vhost: Vhost,
    queue: str,
    broker: Broker,
    start_worker: Any,
    task: str | None,
    body: bytes,
    content_type: str | None,
    reason: str,
) -> None:
    worker = await start_worker()
    task_id = await broker.publish(queue, task, body=body, content_type=content_type)
    dead = await broker.wait_for(dlq(queue), 1, 15)
    assert len(dead) == 1, worker.log()
    assert dead[0].message_id == task_id
    assert dead[0].headers[protocol.REASON_HEADER] == reason
    assert dead[0].body == body  # the original, for inspection and replay
    assert dead[0].headers[protocol.ERROR_MESSAGE_HEADER]  # says what was wrong
    # Dead-lettered on its first delivery, and the worker is still serving.
    assert await broker.ready(queue) == 0
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        assert await client.call("tests.tasks.add", 1, 1) == 2
    assert worker.proc is not None and worker.proc.poll() is None


async def test_bad_input_tells_a_waiting_caller(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    await start_worker()
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        with pytest.raises(TaskError) as info:
            await client.call("tests.tasks.add", 1, 2, 3)
        assert info.value.type == "bad_args"
        assert "add" in info.value.message
        with pytest.raises(TaskError) as unknown:
            await client.call("tests.tasks.nope")
        assert unknown.value.type == "unknown_task"


@pytest.mark.parametrize(
    ("task", "args", "error_type"),
    [
        ("tests.tasks.unserializable_result", [], "UnserializableResult"),
        ("tests.tasks.big_result", [9 << 20], "ResultTooLarge"),
    ],
)
async def test_unsendable_result_is_an_error_result(
    vhost: Vhost,
    queue: str,
    broker: Broker,
    start_worker: Any,
    task: str,
    args: list[Any],
    error_type: str,
) -> None:
    await start_worker()
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        with pytest.raises(TaskError) as info:
            await client.call(task, *args)
        assert info.value.type == error_type
        assert await client.call("tests.tasks.add", 1, 1) == 2  # the pool is unharmed
    dead = await broker.wait_for(dlq(queue), 1, 10)
    assert dead and dead[0].headers[protocol.REASON_HEADER] == "failed"


async def test_prefetch_is_bounded_by_free_slots(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    """2 children + buffer 1: at most 3 unacked however many tasks wait."""
    for _ in range(20):
        await broker.publish(queue, "tests.tasks.work", 60)
    await start_worker("--prefetch-buffer", "1", "--drain-timeout", "1")
    # rabbitmqctl's counts for quorum queues lag by a few seconds; the ready count from a
    # passive declare does not.
    assert await until(lambda: vhost.queue_counts(queue)["unacked"] == 3, 10)
    assert await broker.ready(queue) == 17


async def test_worker_publishes_no_earlier_than_it_should(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    """Queue-wait sanity: a task published before any worker runs is done once one starts."""
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        pending = asyncio.ensure_future(client.call("tests.tasks.add", 40, 2))
        await asyncio.sleep(0.5)
        assert not pending.done()
        started = time.monotonic()
        await start_worker()
        assert await pending == 42
        assert time.monotonic() - started < 30


async def hutch_call(url: str, *args: str) -> tuple[int, bytes, bytes]:
    """Run ``hutch call ARGS`` against ``url``; returns exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service.cli", "call", *args, "--timeout", "30",
        env={**os.environ, "HUTCH_BROKER_URL": url}, stdout=PIPE, stderr=PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out, err


async def test_hutch_call_prints_the_result(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    await start_worker()
    code, out, err = await hutch_call(vhost.url, "tests.tasks.add", "2", "3.5", "--queue", queue)
    assert code == 0, err
    assert json.loads(out) == 5.5
    code, out, _ = await hutch_call(
        vhost.url, "tests.tasks.add", "a", "b", "--json", "--queue", queue
    )
    assert code == 0 and json.loads(out) == "ab"
    code, _, err = await hutch_call(vhost.url, "tests.tasks.unpicklable_error", "--queue", queue)
    assert code == 1
    assert b"NeedsTwoArgs" in err and b"Traceback" not in err


async def test_queue_with_other_arguments_is_reported_not_hidden(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    other = f"{queue}-other"
    await broker.channel.declare_queue(f"{other}.dlq", durable=True)  # a classic queue
    worker = await start_worker("--queue", other, wait=False)
    assert await until(lambda: "exists with other arguments" in worker.log(), 20), worker.log()
    assert "consuming from" not in worker.log()
    assert "ERROR" in worker.log() and "Traceback" not in worker.log()


def consumer_prefetches(vhost: Vhost, queue: str) -> list[int]:
    """The prefetch count of every consumer on ``queue``, from the broker."""
    out = rabbitmqctl("list_consumers", "-p", vhost.name, "queue_name", "prefetch_count")
    return [int(p) for q, p in (line.split("\t") for line in out.splitlines()) if q == queue]


async def test_prefetch_window_grows_for_short_tasks(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    """Sub-millisecond tasks: the one consumer is re-registered with a deep window."""
    # 2 s of work per child: deep even if a loaded machine makes a no-op take 20 ms.
    await start_worker("--prefetch-time", "2")
    assert consumer_prefetches(vhost, queue) == [4]  # 2 children + buffer 2 until measured
    ids = await asyncio.gather(*(broker.publish(queue, "tests.tasks.noop") for _ in range(3000)))
    assert len(set(ids)) == 3000
    seen: list[list[int]] = []

    def grown() -> bool:
        seen.append(consumer_prefetches(vhost, queue))
        return len(seen[-1]) == 1 and seen[-1][0] > 16

    assert await until(grown, 30, interval=0.2), seen[-5:]
    assert await until(lambda: vhost.queue_counts(queue)["unacked"] == 0, 30)
    assert await broker.ready(queue) == 0


async def test_slow_tasks_after_fast_ones_are_handed_back(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    """Once a task has run over a second, deliveries beyond the shrunk window go back to the
    queue (for other hosts), and every task still runs exactly once."""
    # 0.5 s per child: deep (> 16) for no-ops even on a loaded machine, and 4 (the minimum)
    # once a task has run a second.
    await start_worker("--prefetch-time", "0.5")
    await asyncio.gather(*(broker.publish(queue, "tests.tasks.noop") for _ in range(3000)))
    assert await until(lambda: consumer_prefetches(vhost, queue)[:1] > [16], 30, interval=0.2)
    assert await until(lambda: vhost.queue_counts(queue)["unacked"] == 0, 30)
    slow = [await broker.publish(queue, "tests.tasks.work", 1.5) for _ in range(16)]
    # All 16 fit in the deep window, so the worker takes them at once. Half a second into the
    # first two runs it re-consumes with a window of 4 to 6 (2 + 1 s of work / the age of the
    # oldest run), a second in it hands back the 14 that had not started, and the new consumer
    # takes at most 6 of them: at least 8 are ready again.
    returned: list[int] = []

    async def handed_back() -> bool:
        returned.append(await broker.ready(queue))
        return returned[-1] >= 8

    deadline = time.monotonic() + 10
    while not await handed_back():
        assert time.monotonic() < deadline, returned
        await asyncio.sleep(0.1)
    assert await until(lambda: consumer_prefetches(vhost, queue) == [4], 10)
    assert await until(lambda: len(check(set(slow), exec_log).lost) == 0, 40)
    report = check(set(slow), exec_log)
    assert not report.duplicated and not report.unexpected
