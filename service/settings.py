"""Worker settings: one definition, read from the command line or ``HUTCH_<SETTING>``.

Precedence: command-line flag, then environment variable, then the documented default. The
broker URL is deliberately not a flag (``ps`` would show its password); it comes from
``HUTCH_BROKER_URL`` or from a file named by ``HUTCH_BROKER_URL_FILE``, and may list several
nodes of one cluster, comma-separated (`service.nodes`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

from service.cpus import usable_cpus
from service.errors import ConfigError
from service.nodes import parse_urls, safe_url, split_urls
from service.registry import TaskSpec
from service.routing import check_queue_name

DEFAULT_BROKER_URL = "amqp://guest:guest@localhost:5672/"
# Seconds `Client.submit` keeps trying the broker nodes through an outage (HUTCH_PUBLISH_TIMEOUT).
DEFAULT_PUBLISH_TIMEOUT = 30.0
T = TypeVar("T")

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes from ``123``, ``64KiB``, ``4M``, ``1GiB`` (binary units)."""
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a size (examples: 1048576, 512KiB, 4MiB, 1GiB)")
    unit = (match.group(2) or "")[:1].lower()
    return int(match.group(1)) * _UNITS[unit]


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> dt.timedelta:
    """A duration from ``30s``, ``10m``, ``2h``, ``7d``, ``1w`` or ``1h30m``."""
    spec = text.strip().lower()
    if not spec or _DURATION.sub("", spec) != "":
        raise ValueError(
            f"{text!r} is not a duration: use a number with a unit, such as 30s, 10m, 2h, 7d, "
            "1w or 1h30m"
        )
    seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION.findall(spec))
    try:
        return dt.timedelta(seconds=seconds)
    except OverflowError:
        return dt.timedelta.max


N = TypeVar("N", int, float)


def _number(text: str, convert: Callable[[str], N], accept: Callable[[N], bool], what: str) -> N:
    try:
        value = convert(text)
    except ValueError:
        raise ValueError(f"{text!r} must be {what}") from None
    if not accept(value):  # NaN fails every comparison, so it is refused too
        raise ValueError(f"{text!r} must be {what}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a whole number of at least 1")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "a whole number, 0 or more")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < math.inf, "a positive number of seconds")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < math.inf, "0 or a positive number of seconds")


def flag_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """``parse`` as an argparse ``type=``: its message becomes argparse's error, in words
    (argparse would otherwise print "invalid positive_int value")."""

    def checked(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    checked.__name__ = parse.__name__
    return checked


def parse_addr(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) into a host and a port."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:9808)")
    return host.strip("[]") or "0.0.0.0", int(port)


def _modules(text: str) -> list[str]:
    modules = [m.strip() for m in text.split(",") if m.strip()]
    if not modules:
        raise ValueError("name at least one module, e.g. --tasks myapp.tasks")
    return modules


def _queues(text: str) -> str:
    """One queue, or several in priority order (``high,default,low``), checked and normalised
    to ``a,b,c``; `Settings.queues` splits them."""
    names = [name.strip() for name in text.split(",")]
    if any(not name for name in names):
        raise ValueError(
            f"{text!r} has an empty queue name; name queues separated by single commas, "
            "highest priority first (e.g. high,default,low)"
        )
    seen: set[str] = set()
    for name in names:
        check_queue_name(name)
        if name in seen:
            raise ValueError(f"{text!r} names queue {name!r} twice; name each queue once")
        seen.add(name)
    return ",".join(names)


def _addr(text: str) -> str:
    if text.strip().lower() == "off":
        return "off"
    parse_addr(text)
    return text.strip()


def broker_urls(text: str) -> str:
    """A comma-separated list of AMQP URLs, each checked, as one string (blanks dropped)."""
    return ",".join(parse_urls(text))


def _log_format(text: str) -> str:
    fmt = text.strip().lower()
    if fmt not in {"text", "json"}:
        raise ValueError(f"{text!r} is not text or json")
    return fmt


def _yes_no(text: str) -> bool:
    value = text.strip().lower()
    if value not in {"1", "true", "yes", "0", "false", "no"}:
        raise ValueError(f"{text!r} is not yes or no")
    return value in {"1", "true", "yes"}


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError(f"{text!r} is not one of DEBUG, INFO, WARNING, ERROR")
    return level


def _join_capacity(text: str) -> int:
    value = positive_int(text)
    if value > 65_535:  # AMQP's prefetch count is 16 bits
        raise ValueError(f"{value} is more than 65535")
    return value


def _setting(
    default: Any, parse: Callable[[str], Any], help: str, *, flag: bool = True, **kw: Any
) -> Any:
    return field(default=default, metadata={"parse": parse, "help": help, "flag": flag}, **kw)


@dataclass
class Settings:
    """Everything a worker can be told; see ``hutch worker --help`` for the same text."""

    tasks: list[str] | None = _setting(
        None, _modules, "comma-separated modules whose @task functions this worker runs"
    )
    queue: str = _setting(
        "default",
        _queues,
        "queue to consume (its dead letters go to QUEUE.dlq); several, separated by commas and "
        "highest priority first, share the pool: a free child always takes the earliest "
        "queue's waiting task",
    )
    # 0 stands for "not set" (a flag cannot say 0): usable CPUs, found in __post_init__.
    concurrency: int = _setting(
        0, positive_int, "pool size (default: usable CPUs, honouring affinity and cgroups)"
    )
    prefetch_buffer: int = _setting(
        2,
        non_negative_int,
        "deliveries always held beyond the pool size; the first prefetch is concurrency + this",
    )
    prefetch_time: float = _setting(
        0.1,
        non_negative_float,
        "seconds of measured work per child to hold beyond the running tasks, so short tasks "
        "get a deep prefetch and long ones a shallow one (0: fixed prefetch)",
    )
    drain_timeout: float = _setting(
        25.0, positive_float, "seconds SIGTERM lets running tasks finish before returning them"
    )
    time_limit: float = _setting(
        840.0, positive_float, "hard time limit in seconds for tasks that set none"
    )
    consumer_timeout: float = _setting(
        1800.0,
        positive_float,
        "RabbitMQ's consumer_timeout in seconds, to check time limits against",
    )
    max_deliveries: int = _setting(
        5,
        positive_int,
        "deliveries before a message that keeps killing its worker is dead-lettered",
    )
    max_body_size: int = _setting(4 << 20, parse_size, "largest task body accepted")
    max_result_size: int = _setting(8 << 20, parse_size, "largest result body sent")
    max_depth: int = _setting(32, positive_int, "deepest nesting of arrays and maps accepted")
    memory_limit: int = _setting(
        0, parse_size, "address-space limit per child (0: none); over it a task gets MemoryError"
    )
    max_tasks_per_child: int = _setting(
        0, non_negative_int, "replace a child after this many tasks (0: never)"
    )
    max_memory_per_child: int = _setting(
        0, parse_size, "replace a child whose RSS grew this much above its baseline (0: never)"
    )
    join_capacity: int = _setting(
        10_000,
        _join_capacity,
        "most fan-in records of flows one worker holds while it holds the fan-in (1-65535)",
    )
    join_max_age: float = _setting(
        86_400.0,
        positive_float,
        "seconds a flow's fan-in may stay open before the flow fails (and a failed one's "
        "records stay replayable)",
    )
    metrics_addr: str = _setting(
        "127.0.0.1:9808", _addr, "HOST:PORT for /metrics, /livez and /readyz ('off' disables)"
    )
    log_level: str = _setting("INFO", _log_level, "DEBUG, INFO, WARNING or ERROR")
    log_format: str = _setting(
        "text", _log_format, "text (to stderr) or json (one object per line, to stdout)"
    )
    insecure_tls: bool = _setting(
        False,
        _yes_no,
        "accept an amqps:// URL with no_verify_ssl=1 (never in production)",
        flag=False,
    )
    broker_url: str = _setting(
        DEFAULT_BROKER_URL,
        broker_urls,
        "AMQP URL, or several nodes' URLs comma-separated (env only: HUTCH_BROKER_URL or _FILE)",
        flag=False,
    )

    def __post_init__(self) -> None:
        if not self.concurrency:
            self.concurrency = usable_cpus()
        check_tls(self.broker_url, insecure=self.insecure_tls)

    @property
    def queues(self) -> tuple[str, ...]:
        """The queues to consume, highest priority first."""
        return tuple(self.queue.split(","))

    @property
    def prefetch(self) -> int:
        return self.concurrency + self.prefetch_buffer


def time_limit_report(settings: Settings, specs: Iterable[TaskSpec]) -> tuple[str, list[str]]:
    """What to say at start-up about time limits the broker's consumer_timeout would cut short:
    one line of information and a warning per task at risk.

    AMQP does not expose the broker's consumer_timeout, so it is taken from the setting
    (default: RabbitMQ's default of 30 min) and said so. The broker's clock starts at delivery:
    a delivery in the prefetch buffer can wait one whole run of the task ahead of it before its
    own run starts, so the budget is halved when there is a buffer.
    """
    runs = 2 if settings.prefetch_buffer else 1
    budget = (settings.consumer_timeout - 60) / runs
    limits = {spec.name: spec.time_limit or settings.time_limit for spec in specs}
    info = (
        f"RabbitMQ's consumer_timeout cannot be read over AMQP: assuming "
        f"{settings.consumer_timeout:g}s (--consumer-timeout); the longest hard time limit is "
        f"{max(limits.values(), default=settings.time_limit):g}s"
    )
    warnings = [
        f"task {name} has a hard time limit of {limit:g}s, but RabbitMQ's consumer_timeout "
        f"({settings.consumer_timeout:g}s assumed; set --consumer-timeout to what the broker "
        "uses) closes the channel of any delivery unacked that long, and a prefetched delivery "
        f"can wait one run before its own: keep limits below {budget:g}s "
        f"(or --prefetch-buffer 0, which allows {settings.consumer_timeout - 60:g}s)"
        for name, limit in limits.items()
        if limit > budget
    ]
    return info, warnings


def check_tls(url: str, *, insecure: bool) -> None:
    """amqps:// verifies the server certificate; switching that off takes two explicit steps.

    ``url`` may be a comma-separated list: each URL carries its own TLS options.
    """
    for one in split_urls(url):
        query = parse_qs(urlsplit(one).query)
        disabled = query.get("no_verify_ssl", ["0"])[-1] not in ("", "0", "false")
        if urlsplit(one).scheme == "amqps" and disabled and not insecure:
            raise ConfigError(
                f"the broker URL {safe_url(one)} turns off TLS certificate verification "
                "(no_verify_ssl); set HUTCH_INSECURE_TLS=yes as well if you really mean it"
            )


def env_name(name: str) -> str:
    return f"HUTCH_{name.upper()}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every setting that may appear on a command line; list the rest."""
    env_only = [
        f"{env_name(f.name)}: {f.metadata['help']}"
        for f in fields(Settings)
        if not f.metadata["flag"]
    ]
    parser.epilog = "Environment only (never on the command line): " + "; ".join(env_only) + "."
    for f in fields(Settings):
        if not f.metadata["flag"]:
            continue
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            metavar=f.name.upper(),
            help=f"{f.metadata['help']} [env {env_name(f.name)}]",
        )


def load(
    args: Mapping[str, str | None] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build settings from flags (raw strings) and the environment; raises `ConfigError`."""
    args = args or {}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name == "broker_url":  # environment only, and a file may hold it: see below
            continue
        raw = args.get(f.name)
        source = "--" + f.name.replace("_", "-")
        if raw is None:
            raw = environ.get(env_name(f.name))
            source = env_name(f.name)
        if raw is None:
            continue
        try:
            values[f.name] = f.metadata["parse"](raw)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    values["broker_url"] = broker_url_from_env(environ)
    return Settings(**values)


# The largest body a client publishes. RabbitMQ does not advertise its max_message_size, so
# this is a setting (HUTCH_MAX_MESSAGE_SIZE). Well under the 16 MiB that RabbitMQ 4.x refuses
# by default: on 3.10 (limit 128 MiB) a 50 MiB body left the node answering no AMQP handshake
# until it was restarted, so an unconfigured client must never come near such sizes.
DEFAULT_MAX_MESSAGE_SIZE = 8 << 20


def max_message_size_from_env(environ: Mapping[str, str] | None = None) -> int:
    """``HUTCH_MAX_MESSAGE_SIZE`` (a size), else `DEFAULT_MAX_MESSAGE_SIZE`; `ConfigError`."""
    environ = os.environ if environ is None else environ
    raw = environ.get("HUTCH_MAX_MESSAGE_SIZE", "").strip()
    if not raw:
        return DEFAULT_MAX_MESSAGE_SIZE
    try:
        size = parse_size(raw)
    except ValueError as exc:
        raise ConfigError(f"HUTCH_MAX_MESSAGE_SIZE: {exc}") from None
    if size < 1:
        raise ConfigError("HUTCH_MAX_MESSAGE_SIZE must be at least 1 byte")
    return size


def broker_url_from_env(environ: Mapping[str, str] | None = None) -> str:
    """``HUTCH_BROKER_URL``, else the contents of ``HUTCH_BROKER_URL_FILE``, else the default.

    Shared by the worker, the client and the operator commands; raises `ConfigError`.
    A value may list several URLs, comma-separated; each is checked, and a bad one is a
    `ConfigError` naming it (password masked).
    """
    environ = os.environ if environ is None else environ
    url = environ.get("HUTCH_BROKER_URL")
    source = "HUTCH_BROKER_URL"
    if not url:
        path = environ.get("HUTCH_BROKER_URL_FILE")
        if not path:
            return DEFAULT_BROKER_URL
        source = f"HUTCH_BROKER_URL_FILE ({path})"
        try:
            with open(path) as url_file:
                # One URL per line is accepted as well as commas, as secrets are often written.
                url = ",".join(url_file.read().split())
        except OSError as exc:
            raise ConfigError(
                f"HUTCH_BROKER_URL_FILE: cannot read {path}: {exc.strerror}"
            ) from None
    try:
        return broker_urls(url)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def publish_timeout_from_env(environ: Mapping[str, str] | None = None) -> float:
    """``HUTCH_PUBLISH_TIMEOUT`` (seconds a client keeps trying to publish through an outage),
    else `DEFAULT_PUBLISH_TIMEOUT`; raises `ConfigError`."""
    environ = os.environ if environ is None else environ
    raw = environ.get("HUTCH_PUBLISH_TIMEOUT")
    if not raw:
        return DEFAULT_PUBLISH_TIMEOUT
    try:
        return positive_float(raw)
    except ValueError as exc:
        raise ConfigError(f"HUTCH_PUBLISH_TIMEOUT: {exc}") from None
