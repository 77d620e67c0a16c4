"""The benchmark suite: run every workload against its baseline, print a table, write JSON.

See bench/README.md. Entry point: ``.venv/bin/python bench/run.py [--quick] [--repeat N]
[--json PATH]``.
"""

from __future__ import annotations

import argparse
import asyncio
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop

from bench import profile as bench_profile
from bench import tasks, workloads
from bench.harness import ROOT, BenchError, Profiler, finish_deletions, loadavg, rabbitmqctl
from bench.workloads import NOOP, SPIN, Config

WORKLOADS = ("noop_drain", "cpu_5ms", "cpu_0_5ms", "roundtrip", "publish", "memory")


# -- figures -----------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "runs": values,
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


@dataclass
class Metric:
    """One row of the final table: hutch's figure, its baseline's, and the target."""

    workload: str
    name: str
    label: str
    unit: str
    hutch: list[float]
    baseline: list[float] | None = None
    baseline_label: str = ""
    target: tuple[str, float] | None = None  # ("ratio>=" | "ratio<=" | "max", value)

    def ratios(self) -> list[float]:
        if not self.baseline:
            return []
        return [h / b for h, b in zip(self.hutch, self.baseline, strict=False) if b > 0]

    def verdict(self) -> str:
        if self.target is None or not self.hutch:
            return "info"
        kind, value = self.target
        if kind == "max":
            return "PASS" if statistics.median(self.hutch) <= value else "MISS"
        ratios = self.ratios()
        if not ratios:
            return "n/a"
        ratio = statistics.median(ratios)
        ok = ratio >= value if kind == "ratio>=" else ratio <= value
        return "PASS" if ok else "MISS"

    def target_text(self) -> str:
        if self.target is None:
            return "-"
        kind, value = self.target
        if kind == "max":
            return f"<= {value:g} {self.unit}"
        return f"{'>=' if kind == 'ratio>=' else '<='} {value:g}x"

    def to_json(self) -> dict[str, Any]:
        ratios = self.ratios()
        return {
            "label": self.label,
            "unit": self.unit,
            "hutch": summary(self.hutch) if self.hutch else None,
            "baseline": summary(self.baseline) if self.baseline else None,
            "baseline_label": self.baseline_label,
            "ratios": ratios,
            "ratio": statistics.median(ratios) if ratios else None,
            "target": self.target_text(),
            "verdict": self.verdict(),
        }


def fmt(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_range(values: list[float] | None) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def table(metrics: list[Metric]) -> str:
    header = ("workload", "hutch", "baseline", "ratio", "target", "verdict")
    rows = [header]
    for m in metrics:
        ratios = m.ratios()
        rows.append(
            (
                f"{m.label} [{m.unit}]",
                fmt_range(m.hutch),
                (f"{fmt_range(m.baseline)} {m.baseline_label}" if m.baseline else "-"),
                fmt_range(ratios) if ratios else "-",
                m.target_text(),
                m.verdict(),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# -- running -----------------------------------------------------------------------------------


def say(text: str) -> None:
    print(text, flush=True)


async def alternate(
    name: str,
    repeat: int,
    runs: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]],
    show: Callable[[dict[str, Any]], str],
) -> dict[str, list[dict[str, Any]]]:
    """Run each (label, run) in turn, ``repeat`` rounds: A B A B ... so noise hits both."""
    results: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in runs}
    for i in range(repeat):
        for label, run in runs:
            started = time.perf_counter()
            result = await run()
            results[label].append(result)
            say(
                f"  {name:<11} {label:<13} {i + 1}/{repeat}: {show(result)}"
                f"  [{time.perf_counter() - started:.1f}s, load {result.get('loadavg', -1):.2f}]"
            )
    return results


def _per_s(result: dict[str, Any]) -> str:
    text = f"{result['per_s']:,.0f} tasks/s in {result['seconds']:.3f}s"
    if "parent_cpu_s" in result:
        text += (
            f"; CPU/task: parent {result['parent_cpu_us_per_task']:.0f} us, "
            f"children {result['children_cpu_us_per_task']:.0f} us"
        )
        if "broker_cpu_us_per_task" in result:
            text += f", broker {result['broker_cpu_us_per_task']:.0f} us"
    return text


def _drain_show(result: dict[str, Any]) -> str:
    return (
        f"{_per_s(result)} (steady {result['steady_per_s']:,.0f}/s, "
        f"rabbitmqctl all-acked after {result['ack_confirm_s']:.1f}s)"
    )


def _latency_show(result: dict[str, Any]) -> str:
    return f"p50 {result['p50_ms']:.2f} p95 {result['p95_ms']:.2f} p99 {result['p99_ms']:.2f} ms"


def _memory_show(result: dict[str, Any]) -> str:
    rest, after = result["rest"], result["after"]
    children = ", ".join(f"{c:.1f}" for c in after["children_rss_mb"]) or "none"
    return (
        f"parent RSS {rest['parent_rss_mb']:.1f} -> {after['parent_rss_mb']:.1f} MB, "
        f"children {children} MB"
    )


def values(results: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in results]


async def noop_drain(cfg: Config) -> tuple[list[Metric], dict[str, Any]]:
    n = cfg.noop_tasks
    matched = f"hutch pf {cfg.bare_prefetch}"
    runs: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
        ("hutch", lambda: workloads.drain(cfg, "hutch", NOOP, [], n)),
        ("bare consumer", lambda: workloads.drain(cfg, "bare", NOOP, [], n)),
    ]
    if not cfg.quick:  # diagnostic only: hutch with the bare consumer's prefetch
        runs.append((matched, lambda: workloads.drain(cfg, "hutch-prefetch", NOOP, [], n)))
    r = await alternate("noop_drain", cfg.repeat, runs, _drain_show)
    h, b = r["hutch"], r["bare consumer"]
    bare = f"bare prefetch {cfg.bare_prefetch}"
    rows = [
        Metric(
            "noop_drain",
            "tasks_per_s",
            f"no-op drain, {n} tasks",
            "tasks/s",
            values(h, "per_s"),
            values(b, "per_s"),
            bare,
            ("ratio>=", 0.8),
        ),
        Metric(
            "noop_drain",
            "steady_tasks_per_s",
            "  same, steady state 90%->10%",
            "tasks/s",
            values(h, "steady_per_s"),
            values(b, "steady_per_s"),
            bare,
        ),
        Metric(
            "noop_drain",
            "parent_cpu_us_per_task",
            "  consumer process CPU per task",
            "us",
            values(h, "parent_cpu_us_per_task"),
            values(b, "parent_cpu_us_per_task"),
            bare,
        ),
    ]
    if matched in r:
        rows.append(
            Metric(
                "noop_drain",
                "prefetch_matched_tasks_per_s",
                f"  hutch --prefetch-buffer {cfg.bare_prefetch - cfg.concurrency}",
                "tasks/s",
                values(r[matched], "per_s"),
                values(b, "per_s"),
                bare,
            )
        )
    return rows, r


async def cpu(
    cfg: Config, ms: float, key: str, target: float
) -> tuple[list[Metric], dict[str, Any]]:
    n = cfg.cpu_tasks
    iterations = cfg.spin_iterations(ms)
    runs: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
        ("hutch", lambda: workloads.drain(cfg, "hutch", SPIN, [iterations], n)),
        ("Pool", lambda: workloads.pool(cfg, ms)),
    ]
    if not cfg.quick:  # diagnostic only: hutch's pool without the broker
        runs.append(("hutch pool", lambda: workloads.hutch_pool(cfg, SPIN, [iterations], n)))
    r = await alternate(key, cfg.repeat, runs, _per_s)
    h, p = r["hutch"], r["Pool"]
    rows = [
        Metric(
            key,
            "tasks_per_s",
            f"CPU {ms:g} ms x {n}",
            "tasks/s",
            values(h, "per_s"),
            values(p, "per_s"),
            f"Pool({cfg.concurrency})",
            ("ratio>=", target),
        )
    ]
    if "hutch pool" in r:
        rows.append(
            Metric(
                key,
                "pool_only_tasks_per_s",
                "  hutch's pool alone, no broker",
                "tasks/s",
                values(r["hutch pool"], "per_s"),
                values(p, "per_s"),
                f"Pool({cfg.concurrency})",
            )
        )
    return rows, {**r, "iterations": iterations}


async def roundtrip(cfg: Config) -> tuple[list[Metric], dict[str, Any]]:
    kinds = ["hutch", "bare"] if cfg.quick else ["hutch", "bare", "bare-confirm"]

    def one(kind: str) -> Callable[[], Awaitable[dict[str, Any]]]:
        return lambda: workloads.roundtrip(cfg, kind)

    r = await alternate(
        "roundtrip", cfg.repeat, [(kind, one(kind)) for kind in kinds], _latency_show
    )
    h, b = r["hutch"], r["bare"]
    label = f"call noop x {cfg.calls}"
    extra = []
    if "bare-confirm" in r:
        extra.append(
            Metric(
                "roundtrip",
                "p50_ms_vs_confirmed",
                "  p50 vs bare w/ confirmed replies",
                "ms",
                values(h, "p50_ms"),
                values(r["bare-confirm"], "p50_ms"),
                "bare-confirm",
            )
        )
    return [
        Metric(
            "roundtrip",
            "p50_ms",
            f"{label}: p50",
            "ms",
            values(h, "p50_ms"),
            values(b, "p50_ms"),
            "bare",
            ("ratio<=", 1.2),
        ),
        Metric(
            "roundtrip", "p95_ms", "  p95", "ms", values(h, "p95_ms"), values(b, "p95_ms"), "bare"
        ),
        Metric(
            "roundtrip",
            "p99_ms",
            "  p99",
            "ms",
            values(h, "p99_ms"),
            values(b, "p99_ms"),
            "bare",
            ("max", 10.0),
        ),
        *extra,
    ], r


async def publish(cfg: Config) -> tuple[list[Metric], dict[str, Any]]:
    r = await alternate(
        "publish",
        cfg.repeat,
        [
            ("hutch", lambda: workloads.publish(cfg, "hutch")),
            ("bare", lambda: workloads.publish(cfg, "bare")),
        ],
        _per_s,
    )
    return [
        Metric(
            "publish",
            "tasks_per_s",
            f"submit x {cfg.submits}, {cfg.window} in flight",
            "tasks/s",
            values(r["hutch"], "per_s"),
            values(r["bare"], "per_s"),
            "bare confirmed",
            ("ratio>=", 0.8),
        )
    ], r


async def footprint(cfg: Config) -> tuple[list[Metric], dict[str, Any]]:
    r = await alternate(
        "memory",
        cfg.repeat,
        [
            ("hutch", lambda: workloads.footprint(cfg, "hutch")),
            ("bare consumer", lambda: workloads.footprint(cfg, "bare")),
        ],
        _memory_show,
    )
    h, b = r["hutch"], r["bare consumer"]

    def get(results: list[dict[str, Any]], when: str, key: str) -> list[float]:
        return [float(x[when][key]) for x in results]

    def child(results: list[dict[str, Any]], when: str) -> list[float]:
        return [max(x[when]["children_rss_mb"], default=0.0) for x in results]

    return [
        Metric(
            "memory",
            "parent_rss_rest_mb",
            "parent RSS at rest",
            "MB",
            get(h, "rest", "parent_rss_mb"),
            get(b, "rest", "parent_rss_mb"),
            "bare consumer",
        ),
        Metric(
            "memory",
            "parent_rss_after_mb",
            f"parent RSS after {cfg.noop_tasks} no-ops",
            "MB",
            get(h, "after", "parent_rss_mb"),
            get(b, "after", "parent_rss_mb"),
            "bare consumer",
            ("max", 60.0),
        ),
        Metric(
            "memory",
            "parent_hwm_mb",
            "  parent peak RSS (VmHWM)",
            "MB",
            get(h, "after", "parent_hwm_mb"),
            get(b, "after", "parent_hwm_mb"),
            "bare consumer",
        ),
        Metric(
            "memory", "child_rss_rest_mb", "child RSS at rest (largest)", "MB", child(h, "rest")
        ),
        Metric(
            "memory", "child_rss_after_mb", "child RSS after (largest)", "MB", child(h, "after")
        ),
    ], r


# -- main --------------------------------------------------------------------------------------


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
    say(f"  {_drain_show(result)}")
    found = bench_profile.summarize(path, top=15)
    say("  " + bench_profile.render(found).replace("\n", "\n  "))
    say(f"  folded stacks in {path}")
    return {"path": str(path), "run": result, "summary": found}


def config(opts: argparse.Namespace, iters_per_ms: float) -> Config:
    if opts.quick:
        noop, cpu_n, calls, warmup, submits = 300, 200, 100, 10, 300
    else:
        noop, cpu_n, calls, warmup, submits = 20_000, 2_000, 500, 20, 20_000
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
    )


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _measure_spin(iterations: int, runs: int = 20) -> float:
    """Median wall time of ``spin(iterations)`` in this process, in ms."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        tasks.spin(iterations)
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
    iters_per_ms = tasks.calibrate()
    cfg = config(opts, iters_per_ms)
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
        "noop_drain": lambda: noop_drain(cfg),
        "cpu_5ms": lambda: cpu(cfg, 5.0, "cpu_5ms", 0.97),
        "cpu_0_5ms": lambda: cpu(cfg, 0.5, "cpu_0_5ms", 0.8),
        "roundtrip": lambda: roundtrip(cfg),
        "publish": lambda: publish(cfg),
        "memory": lambda: footprint(cfg),
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
    output["table"] = [{"workload": m.workload, "metric": m.name, **m.to_json()} for m in metrics]

    say("")
    say(table(metrics))
    say("")
    say(
        "medians of the runs (min-max); ratio = hutch / baseline per pair of runs (A B A B ...), "
        "median (min-max); verdicts use the medians"
    )
    path = Path(opts.json) if opts.json else default_json_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(output, indent=2, default=str) + "\n")
    say(f"results written to {path} ({meta['duration_s']:.0f}s in all)")
    if failed:
        say(f"FAILED workloads: {', '.join(failed)}")
        return 1
    return 0


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
