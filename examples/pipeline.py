"""Pipeline example: upload -> (virus_scan || extract_metadata) -> finalize, one flow per file.

    python examples/pipeline.py [--files 40] [--size-kb 300] [--infected-every 5]

Generates a directory of PNG images (every ``--infected-every``-th one carries a test "virus"
signature after its image data), starts a worker with the steps in `examples.pipeline_tasks`,
submits one flow per file and waits until every flow has ended, exactly one way: finalize ran
(``finished``) or, because the scan failed for good, report_failure ran (``failed``). Prints
each file's outcome and the throughput; exits 0 if every clean file finished and every infected
one failed, and nothing ended twice.

Needs RabbitMQ on HUTCH_BROKER_URL (default amqp://guest:guest@localhost:5672/). The failed
scans stay in ``QUEUE.dlq`` with their flow and step: ``hutch dlq ls --queue pipeline`` lists
them, ``hutch dlq purge --queue pipeline --yes`` removes them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# After the path tweak, so it runs from a checkout.
from examples.pipeline_tasks import (  # noqa: E402
    PNG_SIGNATURE,
    SIGNATURES,
    extract_metadata,
    finalize,
    report_failure,
    upload,
    virus_scan,
)
from service import Chain, Client, chain, group, step  # noqa: E402

START_TIMEOUT = 60.0  # seconds for the worker to start consuming


# -- the input: a directory of PNG files -------------------------------------------------------


def png(width: int, height: int, pixels: bytes, text: dict[str, str], trailer: bytes) -> bytes:
    """An 8-bit RGB PNG (filter 0 on every row) with tEXt chunks, and bytes after IEND."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    row = 3 * width
    raw = b"".join(b"\0" + pixels[y * row : (y + 1) * row] for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    texts = b"".join(chunk(b"tEXt", f"{k}\0{v}".encode("latin-1")) for k, v in text.items())
    return (
        PNG_SIGNATURE
        + chunk(b"IHDR", header)
        + texts
        + chunk(b"IDAT", zlib.compress(raw, 1))
        + chunk(b"IEND", b"")
        + trailer
    )


def generate(directory: Path, files: int, size_kb: int, infected_every: int) -> dict[str, bool]:
    """Write the images; returns {name: infected?}."""
    rng = random.Random(14)
    side = max(8, int((size_kb * 1024 / 3) ** 0.5))  # noise barely compresses: ~size_kb each
    signatures = list(SIGNATURES.values())
    expected = {}
    for i in range(files):
        name = f"upload-{i:03d}.png"
        infected = infected_every > 0 and i % infected_every == infected_every - 1
        # A payload appended after the image, as droppers do: invisible to an image viewer.
        trailer = rng.randbytes(512) + signatures[i % len(signatures)] if infected else b""
        data = png(side, side, rng.randbytes(3 * side * side), {"Title": name}, trailer)
        (directory / name).write_bytes(data)
        expected[name] = infected
    return expected


# -- the worker --------------------------------------------------------------------------------


def start_worker(queue: str, log_file: Any) -> subprocess.Popen[bytes]:
    """``hutch worker --tasks examples.pipeline_tasks --queue QUEUE`` as a child process."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "service.cli",
            "worker",
            "--tasks",
            "examples.pipeline_tasks",
            "--queue",
            queue,
            "--log-level",
            "WARNING",
        ],
        cwd=ROOT,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )


def wait_until_consuming(client: Client, worker: subprocess.Popen[bytes], log: Path) -> bool:
    """True once the worker consumes the queue; False (after saying why) if it exited first."""
    deadline = time.monotonic() + START_TIMEOUT
    while client.consumer_count() == 0:
        if worker.poll() is not None or time.monotonic() > deadline:
            why = (
                f"exited with code {worker.returncode} before it started"
                if worker.poll() is not None
                else f"did not start consuming within {START_TIMEOUT:g}s"
            )
            print(f"pipeline: the worker {why}:")
            print(log.read_text(errors="replace").strip() or "(it printed nothing)")
            return False
        time.sleep(0.1)
    return True


# -- the flows ---------------------------------------------------------------------------------


def pipeline(path: Path, outbox: Path) -> Chain:
    """The flow for one file: the users' code (README, "Pipelines")."""
    return chain(
        step(upload, str(path)),
        group(step(virus_scan), step(extract_metadata)),  # run in parallel
        step(finalize, str(outbox)),  # gets [scan_result, metadata_result]
        on_error=step(report_failure, str(outbox)),  # gets flow id, failed step, error
    )


def outcomes(outbox: Path) -> dict[str, list[dict[str, Any]]]:
    """Every outcome filed so far: {flow id: [outcome, ...]} (more than one: it ended twice)."""
    found: dict[str, list[dict[str, Any]]] = {}
    for path in outbox.iterdir():
        if path.suffix in (".finished", ".failed") and not path.name.startswith("."):
            found.setdefault(path.stem, []).append(json.loads(path.read_text()))
    return found


def wait_for_outcomes(outbox: Path, flows: set[str], timeout: float) -> float | None:
    """Seconds until every flow has an outcome (polled every 20 ms); None on timeout."""
    deadline = time.monotonic() + timeout
    while not flows <= outcomes(outbox).keys():
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)
    return time.monotonic()


def describe(outcome: dict[str, Any]) -> str:
    if outcome["outcome"] == "finished":
        return (
            f"finished  {outcome['width']}x{outcome['height']} px, sha256 "
            f"{outcome['sha256'][:12]}, entropy {outcome['max_entropy']:.2f} bits/byte"
        )
    failed, error = outcome["failed"], outcome["error"]
    return (
        f"failed    at step {failed['id']} ({failed['task'].rsplit('.', 1)[-1]}): "
        f"{error['type']}: {error['message']}"
    )


def report(
    expected: dict[str, bool], flows: dict[str, str], found: dict[str, list[dict[str, Any]]]
) -> bool:
    """Print each file's outcome; True if each flow ended once, the way its file says."""
    ok = True
    for name, infected in sorted(expected.items()):
        ended = found.get(flows[name], [])
        kinds = [o["outcome"] for o in ended]
        want = "failed" if infected else "finished"
        if kinds != [want]:
            ok = False
            print(f"{name}  WRONG: expected {want}, got {kinds or 'nothing'}")
        else:
            print(f"{name}  {describe(ended[0])}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=40, help="how many files (flows)")
    parser.add_argument("--size-kb", type=int, default=300, help="about how big each file is")
    parser.add_argument(
        "--infected-every", type=int, default=5, help="every N-th file is infected (0: none)"
    )
    parser.add_argument("--queue", default="pipeline")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for the flows")
    options = parser.parse_args()
    if options.files < 1 or options.size_kb < 1:
        parser.error("--files and --size-kb must be at least 1")

    with (
        tempfile.TemporaryDirectory(prefix="hutch-pipeline-") as scratch,
        tempfile.NamedTemporaryFile(prefix="hutch-pipeline-", suffix=".log") as log_file,
    ):
        inbox, outbox, log = Path(scratch, "in"), Path(scratch, "out"), Path(log_file.name)
        inbox.mkdir()
        outbox.mkdir()
        expected = generate(inbox, options.files, options.size_kb, options.infected_every)
        total_mb = sum(p.stat().st_size for p in inbox.iterdir()) / 1e6
        infected = sum(expected.values())
        print(f"{options.files} files ({total_mb:.1f} MB, {infected} infected) in {inbox}")

        worker = start_worker(options.queue, log_file)
        started_ok = False
        try:
            with Client(queue=options.queue, timeout=120) as client:
                if not wait_until_consuming(client, worker, log):
                    return 1
                started_ok = True
                started = time.monotonic()
                flows = {
                    name: client.submit(pipeline(inbox / name, outbox)) for name in sorted(expected)
                }
                submitted = time.monotonic()
                ended = wait_for_outcomes(outbox, set(flows.values()), options.timeout)
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
            code = worker.wait(60)
            if started_ok:
                sys.stdout.write(log.read_text(errors="replace"))  # its warnings, if any
        # The worker has drained and exited: nothing can still end a flow a second time.
        all_once = report(expected, flows, outcomes(outbox))
    if ended is None:
        print(f"pipeline: not every flow ended within {options.timeout:g}s")
        return 1
    seconds = ended - started
    print(
        f"{options.files} flows ({options.files - infected} finished, {infected} failed) in "
        f"{seconds:.2f}s: {options.files / seconds:.1f} flows/s, {total_mb / seconds:.1f} MB/s "
        f"on {os.cpu_count()} CPUs (submitting took {submitted - started:.2f}s)"
    )
    print(f"each flow ended exactly once, as expected: {'yes' if all_once else 'NO'}")
    print(f"worker drained and exited with code {code}")
    if infected:
        print(f"the failed scans are in {options.queue}.dlq: hutch dlq ls --queue {options.queue}")
    return 0 if all_once and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
