"""A network that fails between worker and broker: a stalled link, and a cut while a result
is on its way. Both through tests/netproxy.py's FaultProxy, on loopback.

- **Stall** (the link stops forwarding and closes nothing: a half-open connection): the worker
  notices within the heartbeat bound (aiormq closes a connection that heard nothing for about
  three heartbeats, 5 s each), goes unready, and consumes again through its other node.
- **A cut during result publishing**: the result of a call is crawling up a throttled link when
  every connection is reset. The task's delivery must not have been acked before its result
  was confirmed: so the broker redelivers it, it runs again, and the caller gets its result.
  (An ack sent before the confirm would have got through the throttle, and the result would
  be lost with the task gone.)
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from service import AsyncClient, routing, step
from service.broker import HEARTBEAT
from tests.conftest import Broker, Vhost, WorkerProcess, check, executions, until
from tests.netproxy import FaultProxy
from tests.test_failover import address, done_ids, get, samples, scrape, started_by

# From the stall to the worker giving up on the connection: aiormq's bound is about
# 3 * (heartbeat + 1) s (service/broker.py); a margin for a loaded machine on top.
STALL_BOUND = 3 * (HEARTBEAT + 1) + 10


async def test_a_stalled_link_is_noticed_and_the_worker_moves_on(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    async with FaultProxy() as a, FaultProxy() as b:
        proxies = {address(p): p for p in (a, b)}
        worker: WorkerProcess = await start_worker(
            HUTCH_BROKER_URL=",".join(p.via(vhost.url) for p in (a, b))
        )
        nodes = samples(await scrape(worker), "hutch_broker_node")
        stalled = next(node for node, current in nodes.items() if current == 1)
        other = next(node for node in proxies if node != stalled)
        ids = [await broker.publish(queue, "tests.tasks.work", 0.3) for _ in range(16)]
        assert await until(lambda: len(executions(exec_log)) >= 4, 20)
        base = worker.metrics_url()
        stall_at, t0 = time.time(), time.monotonic()
        proxies[stalled].stall()
        unready_after = None
        while time.monotonic() - t0 < STALL_BOUND + 30:
            status = (await asyncio.to_thread(get, base + "/readyz"))[0]
            if status == 503 and unready_after is None:
                unready_after = time.monotonic() - t0
            if unready_after is not None and status == 200:
                break
            await asyncio.sleep(0.1)
        back_after = time.monotonic() - t0
        print(f"stall: unready after {unready_after}s, consuming via {other} after {back_after}s")
        assert unready_after is not None and unready_after < STALL_BOUND, worker.log()
        assert samples(await scrape(worker), "hutch_broker_node") == {stalled: 0, other: 1}
        assert await until(lambda: set(ids) <= done_ids(exec_log), 90, 0.1), worker.log()
        report = check(set(ids), exec_log)
        assert report.lost == set() and report.unexpected == set(), report
        # In flight on the stalled link: whatever started before the worker gave up on it
        # (its acks never arrived, so the broker gave those tasks to the new connection).
        assert set(report.duplicated) <= started_by(exec_log, stall_at + unready_after), report
        proxies[stalled].restore()


async def test_a_cut_while_the_result_is_sent_never_acks_before_the_confirm(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    size = 400_000  # 20 s through a 20 kB/s link: the cut lands while it is on its way
    async with FaultProxy() as proxy:
        await start_worker(HUTCH_BROKER_URL=proxy.via(vhost.url))
        async with AsyncClient(vhost.url, queue=queue, timeout=120) as client:
            proxy.throttle(20_000, "up")  # worker -> broker
            call = asyncio.ensure_future(client.call(step("tests.tasks.recorded_result", size)))
            assert await until(lambda: len(executions(exec_log)) >= 2, 30)  # it ran
            await asyncio.sleep(3)  # the result is partly sent
            assert not call.done()
            sent = proxy.stats.bytes_up
            proxy.cut()
            proxy.restore()
            result = await call
            print(f"cut after {sent} bytes up the link (result: {size})")
        assert result == "x" * size

        # Not acked before its result was confirmed: the broker redelivers it after the cut and
        # it runs again (the caller may have its result already: the worker's publisher sends
        # the unconfirmed result again on its new connection).
        def runs() -> list[dict[str, Any]]:
            return [r for r in executions(exec_log) if r["event"] == "done"]

        assert await until(lambda: len(runs()) == 2, 60), runs()
        assert len({r["id"] for r in runs()}) == 1, runs()
        assert await until(lambda: vhost.queue_counts(queue)["unacked"] == 0, 30)
    assert await broker.ready(queue) == 0
    assert await broker.ready(routing.dlq_name(queue)) == 0
