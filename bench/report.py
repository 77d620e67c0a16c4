"""The result model of the benchmark: one `Metric` per table row, its JSON shape, the table.

Kept apart from the code that measures, so the figures' meaning (what a ratio is, how a target
is judged) is stated once and the same table serves every workload.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any


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
    missing: str = ""  # why the baseline has no figures (a peer not installed, or failed)
    group: str = "baselines"  # which table: "baselines" or "peers"

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
            "baseline_missing": self.missing or None,
            "group": self.group,
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


def baseline_cell(m: Metric) -> str:
    if m.baseline:
        return f"{fmt_range(m.baseline)} {m.baseline_label}"
    if m.missing:
        return f"{m.baseline_label}: {m.missing}"
    return "-"


def table(metrics: list[Metric], baseline: str = "baseline") -> str:
    """The rows as aligned text; ``baseline`` heads the column hutch is compared with."""
    header = ("workload", "hutch", baseline, "ratio", "target", "verdict")
    rows = [header]
    for m in metrics:
        ratios = m.ratios()
        rows.append(
            (
                f"{m.label} [{m.unit}]",
                fmt_range(m.hutch),
                baseline_cell(m),
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


def table_rows(metrics: list[Metric]) -> list[dict[str, Any]]:
    """The table as the JSON output keeps it: one object per row."""
    return [{"workload": m.workload, "metric": m.name, **m.to_json()} for m in metrics]
