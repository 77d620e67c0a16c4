"""Flows against the real broker: chains, groups, fan-ins, failures, replays and faults.

Workers run tests.flow_tasks, whose tasks record every run (with current_task().flow and .step)
to the execution log, so each test can say which steps ran, how often, and with which ids.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from service import AsyncClient, TaskError, chain, group, protocol, routing, step
from tests.cli_helpers import hutch
from tests.conftest import Broker, Vhost, WorkerProcess, child_pids, executions, until

T = "tests.flow_tasks."


def steps_of(log: Path, flow: str) -> list[dict[str, Any]]:
    return [r for r in executions(log) if r.get("flow") == flow and r["event"] == "done"]


def pipeline(name: str, *, fail_if: str = "") -> Any:
    """The users' example: upload -> (scan || metadata) -> finalize, on_error report_failure."""
    return chain(
        step(T + "upload", name),
        group(step(T + "scan", kwargs={"fail_if": fail_if}), step(T + "metadata")),
        step(T + "finalize", kwargs={"tag": name}),
        on_error=step(T + "report_failure"),
    )


async def flow_workers(start_worker: Any, n: int = 1, **env: str) -> list[WorkerProcess]:
    return [await start_worker(HUTCH_TASKS="tests.flow_tasks", **env) for _ in range(n)]


async def test_each_result_is_the_next_steps_first_argument(
    vhost: Vhost, queue: str, start_worker: Any, exec_log: Path
) -> None:
    await flow_workers(start_worker)
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        flow = chain(step(T + "add", 1, 2), step(T + "add", 10), step(T + "listed", "x"))
        assert await client.call(flow) == [13, "x"]
        flow_id = await client.submit(flow)
        assert await until(lambda: len(steps_of(exec_log, flow_id)) == 3, 20)
    runs = steps_of(exec_log, flow_id)
    # current_task() names the flow and the step; message ids are {flow}:{step}.
    assert [(r["step"], r["id"]) for r in runs] == [
        ("0", f"{flow_id}:0"),
        ("1", f"{flow_id}:1"),
        ("2", f"{flow_id}:2"),
    ]


async def test_groups_give_their_results_in_member_order_wherever_they_are(
    vhost: Vhost, queue: str, start_worker: Any
) -> None:
    await flow_workers(start_worker)
    slow_first = group(
        step(T + "sleepy", "a", kwargs={"seconds": 0.3}),
        step(T + "sleepy", "b", kwargs={"seconds": 0}),
    )
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        # A group first, and last.
        assert await client.call(slow_first) == ["a", "b"]
        # In the middle: each member gets the same input; what follows gets the list.
        middle = chain(
            step(T + "add", 1, 1),
            group(step(T + "add", 10), step(T + "add", 20)),
            step(T + "listed"),
        )
        assert await client.call(middle) == [[12, 22]]
        # A chain as a member, a group inside a group.
        nested = group(
            chain(step(T + "add", 1, 1), step(T + "add", 5)),
            group(step(T + "add", 1, 2), step(T + "add", 3, 4)),
            step(T + "add", 100, 0),
        )
        assert await client.call(nested) == [7, [3, 7], 100]


async def test_the_users_pipeline_finishes_with_both_results(
    vhost: Vhost, queue: str, start_worker: Any, exec_log: Path
) -> None:
    await flow_workers(start_worker)
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        result = await client.call(pipeline("report-2026.pdf"))
    assert result == {"clean": True, "size": 4096, "tag": "report-2026.pdf"}
    ran = Counter(r["task"] for r in executions(exec_log) if r["event"] == "done")
    assert ran == {T + t: 1 for t in ("upload", "scan", "metadata", "finalize")}


async def test_a_member_failing_for_good_ends_the_flow_once(
    vhost: Vhost, queue: str, start_worker: Any, exec_log: Path, broker: Broker
) -> None:
    await flow_workers(start_worker)
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        with pytest.raises(TaskError) as raised:
            await client.call(pipeline("x-infected.pdf", fail_if="infected"))
    message = str(raised.value)
    assert "failed at step 1.0 (tests.flow_tasks.scan)" in message
    assert "infected: x-infected.pdf" in message
    # on_error ran once, with the flow id, the failed step and the error; finalize never ran.
    assert await until(lambda: any(r.get("terminal") == "failed" for r in executions(exec_log)), 10)
    reports = [r for r in executions(exec_log) if r.get("terminal") == "failed"]
    (report,) = reports
    flow_id = report["failed_flow"]
    assert report["id"] == f"{flow_id}:on_error"
    assert report["failed"] == {
        "id": "1.0",
        "task": T + "scan",
        "message_id": f"{flow_id}:1.0",
    }
    assert report["error"]["type"] == "ValueError" and report["error"]["reason"] == "failed"
    assert not [r for r in executions(exec_log) if r["task"] == T + "finalize"]
    # The member's dead letter names its flow and step.
    dlq = await hutch(vhost, "dlq", "ls", "--queue", queue, "--flow", flow_id, "--json")
    assert dlq.code == 0, dlq
    (letter,) = dlq.json_lines()
    assert (letter["flow"], letter["step"], letter["id"]) == (flow_id, "1.0", f"{flow_id}:1.0")
    await asyncio.sleep(1)  # nothing more comes of it
    assert len([r for r in executions(exec_log) if r.get("terminal")]) == 1


async def test_a_failing_step_in_a_chain_stops_it(
    vhost: Vhost, queue: str, start_worker: Any, exec_log: Path
) -> None:
    await flow_workers(start_worker)
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        flow = chain(
            step(T + "add", 1, 2),
            step(T + "boom"),
            step(T + "add", 5),
            on_error=step(T + "report_failure"),
        )
        flow_id = await client.submit(flow)
    assert await until(lambda: any(r.get("terminal") for r in executions(exec_log)), 20)
    (report,) = [r for r in executions(exec_log) if r.get("terminal")]
    assert report["failed_flow"] == flow_id and report["failed"]["id"] == "1"
    assert report["error"] == {"type": "RuntimeError", "message": "boom", "reason": "failed"}
    assert [r["step"] for r in steps_of(exec_log, flow_id)] == ["0", "on_error"]


async def test_a_flow_naming_a_task_no_worker_has_is_refused_before_it_runs(
    vhost: Vhost, queue: str, start_worker: Any, exec_log: Path, broker: Broker
) -> None:
    await flow_workers(start_worker)
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        with pytest.raises(TaskError) as raised:
            await client.call(chain(step(T + "add", 1, 2), step("no.such.task")))
    assert raised.value.type == "bad_flow"
    assert "no.such.task" in str(raised.value)
    assert executions(exec_log) == []  # the first step never ran
    (letter,) = await broker.drain(routing.dlq_name(queue))
    assert letter.headers[protocol.REASON_HEADER] == "bad_flow"


async def test_steps_may_run_on_other_queues(
    vhost: Vhost, queue: str, start_worker: Any, exec_log: Path
) -> None:
    other = queue + "-gpu"
    await flow_workers(start_worker)
    await flow_workers(start_worker, HUTCH_QUEUE=other)
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        flow = chain(
            step(T + "pid_of"),
            group(step(T + "pid_of", queue=other), step(T + "pid_of")),
            step(T + "listed"),
        )
        first_pid_list = await client.call(flow)
    ((other_pid, same_pid),) = first_pid_list
    assert other_pid != same_pid  # the member for `other` ran in the other worker's pool


async def test_replaying_the_failed_member_resumes_the_flow(
    vhost: Vhost, queue: str, start_worker: Any, exec_log: Path, tmp_path: Path
) -> None:
    await flow_workers(start_worker)
    flag = tmp_path / "still-infected"
    flag.touch()
    flow = chain(
        step(T + "upload", "a.pdf"),
        group(step(T + "scan_while", kwargs={"flag": str(flag)}), step(T + "metadata")),
        step(T + "finalize", kwargs={"tag": "resumed"}),
        on_error=step(T + "report_failure"),
    )
    async with AsyncClient(vhost.url, queue=queue, timeout=30) as client:
        flow_id = await client.submit(flow)
    assert await until(lambda: any(r.get("terminal") for r in executions(exec_log)), 20)
    flag.unlink()  # the cause is fixed: replay the member
    run = await hutch(vhost, "dlq", "replay", "--queue", queue, "--flow", flow_id)
    assert run.code == 0, run
    assert f"replayed {flow_id}:1.0" in run.out
    assert await until(
        lambda: any(r.get("terminal") == "finished" for r in executions(exec_log)), 20
    )
    finals = [r for r in steps_of(exec_log, flow_id) if r.get("terminal") == "finished"]
    assert [r["id"] for r in finals] == [f"{flow_id}:2"]


def _management(path: str) -> Any:
    request = urllib.request.Request(f"http://127.0.0.1:15672/api/{path}")
    request.add_header("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")  # guest:guest
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def joins_holder(vhost: Vhost) -> int | None:
    """The pid of the worker whose fan-in consumer is the active one (management API)."""
    quoted = urllib.request.quote(vhost.name, safe="")
    for consumer in _management(f"consumers/{quoted}"):
        if consumer["queue"]["name"] == routing.JOINS_QUEUE and consumer.get("active"):
            channel = consumer.get("channel_details")
            if not isinstance(channel, dict):
                continue  # the management API has not caught up with the channel yet ([])
            connection = channel["connection_name"]
            details = _management(f"connections/{urllib.request.quote(connection, safe='')}")
            name = details["client_properties"].get("connection_name", "")
            return int(name.split(" pid ")[1].split()[0])
    return None


async def test_the_fan_in_survives_the_death_of_the_worker_holding_it(
    vhost: Vhost, queue: str, start_worker: Any, exec_log: Path
) -> None:
    workers = await flow_workers(start_worker, 2)
    assert await until(lambda: joins_holder(vhost) is not None, 10)
    holder = joins_holder(vhost)
    async with AsyncClient(vhost.url, queue=queue, timeout=60) as client:
        flow = group(
            step(T + "sleepy", "fast", kwargs={"seconds": 0}),
            step(T + "sleepy", "slow", kwargs={"seconds": 3}),
        )
        call = asyncio.ensure_future(client.call(chain(flow, step(T + "listed"))))
        # The fast member's record is held by the holder while the slow one runs.
        assert await until(
            lambda: any(r["step"] == "0.0" and r["event"] == "done" for r in executions(exec_log)),
            10,
        )
        (victim,) = [w for w in workers if w.pid == holder]
        victim.killpg(signal.SIGKILL)
        assert await call == [["fast", "slow"]]
    # The management API shows the other worker's consumer as the active one soon after.
    assert await until(lambda: joins_holder(vhost) not in (None, holder), 15)


# -- faults under load ----------------------------------------------------------------------


async def run_flows_under_faults(
    vhost: Vhost,
    queue: str,
    start_worker: Any,
    exec_log: Path,
    *,
    flows: int,
    kills: int,
    seconds: float,
) -> dict[str, Any]:
    """``flows`` pipelines on three workers, 10 % of scans failing for good, ``kills`` random
    SIGKILLs (pool children, whole workers, the fan-in's holder) and one cut of every
    connection; then every flow must end exactly one way."""
    env = {"HUTCH_CONCURRENCY": "2", "HUTCH_TIME_LIMIT": "30"}
    workers = await flow_workers(start_worker, 3, **env)
    rng = random.Random(7)
    names = {f"file-{i}{'-infected' if i % 10 == 3 else ''}.pdf": i for i in range(flows)}
    expected: dict[str, str] = {}
    async with AsyncClient(vhost.url, queue=queue, timeout=None) as client:
        for name in names:
            flow_id = await client.submit(pipeline(name, fail_if="infected"))
            expected[flow_id] = "failed" if "infected" in name else "finished"
    killed: Counter[str] = Counter()
    # Every kind at least once, the rest at random, in random order.
    kinds = ["child", "worker", "holder"]
    kinds += [rng.choice(["child", "child", "worker", "holder"]) for _ in range(kills - 3)]
    rng.shuffle(kinds)
    cut_at = rng.randrange(kills)
    deadline = time.monotonic() + seconds
    for n, kind in enumerate(kinds):
        await asyncio.sleep(rng.uniform(0.2, 0.8))
        if n == cut_at:
            vhost.close_all_connections()
            killed["connection cut"] += 1
        live = [w for w in workers if w.proc is not None and w.proc.poll() is None]
        if kind == "child":
            pids = [p for w in live for p in child_pids(w.pid)]
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
                killed["child"] += 1
            continue
        holder = joins_holder(vhost) if kind == "holder" else None
        victim = next((w for w in live if w.pid == holder), None) or rng.choice(live)
        victim.killpg(signal.SIGKILL)
        killed["holder" if victim.pid == holder else "worker"] += 1
        workers.remove(victim)
        workers.append(await start_worker(HUTCH_TASKS="tests.flow_tasks", **env))

    def terminals() -> dict[str, list[dict[str, Any]]]:
        found: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in executions(exec_log):
            if r["event"] == "done" and r.get("terminal"):
                found[r.get("failed_flow") or r["flow"]].append(r)
        return found

    assert await until(
        lambda: expected.keys() <= terminals().keys(),
        max(30, deadline - time.monotonic()) + 60,
        0.5,
    )
    await asyncio.sleep(2)  # late duplicates, if any, show up
    ends = terminals()
    kinds = {flow: {r["terminal"] for r in runs} for flow, runs in ends.items()}
    wrong = {flow: kinds[flow] for flow in expected if kinds[flow] != {expected[flow]}}
    duplicated = {flow: runs for flow, runs in ends.items() if len(runs) > 1}
    # A terminal step repeated by a fault carries the same message id as its first run.
    assert all(len({r["id"] for r in runs}) == 1 for runs in duplicated.values())
    assert not wrong, wrong
    assert set(ends) == set(expected)  # nothing unexpected, nothing left open
    return {
        "flows": flows,
        "finished": sum(1 for k in expected.values() if k == "finished"),
        "failed": sum(1 for k in expected.values() if k == "failed"),
        "open": len(expected.keys() - ends.keys()),
        "terminal_duplicates": len(duplicated),
        "kills": dict(killed),
    }


async def test_flows_end_exactly_once_under_kills_and_a_connection_cut(
    vhost: Vhost, queue: str, start_worker: Any, exec_log: Path
) -> None:
    report = await run_flows_under_faults(
        vhost, queue, start_worker, exec_log, flows=100, kills=8, seconds=20
    )
    print("flow faults (CI):", report)
    assert report["open"] == 0


@pytest.mark.slow
async def test_flows_end_exactly_once_under_kills_and_a_connection_cut_long(
    vhost: Vhost, queue: str, start_worker: Any, exec_log: Path
) -> None:
    report = await run_flows_under_faults(
        vhost, queue, start_worker, exec_log, flows=500, kills=24, seconds=90
    )
    print("flow faults (slow):", report)
    assert report["open"] == 0 and sum(report["kills"].values()) >= 20
