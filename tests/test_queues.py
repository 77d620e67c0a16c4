"""One worker, several queues (``--queue high,low``): strict priority into one pool, each
queue with its own dead letters, metrics and place in ``hutch inspect`` (service/priority.py).

The figures are ratios and orders, never times: which tasks started before which, and a
throughput against the same worker's on one queue.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

from service import protocol, routing
from tests.cli_helpers import hutch, require_management
from tests.conftest import Broker, Vhost, check, executions
from tests.test_metrics import get, value

TASK_SECONDS = 0.05
CONCURRENCY = 2
PREFETCH_BUFFER = 2  # the default: a consumer's first window is concurrency + this


async def wait_done(log: Path, ids: set[str], timeout: float = 120) -> list[dict[str, Any]]:
    for _ in range(int(timeout * 10)):
        records = executions(log)
        if len({r["id"] for r in records if r["event"] == "done"} & ids) >= len(ids):
            return records
        await asyncio.sleep(0.1)
    raise AssertionError(f"not all {len(ids)} tasks finished in {timeout}s")


async def publish(broker: Broker, queue: str, count: int, prefix: str) -> set[str]:
    return {
        await broker.publish(queue, "tests.tasks.work", TASK_SECONDS, message_id=f"{prefix}-{n}")
        for n in range(count)
    }


async def test_high_runs_before_low_and_each_queue_keeps_its_own_topology(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    high, low = queue, f"{queue}-low"
    await broker.declare(low)
    high_ids = await publish(broker, high, 80, "high")
    low_ids = await publish(broker, low, 80, "low")
    worker = await start_worker(HUTCH_QUEUE=f"{high},{low}")
    # While high still has a backlog, low holds nothing it has not started: its consumer is
    # paused and what it had taken went back (checked at every look once high is running).
    held: list[int] = []
    while await broker.ready(high) > 0:
        records = executions(exec_log)
        if any(r["event"] == "done" and r["id"] in high_ids for r in records):
            low_started = {r["id"] for r in records if r["event"] == "start"} & low_ids
            held.append(len(low_ids) - len(low_started) - await broker.ready(low))
        await asyncio.sleep(0.1)
    print(f"low deliveries held and not started, looks while high had a backlog: {held}")
    assert held and not any(held), held
    records = await wait_done(exec_log, high_ids | low_ids)
    starts = {r["id"]: r["time"] for r in records if r["event"] == "start"}
    last_high = max(starts[i] for i in high_ids)
    early_low = sorted(starts[i] for i in low_ids if starts[i] < last_high)
    print(
        f"low tasks started before the last high one: {len(early_low)} of {len(low_ids)} "
        f"(first window {CONCURRENCY + PREFETCH_BUFFER})"
    )
    # Only what the low consumer held at the start may run early: never more than its first
    # window, and the rest of the low queue waits until the high one is drained.
    assert len(early_low) <= CONCURRENCY + PREFETCH_BUFFER
    report = check(high_ids | low_ids, exec_log)
    assert not report.lost and not report.unexpected, report

    # Each queue dead-letters into its own Q.dlq; hutch inspect shows both queues.
    await broker.publish(high, "no.such.task")
    await broker.publish(low, "no.such.task")
    require_management()
    for _ in range(30):
        run = await hutch(vhost, "inspect", "--json")
        assert run.code == 0, run
        listed = {s["queue"]: s for s in run.json_lines()}
        assert {high, low} <= set(listed), listed
        if listed[high]["dead_letters"] == listed[low]["dead_letters"] == 1:
            break
        await asyncio.sleep(0.5)
    assert listed[high]["dead_letters"] == listed[low]["dead_letters"] == 1, listed
    for name in (high, low):
        letters = await broker.wait_for(routing.dlq_name(name), 1, timeout=15)
        assert len(letters) == 1, name
        assert letters[0].headers[protocol.REASON_HEADER] == "unknown_task"

    # The metrics say which queue; the worker's own series are exported once.
    _, text = get(worker.metrics_url() + "/metrics")
    for name, ids in ((high, high_ids), (low, low_ids)):
        done = value(
            text,
            "hutch_tasks_finished_total",
            queue=name,
            task="tests.tasks.work",
            outcome="success",
        )
        assert done == len(ids), name
        assert value(text, "hutch_dead_letters_total", queue=name, reason="unknown_task") == 1
        assert value(text, "hutch_prefetch_window", queue=name) >= CONCURRENCY
        assert value(text, "hutch_worker_info", queue=name, vhost=vhost.name) == 1
    assert value(text, "hutch_pool_processes") == CONCURRENCY
    status, body = get(worker.metrics_url() + "/readyz")
    assert status == 200, body
    worker.send(signal.SIGTERM)  # drains every queue
    assert worker.wait(60) == 0, worker.log()


async def rate(log: Path, ids: set[str]) -> float:
    """Tasks/s over the batch, from the fifth task done to the last (the window grows first)."""
    records = await wait_done(log, ids)
    times = sorted(r["time"] for r in records if r["event"] == "done" and r["id"] in ids)
    skip = len(times) // 5
    return (len(times) - skip) / (times[-1] - times[skip - 1])


async def test_a_lower_queue_runs_at_full_speed_while_the_higher_is_empty(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    high, low = queue, f"{queue}-low"
    await broker.declare(low)
    alone = await start_worker(HUTCH_QUEUE=low)
    single_ids = await publish(broker, low, 240, "single")
    single = await rate(exec_log, single_ids)
    alone.stop()
    await start_worker(HUTCH_QUEUE=f"{high},{low}")
    shared_ids = await publish(broker, low, 240, "shared")
    shared = await rate(exec_log, shared_ids)
    ratio = shared / single
    print(
        f"low queue alone {single:.1f} tasks/s; behind an empty high queue {shared:.1f}: "
        f"ratio {ratio:.2f}"
    )
    assert not check(single_ids | shared_ids, exec_log).lost
    assert ratio >= 0.8
