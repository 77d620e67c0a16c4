"""The fault proxy of tests/netproxy.py: first against a local echo server, where each fault
can be measured byte by byte, then between aiormq and the real RabbitMQ.

Timings: delays are checked with lower bounds (the proxy may be late, never early) and
loose upper bounds; the machine is small and shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import socketserver
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiormq
import pytest

from tests.conftest import BROKER, ROOT, until
from tests.netproxy import FaultProxy, ThreadedProxy

# -- a local echo server -------------------------------------------------------------------


@dataclass
class Echo:
    """Echoes each connection's bytes back; half-closes after the client's EOF. Counts what
    it saw, so a test can tell what reached the far side of the proxy."""

    port: int = 0
    connections: int = 0
    received: int = 0
    resets: int = 0
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while data := await reader.read(65536):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
            writer.write_eof()
        except ConnectionResetError:
            self.resets += 1
            writer.transport.abort()


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    e = Echo()
    server = await asyncio.start_server(e.handle, "127.0.0.1", 0)
    e.port = server.sockets[0].getsockname()[1]
    try:
        yield e
    finally:
        server.close()
        for writer in e.writers:
            writer.transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0)  # let the handlers see their transports go


@pytest.fixture
async def proxy(echo: Echo) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(upstream=("127.0.0.1", echo.port)) as p:
        yield p


class Client:
    """A stream connection through the proxy, closed by the ``connect`` fixture."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def ping(self, payload: bytes, timeout: float = 5) -> float:
        """Send ``payload``, wait for its echo; return the round trip in seconds."""
        start = time.monotonic()
        self.writer.write(payload)
        await self.writer.drain()
        assert await asyncio.wait_for(self.reader.readexactly(len(payload)), timeout) == payload
        return time.monotonic() - start

    async def silent(self, seconds: float) -> bool:
        """True if nothing arrives for ``seconds`` and the connection is still open."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), seconds)
        except TimeoutError:
            return not self.reader.at_eof() and not self.writer.is_closing()
        raise AssertionError(f"expected silence, got {data!r}")

    async def reset_or_eof(self, timeout: float) -> str:
        """Wait for the connection to end: "reset" (a RST) or "eof" (a FIN)."""
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except ConnectionResetError:
            return "reset"
        assert data == b"", f"expected the connection to end, got {data!r}"
        return "eof"


@pytest.fixture
async def connect(proxy: FaultProxy) -> AsyncIterator[Any]:
    clients: list[Client] = []

    async def open_client() -> Client:
        client = Client(*await asyncio.open_connection(proxy.host, proxy.port))
        clients.append(client)
        return client

    try:
        yield open_client
    finally:
        for client in clients:
            client.writer.transport.abort()


# -- forwarding and faults, byte by byte ---------------------------------------------------


async def test_forwards_a_megabyte_byte_exact_and_half_closes(
    proxy: FaultProxy, connect: Any, echo: Echo
) -> None:
    data = random.Random(7).randbytes(1 << 20)
    client = await connect()

    async def send() -> None:
        client.writer.write(data)
        await client.writer.drain()
        client.writer.write_eof()  # the echo server answers with its own EOF

    sender = asyncio.create_task(send())
    echoed = await asyncio.wait_for(client.reader.read(-1), 30)  # up to the echo's EOF
    await sender
    assert echoed == data
    stats = proxy.stats
    assert (stats.accepted, stats.bytes_up, stats.bytes_down) == (1, len(data), len(data))
    # Both directions ended with an EOF: the proxy let the connection go.
    assert await until(lambda: proxy.stats.active == 0, 5)


async def test_delay_adds_the_round_trip_without_serialising(
    proxy: FaultProxy, connect: Any
) -> None:
    client = await connect()
    await client.ping(b"warm")  # the connection is live before the delay starts
    proxy.delay(rtt=0.2)
    assert await client.ping(b"slow") >= 0.2

    # Twenty pings 10 ms apart, each its own chunk, all in flight at once: each takes one
    # RTT and all of them about RTT + 0.2 s of sending. A proxy that slept per chunk in
    # turn would need 20 * 0.1 s in each direction.
    pings = [b"%02d" % i for i in range(20)]
    sent: list[float] = []
    arrived: list[float] = []

    async def read() -> bytes:
        got = b""
        for _ in pings:
            got += await client.reader.readexactly(2)
            arrived.append(time.monotonic())
        return got

    reader = asyncio.create_task(read())
    start = time.monotonic()
    for ping in pings:
        sent.append(time.monotonic())
        client.writer.write(ping)
        await client.writer.drain()
        await asyncio.sleep(0.01)
    assert await asyncio.wait_for(reader, 10) == b"".join(pings)  # in order
    elapsed = time.monotonic() - start
    assert min(a - s for a, s in zip(arrived, sent, strict=True)) >= 0.2
    assert elapsed < 1.5, f"{elapsed:.2f} s: chunks were delayed one after another"

    proxy.delay(0)
    assert await client.ping(b"fast") < 0.2


async def test_throttle_limits_each_direction(proxy: FaultProxy, connect: Any) -> None:
    client = await connect()
    await client.ping(b"warm")
    proxy.throttle(100_000)
    data = random.Random(8).randbytes(200_000)
    start = time.monotonic()
    elapsed = await client.ping(data, timeout=20)
    # 200 kB at 100 kB/s each way, both ways at once: 2 s (less one 50 ms burst).
    assert 1.8 <= elapsed < 6, f"{elapsed:.2f} s"
    assert time.monotonic() - start >= 1.8
    proxy.restore()
    assert await client.ping(data) < 1.5


async def test_stall_holds_bytes_silently_and_restore_delivers_them(
    proxy: FaultProxy, connect: Any, echo: Echo
) -> None:
    client = await connect()
    await client.ping(b"warm")
    proxy.stall()
    for part in (b"a", b"b", b"c"):
        client.writer.write(part)
        await client.writer.drain()
        await asyncio.sleep(0.02)
    assert await client.silent(0.5)  # no data, no EOF: a black hole
    assert echo.received == 4  # "warm" only: nothing went upstream

    # A new connection is accepted but held too; the upstream does not hear of it yet.
    late = await connect()
    late.writer.write(b"late")
    assert await late.silent(0.3)
    assert (echo.connections, proxy.stats.active) == (1, 2)

    proxy.restore()
    assert await asyncio.wait_for(client.reader.readexactly(3), 5) == b"abc"
    assert await asyncio.wait_for(late.reader.readexactly(4), 5) == b"late"
    assert echo.connections == 2

    # One way only: the echo server gets the bytes, the client hears nothing back.
    proxy.stall("down")
    client.writer.write(b"z")
    assert await until(lambda: echo.received == 4 + 3 + 4 + 1, 5)
    assert await client.silent(0.3)
    proxy.restore()
    assert await asyncio.wait_for(client.reader.readexactly(1), 5) == b"z"


async def test_cut_resets_both_ends_and_refuse_lasts_until_restore(
    proxy: FaultProxy, connect: Any, echo: Echo
) -> None:
    client = await connect()
    await client.ping(b"warm")
    start = time.monotonic()
    proxy.cut()
    assert await client.reset_or_eof(2) == "reset"  # SO_LINGER 0: a RST, not a FIN
    assert time.monotonic() - start < 2
    assert await until(lambda: echo.resets == 1, 2)  # the upstream end was reset too

    # Without refuse a cut is one event: the next connection works.
    again = await connect()
    await again.ping(b"again")

    proxy.cut(refuse=True)
    assert await again.reset_or_eof(2) == "reset"
    refused = await connect()  # accepted by the kernel, then reset at once
    assert await refused.reset_or_eof(2) == "reset"
    assert proxy.stats.refused == 1

    proxy.restore()
    after = await connect()
    await after.ping(b"after")
    assert (proxy.stats.accepted, echo.connections) == (4, 3)


async def test_an_unreachable_upstream_resets_the_client() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with FaultProxy(upstream=("127.0.0.1", port)) as proxy:
        client = Client(*await asyncio.open_connection(proxy.host, proxy.port))
        try:
            assert await client.reset_or_eof(5) == "reset"
        finally:
            client.writer.transport.abort()
        assert await until(lambda: proxy.stats.active == 0, 2)


async def test_close_drops_every_connection_and_leaves_no_task(echo: Echo) -> None:
    proxy = await FaultProxy(upstream=("127.0.0.1", echo.port)).start()
    live = Client(*await asyncio.open_connection(proxy.host, proxy.port))
    await live.ping(b"live")
    proxy.stall()
    held = Client(*await asyncio.open_connection(proxy.host, proxy.port))
    held.writer.write(b"held")
    assert await until(lambda: proxy.stats.active == 2, 5)
    try:
        await proxy.close()
        for client in (live, held):
            assert await client.reset_or_eof(2) in ("eof", "reset")
        assert proxy.stats.active == 0
        mine = [
            task
            for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "").startswith(
                ("_Connection.", "FaultProxy.")
            )
        ]
        assert mine == []
    finally:
        for client in (live, held):
            client.writer.transport.abort()


async def test_fault_methods_refuse_other_threads(proxy: FaultProxy) -> None:
    """Faults change state shared by the proxy's tasks: only its own loop may call them."""
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            proxy.stall()
        except RuntimeError as e:
            errors.append(e)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert len(errors) == 1


# -- the threaded form, from sync code; the process form -----------------------------------


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(ConnectionResetError):  # cut() resets this end too
            while data := self.request.recv(65536):
                self.request.sendall(data)


@pytest.fixture
def threaded_echo() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[:2]  # type: ignore[misc]
    finally:
        server.shutdown()
        server.server_close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(data)
        data += chunk
    return data


def test_threaded_proxy_from_sync_code(threaded_echo: tuple[str, int]) -> None:
    proxy = ThreadedProxy(upstream=threaded_echo).start()
    try:
        with socket.create_connection(proxy.address, timeout=5) as sock:
            sock.sendall(b"hello")
            assert _recv_exactly(sock, 5) == b"hello"

            proxy.stall()
            sock.sendall(b"held")
            sock.settimeout(0.5)
            with pytest.raises(TimeoutError):
                sock.recv(1)
            proxy.restore()
            sock.settimeout(5)
            assert _recv_exactly(sock, 4) == b"held"

            proxy.delay(rtt=0.2)
            start = time.monotonic()
            sock.sendall(b"x")
            assert _recv_exactly(sock, 1) == b"x"
            assert time.monotonic() - start >= 0.2

            stats = proxy.stats
            assert (stats.accepted, stats.active, stats.bytes_up) == (1, 1, 10)
            proxy.cut()
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
        # Wrong use is an error, not a race: FaultProxy itself belongs to the proxy thread.
        with pytest.raises(RuntimeError):
            proxy.proxy.restore()
    finally:
        proxy.stop()
    assert proxy._thread is not None and not proxy._thread.is_alive()
    proxy.stop()  # idempotent


async def test_process_form_with_stdin_commands(echo: Echo) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.netproxy",
        "--upstream",
        f"127.0.0.1:{echo.port}",
        "--listen",
        "127.0.0.1:0",
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    async def command(line: str) -> str:
        stdin.write(line.encode() + b"\n")
        await stdin.drain()
        return (await asyncio.wait_for(stdout.readline(), 10)).decode().strip()

    try:
        port = int(await asyncio.wait_for(stdout.readline(), 20))
        client = Client(*await asyncio.open_connection("127.0.0.1", port))
        try:
            await client.ping(b"hello")
            assert await command("stall") == "ok"
            client.writer.write(b"held")
            assert await client.silent(0.3)
            assert await command("restore") == "ok"
            assert await asyncio.wait_for(client.reader.readexactly(4), 5) == b"held"
            assert await command("throttle 1000000 up") == "ok"
            assert await command("delay 0.1") == "ok"
            assert await client.ping(b"slow") >= 0.1
            assert (await command("bogus")).startswith("error")
            assert json.loads(await command("stats"))["bytes_down"] == 13
            assert await command("cut") == "ok"
            assert await client.reset_or_eof(2) == "reset"
        finally:
            client.writer.transport.abort()
        stdin.close()  # EOF: the proxy stops
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# -- between aiormq and the real RabbitMQ --------------------------------------------------

BROKER_URL = f"amqp://{BROKER}/"
_host, _, _port = BROKER.rpartition("@")[2].rpartition(":")
BROKER_ADDRESS = (_host, int(_port))


@pytest.fixture
async def amqp_proxy() -> AsyncIterator[FaultProxy]:
    async with FaultProxy(upstream=BROKER_ADDRESS) as p:
        yield p


def queue_name() -> str:
    return f"netproxy-{uuid.uuid4().hex[:12]}"


async def publish_and_get(connection: aiormq.abc.AbstractConnection, queue: str) -> None:
    channel = await connection.channel()
    await channel.queue_declare(queue, exclusive=True, auto_delete=True)
    body = uuid.uuid4().bytes
    await channel.basic_publish(body, routing_key=queue)  # confirmed
    message = await channel.basic_get(queue, no_ack=True, timeout=10)
    assert message.body == body


async def queue_exists(queue: str) -> bool:
    """Asked straight of the broker, not through the proxy."""
    async with aiormq.connect(BROKER_URL) as connection:
        channel = await connection.channel()
        try:
            await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        except aiormq.exceptions.ChannelLockedResource:  # exclusive to its connection
            return True
        return True


async def closed_within(connection: aiormq.abc.AbstractConnection, timeout: float) -> float:
    """Seconds until ``connection`` closes by itself (``timeout`` if it does not)."""
    start = time.monotonic()
    await asyncio.wait([connection.closing], timeout=timeout)
    return time.monotonic() - start


async def test_amqp_publish_and_get_through_the_proxy(amqp_proxy: FaultProxy) -> None:
    queue = queue_name()
    async with aiormq.connect(amqp_proxy.via(BROKER_URL)) as connection:
        await publish_and_get(connection, queue)
        channel = await connection.channel()
        await channel.queue_delete(queue)
    stats = amqp_proxy.stats
    assert stats.accepted == 1 and stats.bytes_up > 0 and stats.bytes_down > 0


async def test_amqp_heartbeat_notices_a_stalled_link(amqp_proxy: FaultProxy) -> None:
    """aiormq gives up on a connection after (heartbeat + 1) * 3 s without a frame (9 s
    here), checked once a second by its heartbeat task; the stall closes nothing, so that
    timer is the only way it can know."""
    queue = queue_name()
    connection = await aiormq.connect(amqp_proxy.via(BROKER_URL + "?heartbeat=2"))
    try:
        await publish_and_get(connection, queue)
        amqp_proxy.stall()
        noticed = await closed_within(connection, 20)
        print(f"aiormq noticed the stalled link after {noticed:.1f} s")
        assert connection.is_closed
        assert 2 <= noticed < 15, f"{noticed:.1f} s"
    finally:
        await connection.close()
        amqp_proxy.restore()
    # The broker missed the client's heartbeats too and dropped its side: the exclusive
    # queue went with it. (Held frames and EOFs flushed by restore() end the proxy's pair.)
    assert await until(lambda: amqp_proxy.stats.active == 0, 10)
    assert not await queue_exists(queue)


async def test_amqp_cut_then_a_new_connection_after_restore(amqp_proxy: FaultProxy) -> None:
    queue = queue_name()
    url = amqp_proxy.via(BROKER_URL)
    connection = await aiormq.connect(url)
    try:
        await publish_and_get(connection, queue)
        amqp_proxy.cut(refuse=True)
        assert await closed_within(connection, 10) < 5  # the RST is noticed at once
        assert connection.is_closed
    finally:
        await connection.close()
    with pytest.raises((ConnectionError, aiormq.exceptions.AMQPConnectionError)):
        await asyncio.wait_for(aiormq.connect(url), 10)
    amqp_proxy.restore()
    async with aiormq.connect(url) as connection:
        await publish_and_get(connection, queue)  # the old queue went with the old connection
        channel = await connection.channel()
        await channel.queue_delete(queue)
