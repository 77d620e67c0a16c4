"""scripts/cluster: the private cluster forms, loses and regains nodes, partitions and heals,
and never touches the default node the rest of the suite uses."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

from tests.cluster import NODES, Cluster, cluster_script, ctl, node_pid

ONE, TWO, THREE = NODES


def default_node_pid() -> str:
    return subprocess.run(
        ["rabbitmqctl", "-q", "eval", "os:getpid()."],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def test_nodes_stop_start_die_and_rejoin(cluster: Cluster) -> None:
    before = default_node_pid()
    cluster.restore()
    assert cluster.running() == list(NODES)
    status = cluster_script("status")
    assert status.count("sees: " + ", ".join(f"{n}@localhost" for n in NODES)) == 3

    old = node_pid(THREE)
    cluster_script("stop-node", THREE)
    assert node_pid(THREE) is None
    assert wait_for(lambda: cluster.running() == [ONE, TWO], 30)
    cluster_script("start-node", THREE)
    assert node_pid(THREE) not in (None, old)
    assert wait_for(lambda: cluster.running() == list(NODES), 30)

    cluster_script("kill", TWO)
    assert node_pid(TWO) is None
    cluster_script("start-node", TWO)
    assert wait_for(lambda: cluster.running() == list(NODES), 60)
    assert default_node_pid() == before


def test_a_partitioned_node_is_cut_off_until_healed(cluster: Cluster) -> None:
    cluster.restore()
    cluster_script("partition", THREE)
    try:
        # The majority no longer sees it; it still runs (its VM is up), paused by
        # pause_minority, and answers nobody with the shared cookie.
        assert wait_for(lambda: f"{THREE}@localhost" not in ctl(ONE, "eval", "nodes()."), 20)
        assert node_pid(THREE) is not None
    finally:
        cluster_script("heal")
    assert wait_for(lambda: cluster.running() == list(NODES), 60)
