"""``hutch inspect`` with and without the management API, and the management client itself."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from service import routing
from service.broker import vhost_of
from service.errors import ManagementUnavailable
from service.ops.management import ManagementAPI, rate
from tests.cli_helpers import dead_letter, hutch, no_traceback, require_management
from tests.conftest import Broker, Vhost

CLOSED_PORT = "http://127.0.0.1:1"


def test_management_url_and_credentials_come_from_the_broker_url() -> None:
    api = ManagementAPI.for_broker("amqp://ops:s%40cret@rabbit.internal:5672/prod", environ={})
    assert api.url == "http://rabbit.internal:15672"
    explicit = ManagementAPI.for_broker(
        "amqp://ops:secret@rabbit.internal/",
        environ={"HUTCH_MANAGEMENT_URL": "https://mon:pw@rabbit-mgmt:443/rmq/"},
    )
    assert explicit.url == "https://rabbit-mgmt:443/rmq"  # no credentials in the URL itself
    assert vhost_of("amqp://u:p@h:5672/") == "/"
    assert vhost_of("amqp://u:p@h:5672") == "/"
    assert vhost_of("amqp://u:p@h:5672/%2F") == "/"
    assert vhost_of("amqp://u:p@h:5672/prod") == "prod"
    assert rate({"message_stats": {"ack_details": {"rate": 2.5}}}, "ack") == 2.5
    assert rate({}, "ack") == 0.0


def test_unreachable_management_api_says_how_to_fix_it() -> None:
    api = ManagementAPI(CLOSED_PORT, user="guest", password="guest", timeout=2)
    with pytest.raises(ManagementUnavailable, match=r"not reachable at http://127\.0\.0\.1:1 "):
        api.get("overview")


async def _hold_one_unacked(broker: Broker, queue: str) -> Any:
    """A consumer that takes one task and never acks it: 1 unacked, 1 consumer."""
    channel = await broker.connection.channel()
    await channel.set_qos(prefetch_count=1)
    work = await channel.declare_queue(queue, passive=True)
    got = asyncio.Event()

    async def hold(message: Any) -> None:
        got.set()

    await work.consume(hold, no_ack=False)
    await asyncio.wait_for(got.wait(), 10)
    return channel


async def test_inspect_with_the_management_api(vhost: Vhost, queue: str, broker: Broker) -> None:
    require_management()
    for n in range(3):
        await broker.publish(queue, "app.a", n)
    await dead_letter(broker, queue, "app.a")
    await dead_letter(broker, queue, "app.b")
    holder = await _hold_one_unacked(broker, queue)
    try:
        # The management API samples every 5 s: wait until it has seen the held message.
        deadline = time.monotonic() + 30
        while True:
            run = await hutch(vhost, "inspect", "--json")
            assert run.code == 0, run
            # Only hutch queues: not the delay queues, not Q.dlq; the vhost's fan-in queue
            # hutch.joins is one (declared with the delays), shown for its backlog.
            listed = {s["queue"]: s for s in run.json_lines()}
            assert set(listed) == {queue, routing.JOINS_QUEUE}, listed
            stats = listed[queue]
            if stats["unacked"] == 1 or time.monotonic() > deadline:
                break
            await asyncio.sleep(1)
        assert stats["queue"] == queue
        assert stats["ready"] == 2 and stats["unacked"] == 1
        assert stats["consumers"] == 1 and stats["dead_letters"] == 2
        assert set(stats["rates"]) == {"publish", "deliver", "ack", "dead_letter"}
        assert all(isinstance(v, float) for v in stats["rates"].values())
        assert run.err == ""

        table = await hutch(vhost, "inspect", "--queue", queue)
        assert table.code == 0, table
        header, row = table.out.splitlines()
        assert header.split() == [
            "QUEUE",
            "READY",
            "UNACKED",
            "CONSUMERS",
            "DEAD",
            "IN/s",
            "OUT/s",
            "ACK/s",
            "DEAD/s",
        ]
        assert row.split()[:5] == [queue, "2", "1", "1", "2"]
    finally:
        await holder.close()


async def test_inspect_without_the_management_api(vhost: Vhost, queue: str, broker: Broker) -> None:
    await broker.publish(queue, "app.a")
    await dead_letter(broker, queue, "app.a")
    named = await hutch(vhost, "inspect", "--queue", queue, HUTCH_MANAGEMENT_URL=CLOSED_PORT)
    assert named.code == 0, named
    _header, row = named.out.splitlines()
    assert row.split() == [queue, "1", "-", "0", "1", "-", "-", "-", "-"]
    assert "unacked counts and rates not shown" in named.err
    assert "not reachable at http://127.0.0.1:1" in named.err
    assert "rabbitmq-plugins enable rabbitmq_management" in named.err

    as_json = await hutch(
        vhost, "inspect", "--queue", queue, "--json", HUTCH_MANAGEMENT_URL=CLOSED_PORT
    )
    assert as_json.json_lines() == [
        {
            "queue": queue,
            "ready": 1,
            "unacked": None,
            "consumers": 0,
            "dead_letters": 1,
            "rates": None,
        }
    ]

    listing = await hutch(vhost, "inspect", HUTCH_MANAGEMENT_URL=CLOSED_PORT)
    assert listing.code == 2, listing
    no_traceback(listing)
    assert "listing queues needs the management API" in listing.err
    assert "--queue" in listing.err


async def test_inspect_user_errors(vhost: Vhost, queue: str, broker: Broker) -> None:
    missing = await hutch(vhost, "inspect", "--queue", "no-such-queue")
    assert missing.code == 2 and "no queue 'no-such-queue'" in missing.err, missing
    no_traceback(missing)
    await broker.channel.declare_queue("plain", durable=True)
    plain = await hutch(vhost, "inspect", "--queue", "plain")
    assert plain.code == 2 and "not a hutch queue" in plain.err, plain
    unreachable = await hutch(None, "inspect", HUTCH_BROKER_URL="amqp://guest:guest@127.0.0.1:1/")
    assert unreachable.code == 2 and "cannot connect to the broker" in unreachable.err
    no_traceback(unreachable)
