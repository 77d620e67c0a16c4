"""``hutch map`` and `AsyncClient.starmap`, against a real worker; the progress bar alone."""

from __future__ import annotations

import asyncio
import io
import os
import pty
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from service.client import AsyncClient
from service.commands import UsageError
from service.commands.map import envelope, read_arguments
from service.commands.progress import Progress
from service.errors import TaskError
from tests.cli_helpers import ROOT, hutch, hutch_env, no_traceback
from tests.conftest import Broker, Vhost

# -- pure helpers ----------------------------------------------------------------------------


def test_read_arguments_skips_blank_lines_and_names_the_bad_one() -> None:
    assert read_arguments(["[1, 2]\n", "\n", "  \n", '["a"]\n', "[]"], "in") == [
        [1, 2],
        ["a"],
        [],
    ]
    with pytest.raises(UsageError, match="in, line 3: not JSON"):
        read_arguments(["[1]", "", "[1,"], "in")
    with pytest.raises(UsageError, match=r"in, line 2: 5 is not a JSON array"):
        read_arguments(["[1]", "5"], "in")


def test_envelope_has_the_shape_of_a_result_body() -> None:
    assert envelope({"a": 1}, None) == {"ok": True, "result": {"a": 1}}
    assert envelope(TaskError("ValueError", "nope"), None) == {
        "ok": False,
        "error": {"type": "ValueError", "message": "nope"},
    }
    assert envelope(TimeoutError(), 2.5)["error"] == {
        "type": "TimeoutError",
        "message": "no result within 2.5s (the task may still run)",
    }


def test_progress_draws_only_on_a_terminal() -> None:
    quiet = io.StringIO()
    progress = Progress(3, quiet)
    for _ in range(3):
        progress.advance()
    progress.close()
    assert quiet.getvalue() == ""

    shown = io.StringIO()
    progress = Progress(4, shown, enabled=True, interval=0)
    progress.advance()
    progress.advance(failed=True)
    text = shown.getvalue()
    assert "\r[" in text and "2/4" in text and "50%" in text
    assert "/s" in text and "ETA 0:" in text and "1 failed" in text
    progress.advance()
    progress.advance()
    progress.close()
    assert shown.getvalue().endswith("\n") and "4/4" in shown.getvalue()


# -- against a worker ------------------------------------------------------------------------


async def test_map_from_a_file_keeps_order_and_reports_failures(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, tmp_path: Path
) -> None:
    await start_worker()
    source = tmp_path / "args.jsonl"
    source.write_text('[1, 2]\n[2.5, 4]\n\n["a", "b"]\n[1, 2, 3]\n[10, -1]\n')
    run = await hutch(vhost, "map", "tests.tasks.add", "--from", str(source), "--queue", queue)
    assert run.code == 1, run
    assert run.json_lines() == [
        {"ok": True, "result": 3},
        {"ok": True, "result": 6.5},
        {"ok": True, "result": "ab"},
        {
            "ok": False,
            "error": {
                "type": "bad_args",
                "message": "tests.tasks.add: too many positional arguments",
            },
        },
        {"ok": True, "result": 9},
    ]
    assert "5 items: 4 succeeded, 1 failed" in run.err and "(bad_args: 1)" in run.err
    assert "\r" not in run.err and "ETA" not in run.err  # stderr is not a terminal: no bar
    assert "Traceback" not in run.err


async def test_map_from_stdin_in_input_order(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    await start_worker()
    # slow_square(x) sleeps longer for smaller x, so results finish out of order.
    lines = "".join(f"[{x}]\n" for x in range(5))
    run = await hutch(
        vhost, "map", "tests.tasks.slow_square", "--from", "-", "--queue", queue, stdin=lines
    )
    assert run.code == 0, run
    assert [item["result"] for item in run.json_lines()] == [0, 1, 4, 9, 16]
    assert "5 items: 5 succeeded, 0 failed" in run.err


async def test_map_draws_a_progress_bar_on_a_terminal(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    await start_worker()
    terminal, stderr = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "map", "tests.tasks.work", "--from", "-"],
        cwd=ROOT,
        env=hutch_env(vhost, HUTCH_QUEUE=queue),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
    )
    os.close(stderr)
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"[0.02]\n" * 60)
    proc.stdin.close()

    def read_terminal() -> bytes:
        seen = b""
        while True:
            try:
                chunk = os.read(terminal, 4096)
            except OSError:  # EIO once the process has closed its end
                return seen
            if not chunk:
                return seen
            seen += chunk

    drawn, out = await asyncio.gather(
        asyncio.to_thread(read_terminal), asyncio.to_thread(proc.stdout.read)
    )
    assert await asyncio.to_thread(proc.wait, 60) == 0
    os.close(terminal)
    text = drawn.decode()
    assert "60/60" in text and "100%" in text and "/s" in text and "ETA" in text, text
    assert "60 items: 60 succeeded" in text
    assert len(out.splitlines()) == 60 and b"ETA" not in out  # stdout stays clean


async def test_map_refuses_bad_input_before_publishing(
    vhost: Vhost, queue: str, broker: Broker
) -> None:
    run = await hutch(
        vhost, "map", "tests.tasks.add", "--from", "-", "--queue", queue, stdin='[1, 2]\n{"a": 1}\n'
    )
    assert run.code == 2, run
    no_traceback(run)
    assert "standard input, line 2" in run.err
    assert await broker.ready(queue) == 0  # nothing was published
    missing = await hutch(vhost, "map", "tests.tasks.add", "--from", "/no/such/file")
    assert missing.code == 2 and "cannot read /no/such/file" in missing.err
    unreachable = await hutch(
        None,
        "map",
        "tests.tasks.add",
        "--from",
        "-",
        stdin="[1, 2]\n",
        HUTCH_BROKER_URL="amqp://guest:guest@127.0.0.1:1/",
    )
    assert unreachable.code == 2 and "cannot connect to the broker" in unreachable.err
    no_traceback(unreachable)


async def test_starmap_runs_argument_lists_and_reports_each_result(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    await start_worker()
    seen: dict[int, Any] = {}
    async with AsyncClient(vhost.url, queue=queue, timeout=30, window=2) as client:
        results = await client.starmap(
            "tests.tasks.add",
            [(1, 2), [3, 4], ("x", "y"), (1, 2, 3)],
            return_exceptions=True,
            on_result=seen.__setitem__,
        )
        assert results[:3] == [3, 7, "xy"]
        assert isinstance(results[3], TaskError) and results[3].type == "bad_args"
        assert seen.keys() == {0, 1, 2, 3} and seen[1] == 7 and seen[3] is results[3]
        assert await client.map("tests.tasks.slow_square", [3, 1]) == [9, 1]  # unchanged API
