"""``hutch``: the command line.

- ``hutch worker --tasks MODULE[,MODULE...]``: run the service (see ``hutch worker --help``).
- ``hutch call TASK [ARG...]``: publish one task, wait, print its result as JSON.
- ``hutch dlq``, ``hutch inspect``, ``hutch map``: operator tools, in `service.commands`.

Bad flags print what is wrong and exit 2; a failed task exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import aiormq

from service import protocol
from service.broker import CONNECTION_ERRORS
from service.commands import UsageError, broker_url, command, explain_connection_error
from service.commands import dlq as dlq_command
from service.commands import inspect as inspect_command
from service.commands import map as map_command
from service.errors import ConfigError, HutchError, TaskError
from service.logs import configure as configure_logging
from service.pool import PoolStartError
from service.settings import add_arguments, load


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hutch", description="Run CPU-heavy Python tasks from RabbitMQ on every core."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = commands.add_parser(
        "worker",
        help="consume a queue and run its tasks in a process pool",
        description="Consume a queue and run its tasks in a per-host process pool. "
        "Every flag can also be set as HUTCH_<FLAG> in the environment; the broker URL "
        "comes from HUTCH_BROKER_URL or HUTCH_BROKER_URL_FILE.",
    )
    add_arguments(worker)

    call = commands.add_parser("call", help="run one task and print its result as JSON")
    call.add_argument("task", help="registered task name, e.g. myapp.tasks.resize")
    call.add_argument(
        "args", nargs="*", metavar="ARG", help="argument: JSON if it parses, else a string"
    )
    call.add_argument(
        "-k", "--kwarg", action="append", type=_kwarg, default=[], metavar="KEY=VALUE"
    )
    call.add_argument("--queue", default=os.environ.get("HUTCH_QUEUE", "default"))
    call.add_argument("--timeout", type=float, default=None, help="seconds to wait for the result")
    call.add_argument(
        "--json",
        dest="content_type",
        action="store_const",
        const=protocol.JSON,
        default=protocol.MSGPACK,
        help="publish the task as JSON instead of msgpack",
    )
    for operator_command in (dlq_command, inspect_command, map_command):
        operator_command.add_parser(commands)
    return parser


def _worker(options: argparse.Namespace) -> int:
    import uvloop

    from service.worker import Worker

    raw = {k: v for k, v in vars(options).items() if k != "command"}
    settings = load(raw)
    if settings.tasks is None:
        raise ConfigError(
            "--tasks (or HUTCH_TASKS) is required: the modules holding your @task functions"
        )
    configure_logging(settings.log_level, settings.log_format)
    # Like `python -m`, let task modules in the working directory be found.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return uvloop.run(Worker(settings).run())


@command
def _call(options: argparse.Namespace) -> int:
    from service.client import Client

    url = broker_url()
    try:
        client = Client(
            url, queue=options.queue, timeout=options.timeout, content_type=options.content_type
        )
    except (*CONNECTION_ERRORS, aiormq.exceptions.AMQPError) as exc:
        raise UsageError(explain_connection_error(exc, url)) from None
    with client:
        try:
            args = [_arg(text) for text in options.args]
            result = client.call(options.task, *args, **dict(options.kwarg))
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    options = parser.parse_args(argv)
    try:
        if options.command == "worker":
            return _worker(options)
        if hasattr(options, "run"):  # the operator commands
            return int(options.run(options))
        return _call(options)
    except ConfigError as exc:
        parser.exit(2, f"hutch: error: {exc}\n")
    except ImportError as exc:
        parser.exit(2, f"hutch: error: cannot import task module: {exc}\n")
    except PoolStartError as exc:
        parser.exit(2, f"hutch: error: {exc}\n")
    except (HutchError, OSError) as exc:
        parser.exit(1, f"hutch: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
