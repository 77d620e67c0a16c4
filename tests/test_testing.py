"""`service.testing` on its own: fake time carries a week of retries, a daily schedule across a
DST change and a failing fan-in in well under a second, with no sleeps.

The stand-in's parity with a real broker is tests/test_parity.py; the pytest plugin and the
offline example are run by tests/test_examples.py.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from service import TaskError, chain, group, step, testing
from tests import testing_tasks as t
from tests.conftest import BROKER, ROOT

BERLIN = ZoneInfo("Europe/Berlin")


def test_week_of_retries_dst_schedule_and_failing_fan_in() -> None:
    t.fires.clear()
    started = time.perf_counter()
    # Friday before the spring-forward night of 2026 (29 March, 02:00 -> 03:00 in Berlin).
    start = dt.datetime(2026, 3, 27, 12, 0, tzinfo=BERLIN)
    with testing.worker(tasks=["tests.testing_tasks"], start=start) as w:
        client = w.client()

        # A week of exponential retries: 60 s doubling, capped at a day, 25 attempts.
        began = w.clock.time()
        with pytest.raises(TaskError) as info:
            client.call(t.flaky)
        assert info.value.type == "ConnectionError"
        assert "attempt 25" in info.value.message
        waited = w.clock.time() - began
        # Equal jitter: each wait is half to all of min(60 * 2**(n-1), 86400), for n = 1..24
        # (14.4 days in all, 7.2 at the least), each rounded up to whole seconds.
        nominal = sum(min(60 * 2 ** (n - 1), 86_400) for n in range(1, 25))
        assert nominal / 2 <= waited <= nominal + 24
        assert waited >= 7 * 86_400
        days_of_retries = waited / 86_400
        [letter] = w.dead_letters()
        assert (letter.reason, letter.attempts) == ("failed", 25)

        # The daily 02:30 Berlin report kept firing through the retries, once a day, and on
        # the spring-forward day (02:30 does not exist) at 03:00 local.
        days = [slot.astimezone(BERLIN) for slot in t.fires]
        assert len(days) == len({d.date() for d in days}) >= 4
        by_date = {d.date(): d.time() for d in days}
        assert by_date[dt.date(2026, 3, 28)] == dt.time(2, 30)
        assert by_date[dt.date(2026, 3, 29)] == dt.time(3, 0)
        assert by_date[dt.date(2026, 3, 30)] == dt.time(2, 30)
        assert [d.utcoffset() for d in days][:2] == [dt.timedelta(hours=1), dt.timedelta(hours=2)]

        # A pipeline whose fan-in member fails: the flow ends once, on_error runs.
        t.fires.clear()
        flow = chain(
            group(step(t.part, 1), step(t.part, -1), step(t.part, 3)),
            step(t.combine),
            on_error=step(t.failed),
        )
        with pytest.raises(TaskError) as info:
            client.call(flow)
        assert "failed at step 0.1 (testing.part)" in str(info.value)
        w.run_until_idle(advance=False)
        assert ("failed", "0.1", "ValueError") in t.fires
        assert client.call(chain(group(step(t.part, 1), step(t.part, 3)), step(t.combine))) == 8
    elapsed = time.perf_counter() - started
    print(
        f"{days_of_retries:.1f} days of retries, {len(days)} daily fires across DST and a failing "
        f"fan-in took {elapsed * 1000:.0f} ms"
    )
    assert w.clock.time() - start.timestamp() > 5 * 86_400


def test_clock_advance_fires_schedules_in_order() -> None:
    t.fires.clear()
    start = dt.datetime(2026, 10, 23, 12, 0, tzinfo=BERLIN)  # fall back on 25 October
    with testing.worker(tasks=["tests.testing_tasks"], start=start) as w:
        w.clock.advance(days=4)
    local = [slot.astimezone(BERLIN) for slot in t.fires]
    assert [d.date().day for d in local] == [24, 25, 26, 27]  # once on the fall-back day too
    assert all(d.time() == dt.time(2, 30) for d in local)


def test_countdown_waits_for_the_clock() -> None:
    with testing.worker(tasks=["tests.testing_tasks"]) as w:
        client = w.client()
        client.submit(step(t.flaky, countdown=3600))
        w.clock.advance(minutes=59)
        assert w.dead_letters() == [] and w.ready() == 0
        w.clock.advance(minutes=1)
        w.run_until_idle(advance=False)
        assert w.dead_letters() == []  # it ran once and waits for its retry
        w.run_until_idle()
        assert [d.attempts for d in w.dead_letters()] == [25]


def test_plugin_marker_selects_the_broker(tmp_path: Path) -> None:
    # One file, two tests: the marked one gets a real worker, the other the stand-in.
    test_file = tmp_path / "test_marked.py"
    test_file.write_text(
        "import pytest\n"
        "from service.testing import MemoryWorker\n"
        "from service.testing.live import LiveWorker\n\n"
        "@pytest.fixture\n"
        "def hutch_tasks():\n"
        "    return ['examples.tasks']\n\n"
        "def test_memory(hutch_worker, hutch_client):\n"
        "    assert isinstance(hutch_worker, MemoryWorker)\n"
        "    assert hutch_client.call('add', 1, 2) == 3\n\n"
        "@pytest.mark.hutch_broker\n"
        "def test_broker(hutch_worker, hutch_client):\n"
        "    assert isinstance(hutch_worker, LiveWorker)\n"
        "    assert hutch_client.call('add', 1, 2) == 3\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
        cwd=ROOT,
        env={**os.environ, "HUTCH_BROKER_URL": f"amqp://{BROKER}/"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
