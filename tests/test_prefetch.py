"""The prefetch window's sizing rule (pure logic; the re-consume is tested end to end)."""

from __future__ import annotations

from service.prefetch import MAX_PREFETCH, RTT_CAP, PrefetchWindow, RoundTrip, worth_changing


def window(seconds: float = 0.1) -> PrefetchWindow:
    return PrefetchWindow(concurrency=2, minimum_buffer=2, seconds=seconds)


def test_minimum_until_a_task_has_finished() -> None:
    assert window().size() == 4


def test_short_tasks_get_a_deep_window_long_ones_the_minimum() -> None:
    w = window()
    w.observe(0.001)  # 2 children x 0.1 s / 1 ms = 200 deliveries of buffer
    assert w.size() == 2 + 200
    w.observe(5.0)
    assert w.size() == 4


def test_capped() -> None:
    w = window()
    w.observe(1e-7)
    assert w.size() == MAX_PREFETCH


def test_rises_at_once_falls_slowly() -> None:
    w = window()
    w.observe(0.001)
    w.observe(0.5)  # one slow task: the window collapses at once
    assert w.estimate == 0.5
    w.observe(0.001)
    assert w.estimate is not None and 0.39 < w.estimate < 0.41  # ...and recovers over samples
    for _ in range(60):
        w.observe(0.001)
    assert w.size() > 150


def test_a_long_running_task_shrinks_it_before_it_finishes() -> None:
    w = window()
    w.observe(0.001)
    assert w.size(longest_running=0.0005) == 202  # younger than the estimate: no effect
    assert w.size(longest_running=3.0) == 4


def test_zero_seconds_means_fixed() -> None:
    w = window(seconds=0)
    w.observe(1e-6)
    assert w.size() == 4


def test_worth_changing_ignores_noise() -> None:
    assert not worth_changing(100, 120)
    assert not worth_changing(100, 60)
    assert worth_changing(100, 200)
    assert worth_changing(100, 50)
    assert not worth_changing(4, 4)


def test_observe_says_when_the_window_may_have_to_halve() -> None:
    w = window()
    assert w.observe(0.001)  # the first sample
    assert not w.observe(0.0015)  # up, but not doubled
    assert not w.observe(0.0001)  # down
    assert w.observe(0.01)


def test_the_round_trip_widens_the_window_by_its_work() -> None:
    w = window()
    w.observe(0.05)  # 2 children x 0.1 s / 50 ms = 4 of buffer
    assert w.size() == 2 + 4
    w.rtt.observe(0.2)  # + 2 children x 2 round trips x 0.2 s / 50 ms = 16 more
    assert w.size() == 2 + 4 + 16


def test_the_round_trip_window_is_still_capped() -> None:
    w = window()
    w.observe(0.0001)
    w.rtt.observe(0.2)
    assert w.size() == MAX_PREFETCH


def test_a_long_run_shrinks_it_to_the_minimum_despite_the_round_trip() -> None:
    w = window()
    w.observe(0.05)
    w.rtt.observe(0.2)
    assert w.size() == 22
    # A task running for 3 s: the round trip is small beside it, the window falls back.
    assert w.size(longest_running=3.0) == 4


def test_round_trip_is_smoothed_and_bounded() -> None:
    rtt = RoundTrip()
    assert rtt.seconds == 0.0
    rtt.observe(0.2)
    assert rtt.seconds == 0.2
    rtt.observe(0.0)  # one quick answer moves it part of the way
    assert 0.1 < rtt.seconds < 0.2
    for _ in range(50):
        rtt.observe(1000.0)  # a stalled link is not an infinite round trip
    assert rtt.seconds <= RTT_CAP


def test_fixed_prefetch_ignores_the_round_trip() -> None:
    w = window(seconds=0)
    w.observe(0.05)
    w.rtt.observe(0.2)
    assert w.size() == 4
