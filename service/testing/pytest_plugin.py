"""The pytest plugin: ``hutch_worker`` and ``hutch_client`` fixtures, in memory or on a broker.

Installed with hutch (entry point ``pytest11``). A test asks for ``hutch_worker`` (a
`service.testing.MemoryWorker`, or a `service.testing.live.LiveWorker` with the same face) or
just ``hutch_client``. The task modules come from the ``hutch_tasks`` ini option (or override the
``hutch_tasks`` fixture). By default everything runs in memory; ``--hutch-broker=URL`` runs every
such test against a real broker, and ``@pytest.mark.hutch_broker`` runs one test that way (its
URL: the option, else ``HUTCH_BROKER_URL``, else the local default). On a broker, one
``hutch worker`` per set of task modules serves the whole session, on a queue of its own that is
deleted at the end; each test sees only the dead letters that arrived during it.

Fixture names start with ``hutch_`` so they never clash with a project's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from service.settings import broker_url_from_env

_live: dict[tuple[str, tuple[str, ...]], Any] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hutch")
    group.addoption(
        "--hutch-broker",
        metavar="URL",
        default=None,
        help="run hutch_worker/hutch_client tests against this RabbitMQ instead of in memory",
    )
    parser.addini("hutch_tasks", "task modules hutch_worker loads", type="args", default=[])


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "hutch_broker: run this test's hutch_worker against a real RabbitMQ"
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    while _live:
        _, worker = _live.popitem()
        worker.close()


@pytest.fixture
def hutch_tasks(request: pytest.FixtureRequest) -> list[str]:
    """The task modules the worker loads (default: the ``hutch_tasks`` ini option)."""
    modules: list[str] = request.config.getini("hutch_tasks")
    if not modules:
        raise pytest.UsageError(
            "hutch_worker needs task modules: set hutch_tasks in the pytest ini options, or "
            "override the hutch_tasks fixture"
        )
    return modules


@pytest.fixture
def hutch_mode(request: pytest.FixtureRequest) -> str:
    """``memory`` or ``broker``: how this test's hutch_worker runs."""
    option = request.config.getoption("--hutch-broker")
    if option or request.node.get_closest_marker("hutch_broker") is not None:
        return "broker"
    return "memory"


@pytest.fixture
def hutch_worker(
    request: pytest.FixtureRequest, hutch_tasks: list[str], hutch_mode: str
) -> Iterator[Any]:
    """A worker for ``hutch_tasks``: in memory on a fake clock, or a real one on a broker."""
    if hutch_mode == "memory":
        from service.testing.memory import worker

        with worker(tasks=hutch_tasks) as w:
            yield w
        return
    from service.testing.live import LiveWorker

    url = request.config.getoption("--hutch-broker") or broker_url_from_env()
    key = (url, tuple(hutch_tasks))
    live = _live.get(key)
    if live is None:
        # From where pytest was started, as `hutch worker` imports task modules from its
        # current directory.
        live = LiveWorker(url, hutch_tasks, cwd=str(request.config.invocation_params.dir))
        _live[key] = live
    live.begin()
    yield live
    live.run_until_idle()


@pytest.fixture
def hutch_client(hutch_worker: Any) -> Iterator[Any]:
    """A client of ``hutch_worker``, with `service.Client`'s submit/call/map/starmap."""
    client = hutch_worker.client()
    yield client
    client.close()
