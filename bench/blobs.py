"""Large data by reference, measured: a 200 MB argument end to end, and a 1 GiB input.

``python -m bench.blobs [--size-mb 200] [--big-gib 1]`` runs, in a fresh vhost, one worker
(``--concurrency 1``) with a ``file://`` store in a temporary directory, and:

1. writes a generated file of ``--size-mb`` MB to /tmp, then times ``Client.put_file`` plus
   ``Client.call(bench.tasks.digest_path, ref)`` (the task reads the blob as a path) against
   writing the same file straight into the store's directory (copy and fsync, the least any
   hand-over through a shared volume costs);
2. reads what the broker carried from the management API: the body bytes of a task message
   with such an argument while it waits in the queue (published before the worker starts),
   and the octets the broker received and sent on the client's and the worker's connections
   (both still open) over the timed call;
3. takes the worker parent's resident memory (VmRSS) before and after, and after a sparse
   ``--big-gib`` GiB file is passed the same way.

Every file is deleted afterwards. Figures are printed as JSON; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from bench.harness import vhost as fresh_vhost
from service import Client

ROOT = Path(__file__).resolve().parent.parent
MANAGEMENT = "http://127.0.0.1:15672"


def management(path: str) -> Any:
    request = urllib.request.Request(
        MANAGEMENT + path,
        headers={"Authorization": "Basic " + base64.b64encode(b"guest:guest").decode()},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def generate(path: Path, size: int) -> None:
    """``size`` bytes that do not compress or repeat per MiB (urandom, one MiB at a time)."""
    with open(path, "wb") as out:
        left = size
        while left:
            n = min(left, 1 << 20)
            out.write(os.urandom(n))
            left -= n


def direct_copy(source: Path, directory: Path) -> float:
    started = time.perf_counter()
    target = directory / "direct.bin"
    with open(source, "rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
        dst.flush()
        os.fsync(dst.fileno())
    elapsed = time.perf_counter() - started
    target.unlink()
    return elapsed


async def wait_consuming(log: Path, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while "consuming from" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log.read_text(errors="replace"))
        await asyncio.sleep(0.1)


async def run(size_mb: int, big_gib: float) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="hutch-bench-blobs-", dir="/tmp"))
    store_root = work / "store"
    store_root.mkdir()
    queued = work / "queued.bin"
    source = work / "input.bin"
    big = work / "big.bin"
    figures: dict[str, Any] = {"size_bytes": size_mb * 1_000_000}
    proc: subprocess.Popen[bytes] | None = None
    try:
        generate(queued, size_mb * 1_000_000)
        generate(source, size_mb * 1_000_000)  # other bytes: a fresh blob, not a re-put
        async with fresh_vhost() as vh:
            queue = "blobs"
            url = f"file://{store_root}"
            env = {k: v for k, v in os.environ.items() if not k.startswith("HUTCH_")}
            env |= {"HUTCH_BROKER_URL": vh.url, "HUTCH_STORE_URL": url}
            client_options: dict[str, Any] = {"queue": queue, "store": url, "timeout": 600}

            def submit_first() -> tuple[float, str]:
                with Client(vh.url, **client_options) as client:
                    started = time.perf_counter()
                    ref = client.put_file(queued)
                    client.submit("bench.tasks.digest_path", ref)
                    return time.perf_counter() - started, ref.sha256

            # Published before any worker runs, so the message can be weighed in the queue.
            await asyncio.to_thread(submit_first)
            for _ in range(40):
                info = management(f"/api/queues/{urllib.parse.quote(vh.name, safe='')}/{queue}")
                if info.get("messages", 0) >= 1 and "message_bytes" in info:
                    break
                await asyncio.sleep(0.5)
            figures["queued_message_body_bytes"] = info.get("message_bytes")
            log = work / "worker.log"
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "service.cli", "worker", "--tasks", "bench.tasks",
                     "--queue", queue, "--concurrency", "1", "--metrics-addr", "off",
                     "--log-level", "INFO"],
                    cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            await wait_consuming(log, proc)
            await vh.wait_all_acked(queue, timeout=300)  # the queued one is done
            figures["parent_rss_kib_before"] = rss_kib(proc.pid)

            def call_timed(path: Path, octets: bool = False) -> tuple[float, Any]:
                with Client(vh.url, **client_options) as client:
                    started = time.perf_counter()
                    ref = client.put_file(path)
                    result = client.call("bench.tasks.digest_path", ref)
                    seconds = time.perf_counter() - started
                    assert result["sha256"] == ref.sha256, result
                    if octets:
                        # While this client's connection and the worker's are both open: the
                        # management API counts live connections, sampled every 5 s.
                        time.sleep(6)
                        stats = management(f"/api/vhosts/{urllib.parse.quote(vh.name, safe='')}")
                        figures["vhost_recv_oct"] = stats.get("recv_oct")
                        figures["vhost_send_oct"] = stats.get("send_oct")
                        figures["vhost_messages_published"] = stats.get("message_stats", {}).get(
                            "publish"
                        )
                    return seconds, result

            seconds, result = await asyncio.to_thread(call_timed, source, True)
            figures["end_to_end_seconds"] = round(seconds, 3)
            figures["direct_write_seconds"] = round(direct_copy(source, store_root), 3)
            figures["ratio_end_to_end_vs_direct"] = round(
                figures["end_to_end_seconds"] / figures["direct_write_seconds"], 2
            )
            figures["parent_rss_kib_after_200mb"] = rss_kib(proc.pid)

            with open(big, "wb") as f:  # sparse: no disk used until the store copies it
                f.truncate(int(big_gib * (1 << 30)))
            seconds, result = await asyncio.to_thread(call_timed, big)
            figures["big_bytes"] = result["size"]
            figures["big_end_to_end_seconds"] = round(seconds, 3)
            figures["parent_rss_kib_after_big"] = rss_kib(proc.pid)
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.blobs", description=__doc__)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--big-gib", type=float, default=1.0)
    options = parser.parse_args()
    print(json.dumps(asyncio.run(run(options.size_mb, options.big_gib)), indent=2))


if __name__ == "__main__":
    main()
