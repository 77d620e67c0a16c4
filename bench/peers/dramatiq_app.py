"""Dramatiq on RabbitMQ, at its defaults for at-least-once, with the benchmark's task bodies.

Imports nothing from hutch. The benchmark starts it as separate processes:

    python -m dramatiq bench.peers.dramatiq_app --processes 2    # the worker (8 threads each)
    python -m bench.peers.dramatiq_app enqueue noop|spin N [ITERATIONS]   # fill the queue
    python -m bench.peers.dramatiq_app calls N WARMUP    # sequential calls; latencies, JSON
    python -m bench.peers.dramatiq_app config            # the settings below, JSON

Environment: ``BENCH_BROKER_URL`` (the run's vhost), ``BENCH_REDIS_URL`` (the round trip only:
the Results middleware on a Redis backend, and actors that store results), ``BENCH_PREFILL=1``
(publisher confirms off while filling the queue: the benchmark counts the queue instead).

Dramatiq acks only after the actor returns, always, so its defaults are at-least-once on the
worker side; ``confirm_delivery=True`` makes ``send`` wait for the broker's confirm, which its
documentation offers for publishers that must not lose a message. Its queues are the classic
durable queues it declares itself (it has no quorum-queue option); default middleware.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import dramatiq
import pika
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from bench import bodies

QUEUE = "bench"
REDIS_URL = os.environ.get("BENCH_REDIS_URL")

broker = RabbitmqBroker(
    url=os.environ.get("BENCH_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672/%2F"),
    confirm_delivery=os.environ.get("BENCH_PREFILL") != "1",
)
if REDIS_URL:
    broker.add_middleware(Results(backend=RedisBackend(url=REDIS_URL)))  # type: ignore[no-untyped-call]
dramatiq.set_broker(broker)

_options: dict[str, Any] = {"store_results": True} if REDIS_URL else {}
noop = dramatiq.actor(actor_name="noop", queue_name=QUEUE, **_options)(bodies.noop)
spin = dramatiq.actor(actor_name="spin", queue_name=QUEUE, **_options)(bodies.spin)


def describe() -> dict[str, Any]:
    return {
        "peer": "dramatiq",
        "versions": {"dramatiq": dramatiq.__version__, "pika": pika.__version__},
        "queue": f"{QUEUE} (classic, durable, dead letters to {QUEUE}.XQ; as Dramatiq declares it)",
        "settings": {
            "broker": "RabbitmqBroker(confirm_delivery=True)",
            "middleware": [type(m).__name__ for m in broker.middleware],
            "worker": "processes 2, threads 8 each (its default), prefetch 2 x threads per process",
        },
        "result_backend": "Redis via the Results middleware (round trip only)",
    }


def enqueue(task: str, n: int, args: list[int]) -> None:
    target = noop if task == "noop" else spin
    for _ in range(n):
        target.send(*args)
    broker.close()


def calls(n: int, warmup: int) -> list[float]:
    def call() -> None:
        noop.send().get_result(block=True, timeout=30_000)

    for _ in range(warmup):
        call()
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
    broker.close()
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
