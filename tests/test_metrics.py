"""Metrics and probes served by a real worker, checked after a real workload."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service import AsyncClient, TaskError
from tests.conftest import Broker, Vhost, WorkerProcess


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    found = samples(text).get((name, frozenset(labels.items())))
    assert found is not None, f"{name}{labels} not exported"
    return found


async def test_metrics_count_a_real_workload(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    worker: WorkerProcess = await start_worker()
    base = worker.metrics_url()
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        assert await client.map("tests.tasks.spin", [0.05] * 6)
        with pytest.raises(TaskError):
            await client.call("tests.tasks.unpicklable_error")
        with pytest.raises(TaskError):
            await client.call("tests.tasks.no_such_task")
        await client.call("tests.tasks.crash_first_delivery")
    q = {"queue": queue}
    # A caller has its result before the worker acks (result confirmed first, then the ack,
    # which may wait a few ms to share a frame): scrape once the last ack is counted.
    deadline = time.monotonic() + 10
    while True:
        status, text = await asyncio.to_thread(get, base + "/metrics")
        assert status == 200
        acked = samples(text).get(
            ("hutch_messages_settled_total", frozenset({"action": "ack", **q}.items()))
        )
        if acked == 7 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert (
        value(text, "hutch_tasks_finished_total", task="tests.tasks.spin", outcome="success", **q)
        == 6
    )
    assert (
        value(
            text,
            "hutch_tasks_finished_total",
            task="tests.tasks.unpicklable_error",
            outcome="failed",
            **q,
        )
        == 1
    )
    assert value(text, "hutch_tasks_finished_total", task="unknown", outcome="rejected", **q) == 1
    assert (
        value(
            text,
            "hutch_tasks_finished_total",
            task="tests.tasks.crash_first_delivery",
            outcome="crashed",
            **q,
        )
        == 1
    )
    assert value(text, "hutch_tasks_received_total", task="tests.tasks.spin", **q) == 6
    assert value(text, "hutch_messages_settled_total", action="ack", **q) == 7
    assert value(text, "hutch_messages_settled_total", action="dead_letter", **q) == 2
    assert value(text, "hutch_messages_settled_total", action="requeue", **q) == 1
    assert value(text, "hutch_dead_letters_total", reason="failed", **q) == 1
    assert value(text, "hutch_dead_letters_total", reason="unknown_task", **q) == 1
    assert value(text, "hutch_messages_redelivered_total", **q) == 1
    assert value(text, "hutch_child_restarts_total", reason="crash") == 1
    assert value(text, "hutch_task_duration_seconds_count", task="tests.tasks.spin", **q) == 6
    assert value(text, "hutch_task_cpu_seconds_total", task="tests.tasks.spin", **q) >= 0.25
    assert value(text, "hutch_task_queue_wait_seconds_count", **q) == 10
    assert value(text, "hutch_pool_processes") == 2
    assert value(text, "hutch_pool_cpu_seconds_total") >= 0.25
    assert value(text, "hutch_pool_resident_memory_bytes") > 1_000_000
    assert value(text, "hutch_broker_connected") == 1
    assert value(text, "hutch_ready") == 1
    assert value(text, "hutch_tasks_in_progress", **q) == 0
    assert value(text, "hutch_prefetch_window", **q) >= 4  # concurrency 2 + buffer 2 at least
    assert value(text, "hutch_last_success_timestamp_seconds", **q) > 0
    assert any(name == "hutch_build_info" for name, _ in samples(text))
    assert "task_id" not in text and "message_id" not in text


async def test_metrics_pass_promtool_check(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: apt-get install prometheus (.ci/run does)")
    worker: WorkerProcess = await start_worker()
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        await client.call("tests.tasks.add", 1, 2)
    _, text = await asyncio.to_thread(get, worker.metrics_url() + "/metrics")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_probes_follow_the_worker_state(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    worker: WorkerProcess = await start_worker("--drain-timeout", "20")
    base = worker.metrics_url()
    assert (await asyncio.to_thread(get, base + "/livez"))[0] == 200
    assert (await asyncio.to_thread(get, base + "/readyz"))[0] == 200
    assert (await asyncio.to_thread(get, base + "/nope"))[0] == 404
    # Draining: still alive, no longer ready.
    await broker.publish(queue, "tests.tasks.work", 3)
    await asyncio.sleep(1)
    worker.send(signal.SIGTERM)
    status, body = 0, ""
    for _ in range(40):
        status, body = await asyncio.to_thread(get, base + "/readyz")
        if status == 503:
            break
        await asyncio.sleep(0.05)
    assert (status, body.strip()) == (503, "draining")
    assert (await asyncio.to_thread(get, base + "/livez"))[0] == 200
    assert worker.wait(20) == 0


async def test_readyz_is_false_without_a_consumer(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    worker: WorkerProcess = await start_worker()
    base = worker.metrics_url()
    vhost.close_all_connections()
    seen = []
    for _ in range(60):
        seen.append((await asyncio.to_thread(get, base + "/readyz"))[0])
        if 503 in seen and seen[-1] == 200:
            break
        await asyncio.sleep(0.05)
    assert 503 in seen and seen[-1] == 200, seen
    assert (await asyncio.to_thread(get, base + "/livez"))[0] == 200  # never the broker's fault
    _, text = await asyncio.to_thread(get, base + "/metrics")
    assert value(text, "hutch_broker_reconnects_total", node="127.0.0.1:5672") >= 1
    assert value(text, "hutch_broker_node", node="127.0.0.1:5672") == 1


def test_metrics_addr_in_use_is_a_clear_error(tmp_path: Any) -> None:
    import socket
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "service.cli",
                "worker",
                "--tasks",
                "tests.tasks",
                "--metrics-addr",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "HUTCH_BROKER_URL": "amqp://guest:guest@127.0.0.1:1/"},
        )
    assert result.returncode == 2
    assert "metrics-addr" in result.stderr and "Traceback" not in result.stderr
