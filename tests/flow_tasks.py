"""Tasks the flow tests run: the upload -> (scan || metadata) -> finalize pipeline, and helpers.

Each run records itself to HUTCH_TEST_LOG (see `tests.tasks.record`) with the flow and step
from `current_task()`, so the checker can count steps and terminal outcomes per flow.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from service import current_task, task
from tests.tasks import record


def _flow_record(event: str, **extra: Any) -> None:
    ctx = current_task()
    record(event, flow=ctx.flow, step=ctx.step, **extra)


@task
def upload(name: str, size: int = 4096) -> dict[str, Any]:
    _flow_record("start")
    data = hashlib.sha256(name.encode()).digest() * (size // 32)
    result = {"name": name, "size": len(data), "sha": hashlib.sha256(data).hexdigest()}
    _flow_record("done")
    return result


@task(max_attempts=2, retry_backoff=0.2)
def scan(file: dict[str, Any], fail_if: str = "") -> dict[str, Any]:
    """Fails for good (after its attempts) when the file name contains ``fail_if``."""
    _flow_record("start")
    if fail_if and fail_if in file["name"]:
        raise ValueError(f"infected: {file['name']}")
    digest = hashlib.sha256(file["sha"].encode()).hexdigest()
    _flow_record("done")
    return {"clean": True, "digest": digest[:16]}


@task
def metadata(file: dict[str, Any]) -> dict[str, Any]:
    _flow_record("start")
    words = len(file["name"].split("-"))
    _flow_record("done")
    return {"words": words, "size": file["size"]}


@task
def finalize(results: list[Any], tag: str = "") -> dict[str, Any]:
    _flow_record("start")
    scan_result, meta = results
    out = {"clean": scan_result["clean"], "size": meta["size"], "tag": tag}
    _flow_record("done", terminal="finished")
    return out


@task
def report_failure(flow: str, failed: dict[str, Any], error: dict[str, Any]) -> str:
    _flow_record("start")
    _flow_record("done", terminal="failed", failed=failed, error=error, failed_flow=flow)
    return f"{flow}: {failed['id']} {error['type']}"


@task
def add(x: Any, y: Any = 0) -> Any:
    _flow_record("start")
    _flow_record("done")
    return x + y


@task
def listed(*items: Any) -> list[Any]:
    _flow_record("start")
    _flow_record("done")
    return list(items)


@task
def sleepy(x: Any, seconds: float = 0.05) -> Any:
    _flow_record("start")
    time.sleep(seconds)
    _flow_record("done")
    return x


@task(max_attempts=1)
def boom(*args: Any) -> None:
    _flow_record("start")
    raise RuntimeError("boom")


@task
def pid_of(x: Any = None) -> int:
    return os.getpid()


@task(max_attempts=1)
def scan_while(file: dict[str, Any], flag: str) -> dict[str, Any]:
    """Fails for good while the file ``flag`` exists (a cause an operator fixes, then replays)."""
    _flow_record("start")
    if os.path.exists(flag):
        raise ValueError(f"infected while {flag} exists")
    _flow_record("done")
    return {"clean": True, "digest": file["sha"][:16]}
