"""A loopback TCP proxy that injects network faults between hutch and RabbitMQ, for tests.

Killing the broker or calling ``rabbitmqctl close_all_connections`` only shows how hutch
handles a *clean* failure: the broker is gone or says goodbye. Real networks also fail
silently (a black-holed link where nothing arrives and nothing closes), slowly (latency,
thin pipes) and rudely (a reset in the middle of a frame). Put a :class:`FaultProxy`
between a worker or client and RabbitMQ, point the AMQP URL at it (:meth:`FaultProxy.via`)
and switch faults on and off while the test runs:

``cut(refuse=False)``
    Reset every connection (``SO_LINGER`` 0, so both ends get a RST, not a FIN). With
    ``refuse=True`` new connections are reset as soon as they are accepted, until
    :meth:`~FaultProxy.restore`.
``stall(direction="both")``
    Black-hole the link: bytes are read and held, nothing is forwarded and nothing is
    closed, so each peer sees silence. New connections are accepted and held too (the
    upstream connection is only opened once the stall ends). ``restore()`` delivers the
    held bytes in order, EOFs and resets included.
``delay(rtt)``
    Add ``rtt / 2`` of one-way latency to every chunk in each direction. Each chunk is
    stamped when it is read and released at ``stamp + rtt / 2``: many chunks can be in
    flight at once, so latency does not reduce throughput.
``throttle(rate, direction="both")``
    At most ``rate`` bytes/s in each chosen direction, shared by all connections (the
    proxy is one link), through a token bucket with a 50 ms burst.
``restore()``
    Clear every fault.

A fault applies at once to live connections and to new ones. Delay and stall are judged
when a chunk is about to be forwarded, not when it was read: bytes already held by a
stall or a delay go out as soon as ``restore()`` says so.

Use it in-process from async tests (``async with FaultProxy(...) as proxy``), from
sync tests through :class:`ThreadedProxy` (the same proxy on its own event loop in a
background thread, so it keeps forwarding while the test blocks), or as a separate
process: ``python -m tests.netproxy --upstream 127.0.0.1:5672 --listen 127.0.0.1:0``
prints its port, then takes one command a line on stdin (``cut [refuse]``,
``stall [up|down]``, ``delay RTT``, ``throttle RATE [up|down]``, ``restore``, ``stats``,
``quit``) and answers each with a line (``ok``, a JSON object for ``stats``, or
``error ...``). EOF on stdin stops it.

Directions: "up" is client to upstream (hutch to RabbitMQ), "down" is upstream to client.
A reset or EOF from one end is forwarded to the other in order after its bytes (a RST as a
RST, a FIN as a half-close); when the upstream cannot be reached the client is reset.

Not modelled: latency on the TCP handshake itself (connect is immediate, only data is
delayed), packet loss and reordering, and a refusal at ``connect()``: ``cut(refuse=True)``
accepts and resets, so the client's connect succeeds and its first read or write fails
with ``ECONNRESET`` (a true ``ECONNREFUSED`` would need the listening port released, and
another process could take it meanwhile).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import enum
import json
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, TypeVar, cast
from urllib.parse import urlsplit, urlunsplit

Address = tuple[str, int]
Direction = Literal["up", "down", "both"]
T = TypeVar("T")

#: Largest read from a socket, so one chunk is one stamp.
CHUNK = 65536
#: Chunks held per direction of a connection before the proxy stops reading that side (TCP
#: back-pressure): up to 4 MiB in flight during a delay or held during a stall.
QUEUE_CHUNKS = 64
#: Seconds allowed for the upstream connect; on failure the client connection is reset.
CONNECT_TIMEOUT = 10.0
#: A throttled lane sends in pieces worth this many seconds of its rate, and its bucket
#: holds one piece: a short burst, smooth enough for second-scale tests.
BURST_SECONDS = 0.05
#: ``SO_LINGER`` on, timeout 0: ``close()`` discards unsent data and sends a RST.
_LINGER_RST = struct.pack("ii", 1, 0)


class _End(enum.Enum):
    """How a direction ended, carried through the queue after its last bytes."""

    EOF = "eof"
    RESET = "reset"


#: A queued chunk: when it was read (``loop.time()``) and its bytes, or how the side ended.
_Item = tuple[float, bytes | _End]


@dataclass(frozen=True)
class Stats:
    """Counters since the proxy started. ``bytes_*`` count bytes forwarded, not held."""

    accepted: int  # connections accepted by the listener, refused ones included
    refused: int  # connections reset on arrival by ``cut(refuse=True)``
    active: int  # connections open now (held by a stall included)
    bytes_up: int  # client -> upstream
    bytes_down: int  # upstream -> client


class _Lane:
    """One direction of the link: its stall flag, throttle and byte count."""

    def __init__(self) -> None:
        self.stalled = False
        self.rate: float | None = None  # bytes/s; None: unlimited
        self.piece = 0  # bytes per throttled write
        self.tokens = 0.0
        self.refilled = 0.0  # loop.time() of the last refill
        self.bytes = 0

    def throttle(self, rate: float | None, now: float) -> None:
        self.rate = rate
        if rate is not None:
            self.piece = max(1, int(rate * BURST_SECONDS))
            self.tokens = float(self.piece)
            self.refilled = now

    def refill(self, now: float) -> None:
        assert self.rate is not None
        self.tokens = min(float(self.piece), self.tokens + (now - self.refilled) * self.rate)
        self.refilled = now


def _abort(writer: asyncio.StreamWriter, *, rst: bool) -> None:
    """Close a connection now, dropping what is unsent; with ``rst`` the peer gets a RST."""
    if rst:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


class _Connection:
    """One accepted client and its upstream: two queues, a reader and a writer for each."""

    def __init__(
        self, proxy: FaultProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.client_reader = reader
        self.client = writer
        self.upstream: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    def abort(self, *, rst: bool) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None and not writer.transport.is_closing():
                _abort(writer, rst=rst)

    async def run(self) -> None:
        proxy = self.proxy
        up: asyncio.Queue[_Item] = asyncio.Queue(QUEUE_CHUNKS)
        down: asyncio.Queue[_Item] = asyncio.Queue(QUEUE_CHUNKS)
        readers = [asyncio.create_task(proxy._read(self.client_reader, up))]
        writers: set[asyncio.Task[_End]] = set()
        rst = False
        try:
            # A stalled link carries no SYN either: the broker hears of this connection
            # only when the stall ends. The client's bytes are read and held meanwhile.
            await proxy._until_flowing()
            try:
                reader, upstream = await asyncio.wait_for(
                    asyncio.open_connection(*proxy.upstream), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError):
                rst = True
                return
            self.upstream = upstream
            readers.append(asyncio.create_task(proxy._read(reader, down)))
            writers = {
                asyncio.create_task(proxy._write(up, upstream, proxy._up)),
                asyncio.create_task(proxy._write(down, self.client, proxy._down)),
            }
            # Each writer ends after forwarding its side's EOF (half-close is kept), or on
            # a reset it forwards, or when the other end is gone: then both ends go.
            pending = set(writers)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task.exception() is not None or task.result() is _End.RESET:
                        rst = True
                        return
            self.client.close()
            upstream.close()
        finally:
            everything: list[asyncio.Task[None] | asyncio.Task[_End]] = [*readers, *writers]
            for each in everything:
                each.cancel()
            await asyncio.gather(*everything, return_exceptions=True)
            self.abort(rst=rst)


class FaultProxy:
    """Forward every connection on ``listen`` to ``upstream``, with faults on demand.

    Start it with ``async with`` (or :meth:`start` / :meth:`close`); the fault methods
    are plain functions that must be called on the proxy's own event loop (use
    :class:`ThreadedProxy` to drive it from another thread).
    """

    def __init__(
        self, upstream: Address = ("127.0.0.1", 5672), listen: Address = ("127.0.0.1", 0)
    ) -> None:
        self.upstream = upstream
        self.listen = listen
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[_Connection] = set()
        self._up = _Lane()
        self._down = _Lane()
        self._one_way = 0.0
        self._refuse = False
        self._accepted = 0
        self._refused = 0
        self._address: Address | None = None
        # Replaced (and the old one resolved) on every fault change, so that everything
        # waiting for a stall to end or a delay to pass looks again at once.
        self._changed: asyncio.Future[None] | None = None

    # -- life cycle ------------------------------------------------------------------------

    async def start(self) -> FaultProxy:
        self._loop = asyncio.get_running_loop()
        self._changed = self._loop.create_future()
        self._server = await asyncio.start_server(self._accept, *self.listen)
        host, port = self._server.sockets[0].getsockname()[:2]
        self._address = (host, port)
        return self

    async def close(self) -> None:
        """Stop listening and close every connection (unsent and held bytes are dropped)."""
        if self._server is None:
            return
        self._server.close()
        self._refuse = True
        tasks = []
        for connection in list(self._connections):
            connection.abort(rst=False)
            if connection.task is not None:
                connection.task.cancel()
                tasks.append(connection.task)
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._notify()
        self._server = None

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- where it is -------------------------------------------------------------------------

    @property
    def address(self) -> Address:
        """``(host, port)`` the proxy listens on; the port is known once started."""
        if self._address is None:
            raise RuntimeError("the proxy is not started")
        return self._address

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    def via(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's (credentials, vhost and
        query kept): ``via("amqp://guest:guest@127.0.0.1:5672/?heartbeat=2")``."""
        return _via(url, self.address)

    @property
    def stats(self) -> Stats:
        return Stats(
            accepted=self._accepted,
            refused=self._refused,
            active=len(self._connections),
            bytes_up=self._up.bytes,
            bytes_down=self._down.bytes,
        )

    # -- faults ------------------------------------------------------------------------------

    def cut(self, *, refuse: bool = False) -> None:
        """Reset every open connection, both ends (RST); with ``refuse``, also reset each
        new connection on arrival until :meth:`restore`."""
        self._on_loop()
        self._refuse = self._refuse or refuse
        for connection in list(self._connections):
            connection.abort(rst=True)
            if connection.task is not None:
                connection.task.cancel()

    def stall(self, direction: Direction = "both") -> None:
        """Forward nothing (in ``direction``) and close nothing, until :meth:`restore`."""
        self._on_loop()
        for lane in self._lanes(direction):
            lane.stalled = True
        self._notify()

    def delay(self, rtt: float) -> None:
        """Add ``rtt`` seconds to the round trip: ``rtt / 2`` on each direction's chunks.
        ``delay(0)`` removes it."""
        self._on_loop()
        if rtt < 0:
            raise ValueError(f"rtt must be >= 0, not {rtt}")
        self._one_way = rtt / 2
        self._notify()

    def throttle(self, rate: float | None, direction: Direction = "both") -> None:
        """At most ``rate`` bytes/s in each chosen direction (all connections together);
        ``None`` removes the limit."""
        self._on_loop()
        assert self._loop is not None
        if rate is not None and rate <= 0:
            raise ValueError(f"rate must be > 0 bytes/s, not {rate}")
        for lane in self._lanes(direction):
            lane.throttle(rate, self._loop.time())
        self._notify()

    def restore(self) -> None:
        """Clear every fault: no refusal, no stall (held bytes go out in order), no delay,
        no throttle."""
        self._on_loop()
        assert self._loop is not None
        self._refuse = False
        self._one_way = 0.0
        for lane in (self._up, self._down):
            lane.stalled = False
            lane.throttle(None, self._loop.time())
        self._notify()

    # -- inside --------------------------------------------------------------------------

    def _on_loop(self) -> None:
        """Faults change state the proxy's tasks share: only its own loop may do that."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if self._loop is None or running is not self._loop:
            raise RuntimeError(
                "call FaultProxy from its own running event loop (ThreadedProxy from others)"
            )

    def _lanes(self, direction: Direction) -> list[_Lane]:
        if direction == "both":
            return [self._up, self._down]
        if direction == "up":
            return [self._up]
        if direction == "down":
            return [self._down]
        raise ValueError(f"direction must be 'up', 'down' or 'both', not {direction!r}")

    def _notify(self) -> None:
        assert self._loop is not None and self._changed is not None
        changed, self._changed = self._changed, self._loop.create_future()
        if not changed.done():
            changed.set_result(None)

    async def _changes(self, timeout: float | None) -> None:
        """Return on the next fault change, or after ``timeout`` seconds."""
        assert self._changed is not None
        await asyncio.wait([self._changed], timeout=timeout)

    async def _until_flowing(self) -> None:
        while self._up.stalled or self._down.stalled:
            await self._changes(None)

    async def _admit(self, lane: _Lane, stamp: float, size: int) -> int:
        """Wait until bytes read at ``stamp`` may go on: the lane not stalled, the delay
        over, and tokens for a piece if throttled. Returns how many of ``size`` may go."""
        assert self._loop is not None
        while True:
            if lane.stalled:
                await self._changes(None)
                continue
            wait = stamp + self._one_way - self._loop.time()
            if wait > 0:
                await self._changes(wait)
                continue
            if lane.rate is None or size == 0:
                return size
            lane.refill(self._loop.time())
            piece = min(size, lane.piece)
            if lane.tokens >= piece:
                lane.tokens -= piece
                return piece
            await self._changes((piece - lane.tokens) / lane.rate)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._accepted += 1
        if self._refuse:
            self._refused += 1
            _abort(writer, rst=True)
            return
        connection = _Connection(self, reader, writer)
        self._connections.add(connection)
        # Our own task, not this callback's: asyncio logs a cancelled callback task as an
        # error, and cut() and close() cancel. The set is left when the task ends, even if
        # it is cancelled before it first runs.
        connection.task = asyncio.create_task(connection.run())
        connection.task.add_done_callback(lambda _: self._connections.discard(connection))

    async def _read(self, reader: asyncio.StreamReader, queue: asyncio.Queue[_Item]) -> None:
        """Queue what one side sends, each chunk stamped on arrival, then how it ended."""
        assert self._loop is not None
        while True:
            try:
                data = await reader.read(CHUNK)
            except OSError:
                await queue.put((self._loop.time(), _End.RESET))
                return
            if not data:
                await queue.put((self._loop.time(), _End.EOF))
                return
            await queue.put((self._loop.time(), data))

    async def _write(
        self, queue: asyncio.Queue[_Item], writer: asyncio.StreamWriter, lane: _Lane
    ) -> _End:
        """Forward queued chunks in order, each when the faults let it go; then the end."""
        while True:
            stamp, data = await queue.get()
            if isinstance(data, _End):
                await self._admit(lane, stamp, 0)
                if data is _End.EOF and writer.can_write_eof():
                    writer.write_eof()
                return data
            sent = 0
            while sent < len(data):
                n = await self._admit(lane, stamp, len(data) - sent)
                writer.write(data[sent : sent + n])
                sent += n
                lane.bytes += n
                await writer.drain()


def _via(url: str, address: Address) -> str:
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    host = f"[{address[0]}]" if ":" in address[0] else address[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{host}:{address[1]}"))


class ThreadedProxy:
    """A :class:`FaultProxy` on its own event loop in a daemon thread, for sync tests (or
    any thread): each fault method returns once the proxy has applied it."""

    def __init__(
        self, upstream: Address = ("127.0.0.1", 5672), listen: Address = ("127.0.0.1", 0)
    ) -> None:
        self.proxy = FaultProxy(upstream, listen)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> ThreadedProxy:
        """Start the thread and return once the proxy listens (or raise why it could not)."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="netproxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the proxy thread did not start")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close every connection, stop the loop and join the thread. Idempotent."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None or loop is None or stopping is None or not thread.is_alive():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed on its own meanwhile
            loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("the proxy thread did not stop")

    def __enter__(self) -> ThreadedProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # pragma: no cover - reported by start()
            self._error = self._error or e
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            await self.proxy.start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self.proxy.close()

    def _call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run ``fn`` on the proxy's loop and wait for its result."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the proxy is not running")
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                result.set_result(fn())
            except BaseException as e:
                result.set_exception(e)

        loop.call_soon_threadsafe(run)
        return result.result(timeout)

    # -- the FaultProxy interface, from any thread ------------------------------------------

    @property
    def address(self) -> Address:
        return self.proxy.address

    @property
    def host(self) -> str:
        return self.proxy.host

    @property
    def port(self) -> int:
        return self.proxy.port

    def via(self, url: str) -> str:
        return self.proxy.via(url)

    @property
    def stats(self) -> Stats:
        return self._call(lambda: self.proxy.stats)

    def cut(self, *, refuse: bool = False) -> None:
        self._call(lambda: self.proxy.cut(refuse=refuse))

    def stall(self, direction: Direction = "both") -> None:
        self._call(lambda: self.proxy.stall(direction))

    def delay(self, rtt: float) -> None:
        self._call(lambda: self.proxy.delay(rtt))

    def throttle(self, rate: float | None, direction: Direction = "both") -> None:
        self._call(lambda: self.proxy.throttle(rate, direction))

    def restore(self) -> None:
        self._call(self.proxy.restore)


# -- as a process: python -m tests.netproxy ------------------------------------------------


def _address(text: str) -> Address:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]"), int(port)


def _direction(words: Sequence[str]) -> Direction:
    word = words[0] if words else "both"
    if word not in ("up", "down", "both"):
        raise ValueError(f"direction must be up, down or both, not {word!r}")
    return cast(Direction, word)


def command(proxy: ThreadedProxy, line: str) -> str:
    """Apply one control line to ``proxy`` and return the reply line."""
    name, *args = line.split()
    match name:
        case "cut":
            if args not in ([], ["refuse"]):
                raise ValueError("usage: cut [refuse]")
            proxy.cut(refuse=bool(args))
        case "stall":
            proxy.stall(_direction(args))
        case "delay":
            proxy.delay(float(args[0]) if args else 0.0)
        case "throttle":
            if not args:
                raise ValueError("usage: throttle RATE|none [up|down]")
            rate = None if args[0] == "none" else float(args[0])
            proxy.throttle(rate, _direction(args[1:]))
        case "restore":
            proxy.restore()
        case "stats":
            return json.dumps(asdict(proxy.stats))
        case "quit":
            pass
        case _:
            raise ValueError(f"unknown command {name!r}")
    return "ok"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.netproxy", description=__doc__)
    parser.add_argument("--upstream", type=_address, default=("127.0.0.1", 5672))
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0))
    args = parser.parse_args(argv)
    with ThreadedProxy(args.upstream, args.listen) as proxy:
        print(proxy.port, flush=True)
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                reply = command(proxy, line)
            except (ValueError, IndexError) as e:
                reply = f"error {e}"
            print(reply, flush=True)
            if line.split()[0] == "quit":
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
