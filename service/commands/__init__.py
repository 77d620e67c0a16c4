"""The commands besides ``hutch worker``: ``call``, ``map``, ``dlq`` and ``inspect``.

Each command module has ``add_parser(commands)``, which sets the parser's ``run`` default to the
command's handler; ``service/cli.py`` only wires them in. The work itself lives in
`service.client` and `service.ops`; these modules parse options and print.

User errors (unreachable broker, unknown queue, bad filter, unreadable input) raise `UsageError`:
one line on stderr saying what to do, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection

from service import protocol, routing
from service.broker import CONNECTION_ERRORS, Nodes, connect, safe_url, vhost_of
from service.client import Client
from service.errors import BrokerUnavailable, ConfigError, UsageError
from service.nodes import split_urls
from service.settings import broker_url_from_env

CONNECT_TIMEOUT = 15.0


Handler = Callable[[argparse.Namespace], int]


def command(handler: Handler) -> Handler:
    """Wrap a command: quiet AMQP library logs, user errors as one line with exit 2."""

    @functools.wraps(handler)
    def run(options: argparse.Namespace) -> int:
        # aiormq logs failed connects and closed channels itself, with tracebacks; the
        # commands say what went wrong in one line instead.
        for name in ("aiormq", "aio_pika"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            return handler(options)
        except UsageError as exc:
            print(f"hutch: error: {exc}", file=sys.stderr)
            return 2
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException) as exc:
            print(f"hutch: error: the broker connection failed: {exc!r}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            # stdout was closed early (piped into head, say); keep Python's exit flush quiet.
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1

    return run


def default_queue() -> str:
    """``HUTCH_QUEUE``, or its first queue when it names a worker's several (the same
    environment often serves both): ``--queue`` says otherwise."""
    return os.environ.get("HUTCH_QUEUE", "default").split(",")[0].strip() or "default"


def checked_queue(queue: str) -> str:
    try:
        routing.check_queue_name(queue)
    except ValueError as exc:
        raise UsageError(f"--queue: {exc}") from None
    return queue


def broker_url() -> str:
    """The broker URL (list) from the environment (`broker_url_from_env`); a bad one is a
    `UsageError`."""
    try:
        return broker_url_from_env()
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def explain_connection_error(exc: BaseException, url: str) -> str:
    """One line saying why connecting to ``url`` (a URL or a list) failed and what to check."""
    if isinstance(exc, BrokerUnavailable):
        if len(exc.tried) == 1 and exc.last:
            return _explain(next(iter(exc.last.values())), split_urls(url)[0])
        return str(exc)
    return _explain(exc, url)


def _explain(exc: BaseException, url: str) -> str:
    where = safe_url(url)
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return (
            f"the broker at {where} refused the user name or password; "
            "check HUTCH_BROKER_URL (or HUTCH_BROKER_URL_FILE)"
        )
    if isinstance(exc, TimeoutError):
        return (
            f"the broker at {where} did not answer within {CONNECT_TIMEOUT:g}s; "
            "check HUTCH_BROKER_URL and the network"
        )
    if isinstance(exc, aiormq.exceptions.AMQPConnectionError | ConnectionError):
        reason = exc.args[1] if len(exc.args) > 1 else exc
        return (
            f"cannot connect to the broker at {where} ({reason}); is RabbitMQ running? "
            "The URL comes from HUTCH_BROKER_URL (or HUTCH_BROKER_URL_FILE)"
        )
    # RabbitMQ closes the connection during the handshake when the vhost is missing or the
    # user has no access to it; aiormq reports that as an unexpected frame.
    return (
        f"the broker at {where} refused the connection: vhost {vhost_of(url)!r} does not "
        "exist or the user may not use it; check HUTCH_BROKER_URL"
    )


def content_type_flag(parser: argparse.ArgumentParser, help: str) -> None:
    """``--json``: publish as JSON instead of msgpack (sets ``content_type``)."""
    parser.add_argument(
        "--json",
        dest="content_type",
        action="store_const",
        const=protocol.JSON,
        default=protocol.MSGPACK,
        help=help,
    )


@contextlib.contextmanager
def connected_client(url: str, **options: Any) -> Iterator[Client]:
    """A connected `Client`, or `UsageError` saying why the broker did not take it."""
    try:
        client = Client(url, **options)
    except (*CONNECTION_ERRORS, aiormq.exceptions.AMQPError) as exc:
        raise UsageError(explain_connection_error(exc, url)) from None
    with client:
        yield client


def say_if_unconsumed(client: Client, queue: str) -> None:
    """One line on stderr when no worker consumes ``queue`` yet: the command will wait."""
    if client.consumer_count() == 0:
        print(
            f"hutch: no worker is consuming {queue!r} yet; waiting (start one with "
            f"'hutch worker --queue {queue} --tasks MODULE')",
            file=sys.stderr,
            flush=True,
        )


@contextlib.asynccontextmanager
async def broker_connection(url: str | Nodes, *, name: str) -> AsyncIterator[AbstractConnection]:
    """A connection for one command to the first node that answers (given `Nodes`, the one
    that did is ``nodes.current`` afterwards), or `UsageError` saying why there is none."""
    nodes = url if isinstance(url, Nodes) else Nodes(url)
    try:
        connection = await connect(nodes, name=name, timeout=CONNECT_TIMEOUT)
    except (*CONNECTION_ERRORS, aiormq.exceptions.AMQPError) as exc:
        raise UsageError(
            explain_connection_error(exc, ",".join(n.url for n in nodes.all))
        ) from None
    try:
        yield connection
    finally:
        with contextlib.suppress(*CONNECTION_ERRORS):
            await connection.close()


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
