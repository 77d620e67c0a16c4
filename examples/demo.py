"""Demo: start a hutch worker, push a batch of CPU-heavy tasks through it, print the results.

    python examples/demo.py [--tasks 200] [--limit 30000]

Needs RabbitMQ on HUTCH_BROKER_URL (default amqp://guest:guest@localhost:5672/). The worker
runs as a child process, exactly as ``hutch worker --tasks examples.tasks --queue demo``
would, and is stopped with SIGTERM (a graceful drain) at the end.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service import Client  # noqa: E402 - after the path tweak, so it runs from a checkout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200, help="how many tasks to run")
    parser.add_argument("--limit", type=int, default=30_000, help="count primes below this")
    parser.add_argument("--queue", default="demo")
    options = parser.parse_args()

    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "worker",
            "--tasks",
            "examples.tasks",
            "--queue",
            options.queue,
            "--log-level",
            "WARNING",
        ],
        cwd=ROOT,
    )
    try:
        with Client(queue=options.queue, timeout=120) as client:
            # One warm-up call waits for the worker to be up and consuming.
            client.call("examples.tasks.count_primes", 10)
            inputs = [options.limit + i for i in range(options.tasks)]
            started = time.perf_counter()
            counts = client.map("examples.tasks.count_primes", inputs)
            elapsed = time.perf_counter() - started
        print(f"first results: {list(zip(inputs, counts, strict=True))[:3]} ...")
        print(
            f"{options.tasks} tasks (count primes below ~{options.limit}) in {elapsed:.2f}s: "
            f"{options.tasks / elapsed:.1f} tasks/s on {os.cpu_count()} CPUs"
        )
    finally:
        worker.send_signal(signal.SIGTERM)
        code = worker.wait(60)
    print(f"worker drained and exited with code {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
