"""When periodic tasks fire: cron expressions and fixed intervals, as slots in UTC milliseconds.

A slot is the instant a schedule is due, in milliseconds since the Unix epoch. Every host
computes the same slots from the same schedule, so a fire is named by its slot
(``cron:<task>:<slot ms>``, its ``message_id``) and a rare duplicate carries the same name.

- ``every(seconds=30)``: slots at whole multiples of the interval since the epoch, so all
  hosts agree without coordination and a restart does not shift them.
- a 5-field cron expression, in UTC or an IANA zone (``schedule_tz``), evaluated by cronsim
  (Healthchecks' parser; no dependencies, Debian cron semantics). Across DST: on the
  fall-back day a daily time that occurs twice fires once (the first occurrence); on the
  spring-forward day a time that does not exist fires at the first minute after the gap
  (``30 2 * * *`` in Europe/Berlin fires at 03:00 local). Hourly expressions fire at each UTC
  instant, so twice in the repeated hour.

Pure logic: the scheduler (`service.scheduler`) asks which slots are due and fires them.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

if TYPE_CHECKING:
    from cronsim import CronSim

# Slots one catch-up may fire at most, whatever the policy (a bound on a burst after a long
# outage of a frequent schedule).
MAX_CATCHUP: Final = 1000


class Catchup(StrEnum):
    """What a new leader does with the slots missed while no worker ran (`Schedule.catchup`)."""

    LATEST = "latest"  # fire the most recent missed slot once (the default)
    ALL = "all"  # fire every missed slot, oldest first, up to `Schedule.catchup_max`
    NONE = "none"  # fire none of them; carry on with the next slot


@dataclass(frozen=True, slots=True)
class Every:
    """A fixed interval: ``every(seconds=30)``, ``every(minutes=5)``, ``every(hours=1)``."""

    seconds: float

    def __str__(self) -> str:
        return f"every {self.seconds:g}s"


def every(*, seconds: float = 0, minutes: float = 0, hours: float = 0) -> Every:
    """A schedule that fires every so long, on slots aligned to the Unix epoch."""
    total = seconds + 60 * minutes + 3600 * hours
    if not total > 0 or not math.isfinite(total):
        raise ValueError(f"an interval must be positive, got {total:g}s")
    if total < 1:
        raise ValueError(f"an interval must be at least 1 s, got {total:g}s")
    return Every(total)


def _cron(expression: str, start: dt.datetime, *, reverse: bool = False) -> CronSim:
    # Imported here: task modules import this module (for `every`), and so does every pool
    # child, which never evaluates a schedule.
    from cronsim import CronSim

    return CronSim(expression, start, reverse=reverse)


def _ms(when: dt.datetime) -> int:
    return round(when.timestamp() * 1000)


def _utc(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


@dataclass(frozen=True)
class Schedule:
    """One task's schedule: what it fires, when, and how it catches up.

    ``spec`` is a 5-field cron expression or an `Every`; ``tz`` an IANA zone for cron (UTC
    by default; intervals ignore it). ``args``/``kwargs`` are passed to every fire.
    """

    task: str
    spec: str | Every
    tz: str = "UTC"
    args: tuple[object, ...] = ()
    kwargs: tuple[tuple[str, object], ...] = ()
    catchup: Catchup = Catchup.LATEST
    catchup_max: int = 100

    def __post_init__(self) -> None:
        """Checked when the task is declared, so a bad schedule fails where it is written."""
        self.zone  # noqa: B018 - raises for an unknown zone
        if isinstance(self.spec, Every):
            if not self.spec.seconds >= 1:
                raise ValueError(f"an interval must be at least 1 s, got {self.spec.seconds:g}s")
        else:
            fields = self.spec.split()
            if len(fields) != 5:
                raise ValueError(
                    f"{self.spec!r} is not a 5-field cron expression (minute hour day month "
                    "weekday), e.g. '*/5 * * * *'"
                )
            from cronsim import CronSimError

            try:
                _cron(self.spec, dt.datetime.now(self.zone))
            except CronSimError as exc:
                raise ValueError(f"{self.spec!r} is not a cron expression: {exc}") from None
        if not 1 <= self.catchup_max <= MAX_CATCHUP:
            raise ValueError(f"schedule_catchup_max must be 1 to {MAX_CATCHUP}")

    @property
    def zone(self) -> dt.tzinfo:
        if self.tz == "UTC":
            return dt.UTC
        try:
            return ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{self.tz!r} is not an IANA time zone (e.g. Europe/Berlin)") from None

    @property
    def expression(self) -> str:
        """The schedule as written (a cron expression, or ``every 30s``)."""
        return str(self.spec)

    def after(self, ms: int) -> Iterator[int]:
        """The slots strictly after ``ms``, in order, forever."""
        if isinstance(self.spec, Every):
            step = round(self.spec.seconds * 1000)
            slot = (ms // step + 1) * step
            while True:
                yield slot
                slot += step
        else:
            # cronsim walks local wall-clock time in the zone and yields strictly later times.
            for when in _cron(self.spec, _utc(ms).astimezone(self.zone)):
                yield _ms(when)

    def next_after(self, ms: int) -> int:
        return next(self.after(ms))

    def due(self, last: int, now: int, *, limit: int = MAX_CATCHUP) -> list[int]:
        """Slots after ``last`` up to and including ``now``, oldest first, at most ``limit``
        (the most recent ones when there are more). Walks back from ``now``, so a long outage
        of a frequent schedule costs ``limit`` steps, not one per missed slot."""
        slots: list[int] = []
        for slot in self.before(now + 1):
            if slot <= last or len(slots) == limit:
                break
            slots.append(slot)
        slots.reverse()
        return slots

    def before(self, ms: int) -> Iterator[int]:
        """The slots strictly before ``ms``, latest first."""
        if isinstance(self.spec, Every):
            step = round(self.spec.seconds * 1000)
            slot = (ms - 1) // step * step
            while True:
                yield slot
                slot -= step
        else:
            for when in _cron(self.spec, _utc(ms).astimezone(self.zone), reverse=True):
                yield _ms(when)

    def to_fire(self, last: int, now: int, *, outage: bool) -> list[int]:
        """Which due slots to fire now. After a handover (``outage`` False: some worker led a
        moment ago) every missed slot fires; after an outage the catch-up policy decides."""
        due = self.due(last, now)
        if not outage or len(due) <= 1:
            return due
        if self.catchup is Catchup.LATEST:
            return due[-1:]
        if self.catchup is Catchup.ALL:
            return due[-self.catchup_max :]
        return []

    def period(self, around: int) -> float:
        """Seconds between the two slots after ``around`` (for the "not fired for two periods"
        alert; a cron schedule's period can change, at DST or across a week)."""
        slots = self.after(around)
        first = next(slots)
        return (next(slots) - first) / 1000
