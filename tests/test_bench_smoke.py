"""Smoke test of the benchmark suite: ``bench/run.py --quick`` runs end to end and writes JSON.

Figures are never asserted (the machine is shared and noisy): only that the run exits 0 and
that every workload reports positive numbers (CPU time per task only non-negative: /proc counts
it in 10 ms ticks, and a quick drain of a few hundred no-ops can take less than one).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("noop_drain", "cpu_5ms", "cpu_0_5ms", "roundtrip", "publish", "memory")


def test_quick_bench_runs_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--repeat", "1"]
    result = subprocess.run(
        [*command, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard, not a timing assertion
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    data = json.loads(out.read_text())
    for name in WORKLOADS:
        workload = data["workloads"][name]
        assert "error" not in workload, workload.get("traceback")
        assert workload["metrics"], name
        for key, metric in workload["metrics"].items():
            assert metric["hutch"] is not None, (name, key)
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
