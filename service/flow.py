"""What to run, described before it is sent: a `Step` is a task with its arguments and its
options (queue, countdown or ETA); a `Chain` runs steps one after another, a `Group` runs them
in parallel. Together they make a flow (a pipeline).

``client.submit(task, *args, **kwargs)`` passes every keyword to the task, so a task's options
cannot be keywords there. They go on a step instead::

    client.submit(step(resize, "a.png", kwargs={"width": 800}, countdown=30))
    client.call(step(report, eta=datetime(2027, 1, 1, 8, tzinfo=UTC)))

A flow passes each step's result to the next as its first positional argument; a group's
results arrive as one list, in member order::

    flow = chain(
        step(upload, "/data/in/a.pdf"),
        group(step(virus_scan), step(extract_metadata)),  # both get upload's result
        step(finalize),  # gets [scan_result, metadata_result]
        on_error=step(report_failure),  # gets the flow id, the failed step, the error
    )
    flow_id = client.submit(flow)

How a flow travels and what it guarantees: `service.continuation` and docs/protocol.md §12.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from service.errors import ConfigError
from service.registry import name_of

TaskRef = Callable[..., Any] | str
# The widest group a flow may have: its members' records are held together by one fan-in
# (`service.joins`), and a wider one would take a large share of its capacity.
MAX_GROUP_WIDTH: Final = 1000
# How deep groups and chains may nest inside each other.
MAX_NESTING: Final = 6


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


@dataclass(frozen=True)
class Chain:
    """Nodes run one after another, each given the previous one's result; build it with
    `chain`."""

    nodes: tuple[Node, ...]
    on_error: Step | None = None


@dataclass(frozen=True)
class Group:
    """Nodes run in parallel, each given the same input; what follows gets their results as
    a list, in member order. Build it with `group`."""

    members: tuple[Node, ...]


Node = Step | Chain | Group


def chain(*nodes: Node, on_error: Step | None = None) -> Chain:
    """Run ``nodes`` in order: each step gets the previous node's result as its first argument.

    ``on_error`` runs once if the flow fails (a step dead-lettered after its attempts), with
    three arguments before its own: the flow id, the failed step (``{"id", "task",
    "message_id"}``) and the error (``{"type", "message", "reason"}``). It belongs to the
    outermost chain of a flow. A chain inside a chain is flattened into it.
    """
    if not nodes:
        raise ConfigError("chain() needs at least one step")
    flat: list[Node] = []
    for node in nodes:
        _check_node(node, "chain")
        if isinstance(node, Chain):
            if node.on_error is not None:
                raise ConfigError("on_error belongs to the outermost chain of a flow")
            flat.extend(node.nodes)
        else:
            flat.append(node)
    if on_error is not None and not isinstance(on_error, Step):
        raise ConfigError(f"on_error must be a step(...), got {type(on_error).__name__}")
    built = Chain(tuple(flat), on_error)
    _check_nesting(built, 0)
    return built


def group(*members: Node) -> Group:
    """Run ``members`` in parallel; the node after the group gets their results as a list in
    member order. At most `MAX_GROUP_WIDTH` members."""
    if not members:
        raise ConfigError("group() needs at least one member")
    if len(members) > MAX_GROUP_WIDTH:
        raise ConfigError(
            f"group() of {len(members)} members is wider than the maximum {MAX_GROUP_WIDTH}; "
            "split the work into nested groups or batches"
        )
    for member in members:
        _check_node(member, "group")
        if isinstance(member, Chain) and member.on_error is not None:
            raise ConfigError("on_error belongs to the outermost chain of a flow")
    built = Group(tuple(members))
    _check_nesting(built, 0)
    return built


def _check_node(node: object, where: str) -> None:
    if not isinstance(node, Step | Chain | Group):
        raise ConfigError(
            f"{where}() takes step(...), chain(...) or group(...), got {type(node).__name__}"
            + (
                ": wrap a task in step(task, ...)"
                if callable(node) or isinstance(node, str)
                else ""
            )
        )


def _check_nesting(node: Node, depth: int) -> None:
    if depth > MAX_NESTING:
        raise ConfigError(f"groups and chains nest deeper than {MAX_NESTING} levels")
    children = (
        node.nodes if isinstance(node, Chain) else node.members if isinstance(node, Group) else ()
    )
    for child in children:
        _check_nesting(child, depth + 1)
