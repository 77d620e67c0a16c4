"""Each enumeration is defined once; metric labels, docs tables and CLI filters follow it."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path

import pytest

from service.continuation import FlowEvent
from service.metrics import Metrics
from service.ops.deadletters import REASONS, BrokerReason
from service.pool.jobs import RestartReason
from service.protocol import Reason
from service.settle import Action, TaskOutcome
from service.store.errors import RefFailure

ROOT = Path(__file__).resolve().parent.parent
LABELS: dict[tuple[str, str], type[StrEnum]] = {
    ("hutch_tasks_finished_total", "outcome"): TaskOutcome,
    ("hutch_messages_settled_total", "action"): Action,
    ("hutch_dead_letters_total", "reason"): Reason,
    ("hutch_child_restarts_total", "reason"): RestartReason,
    ("hutch_flows_ended_total", "outcome"): FlowEvent,
    ("hutch_blob_ref_failures_total", "kind"): RefFailure,
}


def values(enum: type[StrEnum]) -> set[str]:
    return {member.value for member in enum}


def exported() -> dict[tuple[str, str], set[str]]:
    metrics = Metrics("q")
    metrics.add_task("t")
    found: dict[tuple[str, str], set[str]] = {key: set() for key in LABELS}
    for family in metrics.registry.collect():
        for sample in family.samples:
            for (name, label), seen in found.items():
                if sample.name == name:
                    seen.add(sample.labels[label])
    return found


def test_every_exported_label_value_is_its_enum() -> None:
    for key, seen in exported().items():
        assert seen == values(LABELS[key]), key


def doc_table_values(path: Path, first_cell: str) -> dict[str, set[str]]:
    """Rows of the markdown table whose first cell is ``first_cell``: second cell -> values."""
    rows: dict[str, set[str]] = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] == first_cell:
            rows[cells[1].strip("`")] = set(re.findall(r"`([a-z_]+)`", cells[2]))
    return rows


def test_operations_doc_lists_exactly_the_label_values() -> None:
    rows = doc_table_values(ROOT / "docs" / "operations.md", "`outcome`")
    rows |= doc_table_values(ROOT / "docs" / "operations.md", "`action`")
    rows |= doc_table_values(ROOT / "docs" / "operations.md", "`reason`")
    rows |= doc_table_values(ROOT / "docs" / "operations.md", "`kind`")
    for (metric, _label), enum in LABELS.items():
        assert rows.get(metric) == values(enum), metric


def test_protocol_doc_dead_letter_table_is_the_reason_enum() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text.split("## 8. Dead letters", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))
    assert documented == values(Reason)


def test_dlq_reason_filter_derives_from_the_enums() -> None:
    assert set(REASONS) == values(Reason) | values(BrokerReason) | {"unknown"}


@pytest.mark.parametrize("enum", [TaskOutcome, Action, Reason, RestartReason, BrokerReason])
def test_values_are_stable_label_strings(enum: type[StrEnum]) -> None:
    for member in enum:
        assert re.fullmatch(r"[a-z][a-z_]*", member.value), member
