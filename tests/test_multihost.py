"""Three hosts, one queue: scaling out is adding hosts, and losing or restarting one loses nothing.

Each "host" is a hutch worker (parent plus a pool of 2) in a network namespace of its own, made
here with ``ip netns`` and joined by a veth pair, on a /30 of its own, to a gateway namespace. In
the gateway a relay (a thread of this test process) accepts AMQP connections and forwards them to
the broker on loopback, where the local RabbitMQ listens. Traffic stays on these veths and on
loopback: the host namespaces have no other route. Everything is deleted in a ``finally``, and
namespaces left behind by a test process that died are deleted by the next run.

Without root or ``ip`` (no network namespaces), or with HUTCH_TEST_NO_NETNS=1, the hosts fall back
to three process groups that share the machine's network, and the tests say so.

Executions are recorded per host (HUTCH_TEST_LOG), so tasks per host are exact; the checker
(`tests.conftest.check`) judges lost, duplicated and unexpected tasks over all hosts together.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    BROKER,
    ROOT,
    Broker,
    Report,
    Vhost,
    WorkerProcess,
    check,
    executions,
    until,
)

HOSTS = 3
PREFIX = "hutchmh"  # every namespace this module makes is named hutchmh-<pid>-<tag>-<role>
SUBNET = "10.213.0"  # host i: 10.213.0.(4i+2)/30, its gateway end 10.213.0.(4i+1)/30
RELAY_PORT = 5672
_NO_IPV6 = 'for f in /proc/sys/net/ipv6/conf/*/disable_ipv6; do echo 1 >"$f"; done 2>/dev/null; :'


# -- network namespaces --------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _delete_stale_namespaces() -> None:
    """Namespaces of earlier runs whose test process is gone (killed before its finally)."""
    listing = _ip("netns", "list", check=False).stdout
    for name in re.findall(rf"^({PREFIX}-(\d+)-\w+-\w+)", listing, re.MULTILINE):
        if not _pid_alive(int(name[1])):
            _ip("netns", "delete", name[0], check=False)


# The gateway's listening socket is made inside the gateway namespace by a short-lived helper,
# which passes it back over a Unix socket (SCM_RIGHTS): this process stays in its own namespace
# and reaches the broker on loopback, while the relay listens only where the hosts can reach it.
_LISTEN_IN_NAMESPACE = """
import socket, sys
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("0.0.0.0", int(sys.argv[2])))
listener.listen(64)
socket.send_fds(socket.socket(fileno=int(sys.argv[1])), [b"ok"], [listener.fileno()])
"""


_IN_NS = ("ip", "netns", "exec")


def _listen_in(netns: str, port: int) -> socket.socket:
    ours, theirs = socket.socketpair()
    args = (str(theirs.fileno()), str(port))
    with ours, theirs:
        subprocess.run(
            [*_IN_NS, netns, sys.executable, "-c", _LISTEN_IN_NAMESPACE, *args],
            pass_fds=[theirs.fileno()],
            check=True,
            capture_output=True,
            timeout=30,
        )
        _, fds, _, _ = socket.recv_fds(ours, 16, 1)
    return socket.socket(fileno=fds[0])


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except OSError:
        pass
    finally:
        sink.close()  # one side gone: close the other, as a router's NAT entry would end


class Relay:
    """TCP relay on its own thread and event loop, so it keeps forwarding while a test blocks."""

    def __init__(self, listener: socket.socket, upstream: tuple[str, int]) -> None:
        self._listener = listener
        self._upstream = upstream
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._thread = threading.Thread(target=self._run, name="broker-relay", daemon=True)
        self._ready = threading.Event()
        self.connections = 0

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the relay did not start")

    def stop(self) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, sock=self._listener)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for handler in list(self._handlers):
                handler.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.close()
            self._handlers.discard(handler)
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            writer.close()
            up_writer.close()
            self._handlers.discard(handler)


class Lab:
    """A gateway namespace and one namespace per host, or, failing that, plain process groups."""

    def __init__(self, hosts: int) -> None:
        tag = uuid.uuid4().hex[:5]
        self._tag = tag
        self.gateway = f"{PREFIX}-{os.getpid()}-{tag}-gw"
        self.namespaces = [f"{PREFIX}-{os.getpid()}-{tag}-h{i}" for i in range(hosts)]
        self._created: list[str] = []
        self._relay: Relay | None = None
        self.isolated = False
        self.why_not = ""

    def host_url(self, index: int, vhost: Vhost) -> str:
        credentials = BROKER.rsplit("@", 1)[0]
        if not self.isolated:
            return vhost.url
        return f"amqp://{credentials}@{SUBNET}.{4 * index + 1}:{RELAY_PORT}/{vhost.name}"

    def netns(self, index: int) -> str | None:
        return self.namespaces[index] if self.isolated else None

    def setup(self) -> None:
        try:
            self._setup_namespaces()
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            self.close()
            self.why_not = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            return
        self.isolated = True

    def _setup_namespaces(self) -> None:
        if os.environ.get("HUTCH_TEST_NO_NETNS"):
            raise RuntimeError("HUTCH_TEST_NO_NETNS is set")
        if os.geteuid() != 0:
            raise RuntimeError("network namespaces need root")
        _delete_stale_namespaces()
        for ns in [self.gateway, *self.namespaces]:
            _ip("netns", "add", ns)
            self._created.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            # No IPv6 on these links: no router solicitations, nothing but our IPv4 /30s.
            subprocess.run(
                [*_IN_NS, ns, "sh", "-c", _NO_IPV6],
                check=False,
                capture_output=True,
                timeout=20,
            )
        for i, ns in enumerate(self.namespaces):
            host_if, gw_if = f"hm{self._tag}{i}h", f"hm{self._tag}{i}g"
            _ip(
                "link", "add", host_if, "netns", ns, "type", "veth",
                "peer", "name", gw_if, "netns", self.gateway,
            )  # fmt: skip
            _ip("-n", ns, "addr", "add", f"{SUBNET}.{4 * i + 2}/30", "dev", host_if)
            _ip("-n", self.gateway, "addr", "add", f"{SUBNET}.{4 * i + 1}/30", "dev", gw_if)
            _ip("-n", ns, "link", "set", host_if, "up")
            _ip("-n", self.gateway, "link", "set", gw_if, "up")
        host, _, port = BROKER.rsplit("@", 1)[1].rpartition(":")
        self._relay = Relay(_listen_in(self.gateway, RELAY_PORT), (host, int(port)))
        self._relay.start()

    def close(self) -> None:
        if self._relay is not None:
            self._relay.stop()
            self._relay = None
        for ns in reversed(self._created):  # deleting a namespace deletes its veth ends
            _ip("netns", "delete", ns, check=False)
        self._created.clear()

    @property
    def relayed(self) -> int:
        """Connections the relay forwarded: proof that the hosts reached the broker through it."""
        return self._relay.connections if self._relay is not None else 0

    def describe(self) -> str:
        if self.isolated:
            return (
                f"{len(self.namespaces)} hosts in network namespaces, each on a /30 of "
                f"{SUBNET}.0/28 behind a relay to the broker"
            )
        return (
            f"{len(self.namespaces)} hosts as process groups "
            f"(no network namespaces: {self.why_not})"
        )


# -- hosts -----------------------------------------------------------------------------------


@dataclass
class Host(WorkerProcess):
    """``hutch worker`` as one host: in its namespace, with its own execution log."""

    name: str = ""
    netns: str | None = None
    broker_url: str = ""
    _log_offset: int = 0

    def start(self) -> Host:
        env = {
            **os.environ,
            "HUTCH_BROKER_URL": self.broker_url,
            "HUTCH_TASKS": "tests.tasks",
            "HUTCH_QUEUE": self.queue,
            "HUTCH_CONCURRENCY": "2",
            "HUTCH_METRICS_ADDR": "127.0.0.1:0",
            "HUTCH_DRAIN_TIMEOUT": "20",
            "HUTCH_TEST_LOG": str(self.exec_log),
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "service.cli", "worker", *self.args],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: "the host" to kill
        )
        log.close()
        return self

    def consuming(self) -> bool:
        return "consuming from" in self.log()[self._log_offset :]

    def done(self) -> list[str]:
        return [r["id"] for r in executions(self.exec_log) if r["event"] == "done"]

    def started(self) -> list[str]:
        return [r["id"] for r in executions(self.exec_log) if r["event"] == "start"]

    def network_namespace(self) -> str:
        return os.readlink(f"/proc/{self.pid}/ns/net")


async def wait_consuming(hosts: list[Host], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    for host in hosts:
        while not host.consuming():
            assert host.proc is not None
            if host.proc.poll() is not None:
                raise AssertionError(f"{host.name} exited early:\n{host.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{host.name} did not start consuming:\n{host.log()}")
            await asyncio.sleep(0.05)


async def wait_exit(host: Host, timeout: float) -> int | None:
    """Wait for a host's worker to exit without blocking the event loop."""
    assert host.proc is not None
    proc = host.proc
    await until(lambda: proc.poll() is not None, timeout, 0.05)
    return proc.poll()


def merged_log(hosts: list[Host], path: Path) -> Path:
    path.write_text("".join(h.exec_log.read_text() for h in hosts if h.exec_log.exists()))
    return path


def figures(hosts: list[Host], report: Report) -> str:
    per_host = ", ".join(f"{h.name}={len(h.done())}" for h in hosts)
    starts = [r for h in hosts for r in executions(h.exec_log) if r["event"] == "start"]
    return (
        f"tasks per host: {per_host}; lost={len(report.lost)} "
        f"duplicated={len(report.duplicated)} unexpected={len(report.unexpected)}; "
        f"starts of redelivered messages={sum(bool(r['redelivered']) for r in starts)} "
        f"(with x-delivery-count > 0: {sum(r['deliveries'] > 0 for r in starts)})"
    )


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab(HOSTS)
    lab.setup()
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def hosts(
    lab: Lab, vhost: Vhost, queue: str, broker: Broker, tmp_path: Path
) -> Iterator[list[Host]]:
    """Three hosts, not started; stopped (and, failing that, killed) before the lab goes."""
    group = [
        Host(
            vhost,
            queue,
            tmp_path / f"host{i}.jsonl",
            tmp_path / f"host{i}.log",
            name=f"host{i}",
            netns=lab.netns(i),
            broker_url=lab.host_url(i, vhost),
        )
        for i in range(HOSTS)
    ]
    try:
        yield group
    finally:
        for host in group:
            with contextlib.suppress(Exception):
                host.stop()


async def start_all(lab: Lab, hosts: list[Host]) -> None:
    for host in hosts:
        host.start()
    await wait_consuming(hosts)
    print(f"\n[multihost] {lab.describe()}")
    if lab.isolated:
        own = os.readlink("/proc/self/ns/net")
        spaces = {h.network_namespace() for h in hosts}
        assert len(spaces) == len(hosts) and own not in spaces, spaces
        assert lab.relayed >= len(hosts), lab.relayed  # at least one connection per host


async def publish(broker: Broker, queue: str, n: int, seconds: float) -> list[str]:
    return [await broker.publish(queue, "tests.tasks.work", seconds) for _ in range(n)]


async def wait_all_done(hosts: list[Host], ids: list[str], timeout: float) -> None:
    def all_done() -> bool:
        done: set[str] = set()
        for host in hosts:
            done.update(host.done())
        return set(ids) <= done

    assert await until(all_done, timeout, 0.1), [h.log()[-2000:] for h in hosts]


# -- the tests ---------------------------------------------------------------------------------


async def test_work_spreads_and_a_killed_host_loses_nothing(
    lab: Lab, hosts: list[Host], broker: Broker, queue: str, tmp_path: Path
) -> None:
    await start_all(lab, hosts)
    ids = await publish(broker, queue, 90, 0.3)
    victim = hosts[1]
    # Every host has finished some work, and the victim is in the middle of more.
    assert await until(
        lambda: (
            all(len(h.done()) >= 5 for h in hosts) and set(victim.started()) - set(victim.done())
        ),
        30,
        0.02,
    ), [h.log()[-2000:] for h in hosts]
    victim.killpg(signal.SIGKILL)  # the whole host: worker and pool children at once
    assert victim.wait(10) == -signal.SIGKILL
    in_flight = set(victim.started()) - set(victim.done())
    may_repeat = set(victim.started())  # a task done but not yet acked runs again too

    await wait_all_done(hosts, ids, 60)
    report = check(set(ids), merged_log(hosts, tmp_path / "all.jsonl"))
    summary = (
        f"host kill ({victim.name} SIGKILLed with {len(in_flight)} task(s) running): "
        f"{figures(hosts, report)}"
    )
    print(f"[multihost] {summary}")
    assert all(h.done() for h in hosts), summary
    assert report.lost == set() and report.unexpected == set(), summary
    assert set(report.duplicated) <= may_repeat, summary
    # What the killed host was running finished on the others.
    survivors = {task for h in hosts if h is not victim for task in h.done()}
    assert in_flight <= survivors, summary


async def test_rolling_restart_under_load_loses_and_repeats_nothing(
    lab: Lab, hosts: list[Host], broker: Broker, queue: str, tmp_path: Path
) -> None:
    await start_all(lab, hosts)
    published: list[str] = []
    stop = asyncio.Event()

    async def steady_stream() -> None:
        while not stop.is_set():
            published.append(await broker.publish(queue, "tests.tasks.work", 0.2))
            await asyncio.sleep(0.1)

    stream = asyncio.create_task(steady_stream())
    try:
        await asyncio.sleep(1.5)
        for host in hosts:  # one host at a time, as a DaemonSet with maxUnavailable 1 does
            host.send(signal.SIGTERM)  # to the worker only, as tini and KillMode=mixed do
            code = await wait_exit(host, 30)
            assert code == 0, f"{host.name} exited {code} on SIGTERM:\n{host.log()[-3000:]}"
            assert "drained" in host.log()[host._log_offset :], host.log()[-3000:]
            host.start()
            await wait_consuming([host])
            # The restarted host takes work again before the next one goes.
            before = len(host.done())
            assert await until(lambda h=host, n=before: len(h.done()) > n, 20, 0.05)
    finally:
        stop.set()
        await stream

    await wait_all_done(hosts, published, 60)
    report = check(set(published), merged_log(hosts, tmp_path / "all.jsonl"))
    summary = f"rolling restart ({len(published)} tasks published): {figures(hosts, report)}"
    print(f"[multihost] {summary}")
    assert all(h.done() for h in hosts), summary
    assert (report.lost, report.duplicated, report.unexpected) == (set(), {}, set()), summary
