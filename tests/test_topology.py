"""The delay topology, declared with nowait and one barrier: every level and binding is there,
and a level the broker refuses still fails the declare."""

from __future__ import annotations

import aio_pika
import aiormq
import pytest

from service import routing, topology
from tests.conftest import Vhost, rabbitmqctl


async def test_declare_shared_creates_every_level_and_binding(vhost: Vhost) -> None:
    connection = await aio_pika.connect(vhost.url)
    try:
        channel = await connection.channel()
        await topology.declare_shared(channel)
        await topology.declare_shared(channel)  # idempotent
    finally:
        await connection.close()
    queues = rabbitmqctl("list_queues", "-p", vhost.name, "name", "arguments")
    for level in range(routing.DELAY_LEVELS):
        name = routing.delay_exchange(level)
        line = next(q for q in queues.splitlines() if q.split("\t")[0] == name)
        assert f'{{"x-message-ttl",{2**level * 1000}}}' in line.replace(" ", ""), line
    bindings = rabbitmqctl(
        "list_bindings", "-p", vhost.name, "source_name", "destination_name", "routing_key"
    ).splitlines()
    # Per level: its queue on a 1 bit, the level below on a 0 bit.
    assert sum(1 for b in bindings if b.startswith(routing.DELAY_PREFIX)) == 2 * 28


async def test_a_refused_level_fails_the_declare(vhost: Vhost) -> None:
    connection = await aio_pika.connect(vhost.url)
    try:
        channel = await connection.channel()
        # Level 3 declared by someone else with another TTL: the broker refuses ours.
        await channel.declare_queue(
            routing.delay_exchange(3),
            durable=True,
            arguments={"x-queue-type": "quorum", "x-message-ttl": 1},
        )
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await topology.declare_shared(await connection.channel())
    finally:
        await connection.close()


@pytest.mark.parametrize(
    ("seconds", "whole"),
    [(2.0, 2), (2.0004, 2), (1.9999999, 2), (2.002, 3), (0.2, 1), (0.0, 1), (-5.0, 1)],
)
def test_delay_routing_key_rounds_up_to_whole_seconds(seconds: float, whole: int) -> None:
    # A countdown of 2 s rounded to the millisecond must not become 3 s of delay (it did:
    # every countdown ran a second late).
    exchange, key = routing.delay_routing_key("work", seconds)
    bits = key.split(".")[: routing.DELAY_LEVELS]
    assert int("".join(bits), 2) == whole
    assert exchange == routing.delay_exchange(routing.DELAY_LEVELS - 1)
    assert key.endswith(".work")
