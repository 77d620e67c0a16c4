"""``hutch map TASK --from FILE|-``: run a task over argument lists, like ``Pool.starmap``.

Input: one JSON array of positional arguments per line (blank lines are skipped); every line is
checked before anything is published. Output: one JSON line per input line, in input order,
written as soon as it and every line before it are done, in the shape of a result body
(protocol §5.3): ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"type": ...,
"message": ...}}``. A progress bar with rate and ETA goes to stderr when stderr is a terminal,
and a summary always. Exit status 0 only if every item succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any, TextIO

from service.commands import (
    broker_url,
    checked_queue,
    command,
    connected_client,
    content_type_flag,
    default_queue,
    plural,
    say_if_unconsumed,
)
from service.commands.progress import Progress
from service.errors import TaskError, UsageError
from service.settings import flag_type, positive_float, positive_int


def add_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "map",
        help="run a task over argument lists from a file, results as JSON lines",
        description="Run TASK once per line of input, each line a JSON array of arguments "
        '(e.g. [2, 3.5]); print one JSON line per input line, in order: {"ok": true, '
        '"result": ...} or {"ok": false, "error": {"type": ..., "message": ...}}. '
        "Exit status 0 only if every item succeeded.",
    )
    parser.add_argument("task", help="registered task name, e.g. myapp.tasks.resize")
    parser.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="FILE",
        help="file with one JSON array of arguments per line; - for standard input",
    )
    parser.add_argument("--queue", default=default_queue())
    parser.add_argument(
        "--timeout", type=flag_type(positive_float), help="seconds to wait for each result"
    )
    parser.add_argument(
        "--window",
        type=flag_type(positive_int),
        default=1000,
        help="most tasks in flight at once (default 1000)",
    )
    content_type_flag(parser, "publish the tasks as JSON instead of msgpack")
    parser.set_defaults(run=_map)


def read_arguments(lines: Iterable[str], source: str) -> list[list[Any]]:
    """Argument lists, one per non-blank line; `UsageError` names the first bad line."""
    items: list[list[Any]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise UsageError(
                f"{source}, line {number}: not JSON ({exc}); write one JSON array of arguments "
                "per line, such as [2, 3.5]"
            ) from None
        if not isinstance(value, list):
            raise UsageError(
                f"{source}, line {number}: {line.strip()[:40]} is not a JSON array of "
                "arguments; write [x] for a single argument"
            )
        items.append(value)
    return items


def envelope(value: Any, timeout: float | None) -> dict[str, Any]:
    """A result or an exception as the JSON line printed for it."""
    if isinstance(value, TaskError):
        error = {"type": value.type, "message": value.message}
    elif isinstance(value, TimeoutError):
        error = {
            "type": "TimeoutError",
            "message": f"no result within {timeout:g}s (the task may still run)",
        }
    elif isinstance(value, BaseException):
        error = {"type": type(value).__name__, "message": str(value)}
    else:
        return {"ok": True, "result": value}
    return {"ok": False, "error": error}


class OrderedWriter:
    """Writes results in input order as they complete, keeping the progress bar out of the way.

    `put` is called on the client's event-loop thread; `finish` on the caller's.
    """

    def __init__(self, total: int, out: TextIO, progress: Progress, timeout: float | None):
        self._results: dict[int, Any] = {}
        self._next = 0
        self._total = total
        self._out = out
        self._progress = progress
        self._timeout = timeout
        self._lock = threading.Lock()
        self.broken = False  # stdout was closed (e.g. piped into head)
        self.failures: Counter[str] = Counter()

    def put(self, index: int, value: Any) -> None:
        with self._lock:
            self._results[index] = value
            self._progress.advance(failed=isinstance(value, BaseException))
            self._flush()

    def finish(self, results: list[Any]) -> None:
        with self._lock:
            for index, value in enumerate(results):
                self._results.setdefault(index, value)
            self._flush()

    def _flush(self) -> None:
        lines = []
        while self._next in self._results:
            value = self._results.pop(self._next)
            line = envelope(value, self._timeout)
            if not line["ok"]:
                self.failures[line["error"]["type"]] += 1
            lines.append(json.dumps(line, default=str, ensure_ascii=False))
            self._next += 1
        if not lines or self.broken:
            return
        shared_terminal = self._progress.enabled and self._out.isatty()
        try:
            if shared_terminal:
                self._progress.clear()
            self._out.write("\n".join(lines) + "\n")
            self._out.flush()
        except BrokenPipeError:
            self.broken = True
        if shared_terminal and self._next < self._total:
            self._progress.redraw()


@command
def _map(options: argparse.Namespace) -> int:
    queue = checked_queue(options.queue)
    source = "standard input" if options.source == "-" else options.source
    try:
        if options.source == "-":
            items = read_arguments(sys.stdin, source)
        else:
            with open(options.source, encoding="utf-8") as lines:
                items = read_arguments(lines, source)
    except OSError as exc:
        raise UsageError(f"cannot read {source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot read {source}: not UTF-8 text ({exc.reason})") from None

    url = broker_url()
    progress = Progress(len(items), sys.stderr)
    writer = OrderedWriter(len(items), sys.stdout, progress, options.timeout)
    with connected_client(
        url,
        queue=queue,
        timeout=options.timeout,
        content_type=options.content_type,
        window=options.window,
    ) as client:
        say_if_unconsumed(client, queue)
        started = time.monotonic()
        try:
            results = client.starmap(
                options.task, items, return_exceptions=True, on_result=writer.put
            )
        finally:
            progress.close()
    writer.finish(results)

    failed = sum(writer.failures.values())
    summary = (
        f"hutch map: {plural(len(items), 'item')}: {len(items) - failed} succeeded, "
        f"{failed} failed in {time.monotonic() - started:.1f}s"
    )
    if failed:
        summary += " (" + ", ".join(f"{t}: {n}" for t, n in writer.failures.most_common()) + ")"
    print(summary, file=sys.stderr)
    return 0 if not failed and not writer.broken else 1
