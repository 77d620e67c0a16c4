"""What a new user meets first on the command line: version, flag errors in words, and a line
saying a call will wait when no worker consumes the queue yet."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import pytest

from service import __version__
from tests.cli_helpers import hutch
from tests.conftest import ROOT, Broker, Vhost


async def test_version_prints_the_version() -> None:
    run = await hutch(None, "--version")
    assert run.code == 0, run
    assert run.out.strip() == f"hutch {__version__}"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["call", "t", "--timeout", "soon"], "--timeout: 'soon' must be a positive number"),
        (["call", "t", "--timeout", "0"], "--timeout: '0' must be a positive number"),
        (["map", "t", "--from", "-", "--window", "many"], "'many' must be a whole number"),
        (["dlq", "ls", "--limit", "x"], "--limit: 'x' must be a whole number of at least 1"),
        (["dlq", "replay", "--rate", "-1"], "--rate: '-1' must be a positive number"),
        (["worker", "--concurrency", "x"], "--concurrency: 'x' must be a whole number"),
        (["worker", "--tasks", "m", "--drain-timeout", "x"], "'x' must be a positive number"),
    ],
)
async def test_flag_errors_say_what_is_wrong_in_words(args: list[str], says: str) -> None:
    run = await hutch(None, *args)
    assert run.code == 2, run
    assert says in run.err, run
    for python_speak in ("invalid literal", "could not convert", "invalid positive_", "invalid "):
        assert python_speak not in run.err, run
    assert "Traceback" not in run.err, run


async def test_call_says_it_waits_for_a_worker(vhost: Vhost, queue: str, broker: Broker) -> None:
    run = await hutch(
        vhost, "call", "tests.tasks.add", "1", "2", "--queue", queue, "--timeout", "1"
    )
    assert run.code == 1, run  # nobody ran it
    assert f"no worker is consuming {queue!r} yet; waiting" in run.err, run
    assert "no result within 1s" in run.err, run


async def test_map_says_it_waits_for_a_worker(vhost: Vhost, queue: str, broker: Broker) -> None:
    run = await hutch(
        vhost, "map", "tests.tasks.add", "--from", "-", "--queue", queue, "--timeout", "1",
        stdin="[1, 2]\n",
    )  # fmt: skip
    assert run.code == 1, run
    assert f"no worker is consuming {queue!r} yet; waiting" in run.err, run


async def test_call_with_a_worker_says_nothing_about_waiting(
    vhost: Vhost, queue: str, broker: Broker, start_worker: object
) -> None:
    await start_worker()  # type: ignore[operator]
    run = await hutch(vhost, "call", "tests.tasks.add", "1", "2", "--queue", queue)
    assert run.code == 0, run
    assert run.out.strip() == "3"
    assert "no worker" not in run.err, run


# -- examples/demo.py (README's first command) --------------------------------------------------


def demo(vhost: Vhost, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "examples/demo.py", *args],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HUTCH_BROKER_URL": vhost.url, **env},
        capture_output=True,
        text=True,
        timeout=180,  # a hang guard, not a timing assertion
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_demo_runs_and_drains(vhost: Vhost) -> None:
    port = free_port()
    result = await asyncio.to_thread(
        demo, vhost, "--tasks", "8", "--limit", "3000", HUTCH_METRICS_ADDR=f"127.0.0.1:{port}"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "8 tasks (count primes below ~3000)" in result.stdout, result.stdout
    assert "worker drained and exited with code 0" in result.stdout


async def test_demo_says_why_its_worker_did_not_start(vhost: Vhost) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        result = await asyncio.to_thread(
            demo, vhost, "--tasks", "3", HUTCH_METRICS_ADDR=f"127.0.0.1:{port}"
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the worker exited with code 2 before it started" in result.stdout, result.stdout
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stdout, result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert time.monotonic() - started < 120  # it did not sit out the client's timeout
