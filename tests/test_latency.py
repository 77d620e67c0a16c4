"""A worker behind added network latency keeps its pool busy: the prefetch window covers the
broker round trip as well as the task time (service/prefetch.py).

One worker, one queue, the worker's every connection through `tests.netproxy.ThreadedProxy`:
a batch of 50 ms tasks with no delay, then the same batch with 200 ms of round trip added.
The property is a ratio of the two throughputs measured in the same test, not a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Broker, Vhost, check, executions
from tests.netproxy import ThreadedProxy
from tests.test_metrics import get, value

TASK_SECONDS = 0.05
ADDED_RTT = 0.2
BATCH = 300  # tasks per phase: about 8 s of work on two children
# The first fifth of a phase is left out of the rate: the window is still growing to the
# round trip it has just measured (a few seconds at most, by design: it grows rarely).
WARM_UP = BATCH // 5


@pytest.fixture
def proxy() -> Iterator[ThreadedProxy]:
    with ThreadedProxy() as threaded:
        yield threaded


async def run_batch(broker: Broker, queue: str, log: Path, phase: str) -> tuple[set[str], float]:
    """Publish ``BATCH`` sleep tasks and wait for them; the throughput in tasks/s, from the
    moment the ``WARM_UP``-th finished to the last."""
    ids = {
        await broker.publish(queue, "tests.tasks.work", TASK_SECONDS, message_id=f"{phase}-{n}")
        for n in range(BATCH)
    }
    for _ in range(1200):
        done = [r for r in executions(log) if r["event"] == "done" and r["id"] in ids]
        if len(done) >= BATCH:
            break
        await asyncio.sleep(0.1)
    times = sorted(r["time"] for r in done)
    assert len(times) >= BATCH, f"{phase}: only {len(times)} of {BATCH} done"
    return ids, (len(times) - WARM_UP) / (times[-1] - times[WARM_UP - 1])


async def test_added_round_trip_keeps_the_pool_busy(
    vhost: Vhost,
    queue: str,
    broker: Broker,
    start_worker: Any,
    exec_log: Path,
    proxy: ThreadedProxy,
) -> None:
    worker = await start_worker(HUTCH_BROKER_URL=proxy.via(vhost.url))
    plain_ids, plain = await run_batch(broker, queue, exec_log, "plain")
    proxy.delay(ADDED_RTT)
    delayed_ids, delayed = await run_batch(broker, queue, exec_log, "delayed")
    _, metrics = get(worker.metrics_url() + "/metrics")
    rtt = value(metrics, "hutch_broker_rtt_seconds", queue=queue)
    window = value(metrics, "hutch_prefetch_window", queue=queue)
    ratio = delayed / plain
    print(
        f"no delay {plain:.1f} tasks/s; {ADDED_RTT * 1000:.0f} ms added round trip "
        f"{delayed:.1f} tasks/s; ratio {ratio:.2f}; measured rtt {rtt:.3f} s, window {window:g}"
    )
    report = check(plain_ids | delayed_ids, exec_log)
    assert not report.lost and not report.unexpected, report
    # The proxy is never early, but the estimate is smoothed: what is left of the no-delay
    # samples after a phase of half-second pings is well under a tenth.
    assert rtt >= 0.9 * ADDED_RTT
    assert ratio >= 0.8, f"{delayed:.1f} vs {plain:.1f} tasks/s: the window starves the pool"
