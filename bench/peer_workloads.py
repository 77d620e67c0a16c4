"""The benchmark's workloads run through Celery and Dramatiq (``bench/run.py --peers``).

Each run, like hutch's, gets its own vhost. The peer's own client fills its queue (in a
process of its own, so nothing of the peer is imported here), the peer's worker is started as
its documentation suggests, and the drain is timed the same way as hutch's
(`bench.workloads.time_drain`). The apps are in `bench.peers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from bench.harness import (
    BenchError,
    Probe,
    Proc,
    clean_env,
    confirming_channel,
    loadavg,
    memory,
    redis_server,
    running,
    vhost,
)
from bench.workloads import percentiles, time_drain, time_startup


@dataclass(frozen=True)
class Peer:
    name: str  # as the table shows it
    module: str  # the app, in bench.peers
    package: str  # what must be importable

    def worker(self, url: str, concurrency: int, env: dict[str, str]) -> Proc:
        if self.package == "celery":
            argv = ["-m", "celery", "-A", self.module, "worker", "--pool", "prefork"]
            argv += ["--concurrency", str(concurrency), "--loglevel", "WARNING"]
        else:  # dramatiq: its default 8 threads per process
            argv = ["-m", "dramatiq", self.module, "--processes", str(concurrency)]
        return Proc(f"{self.name} worker", [sys.executable, *argv], self.env(url, env))

    def worker_command(self, concurrency: int) -> str:
        proc = self.worker("URL", concurrency, {})
        return " ".join(["python", *proc.argv[1:]])

    def env(self, url: str, extra: dict[str, str]) -> dict[str, str]:
        return clean_env(BENCH_BROKER_URL=url, **extra)

    async def client(self, url: str, *args: str, env: dict[str, str] | None = None) -> str:
        """Run ``python -m MODULE ARGS`` (the peer's own client) to the end; its stdout."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            *args,
            env=self.env(url, env or {}),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            async with asyncio.timeout(600):
                out, err = await proc.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            tail = "\n".join(err.decode(errors="replace").splitlines()[-15:])
            raise BenchError(
                f"{self.name} client {' '.join(args)} exited {proc.returncode}:\n{tail}"
            )
        return out.decode()


CELERY = Peer("Celery", "bench.peers.celery_app", "celery")
DRAMATIQ = Peer("Dramatiq", "bench.peers.dramatiq_app", "dramatiq")
PEERS = (CELERY, DRAMATIQ)
QUEUE = "bench"  # both apps' queue (bench.peers.*.QUEUE)


async def describe(peer: Peer, concurrency: int) -> dict[str, Any]:
    """The peer's configuration as its app reports it, or why it cannot run."""
    try:
        out = await peer.client("amqp://unused/", "config")
    except BenchError as exc:
        return {"peer_name": peer.name, "error": str(exc).splitlines()[-1]}
    return {
        "peer_name": peer.name,
        **json.loads(out),
        "worker_command": peer.worker_command(concurrency),
    }


async def _filled(peer: Peer, url: str, task: str, args: list[Any], n: int) -> None:
    await peer.client(url, "enqueue", task, str(n), *map(str, args), env={"BENCH_PREFILL": "1"})


async def drain(
    peer: Peer, task: str, args: list[Any], n: int, *, concurrency: int, poll: float, quick: bool
) -> dict[str, Any]:
    """Fill the peer's queue with ``n`` tasks, start its worker, time the drain like hutch's."""
    async with vhost(delete_in_background=quick) as v:
        await _filled(peer, v.url, task, args, n)
        async with confirming_channel(v.url) as (_, channel):
            probe = Probe(channel, QUEUE)
            await probe.wait_ready(n)
            proc = peer.worker(v.url, concurrency, {})
            load = loadavg()
            async with running(proc):
                result: dict[str, Any] = dict(await time_drain(probe, n, proc, poll))
                result["ack_confirm_s"] = await v.wait_all_acked(QUEUE)
                result["memory"] = memory(proc.pid)
            result["loadavg"] = load
            return result


async def startup(peer: Peer, *, concurrency: int, quick: bool) -> dict[str, Any]:
    """Spawn the peer's worker with one task waiting; seconds until that task's ack."""
    async with vhost(delete_in_background=quick) as v:
        await _filled(peer, v.url, "noop", [], 1)
        async with confirming_channel(v.url) as (_, channel):
            await Probe(channel, QUEUE).wait_ready(1)
        return await time_startup(lambda url: peer.worker(url, concurrency, {}), v)


def redis_installed() -> bool:
    return shutil.which("redis-server") is not None


@contextlib.asynccontextmanager
async def redis_for(peers: list[Peer]) -> AsyncIterator[str | None]:
    """A Redis server for Dramatiq's results while the round trips run, if one is wanted."""
    exe = shutil.which("redis-server")
    if DRAMATIQ not in peers or exe is None:
        yield None
        return
    async with redis_server(exe) as url:
        yield url


async def roundtrip(
    peer: Peer, *, calls: int, warmup: int, concurrency: int, quick: bool, redis: str | None
) -> dict[str, Any]:
    """``calls`` sequential calls of noop through the peer's client and result backend."""
    if peer is CELERY:
        env = {"BENCH_RESULT_BACKEND": "rpc://"}
    elif redis is None:
        raise BenchError("redis-server is not installed: Dramatiq's results need Redis")
    else:
        env = {"BENCH_REDIS_URL": redis}
    async with vhost(delete_in_background=quick) as v:
        proc = peer.worker(v.url, concurrency, env)
        load = loadavg()
        async with running(proc):
            started = time.perf_counter()
            out = await peer.client(v.url, "calls", str(calls), str(warmup), env=env)
            proc.check_alive()
        result = percentiles(json.loads(out))
        result["client_s"] = time.perf_counter() - started
        result["loadavg"] = load
        return result
