"""ChannelAcks coalescing, against a fake channel that records frames (pure logic).

The end-to-end proof that nothing is acked early is in tests/test_worker.py and
tests/test_faults.py against the real broker.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from service.acks import ChannelAcks


class FakeChannel:
    def __init__(self) -> None:
        self.frames: list[tuple[Any, ...]] = []
        self.closed = False

    async def basic_ack(self, tag: int, multiple: bool = False, wait: bool = True) -> None:
        if self.closed:
            raise RuntimeError("channel closed")
        self.frames.append(("ack", tag, multiple))

    async def basic_nack(self, tag: int, multiple: bool = False, requeue: bool = True) -> None:
        self.frames.append(("nack", tag, requeue))

    async def basic_reject(self, tag: int, *, requeue: bool = True) -> None:
        self.frames.append(("reject", tag, requeue))


def acked(frames: list[tuple[Any, ...]], delivered: int) -> set[int]:
    """Which tags the frames ack, applying multiple=True as the broker does."""
    settled: set[int] = set()
    result: set[int] = set()
    for kind, tag, flag in frames:
        if kind == "ack" and flag:
            covered = {t for t in range(1, tag + 1) if t not in settled}
            result |= covered
            settled |= covered
        else:
            assert tag not in settled, f"tag {tag} settled twice"
            settled.add(tag)
            if kind == "ack":
                result.add(tag)
    return result


def tracker(n: int) -> tuple[ChannelAcks, FakeChannel]:
    channel = FakeChannel()
    acks = ChannelAcks(channel)  # type: ignore[arg-type]
    for tag in range(1, n + 1):
        acks.delivered(tag)
    return acks, channel


async def test_acks_due_together_become_one_multiple_ack() -> None:
    acks, channel = tracker(5)
    await asyncio.gather(*(acks.ack(tag) for tag in (1, 2, 3, 4, 5)))
    assert channel.frames == [("ack", 5, True)]


async def test_never_covers_a_delivery_still_running() -> None:
    acks, channel = tracker(6)
    await asyncio.gather(acks.ack(1), acks.ack(2), acks.ack(4), acks.ack(5))
    assert acked(channel.frames, 6) == {1, 2, 4, 5}  # 3 and 6 still running
    await acks.ack(3)
    assert acked(channel.frames, 6) == {1, 2, 3, 4, 5}
    await acks.ack(6)
    assert acked(channel.frames, 6) == {1, 2, 3, 4, 5, 6}


async def test_nacked_tags_are_written_before_a_multiple_ack_passes_them() -> None:
    acks, channel = tracker(4)
    await acks.nack(2, requeue=True)
    await acks.reject(3, requeue=True)
    await asyncio.gather(acks.ack(1), acks.ack(4))
    assert channel.frames[:2] == [("nack", 2, True), ("reject", 3, True)]
    assert acked(channel.frames, 4) == {1, 4}


async def test_a_gap_in_tags_means_plain_acks() -> None:
    channel = FakeChannel()
    acks = ChannelAcks(channel)  # type: ignore[arg-type]
    acks.delivered(1)
    acks.delivered(3)  # 2 never reached this tracker: never ack past it with multiple
    await asyncio.gather(acks.ack(1), acks.ack(3))
    assert all(not multiple for _, _, multiple in channel.frames)


async def test_a_closed_channel_fails_every_ack_in_the_batch() -> None:
    acks, channel = tracker(3)
    channel.closed = True
    results = await asyncio.gather(*(acks.ack(t) for t in (1, 2, 3)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)


async def test_random_orders_ack_exactly_what_was_acked() -> None:
    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 30)
        acks, channel = tracker(n)
        order = list(range(1, n + 1))
        rng.shuffle(order)
        expected: set[int] = set()
        while order:
            k = rng.randint(1, 5)
            batch, order = order[:k], order[k:]
            coros = []
            for tag in batch:
                if rng.random() < 0.2:
                    await acks.nack(tag, requeue=True)
                else:
                    expected.add(tag)
                    coros.append(acks.ack(tag))
            await asyncio.gather(*coros)
            assert acked(channel.frames, n) == expected
