"""Celery, configured for at-least-once on RabbitMQ, with the benchmark's task bodies.

Imports nothing from hutch. The benchmark starts it as separate processes:

    python -m celery -A bench.peers.celery_app worker --pool prefork --concurrency 2 ...
    python -m bench.peers.celery_app enqueue noop|spin N [ITERATIONS]   # fill the queue
    python -m bench.peers.celery_app calls N WARMUP    # sequential calls; latencies, JSON
    python -m bench.peers.celery_app config            # the settings below, JSON

Environment: ``BENCH_BROKER_URL`` (the run's vhost), ``BENCH_RESULT_BACKEND`` (``rpc://`` for
the round trip; unset, results are disabled, Celery's default), ``BENCH_PREFILL=1`` (publisher
confirms off while filling the queue: the benchmark counts the queue instead).

Settings, from Celery's documentation: ``task_acks_late`` with ``task_reject_on_worker_lost``
(ack after the task, requeue if its child dies: Celery's at-least-once), prefetch multiplier 1
(recommended with acks_late for long tasks), quorum queues with publisher confirms (the "Using
Quorum Queues" setup of its RabbitMQ page; hutch's queue is a quorum queue too). Everything
else is Celery's default, mingle and gossip included.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import celery
import kombu
from celery import Celery

from bench import bodies

QUEUE = "bench"
SETTINGS: dict[str, Any] = {
    "task_acks_late": True,
    "task_reject_on_worker_lost": True,
    "worker_prefetch_multiplier": 1,
    "task_default_queue": QUEUE,
    "task_default_queue_type": "quorum",
    "worker_detect_quorum_queues": True,
    "broker_transport_options": {"confirm_publish": True},
    # Celery's behaviour anyway; stated, so 5.x does not warn at every start.
    "broker_connection_retry_on_startup": True,
}

app = Celery(
    "bench_peers",
    broker=os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
    backend=os.environ.get("BENCH_RESULT_BACKEND") or None,
)
app.conf.update(SETTINGS)
if os.environ.get("BENCH_PREFILL") == "1":
    app.conf.broker_transport_options = {"confirm_publish": False}

noop = app.task(name="bench.noop")(bodies.noop)
spin = app.task(name="bench.spin")(bodies.spin)


def describe() -> dict[str, Any]:
    return {
        "peer": "celery",
        "versions": {"celery": celery.__version__, "kombu": kombu.__version__},
        "queue": f"{QUEUE} (quorum)",
        "settings": SETTINGS,
        "result_backend": "rpc:// (round trip only; otherwise disabled, the default)",
    }


def enqueue(task: str, n: int, args: list[int]) -> None:
    target = noop if task == "noop" else spin
    for _ in range(n):
        target.apply_async(args)


def calls(n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        noop.apply_async().get(timeout=30)
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        noop.apply_async().get(timeout=30)
        latencies.append(time.perf_counter() - started)
    return latencies


def main(argv: list[str]) -> None:
    command = argv[0]
    if command == "config":
        print(json.dumps(describe()))
    elif command == "enqueue":
        enqueue(argv[1], int(argv[2]), [int(a) for a in argv[3:]])
    elif command == "calls":
        print(json.dumps(calls(int(argv[1]), int(argv[2]))))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
