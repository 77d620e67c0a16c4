"""One function per measured run. Each creates its own vhost and leaves nothing behind.

Every function returns a plain dict of figures for one run; `bench.suite` repeats them,
alternating hutch and its baseline, and summarises.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from bench import bodies
from bench.harness import (
    MSGPACK,
    AckWatch,
    BenchError,
    CpuMeter,
    Probe,
    Proc,
    Profiler,
    Vhost,
    bare_process,
    confirming_channel,
    hutch_worker,
    in_windows,
    loadavg,
    memory,
    prefill,
    queue_name,
    running,
    task_message,
    vhost,
)
from service import AsyncClient, protocol, step, topology

NOOP = "bench.tasks.noop"
SPIN = "bench.tasks.spin"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


@dataclass(frozen=True)
class Config:
    quick: bool
    repeat: int
    concurrency: int
    noop_tasks: int
    cpu_tasks: int
    calls: int
    call_warmup: int
    submits: int
    window: int
    bare_prefetch: int
    poll: float
    iters_per_ms: float
    startup_rounds: int  # start-ups per contender (each is one short sample)
    flow_calls: int  # sequential flows per latency run (`bench.flow_workloads`)
    concurrent_flows: int  # flows in flight at once in the throughput run
    # The peers asked for (--peers), by name: None if it can run, else why not.
    peers: dict[str, str | None] = field(default_factory=dict)

    def spin_iterations(self, ms: float) -> int:
        return max(1, round(self.iters_per_ms * ms))


# -- draining a pre-filled queue ---------------------------------------------------------------


async def time_drain(
    probe: Probe, n: int, proc: Proc, poll: float, profiler: Profiler | None = None
) -> dict[str, float]:
    """Poll the ready count: time from its first drop below ``n`` to 0 (consumer start excluded).

    Also returns the steady-state rate: messages per second between the first samples at or
    below 90 % and 10 % of ``n``, which is free of the start-up burst and of the final
    ``prefetch`` deliveries that are still unacked when the ready count reaches 0.
    """
    launched = last_change = time.perf_counter()
    stall = 30.0  # seconds without progress (start-up included) before giving up
    first_drop: float | None = None
    previous = n
    meter = CpuMeter(proc.pid)
    hi: tuple[float, int] | None = None
    lo: tuple[float, int] | None = None
    polls = 0
    while True:
        count = await probe.ready()
        now = time.perf_counter()
        polls += 1
        if first_drop is None and count < n:
            first_drop = now
            meter.start()
            if profiler is not None:
                await profiler.start(proc.pid)
        if hi is None and count <= 0.9 * n:
            hi = (now, count)
        if lo is None and count <= 0.1 * n:
            lo = (now, count)
        if count == 0:
            cpu = meter.stop(n)
            if profiler is not None:
                await profiler.stop()
            break
        proc.check_alive()
        if count != previous:
            previous, last_change = count, now
        elif now - last_change > stall:
            raise BenchError(
                f"{proc.label}: stuck at {count} of {n} messages ready for {stall:g}s\n"
                f"{proc.tail()}"
            )
        # Polling costs CPU on this 2-core machine (~10 % of a core at 5 ms), which the
        # Pool baseline does not pay: keep the resolution at 0.5 % of the time so far instead.
        elapsed = 0.0 if first_drop is None else now - first_drop
        await asyncio.sleep(min(max(poll, elapsed / 200), 0.05))
    assert first_drop is not None and hi is not None and lo is not None
    seconds = max(now - first_drop, 1e-6)
    steady = (hi[1] - lo[1]) / (lo[0] - hi[0]) if lo[0] > hi[0] and hi[1] > lo[1] else n / seconds
    return {
        "seconds": seconds,
        "per_s": n / seconds,
        "steady_per_s": steady,
        "startup_s": first_drop - launched,
        "polls": polls,
        **cpu,
    }


async def drain(
    cfg: Config,
    kind: str,
    task: str,
    args: list[Any],
    n: int,
    profiler: Profiler | None = None,
) -> dict[str, Any]:
    """Pre-fill ``n`` tasks, then start a hutch worker (or the bare consumer) and time the drain.

    ``kind``: ``"hutch"`` (defaults: prefetch sized in time), ``"hutch-prefetch"`` (hutch
    with the bare consumer's prefetch) or ``"bare"`` (only acks, whatever the task).
    ``profiler`` records the worker from the first delivery to the end of the drain.
    """
    body = protocol.encode_request(MSGPACK, args, {})
    async with vhost(delete_in_background=cfg.quick) as v:
        queue = queue_name()
        async with confirming_channel(v.url) as (_, channel):
            await topology.declare(channel, queue)
            await prefill(channel, queue, task, body, n)
            probe = Probe(channel, queue)
            await probe.wait_ready(n)
            proc = _consumer(cfg, kind, v.url, queue)
            load = loadavg()
            async with running(proc):
                result: dict[str, Any] = dict(await time_drain(probe, n, proc, cfg.poll, profiler))
                result["ack_confirm_s"] = await v.wait_all_acked(queue)
                result["memory"] = memory(proc.pid)
            result["loadavg"] = load
            return result


def _consumer(cfg: Config, kind: str, url: str, queue: str) -> Proc:
    if kind == "hutch":
        return hutch_worker(url, queue, cfg.concurrency)
    if kind == "hutch-prefetch":
        buffer = max(0, cfg.bare_prefetch - cfg.concurrency)
        return hutch_worker(url, queue, cfg.concurrency, "--prefetch-buffer", str(buffer))
    return bare_process("consume", url, queue, "--prefetch", str(cfg.bare_prefetch))


# -- start-up ----------------------------------------------------------------------------------


async def time_startup(
    make: Callable[[str], Proc], v: Vhost, timeout: float = 60.0
) -> dict[str, Any]:
    """Spawn ``make(url)`` through an `AckWatch`; seconds from the spawn to its first ack.

    The queue holds exactly one message, so the first ``basic.ack`` the consumer sends is that
    task's: the clock stops when the ack reaches the broker, the moment the task is done for it.
    """
    watch = AckWatch()
    port = await watch.start()
    try:
        proc = make(v.url_via(port))
        load = loadavg()
        spawned = time.perf_counter()
        async with running(proc):
            deadline = spawned + timeout
            while not watch.first_ack.done():
                proc.check_alive()
                if time.perf_counter() > deadline:
                    code = await proc.terminate()  # its last words, too, go into the error
                    raise BenchError(
                        f"{proc.label}: no ack {timeout:g}s after spawn ({watch.connections} "
                        f"connection(s), {watch.sent} bytes sent; exit code {code} on SIGTERM)"
                        f"\n{proc.tail()}"
                    )
                await asyncio.wait({watch.first_ack}, timeout=0.05)
            acked = watch.first_ack.result()
    finally:
        await watch.close()
    connected = watch.connected if watch.connected is not None else acked
    return {
        "seconds": acked - spawned,
        "connect_s": connected - spawned,  # spawn to the first connection: imports, set-up
        "loadavg": load,
    }


async def startup(cfg: Config, kind: str) -> dict[str, Any]:
    """One task waiting in a fresh queue; spawn a hutch worker (or the bare consumer); time it."""
    body = protocol.encode_request(MSGPACK, [], {})
    async with vhost(delete_in_background=cfg.quick) as v:
        queue = queue_name()
        async with confirming_channel(v.url) as (_, channel):
            await topology.declare(channel, queue)
            await prefill(channel, queue, NOOP, body, 1)
            await Probe(channel, queue).wait_ready(1)
        return await time_startup(lambda url: _consumer(cfg, kind, url, queue), v)


# -- multiprocessing.Pool baseline -------------------------------------------------------------


def pool_imap(iterations: int, n: int, workers: int, iters_per_ms: float) -> dict[str, Any]:
    """Time ``Pool(workers).imap_unordered(spin, [iterations] * n)``, pool start-up excluded."""
    context = multiprocessing.get_context("spawn")
    load = loadavg()
    with context.Pool(workers) as pool:
        # Every worker up, with bench.tasks imported, before the clock starts.
        warm = max(1, round(iters_per_ms * 30))
        pool.map(bodies.spin, [warm] * (workers * 2), chunksize=1)
        meter = CpuMeter(os.getpid())
        meter.start()
        started = time.perf_counter()
        for _ in pool.imap_unordered(bodies.spin, [iterations] * n):
            pass
        seconds = time.perf_counter() - started
        cpu = meter.stop(n)
    return {"seconds": seconds, "per_s": n / seconds, "loadavg": load, **cpu}


async def hutch_pool(cfg: Config, task: str, args: list[Any], n: int) -> dict[str, Any]:
    """hutch's own process pool without any broker: ``n`` jobs submitted at once, in-process.

    A diagnostic that separates the pool's per-job cost (one job per child at a time, a
    parent round trip between jobs) from the consumer's and the broker's. Uses
    `service.pool.supervisor` directly, so it follows that module's internal API.
    """
    from service.pool.jobs import Job
    from service.pool.supervisor import Pool as HutchPool
    from service.registry import import_task_modules, lookup

    import_task_modules(["bench.tasks"])
    spec = lookup(task)
    assert spec is not None
    body = protocol.encode_request(MSGPACK, args, {})
    finished = 0
    done = asyncio.Event()

    def on_done(job: Any, outcome: Any) -> None:
        nonlocal finished
        finished += 1
        if finished == n:
            done.set()

    pool = HutchPool(
        ["bench.tasks"],
        size=cfg.concurrency,
        on_done=on_done,
        time_limit=600,
        max_depth=32,
        max_result_size=1 << 20,
    )
    load = loadavg()
    await pool.start()  # children up, task module imported
    try:
        meter = CpuMeter(os.getpid())
        meter.start()
        started = time.perf_counter()
        for i in range(n):
            pool.submit(
                Job(
                    spec=spec,
                    content_type=MSGPACK,
                    body=body,
                    message_id=str(i),
                    attempt=1,
                    deliveries=0,
                    redelivered=False,
                    want_result=False,
                    delivery=None,  # type: ignore[arg-type]  # no broker in this run
                )
            )
        async with asyncio.timeout(120 + n):
            await done.wait()
        seconds = time.perf_counter() - started
        cpu = meter.stop(n)
    finally:
        await pool.close()
    return {"seconds": seconds, "per_s": n / seconds, "loadavg": load, **cpu}


async def pool(cfg: Config, ms: float) -> dict[str, Any]:
    return await asyncio.get_running_loop().run_in_executor(
        None, pool_imap, cfg.spin_iterations(ms), cfg.cpu_tasks, cfg.concurrency, cfg.iters_per_ms
    )


# -- round trips -------------------------------------------------------------------------------


def percentiles(latencies: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "p50_ms": cuts[49] * 1000,
        "p95_ms": cuts[94] * 1000,
        "p99_ms": cuts[98] * 1000,
        "max_ms": max(latencies) * 1000,
        "mean_ms": statistics.fmean(latencies) * 1000,
    }


async def roundtrip(cfg: Config, kind: str) -> dict[str, Any]:
    """``cfg.calls`` sequential calls of noop.

    ``kind``: hutch, bare (reply on an exclusive queue), bare-confirm (the same, the server
    confirming each reply before its ack) or bare-direct (RabbitMQ's direct reply-to).
    """
    async with vhost(delete_in_background=cfg.quick) as v:
        queue = queue_name()
        async with confirming_channel(v.url) as (_, channel):
            await topology.declare(channel, queue)
            if kind == "hutch":
                proc = hutch_worker(v.url, queue, cfg.concurrency)
            else:
                extra = ["--confirm"] if kind == "bare-confirm" else []
                proc = bare_process("serve", v.url, queue, "--prefetch", "4", *extra)
            load = loadavg()
            async with running(proc):
                await Probe(channel, queue).wait_consumer(proc)
                if kind == "hutch":
                    latencies = await _hutch_calls(cfg, v.url, queue)
                else:
                    latencies = await _bare_calls(cfg, v.url, queue, direct=kind == "bare-direct")
        result = percentiles(latencies)
        result["loadavg"] = load
        return result


async def _timed(n: int, warmup: int, call: Any) -> list[float]:
    for _ in range(warmup):
        await call()
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - started)
    return latencies


async def _hutch_calls(cfg: Config, url: str, queue: str) -> list[float]:
    async with AsyncClient(url, queue=queue, timeout=30) as client:
        return await _timed(cfg.calls, cfg.call_warmup, lambda: client.call(NOOP))


async def _bare_calls(cfg: Config, url: str, queue: str, *, direct: bool) -> list[float]:
    """Request/reply with plain aio-pika: confirmed publish, reply on an exclusive queue.

    ``direct``: the reply comes through RabbitMQ's direct reply-to instead, the pseudo-queue
    ``amq.rabbitmq.reply-to`` consumed with no_ack on the publishing channel (no queue at all:
    the broker hands the reply straight to this channel), the fastest RPC path it offers.
    """
    body = protocol.encode_request(MSGPACK, [], {})
    async with confirming_channel(url) as (_, channel):
        if direct:
            replies = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        else:
            replies = await channel.declare_queue(exclusive=True, auto_delete=True)
        waiting: dict[str, asyncio.Future[bytes]] = {}

        async def on_reply(message: AbstractIncomingMessage) -> None:
            future = waiting.pop(message.correlation_id or "", None)
            if future is not None and not future.done():
                future.set_result(message.body)

        await replies.consume(on_reply, no_ack=True)
        exchange = channel.default_exchange
        loop = asyncio.get_running_loop()

        async def call() -> bytes:
            message = task_message(NOOP, body, reply_to=replies.name)
            assert message.correlation_id is not None
            future: asyncio.Future[bytes] = loop.create_future()
            waiting[message.correlation_id] = future
            await exchange.publish(message, queue, mandatory=True)
            async with asyncio.timeout(30):
                return await future

        return await _timed(cfg.calls, cfg.call_warmup, call)


# -- publishing --------------------------------------------------------------------------------


async def publish(cfg: Config, kind: str) -> dict[str, Any]:
    """Publish ``cfg.submits`` noop tasks with confirms, ``cfg.window`` in flight."""
    n = cfg.submits
    async with vhost(delete_in_background=cfg.quick) as v:
        queue = queue_name()
        load = loadavg()
        async with confirming_channel(v.url) as (_, channel):
            await topology.declare(channel, queue)
            if kind == "hutch":
                async with AsyncClient(v.url, queue=queue) as client:
                    started = time.perf_counter()
                    await in_windows(n, cfg.window, lambda: client.submit(NOOP))
                    seconds = time.perf_counter() - started
            else:
                body = protocol.encode_request(MSGPACK, [], {})
                async with confirming_channel(v.url) as (_, publishing):
                    exchange = publishing.default_exchange
                    started = time.perf_counter()
                    await in_windows(
                        n,
                        cfg.window,
                        lambda: exchange.publish(task_message(NOOP, body), queue, mandatory=True),
                    )
                    seconds = time.perf_counter() - started
            await Probe(channel, queue).wait_ready(n)  # every confirmed message is there
        return {"seconds": seconds, "per_s": n / seconds, "loadavg": load}


# -- delayed tasks -----------------------------------------------------------------------------

DELAY = 2.0  # seconds of countdown in the delayed workload


async def delayed(cfg: Config, kind: str) -> dict[str, Any]:
    """``cfg.calls`` concurrent ``AsyncClient.call(noop)`` against a running worker, with a
    countdown of `DELAY` s (``kind`` "delayed", through the broker's delay queues) or none
    ("immediate"). Latency is from the call to its result, minus the countdown; the broker's
    CPU per task is read over the whole batch."""
    n = cfg.calls
    load = loadavg()
    async with vhost(delete_in_background=cfg.quick) as v:
        queue = queue_name()
        async with AsyncClient(v.url, queue=queue, timeout=120) as client:
            proc = hutch_worker(v.url, queue, cfg.concurrency)
            async with running(proc):
                await client.call(NOOP)  # the worker is up
                meter = CpuMeter(proc.pid)
                countdown = DELAY if kind == "delayed" else None
                latencies: list[float] = []

                async def one() -> None:
                    sent = time.perf_counter()
                    await client.call(step(NOOP, countdown=countdown))
                    latencies.append(time.perf_counter() - sent - (countdown or 0))

                meter.start()
                await asyncio.gather(*(one() for _ in range(n)))
                cpu = meter.stop(n)
    return {**percentiles(latencies), **cpu, "loadavg": load}


# -- memory ------------------------------------------------------------------------------------


async def footprint(cfg: Config, kind: str) -> dict[str, Any]:
    """RSS of an idle consumer, then again after it drained ``cfg.noop_tasks`` no-op tasks.

    The tasks are published while it consumes: nothing is timed here.
    """
    n = cfg.noop_tasks
    body = protocol.encode_request(MSGPACK, [], {})
    load = loadavg()
    async with vhost(delete_in_background=cfg.quick) as v:
        queue = queue_name()
        async with confirming_channel(v.url) as (_, channel):
            await topology.declare(channel, queue)
            proc = _consumer(cfg, kind, v.url, queue)
            async with running(proc):
                probe = Probe(channel, queue)
                await probe.wait_consumer(proc)
                await asyncio.sleep(0.3 if cfg.quick else 1.0)  # let start-up settle
                rest = memory(proc.pid)
                await prefill(channel, queue, NOOP, body, n)
                deadline = time.perf_counter() + 120 + n / 50
                while await probe.ready() > 0:
                    proc.check_alive()
                    if time.perf_counter() > deadline:
                        raise BenchError(f"{proc.label} did not drain {n} tasks")
                    await asyncio.sleep(0.05)
                await v.wait_all_acked(queue)
                after = memory(proc.pid)
        return {"rest": rest, "after": after, "loadavg": load}
