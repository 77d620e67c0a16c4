"""Testing examples/tasks.py without a broker: run with ``pytest examples/test_tasks_offline.py``.

The ``hutch_client`` and ``hutch_worker`` fixtures come with hutch (its pytest plugin): in
memory on a fake clock by default, so this passes with RabbitMQ stopped; add
``--hutch-broker=amqp://guest:guest@localhost:5672/`` to run the very same tests against a real
broker and a real ``hutch worker``. The task modules are named once, by the ``hutch_tasks``
fixture below (or the ``hutch_tasks`` ini option).
"""

from __future__ import annotations

from typing import Any

import pytest

from examples.tasks import add, count_primes
from service import TaskError, chain, group, step


@pytest.fixture
def hutch_tasks() -> list[str]:
    return ["examples.tasks"]


def test_add(hutch_client: Any) -> None:
    assert hutch_client.call(add, 2, b=3.5) == 5.5


def test_map(hutch_client: Any) -> None:
    assert hutch_client.map(count_primes, [10, 100]) == [4, 25]


def test_bad_arguments_are_dead_lettered(hutch_client: Any, hutch_worker: Any) -> None:
    with pytest.raises(TaskError) as info:
        hutch_client.call(count_primes, 1, 2, 3)
    assert info.value.type == "bad_args"
    assert hutch_worker.wait_until(lambda: len(hutch_worker.dead_letters()) == 1)
    [letter] = hutch_worker.dead_letters()
    assert (letter.task, letter.reason) == ("examples.tasks.count_primes", "bad_args")


def test_a_failing_task_is_retried_then_dead_lettered(hutch_client: Any, hutch_worker: Any) -> None:
    with pytest.raises(TaskError) as info:
        hutch_client.call(count_primes, "lots")
    assert info.value.type == "TypeError"
    [letter] = hutch_worker.dead_letters()
    assert (letter.reason, letter.attempts) == ("failed", 3)


def test_a_pipeline(hutch_client: Any) -> None:
    flow = chain(group(step(count_primes, 10), step(count_primes, 100)), step(add, 0))
    with pytest.raises(TaskError):  # add(list, 0): a list plus an int fails in the last step
        hutch_client.call(flow)
    assert hutch_client.call(chain(step(count_primes, 10), step(add, 1))) == 5


def test_later(hutch_client: Any) -> None:
    assert hutch_client.call(step(add, 1, 1, countdown=2)) == 2
