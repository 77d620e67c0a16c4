"""Helpers for tests of the operator commands: run ``hutch`` and plant dead letters."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from service import protocol, routing
from service.errors import ManagementUnavailable
from service.ops.management import ManagementAPI
from tests.conftest import BROKER, ROOT, Broker, Vhost

MANAGEMENT_URL = "http://127.0.0.1:15672"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def hutch_env(vhost: Vhost | None, **env: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HUTCH_")}
    if vhost is not None:
        base["HUTCH_BROKER_URL"] = vhost.url
    return {**base, **env}


async def hutch(
    vhost: Vhost | None,
    *args: str,
    stdin: str | None = None,
    timeout: float = 60,
    **env: str,
) -> Run:
    """Run ``hutch ARGS`` in a subprocess against ``vhost``; stdout and stderr are captured."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service.cli",
        *args,
        cwd=ROOT,
        env=hutch_env(vhost, **env),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(
        proc.communicate(stdin.encode() if stdin is not None else None), timeout
    )
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def dead_letter(
    broker: Broker,
    queue: str,
    task: str | None,
    *args: Any,
    reason: str = "failed",
    error_type: str = "ValueError",
    error_message: str = "boom",
    attempt: int = 3,
    dead_at: float | None = None,
    message_id: str | None = None,
    **props: Any,
) -> str:
    """Put a dead letter in ``queue``'s DLQ exactly as a worker writes one; returns its id."""
    headers: dict[str, Any] = {
        protocol.REASON_HEADER: reason,
        protocol.ERROR_TYPE_HEADER: error_type,
        protocol.ERROR_MESSAGE_HEADER: error_message,
        protocol.QUEUE_HEADER: queue,
        protocol.DEAD_AT_HEADER: int((dead_at or time.time()) * 1000),
        protocol.ATTEMPT_HEADER: attempt,
    }
    return await broker.publish(
        routing.dlq_name(queue), task, *args, headers=headers, message_id=message_id, **props
    )


def no_traceback(run: Run) -> None:
    assert "Traceback" not in run.err, run
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1, run
    assert lines[0].startswith("hutch: error: "), run


def _credentials() -> tuple[str, str]:
    user, _, rest = BROKER.partition(":")
    return user, rest.partition("@")[0]


def require_management() -> ManagementAPI:
    """The local management API; skips the test without it, except in CI (.ci/run enables it)."""
    user, password = _credentials()
    api = ManagementAPI(MANAGEMENT_URL, user=user, password=password)
    deadline = time.monotonic() + 20  # the plugin may have been enabled moments ago
    while True:
        try:
            api.get("overview")
            return api
        except ManagementUnavailable as exc:
            if time.monotonic() > deadline:
                if os.environ.get("CI"):
                    pytest.fail(f"management API needed in CI: {exc}")
                pytest.skip(f"needs rabbitmq_management: {exc}")
            time.sleep(0.5)


def publish_over_http(vhost: Vhost, routing_key: str, body: bytes, properties: Any) -> None:
    """Publish through the management API: the one way here to send a message with no
    message_id (aiormq always invents one)."""
    api = require_management()
    request = urllib.request.Request(
        f"{api.url}/api/exchanges/{quote(vhost.name, safe='')}/amq.default/publish",
        data=json.dumps(
            {
                "routing_key": routing_key,
                "payload": base64.b64encode(body).decode(),
                "payload_encoding": "base64",
                "properties": properties,
            }
        ).encode(),
        headers={
            "Authorization": "Basic "
            + base64.b64encode(":".join(_credentials()).encode()).decode(),
            "Content-Type": "application/json",
        },
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.load(response)["routed"] is True
