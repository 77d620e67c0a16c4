"""What the stages report as a delivery passes through them, and who listens.

The stages call these hooks and never a metric directly: admission reports each delivery it
received, settling how each run ended and what was done with the message, the pool each child
it replaced, the scheduler its leadership and fires, the fan-in (`service.joins`) what it
holds. `service.metrics.Metrics` turns them into
Prometheus series and `service.prefetch.PrefetchControl` sizes the prefetch window from them;
tracing or extra logging would plug in here. Hooks run on the event loop, on the per-message
path: they must not block or raise.

The enumerations are passed as themselves; what a label is called is the listener's business.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.continuation import FlowEvent
    from service.pool.jobs import RestartReason
    from service.protocol import Reason
    from service.settle import Action, TaskOutcome
    from service.store.errors import RefFailure


class Observer:
    """Every hook, doing nothing: listeners override what they need."""

    def on_received(
        self, task: str | None, *, redelivered: bool, runnable_since: float | None
    ) -> None:
        """A delivery arrived: ``task`` is its registered task (None if it names none), and
        ``runnable_since`` the Unix time it became runnable, if known."""

    def on_finished(
        self, task: str | None, outcome: TaskOutcome, seconds: float, cpu_seconds: float
    ) -> None:
        """A run ended (or a delivery was refused before running: REJECTED, 0 seconds)."""

    def on_settled(self, action: Action, reason: Reason | None) -> None:
        """What was done with a delivery; ``reason`` when it was dead-lettered."""

    def on_restart(self, reason: RestartReason) -> None:
        """A pool child was replaced."""

    def on_blobs(self, offloads: int, failure: RefFailure | None) -> None:
        """A job's child put ``offloads`` blobs in the store for its output, or could not
        resolve a blob reference (``failure``)."""

    def on_leader(self, leading: bool) -> None:
        """This worker became, or stopped being, the leader of its queue's schedules."""

    def on_fire(self, task: str, slot_ms: int) -> None:
        """The leader fired ``task``'s schedule for ``slot_ms`` (published and confirmed)."""

    def on_last_fire(self, task: str, slot_ms: int) -> None:
        """A new leader learned from the baton when ``task`` last fired."""

    def on_flow_started(self) -> None:
        """A flow's entry step arrived for the first time."""

    def on_flow_ended(self, event: FlowEvent) -> None:
        """A flow ended (its last step acked, or its failure handed on, confirmed)."""

    def on_joins(self, open_joins: int, records: int, oldest_seconds: float) -> None:
        """The fan-in this worker holds changed: open joins, records held, and the age of the
        oldest open join (0 with none); all 0 when it holds none (another worker does)."""


class Observers(Observer):
    """Several observers behind one, called in the order they were added."""

    def __init__(self, observers: Iterable[Observer] = ()) -> None:
        self._observers = list(observers)

    def add(self, observer: Observer) -> None:
        self._observers.append(observer)

    def on_received(
        self, task: str | None, *, redelivered: bool, runnable_since: float | None
    ) -> None:
        for observer in self._observers:
            observer.on_received(task, redelivered=redelivered, runnable_since=runnable_since)

    def on_finished(
        self, task: str | None, outcome: TaskOutcome, seconds: float, cpu_seconds: float
    ) -> None:
        for observer in self._observers:
            observer.on_finished(task, outcome, seconds, cpu_seconds)

    def on_settled(self, action: Action, reason: Reason | None) -> None:
        for observer in self._observers:
            observer.on_settled(action, reason)

    def on_restart(self, reason: RestartReason) -> None:
        for observer in self._observers:
            observer.on_restart(reason)

    def on_blobs(self, offloads: int, failure: RefFailure | None) -> None:
        for observer in self._observers:
            observer.on_blobs(offloads, failure)

    def on_leader(self, leading: bool) -> None:
        for observer in self._observers:
            observer.on_leader(leading)

    def on_fire(self, task: str, slot_ms: int) -> None:
        for observer in self._observers:
            observer.on_fire(task, slot_ms)

    def on_last_fire(self, task: str, slot_ms: int) -> None:
        for observer in self._observers:
            observer.on_last_fire(task, slot_ms)

    def on_flow_started(self) -> None:
        for observer in self._observers:
            observer.on_flow_started()

    def on_flow_ended(self, event: FlowEvent) -> None:
        for observer in self._observers:
            observer.on_flow_ended(event)

    def on_joins(self, open_joins: int, records: int, oldest_seconds: float) -> None:
        for observer in self._observers:
            observer.on_joins(open_joins, records, oldest_seconds)
