"""What to run, described before it is sent: a `Step` is a task with its arguments and its
options (queue, countdown or ETA).

``client.submit(task, *args, **kwargs)`` passes every keyword to the task, so a task's options
cannot be keywords there. They go on a step instead::

    client.submit(step(resize, "a.png", kwargs={"width": 800}, countdown=30))
    client.call(step(report, eta=datetime(2027, 1, 1, 8, tzinfo=UTC)))
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from service.errors import ConfigError
from service.registry import name_of

TaskRef = Callable[..., Any] | str


@dataclass(frozen=True)
class Step:
    """One task to run, with its arguments and options; build it with `step`."""

    task: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None  # None: the client's queue
    countdown: float | None = None
    eta: dt.datetime | None = None

    def eta_ms(self, now: float | None = None) -> int | None:
        """When the step may run, in Unix milliseconds (None: now)."""
        if self.eta is not None:
            return math.ceil(self.eta.timestamp() * 1000)
        if self.countdown is not None:
            return math.ceil(((time.time() if now is None else now) + self.countdown) * 1000)
        return None


def step(
    task: TaskRef,
    /,
    *args: Any,
    kwargs: Mapping[str, Any] | None = None,
    queue: str | None = None,
    countdown: float | None = None,
    eta: dt.datetime | None = None,
) -> Step:
    """A task with its positional ``args`` and ``kwargs``, and where and when to run it.

    - ``queue``: the work queue (default: the client's).
    - ``countdown``: seconds from now before it may run; or
    - ``eta``: the timezone-aware instant before which it must not run (a naive datetime is
      refused: it would mean a different instant on every host).

    The delay is held by the broker (see docs/protocol.md, ``x-hutch-eta``), never by a worker.
    """
    if countdown is not None and eta is not None:
        raise ConfigError("give countdown or eta, not both")
    if countdown is not None and not (math.isfinite(countdown) and countdown >= 0):
        raise ConfigError(f"countdown must be 0 or more seconds, got {countdown!r}")
    if eta is not None:
        if not isinstance(eta, dt.datetime):
            raise ConfigError(f"eta must be a datetime, got {type(eta).__name__}")
        if eta.tzinfo is None or eta.tzinfo.utcoffset(eta) is None:
            raise ConfigError(
                "eta must be timezone-aware, e.g. datetime.now(UTC) + timedelta(minutes=5): "
                "a naive datetime means a different instant on each host"
            )
    return Step(name_of(task), tuple(args), dict(kwargs or {}), queue, countdown, eta)
