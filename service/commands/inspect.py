"""``hutch inspect``: ready, unacked, consumers, dead letters and rates of hutch's queues."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from service import routing
from service.broker import Nodes
from service.commands import broker_connection, broker_url, checked_queue, command
from service.commands.render import table
from service.errors import ManagementRequired, QueueNotFound, UsageError
from service.ops import inspection
from service.ops.inspection import QueueStats
from service.ops.management import URL_VARIABLE, ManagementAPI


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "inspect",
        help="show what hutch's queues are doing",
        description="For each hutch queue (a queue Q with a Q.dlq): ready and unacked messages, "
        "consumers, dead letters and, from the management API, message rates. Without the "
        "management API only a queue named with --queue can be inspected, without unacked "
        f"counts and rates. The API's URL is {URL_VARIABLE}, else http://BROKER_HOST:15672, "
        "with the broker URL's credentials.",
    )
    parser.add_argument("--queue", help="only this queue (default: every hutch queue)")
    parser.add_argument("--json", action="store_true", help="one JSON object per queue and line")
    parser.set_defaults(run=_inspect)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _table(stats: list[QueueStats]) -> None:
    header = ["QUEUE", "READY", "UNACKED", "CONSUMERS", "DEAD", "IN/s", "OUT/s", "ACK/s", "DEAD/s"]
    rows = [header]
    for s in stats:
        rates = s.rates
        rows.append(
            [
                s.queue,
                str(s.ready),
                _number(s.unacked),
                str(s.consumers),
                str(s.dead_letters),
                _number(rates.publish if rates else None),
                _number(rates.deliver if rates else None),
                _number(rates.ack if rates else None),
                _number(rates.dead_letter if rates else None),
            ]
        )
    print(table(rows, right=range(1, len(header))))


@command
def _inspect(options: argparse.Namespace) -> int:
    queue = checked_queue(options.queue) if options.queue is not None else None
    nodes = Nodes(broker_url())
    vhost = nodes.vhost

    async def main() -> inspection.Inspection:
        async with broker_connection(nodes, name="hutch inspect") as connection:
            # The management API of the node that answered (any node serves the cluster's).
            api = ManagementAPI.for_broker(nodes.current.url)
            try:
                return await inspection.inspect(connection, api, vhost, queue)
            except ManagementRequired as exc:
                raise UsageError(
                    f"listing queues needs the management API: {exc}; or name a queue with "
                    "--queue Q"
                ) from None
            except QueueNotFound as exc:
                assert queue is not None
                if exc.queue == queue:
                    raise UsageError(
                        f"no queue {queue!r} in vhost {vhost!r}; check --queue and the vhost in "
                        "HUTCH_BROKER_URL"
                    ) from None
                raise UsageError(
                    f"{queue!r} is not a hutch queue: it has no {routing.dlq_name(queue)!r} "
                    "(hutch workers and clients declare both)"
                ) from None

    result = asyncio.run(main())
    if options.json:
        for stats in result.queues:
            print(json.dumps(stats.to_json()))
    elif result.queues:
        _table(result.queues)
    else:
        print(f"hutch: no hutch queues in vhost {vhost!r}", file=sys.stderr)
    if result.management_error is not None:
        print(
            f"hutch: unacked counts and rates not shown: {result.management_error}",
            file=sys.stderr,
        )
    return 0
