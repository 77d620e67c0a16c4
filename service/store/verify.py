"""Reading a blob while checking it against its reference: size and SHA-256, as it streams.

A blob may be larger than memory, so it cannot be checked before it is handed over. Instead the
stream counts and hashes what passes through it, and the read that delivers the last byte
compares: on a mismatch that read raises `BlobCorrupt` instead of returning the bytes, so a
reader that stops exactly at ``size`` (``read(ref.size)``) is checked too, and never gets the
end of a corrupt blob. A blob that turns out longer than its reference raises as soon as the
extra bytes arrive, so a lying ``size`` cannot make a child read without bound.

Bytes returned before the end are not yet verified; a task that must not act on unverified data
reads the whole blob first (`Store.get_bytes`, `Store.fetch_to_path`).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from typing import Any, NoReturn, Protocol

from service.store.errors import BlobCorrupt
from service.store.refs import Ref

CHUNK = 1 << 20  # the unit of every streamed copy: large enough to be fast, small for memory


class Readable(Protocol):
    """Anything with a ``read(n)`` that returns at most ``n`` bytes, ``b""`` at the end."""

    def read(self, n: int = -1, /) -> bytes: ...


class VerifyingReader(io.RawIOBase):
    """A raw binary stream over ``source`` that raises `BlobCorrupt` unless the bytes are
    exactly ``ref.size`` long and hash to ``ref.sha256``. ``on_close`` releases ``source``."""

    def __init__(self, source: Readable, ref: Ref, on_close: Callable[[], Any]) -> None:
        super().__init__()
        self._source = source
        self._ref = ref
        self._on_close = on_close
        self._hash = hashlib.sha256()
        self._count = 0
        self._verified = False
        self._failure: BlobCorrupt | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._failure is not None:
            raise self._failure  # keep failing: no later read may look like a clean end
        view = memoryview(buffer).cast("B")
        if self._verified:
            # Past the declared end, the source must be at its end too.
            data = self._source.read(1)
            if data:
                self._fail(f"{self._ref.url} is longer than its reference's {self._ref.size} bytes")
            return 0
        want = min(len(view), self._ref.size - self._count)
        data = self._source.read(want) if want else b""
        if len(data) > want:  # a source that ignores n; treat like any overlong blob
            self._fail(f"{self._ref.url} is longer than its reference's {self._ref.size} bytes")
        if not data and self._count < self._ref.size:
            self._fail(
                f"{self._ref.url} ended after {self._count} bytes; its reference says "
                f"{self._ref.size}"
            )
        self._count += len(data)
        self._hash.update(data)
        if self._count == self._ref.size:
            digest = self._hash.hexdigest()
            if digest != self._ref.sha256:
                self._fail(
                    f"{self._ref.url} has sha256 {digest}; its reference says {self._ref.sha256}"
                )
            self._verified = True
        view[: len(data)] = data
        return len(data)

    def _fail(self, detail: str) -> NoReturn:
        self._failure = BlobCorrupt(detail)
        raise self._failure

    @property
    def verified(self) -> bool:
        """True once every byte has been read and matched the reference."""
        return self._verified

    def close(self) -> None:
        if not self.closed:
            try:
                self._on_close()
            finally:
                super().close()


def verifying_stream(source: Readable, ref: Ref, on_close: Callable[[], Any]) -> io.BufferedReader:
    """`VerifyingReader` behind a buffer, so callers get ``read(n)``, ``readline`` and friends."""
    return io.BufferedReader(VerifyingReader(source, ref, on_close), buffer_size=CHUNK)


def read_full(source: Readable, n: int) -> bytes:
    """Up to ``n`` bytes, fewer only at the end: pipes and sockets return short reads."""
    data = source.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = source.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
