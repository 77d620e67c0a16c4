"""Several broker nodes: the URL list, and failing over between nodes against the real broker.

Two `tests.netproxy.FaultProxy` instances in front of the one local RabbitMQ stand for two
nodes of a cluster: stopping one (its port closes) or cutting it (every connection reset, new
ones refused) is a node going away, while the other still reaches the same queues. Each fault
is judged by the checker: lost 0, unexpected 0, duplicates only for tasks in flight.
"""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from prometheus_client.parser import text_string_to_metric_families

import service
from service import AsyncClient, Client, HutchError
from service.broker import Publisher
from service.errors import BrokerUnavailable
from service.nodes import Node, Nodes, parse_urls, safe_url
from tests.cli_helpers import hutch
from tests.conftest import Broker, Vhost, WorkerProcess, check, executions, until
from tests.netproxy import FaultProxy

# -- the list, without a broker -------------------------------------------------------------


def test_nodes_are_shuffled_once_and_failed_moves_past_a_node_once() -> None:
    urls = [f"amqp://u:p@rabbit-{i}:5672/v" for i in range(5)]
    orders = {tuple(n.url for n in Nodes(urls).all) for _ in range(50)}
    assert len(orders) > 1  # shuffled per process (here: per Nodes)
    nodes = Nodes(urls, shuffle=False)
    first, second = nodes.all[0], nodes.all[1]
    assert [n.url for n in nodes.order()] == urls
    nodes.failed(first)
    nodes.failed(first)  # a second connection losing the same node does not skip another
    assert nodes.current == second
    assert [n.url for n in nodes.order()] == urls[1:] + urls[:1]
    nodes.use(first)
    assert nodes.current == first


def test_node_address_is_host_and_port_with_the_scheme_default() -> None:
    assert Node("amqp://u:p@rabbit-1/v").address == "rabbit-1:5672"
    assert Node("amqps://u:p@rabbit-1/v").address == "rabbit-1:5671"
    assert Node("amqp://u:p@[::1]:5673/").address == "[::1]:5673"


def test_every_password_in_a_list_is_masked() -> None:
    urls = "amqp://a:first-secret@h1/,amqps://b:second-secret@h2:5671/?cafile=/ca.pem"
    shown = safe_url(urls)
    assert "secret" not in shown
    assert shown == "amqp://a:******@h1/,amqps://b:******@h2:5671/?cafile=/ca.pem"
    assert "secret" not in str(Nodes(urls))
    error = BrokerUnavailable([Node(u).safe for u in urls.split(",")], [TimeoutError()] * 2)
    assert "secret" not in str(error) and "h1" in str(error) and "h2:5671" in str(error)
    with pytest.raises(ValueError) as bad:
        parse_urls("amqp://a:pw-secret@h1/,amqp://b:pw-secret@h2:99999/")
    assert "secret" not in str(bad.value) and "URL 2 of 2" in str(bad.value)


def test_broker_unavailable_is_a_hutch_error_exported_from_service() -> None:
    assert service.BrokerUnavailable is BrokerUnavailable
    assert issubclass(BrokerUnavailable, HutchError)
    assert "BrokerUnavailable" in service.__all__


# -- helpers --------------------------------------------------------------------------------


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str, name: str) -> dict[str, float]:
    """``name``'s samples by their ``node`` label."""
    return {
        s.labels["node"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def scrape(worker: WorkerProcess) -> str:
    return (await asyncio.to_thread(get, worker.metrics_url() + "/metrics"))[1]


def address(proxy: FaultProxy) -> str:
    return f"{proxy.host}:{proxy.port}"


@pytest.fixture
async def two_nodes() -> AsyncIterator[tuple[FaultProxy, FaultProxy]]:
    async with FaultProxy() as a, FaultProxy() as b:
        yield a, b


@pytest.fixture
def in_given_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodes keep the order they are listed in (no shuffle), so a test picks the first."""
    monkeypatch.setattr("service.nodes.random.shuffle", lambda items: None)


def started_by(log: Path, instant: float) -> set[str]:
    return {r["id"] for r in executions(log) if r["event"] == "start" and r["time"] <= instant}


def done_ids(log: Path) -> set[str]:
    return {r["id"] for r in executions(log) if r["event"] == "done"}


# -- the worker -----------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["stop", "cut"])
async def test_worker_fails_over_to_the_other_node_and_loses_nothing(
    vhost: Vhost,
    queue: str,
    broker: Broker,
    start_worker: Any,
    exec_log: Path,
    two_nodes: tuple[FaultProxy, FaultProxy],
    fault: str,
) -> None:
    proxies = {address(p): p for p in two_nodes}
    worker: WorkerProcess = await start_worker(
        HUTCH_BROKER_URL=",".join(p.via(vhost.url) for p in two_nodes)
    )
    nodes = samples(await scrape(worker), "hutch_broker_node")
    assert sorted(nodes) == sorted(proxies) and sorted(nodes.values()) == [0, 1], nodes
    lost = next(node for node, current in nodes.items() if current == 1)
    other = next(node for node in proxies if node != lost)

    ids = [await broker.publish(queue, "tests.tasks.work", 0.3) for _ in range(16)]
    assert await until(lambda: len(executions(exec_log)) >= 4, 20)
    base = worker.metrics_url()
    fault_at, t0 = time.time(), time.monotonic()
    if fault == "stop":
        await proxies[lost].close()  # the port closes: connections refused
    else:
        proxies[lost].cut(refuse=True)  # every connection reset, new ones too
    seen: list[int] = []
    while time.monotonic() - t0 < 60:
        seen.append((await asyncio.to_thread(get, base + "/readyz"))[0])
        if 503 in seen and seen[-1] == 200:
            break
        await asyncio.sleep(0.05)
    recovered = time.monotonic() - t0
    assert 503 in seen and seen[-1] == 200, (seen, worker.log())

    text = await scrape(worker)
    assert samples(text, "hutch_broker_node") == {lost: 0, other: 1}, worker.log()
    assert samples(text, "hutch_broker_reconnects_total")[lost] >= 1
    assert samples(text, "hutch_broker_reconnects_total")[other] == 0

    assert await until(lambda: set(ids) <= done_ids(exec_log), 90, 0.1), worker.log()
    report = check(set(ids), exec_log)
    in_flight = started_by(exec_log, fault_at)
    print(f"{fault} {lost}: consuming via {other} after {recovered:.2f}s; checker: {report}")
    assert report.lost == set() and report.unexpected == set(), report
    assert set(report.duplicated) <= in_flight, report
    assert await broker.consumers(queue) == 1
    log = worker.log()
    assert f"at amqp://guest:******@{other}/" in log  # the log names the node it moved to
    assert ":guest@" not in log  # and never a password
    assert "unknown delivery tag" not in log  # no tag of the old connection was acked


# -- the client -----------------------------------------------------------------------------


async def test_client_skips_a_dead_first_node(
    vhost: Vhost, queue: str, broker: Broker, in_given_order: None
) -> None:
    async with FaultProxy() as dead:
        dead_url = dead.via(vhost.url)
    async with FaultProxy() as live, AsyncClient([dead_url, live.via(vhost.url)], queue=queue) as c:
        assert c.nodes.current.address == address(live)
        task_id = await c.submit("tests.tasks.add", 1, 2)
    messages = await broker.wait_for(queue, 1, 10)
    assert [m.message_id for m in messages] == [task_id]


async def test_submit_during_an_outage_republishes_the_same_id_on_the_next_node(
    vhost: Vhost,
    queue: str,
    broker: Broker,
    two_nodes: tuple[FaultProxy, FaultProxy],
    in_given_order: None,
) -> None:
    first, second = two_nodes
    urls = [p.via(vhost.url) for p in two_nodes]
    async with AsyncClient(urls, queue=queue, publish_timeout=6) as client:
        assert client.nodes.current.address == address(first)
        # Black-holed: the publish reaches no broker and no confirm comes back, until the
        # client gives the attempt up (a third of the budget) and publishes on the second.
        first.stall()
        task_id = await client.submit("tests.tasks.add", 1, 2)
        assert client.nodes.current.address == address(second)
        # The link comes back: the copy it held reaches the broker too, with the same id.
        first.restore()
        messages = await broker.wait_for(queue, 2, 10)
    assert [m.message_id for m in messages] == [task_id, task_id]


async def test_a_connection_the_broker_closes_sends_the_client_to_the_next_node(
    vhost: Vhost, queue: str, two_nodes: tuple[FaultProxy, FaultProxy], in_given_order: None
) -> None:
    """A node closing its connections (CONNECTION_FORCED, as when it shuts down) while the
    client is idle: the next publish goes to the next node, not back to that one."""
    first, second = two_nodes
    urls = [p.via(vhost.url) for p in two_nodes]
    async with AsyncClient(urls, queue=queue) as client:
        await client.submit("tests.tasks.add", 1, 1)
        assert client.nodes.current.address == address(first)
        await asyncio.to_thread(vhost.close_all_connections)
        assert await until(lambda: client.nodes.current.address == address(second), 10)
        await client.submit("tests.tasks.add", 2, 2)
        assert client.nodes.current.address == address(second)
    assert await until(lambda: vhost.queue_counts(queue)["ready"] == 2, 10)


async def test_a_publisher_whose_connection_the_broker_closed_uses_the_next_node(
    vhost: Vhost, queue: str, two_nodes: tuple[FaultProxy, FaultProxy], in_given_order: None
) -> None:
    """The worker's `Publisher` (results, retries, follow-ups) likewise."""
    first, second = two_nodes
    nodes = Nodes([p.via(vhost.url) for p in two_nodes], shuffle=False)
    async with AsyncClient(vhost.url, queue=queue):  # declares the queue
        pass
    publisher = Publisher(nodes, name="test-publisher")
    try:
        await publisher.publish(aio_pika.Message(b"one"), queue)
        assert nodes.current.address == address(first)
        await asyncio.to_thread(vhost.close_all_connections)
        assert await until(lambda: first.stats.active == 0, 10)  # the broker closed it
        await publisher.publish(aio_pika.Message(b"two"), queue)
        assert nodes.current.address == address(second)
        assert second.stats.accepted >= 1
    finally:
        await publisher.close()
    assert await until(lambda: vhost.queue_counts(queue)["ready"] == 2, 10)


async def test_call_is_answered_through_the_node_it_moved_to(
    vhost: Vhost,
    queue: str,
    start_worker: Any,
    two_nodes: tuple[FaultProxy, FaultProxy],
    in_given_order: None,
) -> None:
    await start_worker()
    first, second = two_nodes
    urls = [p.via(vhost.url) for p in two_nodes]
    async with AsyncClient(urls, queue=queue, timeout=30, publish_timeout=10) as client:
        assert await client.call("tests.tasks.add", 1, 2) == 3
        first.cut(refuse=True)
        assert await client.call("tests.tasks.add", 2, 3) == 5
        assert client.nodes.current.address == address(second)


async def test_every_node_down_raises_broker_unavailable_after_the_bound(
    vhost: Vhost, queue: str, broker: Broker, two_nodes: tuple[FaultProxy, FaultProxy]
) -> None:
    urls = [p.via(vhost.url) for p in two_nodes]
    async with AsyncClient(urls, queue=queue, publish_timeout=2) as client:
        for proxy in two_nodes:
            await proxy.close()
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable) as raised:
            await client.submit("tests.tasks.add", 1, 2)
        waited = time.monotonic() - t0
    exc = raised.value
    assert waited >= 2 - 0.05  # it kept trying for the whole bound
    assert sorted(exc.tried) == sorted(safe_url(url) for url in urls)
    for proxy in two_nodes:
        assert address(proxy) in str(exc)
    assert ":guest@" not in str(exc) and "within 2s" in str(exc)
    assert await broker.ready(queue) == 0


def test_a_blocking_client_with_no_node_up_names_every_url(vhost: Vhost) -> None:
    urls = ["amqp://guest:pw-secret@127.0.0.1:1/", "amqp://guest:pw-secret@127.0.0.1:2/"]
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable) as raised:
        Client(urls)
    assert time.monotonic() - t0 < 30  # one round over the nodes, not the publish budget
    assert "127.0.0.1:1" in str(raised.value) and "127.0.0.1:2" in str(raised.value)
    assert "pw-secret" not in str(raised.value)


# -- the commands ---------------------------------------------------------------------------


async def test_commands_use_the_list_and_say_what_is_wrong(
    vhost: Vhost, queue: str, broker: Broker
) -> None:
    async with FaultProxy() as dead:
        dead_url = dead.via(vhost.url)
    ok = await hutch(None, "inspect", "--queue", queue, HUTCH_BROKER_URL=f"{dead_url},{vhost.url}")
    assert ok.code == 0 and queue in ok.out, ok

    bad = f"{vhost.url},http://guest:pw-secret@127.0.0.1:5672/"
    for args in (("inspect", "--queue", queue), ("call", "tests.tasks.add", "1", "2")):
        run = await hutch(None, *args, HUTCH_BROKER_URL=bad)
        assert run.code == 2 and "URL 2 of 2" in run.err and "amqp://" in run.err, run
        assert "pw-secret" not in run.err and "Traceback" not in run.err
    worker = await hutch(None, "worker", "--tasks", "tests.tasks", HUTCH_BROKER_URL=bad)
    assert worker.code == 2 and "URL 2 of 2" in worker.err and "pw-secret" not in worker.err

    down = "amqp://guest:pw-secret@127.0.0.1:1/,amqp://guest:pw-secret@127.0.0.1:2/"
    run = await hutch(None, "dlq", "ls", "--queue", queue, HUTCH_BROKER_URL=down)
    assert run.code == 2 and "127.0.0.1:1" in run.err and "127.0.0.1:2" in run.err, run
    assert "pw-secret" not in run.err
