"""The flow workloads (`service.chain`, `service.group`): what a pipeline costs over calling
the same tasks one by one from the client, and how many flows a worker finishes per second.

Every step is `bodies.relay`, a no-op that returns its input, so the figures are the
machinery's: each step is a delivery, a pool hand-off, the confirmed publish of what follows
and an ack, and a fan-in adds its join records and the join task. The baselines run the same
tasks with `AsyncClient.call`, each call waiting for its result before the next, as a user
writes the glue by hand. Each run has its own vhost and worker, like every other workload.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from bench.harness import (
    BenchError,
    Probe,
    confirming_channel,
    hutch_worker,
    loadavg,
    queue_name,
    running,
    vhost,
)
from bench.workloads import Config, percentiles
from service import AsyncClient, Chain, chain, group, step, topology

RELAY = "bench.tasks.relay"
CALL_TIMEOUT = 300.0  # seconds; 1,000 concurrent flows on a busy 2-core machine take a while

Shape = Callable[[AsyncClient], Awaitable[Any]]


def chain3() -> Chain:
    return chain(step(RELAY, 1), step(RELAY), step(RELAY))


async def chain3_by_hand(client: AsyncClient) -> Any:
    first = await client.call(RELAY, 1)
    second = await client.call(RELAY, first)
    return await client.call(RELAY, second)


def fanin2() -> Chain:
    return chain(group(step(RELAY, 1), step(RELAY, 2)), step(RELAY))


async def fanin2_by_hand(client: AsyncClient) -> Any:
    a = await client.call(RELAY, 1)
    b = await client.call(RELAY, 2)
    return await client.call(RELAY, [a, b])


async def fanin2_gathered(client: AsyncClient) -> Any:
    """The glue a careful user writes: both members at once, then the step after them."""
    a, b = await asyncio.gather(client.call(RELAY, 1), client.call(RELAY, 2))
    return await client.call(RELAY, [a, b])


def pipeline() -> Chain:
    """The example's shape: a step, a 2-way group, a step after it."""
    return chain(step(RELAY, 1), group(step(RELAY), step(RELAY)), step(RELAY))


async def pipeline_by_hand(client: AsyncClient) -> Any:
    first = await client.call(RELAY, 1)
    pair = await asyncio.gather(client.call(RELAY, first), client.call(RELAY, first))
    return await client.call(RELAY, list(pair))


SHAPES: dict[str, dict[str, Shape]] = {
    "chain3": {"flow": lambda c: c.call(chain3()), "calls": chain3_by_hand},
    "fanin2": {
        "flow": lambda c: c.call(fanin2()),
        "calls": fanin2_by_hand,
        "gathered": fanin2_gathered,
    },
    "pipeline": {"flow": lambda c: c.call(pipeline()), "calls": pipeline_by_hand},
}
EXPECTED = {"chain3": 1, "fanin2": [1, 2], "pipeline": [1, 1]}


@contextlib.asynccontextmanager
async def _pipeline_worker(cfg: Config) -> AsyncIterator[AsyncClient]:
    """A fresh vhost, a queue declared as hutch does, a worker consuming it, and a client."""
    async with vhost(delete_in_background=cfg.quick) as v:
        queue = queue_name()
        async with confirming_channel(v.url) as (_, channel):
            await topology.declare(channel, queue)
            proc = hutch_worker(v.url, queue, cfg.concurrency)
            async with running(proc), AsyncClient(v.url, queue=queue, timeout=CALL_TIMEOUT) as c:
                await Probe(channel, queue).wait_consumer(proc)
                yield c


async def latency(cfg: Config, shape: str, kind: str) -> dict[str, Any]:
    """``cfg.flow_calls`` flows of ``shape`` one after another (``kind`` "flow": one
    `AsyncClient.call` of the flow; otherwise the client runs its steps): latency per flow."""
    run = SHAPES[shape][kind]
    load = loadavg()
    async with _pipeline_worker(cfg) as client:
        for _ in range(cfg.call_warmup):
            await run(client)
        latencies = []
        for _ in range(cfg.flow_calls):
            started = time.perf_counter()
            result = await run(client)
            latencies.append(time.perf_counter() - started)
            if result != EXPECTED[shape]:
                raise BenchError(f"{shape} ({kind}) returned {result!r}, not {EXPECTED[shape]!r}")
    return {**percentiles(latencies), "loadavg": load}


async def throughput(cfg: Config, kind: str) -> dict[str, Any]:
    """``cfg.concurrent_flows`` pipelines at once (``kind`` "flow" or "calls"); flows/s from
    the first publish to the last result."""
    run = SHAPES["pipeline"][kind]
    n = cfg.concurrent_flows
    load = loadavg()
    async with _pipeline_worker(cfg) as client:
        for _ in range(cfg.call_warmup):
            await run(client)
        started = time.perf_counter()
        results = await asyncio.gather(*(run(client) for _ in range(n)))
        seconds = time.perf_counter() - started
    wrong = [r for r in results if r != EXPECTED["pipeline"]]
    if wrong:
        raise BenchError(f"{len(wrong)} of {n} pipelines returned something else: {wrong[0]!r}")
    return {"seconds": seconds, "per_s": n / seconds, "loadavg": load}
