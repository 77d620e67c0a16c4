"""One function per workload comparison: run hutch and its baselines in turn, build table rows.

Every comparison has the same shape: alternate the contenders (A B A B ...) so load from
elsewhere hits them all, print one line per run, then turn named figures of the runs into
`Metric` rows. `alternate` and `Comparison` hold that shape; the functions below only say which
runs and which rows. `bench.workloads` and `bench.peer_workloads` do the measuring.

With ``--peers``, Celery and Dramatiq join the alternation of the workloads where they do the
same job; their rows go to a second table (group ``peers``). A peer that cannot run, or whose
run fails, keeps its row, saying so.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench import flow_workloads, peer_workloads, workloads
from bench.harness import loadavg
from bench.peer_workloads import PEERS, Peer
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
            shown = f"FAILED: {_first_line(result['error'])}" if "error" in result else show(result)
            say(
                f"  {name:<11} {label:<13} {i + 1}/{repeat}: {shown}"
                f"  [{time.perf_counter() - started:.1f}s, load {result.get('loadavg', -1):.2f}]"
            )
    return results


def _first_line(text: str, width: int = 70) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "?"
    return line if len(line) <= width else line[: width - 3] + "..."


def guarded(run: Run) -> Run:
    """A peer's run whose failure is a figure (``{"error": ...}``), not the workload's end."""

    async def attempt() -> dict[str, Any]:
        try:
            return await run()
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}", "loadavg": loadavg()}

    return attempt


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

    def peer_rows(
        self,
        cfg: Config,
        name: str,
        label: str,
        unit: str,
        figure: Figure,
        targets: dict[str, tuple[str, float]] | None = None,
        skipped: dict[str, str] | None = None,
    ) -> list[Metric]:
        """hutch's ``figure`` against each requested peer's; a peer that did not run says why."""
        rows = []
        for peer, missing in cfg.peers.items():
            missing = missing or (skipped or {}).get(peer)
            errors = [r["error"] for r in self.runs.get(peer, []) if "error" in r]
            target = (targets or {}).get(peer)
            key = f"{name}_vs_{peer.lower()}"
            if missing is None and not errors:
                row = self.row(key, label, unit, figure, peer, peer, target)
            else:
                why = (
                    f"not run: {missing}"
                    if missing
                    else f"FAILED {len(errors)}/{len(self.runs[peer])}: {_first_line(errors[0])}"
                )
                hutch = self.values("hutch", figure)
                row = Metric(
                    self.workload, key, label, unit, hutch, None, peer, target, missing=why
                )
            row.group = "peers"
            rows.append(row)
        return rows


async def compare(
    workload: str,
    cfg: Config,
    runs: list[tuple[str, Run]],
    show: Callable[[dict[str, Any]], str],
    rounds: int | None = None,
) -> Comparison:
    return Comparison(workload, await alternate(workload, rounds or cfg.repeat, runs, show))


def peers(cfg: Config, skipped: dict[str, str] | None = None) -> list[Peer]:
    """The requested peers that can run (their names are `Peer.name`)."""
    runnable = {name for name, missing in cfg.peers.items() if missing is None}
    return [p for p in PEERS if p.name in runnable and p.name not in (skipped or {})]


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


def show_flows(result: dict[str, Any]) -> str:
    return f"{result['per_s']:,.0f} flows/s in {result['seconds']:.3f}s"


def show_drain(result: dict[str, Any]) -> str:
    return (
        f"{show_per_s(result)} (steady {result['steady_per_s']:,.0f}/s, "
        f"rabbitmqctl all-acked after {result['ack_confirm_s']:.1f}s)"
    )


def show_startup(result: dict[str, Any]) -> str:
    return (
        f"first task acked {result['seconds'] * 1000:.0f} ms after spawn "
        f"(first connection at {result['connect_s'] * 1000:.0f} ms)"
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
    runs += [(p.name, guarded(_peer_drain(cfg, p, "noop", [], n))) for p in peers(cfg)]
    c = await compare("noop_drain", cfg, runs, show_drain)
    bare = ("bare consumer", f"bare prefetch {cfg.bare_prefetch}")
    label = f"no-op drain, {n} tasks"
    rows = [
        c.row("tasks_per_s", label, "tasks/s", "per_s", *bare, ("ratio>=", 0.85)),
        c.row(
            "steady_tasks_per_s", "  same, steady state 90%->10%", "tasks/s", "steady_per_s", *bare
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
    rows.append(
        c.row(
            "parent_cpu_us_per_task",
            "parent CPU per no-op task",
            "us",
            "parent_cpu_us_per_task",
            *bare,
        )
    )
    rows += c.peer_rows(
        cfg, "tasks_per_s", label, "tasks/s", "per_s", {"Dramatiq": ("ratio>=", 1.0)}
    )
    return rows, c.runs


def _peer_drain(cfg: Config, peer: Peer, task: str, args: list[Any], n: int) -> Run:
    return lambda: peer_workloads.drain(
        peer, task, args, n, concurrency=cfg.concurrency, poll=cfg.poll, quick=cfg.quick
    )


def _ms(key: str) -> Figure:
    return lambda r: float(r[key]) * 1000


def _peer_startup(cfg: Config, peer: Peer) -> Run:
    return lambda: peer_workloads.startup(peer, concurrency=cfg.concurrency, quick=cfg.quick)


async def startup(cfg: Config) -> tuple[list[Metric], dict[str, Any]]:
    runs: list[tuple[str, Run]] = [
        ("hutch", lambda: workloads.startup(cfg, "hutch")),
        ("bare consumer", lambda: workloads.startup(cfg, "bare")),
    ]
    runs += [(p.name, guarded(_peer_startup(cfg, p))) for p in peers(cfg)]
    c = await compare("startup", cfg, runs, show_startup, rounds=cfg.startup_rounds)
    label = f"start-up: spawn to first task acked, concurrency {cfg.concurrency}"
    acked, connected = _ms("seconds"), _ms("connect_s")
    rows = [
        c.row("startup_ms", label, "ms", acked, "bare consumer", None, ("ratio<=", 1.3)),
        c.row("connect_ms", "  spawn to first connection", "ms", connected, "bare consumer"),
    ]
    rows += c.peer_rows(cfg, "startup_ms", label, "ms", acked)
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
    runs += [(p.name, guarded(_peer_drain(cfg, p, "spin", [iterations], n))) for p in peers(cfg)]
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
    rows += c.peer_rows(cfg, "tasks_per_s", f"CPU {ms:g} ms x {n}", "tasks/s", "per_s")
    return rows, {**c.runs, "iterations": iterations}


async def roundtrip(cfg: Config) -> tuple[list[Metric], dict[str, Any]]:
    kinds = ["hutch", "bare", "bare-direct"] + ([] if cfg.quick else ["bare-confirm"])

    def one(kind: str) -> Run:
        return lambda: workloads.roundtrip(cfg, kind)

    skipped = {}
    if cfg.peers.get("Dramatiq", "") is None and not peer_workloads.redis_installed():
        skipped["Dramatiq"] = "redis-server is not installed (Dramatiq's results need Redis)"
        say(f"  note: Dramatiq's round trip is skipped: {skipped['Dramatiq']}")
    runnable = peers(cfg, skipped)
    async with peer_workloads.redis_for(runnable) as redis:

        def call(peer: Peer) -> Run:
            return lambda: peer_workloads.roundtrip(
                peer,
                calls=cfg.calls,
                warmup=cfg.call_warmup,
                concurrency=cfg.concurrency,
                quick=cfg.quick,
                redis=redis,
            )

        runs = [(kind, one(kind)) for kind in kinds]
        runs += [(p.name, guarded(call(p))) for p in runnable]
        c = await compare("roundtrip", cfg, runs, show_latency)
    label = f"call noop x {cfg.calls}: p50"
    rows = [
        c.row("p50_ms", label, "ms", "p50_ms", "bare", None, ("ratio<=", 1.15)),
        c.row("p95_ms", "  p95", "ms", "p95_ms", "bare"),
        c.row("p99_ms", "  p99", "ms", "p99_ms", "bare", None, ("max", 5.0)),
        c.row(
            "p50_ms_vs_direct", "  p50 vs bare w/ direct reply-to", "ms", "p50_ms", "bare-direct"
        ),
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
    rows += c.peer_rows(
        cfg, "p50_ms", label, "ms", "p50_ms", {"Dramatiq": ("ratio<=", 1.0)}, skipped
    )
    rows += c.peer_rows(cfg, "p99_ms", "  p99", "ms", "p99_ms", None, skipped)
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


async def delayed(cfg: Config) -> tuple[list[Metric], dict[str, Any]]:
    """The cost of a delayed task: the same concurrent calls with and without a countdown."""
    c = await compare(
        "delayed",
        cfg,
        [
            ("delayed", lambda: workloads.delayed(cfg, "delayed")),
            ("immediate", lambda: workloads.delayed(cfg, "immediate")),
        ],
        show_latency,
    )
    label = f"{cfg.calls} concurrent calls, countdown {workloads.DELAY:g} s: late by, p50"
    return [
        c.row("p50_ms", label, "ms", "p50_ms", "immediate", "same, no countdown", None, "delayed"),
        c.row(
            "p99_ms", "  p99", "ms", "p99_ms", "immediate", "same, no countdown", None, "delayed"
        ),
        c.row(
            "broker_cpu_us_per_task",
            "  broker CPU per task",
            "us",
            "broker_cpu_us_per_task",
            "immediate",
            "same, no countdown",
            None,
            "delayed",
        ),
    ], c.runs


async def flow_chain(cfg: Config) -> tuple[list[Metric], dict[str, Any]]:
    """A 3-step chain against its three tasks called one by one (each call awaited)."""
    c = await compare(
        "flow_chain",
        cfg,
        [
            ("flow", lambda: flow_workloads.latency(cfg, "chain3", "flow")),
            ("calls", lambda: flow_workloads.latency(cfg, "chain3", "calls")),
        ],
        show_latency,
    )
    label = f"call chain(3 no-op steps) x {cfg.flow_calls}: p50 per flow"
    by_hand = "3 calls one by one"
    return [
        c.row("p50_ms", label, "ms", "p50_ms", "calls", by_hand, side="flow"),
        c.row("p99_ms", "  p99", "ms", "p99_ms", "calls", by_hand, side="flow"),
    ], c.runs


async def flow_fanin(cfg: Config) -> tuple[list[Metric], dict[str, Any]]:
    """chain(group(a, b), c) against a, b, c called one by one, and against a and b called at
    once by the client, then c."""
    c = await compare(
        "flow_fanin",
        cfg,
        [
            ("flow", lambda: flow_workloads.latency(cfg, "fanin2", "flow")),
            ("calls", lambda: flow_workloads.latency(cfg, "fanin2", "calls")),
            ("gathered", lambda: flow_workloads.latency(cfg, "fanin2", "gathered")),
        ],
        show_latency,
    )
    label = f"call chain(group(2 no-ops), no-op) x {cfg.flow_calls}: p50 per flow"
    return [
        c.row("p50_ms", label, "ms", "p50_ms", "calls", "3 calls one by one", side="flow"),
        c.row("p99_ms", "  p99", "ms", "p99_ms", "calls", "3 calls one by one", side="flow"),
        c.row(
            "p50_ms_vs_gathered",
            "  p50",
            "ms",
            "p50_ms",
            "gathered",
            "2 calls at once, then 1",
            side="flow",
        ),
    ], c.runs


async def flows(cfg: Config) -> tuple[list[Metric], dict[str, Any]]:
    """Throughput of many concurrent flows of the example's shape (a step, a 2-way group, a
    step) against the same four tasks driven by the client (1, then 2 at once, then 1)."""
    c = await compare(
        "flows",
        cfg,
        [
            ("flow", lambda: flow_workloads.throughput(cfg, "flow")),
            ("calls", lambda: flow_workloads.throughput(cfg, "calls")),
        ],
        show_flows,
    )
    label = f"{cfg.concurrent_flows} concurrent chain(a, group(b, c), d): flows/s"
    return [
        c.row(
            "per_s", label, "flows/s", "per_s", "calls", "the same calls by the client", side="flow"
        ),
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
