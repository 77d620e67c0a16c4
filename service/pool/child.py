"""A pool child: read a job, decode its body, run the task, send back bytes. One at a time.

Run by the pool as ``python -m service.pool.child``. The pipe to the parent is stdin/stdout, moved
to private descriptors first so a task's ``print`` goes to stderr instead of corrupting frames.
Everything the task produces is turned into bytes or plain strings here, in the child: no
result or exception object ever crosses the pipe.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import functools
import inspect
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any, BinaryIO, Final

from service import continuation, protocol
from service.context import TaskContext, _set_current
from service.continuation import BUILTIN_TASKS, FlowState, Here, Publish, Transition
from service.errors import EncodeError, ProtocolError, SoftTimeLimitExceeded
from service.pool.blobs import Blobs
from service.pool.jobs import Outcome, OutcomeKind
from service.pool.pipe import FAILED, HEADER, READY, JobFrame, ResultFrame, frame
from service.protocol import Reason
from service.registry import TaskSpec, import_task_modules, lookup
from service.store.errors import BadReference, BlobMissing, StoreError
from service.store.refs import is_marker, may_hold_refs

_PR_SET_PDEATHSIG = 1
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def _die_with_parent(parent_pid: int) -> None:
    """Make the kernel SIGKILL this child when the parent dies, so no orphan keeps running."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _harden() -> None:
    # The parent decides when children stop: a group-wide SIGINT/SIGTERM must not kill tasks
    # the parent is still draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Under memory pressure the kernel should pick a child, never the parent holding the acks.
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass


class _Resident:
    """This process's resident memory, read after every job: ``/proc/self/statm`` stays open
    and is read with one ``pread``, since opening it per job cost more than a no-op job."""

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._fd = None

    def bytes(self) -> int:
        if self._fd is None:
            return 0
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) * _PAGE_SIZE
        except (OSError, ValueError, IndexError):
            return 0


def _on_soft_limit(signum: int, frame: FrameType | None) -> None:
    raise SoftTimeLimitExceeded("soft time limit exceeded")


def _describe(exc: BaseException) -> tuple[str, str]:
    """Type name and message of any exception, even one whose ``__str__`` raises."""
    try:
        message = str(exc)
    except Exception:
        message = f"<unprintable {type(exc).__name__}>"
    return type(exc).__name__, protocol.truncate(message)


class Runner:
    """Runs decoded jobs; owns the per-child limits and the child's claim checks."""

    def __init__(
        self,
        *,
        max_depth: int,
        max_result_size: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.max_depth = max_depth
        self.max_result_size = max_result_size
        # When a flow's next steps are built (their countdowns count from it); `service.testing`
        # runs this same code on a fake clock.
        self.clock = clock
        self.blobs = Blobs()

    def run(self, job: JobFrame) -> Outcome:
        spec = lookup(job.task)
        if spec is None:  # the parent checks first; this guards a mismatched child
            return _rejected(Reason.UNKNOWN_TASK, job.task)
        with contextlib.ExitStack() as cleanup:  # streams and files a task was handed
            try:
                return self._run(job, spec, cleanup)
            except StoreError as exc:
                return _store_outcome(exc, ran=False)

    def _run(self, job: JobFrame, spec: TaskSpec, cleanup: contextlib.ExitStack) -> Outcome:
        here: Here | None = None
        flow: FlowState | None = None
        try:
            body = job.body
            refs = may_hold_refs(job.content_type, body)
            value = protocol.decode(job.content_type, body, max_depth=None)
            if refs and is_marker(value):  # the whole body came by reference
                body = self.blobs.body(job.content_type, value)
                refs = may_hold_refs(job.content_type, body)
                value = protocol.decode(job.content_type, body, max_depth=None)
            args, kwargs, raw_flow = protocol.request_parts(value, max_depth=self.max_depth)
            if raw_flow is not None or job.task in BUILTIN_TASKS:
                here = Here(
                    job.content_type, job.message_id, job.headers, job.reply_to, job.correlation_id
                )
            if job.task in BUILTIN_TASKS:
                assert here is not None
                return self._flow_outcome(
                    lambda: self._builtin(job.task, args, raw_flow, here, self.clock())
                )
            if raw_flow is not None:
                # Checked before the step runs: a bad later step fails the flow now.
                flow = continuation.read(raw_flow, known=_known)
            _bind(spec, args, kwargs)
            if refs:
                args, kwargs = self.blobs.arguments(spec.fn, args, kwargs, cleanup)
        except ProtocolError as exc:
            return _rejected(exc.reason, exc.detail)
        _set_current(
            TaskContext(
                job.message_id,
                job.task,
                job.attempt,
                job.deliveries,
                job.redelivered,
                **TaskContext.from_headers(job.headers),
            )
        )
        try:
            value = self._call(spec, args, kwargs)
        except StoreError as exc:  # the task opened a reference itself (ref.open())
            return _store_outcome(exc, ran=True)
        except BaseException as exc:  # even SystemExit: every failure becomes a plain record
            error_type, message = _describe(exc)
            return Outcome(OutcomeKind.ERROR, error_type=error_type, error_message=message)
        finally:
            _set_current(None)
        if flow is not None:
            assert here is not None
            state = flow
            return self._flow_outcome(
                lambda: continuation.advance(state, value, here, now=self.clock())
            )
        if not job.want_result:
            return _OK
        try:
            payload = protocol.ok_result(job.content_type, value)
        except EncodeError as exc:
            return _failed("UnserializableResult", str(exc))
        offloaded = self._offload(job.content_type, payload)
        if offloaded is not None:
            return Outcome(OutcomeKind.OK, offloaded, offloads=1)
        if len(payload) > self.max_result_size:
            return _failed(
                "ResultTooLarge",
                f"result is {len(payload)} bytes, over the {self.max_result_size}-byte cap "
                "(set HUTCH_STORE_URL to send large results by reference)",
            )
        return Outcome(OutcomeKind.OK, payload)

    def _offload(self, content_type: str, body: bytes) -> bytes | None:
        """``body`` as a reference, when it is over the offload threshold and there is a
        store; a store that fails raises `StoreError` (see `_store_outcome`)."""
        return self.blobs.offload(content_type, body)

    @staticmethod
    def _builtin(task: str, args: list[Any], raw_flow: Any, here: Here, now: float) -> Transition:
        if task == continuation.FAILED_TASK:
            return continuation.failed(continuation.read(raw_flow), here, now=now)
        return continuation.run_builtin(task, args, here, now=now)

    def _flow_outcome(self, transition: Callable[[], Transition]) -> Outcome:
        """What follows a flow's step, as an outcome: the messages for the parent to publish
        (the step's result travels in them), or why they cannot be built."""
        try:
            done = transition()
        except ProtocolError as exc:
            return _rejected(exc.reason, exc.detail)
        except EncodeError as exc:
            return _failed("UnserializableResult", str(exc))
        publishes: list[Publish] = []
        offloads = 0
        for publish in done.publishes:
            offloaded = self._offload(publish.content_type, publish.body)
            if offloaded is not None:
                publish = dataclasses.replace(publish, body=offloaded)
                offloads += 1
            elif len(publish.body) > self.max_result_size:
                return _failed(
                    "ResultTooLarge",
                    f"the flow's next message is {len(publish.body)} bytes, over the "
                    f"{self.max_result_size}-byte cap",
                )
            publishes.append(publish)
        return Outcome(
            OutcomeKind.OK, publishes=tuple(publishes), flow=done.event, offloads=offloads
        )

    @staticmethod
    def _call(spec: TaskSpec, args: list[Any], kwargs: dict[str, Any]) -> Any:
        soft_limit = spec.soft_time_limit
        if soft_limit is None:
            return spec.fn(*args, **kwargs)
        signal.setitimer(signal.ITIMER_REAL, soft_limit)
        try:
            return spec.fn(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)


_OK: Final = Outcome(OutcomeKind.OK)


def _rejected(reason: Reason, detail: str) -> Outcome:
    """Bad input: never run, never retried, dead-lettered with ``reason``."""
    return Outcome(
        OutcomeKind.REJECTED,
        error_type=str(reason),
        error_message=detail,
        retryable=False,
        reason=reason,
    )


def _store_outcome(exc: StoreError, *, ran: bool) -> Outcome:
    """What a blob that could not be read (or written) makes of a job, with ``bad_ref`` as the
    dead-letter reason carried explicitly for `service.settle.decide`:

    - a reference that must not be followed, or bytes that do not match it: dead-lettered at
      once (rejected if the task never ran);
    - a missing blob: retried with backoff (it may not be visible yet), then ``bad_ref``;
    - a store that failed: retried, then ``failed`` like any error (the reference was fine);
    - a result too large even for the store: failed, no retry.
    """
    detail = f"{type(exc).__name__}: {exc.detail}"
    if isinstance(exc, BadReference):
        if not ran:
            return dataclasses.replace(_rejected(Reason.BAD_REF, detail), ref_failure=exc.failure)
        reason: Reason | None = Reason.BAD_REF
    elif isinstance(exc, BlobMissing):
        reason = Reason.BAD_REF
    else:
        reason = None
    return Outcome(
        OutcomeKind.ERROR,
        error_type=type(exc).__name__,
        error_message=protocol.truncate(exc.detail),
        retryable=exc.retriable,
        reason=reason,
        ref_failure=exc.failure,
    )


def _failed(error_type: str, message: str) -> Outcome:
    """A run that no retry can fix (its result cannot be sent)."""
    return Outcome(OutcomeKind.ERROR, error_type=error_type, error_message=message, retryable=False)


@functools.lru_cache(maxsize=1024)  # bounded: keyword names come from publishers
def _call_shape_error(
    fn: Callable[..., Any], positional: int, keywords: tuple[str, ...]
) -> str | None:
    """Why ``fn`` cannot take ``positional`` arguments and these keywords (None if it can).

    Whether a call binds depends only on its shape, never on the values, so the answer is
    cached per shape: building a signature and binding to it cost as much as the rest of a
    no-op job. A function without a signature (some builtins) is always called.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        signature.bind(*range(positional), **dict.fromkeys(keywords))
    except TypeError as exc:
        return str(exc)
    return None


def _known(task: str) -> bool:
    return lookup(task) is not None


def _bind(spec: TaskSpec, args: list[Any], kwargs: dict[str, Any]) -> None:
    # Checked before the call so a TypeError raised inside the task is a failure, not bad input.
    error = _call_shape_error(spec.fn, len(args), tuple(kwargs))
    if error is not None:
        raise ProtocolError(Reason.BAD_ARGS, f"{spec.name}: {error}")


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    if len(data) < n:
        return None
    return data


def serve(reader: BinaryIO, writer: BinaryIO, runner: Runner) -> None:
    """Answer job frames until the parent closes the pipe."""
    rss = _Resident()
    writer.write(frame(READY))
    writer.flush()
    while True:
        header = _read_exact(reader, HEADER.size)
        if header is None:
            return
        body = _read_exact(reader, HEADER.unpack(header)[0])
        if body is None:
            return
        started = time.perf_counter()
        job = JobFrame.unpack(body)
        outcome = runner.run(job)
        ran = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = usage.ru_utime + usage.ru_stime
        result = ResultFrame(job.job_id, outcome, cpu, rss.bytes(), ran)
        writer.write(result.pack())
        writer.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="service.pool.child")
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--max-depth", type=int, default=protocol.DEFAULT_MAX_DEPTH)
    parser.add_argument("--max-result-size", type=int, required=True)
    parser.add_argument("--memory-limit", type=int, default=0)
    opts = parser.parse_args(argv)

    _die_with_parent(opts.parent_pid)
    _harden()
    if opts.memory_limit:
        resource.setrlimit(resource.RLIMIT_AS, (opts.memory_limit, opts.memory_limit))
    signal.signal(signal.SIGALRM, _on_soft_limit)

    # Private copies of the pipe; fd 0 reads nothing and fd 1 writes to stderr from now on.
    reader = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    writer = os.fdopen(os.dup(1), "wb", buffering=1 << 16)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    try:
        import_task_modules(m for m in opts.tasks.split(",") if m)
    except BaseException as exc:  # said once, by the parent, which reads it from the pipe
        error_type, message = _describe(exc)
        writer.write(frame(FAILED + f"{error_type}: {message}".encode()))
        writer.flush()
        os._exit(1)
    serve(reader, writer, Runner(max_depth=opts.max_depth, max_result_size=opts.max_result_size))


if __name__ == "__main__":
    main()
