"""The monitoring kit: Prometheus config and alert rules, the Grafana dashboard, the runbook.

Static checks run promtool (Debian's ``prometheus`` package) and parse every dashboard query
with promql-parser to compare its metric names with what hutch and RabbitMQ export. The live
test starts a real Prometheus scraping a real worker and RabbitMQ's own endpoint (plugin
rabbitmq_prometheus on :15692), runs a small workload, and evaluates every dashboard query
and alert expression through Prometheus' HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service import AsyncClient, TaskError, topology
from service.metrics import Metrics
from service.schedules import Schedule, every
from service.settle import TaskOutcome
from tests.conftest import ROOT, Broker, Vhost, WorkerProcess, rabbitmqctl

PROM_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_YML = PROM_DIR / "prometheus.yml"
ALERTS_YML = PROM_DIR / "alerts.yml"
ALERTS_TEST_YML = PROM_DIR / "alerts.test.yml"
GRAFANA = ROOT / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
OPERATIONS_MD = ROOT / "docs" / "operations.md"
RABBITMQ_PROMETHEUS = "http://127.0.0.1:15692"
DETAILED_PARAMS = "family=queue_coarse_metrics&family=queue_consumer_count"

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEVERITIES = {"critical", "warning", "info"}
# What the alert set must cover at least (issue #4).
REQUIRED_ALERTS = {
    "HutchTaskFailureRatioHigh",
    "HutchQueueNoConsumers",
    "HutchQueueBacklogGrowing",
    "HutchQueueDrainTooSlow",
    "HutchQueueWaitTooLong",
    "HutchQueueStalled",
    "HutchChildCrashLooping",
    "HutchBrokerDisconnected",
    "HutchDeadLetterQueueGrowing",
    "HutchTargetDown",
}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: apt-get install prometheus (.ci/run does)")
    return found


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule
        for group in load_yaml(ALERTS_YML)["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


# -- Prometheus configuration and rules ---------------------------------------------------------


def test_promtool_check_config() -> None:
    result = run(promtool(), "check", "config", str(PROMETHEUS_YML))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules() -> None:
    result = run(promtool(), "check", "rules", str(ALERTS_YML))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    result = run(promtool(), "test", "rules", ALERTS_TEST_YML.name, cwd=PROM_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_workers_and_both_rabbitmq_endpoints() -> None:
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_YML)["scrape_configs"]}
    assert set(jobs) == {"hutch", "rabbitmq", "rabbitmq-detailed"}
    assert jobs["hutch"].get("metrics_path", "/metrics") == "/metrics"
    assert jobs["rabbitmq"].get("metrics_path", "/metrics") == "/metrics"
    detailed = jobs["rabbitmq-detailed"]
    assert detailed["metrics_path"] == "/metrics/detailed"
    assert detailed["params"] == {"family": ["queue_coarse_metrics", "queue_consumer_count"]}
    assert all(t.endswith(":15692") for c in detailed["static_configs"] for t in c["targets"])


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_alerts_follow_the_mixin_style_and_have_runbooks() -> None:
    anchors = {
        github_anchor(line.lstrip("#"))
        for line in OPERATIONS_MD.read_text().splitlines()
        if line.startswith("#")
    }
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert set(names) >= REQUIRED_ALERTS, REQUIRED_ALERTS - set(names)
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"Hutch(?:[A-Z][a-z0-9]*)+", name), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert set(annotations) >= {"summary", "description", "runbook_url"}, name
        assert "{{" not in annotations["summary"], f"{name}: summary must be static"
        assert annotations["summary"].endswith("."), name
        # Templated where the expression keeps labels (absent() keeps none).
        assert annotations["description"] != annotations["summary"], name
        match = re.fullmatch(r"(?:.*/)?docs/operations\.md#([\w-]+)", annotations["runbook_url"])
        assert match, f"{name}: {annotations['runbook_url']}"
        assert match.group(1) == name.lower(), f"{name}: anchor {match.group(1)}"
        assert match.group(1) in anchors, f"{name}: no section #{match.group(1)} in operations.md"


def test_every_alert_is_tested_firing_and_quiet() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in load_yaml(ALERTS_TEST_YML)["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fired == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown staying quiet"


def test_yaml_lint() -> None:
    yamllint = Path(sys.executable).parent / "yamllint"
    assert yamllint.exists(), "yamllint is missing: pip install -e '.[test]'"
    config = json.dumps(
        {
            "extends": "default",
            "rules": {
                # Series selectors in rule tests do not wrap.
                "line-length": {"max": 100, "ignore": [str(ALERTS_TEST_YML)]},
                "document-start": "disable",
            },
        }
    )
    files = [PROMETHEUS_YML, ALERTS_YML, ALERTS_TEST_YML, *GRAFANA.glob("provisioning/*/*.yml")]
    result = run(str(yamllint), "-s", "-d", config, *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr


# -- Grafana -------------------------------------------------------------------------------------


def test_grafana_provisioning() -> None:
    datasources = [load_yaml(p) for p in GRAFANA.glob("provisioning/datasources/*.yml")]
    assert datasources and all(d["apiVersion"] == 1 for d in datasources)
    assert any(ds["type"] == "prometheus" for d in datasources for ds in d["datasources"])
    providers = [load_yaml(p) for p in GRAFANA.glob("provisioning/dashboards/*.yml")]
    assert providers and all(p["apiVersion"] == 1 for p in providers)
    for provider in (p for d in providers for p in d["providers"]):
        assert provider["type"] == "file" and provider["options"]["path"]
        assert provider.get("allowUiUpdates") is False


def load_dashboards() -> list[dict[str, Any]]:
    assert DASHBOARDS, "no dashboards in grafana/dashboards"
    return [json.loads(p.read_text()) for p in DASHBOARDS]


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep their panels inside


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def test_dashboard_structure() -> None:
    dashboards = load_dashboards()
    uids = [d["uid"] for d in dashboards]
    assert len(uids) == len(set(uids)), "dashboard uids must be unique"
    for path, dashboard in zip(DASHBOARDS, dashboards, strict=True):
        text = path.read_text()
        assert "__inputs" not in dashboard and "__requires" not in dashboard, path
        assert "${DS_" not in text, f"{path}: UI-import placeholder, not provisionable"
        assert 0 < len(dashboard["uid"]) <= 40 and dashboard["id"] is None
        ids = [panel["id"] for panel in all_panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{path}: panel ids repeat"
        variables_ = variables(dashboard)
        assert variables_["datasource"]["type"] == "datasource"
        assert variables_["datasource"]["query"] == "prometheus"
        assert {"queue", "task", "instance"} <= set(variables_)
        for name, variable in variables_.items():
            if variable["type"] == "query":
                assert variable["datasource"] == DATASOURCE, name
        for panel in all_panels(dashboard):
            assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == DATASOURCE, panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE, panel["title"]
                assert target["expr"].strip(), panel["title"]
        titles = {p["title"] for p in all_panels(dashboard) if p["type"] == "row"}
        for needed in ("Throughput", "Latency", "Backlog", "Pool", "Broker", "Flows"):
            assert any(needed in title for title in titles), f"no {needed} row"


_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")
_LABEL_VALUES = re.compile(r"label_values\((.*),\s*(\w+)\)\s*$", re.S)


def substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's substitution of template variables, with fixed values."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise AssertionError(f"unknown variable ${name} in {expr!r}")
        return values[name]

    return _VARIABLE.sub(one, expr)


def dashboard_queries(values: dict[str, str]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable, variables substituted.

    ``label_values(selector, label)`` variables contribute their selector.
    """
    found = []
    for path, dashboard in zip(DASHBOARDS, load_dashboards(), strict=True):
        for panel in all_panels(dashboard):
            for target in panel.get("targets", []):
                where = f"{path.name} panel {panel['id']} {panel['title']!r} {target['refId']}"
                found.append((where, substitute(target["expr"], values)))
        for name, variable in variables(dashboard).items():
            if variable["type"] == "query":
                match = _LABEL_VALUES.fullmatch(variable["query"].strip())
                assert match, f"variable {name}: {variable['query']!r}"
                found.append((f"{path.name} variable {name}", substitute(match[1], values)))
    return found


STATIC_VALUES = {
    "__rate_interval": "5m",
    "datasource": "prometheus",
    "job": "hutch",
    "instance": ".*",
    "queue": "(q-1|q-2)",
    "task": ".*",
}


def metric_names(expr: str) -> set[str]:
    names: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"selector without a metric name in {expr!r}"
            names.add(node.name)
            return
        for attr in ("lhs", "rhs", "expr", "vector_selector", "param"):
            child = getattr(node, attr, None)
            if child is not None and not isinstance(child, (int, float, str)):
                walk(child)
        for arg in getattr(node, "args", None) or []:
            walk(arg)

    walk(promql_parser.parse(expr))
    return names


def hutch_metric_names() -> set[str]:
    metrics = Metrics("q")
    metrics.add_task("t")
    metrics.on_finished("t", TaskOutcome.SUCCESS, 0.1, 0.0)  # the last-success gauge appears
    metrics.add_schedule(Schedule("t", every(seconds=60)))  # the schedule series appear
    metrics.on_leader(True)
    metrics.on_fire("t", 60_000)
    return {s.name for family in metrics.registry.collect() for s in family.samples}


def http_get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape_names(url: str) -> set[str]:
    _, text = http_get(url)
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def rabbitmq_metric_names() -> set[str]:
    """Names RabbitMQ really exports on both scraped paths (plugin rabbitmq_prometheus)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return scrape_names(RABBITMQ_PROMETHEUS + "/metrics") | scrape_names(
                f"{RABBITMQ_PROMETHEUS}/metrics/detailed?{DETAILED_PARAMS}"
            )
        except OSError as exc:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"RabbitMQ's Prometheus endpoint {RABBITMQ_PROMETHEUS} is not answering "
                    f"({exc}): rabbitmq-plugins enable rabbitmq_prometheus (.ci/run does)"
                )
            time.sleep(1)


@pytest.fixture(scope="module")
def known_metrics() -> Iterator[set[str]]:
    # The per-queue families exist only while some queue does: hold one in a vhost of our own
    # (the broker may otherwise have none at all when this runs).
    name = f"hutch-test-{uuid.uuid4().hex[:10]}"
    rabbitmqctl("add_vhost", name)
    rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        asyncio.run(_declare_a_queue(Vhost(name).url))
        deadline = time.monotonic() + 30  # queue stats are emitted every 5 s
        names = rabbitmq_metric_names()
        while "rabbitmq_detailed_queue_messages_ready" not in names:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
            names = rabbitmq_metric_names()
        # `up` is Prometheus' own, per scrape target.
        yield hutch_metric_names() | names | {"up"}
    finally:
        rabbitmqctl("delete_vhost", name, check=False)


async def _declare_a_queue(url: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        await topology.declare(await connection.channel(), "metrics-probe")


def test_dashboard_queries_parse_and_use_exported_metrics(
    known_metrics: set[str], tmp_path: Path
) -> None:
    queries = dashboard_queries(STATIC_VALUES)
    used: set[str] = set()
    for where, expr in queries:
        try:
            names = metric_names(expr)
        except ValueError as exc:
            pytest.fail(f"{where}: {exc}\n{expr}")
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= known_metrics, f"{where}: not exported: {names - known_metrics}"
        used |= names
    assert any(n.startswith("rabbitmq_detailed_queue_") for n in used)
    # And Prometheus' own parser agrees: every query as a recording rule.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{n}", "expr": expr}
                    for n, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run(promtool(), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_expressions_use_exported_metrics(known_metrics: set[str]) -> None:
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names <= known_metrics, f"{rule['alert']}: not exported: {names - known_metrics}"


# -- live: a real Prometheus, a real worker, RabbitMQ's own endpoint -----------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def live_config(worker_target: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml pointed at the test worker and the local broker."""
    config = load_yaml(PROMETHEUS_YML)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS_YML)]
    config.pop("alerting", None)
    for job in config["scrape_configs"]:
        target = worker_target if job["job_name"] == "hutch" else "127.0.0.1:15692"
        job["static_configs"] = [{"targets": [target]}]
    return config


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url)
        data = json.loads(body)
        assert status == 200 and data["status"] == "success", f"{path} {params}: {body[:500]}"
        return data["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    async def until(self, expr: str, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = await asyncio.to_thread(self.query, expr)
            if found or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.5)


@contextlib.contextmanager
def prometheus_server(config: dict[str, Any], tmp_path: Path) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is missing: apt-get install prometheus (.ci/run does)")
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = tmp_path / "prometheus.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                if http_get(base + "/-/ready", timeout=2)[0] == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Prometheus did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Prometheus(base)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


LIVE_VALUES = {
    "__rate_interval": "1m",
    "datasource": "prometheus",
    "job": "hutch",
    "instance": ".*",
    "task": ".*",
}
# The alert expressions the workload below makes true for the test queue (always_fails fails
# all its runs, and three messages are dead-lettered). All the others must stay false: one
# crash, one redelivery and one unknown task are under their thresholds, and the queue drains.
LIVE_TRUE = {"HutchTaskFailureRatioHigh", "HutchDeadLetterQueueGrowing"}


async def test_live_prometheus_evaluates_every_dashboard_query_and_alert(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any, tmp_path: Path
) -> None:
    rabbitmq_metric_names()  # the plugin answers, or a clear failure
    # With periodic tasks, so that the schedule panels and alerts have data too.
    worker: WorkerProcess = await start_worker(HUTCH_TASKS="tests.tasks,tests.scheduled_tasks")
    target = worker.metrics_url().removeprefix("http://")
    with prometheus_server(live_config(target), tmp_path) as prom:
        # Every target scraped once before the workload, so counters start from their zeros.
        up = await prom.until("count(up == 1) == 3 and count(up) == 3", timeout=30)
        assert up, prom.query("up")
        await prom.until(f'rabbitmq_detailed_queue_messages{{queue="{queue}.dlq"}}', timeout=15)

        async with AsyncClient(vhost.url, queue=queue, timeout=60) as client:
            results = await asyncio.gather(
                client.map("tests.tasks.spin", [0.05] * 4),
                client.call("tests.tasks.always_fails"),
                client.call("tests.tasks.always_fails"),
                client.call("tests.tasks.crash_first_delivery"),
                client.call("tests.tasks.no_such_task"),
                return_exceptions=True,
            )
        assert isinstance(results[0], list) and len(results[0]) == 4, results
        assert all(isinstance(r, TaskError) for r in results[1:3]), results
        assert isinstance(results[3], str), results
        assert isinstance(results[4], TaskError), results

        # Wait until Prometheus has seen the end of the workload, then a few more scrapes.
        q = f'queue="{queue}"'
        assert await prom.until(
            f'hutch_tasks_finished_total{{{q},task="tests.tasks.always_fails",outcome="failed"}}'
            " == 2",
            timeout=20,
        )
        assert await prom.until(
            f'rabbitmq_detailed_queue_messages{{queue="{queue}.dlq"}} == 3', timeout=20
        )
        await asyncio.sleep(3)

        assert re.fullmatch(r"[\w-]+", queue)  # no regex metacharacters to escape
        values = {**LIVE_VALUES, "queue": queue}
        evaluated, with_data, empty = 0, 0, []
        for where, expr in dashboard_queries(values):
            result = await asyncio.to_thread(prom.query, expr)
            evaluated += 1
            if result:
                with_data += 1
            else:
                empty.append(f"{where}: {expr}")
        assert not empty, "dashboard queries with no data:\n" + "\n".join(empty)

        ours = {queue, f"{queue}.dlq"}
        alerts_with_data = set()
        for rule in alert_rules():
            result = await asyncio.to_thread(prom.query, rule["expr"])
            evaluated += 1
            if result:
                with_data += 1
            if any(r["metric"].get("queue") in ours or "queue" not in r["metric"] for r in result):
                alerts_with_data.add(rule["alert"])
        assert alerts_with_data == LIVE_TRUE

        # The loaded rules themselves evaluate without error.
        groups = (await asyncio.to_thread(prom.api, "rules"))["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert len(rules) == len(alert_rules())
        bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
        assert not bad, bad
        print(f"live Prometheus: {evaluated} queries evaluated, {with_data} returned data")
