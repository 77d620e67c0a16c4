"""The docs say what the code does: task option defaults, and the module map."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from service.registry import TaskSpec

ROOT = Path(__file__).resolve().parent.parent


def test_readme_task_option_defaults_are_taskspecs() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| option | default | meaning |", 1)[1].split("\n\n", 1)[0]
    documented: dict[str, str] = {}
    for line in table.splitlines()[2:]:
        names, default = (c.strip() for c in line.strip("|").split("|")[:2])
        for name in re.findall(r"`(\w+)`", names):
            documented[name] = default
    defaults = {f.name: f.default for f in dataclasses.fields(TaskSpec) if f.name not in ("fn",)}
    assert documented.keys() == defaults.keys()
    assert documented["max_attempts"] == str(defaults["max_attempts"])
    assert documented["soft_time_limit"] == "none" and defaults["soft_time_limit"] is None
    assert documented["time_limit"] == "worker's `--time-limit`" and defaults["time_limit"] is None
    backoff = [float(v) for v in documented["retry_backoff"].split(",")]
    assert backoff == [defaults["retry_backoff"], defaults["retry_backoff_max"]]
    assert documented["schedule"] == "none" and defaults["schedule"] is None
    assert documented["schedule_tz"] == defaults["schedule_tz"] == "UTC"
    catchup, most = (v.strip() for v in documented["schedule_catchup"].split(","))
    assert (catchup, int(most)) == (defaults["schedule_catchup"], defaults["schedule_catchup_max"])


def test_architecture_map_lists_every_module() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## The modules", 1)[1].split("\n## ", 1)[0]
    named: set[str] = set()
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        first, rest = line.split("|")[1], "|".join(line.split("|")[2:])
        named |= set(re.findall(r"`([\w/.]+\.py)`", first))
        directory = re.fullmatch(r" `(\w+)/` ", first)
        if directory:
            named |= {f"{directory.group(1)}/{n}" for n in re.findall(r"`(\w+\.py)`", rest)}
    named = {n.removeprefix("service/") for n in named}
    modules = {
        str(p.relative_to(ROOT / "service"))
        for p in (ROOT / "service").rglob("*.py")
        if p.name != "__init__.py" or p.parent.name == "service"
    }
    modules.discard("__init__.py")
    named.discard("__init__.py")
    assert named == modules


def test_operations_metrics_table_lists_every_metric() -> None:
    """docs/operations.md "Metrics" names each hutch_* family a worker exports, and no other."""
    from service.metrics import Metrics
    from service.schedules import Schedule, every
    from service.settle import TaskOutcome

    text = (ROOT / "docs" / "operations.md").read_text()
    table = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(hutch_\w+)` \|", table, flags=re.MULTILINE))
    metrics = Metrics("q")
    metrics.add_task("t")
    metrics.on_finished("t", TaskOutcome.SUCCESS, 0.1, 0.0)  # the last-success gauge appears
    metrics.add_schedule(Schedule("t", every(seconds=60)))  # the schedule series appear
    metrics.on_leader(True)
    metrics.on_fire("t", 60_000)
    exported: set[str] = set()
    for family in metrics.registry.collect():
        if family.name.startswith("hutch_"):
            # A counter family is named without its _total; the docs use the sample's name.
            exported.add(family.name + "_total" if family.type == "counter" else family.name)
    assert documented == exported, (
        f"undocumented: {exported - documented}, not exported: {documented - exported}"
    )
