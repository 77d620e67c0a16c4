"""Fixtures for tests against the real RabbitMQ: a throwaway vhost, workers as subprocesses.

Every broker test gets its own vhost (created with rabbitmqctl, deleted afterwards), so
`close_all_connections --vhost` and queue deletions touch nothing else on the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from service import protocol, topology

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.cluster"]  # the private three-node cluster's fixtures
BROKER = os.environ.get("HUTCH_TEST_BROKER", "guest:guest@127.0.0.1:5672")
# The node rabbitmqctl talks to: the default one unless HUTCH_TEST_NODE names another, so a
# test that restarts the broker can run against a private node without disturbing the rest.
NODE = os.environ.get("HUTCH_TEST_NODE")


def rabbitmqctl(*args: str, check: bool = True) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *(["-n", NODE] if NODE else []), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout


@dataclass
class Vhost:
    name: str

    @property
    def url(self) -> str:
        return f"amqp://{BROKER}/{self.name}"

    def queue_counts(self, queue: str) -> dict[str, int]:
        """messages_ready, messages_unacknowledged and consumers, from the broker itself."""
        out = rabbitmqctl(
            "list_queues",
            "-p",
            self.name,
            "name",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
        )
        for line in out.splitlines():
            parts = line.split("\t")
            if parts[0] == queue:
                return {
                    "ready": int(parts[1]),
                    "unacked": int(parts[2]),
                    "consumers": int(parts[3]),
                }
        raise KeyError(queue)

    def messages_held(self) -> dict[str, int]:
        """Every queue of the vhost that holds messages, with how many (ready + unacked):
        where lost-looking messages actually are, for a failing test's message."""
        out = rabbitmqctl("list_queues", "-p", self.name, "name", "messages")
        held = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 2 and parts[1].isdigit() and int(parts[1]) > 0:
                held[parts[0]] = int(parts[1])
        return held

    def close_all_connections(self) -> None:
        rabbitmqctl("close_all_connections", "-p", self.name, "test: connection loss")


@pytest.fixture
def vhost() -> Iterator[Vhost]:
    name = f"hutch-test-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield Vhost(name)
    finally:
        rabbitmqctl("delete_vhost", name, check=False)


@pytest.fixture
def queue() -> str:
    return f"q-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def exec_log(tmp_path: Path) -> Path:
    return tmp_path / "executions.jsonl"


# -- the broker seen from a test ---------------------------------------------------------


class Broker:
    """A confirming publisher and a reader of queues, for one vhost."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, channel: Any) -> None:
        self.connection = connection
        self.channel = channel

    async def declare(self, queue: str) -> None:
        await topology.declare(self.channel, queue)

    async def publish(
        self,
        queue: str,
        task: str | None,
        *args: Any,
        content_type: str = protocol.MSGPACK,
        body: bytes | None = None,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        **props: Any,
    ) -> str:
        """Publish one task with a confirm; returns its id."""
        message_id = message_id or uuid.uuid4().hex
        all_headers = dict(headers or {})
        if task is not None:
            all_headers[protocol.TASK_HEADER] = task
        if body is None:
            body = protocol.encode_request(content_type, args, {})
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                body,
                content_type=content_type,
                headers=all_headers,
                message_id=message_id,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                timestamp=time.time(),
                **props,
            ),
            queue,
            mandatory=True,
        )
        return message_id

    async def drain(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take every ready message from a queue (acked: they are gone afterwards)."""
        try:
            q = await self.channel.declare_queue(queue, passive=True)
        except aio_pika.exceptions.ChannelClosed:  # the queue does not exist (yet)
            self.channel = await self.connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            return []
        messages = []
        while (message := await q.get(fail=False, no_ack=True)) is not None:
            messages.append(message)
        return messages

    async def wait_for(
        self, queue: str, count: int, timeout: float
    ) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Collect messages from ``queue`` until ``count`` arrived or ``timeout`` passed."""
        deadline = time.monotonic() + timeout
        found: list[aio_pika.abc.AbstractIncomingMessage] = []
        while len(found) < count and time.monotonic() < deadline:
            found.extend(await self.drain(queue))
            if len(found) < count:
                await asyncio.sleep(0.1)
        return found

    async def consumers(self, queue: str) -> int:
        q = await self.channel.declare_queue(queue, passive=True)
        return int(q.declaration_result.consumer_count)

    async def ready(self, queue: str) -> int:
        q = await self.channel.declare_queue(queue, passive=True)
        return int(q.declaration_result.message_count)


@pytest.fixture
async def broker(vhost: Vhost, queue: str) -> AsyncIterator[Broker]:
    connection = await aio_pika.connect(vhost.url)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    b = Broker(connection, channel)
    await b.declare(queue)
    try:
        yield b
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


# -- workers as separate processes ---------------------------------------------------------


@dataclass
class WorkerProcess:
    """``hutch worker`` in its own session, so a test can signal it or its whole group."""

    vhost: Vhost
    queue: str
    exec_log: Path
    log_path: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        env = {
            **os.environ,
            "HUTCH_BROKER_URL": self.vhost.url,
            "HUTCH_TASKS": "tests.tasks",
            "HUTCH_QUEUE": self.queue,
            "HUTCH_CONCURRENCY": "2",
            "HUTCH_METRICS_ADDR": "127.0.0.1:0",  # any free port; see metrics_url()
            "HUTCH_TEST_LOG": str(self.exec_log),
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", *self.args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> list[int]:
        return child_pids(self.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def metrics_url(self) -> str:
        """Base URL of the worker's HTTP endpoints, from its start-up log line."""
        match = re.search(r"metrics and probes on (http://[\d.]+:\d+)/metrics", self.log())
        assert match, self.log()
        return match.group(1)

    def send(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def killpg(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.killpg()
                self.proc.wait(5)
        self.killpg()


def child_pids(pid: int) -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            pids.extend(int(p) for p in (task / "children").read_text().split())
    return sorted(pids)


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())


@pytest.fixture
async def start_worker(
    vhost: Vhost, queue: str, exec_log: Path, tmp_path: Path, broker: Broker
) -> AsyncIterator[Any]:
    """Start workers on the test queue; waits until each is consuming. Stopped afterwards."""
    workers: list[WorkerProcess] = []

    async def start(*args: str, wait: bool = True, **env: str) -> WorkerProcess:
        w = WorkerProcess(
            vhost,
            queue,
            exec_log,
            tmp_path / f"worker-{len(workers)}.log",
            list(args),
            env,
        ).start()
        workers.append(w)
        if wait:
            # The worker logs this line once basic.consume is confirmed by the broker.
            deadline = time.monotonic() + 30
            while "consuming from" not in w.log():
                if w.proc is not None and w.proc.poll() is not None:
                    raise RuntimeError(f"worker exited early:\n{w.log()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker did not start consuming:\n{w.log()}")
                await asyncio.sleep(0.05)
        return w

    try:
        yield start
    finally:
        for w in workers:
            w.stop()


# -- the execution checker -------------------------------------------------------------------


def executions(path: Path) -> list[dict[str, Any]]:
    """Records written by tests.tasks: one per event (start or done) of a task run."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Report:
    lost: set[str]
    duplicated: dict[str, int]
    unexpected: set[str]

    def __str__(self) -> str:
        return (
            f"lost={len(self.lost)} duplicated={len(self.duplicated)} "
            f"unexpected={len(self.unexpected)}"
        )


def check(published: set[str], log: Path, dead_lettered: set[str] = frozenset()) -> Report:  # type: ignore[assignment]
    """Jepsen-style tally: lost = published and confirmed, never done, not dead-lettered."""
    done: dict[str, int] = {}
    for record in executions(log):
        if record["event"] == "done":
            done[record["id"]] = done.get(record["id"], 0) + 1
    finished = set(done) | set(dead_lettered)
    return Report(
        lost=published - finished,
        duplicated={k: v for k, v in done.items() if v > 1},
        unexpected=set(done) - published,
    )
