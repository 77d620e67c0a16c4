"""``hutch call TASK [ARG...]``: publish one task, wait for it, print its result as JSON."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from service.commands import (
    broker_url,
    checked_queue,
    command,
    connected_client,
    content_type_flag,
    default_queue,
    say_if_unconsumed,
)
from service.errors import TaskError
from service.flow import step
from service.settings import flag_type, non_negative_float, positive_float


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("call", help="run one task and print its result as JSON")
    parser.add_argument("task", help="registered task name, e.g. myapp.tasks.resize")
    parser.add_argument(
        "args", nargs="*", metavar="ARG", help="argument: JSON if it parses, else a string"
    )
    parser.add_argument(
        "-k", "--kwarg", action="append", type=_kwarg, default=[], metavar="KEY=VALUE"
    )
    parser.add_argument("--queue", default=default_queue())
    parser.add_argument(
        "--timeout",
        type=flag_type(positive_float),
        default=None,
        help="seconds to wait for the result",
    )
    content_type_flag(parser, "publish the task as JSON instead of msgpack")
    later = parser.add_mutually_exclusive_group()
    later.add_argument(
        "--countdown",
        type=flag_type(non_negative_float),
        metavar="SECONDS",
        help="run it no sooner than this many seconds from now (held by the broker)",
    )
    later.add_argument(
        "--eta",
        type=flag_type(iso_instant),
        metavar="ISO-DATETIME",
        help="run it no sooner than this instant, with its UTC offset: 2027-01-01T08:00Z",
    )
    parser.set_defaults(run=_call)


def iso_instant(text: str) -> dt.datetime:
    """An ISO 8601 date-time with its UTC offset (``Z`` or ``+02:00``)."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO date-time; write e.g. 2027-01-01T08:00Z or "
            "2027-01-01T09:00+01:00"
        ) from None
    if when.tzinfo is None:
        raise ValueError(
            f"{text!r} has no UTC offset, so it names a different instant on every host; "
            "add Z or +HH:MM"
        )
    return when


def _arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _kwarg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, _arg(value)


@command
def _call(options: argparse.Namespace) -> int:
    queue, url = checked_queue(options.queue), broker_url()
    with connected_client(
        url, queue=queue, timeout=options.timeout, content_type=options.content_type
    ) as client:
        say_if_unconsumed(client, queue)
        try:
            args = [_arg(text) for text in options.args]
            result = client.call(
                step(
                    options.task,
                    *args,
                    kwargs=dict(options.kwarg),
                    countdown=options.countdown,
                    eta=options.eta,
                )
            )
        except TaskError as exc:
            print(f"hutch: task failed: {exc.type}: {exc.message}", file=sys.stderr)
            return 1
        except TimeoutError:
            print(
                f"hutch: no result within {options.timeout:g}s (the task may still run)",
                file=sys.stderr,
            )
            return 1
    print(json.dumps(result, default=str))
    return 0
