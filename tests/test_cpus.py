"""usable_cpus: the affinity mask capped by the tightest cgroup CPU quota on the process's path.

Fake hosts in tmp_path give usable_cpus its own /proc/self/cgroup, /proc/self/mountinfo and
cgroup files, so every layout (v1, v2, hybrid, nested cgroups, a container's mount) is tested on
any machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service import cpus
from service.cpus import usable_cpus


def affinity() -> int:
    return len(os.sched_getaffinity(0))


@pytest.fixture
def eight_cpus(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pretend this process may run on 8 CPUs, so a quota below that is visible."""
    monkeypatch.setattr(cpus.os, "sched_getaffinity", lambda pid: set(range(8)))
    return 8


class Host:
    """A fake /proc/self and filesystem: mount cgroup hierarchies, then ask usable_cpus."""

    def __init__(self, tmp_path: Path) -> None:
        self.proc_self = tmp_path / "proc" / "self"
        self.fs_root = tmp_path / "fs"
        self.cgroup: list[str] = []
        # Lines that are no cgroup mount, as on a real host, and must be passed over.
        self.mountinfo = [
            "22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw",
            "25 22 0:24 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755",
        ]

    def v2(self, cgroup: str = "/", *, root: str = "/", point: str = "/sys/fs/cgroup") -> Path:
        """Put the process in ``cgroup`` of a cgroup2 mount; return the mount's directory."""
        self.cgroup.append(f"0::{cgroup}")
        number = len(self.mountinfo) + 30
        self.mountinfo.append(
            f"{number} 25 0:{number} {root} {point} rw,nosuid shared:{number}"
            " - cgroup2 cgroup2 rw,nsdelegate"
        )
        return self.mount_dir(point)

    def v1(
        self,
        cgroup: str = "/",
        *,
        controllers: str = "cpu",
        root: str = "/",
        point: str = "/sys/fs/cgroup/cpu",
    ) -> Path:
        """Put the process in ``cgroup`` of a v1 hierarchy; return the mount's directory."""
        number = len(self.mountinfo) + 30
        self.cgroup.insert(0, f"{number}:{controllers}:{cgroup}")
        self.mountinfo.append(
            f"{number} 25 0:{number} {root} {point} rw,nosuid shared:{number}"
            f" - cgroup cgroup rw,{controllers}"
        )
        return self.mount_dir(point)

    def mount_dir(self, point: str) -> Path:
        directory = self.fs_root / point.lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def usable_cpus(self) -> int:
        self.proc_self.mkdir(parents=True, exist_ok=True)
        (self.proc_self / "cgroup").write_text("".join(line + "\n" for line in self.cgroup))
        (self.proc_self / "mountinfo").write_text("".join(line + "\n" for line in self.mountinfo))
        return usable_cpus(proc_self=self.proc_self, fs_root=self.fs_root)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def write_v2(directory: Path, cpu_max: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cpu.max").write_text(cpu_max + "\n")


def write_v1(directory: Path, quota: str, period: str = "100000") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cpu.cfs_quota_us").write_text(quota + "\n")
    (directory / "cpu.cfs_period_us").write_text(period + "\n")


# -- one level: the cases the root-only version handled ------------------------------------------


def test_cgroup_v2_quota_real_affinity(host: Host) -> None:
    write_v2(host.v2(), "150000 100000")
    assert host.usable_cpus() == min(affinity(), 2)


def test_cgroup_v2_unlimited_real_affinity(host: Host) -> None:
    write_v2(host.v2(), "max 100000")
    assert host.usable_cpus() == affinity()


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("150000 100000", 2),  # 1.5 CPUs rounds up
        ("200000 100000", 2),
        ("50000 100000", 1),
        ("1000 100000", 1),  # never below 1
        ("400000 50000", 8),  # 8 CPUs of quota
        ("1600000 100000", 8),  # quota above the affinity mask: the mask wins
        ("max 100000", 8),
        ("max", 8),
    ],
)
def test_cgroup_v2(host: Host, eight_cpus: int, cpu_max: str, expected: int) -> None:
    write_v2(host.v2(), cpu_max)
    assert host.usable_cpus() == expected


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [
        ("300000", "100000", 3),
        ("250000", "100000", 3),
        ("50000", "100000", 1),
        ("-1", "100000", 8),  # no quota
        ("100000", "0", 8),  # nonsense period: ignored
    ],
)
def test_cgroup_v1(host: Host, eight_cpus: int, quota: str, period: str, expected: int) -> None:
    write_v1(host.v1(), quota, period)
    assert host.usable_cpus() == expected


def test_cgroup_v1_real_affinity(host: Host) -> None:
    mount = host.v1()
    write_v1(mount, "150000")
    assert host.usable_cpus() == min(affinity(), 2)
    write_v1(mount, "-1")
    assert host.usable_cpus() == affinity()


def test_cgroup_v1_combined_controller_directory(host: Host, eight_cpus: int) -> None:
    mount = host.v1(controllers="cpu,cpuacct", point="/sys/fs/cgroup/cpu,cpuacct")
    write_v1(mount, "200000")
    assert host.usable_cpus() == 2


def test_cgroup_v2_wins_over_v1(host: Host, eight_cpus: int) -> None:
    write_v2(host.v2(point="/sys/fs/cgroup/unified"), "300000 100000")
    write_v1(host.v1(), "100000")
    assert host.usable_cpus() == 3


def test_unreadable_v2_falls_back_to_v1(host: Host, eight_cpus: int) -> None:
    write_v2(host.v2(point="/sys/fs/cgroup/unified"), "garbage")
    write_v1(host.v1(), "200000")
    assert host.usable_cpus() == 2


def test_no_cgroup_files(host: Host, eight_cpus: int, tmp_path: Path) -> None:
    host.v2()
    host.v1()
    assert host.usable_cpus() == 8  # hierarchies mounted, but no quota files in them
    nowhere = tmp_path / "does-not-exist"
    assert usable_cpus(proc_self=nowhere, fs_root=nowhere) == 8


def test_no_affinity_support_uses_cpu_count(
    host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(pid: int) -> set[int]:
        raise OSError("not here")

    monkeypatch.setattr(cpus.os, "sched_getaffinity", unsupported)
    monkeypatch.setattr(cpus.os, "cpu_count", lambda: 6)
    mount = host.v2()
    assert host.usable_cpus() == 6
    write_v2(mount, "200000 100000")
    assert host.usable_cpus() == 2
    monkeypatch.setattr(cpus.os, "cpu_count", lambda: None)
    nothing = tmp_path / "nothing"
    assert usable_cpus(proc_self=nothing, fs_root=nothing) == 1
