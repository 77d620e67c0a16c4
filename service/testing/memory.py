"""The in-memory stand-in: a broker and a worker in one process, on a fake clock.

It runs the real path with the AMQP parts replaced by dicts and deques, so a test finds what
production would: admission is `service.admission.admit`, a task runs in the pool child's own
`service.pool.child.Runner` (decode, bind, run, encode: every argument and result crosses the
wire codec), its outcome is settled by `service.settle.decide` with the backoff of
`service.settle.backoff`, flows advance through `service.continuation` and fan in through
`service.fanin.FanIn`, and schedules fire the slots of `service.schedules.Schedule`. What is
carried out here is only what the broker and the settler's I/O would do: hold delayed copies
until they are due, move dead letters to ``Q.dlq`` with their reason headers, route replies.

Time is a `FakeClock`. Delays (retry backoff, countdown/ETA, schedule slots) wait on it, and
`MemoryWorker.run_until_idle` jumps it to the next thing due, so a week of retries takes
milliseconds. Inside a task, ``time.sleep`` advances the task's own elapsed time instead of
sleeping, which is what its soft and hard time limits are measured against.

Differences from a real worker, by design: tasks run one at a time in the test's process
(``isolate=True`` runs each in a forked child, so a task that kills its process is requeued and
reaches ``delivery_limit`` as on a broker); the registry is the test process's, so every task
imported anywhere in it is known.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import heapq
import itertools
import math
import os
import pickle
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from types import ModuleType, TracebackType
from typing import Any, Final, Self, SupportsIndex, cast

import aio_pika

from service import protocol, routing, settle
from service.admission import Postponement, Refusal, admit
from service.client import DIRECT_REPLY_TO, _node, _step
from service.continuation import Publish, entry
from service.delivery import Delivery
from service.errors import HutchError, SoftTimeLimitExceeded, TaskError
from service.fanin import Ack, Done, FanIn, FollowUp, Keep, Refuse, read_record
from service.flow import Chain, Group, Node, Step, TaskRef
from service.ops.deadletters import DeadLetter
from service.pool.child import Runner
from service.pool.jobs import Job, Outcome, OutcomeKind, timeout_outcome
from service.pool.pipe import JobFrame
from service.registry import TaskSpec, import_task_modules, registered
from service.republish import copy_message, publisher_headers
from service.scheduler import fire_id
from service.schedules import Schedule
from service.settings import Settings

# A loop that keeps finding work (a task that re-submits itself forever) stops here.
MAX_STEPS: Final = 1_000_000


class FakeClock:
    """The stand-in's time: Unix seconds that move only when told (or when a wait jumps it)."""

    def __init__(self, start: dt.datetime | float | None = None) -> None:
        if isinstance(start, dt.datetime):
            if start.tzinfo is None:
                raise ValueError("start must be timezone-aware, e.g. datetime(..., tzinfo=UTC)")
            start = start.timestamp()
        self._now = time.time() if start is None else float(start)
        self._worker: MemoryWorker | None = None

    def time(self) -> float:
        return self._now

    def ms(self) -> int:
        return int(self._now * 1000)

    def now(self, tz: dt.tzinfo = dt.UTC) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._now, tz)

    def advance(
        self, *, seconds: float = 0, minutes: float = 0, hours: float = 0, days: float = 0
    ) -> None:
        """Move time forward, running everything that falls due on the way, in time order."""
        total = seconds + 60 * minutes + 3600 * hours + 86400 * days
        if total < 0:
            raise ValueError("the clock only moves forward")
        target = self._now + total
        if self._worker is None:
            self._now = target
        else:
            self._worker._advance_to(target)

    def _set(self, when: float) -> None:
        self._now = max(self._now, when)


@dataclass
class Message:
    """One message as the in-memory broker holds it: the AMQP properties hutch reads."""

    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    content_type: str | None = None
    content_encoding: str | None = None
    message_id: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    timestamp: dt.datetime | None = None
    priority: int | None = None
    type: str | None = None
    app_id: str | None = None
    redelivered: bool = False

    @classmethod
    def of(cls, message: aio_pika.Message) -> Message:
        """A copy built by the real code (`service.republish.copy_message`)."""
        return cls(
            message.body,
            dict(message.headers or {}),
            message.content_type,
            message.content_encoding,
            message.message_id,
            message.correlation_id,
            message.reply_to,
            message.timestamp,
            message.priority,
            message.type,
            message.app_id,
        )


class _HardLimit(BaseException):
    """Raised inside a task by the fake ``time.sleep`` at its hard limit (the real pool kills
    the child; here the run is abandoned). A BaseException, so a task's ``except Exception``
    cannot swallow it."""


class _FakeTimeRunner(Runner):
    """The child's runner, with the task's sleeps and time limits on fake time."""

    def __init__(self, worker: MemoryWorker) -> None:
        super().__init__(
            max_depth=worker.settings.max_depth,
            max_result_size=worker.settings.max_result_size,
            clock=worker.clock.time,
        )
        self.default_limit = worker.settings.time_limit
        self.hard_limit_hit = False

    def _call(self, spec: TaskSpec, args: list[Any], kwargs: dict[str, Any]) -> Any:  # type: ignore[override]
        hard = spec.time_limit or self.default_limit
        soft = spec.soft_time_limit
        elapsed = 0.0
        soft_fired = False
        real_sleep = time.sleep

        def fake_sleep(seconds: float | SupportsIndex) -> None:
            nonlocal elapsed, soft_fired
            elapsed += max(0.0, float(seconds))
            if soft is not None and not soft_fired and elapsed >= soft:
                soft_fired, elapsed = True, soft
                raise SoftTimeLimitExceeded("soft time limit exceeded")
            if elapsed >= hard:
                self.hard_limit_hit = True
                raise _HardLimit

        started = time.monotonic()
        time.sleep = fake_sleep
        try:
            return spec.fn(*args, **kwargs)
        finally:
            time.sleep = real_sleep
            if time.monotonic() - started >= hard:  # it really ran that long (CPU-bound)
                self.hard_limit_hit = True


class MemoryWorker:
    """An in-memory broker and worker for ``queue``; use it through `worker`."""

    def __init__(
        self,
        tasks: Iterable[str | ModuleType] = (),
        *,
        queue: str = "default",
        start: dt.datetime | float | None = None,
        isolate: bool = False,
        settings: Settings | None = None,
    ) -> None:
        routing.check_queue_name(queue)
        modules = [t if isinstance(t, str) else t.__name__ for t in tasks]
        import_task_modules(modules)
        self.queue = queue
        self.isolate = isolate
        self.settings = settings or Settings(tasks=modules or None, queue=queue, concurrency=1)
        self.clock = FakeClock(start)
        self.clock._worker = self
        self.queues: dict[str, deque[Message]] = {}
        self._delayed: list[tuple[float, int, str, Message]] = []
        self._seq = itertools.count()
        self.replies: dict[str, Message] = {}
        self._book: FanIn[Message] = FanIn(
            max_age=self.settings.join_max_age, compact_after=math.inf
        )
        # The schedules of the tasks these modules define, each from its next slot on (as a
        # freshly minted baton starts them).
        self.schedules: dict[str, Schedule] = {}
        for spec in registered().values():
            schedule = spec.periodic()
            if schedule is not None and spec.fn.__module__ in modules:
                self.schedules[spec.name] = schedule
        self._last_slot = dict.fromkeys(self.schedules, self.clock.ms())
        self.executions = 0

    # -- the public face ----------------------------------------------------------------

    def client(self, *, content_type: str = protocol.MSGPACK, queue: str | None = None) -> Any:
        """A client with `service.Client`'s submit/call/map/starmap, publishing here."""
        return MemoryClient(self, queue=queue or self.queue, content_type=content_type)

    def run_until_idle(self, *, advance: bool = True) -> None:
        """Run everything ready; with ``advance``, jump the clock to each delayed message in
        turn (firing schedule slots passed on the way) until none is left."""
        for _ in range(MAX_STEPS):
            self._drain()
            if not (advance and self._delayed):
                return
            self._advance_to(self._delayed[0][0])
        raise HutchError(f"still busy after {MAX_STEPS} steps: does a task re-submit itself?")

    def run_until(self, done: Callable[[], bool]) -> bool:
        """Run (and advance the clock over delays) until ``done()``; False if all went idle
        first."""
        for _ in range(MAX_STEPS):
            if done():
                return True
            if self._ready():
                self._step()
            elif self._delayed:
                self._advance_to(self._delayed[0][0])
            else:
                return done()
        raise HutchError(f"still busy after {MAX_STEPS} steps: does a task re-submit itself?")

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
        """Parity with the real-broker worker: run until idle, then ask ``predicate``."""
        self.run_until_idle()
        return predicate()

    def dead_letters(self, queue: str | None = None) -> list[DeadLetter]:
        """What ``queue.dlq`` holds (oldest first), as ``hutch dlq ls`` describes it."""
        name = routing.dlq_name(queue or self.queue)
        return [
            DeadLetter.from_message(cast(Any, message), name)
            for message in self.queues.get(name, ())
        ]

    def ready(self, queue: str | None = None) -> int:
        return len(self.queues.get(queue or self.queue, ()))

    def close(self) -> None:
        self.clock._worker = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the broker ----------------------------------------------------------------------

    def publish(self, message: Message, routing_key: str, exchange: str = "") -> None:
        """Route a message as RabbitMQ would in hutch's topology."""
        if exchange.startswith(routing.DELAY_PREFIX):
            words = routing_key.split(".", routing.DELAY_LEVELS)
            seconds = int("".join(words[: routing.DELAY_LEVELS]), 2)
            due = self.clock.time() + seconds
            heapq.heappush(self._delayed, (due, next(self._seq), words[-1], message))
        elif routing_key == DIRECT_REPLY_TO or routing_key.startswith(DIRECT_REPLY_TO + "."):
            self.replies[message.correlation_id or ""] = message
        else:
            self.queues.setdefault(routing_key, deque()).append(message)

    def _ready(self) -> bool:
        return bool(self.queues.get(routing.JOINS_QUEUE)) or any(
            self.queues.get(q) for q in self._work_queues()
        )

    def _work_queues(self) -> Iterator[str]:
        for name in list(self.queues):
            if not name.endswith(".dlq") and name != routing.JOINS_QUEUE:
                yield name

    def _advance_to(self, target: float) -> None:
        """Move the clock to ``target``, stopping at each delay's end and schedule slot."""
        for _ in range(MAX_STEPS):
            self._drain()
            due = self._next_due()
            if due is None or due > target:
                break
            self.clock._set(due)
            self._release()
        self.clock._set(target)
        self._release()
        self._drain()

    def _next_due(self) -> float | None:
        candidates = [self._delayed[0][0]] if self._delayed else []
        for task, schedule in self.schedules.items():
            candidates.append(schedule.next_after(self._last_slot[task]) / 1000)
        return min(candidates, default=None)

    def _release(self) -> None:
        """Deliver what is due now: delayed copies, schedule fires, expired fan-ins."""
        now = self.clock.time()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, queue, message = heapq.heappop(self._delayed)
            self.queues.setdefault(queue, deque()).append(message)
        for task, schedule in self.schedules.items():
            for slot in schedule.due(self._last_slot[task], self.clock.ms()):
                self._fire(schedule, slot)
                self._last_slot[task] = slot
        self._fan_in(self._book.housekeep(self.clock.ms(), now))

    def _fire(self, schedule: Schedule, slot: int) -> None:
        body = protocol.encode_request(protocol.MSGPACK, schedule.args, dict(schedule.kwargs))
        self.publish(
            Message(
                body,
                {protocol.TASK_HEADER: schedule.task, protocol.SLOT_HEADER: slot},
                protocol.MSGPACK,
                message_id=fire_id(schedule.task, slot),
                timestamp=self.clock.now(),
            ),
            self.queue,
        )

    # -- the worker ----------------------------------------------------------------------

    def _drain(self) -> None:
        for _ in range(MAX_STEPS):
            if not self._ready():
                return
            self._step()
        raise HutchError(f"still busy after {MAX_STEPS} steps: does a task re-submit itself?")

    def _step(self) -> None:
        joins = self.queues.get(routing.JOINS_QUEUE)
        if joins:
            record = joins.popleft()
            verdict = read_record(record.headers, record.content_type, now_ms=self.clock.ms())
            self._fan_in(self._book.take(record, verdict, record.body, self.clock.time()))
            return
        for name in self._work_queues():
            if self.queues[name]:
                self._deliver(name, self.queues[name].popleft())
                return

    def _deliver(self, queue: str, message: Message) -> None:
        # admit reads only the properties `Message` has (and `Delivery` exposes).
        delivery = cast(Delivery, message)
        verdict = admit(
            delivery,
            max_body_size=self.settings.max_body_size,
            max_deliveries=self.settings.max_deliveries,
            now_ms=self.clock.ms(),
        )
        if isinstance(verdict, Refusal):
            self._dead_letter(queue, message, verdict.reason, str(verdict.reason), verdict.detail)
        elif isinstance(verdict, Postponement):
            headers = publisher_headers(message)
            headers[protocol.DUE_HEADER] = verdict.eta
            self._delay(queue, message, headers, (verdict.eta - self.clock.ms()) / 1000)
        else:
            self._settle(queue, message, verdict, self._run(verdict))

    def _run(self, job: Job) -> Outcome:
        self.executions += 1
        frame = JobFrame.from_job(job)
        if not self.isolate:
            return self._run_here(job, frame)
        return self._run_in_child(job, frame)

    def _run_here(self, job: Job, frame: JobFrame) -> Outcome:
        runner = _FakeTimeRunner(self)
        outcome = runner.run(frame)
        if runner.hard_limit_hit:
            return timeout_outcome(job.spec.time_limit or self.settings.time_limit)
        return outcome

    def _run_in_child(self, job: Job, frame: JobFrame) -> Outcome:
        """Run one job in a forked child: a task that kills its process crashes only that."""
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run, send the outcome, and never return into the test
            code = 0
            try:
                os.close(read_end)
                data = pickle.dumps(self._run_here(job, frame))
                with os.fdopen(write_end, "wb") as out:
                    out.write(data)
            except BaseException:
                code = 1
            os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
        if data:
            outcome: Outcome = pickle.loads(data)
            return outcome
        return Outcome(
            OutcomeKind.CRASHED,
            error_type="ChildDied",
            error_message=f"pool child {pid} died: wait status {status}",
        )

    # -- settling (`service.settle.Settler`'s actions, without the I/O) -------------------

    def _settle(self, queue: str, message: Message, job: Job, outcome: Outcome) -> None:
        decision = settle.decide(job, outcome)
        action = decision.action
        if action is settle.Action.ACK:
            for publish in outcome.publishes:
                self._publish_next(publish)
            if message.reply_to and outcome.payload is not None:
                self._reply(message, outcome.payload)
        elif action is settle.Action.RETRY:
            delay = settle.backoff(job.spec, job.attempt)
            headers = publisher_headers(message)
            headers[protocol.ATTEMPT_HEADER] = job.attempt + 1
            headers[protocol.DUE_HEADER] = int((self.clock.time() + math.ceil(delay)) * 1000)
            self._delay(queue, message, headers, delay)
        elif action is settle.Action.DEAD_LETTER:
            assert decision.reason is not None
            self._dead_letter(
                queue, message, decision.reason, outcome.error_type, outcome.error_message
            )
        elif action is settle.Action.REQUEUE:  # the broker counts the delivery
            count = protocol.int_header(message.headers, "x-delivery-count") or 0
            requeued = replace(message, headers={**message.headers, "x-delivery-count": count + 1})
            requeued.redelivered = True
            self.queues.setdefault(queue, deque()).appendleft(requeued)
        else:
            message.redelivered = True
            self.queues.setdefault(queue, deque()).appendleft(message)

    def _delay(self, queue: str, message: Message, headers: dict[str, Any], seconds: float) -> None:
        headers.pop(protocol.FLOW_START_HEADER, None)
        exchange, routing_key = routing.delay_routing_key(queue, seconds)
        self.publish(self._copy(message, headers), routing_key, exchange)

    def _dead_letter(
        self, queue: str, message: Message, reason: protocol.Reason, error_type: str, text: str
    ) -> None:
        headers = publisher_headers(message)
        headers.update(
            {
                protocol.REASON_HEADER: str(reason),
                protocol.ERROR_TYPE_HEADER: protocol.truncate(error_type),
                protocol.ERROR_MESSAGE_HEADER: protocol.truncate(text),
                protocol.QUEUE_HEADER: queue,
                protocol.DEAD_AT_HEADER: self.clock.ms(),
            }
        )
        delivery = cast(Delivery, message)
        self.publish(self._copy(message, headers), routing.dlq_name(queue))
        if settle._ends_flow(delivery, reason):
            self.publish(Message.of(settle._failure_copy(delivery, headers)), queue)
        elif message.reply_to:
            content_type = protocol.media_type(message.content_type) or protocol.JSON
            body = protocol.error_result(content_type, error_type, text)
            self._reply(message, body, content_type)

    def _copy(self, message: Message, headers: dict[str, Any]) -> Message:
        return Message.of(copy_message(cast(Delivery, message), headers))

    def _reply(self, message: Message, body: bytes, content_type: str | None = None) -> None:
        assert message.reply_to is not None
        self.publish(
            Message(
                body,
                content_type=content_type or protocol.media_type(message.content_type),
                correlation_id=message.correlation_id or message.message_id,
            ),
            message.reply_to,
        )

    def _publish_next(self, publish: Publish) -> None:
        self.publish(
            Message(
                publish.body,
                dict(publish.headers),
                publish.content_type,
                message_id=publish.message_id,
                correlation_id=publish.correlation_id,
                timestamp=self.clock.now(),
            ),
            publish.routing_key,
            publish.exchange,
        )

    def _fan_in(self, effects: list[Any]) -> None:
        """Carry out `service.fanin` effects, as `service.joins.Joins` does."""
        for effect in effects:
            if isinstance(effect, FollowUp):
                headers: dict[str, Any] = {
                    protocol.TASK_HEADER: effect.task,
                    protocol.FLOW_HEADER: effect.flow,
                    protocol.FLOW_STEP_HEADER: effect.step,
                }
                follow_up = Message(
                    effect.body, headers, effect.content_type, message_id=effect.message_id
                )
                self.publish(follow_up, effect.queue)
            elif isinstance(effect, Done):
                self._book.done(effect.key)
            elif isinstance(effect, Keep):
                kept = publisher_headers(effect.token)
                if effect.handled:
                    kept[protocol.JOIN_HANDLED_HEADER] = True
                self.publish(self._copy(effect.token, kept), routing.JOINS_QUEUE)
            elif isinstance(effect, Refuse):
                self._dead_letter(
                    routing.JOINS_QUEUE,
                    effect.token,
                    protocol.Reason.BAD_FLOW,
                    "bad_flow",
                    effect.detail,
                )
            else:
                assert isinstance(effect, Ack)


class MemoryClient:
    """`service.Client`'s face on a `MemoryWorker`: ``call`` runs the worker (and its clock)
    until the result is in."""

    def __init__(self, worker: MemoryWorker, *, queue: str, content_type: str) -> None:
        if content_type not in protocol.CONTENT_TYPES:
            raise ValueError(f"content_type must be one of {sorted(protocol.CONTENT_TYPES)}")
        routing.check_queue_name(queue)
        self.worker = worker
        self.queue = queue
        self.content_type = content_type

    def submit(self, task: TaskRef | Node, /, *args: Any, **kwargs: Any) -> str:
        return self._publish(_node(task, args, kwargs), reply_to=None)

    def call(self, task: TaskRef | Node, /, *args: Any, **kwargs: Any) -> Any:
        task_id = uuid.uuid4().hex
        self._publish(_node(task, args, kwargs), reply_to=DIRECT_REPLY_TO, task_id=task_id)
        return self._result(task_id)

    def map(
        self, task: TaskRef, iterable: Iterable[Any], *, return_exceptions: bool = False
    ) -> list[Any]:
        return self.starmap(
            task, ((item,) for item in iterable), return_exceptions=return_exceptions
        )

    def starmap(
        self,
        task: TaskRef,
        iterable: Iterable[Iterable[Any]],
        *,
        return_exceptions: bool = False,
        on_result: Callable[[int, Any], None] | None = None,
    ) -> list[Any]:
        ids = []
        for args in iterable:
            task_id = uuid.uuid4().hex
            self._publish(_step(task, tuple(args), {}), reply_to=DIRECT_REPLY_TO, task_id=task_id)
            ids.append(task_id)
        results: list[Any] = []
        for index, task_id in enumerate(ids):
            try:
                value = self._result(task_id)
            except TaskError as exc:
                if on_result is not None:
                    on_result(index, exc)
                if not return_exceptions:
                    raise
                value = exc
            else:
                if on_result is not None:
                    on_result(index, value)
            results.append(value)
        return results

    def consumer_count(self) -> int:
        """One: the stand-in's worker consumes every queue."""
        return 1

    def close(self) -> None:
        """Nothing to close; here for `service.Client`'s face."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _result(self, task_id: str) -> Any:
        replies = self.worker.replies
        if not self.worker.run_until(lambda: task_id in replies):
            raise TimeoutError(f"task {task_id} left no result: nothing is left to run")
        message = replies.pop(task_id)
        envelope = protocol.decode(
            message.content_type or "", message.body, max_depth=None, string_keys=False
        )
        if envelope.get("ok"):
            return envelope.get("result")
        error = envelope.get("error") or {}
        raise TaskError(str(error.get("type", "Error")), str(error.get("message", "")))

    def _publish(self, node: Node, *, reply_to: str | None, task_id: str | None = None) -> str:
        task_id = task_id or uuid.uuid4().hex
        worker, now = self.worker, self.worker.clock.time()
        if isinstance(node, Chain | Group):
            for publish in entry(
                node, flow_id=task_id, queue=self.queue, content_type=self.content_type, now=now
            ):
                worker.publish(
                    Message(
                        publish.body,
                        dict(publish.headers),
                        publish.content_type,
                        message_id=publish.message_id,
                        correlation_id=task_id if reply_to else None,
                        reply_to=reply_to,
                        timestamp=worker.clock.now(),
                    ),
                    publish.routing_key,
                    publish.exchange,
                )
            return task_id
        assert isinstance(node, Step)
        queue = node.queue or self.queue
        routing.check_queue_name(queue)
        headers: dict[str, Any] = {protocol.TASK_HEADER: node.task}
        exchange, routing_key = "", queue
        eta = node.eta_ms(now)
        if eta is not None:
            headers[protocol.ETA_HEADER] = eta
            if eta > now * 1000:
                delay_ms = eta - math.ceil(now * 1000)
                exchange, routing_key = routing.delay_routing_key(queue, delay_ms / 1000)
        message = Message(
            protocol.encode_request(self.content_type, node.args, node.kwargs),
            headers,
            self.content_type,
            message_id=task_id,
            correlation_id=task_id if reply_to else None,
            reply_to=reply_to,
            timestamp=worker.clock.now(),
        )
        worker.publish(message, routing_key, exchange)
        return task_id


@contextlib.contextmanager
def worker(
    tasks: Iterable[str | ModuleType] = (),
    *,
    queue: str = "default",
    start: dt.datetime | float | None = None,
    isolate: bool = False,
    **settings: Any,
) -> Iterator[MemoryWorker]:
    """An in-memory worker for ``tasks`` (modules, by name or object) on a fake clock.

    ``start`` is the clock's first instant (default: now). ``isolate`` runs each task in a
    forked child. Other keywords are worker settings (`service.settings.Settings`:
    ``max_deliveries``, ``time_limit``, ``max_body_size``...)::

        with testing.worker(tasks=["myapp.tasks"]) as w:
            client = w.client()
            assert client.call(add, 2, 3) == 5
    """
    modules = [t if isinstance(t, str) else t.__name__ for t in tasks]
    config = Settings(tasks=modules or None, queue=queue, concurrency=1, **settings)
    with MemoryWorker(modules, queue=queue, start=start, isolate=isolate, settings=config) as w:
        yield w
