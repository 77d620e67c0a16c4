"""The benchmark suite: options, the order of the workloads, the environment, the JSON file.

Which runs each workload compares is in `bench.compare`, the table in `bench.report`.
See bench/README.md. Entry point: ``.venv/bin/python bench/run.py [--quick] [--repeat N]
[--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

from bench import bodies, compare, peer_workloads, workloads
from bench import profile as bench_profile
from bench.compare import say, show_drain
from bench.harness import ROOT, BenchError, Profiler, finish_deletions, loadavg, rabbitmqctl
from bench.peer_workloads import PEERS
from bench.report import Metric, table, table_rows
from bench.workloads import NOOP, Config

WORKLOADS = (
    "noop_drain", "startup", "cpu_5ms", "cpu_0_5ms", "roundtrip", "publish", "delayed", "memory",
    "flow_chain", "flow_fanin", "flows",
)  # fmt: skip


# -- environment probes, the order of runs, the CLI -----------------------------------------


def find_py_spy(given: str | None) -> str:
    candidates = (
        [given] if given else [shutil.which("py-spy"), str(Path(sys.executable).parent / "py-spy")]
    )
    for exe in candidates:
        if exe and Path(exe).exists():
            return exe
    raise BenchError("py-spy not found: pip install py-spy, or pass --py-spy PATH")


async def profile_drain(cfg: Config, opts: argparse.Namespace) -> dict[str, Any]:
    """One extra hutch no-op drain (not counted) with py-spy on the worker's parent process."""
    path = Path(opts.profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    profiler = Profiler(
        find_py_spy(opts.py_spy), path, rate=opts.profile_rate, native=opts.profile_native
    )
    say(f"profile: an extra hutch no-op drain of {cfg.noop_tasks} with py-spy (not counted):")
    result = await workloads.drain(cfg, "hutch", NOOP, [], cfg.noop_tasks, profiler)
    say(f"  {show_drain(result)}")
    found = bench_profile.summarize(path, top=15)
    say("  " + bench_profile.render(found).replace("\n", "\n  "))
    say(f"  folded stacks in {path}")
    return {"path": str(path), "run": result, "summary": found}


def config(opts: argparse.Namespace, iters_per_ms: float, peers: dict[str, str | None]) -> Config:
    if opts.quick:
        noop, cpu_n, calls, warmup, submits = 300, 200, 100, 10, 300
        flow_calls, concurrent_flows = 20, 50
    else:
        noop, cpu_n, calls, warmup, submits = 20_000, 2_000, 500, 20, 20_000
        flow_calls, concurrent_flows = 300, 1000
    return Config(
        quick=opts.quick,
        repeat=opts.repeat,
        concurrency=opts.concurrency,
        noop_tasks=noop,
        cpu_tasks=cpu_n,
        calls=calls,
        call_warmup=warmup,
        submits=submits,
        window=1000,
        # prefetch 1000 would take a quick run's whole queue in one burst
        bare_prefetch=min(1000, max(1, noop // 10)),
        poll=opts.poll,
        iters_per_ms=iters_per_ms,
        # a start-up is one short sample: more of them, still alternating
        startup_rounds=opts.repeat * (1 if opts.quick else 3),
        flow_calls=flow_calls,
        concurrent_flows=concurrent_flows,
        peers=peers,
    )


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _compile_bytecode() -> None:
    """Write the bytecode of ``service/`` and ``bench/``, as ``pip install`` does for an
    installed package (and the image does, docs/deploy.md).

    An editable checkout run with ``PYTHONDONTWRITEBYTECODE`` (this machine sets it) would
    otherwise compile every hutch module from source in the worker and in each pool child at
    every start, about 70 ms per process that no installed hutch pays, while the bare consumer
    and the peers load their installed packages' bytecode.
    """
    for package in ("service", "bench"):
        compileall.compile_dir(ROOT / package, quiet=1)


def _measure_spin(iterations: int, runs: int = 20) -> float:
    """Median wall time of ``spin(iterations)`` in this process, in ms."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        bodies.spin(iterations)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


async def run(opts: argparse.Namespace) -> int:
    selected = [w.strip() for w in opts.only.split(",")] if opts.only else list(WORKLOADS)
    unknown = set(selected) - set(WORKLOADS)
    if unknown:
        say(f"unknown workload(s): {', '.join(sorted(unknown))}; choose from {WORKLOADS}")
        return 2
    started = time.perf_counter()
    version = asyncio.ensure_future(rabbitmqctl("version", check=False))  # runs meanwhile
    _compile_bytecode()
    iters_per_ms = bodies.calibrate()
    described = (
        [await peer_workloads.describe(p, opts.concurrency) for p in PEERS] if opts.peers else []
    )
    peers = {d["peer_name"]: d.get("error") for d in described}
    cfg = config(opts, iters_per_ms, peers)
    rabbit = (await version).strip()
    meta: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(_git("status", "--porcelain", "--", "service")),
        "python": platform.python_version(),
        "rabbitmq": rabbit,
        "cpus": os.cpu_count(),
        "loadavg_start": loadavg(),
        "config": cfg.__dict__,
        "peers": described,
        "spin_iterations_per_ms": iters_per_ms,
        "spin_ms_measured": {
            "5": _measure_spin(cfg.spin_iterations(5)),
            "0.5": _measure_spin(cfg.spin_iterations(0.5)),
        },
    }
    say(
        f"hutch benchmarks{' (quick)' if cfg.quick else ''}: {', '.join(selected)}; "
        f"{cfg.repeat} run(s) each, concurrency {cfg.concurrency}, RabbitMQ {rabbit}, "
        f"{os.cpu_count()} CPUs, load {meta['loadavg_start']:.2f}"
    )
    say(
        f"spin: {iters_per_ms:,.0f} iterations/ms (5 ms task measured "
        f"{meta['spin_ms_measured']['5']:.2f} ms, 0.5 ms task "
        f"{meta['spin_ms_measured']['0.5']:.3f} ms)"
    )
    for line in peer_lines(described):
        say(line)
    try:
        return await run_workloads(cfg, opts, selected, meta, started)
    finally:
        await finish_deletions()


async def run_workloads(
    cfg: Config,
    opts: argparse.Namespace,
    selected: list[str],
    meta: dict[str, Any],
    started: float,
) -> int:
    plan: dict[str, Callable[[], Awaitable[tuple[list[Metric], dict[str, Any]]]]] = {
        "noop_drain": lambda: compare.noop_drain(cfg),
        "cpu_5ms": lambda: compare.cpu(cfg, 5.0, "cpu_5ms", 0.97),
        "startup": lambda: compare.startup(cfg),
        "cpu_0_5ms": lambda: compare.cpu(cfg, 0.5, "cpu_0_5ms", 0.9),
        "roundtrip": lambda: compare.roundtrip(cfg),
        "publish": lambda: compare.publish(cfg),
        "delayed": lambda: compare.delayed(cfg),
        "memory": lambda: compare.footprint(cfg),
        "flow_chain": lambda: compare.flow_chain(cfg),
        "flow_fanin": lambda: compare.flow_fanin(cfg),
        "flows": lambda: compare.flows(cfg),
    }
    metrics: list[Metric] = []
    output: dict[str, Any] = {"meta": meta, "workloads": {}}
    failed = []
    for name in selected:
        say(f"{name}:")
        try:
            rows, raw = await plan[name]()
        except Exception as exc:  # one broken workload must not lose the others' figures
            failed.append(name)
            say(f"  {name} FAILED: {exc}")
            output["workloads"][name] = {"error": str(exc), "traceback": traceback.format_exc()}
            continue
        metrics.extend(rows)
        output["workloads"][name] = {
            "metrics": {m.name: m.to_json() for m in rows},
            "runs": raw,
        }
    if opts.profile:
        try:
            output["profile"] = await profile_drain(cfg, opts)
        except Exception as exc:
            failed.append("profile")
            say(f"  profile FAILED: {exc}")
            output["profile"] = {"error": str(exc)}
    meta["loadavg_end"] = loadavg()
    meta["duration_s"] = time.perf_counter() - started
    output["table"] = table_rows(metrics)

    say("")
    say(table([m for m in metrics if m.group == "baselines"]))
    say("")
    say(
        "medians of the runs (min-max); ratio = hutch / baseline per pair of runs (A B A B ...), "
        "median (min-max); verdicts use the medians"
    )
    if meta["peers"]:
        say("")
        say("peers (ratio = hutch / peer, pair by pair, same alternation):")
        say(table([m for m in metrics if m.group == "peers"], baseline="peer"))
        for line in peer_lines(meta["peers"]):
            say(line)
    path = Path(opts.json) if opts.json else default_json_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(output, indent=2, default=str) + "\n")
    say(f"results written to {path} ({meta['duration_s']:.0f}s in all)")
    if failed:
        say(f"FAILED workloads: {', '.join(failed)}")
        return 1
    return 0


def peer_lines(described: list[dict[str, Any]]) -> list[str]:
    """Each peer's configuration as printed with the figures."""
    lines = []
    for d in described:
        name = d["peer_name"]
        if "error" in d:
            lines.append(f"peer {name}: cannot run: {d['error']}")
            continue
        versions = ", ".join(f"{k} {v}" for k, v in d["versions"].items())
        settings = ", ".join(f"{k}={v}" for k, v in d["settings"].items())
        lines.append(f"peer {name} ({versions}): {d['worker_command']}")
        lines.append(f"  queue {d['queue']}; results: {d['result_backend']}")
        lines.append(f"  settings: {settings}")
    return lines


def default_json_path() -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return ROOT / "bench" / "results" / f"bench-{stamp}.json"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py", description="hutch benchmarks against bare baselines (see README)."
    )
    parser.add_argument("--quick", action="store_true", help="a few hundred messages per workload")
    parser.add_argument("--repeat", type=int, default=3, help="runs per workload (default 3)")
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="where to write results (default: bench/results/bench-TIMESTAMP.json)",
    )
    parser.add_argument(
        "--only", metavar="W[,W...]", help=f"run only these workloads: {', '.join(WORKLOADS)}"
    )
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="after the suite, run one more hutch no-op drain under py-spy; folded stacks to PATH",
    )
    parser.add_argument("--py-spy", metavar="EXE", help="py-spy executable (default: on PATH)")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples/s")
    parser.add_argument(
        "--profile-native", action="store_true", help="py-spy --native (C frames too)"
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also run noop_drain, startup, cpu_* and roundtrip through Celery and Dramatiq",
    )
    parser.add_argument("--concurrency", type=int, default=2, help="hutch children and Pool size")
    parser.add_argument(
        "--poll",
        type=float,
        default=0.005,
        help="shortest interval between ready-count polls in drains (default 0.005 s)",
    )
    opts = parser.parse_args(argv)
    if opts.repeat < 1:
        parser.error("--repeat must be at least 1")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse(argv)
    try:
        return uvloop.run(run(opts))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
