"""Demo: start a hutch worker, push a batch of CPU-heavy tasks through it, print the results.

    python examples/demo.py [--tasks 200] [--limit 30000]

Needs RabbitMQ on HUTCH_BROKER_URL (default amqp://guest:guest@localhost:5672/). The worker
runs as a child process, exactly as ``hutch worker --tasks examples.tasks --queue demo``
would, and is stopped with SIGTERM (a graceful drain) at the end. If the worker cannot start
(the metrics port is taken, the broker refuses it, ...), the demo says why and exits 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service import Client  # noqa: E402 - after the path tweak, so it runs from a checkout

START_TIMEOUT = 60.0  # seconds for the worker to start consuming


def wait_until_consuming(client: Client, worker: subprocess.Popen[bytes], log: Path) -> bool:
    """True once the worker consumes the queue; False (after saying why) if it exited first."""
    deadline = time.monotonic() + START_TIMEOUT
    while client.consumer_count() == 0:
        if worker.poll() is not None:
            print(f"demo: the worker exited with code {worker.returncode} before it started:")
            print(log.read_text(errors="replace").strip() or "(it printed nothing)")
            return False
        if time.monotonic() > deadline:
            print(f"demo: the worker did not start consuming within {START_TIMEOUT:g}s:")
            print(log.read_text(errors="replace").strip() or "(it printed nothing)")
            return False
        time.sleep(0.1)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200, help="how many tasks to run")
    parser.add_argument("--limit", type=int, default=30_000, help="count primes below this")
    parser.add_argument("--queue", default="demo")
    options = parser.parse_args()

    with tempfile.NamedTemporaryFile(prefix="hutch-demo-", suffix=".log") as log_file:
        log = Path(log_file.name)
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
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        started_ok = False
        try:
            with Client(queue=options.queue, timeout=120) as client:
                if not wait_until_consuming(client, worker, log):
                    return 1
                started_ok = True
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
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
            code = worker.wait(60)
            if started_ok:
                sys.stdout.write(log.read_text(errors="replace"))  # its warnings, if any
    print(f"worker drained and exited with code {code}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
