"""usable_cpus: the affinity mask capped by the tightest cgroup CPU quota on the process's path.

Fake hosts in tmp_path give usable_cpus its own /proc/self/cgroup, /proc/self/mountinfo and
cgroup files, so every layout (v1, v2, hybrid, nested cgroups, a container's mount) is tested on
any machine. The last tests put a real child process in a real nested cgroup (as root only).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import cpus
from service.cpus import usable_cpus


def affinity() -> int:
    return len(os.sched_getaffinity(0))


@pytest.fixture
def eight_cpus(monkeypatch: pytest.MonkeyPatch) -> int:
    """Pretend this process may run on 8 CPUs, so a quota below that is visible."""
    monkeypatch.setattr("service.cpus.os.sched_getaffinity", lambda pid: set(range(8)))
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

    monkeypatch.setattr("service.cpus.os.sched_getaffinity", unsupported)
    monkeypatch.setattr("service.cpus.os.cpu_count", lambda: 6)
    mount = host.v2()
    assert host.usable_cpus() == 6
    write_v2(mount, "200000 100000")
    assert host.usable_cpus() == 2
    monkeypatch.setattr("service.cpus.os.cpu_count", lambda: None)
    nothing = tmp_path / "nothing"
    assert usable_cpus(proc_self=nothing, fs_root=nothing) == 1


# -- nested cgroups: the tightest level from the process's cgroup up to the mount point wins -----

# Levels of /system.slice/hutch.service below the mount, and what 8 CPUs become. Each case has a
# quota that a leaf-only or a root-only reading would miss.
NESTED = [
    pytest.param({"system.slice": 2.0}, 2, id="parent-tighter-than-unlimited-leaf"),
    pytest.param({"system.slice": 2.0, "system.slice/hutch.service": 6.0}, 2, id="parent-tighter"),
    pytest.param({"system.slice": 6.0, "system.slice/hutch.service": 1.5}, 2, id="leaf-tighter"),
    pytest.param({"": 7.0, "system.slice": 3.0, "system.slice/hutch.service": 5.0}, 3, id="middle"),
    pytest.param({"": 1.0}, 1, id="mount-root-counts-too"),
    pytest.param({}, 8, id="no-quota-anywhere"),
]
LEAF = "system.slice/hutch.service"


@pytest.mark.parametrize(("quotas", "expected"), NESTED)
def test_nested_v2(host: Host, eight_cpus: int, quotas: dict[str, float], expected: int) -> None:
    mount = host.v2("/" + LEAF)
    for level in ("", "system.slice", LEAF):  # every level exists; unlimited unless listed
        quota = quotas.get(level)
        write_v2(mount / level, "max 100000" if quota is None else f"{int(quota * 1e5)} 100000")
    assert host.usable_cpus() == expected


@pytest.mark.parametrize(("quotas", "expected"), NESTED)
def test_nested_v1(host: Host, eight_cpus: int, quotas: dict[str, float], expected: int) -> None:
    mount = host.v1("/" + LEAF, controllers="cpu,cpuacct", point="/sys/fs/cgroup/cpu,cpuacct")
    for level in ("", "system.slice", LEAF):
        quota = quotas.get(level)
        write_v1(mount / level, "-1" if quota is None else str(int(quota * 1e5)))
    assert host.usable_cpus() == expected


def test_levels_without_files_are_skipped(host: Host, eight_cpus: int) -> None:
    # v2 cgroups without the cpu controller enabled have no cpu.max; an ancestor's still binds.
    mount = host.v2("/a/b/c")
    (mount / "a/b/c").mkdir(parents=True)
    write_v2(mount / "a", "300000 100000")
    assert host.usable_cpus() == 3


def test_siblings_and_children_do_not_count(host: Host, eight_cpus: int) -> None:
    mount = host.v1("/app")
    write_v1(mount / "app", "-1")
    write_v1(mount / "other", "100000")  # a sibling's quota is not ours
    write_v1(mount / "app" / "child", "100000")  # nor a child's
    assert host.usable_cpus() == 8
    write_v1(mount, "400000")
    assert host.usable_cpus() == 4


# -- where the hierarchy is mounted ---------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_container_mount_shows_the_cgroup_itself(host: Host, eight_cpus: int, version: str) -> None:
    # A container without a cgroup namespace: /proc/self/cgroup names the host's path, and the
    # mount's root is that very cgroup, so the quota sits in the mount point's own directory.
    cgroup = "/kubepods/burstable/pod-1/ctr-1"
    if version == "v2":
        write_v2(host.v2(cgroup, root=cgroup), "200000 100000")
    else:
        write_v1(host.v1(cgroup, root=cgroup), "200000")
    assert host.usable_cpus() == 2


def test_container_mount_with_a_nested_cgroup(host: Host, eight_cpus: int) -> None:
    # A supervisor inside that container made a cgroup of its own: walk up to the mount point,
    # and not further (the host's ancestors are not mounted).
    mount = host.v2("/docker/ctr-1/worker", root="/docker/ctr-1")
    write_v2(mount / "worker", "max 100000")
    write_v2(mount, "150000 100000")
    assert host.usable_cpus() == 2
    # The host's path joined under the mount point names nothing real: a naive join would read it.
    write_v2(mount / "docker" / "ctr-1" / "worker", "100000 100000")
    assert host.usable_cpus() == 2


def test_mount_of_another_part_of_the_hierarchy_is_skipped(host: Host, eight_cpus: int) -> None:
    # The first cgroup2 mount shows /elsewhere only (a bind mount); the second shows everything.
    host.v2("/app/worker")
    elsewhere = host.mount_dir("/mnt/elsewhere")
    host.mountinfo.append("90 25 0:40 /elsewhere /mnt/elsewhere rw shared:90 - cgroup2 cgroup2 rw")
    host.mountinfo.insert(0, host.mountinfo.pop())
    write_v2(elsewhere, "100000 100000")  # not on our path
    full = host.fs_root / "sys/fs/cgroup"
    write_v2(full / "app", "300000 100000")
    assert host.usable_cpus() == 3


def test_cgroup_outside_the_namespace_is_not_guessed(host: Host, eight_cpus: int) -> None:
    # In a cgroup namespace, a cgroup outside it reads as "/../../x": nothing we can see.
    mount = host.v2("/../../x")
    write_v2(mount, "100000 100000")
    write_v2(host.fs_root / "sys" / "x", "100000 100000")  # what the ".." would reach
    assert host.usable_cpus() == 8


def test_hybrid_host_uses_v1_when_cgroup2_has_no_cpu_controller(
    host: Host, eight_cpus: int
) -> None:
    # As on this machine: cgroup2 at /sys/fs/cgroup/unified without cpu files, cpu bound to v1.
    unified = host.v2("/user.slice/session-1.scope", point="/sys/fs/cgroup/unified")
    (unified / "user.slice/session-1.scope").mkdir(parents=True)
    (unified / "user.slice/session-1.scope/cpu.pressure").write_text("some avg10=0.00\n")
    mount = host.v1("/user.slice/session-1.scope")
    write_v1(mount / "user.slice/session-1.scope", "-1")
    write_v1(mount / "user.slice", "250000")
    assert host.usable_cpus() == 3


def test_v1_needs_the_cpu_controller_itself(host: Host, eight_cpus: int) -> None:
    # cpuacct and cpuset are other controllers, though their names begin with "cpu": neither
    # their /proc/self/cgroup lines nor their mounts (listed first here) may be read for cpu.
    for controllers in ("cpuacct", "cpuset"):
        write_v1(host.v1("/", controllers=controllers, point=f"/sys/fs/cgroup/{controllers}"), "1")
    assert host.usable_cpus() == 8
    mount = host.v1("/")
    write_v1(mount, "-1")
    assert host.usable_cpus() == 8
    write_v1(mount, "100000")
    assert host.usable_cpus() == 1


def test_escaped_mount_point(host: Host, eight_cpus: int) -> None:
    # mountinfo writes a space in a path as \040.
    host.v1(point="/cg\\040root/cpu")
    write_v1(host.fs_root / "cg root" / "cpu", "200000")
    assert host.usable_cpus() == 2


# -- files that cannot be read or parsed: that level, or that file, is ignored, never raised ------


@pytest.mark.parametrize(
    "cpu_max",
    ["garbage", "", "100000", "abc 100000", "0 100000", "-5 100000", "100000 0", "1e5 1e5"],
)
def test_unparsable_v2_level_is_ignored(host: Host, eight_cpus: int, cpu_max: str) -> None:
    mount = host.v2("/app")
    write_v2(mount / "app", cpu_max)
    assert host.usable_cpus() == 8
    write_v2(mount, "200000 100000")  # a readable level elsewhere on the path still counts
    assert host.usable_cpus() == 2


@pytest.mark.parametrize(
    ("quota", "period"), [("lots", "100000"), ("", "100000"), ("100000", "x"), ("100000", "-1")]
)
def test_unparsable_v1_level_is_ignored(
    host: Host, eight_cpus: int, quota: str, period: str
) -> None:
    mount = host.v1("/app")
    write_v1(mount / "app", quota, period)
    assert host.usable_cpus() == 8
    write_v1(mount, "200000")
    assert host.usable_cpus() == 2


def test_missing_v1_period_file_ignores_that_level(host: Host, eight_cpus: int) -> None:
    mount = host.v1("/app")
    write_v1(mount / "app", "100000")
    (mount / "app" / "cpu.cfs_period_us").unlink()
    write_v1(mount, "300000")
    assert host.usable_cpus() == 3


def test_absurd_quota_is_no_limit(host: Host, eight_cpus: int) -> None:
    mount = host.v2("/app")
    write_v2(mount / "app", "1" + "0" * 400 + " 1")  # too large for a float
    assert host.usable_cpus() == 8
    write_v2(mount, "100000 100000")
    assert host.usable_cpus() == 1


def test_malformed_proc_lines_are_skipped(host: Host, eight_cpus: int) -> None:
    write_v1(host.v1("/app") / "app", "200000")
    host.cgroup[:0] = ["", "nonsense", "7:"]
    host.mountinfo[:0] = ["", "1 2 3", "36 25 0:30 / /x rw - cgroup"]
    assert host.usable_cpus() == 2


def test_quota_file_that_is_a_directory(host: Host, eight_cpus: int) -> None:
    mount = host.v2("/app")
    (mount / "app" / "cpu.max").mkdir(parents=True)
    write_v2(mount, "200000 100000")
    assert host.usable_cpus() == 2


@pytest.mark.parametrize("name", ["cgroup", "mountinfo"])
def test_missing_or_binary_proc_file(host: Host, eight_cpus: int, name: str) -> None:
    write_v2(host.v2(), "100000 100000")
    assert host.usable_cpus() == 1
    host.proc_self.mkdir(parents=True, exist_ok=True)
    (host.proc_self / name).unlink()
    assert usable_cpus(proc_self=host.proc_self, fs_root=host.fs_root) == 8
    (host.proc_self / name).write_bytes(b"\xff\xfe\x00garbage")
    assert usable_cpus(proc_self=host.proc_self, fs_root=host.fs_root) == 8


def test_default_arguments_read_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    # settings.py calls usable_cpus() bare: it must look at /proc/self and the real mounts.
    seen: list[Path] = []
    real = cpus._quota

    def spy(proc_self: Path, fs_root: Path) -> float | None:
        seen.extend((proc_self, fs_root))
        return real(proc_self, fs_root)

    monkeypatch.setattr(cpus, "_quota", spy)
    assert 1 <= usable_cpus() <= affinity()
    assert seen == [Path("/proc/self"), Path("/")]


# -- real cgroups: a child process in a nested cgroup whose parent alone has a quota -------------

REPO = Path(__file__).resolve().parent.parent
CHILD = """\
import sys
sys.stdin.readline()  # wait until the test has moved this process into its cgroup
import service.cpus
print(service.cpus.__file__)
print(service.cpus.usable_cpus())
"""


def cgroup_mounts(fstype: str) -> list[tuple[Path, str, set[str]]]:
    """(mount point, mount options, super options) of this host's mounts of ``fstype``."""
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        dash = fields.index("-")
        if fields[dash + 1] == fstype and fields[3] == "/":
            options = set(fields[dash + 3].split(","))
            mounts.append((Path(fields[4]), fields[5], options))
    return mounts


def require_real_cgroups() -> None:
    if os.geteuid() != 0:
        pytest.skip("real cgroup tests need root to create cgroups and move a process")
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("a 1-CPU quota is only visible with at least 2 CPUs in the affinity mask")


@contextlib.contextmanager
def nested_cgroup(mount: Path) -> Iterator[tuple[Path, Path]]:
    """A fresh <mount>/hutch-test-<uuid>/inner, removed afterwards (inner first)."""
    outer = mount / f"hutch-test-{uuid.uuid4().hex}"
    try:
        outer.mkdir()
    except OSError as error:
        pytest.skip(f"cannot create a cgroup under {mount}: {error}")
    inner = outer / "inner"
    try:
        inner.mkdir()
        yield outer, inner
    finally:
        for directory in (inner, outer):
            remove_cgroup(directory)


def remove_cgroup(directory: Path) -> None:
    # The child is reaped before this runs, but the kernel may take a moment to empty the cgroup.
    deadline = time.monotonic() + 5
    while directory.exists():
        try:
            directory.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def usable_cpus_of_child_in(cgroup: Path) -> tuple[str, str, int]:
    """Start a Python child, move it into ``cgroup``, return its /proc cgroup, module, answer."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        (cgroup / "cgroup.procs").write_text(f"{child.pid}\n")
        membership = Path(f"/proc/{child.pid}/cgroup").read_text()
        out, err = child.communicate("\n", timeout=60)
    finally:
        if child.poll() is None:
            child.kill()  # only our own child, by its pid
        child.wait()
    assert child.returncode == 0, err
    module, answer = out.split()
    return membership, module, int(answer)


def test_real_v1_quota_on_the_parent_cgroup() -> None:
    # On a hybrid host the child is also in a cgroup2 hierarchy (without cpu): v1 must still win.
    require_real_cgroups()
    mounts = [m for m in cgroup_mounts("cgroup") if "cpu" in m[2]]
    if not mounts:
        pytest.skip("no cgroup v1 hierarchy with the cpu controller is mounted")
    mount, mount_options, _ = mounts[0]
    if "rw" not in mount_options.split(","):
        pytest.skip(f"the cgroup v1 cpu hierarchy at {mount} is mounted read-only")
    with nested_cgroup(mount) as (outer, inner):
        (outer / "cpu.cfs_period_us").write_text("100000\n")
        (outer / "cpu.cfs_quota_us").write_text("100000\n")  # 1 CPU, on the outer cgroup only
        # The leaf says "no quota": reading only the process's own cgroup would see 2 CPUs.
        assert (inner / "cpu.cfs_quota_us").read_text().strip() == "-1"
        membership, module, answer = usable_cpus_of_child_in(inner)
    cpu_lines = [line.split(":", 2) for line in membership.splitlines()]
    assert [path for _, controllers, path in cpu_lines if "cpu" in controllers.split(",")] == [
        f"/{outer.name}/inner"
    ]
    assert Path(module) == REPO / "service" / "cpus.py"
    assert answer == 1


def delegates_cpu(mount: Path) -> bool:
    try:
        return "cpu" in (mount / "cgroup.subtree_control").read_text().split()
    except OSError:
        return False


def test_real_v2_quota_on_the_parent_cgroup() -> None:
    require_real_cgroups()
    # A new child cgroup only has cpu.max if its parent already delegates cpu: we never enable
    # controllers (nor remount anything) on the host. On a hybrid host like the development one
    # cpu is bound to v1, so cgroup2 has no cpu controller and the fake-tree tests above cover v2.
    mounts = [
        mount
        for mount, mount_options, _ in cgroup_mounts("cgroup2")
        if "rw" in mount_options.split(",") and delegates_cpu(mount)
    ]
    if not mounts:
        pytest.skip("no writable cgroup2 hierarchy delegates the cpu controller to new cgroups")
    with nested_cgroup(mounts[0]) as (outer, inner):
        (outer / "cpu.max").write_text("100000 100000\n")  # 1 CPU, on the outer cgroup only
        # outer does not delegate cpu further, so the leaf has no cpu.max of its own at all.
        assert not (inner / "cpu.max").exists()
        membership, module, answer = usable_cpus_of_child_in(inner)
    assert f"0::/{outer.name}/inner" in membership.splitlines()
    assert Path(module) == REPO / "service" / "cpus.py"
    assert answer == 1
