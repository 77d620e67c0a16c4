"""``hutch schedule ls``: every periodic task, its expression, zone, last and next fire, and
which worker leads its queue's schedules.

The leader of each queue writes its status to ``Q.schedules`` (a one-message queue) whenever it
passes its baton on, at least every 10 s; this command reads it without removing it. Without
``--queue`` it finds those queues through the management API.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from typing import Any

from aio_pika.abc import AbstractConnection

from service import topology
from service.broker import Nodes
from service.commands import broker_connection, broker_url, checked_queue, command
from service.commands.render import table
from service.errors import ManagementUnavailable, QueueNotFound, UsageError
from service.ops.deadletters import iso
from service.ops.management import ManagementAPI
from service.scheduler import RENEW_EVERY, status_queue

STATUS_SUFFIX = ".schedules"


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "schedule",
        help="list the periodic tasks and who fires them",
        description="Periodic tasks, as the leader of each queue's schedules last reported them.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = actions.add_parser(
        "ls",
        help="every schedule: task, expression, zone, last and next fire, leader",
        description="One line per schedule: queue, task, expression, zone, last fire, next "
        "fire and the worker that leads. Without --queue, every queue with schedules in the "
        "vhost (found through the management API).",
    )
    ls.add_argument("--queue", help="only this work queue's schedules")
    ls.add_argument("--json", action="store_true", help="one JSON object per schedule and line")
    ls.set_defaults(run=_ls)


async def read_status(connection: AbstractConnection, queue: str) -> dict[str, Any] | None:
    """The latest status the leader of ``queue`` wrote, handed back after reading; None if
    no leader has written one."""
    channel = await connection.channel(publisher_confirms=False)
    try:
        try:
            target = await topology.passive_declare(channel, status_queue(queue))
        except QueueNotFound:  # no worker with schedules has run for this queue
            return None
        message = await target.get(no_ack=False, fail=False)
        if message is None:
            return None
        await message.nack(requeue=True)
        try:
            status: dict[str, Any] = json.loads(message.body)
        except ValueError:
            return None
        return status
    finally:
        if not channel.is_closed:
            await channel.close()


def _rows(status: dict[str, Any], now_ms: int) -> list[dict[str, Any]]:
    age = (now_ms - int(status.get("updated_at", 0))) / 1000
    # A leader renews at least every RENEW_EVERY seconds: an older status has no leader now.
    leader = status.get("holder", "") if age <= 3 * RENEW_EVERY else f"none for {age:.0f}s"
    return [
        {
            "queue": status.get("queue"),
            "task": entry.get("task"),
            "expression": entry.get("expression"),
            "tz": entry.get("tz"),
            "last_fire": entry.get("last_fire"),
            "next_fire": entry.get("next_fire"),
            "leader": leader,
            "status_age_s": round(age, 1),
        }
        for entry in status.get("schedules", [])
    ]


def _when(ms: Any) -> str:
    if not isinstance(ms, int):
        return "-"
    return iso(dt.datetime.fromtimestamp(ms / 1000, dt.UTC))


@command
def _ls(options: argparse.Namespace) -> int:
    nodes = Nodes(broker_url())
    vhost = nodes.vhost
    named = [checked_queue(options.queue)] if options.queue is not None else None

    async def main() -> tuple[list[str], list[dict[str, Any]]]:
        rows: list[dict[str, Any]] = []
        async with broker_connection(nodes, name="hutch schedule ls") as connection:
            queues = named if named is not None else await asyncio.to_thread(_listed, nodes)
            for queue in queues:
                status = await read_status(connection, queue)
                if status is not None:
                    rows += _rows(status, int(time.time() * 1000))
        return queues, rows

    def _listed(nodes: Nodes) -> list[str]:
        # The management API of the node that answered (any node serves the cluster's).
        try:
            listed = ManagementAPI.for_broker(nodes.current.url).queues(vhost)
        except ManagementUnavailable as exc:
            raise UsageError(
                f"listing queues needs the management API: {exc}; or name one with --queue Q"
            ) from None
        return sorted(
            str(q["name"])[: -len(STATUS_SUFFIX)]
            for q in listed
            if str(q.get("name", "")).endswith(STATUS_SUFFIX)
        )

    queues, rows = asyncio.run(main())
    if options.json:
        for row in rows:
            print(json.dumps(row))
    elif rows:
        header = ["QUEUE", "TASK", "EXPRESSION", "ZONE", "LAST FIRE", "NEXT FIRE", "LEADER"]
        lines = [header] + [
            [
                str(r["queue"]),
                str(r["task"]),
                str(r["expression"]),
                str(r["tz"]),
                _when(r["last_fire"]),
                _when(r["next_fire"]),
                str(r["leader"]),
            ]
            for r in rows
        ]
        print(table(lines, ragged_last=True))
    else:
        where = f"queue {queues[0]!r}" if options.queue else f"vhost {vhost!r}"
        print(f"hutch: no schedules in {where} (no worker with periodic tasks has led)",
              file=sys.stderr)  # fmt: skip
    return 0
