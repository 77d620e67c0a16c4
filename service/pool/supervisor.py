"""The per-host process pool, supervised from the event loop.

Each child is a fresh interpreter (``python -m service.pool.child``, so nothing is forked from
the running loop) that runs one job at a time, in the order its frames arrive. The stdlib
`ProcessPoolExecutor` fails every in-flight future when one child dies; here a death is blamed
on exactly one job and the other children keep running.

Where a job is, from `Pool.submit` to ``on_done``::

    submit(job) ──▶ _pending (Lanes) ──_dispatch/_fill──▶ _Child.jobs (deque) ──stdin──▶ child
                     ▲      ▲                                 │ jobs[0] is running (its head);
                     │      └── bystanders of a dead child ───┤ the rest are queued behind it
      take_pending ◀─┘          (front of the queue, unreported)│
                                                              ▼
    on_done(job, outcome) ◀── _on_result (pipe callback) ◀── stdout: ResultFrame per job
                          ◀── _on_exit: head CRASHED / TIMEOUT, doomed RETURNED

- ``_pending``: jobs accepted and not yet sent to a child, in one priority lane per queue
  (`service.pool.lanes`: the earliest queue's jobs go first). Once per loop turn (`_fill`, one
  ``write`` per child) idle children get one each, then children are topped up behind short
  tasks, as `service.pool.pipelining` allows.
- ``_Child.jobs``: what one child holds, in the order sent. Only the head has started: its
  clock (``Job.started``) and hard time limit (``_Child.timer``) start when it becomes the head.
- A job leaves through ``on_done`` exactly once: with the child's outcome, or CRASHED/TIMEOUT
  (the head of a child that died or was killed at its limit), or RETURNED (abandoned with
  `abort`, or left when the pool closes). Jobs queued behind a dead head never ran, or were cut
  short through no fault of their own: they go back to the front of ``_pending`` unreported.

A child's pipe carries length-prefixed frames (`service.pool.pipe`); the parent splits them as
the bytes arrive, in the pipe's protocol callback (no task wakes up per result), and never
decodes task arguments or results.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from service.errors import PoolStartError
from service.logs import task_fields
from service.pool.jobs import Job, Outcome, OutcomeKind, RestartReason, timeout_outcome
from service.pool.lanes import Lanes
from service.pool.pipe import FAILED, HEADER, READY, JobFrame, ResultFrame
from service.pool.pipelining import TOP_UP_BELOW, Pipelining

log = logging.getLogger(__name__)

_STARTUP_TIMEOUT = 60.0
_RESPAWN_BACKOFF_MAX = 10.0


class _ChildPipe(asyncio.subprocess.SubprocessStreamProtocol):
    """The child's stdout, split into frames in `pipe_data_received` and handed to
    ``on_frame``: one callback per result instead of a reader task waking for each."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=1 << 16, loop=loop)
        self._buffer = bytearray()
        self.on_frame: Callable[[bytes], None] | None = None  # set once the child is adopted
        self.hello: asyncio.Future[bytes] = loop.create_future()  # the first frame, or b""
        self.closed: asyncio.Future[None] = loop.create_future()  # stdout reached EOF

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if fd != 1 or isinstance(data, str):
            super().pipe_data_received(fd, data)
            return
        buffer = self._buffer
        buffer += data
        offset = 0
        while len(buffer) - offset >= HEADER.size:
            end = offset + HEADER.size + HEADER.unpack_from(buffer, offset)[0]
            if len(buffer) < end:
                break
            frame = bytes(buffer[offset + HEADER.size : end])
            offset = end
            if self.on_frame is not None:
                self.on_frame(frame)
            elif not self.hello.done():
                self.hello.set_result(frame)
        del buffer[:offset]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        super().pipe_connection_lost(fd, exc)
        if fd == 1:
            if not self.hello.done():
                self.hello.set_result(b"")
            if not self.closed.done():
                self.closed.set_result(None)


@dataclass(eq=False)
class _Child:
    proc: asyncio.subprocess.Process
    pipe: _ChildPipe
    jobs: deque[Job] = field(default_factory=deque)  # in the order sent; jobs[0] is running
    timer: asyncio.TimerHandle | None = None  # the hard time limit of jobs[0]
    timed_out: Job | None = None
    aborting: bool = False
    doomed: set[Job] = field(default_factory=set)  # what it is being killed for (abort)
    retiring: RestartReason | None = None
    tasks_done: int = 0
    baseline_rss: int = 0
    rss: int = 0
    cpu_seconds: float = 0.0
    reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class Pool:
    """N children, each running one job with a few more queued behind it when they are short;
    jobs beyond that wait in a local queue.

    Idle children are filled first; more jobs go to a child only behind short ones (see
    `service.pool.pipelining`). The module docstring draws where a job is at each step.

    Outcomes go to ``on_done(job, outcome)`` (a keyword argument, or the attribute, set before
    the first job is submitted).

    Options (keyword arguments):

    - ``size``: number of children.
    - ``time_limit``: default hard limit in seconds for tasks that set none.
    - ``max_depth`` / ``max_result_size``: decoding and result caps applied in the children.
    - ``memory_limit``: ``RLIMIT_AS`` per child in bytes (0: none); a task over it gets
      `MemoryError` instead of pushing the host into the OOM killer.
    - ``max_tasks_per_child``: recycle a child after this many jobs (0: never).
    - ``max_memory_per_child``: recycle a child whose resident memory grew this many bytes above
      its baseline, taken after its first job so a fresh child never starts over the limit
      (0: never).
    """

    def __init__(
        self,
        modules: Sequence[str],
        *,
        size: int,
        time_limit: float,
        max_depth: int,
        max_result_size: int,
        memory_limit: int = 0,
        max_tasks_per_child: int = 0,
        max_memory_per_child: int = 0,
        on_restart: Callable[[RestartReason], None] | None = None,
        on_done: Callable[[Job, Outcome], None] | None = None,
        lanes: int = 1,
    ) -> None:
        if size < 1:
            raise ValueError("pool size must be at least 1")
        self.size = size
        self._modules = list(modules)
        self.on_done = on_done or _unwired
        self._on_restart = on_restart
        self._time_limit = time_limit
        self._max_depth = max_depth
        self._max_result_size = max_result_size
        self._memory_limit = memory_limit
        self._max_tasks = max_tasks_per_child
        self._max_memory = max_memory_per_child
        self._children: set[_Child] = set()
        self._pending = Lanes(lanes)
        self.pipelining = Pipelining()
        self._filling = False  # a `_fill` is scheduled for this loop turn
        self._ids = itertools.count(1)
        self._closing = False
        self._respawns: set[asyncio.Task[None]] = set()
        self._retired_cpu = 0.0
        self.respawn_failures = 0  # consecutive failures to start a replacement child
        self._loop = asyncio.get_running_loop()

    # -- public surface -------------------------------------------------------------------

    async def start(self) -> None:
        children = await asyncio.gather(
            *(self._spawn() for _ in range(self.size)), return_exceptions=True
        )
        errors = [c for c in children if isinstance(c, BaseException)]
        for child in children:
            if isinstance(child, _Child):
                self._adopt(child)
        if errors:
            await self.close(timeout=0)
            raise errors[0]

    def launch(self, *, at_once: int | None = None) -> asyncio.Task[None]:
        """Spawn the children; the task returned ends when the first one is ready.

        The worker calls this before it imports the broker side, so the interpreters boot
        while it does, and consumes as soon as one child can run a job: a job waiting in the
        parent for the second child is no worse off than one waiting in the queue. The others
        join as they come up (`submit` queues until then); one that fails after another is up
        is retried as a replacement would be. The task raises the first `PoolStartError` when
        none started, and the pool is closed then.

        ``at_once`` (default: all of them) children boot now and the rest once the first is
        ready. Booting interpreters and the parent's own imports compete for the same cores,
        so the worker leaves one core to the parent: on 2 cores, spawning both children at
        once made the first ready 200 ms after the spawn instead of about 80.
        """
        first = self.size if at_once is None else max(1, min(at_once, self.size))
        # Created here, not inside the returned task, so that they run (and fork) on the
        # caller's next await, before whatever it does after.
        spawns = [self._loop.create_task(self._spawn()) for _ in range(first)]
        return self._loop.create_task(self._first_up(spawns, later=self.size - first))

    async def _first_up(self, spawns: list[asyncio.Task[_Child]], *, later: int) -> None:
        waiting = set(spawns)
        errors: list[BaseException] = []
        while waiting:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is None:
                    self._adopt(task.result())
                else:
                    errors.append(error)
            if self._children:
                break
        if not self._children:
            await self.close(timeout=0)
            raise errors[0]
        waiting |= {self._loop.create_task(self._spawn()) for _ in range(later)}
        for task in waiting:
            joining = self._loop.create_task(self._join(task))
            self._respawns.add(joining)
            joining.add_done_callback(self._respawns.discard)
        for error in errors:
            log.error("a pool child did not start: %s; starting another", error)
            self._respawn_quietly()

    async def _join(self, spawning: asyncio.Task[_Child]) -> None:
        """A child launched with the first, still booting: adopt it, or replace it."""
        try:
            child = await spawning
        except asyncio.CancelledError:
            spawning.cancel()
            raise
        except (PoolStartError, OSError) as exc:
            log.error("a pool child did not start: %s; starting another", exc)
            if not self._closing:
                await self._respawn_until_up()
            return
        if self._closing:
            self._close_stdin(child)
            await child.proc.wait()
            return
        self._adopt(child)

    def _respawn_quietly(self) -> None:
        """Start a replacement for a child that never ran (no restart is counted)."""
        if not self._closing:
            task = self._loop.create_task(self._respawn_until_up())
            self._respawns.add(task)
            task.add_done_callback(self._respawns.discard)

    def submit(self, job: Job) -> None:
        """Queue a job; it starts as soon as a child is idle."""
        self._pending.append(job)
        self._dispatch()

    @property
    def in_flight(self) -> int:
        """Jobs accepted and not yet reported: running plus waiting."""
        return len(self._pending) + sum(len(c.jobs) for c in self._children)

    @property
    def running(self) -> int:
        """Jobs a child is running: one per child holding any."""
        return sum(1 for c in self._children if c.jobs)

    @property
    def alive(self) -> int:
        return sum(1 for c in self._children if c.proc.returncode is None)

    def child_pids(self) -> list[int]:
        return sorted(c.pid for c in self._children)

    @property
    def waiting(self) -> int:
        """Jobs not running yet: in the local queue or queued in a child behind its head."""
        return len(self._pending) + sum(max(len(c.jobs) - 1, 0) for c in self._children)

    def waiting_in(self, lane: int) -> int:
        """Jobs of ``lane`` received and not started: in the parent, or queued in a child."""
        queued = sum(1 for c in self._children for job in list(c.jobs)[1:] if job.lane == lane)
        return self._pending.waiting(lane) + queued

    def cpu_seconds(self) -> float:
        """CPU used by all children so far, retired ones included, as last reported."""
        return self._retired_cpu + sum(c.cpu_seconds for c in self._children)

    def resident_bytes(self) -> int:
        return sum(c.rss for c in self._children)

    def take_pending(self, where: Callable[[Job], bool] | None = None) -> list[Job]:
        """Remove and return the jobs in the local queue: all of them (for a drain), or those
        for which ``where(job)`` is true.

        Jobs already queued in a child are not taken back: the child runs them next.
        """
        return self._pending.take(where)

    def longest_running(self) -> float:
        """Seconds the oldest running job has been running (0 when none is)."""
        starts = [c.jobs[0].started for c in self._children if c.jobs and c.jobs[0].started]
        return self._loop.time() - min(starts) if starts else 0.0

    def abort(self, doomed: Callable[[Job], bool]) -> None:
        """Abandon every job for which ``doomed(job)`` is true, reporting it RETURNED.

        Jobs in the local queue are dropped at once. A child holding one (running or queued)
        is killed and replaced; when it has exited its doomed jobs are reported and the others
        go back to the front of the local queue, unreported.
        """
        dropped = self._pending.take(doomed)
        for job in dropped:
            self.on_done(job, Outcome(OutcomeKind.RETURNED))
        for child in self._children:
            hit = {job for job in child.jobs if doomed(job)}
            if hit:
                child.doomed |= hit
                if not child.aborting:
                    child.aborting = True
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()

    def abort_running(self) -> None:
        """Kill every child without replacing it (the drain deadline passed)."""
        self._closing = True
        self.abort(lambda job: True)

    async def close(self, timeout: float = 5.0) -> None:
        """Stop the children: idle ones exit on EOF; stragglers are killed after ``timeout``."""
        self._closing = True
        for task in self._respawns:
            task.cancel()
        for child in self._children:
            self._close_stdin(child)
        procs = [c.proc for c in self._children]
        if procs:
            _, pending = await asyncio.wait(
                [asyncio.ensure_future(p.wait()) for p in procs], timeout=timeout
            )
            if pending:
                for proc in procs:
                    if proc.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                await asyncio.wait(pending)
        readers = [c.reader for c in self._children if c.reader is not None]
        if readers:
            await asyncio.wait(readers)

    # -- children -------------------------------------------------------------------------

    async def _spawn(self) -> _Child:
        loop = self._loop
        transport, pipe = await loop.subprocess_exec(
            lambda: _ChildPipe(loop),
            sys.executable,
            "-m",
            "service.pool.child",
            "--tasks",
            ",".join(self._modules),
            "--parent-pid",
            str(os.getpid()),
            "--max-depth",
            str(self._max_depth),
            "--max-result-size",
            str(self._max_result_size),
            "--memory-limit",
            str(self._memory_limit),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,
        )
        proc = asyncio.subprocess.Process(transport, pipe, loop)
        try:
            async with asyncio.timeout(_STARTUP_TIMEOUT):
                hello = await asyncio.shield(pipe.hello)
        except TimeoutError:
            hello = b""
        except asyncio.CancelledError:  # the pool closed while this child booted
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        if hello != READY:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            code = await proc.wait()
            if hello.startswith(FAILED):
                raise PoolStartError(
                    f"a pool child cannot import the task modules {','.join(self._modules)}: "
                    + hello[len(FAILED) :].decode("utf-8", "replace")
                )
            raise PoolStartError(
                f"pool child exited with code {code} before it was ready; "
                f"check that the task modules {self._modules} import cleanly (see stderr)"
            )
        return _Child(proc, pipe)

    def _adopt(self, child: _Child) -> None:
        self._children.add(child)
        child.pipe.on_frame = lambda data: self._on_result(child, ResultFrame.unpack(data))
        child.reader = self._loop.create_task(self._watch(child))
        self._dispatch()

    def _respawn(self, reason: RestartReason) -> None:
        if self._on_restart is not None:
            self._on_restart(reason)
        self._respawn_quietly()

    async def _respawn_until_up(self) -> None:
        delay = 0.5
        while not self._closing:
            try:
                child = await self._spawn()
            except (PoolStartError, OSError) as exc:
                self.respawn_failures += 1
                log.error("could not replace a pool child: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RESPAWN_BACKOFF_MAX)
                continue
            if self._closing:
                self._close_stdin(child)
                await child.proc.wait()
                return
            self.respawn_failures = 0
            self._adopt(child)
            return

    @staticmethod
    def _close_stdin(child: _Child) -> None:
        if child.proc.stdin is not None and not child.proc.stdin.is_closing():
            child.proc.stdin.close()

    # -- jobs -----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Send waiting jobs to children at the end of this loop turn: whatever arrives or
        finishes in one turn goes out in one write per child. Each write is a system call that
        wakes its child; answering every delivery and every result with its own write was a
        fifth of the parent's time per no-op task."""
        if self._pending and not self._filling:
            self._filling = True
            self._loop.call_soon(self._fill)

    def _fill(self) -> None:
        self._filling = False
        batches: dict[_Child, list[Job]] = {}
        # Idle children are waiting: each gets a job, before any child gets a second.
        for child in self._children:
            if not self._pending:
                break
            if not child.jobs and self._accepts(child):
                batches[child] = [self._pending.popleft()]
        # Then each child is topped up behind short jobs, once it is down to half its queue.
        for child in self._children:
            if not self._pending:
                break
            if len(child.jobs) > TOP_UP_BELOW:
                continue
            batch = batches.get(child, [])
            while self._pending and self._may_queue(child, batch):
                batch.append(self._pending.popleft())
            if batch:
                batches[child] = batch
        for child, batch in batches.items():
            self._write(child, batch)

    def _may_queue(self, child: _Child, batch: list[Job]) -> bool:
        """Whether ``child`` may take one more job behind what it holds (and ``batch``)."""
        if not child.jobs and not batch:
            return self._accepts(child)
        if not self._accepts(child, extra=len(batch)):
            return False
        return self.pipelining.may_queue([job.spec.name for job in (*child.jobs, *batch)])

    def _accepts(self, child: _Child, extra: int = 0) -> bool:
        """Whether ``child`` may be sent a job at all (idle or not), ``extra`` more on top."""
        if child.retiring or child.aborting or child.proc.returncode is not None:
            return False
        if child.proc.stdin is None or child.proc.stdin.is_closing():
            return False
        # Count what it already holds, so a child recycled after N tasks runs exactly N.
        held = child.tasks_done + len(child.jobs) + extra
        return not (self._max_tasks and held >= self._max_tasks)

    def _finished(self, job: Job, run_seconds: float | None = None) -> None:
        """``job`` has ended: record how long it ran, as its child measured it (a result), or
        since it became its child's head (a time-out or crash: the child cannot say). The
        child's figure excludes the wait for the parent to read the result and send the next
        job, which on a busy loop is longer than a short task itself."""
        job.run_seconds = self._loop.time() - job.started if run_seconds is None else run_seconds
        self.pipelining.observe(job.spec.name, job.run_seconds)

    def _write(self, child: _Child, jobs: list[Job]) -> None:
        frames = []
        for job in jobs:
            job.id = next(self._ids)
            child.jobs.append(job)
            if len(child.jobs) == 1:
                self._start_head(child)
            frames.append(JobFrame.from_job(job).pack())
        assert child.proc.stdin is not None
        child.proc.stdin.write(b"".join(frames))

    def _start_head(self, child: _Child) -> None:
        """``child.jobs[0]`` has just started running: start its clock and hard time limit."""
        job = child.jobs[0]
        job.started = self._loop.time()
        limit = job.spec.time_limit or self._time_limit
        child.timer = self._loop.call_later(limit, self._on_time_limit, child, job)

    def _on_time_limit(self, child: _Child, job: Job) -> None:
        if child.jobs and child.jobs[0] is job:
            log.warning(
                "task %s (id %s) passed its hard time limit; killing child %d",
                job.spec.name,
                job.message_id,
                child.pid,
                extra=task_fields(job.spec.name, job.message_id, job.attempt),
            )
            child.timed_out = job
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()

    async def _watch(self, child: _Child) -> None:
        await child.pipe.closed  # every frame before EOF has been handled by then
        await self._on_exit(child)

    def _on_result(self, child: _Child, result: ResultFrame) -> None:
        job = child.jobs.popleft()
        if job.id != result.job_id:  # cannot happen unless the pipe is corrupted
            raise RuntimeError(f"child {child.pid} answered job {result.job_id}, not {job.id}")
        if child.timer is not None:
            child.timer.cancel()
            child.timer = None
        self._finished(job, result.run_seconds)
        if child.jobs:  # the child started the next job right after sending this result
            self._start_head(child)
        child.tasks_done += 1
        job.cpu_seconds = max(0.0, result.cpu_seconds - child.cpu_seconds)
        child.cpu_seconds = result.cpu_seconds
        child.rss = result.rss_bytes
        if child.tasks_done == 1:
            child.baseline_rss = result.rss_bytes
        self.on_done(job, result.outcome)
        self._maybe_retire(child)
        self._dispatch()

    def _maybe_retire(self, child: _Child) -> None:
        if self._max_tasks and child.tasks_done >= self._max_tasks:
            child.retiring = RestartReason.RECYCLE_TASKS
        elif self._max_memory and child.rss - child.baseline_rss > self._max_memory:
            child.retiring = RestartReason.RECYCLE_MEMORY
        if child.retiring is not None and not child.jobs:
            self._close_stdin(child)  # it exits on EOF; `_on_exit` starts the replacement

    async def _on_exit(self, child: _Child) -> None:
        code = await child.proc.wait()
        if child.timer is not None:
            child.timer.cancel()
        self._children.discard(child)
        self._retired_cpu += child.cpu_seconds
        jobs = list(child.jobs)
        child.jobs.clear()
        bystanders: list[Job] = []  # not to blame: they run again elsewhere
        if child.aborting:
            reason = RestartReason.ABORT
            for job in jobs:
                if job in child.doomed:
                    self.on_done(job, Outcome(OutcomeKind.RETURNED))
                elif job is child.timed_out:  # its limit passed before the abort: its fault
                    reason = RestartReason.TIMEOUT
                    self.on_done(job, self._timeout(job))
                else:
                    bystanders.append(job)
        elif jobs:
            first, *bystanders = jobs  # the child runs jobs in order: only the first had begun
            if child.timed_out is first:
                reason = RestartReason.TIMEOUT
                outcome = self._timeout(first)
            else:
                reason = RestartReason.CRASH
                self._finished(first)
                outcome = Outcome(
                    OutcomeKind.CRASHED,
                    error_type="ChildDied",
                    error_message=f"pool child {child.pid} died: {_describe_exit(code)}",
                )
                log.error(
                    "pool child %d died (%s) running task %s (id %s)",
                    child.pid,
                    _describe_exit(code),
                    first.spec.name,
                    first.message_id,
                    extra=task_fields(first.spec.name, first.message_id, first.attempt),
                )
            self.on_done(first, outcome)
        elif child.retiring is not None:
            reason = child.retiring
        elif self._closing:
            reason = None
        else:
            reason = RestartReason.CRASH
            log.error("idle pool child %d died: %s", child.pid, _describe_exit(code))
        if self._closing:  # no child will run them: hand them back
            for job in bystanders:
                self.on_done(job, Outcome(OutcomeKind.RETURNED))
        else:
            for job in reversed(bystanders):
                job.id, job.started = 0, 0.0
                self._pending.appendleft(job)
        if reason is not None:
            self._respawn(reason)
        self._dispatch()

    def _timeout(self, job: Job) -> Outcome:
        self._finished(job)  # nothing is queued behind it now
        return timeout_outcome(job.spec.time_limit or self._time_limit)


def _unwired(job: Job, outcome: Outcome) -> None:
    raise RuntimeError("Pool.on_done was not set before a job finished")


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
