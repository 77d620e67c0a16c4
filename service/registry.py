"""The task registry: which functions a worker may run, and with which limits.

Task lookup is an allow-list filled at import time by the `task` decorator; nothing ever imports
a module or looks up an attribute named by message data.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypedDict, TypeVar, Unpack, overload

from service.errors import ConfigError
from service.schedules import Catchup, Every, Schedule

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """A registered task and its options; the defaults here are the only ones.

    - ``max_attempts``: runs before a raising task is dead-lettered (1 disables retries).
    - ``time_limit``: hard limit in seconds; the child is killed and the attempt fails.
      None uses the worker's ``--time-limit``.
    - ``soft_time_limit``: seconds after which `SoftTimeLimitExceeded` is raised inside the task.
    - ``retry_backoff`` / ``retry_backoff_max``: the first retry waits about ``retry_backoff`` s,
      doubling each attempt up to ``retry_backoff_max``; held by the broker, with jitter.
    - ``schedule``: run periodically: a 5-field cron expression (``"*/5 * * * *"``) or
      ``every(seconds=30)``; fired into the queue of the workers that import the task, once
      per slot across all of them (`service.scheduler`). ``schedule_tz`` is the IANA zone of a
      cron expression (UTC by default); ``schedule_args`` and ``schedule_kwargs`` are passed
      to every fire; ``schedule_catchup`` says what happens to slots missed while no worker ran
      (``latest``: fire the most recent once, the default; ``all``: fire each, up to
      ``schedule_catchup_max``, default 100; ``none``).

    Pool children read these from their own registry (the same task modules fill it), so an
    option the child uses needs no field in the pipe protocol.
    """

    name: str
    fn: Callable[..., Any]
    max_attempts: int = 3
    time_limit: float | None = None
    soft_time_limit: float | None = None
    retry_backoff: float = 1.0
    retry_backoff_max: float = 300.0
    schedule: str | Every | None = None
    schedule_tz: str = "UTC"
    schedule_args: tuple[Any, ...] | list[Any] = ()
    schedule_kwargs: dict[str, Any] | None = None
    schedule_catchup: str = "latest"
    schedule_catchup_max: int = 100

    def __post_init__(self) -> None:
        try:
            self._check()
        except ValueError as exc:
            raise ConfigError(f"task {self.name}: {exc}") from None

    def _check(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        for label in ("time_limit", "soft_time_limit"):
            limit = getattr(self, label)
            if limit is not None and limit <= 0:
                raise ValueError(f"{label} must be positive")
        hard, soft = self.time_limit, self.soft_time_limit
        if hard is not None and soft is not None and soft >= hard:
            raise ValueError("soft_time_limit must be below time_limit, or it can never fire")
        if self.schedule is not None:
            self.periodic()  # raises ValueError saying what is wrong
        elif self.schedule_args or self.schedule_kwargs:
            raise ValueError("schedule_args/schedule_kwargs need a schedule")

    def periodic(self) -> Schedule | None:
        """The task's `Schedule`, if it has one."""
        if self.schedule is None:
            return None
        if not isinstance(self.schedule, str | Every):
            raise ValueError(
                f"schedule must be a cron expression or every(...), got {self.schedule!r}"
            )
        try:
            catchup = Catchup(self.schedule_catchup)
        except ValueError:
            raise ValueError(
                f"schedule_catchup must be one of {', '.join(Catchup)}, got "
                f"{self.schedule_catchup!r}"
            ) from None
        return Schedule(
            self.name,
            self.schedule,
            tz=self.schedule_tz,
            args=tuple(self.schedule_args),
            kwargs=tuple((self.schedule_kwargs or {}).items()),
            catchup=catchup,
            catchup_max=self.schedule_catchup_max,
        )


class TaskOptions(TypedDict, total=False):
    """The keyword arguments of `task`: ``name`` and the `TaskSpec` options."""

    name: str | None
    max_attempts: int
    time_limit: float | None
    soft_time_limit: float | None
    retry_backoff: float
    retry_backoff_max: float
    schedule: str | Every | None
    schedule_tz: str
    schedule_args: tuple[Any, ...] | list[Any]
    schedule_kwargs: dict[str, Any] | None
    schedule_catchup: str
    schedule_catchup_max: int


_OPTIONS = frozenset(f.name for f in dataclasses.fields(TaskSpec)) - {"name", "fn"}
_tasks: dict[str, TaskSpec] = {}
_names: dict[Callable[..., Any], str] = {}
# hutch's own tasks (`service.continuation`): run like any task, but not the user's, so they
# are not listed by `registered` (nor counted as the worker having tasks).
_builtins: dict[str, TaskSpec] = {}
BUILTIN_PREFIX = "hutch."


@overload
def task(fn: F, /) -> F: ...
@overload
def task(**options: Unpack[TaskOptions]) -> Callable[[F], F]: ...
def task(fn: F | None = None, /, **options: Unpack[TaskOptions]) -> F | Callable[[F], F]:
    """Register a function as a task and return it unchanged.

    Used bare (``@task``) the task is named ``"module.function"``; ``@task(name=...)`` picks the
    name publishers use in ``headers.task``. The other options are `TaskSpec`'s. The function
    stays a plain function, so it still works under ``multiprocessing`` or when called directly.
    """
    name = options.get("name")
    spec_options: dict[str, Any] = {k: v for k, v in options.items() if k != "name"}
    unknown = set(spec_options) - _OPTIONS
    if unknown:
        raise TypeError(
            f"unknown task option(s) {', '.join(sorted(unknown))}; "
            f"known: name, {', '.join(sorted(_OPTIONS))}"
        )

    def register(func: F) -> F:
        task_name = name or f"{func.__module__}.{func.__qualname__}"
        if task_name.startswith(BUILTIN_PREFIX):
            raise ConfigError(f"task name {task_name!r}: names starting 'hutch.' are hutch's own")
        existing = _tasks.get(task_name)
        if existing is not None and existing.fn is not func:
            raise ConfigError(f"task name {task_name!r} is already registered")
        _tasks[task_name] = TaskSpec(task_name, func, **spec_options)
        _names[func] = task_name
        return func

    return register(fn) if fn is not None else register


def register_builtin(name: str, fn: Callable[..., Any], **options: Any) -> None:
    """Register one of hutch's own tasks (named ``hutch.*``)."""
    _builtins[name] = TaskSpec(name, fn, **options)


def lookup(name: str) -> TaskSpec | None:
    return _tasks.get(name) or _builtins.get(name)


def name_of(fn: Callable[..., Any] | str) -> str:
    """The registered name of a task function; strings pass through unchanged."""
    if isinstance(fn, str):
        return fn
    try:
        return _names[fn]
    except KeyError:
        raise ValueError(f"{fn!r} is not a registered task: decorate it with @task") from None


def registered() -> dict[str, TaskSpec]:
    return dict(_tasks)


def import_task_modules(modules: Iterable[str]) -> None:
    """Import the modules named by the operator (never by a message) to fill the registry."""
    for module in modules:
        importlib.import_module(module)
