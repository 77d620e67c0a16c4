"""A three-node RabbitMQ cluster for tests: started once per session by ``scripts/cluster``.

The cluster (hutch1..3@localhost, AMQP 5681-5683) is private to the test session and never
touches the default node the rest of the suite uses. It starts on first use (about 25 s) and is
stopped by ``scripts/cluster stop`` (by the nodes' own pids) when the session ends. Without
root (the nodes run as the ``rabbitmq`` user) or with HUTCH_TEST_NO_CLUSTER=1 the tests that
need it are skipped, saying why.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "scripts" / "cluster"
PREFIX = os.environ.get("HUTCH_CLUSTER_NAME", "hutch")  # as scripts/cluster reads them
NODES = tuple(f"{PREFIX}{n}" for n in (1, 2, 3))
PORTS = {
    name: int(os.environ.get("HUTCH_CLUSTER_PORT", "5681")) + i for i, name in enumerate(NODES)
}
STATE = Path(os.environ.get("HUTCH_CLUSTER_DIR", "/tmp/hutch-cluster"))


def cluster_script(*args: str, timeout: float = 180) -> str:
    result = subprocess.run(
        [str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"scripts/cluster {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def ctl(node: str, *args: str, timeout: float = 60) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", "-n", f"{node}@localhost", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"rabbitmqctl -n {node} {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def node_pid(node: str) -> int | None:
    try:
        pid = int((STATE / node / "pid").read_text())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


@dataclass
class Cluster:
    """The running cluster: which nodes are up, and restoring all three after a test."""

    def up(self) -> list[str]:
        return [n for n in NODES if node_pid(n) is not None]

    def any_up(self) -> str:
        for node in self.up():
            try:
                ctl(node, "await_startup", timeout=20)
                return node
            except (RuntimeError, subprocess.TimeoutExpired):
                continue
        raise RuntimeError("no cluster node answers")

    def running(self) -> list[str]:
        """Nodes that the cluster reports running (the view of a node that answers)."""
        out = ctl(self.any_up(), "cluster_status", "--formatter", "json")
        return sorted(n.split("@")[0] for n in json.loads(out).get("running_nodes", []))

    def restore(self) -> None:
        """Every node running and joined again: heal, start what is down, wait for all."""
        cluster_script("heal")
        for node in NODES:
            if node_pid(node) is None:
                cluster_script("start-node", node)
        for node in NODES:
            ctl(node, "await_startup", timeout=90)


@dataclass
class ClusterVhost:
    """A throwaway vhost on the cluster, and the three nodes' URLs for it."""

    name: str

    def urls(self, *nodes: str) -> list[str]:
        return [f"amqp://guest:guest@127.0.0.1:{PORTS[n]}/{self.name}" for n in nodes or NODES]

    def url_list(self) -> str:
        return ",".join(self.urls())

    def connections(self) -> dict[int, str]:
        """Worker or client pid -> the node its connection is on (by the port it reached)."""
        node_of = {port: node for node, port in PORTS.items()}
        out = ctl(
            Cluster().any_up(),
            "list_connections",
            "--no-table-headers",
            "vhost",
            "port",
            "client_properties",
            timeout=20,
        )
        found: dict[int, str] = {}
        for line in out.splitlines():
            vhost, port, properties = [*line.split("\t"), "", ""][:3]
            if vhost != self.name or " pid " not in properties or not port.isdigit():
                continue
            pid = properties.split(" pid ")[1].split()[0]
            if pid.isdigit() and int(port) in node_of:
                found[int(pid)] = node_of[int(port)]
        return found

    def leader(self, queue: str) -> str:
        out = ctl(
            Cluster().any_up(),
            "list_queues",
            "--no-table-headers",
            "-p",
            self.name,
            "name",
            "leader",
        )
        for line in out.splitlines():
            name, _, leader = line.partition("\t")
            if name == queue:
                return leader.strip().split("@")[0]
        raise KeyError(queue)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.environ.get("HUTCH_TEST_NO_CLUSTER") == "1":
        pytest.skip("HUTCH_TEST_NO_CLUSTER=1")
    if os.geteuid() != 0:
        pytest.skip("the cluster's nodes run as the rabbitmq user: needs root")
    cluster_script("start")
    try:
        yield Cluster()
    finally:
        cluster_script("stop")


@pytest.fixture
def cluster_vhost(cluster: Cluster) -> Iterator[ClusterVhost]:
    cluster.restore()
    vhost = ClusterVhost(f"hutch-cluster-{uuid.uuid4().hex[:10]}")
    node = cluster.any_up()
    ctl(node, "add_vhost", vhost.name)
    ctl(node, "set_permissions", "-p", vhost.name, "guest", ".*", ".*", ".*")
    try:
        yield vhost
    finally:
        cluster.restore()
        ctl(cluster.any_up(), "delete_vhost", vhost.name)
