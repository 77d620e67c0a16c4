"""``hutch dlq ls|show|replay|purge`` against the real broker, plus their pure helpers."""

from __future__ import annotations

import asyncio
import datetime as dt
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from service import protocol, routing, topology
from service.ops import deadletters
from service.ops.deadletters import Filter, parse_since
from tests.cli_helpers import (
    ROOT,
    dead_letter,
    hutch,
    hutch_env,
    no_traceback,
    publish_over_http,
)
from tests.conftest import Broker, Vhost, executions, rabbitmqctl, until

DEATH_HEADERS = {
    protocol.ATTEMPT_HEADER,
    protocol.REASON_HEADER,
    protocol.ERROR_TYPE_HEADER,
    protocol.ERROR_MESSAGE_HEADER,
    protocol.QUEUE_HEADER,
    protocol.DEAD_AT_HEADER,
}


def ids(messages: list[aio_pika.abc.AbstractIncomingMessage]) -> list[str]:
    return [m.message_id or "" for m in messages]


# -- pure helpers ----------------------------------------------------------------------------


def test_parse_since_accepts_durations_and_iso_times() -> None:
    now = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
    assert parse_since("10m", now) == now - dt.timedelta(minutes=10)
    assert parse_since("2h", now) == now - dt.timedelta(hours=2)
    assert parse_since("1d", now) == now - dt.timedelta(days=1)
    assert parse_since("1h30m", now) == now - dt.timedelta(minutes=90)
    assert parse_since(" 45S ", now) == now - dt.timedelta(seconds=45)
    assert parse_since("2026-04-30T08:00", now) == dt.datetime(2026, 4, 30, 8, tzinfo=dt.UTC)
    assert parse_since("2026-04-30", now) == dt.datetime(2026, 4, 30, tzinfo=dt.UTC)
    assert parse_since("2026-04-30T10:00+02:00", now) == dt.datetime(2026, 4, 30, 8, tzinfo=dt.UTC)
    assert parse_since("2026-04-30T08:00Z", now) == dt.datetime(2026, 4, 30, 8, tzinfo=dt.UTC)
    for bad in ("", "3x", "10 minutes", "m", "yesterday", "-5m"):
        with pytest.raises(ValueError, match="is not a time"):
            parse_since(bad, now)


def test_filter_checks_reasons_and_matches_task_patterns() -> None:
    with pytest.raises(ValueError, match="not a dead-letter reason"):
        Filter(reasons=("nope",))
    letter = deadletters.DeadLetter(
        id="a1",
        message_id="a1",
        queue="q",
        task="myapp.tasks.resize",
        reason="failed",
        source="hutch",
        attempts=3,
        error_type="ValueError",
        error_message="x",
        dead_lettered_at=dt.datetime(2026, 5, 1, tzinfo=dt.UTC),
        replays=0,
        content_type=protocol.MSGPACK,
        size=10,
    )
    assert Filter().matches(letter)
    assert Filter(tasks=("myapp.tasks.*",)).matches(letter)
    assert not Filter(tasks=("myapp.tasks",)).matches(letter)
    assert Filter(tasks=("other", "myapp.tasks.resize")).matches(letter)
    assert Filter(reasons=("timeout", "failed")).matches(letter)
    assert not Filter(reasons=("timeout",)).matches(letter)
    assert Filter(since=dt.datetime(2026, 5, 1, tzinfo=dt.UTC)).matches(letter)
    assert not Filter(since=dt.datetime(2026, 5, 2, tzinfo=dt.UTC)).matches(letter)
    assert not Filter(ids=("a2",)).matches(letter)
    assert str(Filter(tasks=("t",), reasons=("failed",))) == "task=t, reason=failed"


# -- ls --------------------------------------------------------------------------------------


async def test_ls_lists_every_dead_letter_and_removes_nothing(
    vhost: Vhost, queue: str, broker: Broker
) -> None:
    planted = [
        await dead_letter(broker, queue, "app.resize", 1, error_message="bad\nimage"),
        await dead_letter(broker, queue, "app.crop", reason="bad_args", error_type="bad_args"),
        await dead_letter(broker, queue, "app.nope", reason="unknown_task", attempt=1),
    ]
    dlq = routing.dlq_name(queue)
    first = await hutch(vhost, "dlq", "ls", "--queue", queue)
    assert first.code == 0, first
    lines = first.out.splitlines()
    assert lines[0].split() == [
        "ID",
        "TASK",
        "REASON",
        "ATTEMPTS",
        "REPLAYS",
        "DEAD-LETTERED",
        "ERROR",
    ]
    assert [line.split()[0] for line in lines[1:]] == planted
    assert lines[1].split()[1:5] == ["app.resize", "failed", "3", "0"]
    assert lines[1].endswith("ValueError: bad image")  # one line per dead letter
    assert "unknown_task" in lines[3]
    assert f"listed 3 dead letters in {dlq}" in first.err
    # Nothing was taken: the same again, and the queue still holds them, in order.
    assert await broker.ready(dlq) == 3
    again = await hutch(vhost, "dlq", "ls", "--queue", queue)
    assert again.out == first.out
    assert ids(await broker.drain(dlq)) == planted


async def test_ls_filters_and_json(vhost: Vhost, queue: str, broker: Broker) -> None:
    now = time.time()
    old = await dead_letter(broker, queue, "app.a.resize", dead_at=now - 2 * 86400)
    hour = await dead_letter(
        broker,
        queue,
        "app.a.crop",
        reason="timeout",
        error_type="TimeLimitExceeded",
        dead_at=now - 3600,
    )
    recent = await dead_letter(broker, queue, "app.b.zip", reason="bad_args", dead_at=now)

    async def listed(*args: str) -> list[str]:
        run = await hutch(vhost, "dlq", "ls", "--queue", queue, "--json", *args)
        assert run.code == 0, run
        return [item["id"] for item in run.json_lines()]

    assert await listed() == [old, hour, recent]
    assert await listed("--task", "app.a.*") == [old, hour]
    assert await listed("--task", "app.b.zip", "--task", "app.a.crop") == [hour, recent]
    assert await listed("--reason", "timeout") == [hour]
    assert await listed("--reason", "timeout", "--reason", "bad_args") == [hour, recent]
    assert await listed("--since", "2h") == [hour, recent]
    assert await listed("--since", "30m") == [recent]
    three_days = dt.datetime.fromtimestamp(now - 3 * 86400, dt.UTC).replace(tzinfo=None)
    assert await listed("--since", three_days.isoformat(timespec="seconds")) == [old, hour, recent]
    assert await listed("--since", "1d", "--task", "app.a.*") == [hour]
    assert await listed("--id", recent, "--id", old) == [old, recent]
    assert await listed("--limit", "2") == [old, hour]
    assert await listed("--reason", "failed", "--task", "app.b.*") == []

    run = await hutch(vhost, "dlq", "ls", "--queue", queue, "--json", "--reason", "timeout")
    [item] = run.json_lines()
    assert item == {
        "id": hour,
        "message_id": hour,
        "queue": queue,
        "task": "app.a.crop",
        "reason": "timeout",
        "source": "hutch",
        "attempts": 3,
        "error_type": "TimeLimitExceeded",
        "error_message": "boom",
        "dead_lettered_at": item["dead_lettered_at"],
        "replays": 0,
        "content_type": protocol.MSGPACK,
        "size": item["size"],
        "flow": None,  # not a flow's step
        "step": None,
    }
    when = dt.datetime.fromisoformat(item["dead_lettered_at"])
    assert abs(when.timestamp() - (now - 3600)) < 1
    assert "matching reason=timeout" in run.err
    assert await broker.ready(routing.dlq_name(queue)) == 3


async def test_broker_dead_letters_and_messages_without_id(
    vhost: Vhost, queue: str, broker: Broker
) -> None:
    # The broker's own backstop: a message returned 20 times is dead-lettered by RabbitMQ.
    poison = await broker.publish(queue, "app.poison", 1)
    work = await broker.channel.declare_queue(queue, passive=True)
    returned = 0
    while returned <= topology.BROKER_DELIVERY_LIMIT:
        message = await work.get(fail=False, no_ack=False)
        if message is None:
            await asyncio.sleep(0.02)
            continue
        await message.nack(requeue=True)
        returned += 1
    dlq = routing.dlq_name(queue)
    assert await until_ready(broker, dlq, 1, timeout=10)
    # A foreign message with no message_id, as publishers in other languages can send.
    publish_over_http(
        vhost,
        dlq,
        b"\xff\xfe not utf-8",
        {"content_type": "text/plain", "headers": {"task": "foreign"}},
    )
    assert await until_ready(broker, dlq, 2, timeout=10)

    run = await hutch(vhost, "dlq", "ls", "--queue", queue, "--json")
    assert run.code == 0, run
    by_broker, foreign = run.json_lines()
    assert by_broker["id"] == poison
    assert by_broker["source"] == "broker" and by_broker["reason"] == "delivery_limit"
    assert by_broker["queue"] == queue and by_broker["task"] == "app.poison"
    assert by_broker["dead_lettered_at"] is not None
    assert foreign["message_id"] is None and foreign["id"].startswith("anon-")
    assert foreign["source"] == "unknown" and foreign["reason"] == "unknown"
    # The made-up id is stable across reads (x-delivery-count changes; it is not part of it).
    again = await hutch(vhost, "dlq", "ls", "--queue", queue, "--json", "--id", foreign["id"])
    assert [item["id"] for item in again.json_lines()] == [foreign["id"]]
    text = await hutch(vhost, "dlq", "ls", "--queue", queue, "--reason", "delivery_limit")
    assert "(dead-lettered by RabbitMQ: delivery_limit)" in text.out
    shown = await hutch(vhost, "dlq", "show", foreign["id"], "--queue", queue, "--json")
    assert shown.code == 0, shown
    [detail] = shown.json_lines()
    assert detail["body"] is None and "text/plain" in detail["body_error"]
    assert detail["raw_body"] == {"$base64": "//4gbm90IHV0Zi04"}
    # Replayed, it gets its anon- id as message_id: one idempotency key for every replay.
    replayed = await hutch(vhost, "dlq", "replay", "--queue", queue, "--id", foreign["id"])
    assert replayed.code == 0, replayed
    [copy] = await broker.drain(queue)
    assert copy.message_id == foreign["id"] == copy.headers[protocol.REPLAY_OF_HEADER]


# -- show ------------------------------------------------------------------------------------


async def test_show_prints_properties_headers_and_the_decoded_body(
    vhost: Vhost, queue: str, broker: Broker
) -> None:
    letter = await dead_letter(
        broker,
        queue,
        "app.resize",
        "/tmp/a.png",
        640,
        {"quality": [80, 90]},
        error_message="cannot open",
        reply_to="amq.gen-replies",
        correlation_id="corr-1",
        content_type=protocol.JSON,
    )
    run = await hutch(vhost, "dlq", "show", letter, "--queue", queue)
    assert run.code == 0, run
    text = run.out
    assert f"dead letter {letter} in {routing.dlq_name(queue)}" in text
    for expected in (
        "properties:",
        f"message_id:       {letter}",
        "correlation_id:   corr-1",
        "reply_to:         amq.gen-replies",
        "content_type:     application/json",
        "headers:",
        "task:",
        "x-hutch-reason:           failed",
        "x-hutch-error-message:    cannot open",
        "body (application/json,",
        '"/tmp/a.png"',
        '"quality": [',
    ):
        assert expected in text, (expected, text)

    as_json = await hutch(vhost, "dlq", "show", letter[:8], "--queue", queue, "--json")
    assert as_json.code == 0, as_json
    [detail] = as_json.json_lines()
    assert detail["id"] == letter
    assert detail["body"] == {"args": ["/tmp/a.png", 640, {"quality": [80, 90]}], "kwargs": {}}
    assert detail["properties"]["correlation_id"] == "corr-1"
    assert detail["headers"][protocol.ERROR_TYPE_HEADER] == "ValueError"
    assert detail["headers"][protocol.TASK_HEADER] == "app.resize"

    missing = await hutch(vhost, "dlq", "show", "no-such-id", "--queue", queue)
    assert missing.code == 1 and "no dead letter with id 'no-such-id'" in missing.err
    other = await dead_letter(broker, queue, "app.crop", message_id=letter[:4] + "-other")
    ambiguous = await hutch(vhost, "dlq", "show", letter[:4], "--queue", queue)
    assert ambiguous.code == 2 and "give more of the id" in ambiguous.err, ambiguous
    assert other in ambiguous.err
    assert await broker.ready(routing.dlq_name(queue)) == 2


# -- replay ----------------------------------------------------------------------------------


async def test_replay_sends_matches_back_as_fresh_tasks(
    vhost: Vhost, queue: str, broker: Broker
) -> None:
    dlq = routing.dlq_name(queue)
    a1 = await dead_letter(broker, queue, "app.a", 1, reply_to="amq.gen-x", app_id="shop")
    bad = await dead_letter(broker, queue, "app.b", reason="bad_args", attempt=1)
    a2 = await dead_letter(broker, queue, "app.a", 2, reason="timeout")
    b1 = await dead_letter(broker, queue, "app.b", 3)

    dry = await hutch(vhost, "dlq", "replay", "--queue", queue, "--task", "app.a", "--dry-run")
    assert dry.code == 0, dry
    assert [line.split()[0] for line in dry.out.splitlines()[1:]] == [a1, a2]
    assert "nothing changed" in dry.err
    assert await broker.ready(queue) == 0 and await broker.ready(dlq) == 4

    started_ms = time.time() * 1000
    run = await hutch(vhost, "dlq", "replay", "--queue", queue, "--task", "app.a", "--json")
    assert run.code == 0, run
    assert sorted(item["id"] for item in run.json_lines()) == sorted([a1, a2])
    assert all(item["replayed"] for item in run.json_lines())
    assert f"replayed 2 dead letters in {dlq}" in run.err and f"to {queue}" in run.err

    back = await broker.drain(queue)
    assert sorted(ids(back)) == sorted([a1, a2])
    for message in back:
        headers = dict(message.headers)
        assert not DEATH_HEADERS & set(headers), headers  # attempts start again
        assert not any(k.startswith(("x-death", "x-first-death", "x-last-death")) for k in headers)
        assert headers[protocol.REPLAY_OF_HEADER] == message.message_id
        assert headers[protocol.REPLAYS_HEADER] == 1
        replayed_at = headers[protocol.REPLAYED_AT_HEADER]
        assert started_ms - 1000 <= replayed_at <= time.time() * 1000
        assert headers[protocol.DUE_HEADER] == replayed_at  # queue wait counts from the replay
        assert headers[protocol.TASK_HEADER] == "app.a"
        assert message.content_type == protocol.MSGPACK
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    first = next(m for m in back if m.message_id == a1)
    assert protocol.decode_request(protocol.MSGPACK, first.body) == ([1], {})
    assert first.reply_to == "amq.gen-x" and first.app_id == "shop"
    assert ids(await broker.drain(dlq)) == [bad, b1]  # the rest stay, in order


async def test_replay_limit_and_rate(vhost: Vhost, queue: str, broker: Broker) -> None:
    planted = [await dead_letter(broker, queue, "app.a", n) for n in range(5)]
    started = time.monotonic()
    run = await hutch(vhost, "dlq", "replay", "--queue", queue, "--limit", "3", "--rate", "5")
    assert run.code == 0, run
    assert time.monotonic() - started >= 0.4  # 3 replays at 5/s: at least two 0.2 s gaps
    assert [line.split()[1] for line in run.out.splitlines()] == planted[:3]
    assert await broker.ready(queue) == 3
    assert ids(await broker.drain(routing.dlq_name(queue))) == planted[3:]


async def test_replayed_task_runs_again_with_attempts_from_one(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, exec_log: Path
) -> None:
    await start_worker()
    task_id = await broker.publish(queue, "tests.tasks.always_fails")
    dlq = routing.dlq_name(queue)
    assert await until_ready(broker, dlq, 1, timeout=30)
    assert [r["attempt"] for r in executions(exec_log)] == [1, 2, 3]

    run = await hutch(vhost, "dlq", "replay", "--queue", queue, "--id", task_id)
    assert run.code == 0, run
    assert await until(lambda: len(executions(exec_log)) >= 6, 30)
    assert await until_ready(broker, dlq, 1, timeout=30)
    records = executions(exec_log)
    assert [r["attempt"] for r in records] == [1, 2, 3, 1, 2, 3]
    assert {r["id"] for r in records} == {task_id}  # message_id, the idempotency key, is kept
    listed = await hutch(vhost, "dlq", "ls", "--queue", queue, "--json")
    [item] = listed.json_lines()
    assert item["id"] == task_id and item["replays"] == 1 and item["attempts"] == 3


async def until_ready(broker: Broker, queue: str, count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await broker.ready(queue) >= count:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_killed_replay_loses_nothing(vhost: Vhost, queue: str, broker: Broker) -> None:
    """SIGKILL half-way through: every dead letter is still in Q.dlq, back in Q, or both."""
    count = 600
    planted = [f"dl-{n:04d}" for n in range(count)]
    await asyncio.gather(*(dead_letter(broker, queue, "app.a", message_id=i) for i in planted))
    dlq = routing.dlq_name(queue)
    assert await broker.ready(dlq) == count

    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "dlq", "replay", "--queue", queue, "--rate", "150"],
        cwd=ROOT,
        env=hutch_env(vhost),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert await until_ready(broker, queue, 100, timeout=30), "replay never got going"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # The broker hands back what the killed connection held as soon as it notices.
    assert await until_total(broker, [queue, dlq], count, timeout=30)
    in_queue = ids(await broker.drain(queue))
    in_dlq = ids(await broker.drain(dlq))
    assert set(in_queue) | set(in_dlq) == set(planted)  # nothing lost
    assert 100 <= len(in_queue) < count and in_dlq, (len(in_queue), len(in_dlq))  # truly mid-way
    assert len(set(in_queue)) == len(in_queue)
    both = set(in_queue) & set(in_dlq)
    assert len(both) <= 100  # at most the copies whose confirm or ack was under way


async def test_replay_cut_off_by_the_broker_loses_nothing(
    vhost: Vhost, queue: str, broker: Broker
) -> None:
    """The broker closes the replay's connections half-way: exit 1, one line, nothing lost."""
    count = 600  # at 50/s, 12 s: time enough for the slow rabbitmqctl calls below
    planted = [f"dl-{n:04d}" for n in range(count)]
    await asyncio.gather(*(dead_letter(broker, queue, "app.a", message_id=i) for i in planted))
    dlq = routing.dlq_name(queue)
    replay = asyncio.ensure_future(hutch(vhost, "dlq", "replay", "--queue", queue, "--rate", "50"))
    assert await until_ready(broker, queue, 50, timeout=30), "replay never got going"
    # Both of the replay's connections (it consumes and publishes on separate ones).
    closed = 0
    connections = rabbitmqctl("list_connections", "-p", vhost.name, "pid", "client_properties")
    for line in connections.splitlines():
        if "hutch dlq replay" in line:
            rabbitmqctl("close_connection", line.split("\t")[0], "test: cut off")
            closed += 1
    assert closed == 2
    run = await replay
    assert run.code == 1, run
    assert "Traceback" not in run.err, run
    assert run.err.splitlines()[-1].startswith("hutch: error: "), run
    assert await until_total(broker, [queue, dlq], count, timeout=30)
    in_queue = ids(await broker.drain(queue))
    in_dlq = ids(await broker.drain(dlq))
    assert set(in_queue) | set(in_dlq) == set(planted)
    assert in_queue and in_dlq


async def until_total(broker: Broker, queues: list[str], count: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum([await broker.ready(q) for q in queues]) >= count:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_refused_replay_stops_and_loses_nothing(
    vhost: Vhost, queue: str, broker: Broker
) -> None:
    """A publish the broker refuses (queue full) stops the replay; the rest stay put."""
    planted = [await dead_letter(broker, queue, "app.a", n) for n in range(20)]
    policy = ("cap", f"^{queue}$", '{"max-length": 5}')
    rabbitmqctl("set_policy", "-p", vhost.name, "--apply-to", "queues", *policy)
    assert await until_refused(broker, queue, timeout=20), "the max-length policy never bit"
    # Paced, so each confirm is back before the next publish: a 3.10 quorum queue's client
    # learns the queue is full only from the answer to an earlier publish.
    run = await hutch(vhost, "dlq", "replay", "--queue", queue, "--rate", "40")
    assert run.code == 1, run
    assert "replay stopped" in run.err and "not confirmed" in run.err, run
    assert "Traceback" not in run.err
    in_queue = ids(await broker.drain(queue))
    in_dlq = ids(await broker.drain(routing.dlq_name(queue)))
    # Quorum queues apply max-length a little loosely to publishes already in flight.
    assert 5 <= len(in_queue) < len(planted), in_queue
    assert sorted(in_queue + in_dlq) == sorted(planted)  # each in exactly one place
    replayed = [line.split()[1] for line in run.out.splitlines()]
    assert sorted(replayed) == sorted(in_queue)


async def until_refused(broker: Broker, queue: str, timeout: float) -> bool:
    """Publish probes until the broker refuses one (the policy is in force), then remove them."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                await broker.publish(queue, "probe")
            except aio_pika.exceptions.DeliveryError:
                return True
            if await broker.ready(queue) > 20:  # not in force yet: start again
                await broker.drain(queue)
                await asyncio.sleep(0.2)
        return False
    finally:
        await broker.drain(queue)


# -- purge -----------------------------------------------------------------------------------


async def test_purge_needs_yes_and_deletes_only_matches(
    vhost: Vhost, queue: str, broker: Broker
) -> None:
    dlq = routing.dlq_name(queue)
    keep1 = await dead_letter(broker, queue, "app.a")
    gone1 = await dead_letter(broker, queue, "app.b", reason="bad_args")
    keep2 = await dead_letter(broker, queue, "app.b")
    gone2 = await dead_letter(broker, queue, "app.c", reason="bad_args")

    refused = await hutch(vhost, "dlq", "purge", "--queue", queue, "--reason", "bad_args")
    assert refused.code == 2, refused
    no_traceback(refused)
    assert "--yes" in refused.err
    assert await broker.ready(dlq) == 4

    dry = await hutch(vhost, "dlq", "purge", "--queue", queue, "--reason", "bad_args", "--dry-run")
    assert dry.code == 0 and [line.split()[0] for line in dry.out.splitlines()[1:]] == [
        gone1,
        gone2,
    ]
    assert await broker.ready(dlq) == 4

    run = await hutch(vhost, "dlq", "purge", "--queue", queue, "--reason", "bad_args", "--yes")
    assert run.code == 0, run
    assert [line.split()[1] for line in run.out.splitlines()] == [gone1, gone2]
    assert f"purged 2 dead letters in {dlq} matching reason=bad_args (4 in all)" in run.err
    assert ids(await broker.drain(dlq)) == [keep1, keep2]


# -- user errors -----------------------------------------------------------------------------


async def test_user_errors_say_what_to_do_and_exit_2(
    vhost: Vhost, queue: str, broker: Broker
) -> None:
    closed = {"HUTCH_BROKER_URL": "amqp://guest:guest@127.0.0.1:1/"}
    for args in (("dlq", "ls"), ("dlq", "show", "x"), ("dlq", "replay"), ("dlq", "purge", "--yes")):
        run = await hutch(None, *args, **closed)
        assert run.code == 2, run
        no_traceback(run)
        assert "cannot connect to the broker" in run.err and "HUTCH_BROKER_URL" in run.err
        assert "guest:guest" not in run.err  # the password is masked

    unknown = await hutch(vhost, "dlq", "ls", "--queue", "no-such-queue")
    assert unknown.code == 2 and "no dead-letter queue 'no-such-queue.dlq'" in unknown.err
    no_traceback(unknown)
    suffixed = await hutch(vhost, "dlq", "ls", "--queue", routing.dlq_name(queue))
    assert suffixed.code == 2 and "without .dlq" in suffixed.err

    for bad in (
        ["--since", "3x"],
        ["--since", "yesterday"],
        ["--reason", "exploded"],
        ["--queue", "bad#name"],
    ):
        run = await hutch(vhost, "dlq", "ls", "--queue", queue, *bad)
        assert run.code == 2, (bad, run)
        no_traceback(run)

    # Q.dlq exists but Q does not: nowhere to replay to.
    await broker.channel.declare_queue("orphan.dlq", durable=True, arguments=topology.DLQ_ARGUMENTS)
    await dead_letter(broker, "orphan", "app.a")
    orphan = await hutch(vhost, "dlq", "replay", "--queue", "orphan")
    assert orphan.code == 2 and "queue 'orphan' does not exist" in orphan.err, orphan
    assert await broker.ready("orphan.dlq") == 1

    no_vhost = await hutch(None, "dlq", "ls", HUTCH_BROKER_URL=vhost.url + "-missing")
    assert no_vhost.code == 2 and "does not exist" in no_vhost.err, no_vhost
    limit = await hutch(vhost, "dlq", "ls", "--limit", "0")
    assert limit.code == 2 and "Traceback" not in limit.err  # argparse's own message


def test_cli_help_lists_the_operator_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "--help"],
        cwd=ROOT,
        env=hutch_env(None),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("dlq", "inspect", "map"):
        assert name in out
