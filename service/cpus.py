"""How many CPUs this process may really use: affinity and the cgroup CPU quota (v1 and v2).

``os.cpu_count()`` reports the host's CPUs, so a container limited to 2 CPUs on a 64-core host
would otherwise start 64 children that fight over 2 CPUs' worth of time.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def _quota_v2(root: Path) -> float | None:
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return int(quota) / int(period)


def _quota_v1(root: Path) -> float | None:
    for base in (root / "cpu", root / "cpu,cpuacct", root):
        try:
            quota = int((base / "cpu.cfs_quota_us").read_text())
            period = int((base / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs in this process's affinity mask, capped by the cgroup quota rounded up; at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = _quota_v2(cgroup_root)
    if quota is None:
        quota = _quota_v1(cgroup_root)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)
