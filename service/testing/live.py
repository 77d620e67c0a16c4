"""The stand-in's face on a real broker: a ``hutch worker`` subprocess on a queue of its own.

`LiveWorker` has what `service.testing.memory.MemoryWorker` has (``client``, ``clock``,
``run_until_idle``, ``wait_until``, ``dead_letters``), so one test can run against either. Its
queue is unique (``hutch-test-<hex>``) unless given, and `close` stops the worker and deletes
the queue, its dead letters and its scheduler queues. Its clock is the real one: ``advance``
sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Self, TypeVar, cast

import aio_pika

from service import routing, scheduler
from service.client import Client
from service.errors import HutchError
from service.ops.deadletters import DeadLetter

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to its end from sync code, even when the caller's thread has a loop."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class RealClock:
    """Real time, with `service.testing.FakeClock`'s methods: ``advance`` sleeps."""

    def time(self) -> float:
        return time.time()

    def advance(
        self, *, seconds: float = 0, minutes: float = 0, hours: float = 0, days: float = 0
    ) -> None:
        time.sleep(seconds + 60 * minutes + 3600 * hours + 86400 * days)


class LiveWorker:
    """A real worker for ``tasks`` on ``url``; use it through `broker_worker`."""

    def __init__(
        self,
        url: str,
        tasks: Iterable[str | ModuleType],
        *,
        queue: str | None = None,
        env: dict[str, str] | None = None,
        cwd: str | Path | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.url = url
        self.queue = queue or f"hutch-test-{uuid.uuid4().hex[:10]}"
        routing.check_queue_name(self.queue)
        self.clock = RealClock()
        modules = ",".join(t if isinstance(t, str) else t.__name__ for t in tasks)
        self._log = tempfile.NamedTemporaryFile(prefix="hutch-worker-", suffix=".log")  # noqa: SIM115
        self._seen: list[DeadLetter] = []
        self._since = 0  # dead letters before this index belong to an earlier test
        self._clients: list[Client] = []
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            env={
                **os.environ,
                "HUTCH_BROKER_URL": url,
                "HUTCH_TASKS": modules,
                "HUTCH_QUEUE": self.queue,
                "HUTCH_CONCURRENCY": os.environ.get("HUTCH_CONCURRENCY", "2"),
                "HUTCH_METRICS_ADDR": "127.0.0.1:0",
                "PYTHONUNBUFFERED": "1",
                **(env or {}),
            },
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + start_timeout
        while "consuming from" not in self.log():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                output = self.log()
                self.close()
                raise HutchError(f"the test worker did not start:\n{output}")
            time.sleep(0.05)
        match = re.search(r"metrics and probes on (http://[\d.]+:\d+)/metrics", self.log())
        self._metrics = match.group(1) + "/metrics" if match else None

    def log(self) -> str:
        return Path(self._log.name).read_text(errors="replace")

    def client(self, **options: Any) -> Client:
        """A real `service.Client` on the worker's queue (closed with the worker)."""
        options.setdefault("timeout", 60)
        client = Client(self.url, queue=options.pop("queue", self.queue), **options)
        self._clients.append(client)
        return client

    def begin(self) -> None:
        """Start a new test on a shared worker: dead letters so far are no longer listed."""
        self.dead_letters()
        self._since = len(self._seen)

    def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        """The dead letters of ``queue.dlq`` since the test began (taken from the broker)."""
        name = routing.dlq_name(queue or self.queue)
        self._seen.extend(_run(self._take(name)))
        return self._seen[self._since :]

    async def _take(self, name: str) -> list[DeadLetter]:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            dlq = await channel.declare_queue(name, passive=True)
            found = []
            while (message := await dlq.get(fail=False, no_ack=True)) is not None:
                found.append(DeadLetter.from_message(message, name))
            return found

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def run_until_idle(self, timeout: float = 60.0) -> None:
        """Wait until the queue is empty and the worker runs and holds nothing (seen three
        times in a row). Messages waiting in a delay are not seen: use `wait_until` for them."""
        quiet = 0
        deadline = time.monotonic() + timeout
        while quiet < 3:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker on {self.queue} still busy after {timeout:g}s")
            quiet = quiet + 1 if self._idle() else 0
            time.sleep(0.1)

    def _idle(self) -> bool:
        ready = _run(self._ready())
        if ready or self._metrics is None:
            return ready == 0
        with urllib.request.urlopen(self._metrics, timeout=5) as response:
            text = response.read().decode()
        busy = 0.0
        for line in text.splitlines():
            if line.startswith(("hutch_tasks_in_progress", "hutch_tasks_prefetched")):
                busy += float(line.rsplit(" ", 1)[1])
        return busy == 0

    async def _ready(self) -> int:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(self.queue, passive=True)
            return int(cast(Any, declared.declaration_result).message_count)

    def close(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(5)
        with contextlib.suppress(Exception):
            _run(self._delete())
        self._log.close()

    async def _delete(self) -> None:
        connection = await aio_pika.connect(self.url)
        async with connection:
            for name in (
                self.queue,
                routing.dlq_name(self.queue),
                scheduler.scheduler_queue(self.queue),
                scheduler.status_queue(self.queue),
            ):
                channel = await connection.channel()
                with contextlib.suppress(Exception):
                    await channel.queue_delete(name)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def broker_worker(
    url: str, tasks: Iterable[str | ModuleType], **options: Any
) -> Iterator[LiveWorker]:
    """A real ``hutch worker`` for ``tasks`` on a fresh queue of ``url``; stopped and its
    queues deleted afterwards. Options: ``queue``, ``env`` (extra environment, e.g.
    ``{"HUTCH_MAX_DELIVERIES": "3"}``), ``cwd``."""
    with LiveWorker(url, tasks, **options) as w:
        yield w
