"""One function per workload comparison: run hutch and its baselines in turn, build table rows.

Every comparison has the same shape: alternate the contenders (A B A B ...) so load from
elsewhere hits them all, print one line per run, then turn named figures of the runs into
`Metric` rows. `alternate` and `Comparison` hold that shape; the functions below only say which
runs and which rows. `bench.workloads` does the measuring.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench import workloads
from bench.report import Metric
from bench.workloads import NOOP, SPIN, Config

Run = Callable[[], Awaitable[dict[str, Any]]]
Figure = str | Callable[[dict[str, Any]], float]  # a key of a run's dict, or how to get it


def say(text: str) -> None:
    print(text, flush=True)


async def alternate(
    name: str, repeat: int, runs: list[tuple[str, Run]], show: Callable[[dict[str, Any]], str]
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


@dataclass
class Comparison:
    """The runs of one workload, by contender label, and the rows built from them."""

    workload: str
    runs: dict[str, list[dict[str, Any]]]

    def values(self, label: str, figure: Figure) -> list[float]:
        if callable(figure):
            return [float(figure(r)) for r in self.runs[label]]
        return [float(r[figure]) for r in self.runs[label]]

    def row(
        self,
        name: str,
        label: str,
        unit: str,
        figure: Figure,
        baseline: str | None = None,
        baseline_label: str | None = None,
        target: tuple[str, float] | None = None,
        side: str = "hutch",
    ) -> Metric:
        """``side``'s ``figure`` against the same figure of the ``baseline`` contender's runs.

        ``side`` is hutch unless the row is a diagnostic variant of hutch.
        """
        return Metric(
            self.workload,
            name,
            label,
            unit,
            self.values(side, figure),
            self.values(baseline, figure) if baseline else None,
            (baseline_label or baseline or "") if baseline else "",
            target,
        )


async def compare(
    workload: str, cfg: Config, runs: list[tuple[str, Run]], show: Callable[[dict[str, Any]], str]
) -> Comparison:
    return Comparison(workload, await alternate(workload, cfg.repeat, runs, show))


# -- what one run's line shows ------------------------------------------------------------------


def show_per_s(result: dict[str, Any]) -> str:
    text = f"{result['per_s']:,.0f} tasks/s in {result['seconds']:.3f}s"
    if "parent_cpu_s" in result:
        text += (
            f"; CPU/task: parent {result['parent_cpu_us_per_task']:.0f} us, "
            f"children {result['children_cpu_us_per_task']:.0f} us"
        )
        if "broker_cpu_us_per_task" in result:
            text += f", broker {result['broker_cpu_us_per_task']:.0f} us"
    return text


def show_drain(result: dict[str, Any]) -> str:
    return (
        f"{show_per_s(result)} (steady {result['steady_per_s']:,.0f}/s, "
        f"rabbitmqctl all-acked after {result['ack_confirm_s']:.1f}s)"
    )


def show_latency(result: dict[str, Any]) -> str:
    return f"p50 {result['p50_ms']:.2f} p95 {result['p95_ms']:.2f} p99 {result['p99_ms']:.2f} ms"


def show_memory(result: dict[str, Any]) -> str:
    rest, after = result["rest"], result["after"]
    children = ", ".join(f"{c:.1f}" for c in after["children_rss_mb"]) or "none"
    return (
        f"parent RSS {rest['parent_rss_mb']:.1f} -> {after['parent_rss_mb']:.1f} MB, "
        f"children {children} MB"
    )


# -- the comparisons ----------------------------------------------------------------------------


async def noop_drain(cfg: Config) -> tuple[list[Metric], dict[str, Any]]:
    n = cfg.noop_tasks
    matched = f"hutch pf {cfg.bare_prefetch}"
    runs: list[tuple[str, Run]] = [
        ("hutch", lambda: workloads.drain(cfg, "hutch", NOOP, [], n)),
        ("bare consumer", lambda: workloads.drain(cfg, "bare", NOOP, [], n)),
    ]
    if not cfg.quick:  # diagnostic only: hutch with the bare consumer's prefetch
        runs.append((matched, lambda: workloads.drain(cfg, "hutch-prefetch", NOOP, [], n)))
    c = await compare("noop_drain", cfg, runs, show_drain)
    bare = ("bare consumer", f"bare prefetch {cfg.bare_prefetch}")
    rows = [
        c.row(
            "tasks_per_s", f"no-op drain, {n} tasks", "tasks/s", "per_s", *bare, ("ratio>=", 0.8)
        ),
        c.row(
            "steady_tasks_per_s", "  same, steady state 90%->10%", "tasks/s", "steady_per_s", *bare
        ),
        c.row(
            "parent_cpu_us_per_task",
            "  consumer process CPU per task",
            "us",
            "parent_cpu_us_per_task",
            *bare,
        ),
    ]
    if matched in c.runs:
        rows.append(
            c.row(
                "prefetch_matched_tasks_per_s",
                f"  hutch --prefetch-buffer {cfg.bare_prefetch - cfg.concurrency}",
                "tasks/s",
                "per_s",
                *bare,
                side=matched,
            )
        )
    return rows, c.runs


async def cpu(
    cfg: Config, ms: float, key: str, target: float
) -> tuple[list[Metric], dict[str, Any]]:
    n = cfg.cpu_tasks
    iterations = cfg.spin_iterations(ms)
    runs: list[tuple[str, Run]] = [
        ("hutch", lambda: workloads.drain(cfg, "hutch", SPIN, [iterations], n)),
        ("Pool", lambda: workloads.pool(cfg, ms)),
    ]
    if not cfg.quick:  # diagnostic only: hutch's pool without the broker
        runs.append(("hutch pool", lambda: workloads.hutch_pool(cfg, SPIN, [iterations], n)))
    c = await compare(key, cfg, runs, show_per_s)
    pool = ("Pool", f"Pool({cfg.concurrency})")
    rows = [
        c.row("tasks_per_s", f"CPU {ms:g} ms x {n}", "tasks/s", "per_s", *pool, ("ratio>=", target))
    ]
    if "hutch pool" in c.runs:
        rows.append(
            c.row(
                "pool_only_tasks_per_s",
                "  hutch's pool alone, no broker",
                "tasks/s",
                "per_s",
                *pool,
                side="hutch pool",
            )
        )
    return rows, {**c.runs, "iterations": iterations}


async def roundtrip(cfg: Config) -> tuple[list[Metric], dict[str, Any]]:
    kinds = ["hutch", "bare"] if cfg.quick else ["hutch", "bare", "bare-confirm"]

    def one(kind: str) -> Run:
        return lambda: workloads.roundtrip(cfg, kind)

    c = await compare("roundtrip", cfg, [(kind, one(kind)) for kind in kinds], show_latency)
    rows = [
        c.row(
            "p50_ms",
            f"call noop x {cfg.calls}: p50",
            "ms",
            "p50_ms",
            "bare",
            None,
            ("ratio<=", 1.2),
        ),
        c.row("p95_ms", "  p95", "ms", "p95_ms", "bare"),
        c.row("p99_ms", "  p99", "ms", "p99_ms", "bare", None, ("max", 10.0)),
    ]
    if "bare-confirm" in c.runs:
        rows.append(
            c.row(
                "p50_ms_vs_confirmed",
                "  p50 vs bare w/ confirmed replies",
                "ms",
                "p50_ms",
                "bare-confirm",
            )
        )
    return rows, c.runs


async def publish(cfg: Config) -> tuple[list[Metric], dict[str, Any]]:
    c = await compare(
        "publish",
        cfg,
        [
            ("hutch", lambda: workloads.publish(cfg, "hutch")),
            ("bare", lambda: workloads.publish(cfg, "bare")),
        ],
        show_per_s,
    )
    label = f"submit x {cfg.submits}, {cfg.window} in flight"
    return [
        c.row("tasks_per_s", label, "tasks/s", "per_s", "bare", "bare confirmed", ("ratio>=", 0.8))
    ], c.runs


async def footprint(cfg: Config) -> tuple[list[Metric], dict[str, Any]]:
    c = await compare(
        "memory",
        cfg,
        [
            ("hutch", lambda: workloads.footprint(cfg, "hutch")),
            ("bare consumer", lambda: workloads.footprint(cfg, "bare")),
        ],
        show_memory,
    )

    def get(when: str, key: str) -> Figure:
        return lambda r: float(r[when][key])

    def child(when: str) -> Figure:
        return lambda r: max(r[when]["children_rss_mb"], default=0.0)

    bare = "bare consumer"
    return [
        c.row("parent_rss_rest_mb", "parent RSS at rest", "MB", get("rest", "parent_rss_mb"), bare),
        c.row(
            "parent_rss_after_mb",
            f"parent RSS after {cfg.noop_tasks} no-ops",
            "MB",
            get("after", "parent_rss_mb"),
            bare,
            None,
            ("max", 60.0),
        ),
        c.row(
            "parent_hwm_mb", "  parent peak RSS (VmHWM)", "MB", get("after", "parent_hwm_mb"), bare
        ),
        c.row("child_rss_rest_mb", "child RSS at rest (largest)", "MB", child("rest")),
        c.row("child_rss_after_mb", "child RSS after (largest)", "MB", child("after")),
    ], c.runs
