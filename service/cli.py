"""``hutch``: the command line.

- ``hutch worker --tasks MODULE[,MODULE...]``: run the service (see ``hutch worker --help``).
- ``hutch call``, ``hutch map``, ``hutch dlq``, ``hutch inspect``: in `service.commands`.

Bad flags print what is wrong and exit 2; a failed task exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from service import __version__
from service.errors import ConfigError, HutchError, PoolStartError
from service.logs import configure as configure_logging
from service.settings import add_arguments, load


def _parser(*, worker_only: bool = False) -> argparse.ArgumentParser:
    """The command line; with ``worker_only``, just ``hutch worker``: the service starts
    without importing the other commands (the AMQP client and the operator tools)."""
    parser = argparse.ArgumentParser(
        prog="hutch", description="Run CPU-heavy Python tasks from RabbitMQ on every core."
    )
    parser.add_argument("--version", action="version", version=f"hutch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    worker = commands.add_parser(
        "worker",
        help="consume a queue and run its tasks in a process pool",
        description="Consume a queue and run its tasks in a per-host process pool. "
        "Every flag can also be set as HUTCH_<FLAG> in the environment; the broker URL "
        "comes from HUTCH_BROKER_URL or HUTCH_BROKER_URL_FILE.",
    )
    add_arguments(worker)
    worker.set_defaults(run=_worker)
    if not worker_only:
        from service.commands import call, dlq, inspect, map, schedule, store

        for command in (call, dlq, inspect, map, schedule, store):
            command.add_parser(commands)
    return parser


def _worker(options: argparse.Namespace) -> int:
    import uvloop

    from service.worker import Worker

    raw = {k: v for k, v in vars(options).items() if k not in ("command", "run")}
    settings = load(raw)
    if settings.tasks is None:
        raise ConfigError(
            "--tasks (or HUTCH_TASKS) is required: the modules holding your @task functions"
        )
    _check_store()
    configure_logging(settings.log_level, settings.log_format)
    # Like `python -m`, let task modules in the working directory be found.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return uvloop.run(Worker(settings).run())


def _check_store() -> None:
    """Refuse to start with a bad ``HUTCH_STORE_*`` or a store root that is not there (an
    unmounted share), rather than dead-letter the first reference. The pool children open
    their own store; this one only looks (for S3 it makes no request)."""
    from service.store.config import StoreSettings

    store_settings = StoreSettings.from_env()
    if store_settings.url is not None:
        store_settings.open().close()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(worker_only=argv[:1] == ["worker"])
    options = parser.parse_args(argv)
    try:
        return int(options.run(options))
    except (ConfigError, PoolStartError) as exc:
        parser.exit(2, f"hutch: error: {exc}\n")
    except ImportError as exc:
        parser.exit(2, f"hutch: error: cannot import task module: {exc}\n")
    except (HutchError, OSError) as exc:
        parser.exit(1, f"hutch: error: {exc}\n")
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
