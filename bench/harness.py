"""Plumbing shared by the workloads: throwaway vhosts, subprocesses, queue probes, memory.

Nothing here measures anything by itself; `bench.workloads` decides what is timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import struct
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

from service import protocol
from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BROKER = os.environ.get("HUTCH_BENCH_BROKER", "guest:guest@127.0.0.1:5672")
MSGPACK = protocol.MSGPACK


class BenchError(RuntimeError):
    """A run could not be measured (a process died, a queue never drained, ...)."""


# -- rabbitmqctl and vhosts --------------------------------------------------------------------


async def rabbitmqctl(*args: str, check: bool = True, timeout: float = 120) -> str:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl",
        "-q",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if check and proc.returncode != 0:
        raise BenchError(f"rabbitmqctl {' '.join(args)} failed: {err.decode().strip()}")
    return out.decode()


@dataclass(frozen=True)
class Vhost:
    name: str

    @property
    def url(self) -> str:
        return f"amqp://{BROKER}/{self.name}"

    def url_via(self, port: int) -> str:
        """The same vhost through a relay on this machine's ``port`` (see `AckWatch`)."""
        credentials = BROKER.rsplit("@", 1)[0]
        return f"amqp://{credentials}@127.0.0.1:{port}/{self.name}"

    async def queue_counts(self, queue: str) -> tuple[int, int]:
        """(messages_ready, messages_unacknowledged) as rabbitmqctl reports them.

        For quorum queues these lag the truth by up to the stats interval (~5 s).
        """
        out = await rabbitmqctl(
            "list_queues", "-p", self.name, "name", "messages_ready", "messages_unacknowledged"
        )
        for line in out.splitlines():
            parts = line.split("\t")
            if parts[0] == queue and len(parts) >= 3:
                return int(parts[1]), int(parts[2])
        raise BenchError(f"queue {queue!r} not listed in vhost {self.name!r}")

    async def wait_all_acked(self, queue: str, timeout: float = 30.0) -> float:
        """Poll rabbitmqctl until ``queue`` shows 0 ready and 0 unacked; returns seconds waited."""
        started = time.perf_counter()
        deadline = started + timeout
        while True:
            ready, unacked = await self.queue_counts(queue)
            if ready == 0 and unacked == 0:
                return time.perf_counter() - started
            if time.perf_counter() > deadline:
                raise BenchError(
                    f"rabbitmqctl still shows {ready} ready / {unacked} unacked on {queue!r} "
                    f"after {timeout:g}s"
                )
            await asyncio.sleep(0.25)


_deleting: set[asyncio.Task[str]] = set()


@contextlib.asynccontextmanager
async def vhost(*, delete_in_background: bool = False) -> AsyncIterator[Vhost]:
    """A fresh vhost for one run, deleted afterwards whatever happens.

    ``delete_in_background`` lets the next run start while this vhost is deleted (quick runs);
    `finish_deletions` waits for those deletions.
    """
    name = f"hutch-bench-{uuid.uuid4().hex[:10]}"
    await rabbitmqctl("add_vhost", name)
    try:
        await rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        yield Vhost(name)
    finally:
        deletion = asyncio.ensure_future(rabbitmqctl("delete_vhost", name, check=False))
        _deleting.add(deletion)
        deletion.add_done_callback(_deleting.discard)
        if not delete_in_background:
            # Shielded, so a Ctrl-C arriving during the cleanup still leaves no vhost behind.
            await asyncio.shield(deletion)


async def finish_deletions() -> None:
    """Wait for vhost deletions still running in the background."""
    while _deleting:
        await asyncio.gather(*_deleting, return_exceptions=True)


def queue_name() -> str:
    return f"bench-{uuid.uuid4().hex[:8]}"


# -- messages ----------------------------------------------------------------------------------


def task_message(
    task: str,
    body: bytes,
    *,
    reply_to: str | None = None,
    task_id: str | None = None,
) -> aio_pika.Message:
    """A task message shaped exactly like the one `service.AsyncClient` publishes."""
    task_id = task_id or uuid.uuid4().hex
    return aio_pika.Message(
        body,
        headers={protocol.TASK_HEADER: task},
        content_type=MSGPACK,
        message_id=task_id,
        correlation_id=task_id if reply_to else None,
        reply_to=reply_to,
        timestamp=time.time(),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def in_windows(n: int, window: int, one: Callable[[], Awaitable[Any]]) -> None:
    """Run ``one()`` ``n`` times with at most ``window`` in flight (a sliding window)."""
    remaining = iter(range(n))

    async def lane() -> None:
        for _ in remaining:  # shared iterator: each item is taken by exactly one lane
            await one()

    await asyncio.gather(*(lane() for _ in range(max(1, min(window, n)))))


@contextlib.asynccontextmanager
async def confirming_channel(url: str) -> AsyncIterator[tuple[AbstractConnection, AbstractChannel]]:
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        yield connection, channel
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


async def prefill(channel: AbstractChannel, queue: str, task: str, body: bytes, n: int) -> None:
    """Publish ``n`` tasks with confirms (1000 in flight); the queue must already exist."""
    exchange = channel.default_exchange
    await in_windows(
        n, 1000, lambda: exchange.publish(task_message(task, body), queue, mandatory=True)
    )


class Probe:
    """Reads a queue's ready count and consumer count with passive declares (no lag)."""

    def __init__(self, channel: AbstractChannel, queue: str) -> None:
        self._channel = channel
        self.queue = queue
        self._raw: Any = None

    async def _declare(self) -> Any:
        if self._raw is None:
            self._raw = await self._channel.get_underlay_channel()
        return await self._raw.queue_declare(self.queue, passive=True)

    async def ready(self) -> int:
        return int((await self._declare()).message_count)

    async def consumers(self) -> int:
        return int((await self._declare()).consumer_count)

    async def wait_ready(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.perf_counter() + timeout
        while (count := await self.ready()) != n:
            if time.perf_counter() > deadline:
                raise BenchError(f"{self.queue!r} holds {count} messages, expected {n}")
            await asyncio.sleep(0.02)

    async def wait_consumer(self, proc: Proc, timeout: float = 60.0) -> None:
        deadline = time.perf_counter() + timeout
        while await self.consumers() < 1:
            proc.check_alive()
            if time.perf_counter() > deadline:
                raise BenchError(f"no consumer on {self.queue!r} after {timeout:g}s\n{proc.tail()}")
            await asyncio.sleep(0.02)


# -- seeing an ack ----------------------------------------------------------------------------

_AMQP_HEADER = 8  # "AMQP" 0 0 9 1, sent once by the client before any frame
_FRAME_HEADER = struct.Struct(">BHI")  # type, channel, payload size; then payload and 0xCE
_BASIC_ACK = struct.pack(">HH", 60, 80)  # class basic, method ack


class AckWatch:
    """A loopback relay to the broker that notes when the first ``basic.ack`` passes through it.

    A consumer connected through it (`Vhost.url_via`) is timed to the moment its first ack
    reaches the broker. No broker query shows that moment: a passive ``queue.declare`` counts
    only ready messages (it drops at the delivery, not at the ack), and ``rabbitmqctl`` and the
    management API lag by the stats interval on quorum queues. The relay reads only the
    client-to-broker stream (consumer acks; publisher confirms travel the other way), frame
    headers only, and forwards every byte as it arrives, so it adds one loopback hop per frame
    (tens of microseconds) to every contender alike.
    """

    def __init__(self) -> None:
        host_port = BROKER.rsplit("@", 1)[-1]
        host, _, port = host_port.partition(":")
        self._upstream = (host, int(port or 5672))
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self.connected: float | None = None  # perf_counter of the first client connection
        self.connections = 0
        self.sent = 0  # bytes client to broker, for the error when no ack comes
        self.first_ack: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connected is None:
            self.connected = time.perf_counter()
        self.connections += 1
        try:
            async with asyncio.timeout(10):
                up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except (OSError, TimeoutError):
            writer.close()  # the consumer sees a lost connection, as without the relay
            return
        for pipe in (self._pump(reader, up_writer, watch=True), self._pump(up_reader, writer)):
            task = asyncio.ensure_future(pipe)
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, watch: bool = False
    ) -> None:
        pending = b""
        skip = _AMQP_HEADER if watch else 0
        try:
            while data := await reader.read(65536):
                writer.write(data)
                if watch:
                    self.sent += len(data)
                if watch and not self.first_ack.done():
                    pending += data
                    pending, skip = self._scan(pending, skip)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _scan(self, data: bytes, skip: int) -> tuple[bytes, int]:
        """Walk whole frames in ``data``; returns what is left and the bytes still to skip."""
        seen = time.perf_counter()
        offset = min(skip, len(data))
        skip -= offset
        while skip == 0 and len(data) - offset >= _FRAME_HEADER.size:
            kind, _, size = _FRAME_HEADER.unpack_from(data, offset)
            start = offset + _FRAME_HEADER.size
            if kind == 1 and len(data) >= start + 4 and data[start : start + 4] == _BASIC_ACK:
                self.first_ack.set_result(seen)
                return b"", 0
            end = start + size + 1
            if end > len(data):  # keep only the header's fields needed: skip the rest later
                if len(data) >= start + 4:
                    return b"", end - len(data)
                break
            offset = end
        return data[offset:], skip


# -- Redis, for Dramatiq's results ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def redis_server(exe: str) -> AsyncIterator[str]:
    """A throwaway ``redis-server`` on loopback (nothing saved), stopped by its own pid.

    Yields its URL.
    """
    port = free_port()
    argv = [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = Proc("redis-server", argv, clean_env())
    async with running(proc):
        deadline = time.perf_counter() + 10
        while True:
            proc.check_alive()
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"PING\r\n")
                answer = await reader.readline()
                writer.close()
                if answer.startswith(b"+PONG"):
                    break
            if time.perf_counter() > deadline:
                raise BenchError(f"redis-server did not answer on port {port}\n{proc.tail()}")
            await asyncio.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"


# -- subprocesses ------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any HUTCH_* setting that could change the worker's defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUTCH_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def hutch_command() -> list[str]:
    script = Path(sys.executable).parent / "hutch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "service.cli"]


def _temp_log() -> Path:
    fd, path = tempfile.mkstemp(prefix="hutch-bench-", suffix=".log")
    os.close(fd)
    return Path(path)


@dataclass
class Proc:
    """A subprocess in its own session, its output in a temporary log file."""

    label: str
    argv: list[str]
    env: dict[str, str]
    proc: asyncio.subprocess.Process | None = None
    log_path: Path = field(default_factory=lambda: _temp_log())

    async def start(self) -> Proc:
        with open(self.log_path, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise BenchError(
                f"{self.label} exited with code {self.proc.returncode}:\n{self.tail()}"
            )

    async def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait for the exit code, keeping the log (`stop` cleans up after)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await proc.wait()
        return proc.returncode

    async def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (a hutch worker drains), then SIGKILL to the whole group if it hangs."""
        proc = self.proc
        if proc is None:
            return None
        code: int | None = proc.returncode
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(timeout):
                    code = await proc.wait()
            except TimeoutError:
                code = None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers in its session, if any
        if proc.returncode is None:
            await proc.wait()
        with contextlib.suppress(OSError):
            self.log_path.unlink()
        return code


@contextlib.asynccontextmanager
async def running(proc: Proc) -> AsyncIterator[Proc]:
    await proc.start()
    try:
        yield proc
    finally:
        code = await asyncio.shield(proc.stop())
        if code not in (0, None) and code != -signal.SIGTERM:
            # Reported, not raised: the measurement is already taken.
            print(f"  warning: {proc.label} exited with code {code}", file=sys.stderr)


def hutch_worker(url: str, queue: str, concurrency: int, *extra: str) -> Proc:
    argv = [
        *hutch_command(),
        "worker",
        "--tasks",
        "bench.tasks",
        "--queue",
        queue,
        "--concurrency",
        str(concurrency),
        "--log-level",
        "WARNING",
        *extra,
    ]
    if "metrics_addr" in {f.name for f in dataclasses.fields(Settings)}:
        # Metrics stay on (their cost is part of the per-message path), on any free port so
        # concurrent workers on this machine do not collide on the default one.
        argv += ["--metrics-addr", "127.0.0.1:0"]
    return Proc("hutch worker", argv, clean_env(HUTCH_BROKER_URL=url))


def bare_process(mode: str, url: str, queue: str, *args: str) -> Proc:
    argv = [sys.executable, "-m", "bench.bare", mode, "--url", url, "--queue", queue, *args]
    return Proc(f"bare {mode}", argv, clean_env())


class Profiler:
    """py-spy attached to a process for a while, writing folded stacks (``--format raw``)."""

    def __init__(self, exe: str, output: Path, *, rate: int = 100, native: bool = False) -> None:
        self.exe = exe
        self.output = output
        self.rate = rate
        self.native = native
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self, pid: int) -> None:
        argv = [self.exe, "record", "--pid", str(pid), "--rate", str(self.rate)]
        argv += ["--format", "raw", "--output", str(self.output)]
        if self.native:
            argv.append("--native")
        self._proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            async with asyncio.timeout(30):
                _, err = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise BenchError("py-spy did not stop") from None
        if not self.output.exists():
            raise BenchError(f"py-spy wrote no profile: {err.decode(errors='replace').strip()}")


# -- memory ------------------------------------------------------------------------------------


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {key}")


def child_pids(pid: int) -> list[int]:
    pids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            pids.extend(int(p) for p in (task / "children").read_text().split())
    return sorted(pids)


def memory(pid: int) -> dict[str, Any]:
    """VmRSS and VmHWM (peak) of a process and each of its children, in MiB."""
    children = child_pids(pid)
    return {
        "parent_rss_mb": _status_kb(pid, "VmRSS") / 1024,
        "parent_hwm_mb": _status_kb(pid, "VmHWM") / 1024,
        "children_rss_mb": [_status_kb(c, "VmRSS") / 1024 for c in children],
    }


_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICKS


def broker_pid() -> int | None:
    """The RabbitMQ node's Erlang VM on this machine (not a rabbitmqctl one), if unique."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"beam.smp") and b"boot" in argv and b"rabbit" in argv:
                found.append(int(cmdline.parent.name))
    return found[0] if len(found) == 1 else None


@dataclass
class CpuMeter:
    """CPU seconds used by a process, its children and the broker between two readings."""

    pid: int
    broker: int | None = field(default_factory=broker_pid)
    _start: dict[str, float] = field(default_factory=dict)

    def _read(self) -> dict[str, float]:
        return {
            "parent": cpu_seconds(self.pid),
            "children": sum(cpu_seconds(c) for c in child_pids(self.pid)),
            "broker": cpu_seconds(self.broker) if self.broker else 0.0,
        }

    def start(self) -> None:
        self._start = self._read()

    def stop(self, tasks: int) -> dict[str, float]:
        """CPU seconds of each since `start`, and microseconds of each per task."""
        end = self._read()
        used = {k: end[k] - self._start.get(k, 0.0) for k in end}
        return {
            **{f"{k}_cpu_s": v for k, v in used.items()},
            **{f"{k}_cpu_us_per_task": v / tasks * 1e6 for k, v in used.items()},
        }


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return -1.0
