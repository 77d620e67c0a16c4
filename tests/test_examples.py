"""The example clients in other languages (examples/{node,go,ruby,shell}) against a live worker.

Each example is run as a subprocess against a real ``hutch worker --tasks examples.tasks`` in a
throwaway vhost: it calls add(2, b=3.5), makes one bad call and finds it in ``Q.dlq``, and must
exit 0. The test then checks the broker itself: the bad call is in ``Q.dlq`` with the expected
``x-hutch-reason``, and nothing is left in the work queue.

.ci/run installs every toolchain these need. Locally a test is skipped when a tool is missing,
but under CI=true a missing tool fails the test instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from service import protocol
from tests.conftest import ROOT, Broker, Vhost

EXAMPLES = ROOT / "examples"
DEBIAN_GOPATH = "/usr/share/gocode"
VECTORS = {
    v["name"]: v
    for v in json.loads((ROOT / "docs/protocol/vectors/vectors.json").read_text())["vectors"]
}
RUN_TIMEOUT = 240  # a cold Go build cache compiles amqp091-go first


def missing_or_skip(problem: str | None) -> None:
    """Fail under CI (the toolchain must be there), skip otherwise."""
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{problem} (CI=true: .ci/run must install it)")
    pytest.skip(problem)


def need_tools(*tools: str) -> str | None:
    missing = [t for t in tools if shutil.which(t) is None]
    return f"missing {', '.join(missing)}" if missing else None


def need_node() -> str | None:
    if problem := need_tools("node"):
        return problem
    for package in ("amqplib", "@msgpack/msgpack"):
        if not (EXAMPLES / "node/node_modules" / package / "package.json").exists():
            return f"{package} is not installed: run npm ci in examples/node"
    return None


def need_go() -> str | None:
    if problem := need_tools("go"):
        return problem
    if not Path(DEBIAN_GOPATH, "src/github.com/rabbitmq/amqp091-go").is_dir():
        return "amqp091-go is missing: apt-get install golang-github-rabbitmq-amqp091-go-dev"
    return None


def need_ruby() -> str | None:
    if problem := need_tools("ruby"):
        return problem
    check = subprocess.run(
        ["ruby", "-e", 'require "bunny"; require "msgpack"'], capture_output=True, text=True
    )
    if check.returncode != 0:
        return f"ruby cannot load bunny and msgpack: {check.stderr.strip()}"
    return None


def go_env() -> dict[str, str]:
    gopath = os.environ.get("GOPATH", "")
    env = {
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}:{DEBIAN_GOPATH}" if gopath else DEBIAN_GOPATH,
    }
    if not any(os.environ.get(v) for v in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
        env["GOCACHE"] = "/tmp/hutch-go-build-cache"
    return env


@dataclass
class Example:
    name: str
    command: list[str]
    cwd: Path
    need: Callable[[], str | None]
    content_type: str
    reason: str  # of the bad call
    env: dict[str, str] = field(default_factory=dict)
    reads_headers: bool = True  # amqp-tools cannot

    @property
    def good_body(self) -> str:
        """How the example prints the body of add(2, b=3.5): the protocol's test vector."""
        if self.content_type == protocol.MSGPACK:
            return str(VECTORS["add-msgpack"]["body_hex"])
        return str(VECTORS["add-json"]["body_text"])


EXAMPLE_LIST = [
    Example(
        "node-msgpack",
        ["node", "call.mjs"],
        EXAMPLES / "node",
        need_node,
        protocol.MSGPACK,
        "bad_args",
    ),
    Example(
        "node-json",
        ["node", "call.mjs"],
        EXAMPLES / "node",
        need_node,
        protocol.JSON,
        "bad_args",
        env={"HUTCH_CONTENT_TYPE": protocol.JSON},
    ),
    Example(
        "go",
        ["go", "run", "main.go"],
        EXAMPLES / "go",
        need_go,
        protocol.JSON,
        "bad_args",
        go_env(),
    ),
    Example(
        "ruby", ["ruby", "call.rb"], EXAMPLES / "ruby", need_ruby, protocol.MSGPACK, "unknown_task"
    ),
    Example(
        "shell",
        ["sh", "call.sh"],
        EXAMPLES / "shell",
        lambda: need_tools("amqp-publish", "amqp-consume", "timeout"),
        protocol.JSON,
        "unknown_task",
        reads_headers=False,
    ),
]


async def run(example: Example, vhost: Vhost, queue: str) -> tuple[int, str, float]:
    env = {
        **os.environ,
        "HUTCH_BROKER_URL": vhost.url,
        "HUTCH_QUEUE": queue,
        "HUTCH_TIMEOUT": "30",
        **example.env,
    }
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *example.command,
        cwd=example.cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        pytest.fail(f"{example.name} did not finish in {RUN_TIMEOUT} s:\n{out.decode()}")
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), time.monotonic() - started


@pytest.mark.parametrize("example", EXAMPLE_LIST, ids=lambda e: e.name)
async def test_example_against_a_live_worker(
    example: Example, start_worker: Any, broker: Broker, vhost: Vhost, queue: str
) -> None:
    missing_or_skip(example.need())
    worker = await start_worker("--tasks", "examples.tasks")

    code, out, seconds = await run(example, vhost, queue)
    report = (
        f"{example.name} exited {code} after {seconds:.1f} s:\n{out}\nworker log:\n{worker.log()}"
    )
    print(report)
    assert code == 0, report
    assert "all checks passed" in out, report
    assert "FAILED" not in out, report
    # The good call: the protocol's own vector for add(2, b=3.5) went out, and 5.5 came back.
    assert example.good_body in out, report
    assert '"result":5.5' in out.replace(" ", ""), report
    assert "ok: add(2, b=3.5) = 5.5" in out, report
    # The bad call: its error result, and the dead letter as the example saw it.
    assert f'"type":"{example.reason}"' in out.replace(" ", ""), report
    if example.reads_headers:
        assert f"x-hutch-reason={example.reason}" in out, report
    else:
        assert f"dead letter in {queue}.dlq:" in out, report

    # The broker's view: the bad call was dead-lettered and left there, nothing else was.
    dead = await broker.drain(f"{queue}.dlq")
    assert len(dead) == 1, [(m.headers, m.body) for m in dead]
    letter = dead[0]
    assert letter.headers[protocol.REASON_HEADER] == example.reason
    assert letter.headers[protocol.QUEUE_HEADER] == queue
    assert letter.headers[protocol.ERROR_TYPE_HEADER] == example.reason
    assert letter.content_type == example.content_type
    assert letter.headers[protocol.TASK_HEADER] == (
        "add" if example.reason == "bad_args" else "nope"
    )
    if example.reads_headers:
        assert letter.message_id and letter.message_id in out  # the id the example printed
    assert await broker.ready(queue) == 0
    assert worker.proc is not None and worker.proc.poll() is None, worker.log()


# -- examples/pipeline.py: the upload -> (scan || metadata) -> finalize flows --------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_pipeline_example_ends_every_flow_once(
    broker: Broker, vhost: Vhost, queue: str
) -> None:
    """10 files, every 3rd infected: 7 flows finish, 3 fail at the scan and run on_error."""
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "examples/pipeline.py",
            *("--files", "10", "--size-kb", "60", "--infected-every", "3", "--queue", queue),
        ],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "HUTCH_BROKER_URL": vhost.url,
            "HUTCH_METRICS_ADDR": f"127.0.0.1:{free_port()}",
        },
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,  # a hang guard, not a timing assertion
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    infected = {f"upload-{i:03d}.png" for i in (2, 5, 8)}
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("upload-")}
    assert set(lines) == {f"upload-{i:03d}.png" for i in range(10)}, out
    for name, line in lines.items():
        if name in infected:
            assert "failed    at step 1.0 (virus_scan): Infected:" in line, line
            assert f"{name}: signature Hutch.Test." in line, line
        else:
            assert "finished  " in line and "entropy " in line, line
    assert "10 flows (7 finished, 3 failed) in " in out, out
    assert "each flow ended exactly once, as expected: yes" in out, out
    assert "worker drained and exited with code 0" in out, out

    # The broker's view: each failed scan is dead-lettered once, naming its flow and step.
    dead = await broker.drain(f"{queue}.dlq")
    assert sorted(m.headers[protocol.FLOW_STEP_HEADER] for m in dead) == ["1.0"] * 3, [
        m.headers for m in dead
    ]
    assert {m.headers[protocol.TASK_HEADER] for m in dead} == {"examples.pipeline_tasks.virus_scan"}
    assert len({m.headers[protocol.FLOW_HEADER] for m in dead}) == 3
    assert await broker.ready(queue) == 0


# -- examples/node/flow.mjs: a two-step flow started by publishing its headers and body -------


@pytest.mark.parametrize("content_type", [protocol.MSGPACK, protocol.JSON])
async def test_node_starts_a_two_step_flow(
    content_type: str, start_worker: Any, broker: Broker, vhost: Vhost, queue: str
) -> None:
    missing_or_skip(need_node())
    worker = await start_worker("--tasks", "examples.tasks")
    example = Example(
        "node-flow",
        ["node", "flow.mjs"],
        EXAMPLES / "node",
        need_node,
        content_type,
        "bad_args",
        env={"HUTCH_CONTENT_TYPE": content_type},
    )

    code, out, seconds = await run(example, vhost, queue)
    report = f"flow.mjs exited {code} after {seconds:.1f} s:\n{out}\nworker log:\n{worker.log()}"
    print(report)
    assert code == 0, report
    assert "all checks passed" in out and "FAILED" not in out, report
    assert "ok: chain(add(2, b=3), add(10)) = 15" in out, report
    assert "ok: the failed flow's error result names its step 1" in out, report

    # The broker's view: the failed second step is the one dead letter, naming its flow.
    dead = await broker.drain(f"{queue}.dlq")
    assert len(dead) == 1, [(m.headers, m.body) for m in dead]
    letter = dead[0]
    assert letter.headers[protocol.FLOW_STEP_HEADER] == "1"
    assert letter.headers[protocol.TASK_HEADER] == "add"
    assert letter.content_type == content_type
    flow_id = letter.headers[protocol.FLOW_HEADER]
    assert letter.message_id == f"{flow_id}:1"
    assert f"result of flow {flow_id}: " in out, report
    assert await broker.ready(queue) == 0
    assert worker.proc is not None and worker.proc.poll() is None, worker.log()


# -- examples/test_tasks_offline.py: the pytest plugin, with and without a broker ---------------


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_offline_example(*options: str, broker_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(EXAMPLES / "test_tasks_offline.py"),
            *options,
        ],
        cwd=ROOT,
        env={**os.environ, "HUTCH_BROKER_URL": broker_url},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def test_offline_example_passes_with_no_broker() -> None:
    # The broker URL points at a closed port: anything that tried to reach RabbitMQ would fail.
    result = run_offline_example(broker_url=f"amqp://guest:guest@127.0.0.1:{closed_port()}/")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout, result.stdout


def test_offline_example_passes_against_the_broker(vhost: Vhost) -> None:
    # The same tests, run by the plugin against a real broker and a real hutch worker.
    unreachable = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    result = run_offline_example(f"--hutch-broker={vhost.url}", broker_url=unreachable)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 passed" in result.stdout, result.stdout
