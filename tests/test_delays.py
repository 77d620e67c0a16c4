"""Delayed tasks (countdown / ETA): held by the broker, never by a worker, never run early."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from subprocess import PIPE
from typing import Any

import pytest

from service import AsyncClient, ConfigError, protocol, routing, step
from tests.conftest import Broker, Vhost, check, executions, until


def ms(seconds: float) -> int:
    return int(seconds * 1000)


async def test_countdown_runs_no_earlier_than_its_eta(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    await start_worker()
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        sent = time.time()
        result = await client.call(step("tests.tasks.timed", countdown=2))
    assert result["eta"] is not None
    assert abs(result["eta"] - (sent + 2)) < 0.5  # current_task().eta is the instant asked for
    assert result["started"] >= result["eta"]
    assert result["started"] - result["eta"] < 3  # late by the tiers' rounding at most


async def test_a_future_eta_goes_back_to_the_broker_not_into_the_worker(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    """What another language's publisher does: x-hutch-eta on a task published straight to Q."""
    worker = await start_worker()
    eta = ms(time.time() + 4)
    task_id = await broker.publish(queue, "tests.tasks.timed", headers={protocol.ETA_HEADER: eta})
    # Taken off the work queue, held by the delay topology: nothing ready, nothing unacked.
    assert await until(
        lambda: (
            vhost.queue_counts(queue) == {**vhost.queue_counts(queue), "ready": 0, "unacked": 0}
        ),
        3,
    )
    assert await until(lambda: any(r["id"] == task_id for r in executions(exec_log)), 15)
    (run,) = [r for r in executions(exec_log) if r["id"] == task_id and r["event"] == "done"]
    assert run["time"] >= eta / 1000
    assert run["eta"] == eta / 1000
    with urllib.request.urlopen(worker.metrics_url() + "/metrics", timeout=5) as response:
        text = response.read().decode()
    assert f'hutch_messages_settled_total{{action="delay",queue="{queue}"}} 1.0' in text


@pytest.mark.parametrize(
    "eta",
    ["2027-01-01T08:00:00Z", 1.5e12, -1, True, 10**16],
    ids=["string", "float", "negative", "bool", "microseconds"],
)
async def test_a_bad_eta_is_dead_lettered(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, eta: Any
) -> None:
    await start_worker()
    task_id = await broker.publish(queue, "tests.tasks.timed", headers={protocol.ETA_HEADER: eta})
    (letter,) = await broker.wait_for(routing.dlq_name(queue), 1, timeout=15)
    assert letter.message_id == task_id
    assert letter.headers[protocol.REASON_HEADER] == "bad_eta"


def test_a_naive_eta_or_both_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="timezone-aware"):
        step("t", eta=dt.datetime(2027, 1, 1, 8))
    with pytest.raises(ConfigError, match="not both"):
        step("t", countdown=1, eta=dt.datetime.now(dt.UTC))
    with pytest.raises(ConfigError, match="0 or more"):
        step("t", countdown=-1)


async def test_hutch_call_countdown_and_eta(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    await start_worker()

    async def hutch_call(*args: str) -> Any:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.cli", "call", "tests.tasks.timed", "--queue", queue,
            "--timeout", "30", *args, env={**os.environ, "HUTCH_BROKER_URL": vhost.url},
            stdout=PIPE, stderr=PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        return json.loads(out)

    sent = time.time()
    later = await hutch_call("--countdown", "1.5")
    assert later["started"] >= later["eta"] >= sent + 1.4
    past = dt.datetime.fromtimestamp(sent - 60, dt.UTC).isoformat()
    now = await hutch_call("--eta", past)
    assert now["started"] - sent < 10  # ran at once


async def test_a_delayed_task_survives_its_worker(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    """Submitted with no worker running; the one started meanwhile is stopped; the next runs it."""
    async with AsyncClient(vhost.url, queue=queue) as client:
        task_id = await client.submit(step("tests.tasks.timed", countdown=3))
    first = await start_worker()
    first.stop()
    await asyncio.sleep(3.5)
    await start_worker()
    assert await until(lambda: check({task_id}, exec_log).lost == set(), 15)


# -- the soak: restarts of every worker and of the broker while tasks wait -----------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def delayed_soak(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path, *, n: int,
    spread: float,
) -> None:  # fmt: skip
    """``n`` tasks with ETAs spread over ``spread`` seconds (a fifth published to Q with the
    header, for the worker to put into the delay; the rest by the client straight into it);
    each worker restarted in turn and the broker once while they wait."""
    from tests.conftest import rabbitmqctl

    # A fixed prefetch (concurrency 2 + buffer 2) makes the bound on unacked deliveries exact:
    # the time-sized window would grow it for these instant tasks as they come due.
    fixed = {"HUTCH_PREFETCH_TIME": "0"}
    workers = [await start_worker(**fixed), await start_worker(**fixed)]
    start = time.time() + 2
    etas: dict[str, int] = {}
    async with AsyncClient(vhost.url, queue=queue) as client:
        for i in range(n):
            eta = ms(start + spread * i / n)
            if i % 5 == 0:
                task_id = await broker.publish(
                    queue, "tests.tasks.timed", headers={protocol.ETA_HEADER: eta}
                )
            else:
                when = dt.datetime.fromtimestamp(eta / 1000, dt.UTC)
                task_id = await client.submit(step("tests.tasks.timed", eta=when))
            etas[task_id] = eta
    rss = {w.pid: [rss_mb(w.pid)] for w in workers}
    max_unacked = 0

    async def watch() -> None:
        nonlocal max_unacked
        while True:
            try:
                counts = await asyncio.to_thread(vhost.queue_counts, queue)
                max_unacked = max(max_unacked, counts["unacked"])
            except RuntimeError:
                pass  # the broker is restarting
            for w in workers:
                if w.proc is not None and w.proc.poll() is None:
                    rss.setdefault(w.pid, []).append(rss_mb(w.pid))
            await asyncio.sleep(0.5)

    watching = asyncio.create_task(watch())
    try:
        await asyncio.sleep(spread / 4)
        workers[0].stop()  # SIGTERM: drains, exits
        workers[0] = await start_worker(**fixed)
        await asyncio.sleep(spread / 4)
        try:
            rabbitmqctl("stop_app")
            await asyncio.sleep(2)
        finally:
            rabbitmqctl("start_app")
            rabbitmqctl("await_startup")
        await asyncio.sleep(spread / 4)
        workers[1].stop()
        workers[1] = await start_worker(**fixed)
        deadline = time.time() + spread / 4 + 60
        while time.time() < deadline and check(set(etas), exec_log).lost:
            await asyncio.sleep(0.5)
        # Late is not lost: a delay level's dead-letter worker whose forward was not confirmed
        # across the restart resends only after dead_letter_worker_publisher_confirm_timeout
        # (180 s by default). Wait that out while the missing tasks are still in the broker.
        deadline = time.time() + 200
        while time.time() < deadline and check(set(etas), exec_log).lost:
            if not await asyncio.to_thread(vhost.messages_held):
                break  # nothing left anywhere: lost, the assertion below says so
            await asyncio.sleep(2)
    finally:
        watching.cancel()
    report = check(set(etas), exec_log)
    runs = [r for r in executions(exec_log) if r["event"] == "done" and r["id"] in etas]
    early = [r["id"] for r in runs if r["time"] < etas[r["id"]] / 1000]
    lateness = sorted(r["time"] - etas[r["id"]] / 1000 for r in runs)
    p99 = lateness[int(len(lateness) * 0.99)] if lateness else 0.0
    growth = max((max(v) - v[0] for v in rss.values() if v), default=0.0)
    print(
        f"checker: {report}; {n} delayed over {spread:g}s; early {len(early)}; lateness p50 "
        f"{statistics.median(lateness):.2f}s p99 {p99:.2f}s; max unacked in Q {max_unacked}; "
        f"worker RSS growth {growth:.1f} MB"
    )  # shown with pytest -s
    held = vhost.messages_held() if report.lost else {}
    assert report.lost == set() and report.unexpected == set(), (report, held)
    assert early == []
    assert max_unacked <= 2 * (2 + 2), max_unacked  # two workers' running + buffer, no more
    assert growth < 10, rss


@pytest.mark.broker_restart
async def test_delayed_tasks_survive_restarts_short(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    await delayed_soak(vhost, queue, broker, start_worker, exec_log, n=300, spread=30)


@pytest.mark.slow
@pytest.mark.broker_restart
async def test_delayed_tasks_survive_restarts_soak(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    await delayed_soak(vhost, queue, broker, start_worker, exec_log, n=2000, spread=120)
