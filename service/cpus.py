"""How many CPUs this process may really use: its affinity mask, capped by its cgroup CPU quota.

``os.cpu_count()`` reports the host's CPUs, so a container limited to 2 CPUs on a 64-core host
would otherwise start 64 children that fight over 2 CPUs' worth of time.

The quota that binds is not necessarily at the root of the cgroup mount: a systemd unit with
``CPUQuota=``, a supervisor's cgroup or a container without a cgroup namespace puts the process
in a nested cgroup, and a quota on any ancestor limits it too (cgroup v1 even shows ``-1`` in a
child whose parent has a quota). So, as Go's uber-go/automaxprocs and the JDK's container support
do, find the process's own cgroup in ``/proc/self/cgroup``, the mount of that hierarchy in
``/proc/self/mountinfo`` (translating the path relative to the mount's root, which in a container
may be the cgroup itself), and, like the JDK since JDK-8322420, take the tightest quota of every
level from there up to the mount point. cgroup v2 counts if its hierarchy has the cpu controller
(a ``cpu.max`` on the path); otherwise, as on hybrid hosts where ``cpu`` is bound to v1, the v1
``cpu`` hierarchy does.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import NamedTuple

# A level's quota in CPUs: math.inf for "no limit here", None for "nothing readable here".
_Reader = Callable[[Path], float | None]


def usable_cpus(*, proc_self: Path = Path("/proc/self"), fs_root: Path = Path("/")) -> int:
    """CPUs in this process's affinity mask, capped by the cgroup quota rounded up; at least 1.

    ``proc_self`` holds ``cgroup`` and ``mountinfo``; the mount points named there are looked up
    under ``fs_root``. Both exist for tests: the defaults describe this process.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    try:
        quota = _quota(proc_self, fs_root)
    except (OSError, ValueError, ArithmeticError):
        # The quota only refines a default: odd kernel files must not stop a worker starting.
        quota = None
    if quota is not None and quota < math.inf:
        count = min(count, math.ceil(quota))
    return max(1, count)


def _quota(proc_self: Path, fs_root: Path) -> float | None:
    """Tightest quota on our cgroup path: v2 if its hierarchy has the cpu controller, else v1."""
    mounts = [m for m in map(_parse_mount, _read_lines(proc_self / "mountinfo")) if m]
    v2_mounts = [m for m in mounts if m.fstype == "cgroup2"]
    v1_mounts = [m for m in mounts if m.fstype == "cgroup" and "cpu" in m.options]
    v2 = v1 = None
    for line in _read_lines(proc_self / "cgroup"):
        # "hierarchy-ID:controller,list:/path"; v2's single hierarchy is "0::/path".
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = _tightest(_levels(path, v2_mounts, fs_root), _read_v2)
        elif "cpu" in controllers.split(","):
            v1 = _tightest(_levels(path, v1_mounts, fs_root), _read_v1)
    return v2 if v2 is not None else v1


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except (OSError, ValueError):
        return []


class _Mount(NamedTuple):
    fstype: str
    root: str  # the directory of the hierarchy that the mount shows
    point: str
    options: set[str]  # super options: for cgroup v1, the controllers bound to the hierarchy


def _parse_mount(line: str) -> _Mount | None:
    # "36 25 0:30 /root /mount/point rw,relatime shared:8 - cgroup cgroup rw,cpu,cpuacct":
    # a variable number of optional fields ends at "-".
    fields = line.split()
    try:
        dash = fields.index("-", 6)
        fstype, options = fields[dash + 1], fields[dash + 3]
    except (ValueError, IndexError):
        return None
    return _Mount(fstype, _unescape(fields[3]), _unescape(fields[4]), set(options.split(",")))


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes (\040 ...).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _levels(cgroup: str, mounts: list[_Mount], fs_root: Path) -> Iterator[Path]:
    """The directories of ``cgroup`` and its ancestors visible in a mount, leaf first."""
    for mount in mounts:
        try:
            relative = PurePosixPath(cgroup).relative_to(mount.root)
        except ValueError:
            continue  # this mount shows another part of the hierarchy (a bind mount)
        if ".." in relative.parts:
            continue  # outside our cgroup namespace: the path names nothing we can see
        # Ancestors above the mount's root (a container's view) are invisible, so stop there.
        top = fs_root / mount.point.lstrip("/")
        for depth in range(len(relative.parts), -1, -1):
            yield top.joinpath(*relative.parts[:depth])
        return


def _tightest(levels: Iterator[Path], read: _Reader) -> float | None:
    # A child may not use more than any ancestor allows, whatever its own file says.
    quotas = [quota for quota in map(read, levels) if quota is not None]
    return min(quotas, default=None)


def _read_v2(directory: Path) -> float | None:
    try:
        fields = (directory / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    if fields[:1] == ["max"]:
        return math.inf
    try:
        quota, period = int(fields[0]), int(fields[1])
    except (ValueError, IndexError):
        return None
    return _ratio(quota, period) if quota > 0 else None


def _read_v1(directory: Path) -> float | None:
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _ratio(quota, period) if quota > 0 else math.inf  # -1: no limit at this level


def _ratio(quota: int, period: int) -> float | None:
    if period <= 0:
        return None
    try:
        return quota / period
    except OverflowError:  # more CPUs than a float holds: no limit worth the name
        return math.inf
