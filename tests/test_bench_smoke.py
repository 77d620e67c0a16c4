"""Smoke test of the benchmark suite: ``bench/run.py --quick`` runs end to end and writes JSON.

Figures are never asserted (the machine is shared and noisy): only that the run exits 0 and
that every workload reports positive numbers (CPU time per task only non-negative: /proc counts
it in 10 ms ticks, and a quick drain of a few hundred no-ops can take less than one). The second
test runs two workloads with the peers (Celery, Dramatiq) when the 'bench' extra is installed.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = (
    "noop_drain", "startup", "cpu_5ms", "cpu_0_5ms", "roundtrip", "publish", "delayed", "memory",
    "flow_chain", "flow_fanin", "flows",
)  # fmt: skip
PEERS = ("Celery", "Dramatiq")
NO_REDIS = shutil.which("redis-server") is None


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--repeat", "1", *args]
    result = subprocess.run(
        [*command, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a timing assertion
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def check_positive(data: dict[str, Any], workloads: tuple[str, ...]) -> None:
    for name in workloads:
        workload = data["workloads"][name]
        assert "error" not in workload, workload.get("traceback")
        assert workload["metrics"], name
        for key, metric in workload["metrics"].items():
            assert metric["hutch"] is not None, (name, key)
            missing = metric["baseline_missing"]
            # Dramatiq's round trip is skipped, with a note, where redis-server is not installed
            assert missing is None or (NO_REDIS and "redis-server" in missing), (name, key, missing)
            cpu = key.endswith("cpu_us_per_task")
            for side in ("hutch", "baseline"):
                if metric[side] is not None:
                    assert metric[side]["runs"], (name, key, side)
                    if cpu:
                        assert all(v >= 0 for v in metric[side]["runs"]), (name, key, side)
                    else:
                        assert all(v > 0 for v in metric[side]["runs"]), (name, key, side, metric)
            if metric["ratio"] is not None and not cpu:
                assert metric["ratio"] > 0, (name, key, metric)


def test_quick_bench_runs_every_workload(tmp_path: Path) -> None:
    data = run_bench(tmp_path)
    check_positive(data, WORKLOADS)


@pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("celery", "dramatiq")),
    reason="the peers need the 'bench' extra: pip install -e '.[bench]'",
)
def test_quick_bench_runs_with_the_peers(tmp_path: Path) -> None:
    data = run_bench(tmp_path, "--peers", "--only", "noop_drain,roundtrip")
    check_positive(data, ("noop_drain", "roundtrip"))
    assert [p["peer_name"] for p in data["meta"]["peers"]] == list(PEERS)
    for peer in data["meta"]["peers"]:
        assert "error" not in peer, peer
        assert peer["settings"] and peer["worker_command"], peer
    for name in ("noop_drain", "roundtrip"):
        compared = {
            m["baseline_label"]
            for m in data["workloads"][name]["metrics"].values()
            if m["group"] == "peers"
        }
        assert compared == set(PEERS), (name, compared)
