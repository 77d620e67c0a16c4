"""``hutch dlq ls|show|replay|purge``: look at and recover dead letters.

Lines for dead letters go to stdout (as JSON lines with ``--json``); counts, warnings and errors
go to stderr, so stdout can be piped. See `service.ops.browser` for how a queue is read without
taking from it and `service.ops.dlq` for why an interrupted replay can duplicate but never lose
a message.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

from aio_pika.abc import AbstractConnection

from service import protocol, routing
from service.broker import Publisher, vhost_of
from service.commands import (
    broker_connection,
    broker_url,
    checked_queue,
    command,
    default_queue,
    plural,
)
from service.commands.render import detail_json, jsonable, raw_text, table
from service.errors import QueueNotFound, UsageError
from service.ops import dlq
from service.ops.deadletters import REASONS, DeadLetter, Filter, iso, parse_since
from service.ops.dlq import Detail, Scan
from service.settings import flag_type, positive_float, positive_int

ERROR_WIDTH = 160  # characters of the error shown per line; `show` and --json have all of it


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "dlq",
        help="list, show, replay or purge dead letters",
        description="Look at and recover the dead letters of a queue Q (kept in Q.dlq).",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    where = argparse.ArgumentParser(add_help=False)
    where.add_argument(
        "--queue",
        default=default_queue(),
        help="the work queue whose dead letters to use, without .dlq "
        "(default: HUTCH_QUEUE or 'default')",
    )
    chosen = where.add_argument_group("filters (all must match; repeat one to allow several)")
    chosen.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME",
        help="task name; shell patterns such as 'myapp.tasks.*' work",
    )
    chosen.add_argument(
        "--reason",
        action="append",
        default=[],
        metavar="REASON",
        help="dead-letter reason: " + ", ".join(REASONS),
    )
    chosen.add_argument(
        "--since",
        metavar="WHEN",
        help="dead-lettered at or after WHEN: 10m, 2h, 1d, or an ISO date-time such as "
        "2026-05-01T12:00 (UTC unless it has an offset)",
    )
    chosen.add_argument(
        "--id", action="append", default=[], metavar="ID", help="dead letter id, as ls shows it"
    )
    chosen.add_argument(
        "--flow",
        action="append",
        default=[],
        metavar="FLOW",
        help="the steps of this flow (a flow's step ids are FLOW:STEP); replaying a failed "
        "step resumes its flow",
    )
    chosen.add_argument(
        "--limit",
        type=flag_type(positive_int),
        metavar="N",
        help="at most N dead letters, the first in the queue",
    )
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="one JSON object per line")

    ls = actions.add_parser(
        "ls",
        parents=[where, output],
        help="list dead letters (removes nothing)",
        description="One line per dead letter, in queue order: id, task, reason, attempts, "
        "replays, when it was dead-lettered, error. Removes nothing.",
    )
    ls.set_defaults(run=_ls)

    show = actions.add_parser(
        "show",
        parents=[output],
        help="show one dead letter in full",
        description="Properties, headers and decoded body of the dead letter(s) with this id "
        "(or, if none has exactly this id, the one whose id starts with it).",
    )
    show.add_argument("id", metavar="ID")
    show.add_argument("--queue", default=default_queue(), help="the work queue (without .dlq)")
    show.set_defaults(run=_show)

    replay = actions.add_parser(
        "replay",
        parents=[where, output],
        help="publish dead letters back to their queue",
        description="Publish the matching dead letters back to the queue as fresh tasks "
        "(attempts start again; message_id is kept) and remove each from the dead-letter "
        "queue once the broker confirmed its copy. An interrupted replay can leave a message "
        "in both queues, never in neither.",
    )
    replay.add_argument("--dry-run", action="store_true", help="list what would be replayed")
    replay.add_argument(
        "--rate",
        type=flag_type(positive_float),
        metavar="N",
        help="replay at most N per second, to spare the workers (default: no limit)",
    )
    replay.set_defaults(run=_replay)

    purge = actions.add_parser(
        "purge",
        parents=[where, output],
        help="delete dead letters for good (needs --yes)",
        description="Delete the matching dead letters for good. Refuses without --yes.",
    )
    purge.add_argument("--yes", action="store_true", help="really delete them")
    purge.add_argument("--dry-run", action="store_true", help="list what would be deleted")
    purge.set_defaults(run=_purge)


# -- shared ----------------------------------------------------------------------------------


def _filter(options: argparse.Namespace) -> Filter:
    try:
        return Filter(
            tasks=tuple(options.task),
            reasons=tuple(options.reason),
            ids=tuple(options.id),
            since=parse_since(options.since) if options.since else None,
            flows=tuple(options.flow),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _not_found(exc: QueueNotFound, queue: str, url: str) -> UsageError:
    vhost = vhost_of(url)
    if exc.queue == queue:
        return UsageError(
            f"queue {queue!r} does not exist in vhost {vhost!r}, so its dead letters cannot go "
            "back to it; start a worker for it (that declares it) and replay again"
        )
    hint = (
        " --queue takes the work queue's name, without .dlq"
        if queue.endswith(".dlq")
        else " check --queue (hutch inspect lists hutch's queues) and HUTCH_BROKER_URL's vhost"
    )
    return UsageError(f"no dead-letter queue {exc.queue!r} in vhost {vhost!r};{hint}")


def _warn(text: str) -> None:
    print(f"hutch: warning: {text}", file=sys.stderr)


def _incomplete(scan: Scan) -> None:
    if not scan.complete:
        _warn(
            f"read only {scan.seen} of the {scan.total} messages in {scan.dlq}: another client "
            "holds the rest unacked (another hutch dlq?); run this again when it is done"
        )


def _one_line(text: str | None) -> str:
    return re.sub(r"\s+", " ", text or "").strip()


def _error(letter: DeadLetter) -> str:
    if letter.source == "broker":
        return f"(dead-lettered by RabbitMQ: {letter.reason})"
    if letter.error_type is None and letter.error_message is None:
        return "-"
    text = _one_line(f"{letter.error_type or '?'}: {letter.error_message or ''}")
    return protocol.truncate(text, ERROR_WIDTH)


def _row(letter: DeadLetter) -> list[str]:
    return [
        letter.id,
        letter.task or "-",
        letter.reason,
        str(letter.attempts),
        str(letter.replays),
        iso(letter.dead_lettered_at) if letter.dead_lettered_at else "-",
        _error(letter),
    ]


def _table(letters: Sequence[DeadLetter]) -> None:
    header = ["ID", "TASK", "REASON", "ATTEMPTS", "REPLAYS", "DEAD-LETTERED", "ERROR"]
    rows = [header, *(_row(letter) for letter in letters)]
    print(table(rows, right=(3, 4), ragged_last=True))


def _json_line(value: dict[str, Any]) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)


def _print_letters(letters: Sequence[DeadLetter], as_json: bool) -> None:
    if as_json:
        for letter in letters:
            _json_line(letter.to_json())
    elif letters:
        _table(letters)


def _summary(scan: Scan, where: Filter, verb: str) -> str:
    text = f"{verb} {plural(len(scan.letters), 'dead letter')} in {scan.dlq}"
    if str(where) != "none":
        text += f" matching {where}"
    return text + f" ({scan.total} in all)"


def _reporter(options: argparse.Namespace, verb: str) -> Callable[[DeadLetter], None]:
    """What to print as each dead letter is replayed or purged."""

    def report(letter: DeadLetter) -> None:
        if options.json:
            _json_line({**letter.to_json(), verb: True})
        else:
            print(f"{verb} {letter.id}  {letter.task or '-'}  ({letter.reason})", flush=True)

    return report


# -- actions ---------------------------------------------------------------------------------


@command
def _ls(options: argparse.Namespace) -> int:
    queue, where, url = checked_queue(options.queue), _filter(options), broker_url()

    async def main() -> int:
        async with broker_connection(url, name="hutch dlq ls") as connection:
            try:
                scan = await dlq.list_letters(connection, queue, where, limit=options.limit)
            except QueueNotFound as exc:
                raise _not_found(exc, queue, url) from None
            _print_letters(scan.letters, options.json)
            print(_summary(scan, where, "listed"), file=sys.stderr)
            _incomplete(scan)
        return 0

    return asyncio.run(main())


def _show_text(detail: Detail, index: int, count: int) -> None:
    letter = detail.letter
    where = f" ({index} of {count} copies)" if count > 1 else ""
    print(f"dead letter {letter.id} in {routing.dlq_name(letter.queue)}{where}")
    print("properties:")
    for name, value in detail.properties.items():
        print(f"  {name + ':':<17} {_value(value)}")
    print("headers:")
    width = max((len(k) for k in detail.headers), default=0) + 1
    for name, value in detail.headers.items():
        shown = _value(value)
        if name in ("x-hutch-dead-lettered-at", "x-hutch-replayed-at") and isinstance(value, int):
            shown += f"  ({iso(_ms(value), ms=True)})"
        print(f"  {name + ':':<{width}} {shown}")
    body, error = detail.decoded()
    print(f"body ({letter.content_type or 'no content type'}, {plural(letter.size, 'byte')}):")
    if error is None:
        text = json.dumps(jsonable(body), indent=2, ensure_ascii=False)
    else:
        print(f"  cannot decode: {error}; raw:")
        raw = raw_text(detail.body)
        text = raw if isinstance(raw, str) else json.dumps(raw)
    for line in text.splitlines() or [""]:
        print("  " + line)


def _ms(value: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(value / 1000, dt.UTC)


def _value(value: Any) -> str:
    plain = jsonable(value)
    return plain if isinstance(plain, str) else json.dumps(plain, ensure_ascii=False)


@command
def _show(options: argparse.Namespace) -> int:
    queue, url = checked_queue(options.queue), broker_url()
    if not options.id.strip():
        raise UsageError("ID is empty; hutch dlq ls shows the ids")

    async def main() -> int:
        async with broker_connection(url, name="hutch dlq show") as connection:
            try:
                found = await dlq.find(connection, queue, options.id)
            except QueueNotFound as exc:
                raise _not_found(exc, queue, url) from None
            _incomplete(found.scan)
        ids = list(dict.fromkeys(d.letter.id for d in found.details))
        if not found.details:
            print(
                f"hutch: no dead letter with id {options.id!r} in {found.scan.dlq} "
                f"({found.scan.total} in all; hutch dlq ls lists them)",
                file=sys.stderr,
            )
            return 1
        if len(ids) > 1:
            raise UsageError(
                f"{options.id!r} starts {len(ids)} ids ({', '.join(ids[:5])}"
                f"{', ...' if len(ids) > 5 else ''}); give more of the id"
            )
        for index, detail in enumerate(found.details, 1):
            if options.json:
                _json_line(detail_json(detail))
            else:
                if index > 1:
                    print()
                _show_text(detail, index, len(found.details))
        return 0

    return asyncio.run(main())


async def _dry_run(
    connection: AbstractConnection,
    queue: str,
    where: Filter,
    options: argparse.Namespace,
    verb: str,
) -> None:
    """List what ``verb`` (replay or purge) would touch, and change nothing."""
    scan = await dlq.list_letters(connection, queue, where, limit=options.limit)
    _print_letters(scan.letters, options.json)
    print(_summary(scan, where, f"dry run: would {verb}") + "; nothing changed", file=sys.stderr)
    _incomplete(scan)


@command
def _replay(options: argparse.Namespace) -> int:
    queue, where, url = checked_queue(options.queue), _filter(options), broker_url()

    async def main() -> int:
        async with broker_connection(url, name="hutch dlq replay") as connection:
            try:
                if options.dry_run:
                    await _dry_run(connection, queue, where, options, "replay")
                    return 0
                publisher = Publisher(url, name="hutch dlq replay publish")
                try:
                    report = await dlq.replay(
                        connection,
                        publisher,
                        queue,
                        where,
                        limit=options.limit,
                        rate=options.rate,
                        on_replayed=_reporter(options, "replayed"),
                    )
                finally:
                    await publisher.close()
            except QueueNotFound as exc:
                raise _not_found(exc, queue, url) from None
            scan = report.scan
            print(_summary(scan, where, "replayed") + f" to {queue}", file=sys.stderr)
            _incomplete(scan)
            if report.error is not None:
                print(
                    f"hutch: error: replay stopped: {report.error}; the dead letters not "
                    f"replayed are still in {scan.dlq}",
                    file=sys.stderr,
                )
                return 1
        return 0

    return asyncio.run(main())


@command
def _purge(options: argparse.Namespace) -> int:
    queue, where, url = checked_queue(options.queue), _filter(options), broker_url()
    if not options.yes and not options.dry_run:
        raise UsageError(
            "purge deletes dead letters for good: add --yes to do it "
            "(--dry-run, or hutch dlq ls with the same filters, shows what it would delete)"
        )

    async def main() -> int:
        async with broker_connection(url, name="hutch dlq purge") as connection:
            try:
                if options.dry_run:
                    await _dry_run(connection, queue, where, options, "purge")
                    return 0
                report = await dlq.purge(
                    connection,
                    queue,
                    where,
                    limit=options.limit,
                    on_purged=_reporter(options, "purged"),
                )
            except QueueNotFound as exc:
                raise _not_found(exc, queue, url) from None
            print(_summary(report.scan, where, "purged"), file=sys.stderr)
            _incomplete(report.scan)
        return 0

    return asyncio.run(main())
