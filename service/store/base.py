"""What every blob store does, whatever holds the bytes: the `Store` interface and its reports.

A store is opened once per process (a pool child opens its own after it starts: S3 clients
and their connection pools must not cross a fork) and is safe to use from several threads.
Producers put blobs and get `Ref` s; consumers check a ref against the store (`check`) and
read it back, verified (`open`, `get_bytes`, `fetch_to_path`). Nothing is deleted when a task
is acked: retries, dead letters and replays still point at the blob, so blobs are removed by
age alone (`sweep`, or the S3 lifecycle rule in docs/operations.md, "The blob store").
"""

from __future__ import annotations

import datetime as dt
import io
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

from service.store.errors import BadReference
from service.store.refs import DEFAULT_CONTENT_TYPE, Ref
from service.store.verify import CHUNK, Readable

# The largest blob a store writes or a reference may claim, unless configured otherwise. A
# reference is untrusted input; the cap bounds what one message can make a child download.
DEFAULT_MAX_SIZE: Final = 4 << 30


@dataclass(frozen=True, slots=True)
class SweepReport:
    """What one `Store.sweep` found: every blob and unfinished upload it looked at is either
    deleted (or, with ``dry_run``, would have been) or kept; ``failed`` could not be deleted."""

    scanned: int
    deleted: int
    deleted_bytes: int
    kept: int
    failed: int
    dry_run: bool


class Store(ABC):
    """A blob store: ``file://`` (`service.store.files.FileStore`) or ``s3://``
    (`service.store.s3.S3Store`). `service.store.open_store` builds one from a URL."""

    url: str  # the store's own URL, normalised: file:///root or s3://bucket[/prefix]
    max_size: int

    # -- writing -----------------------------------------------------------------------------

    @abstractmethod
    def put_stream(self, source: Readable, content_type: str = DEFAULT_CONTENT_TYPE) -> Ref:
        """Store everything ``source.read`` returns until it returns ``b""``, in bounded memory,
        hashing as it streams. Raises `BlobTooLarge` past ``max_size``, `StoreUnavailable` if
        the store fails."""

    def put_bytes(self, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> Ref:
        """Store ``data``; same blob, same `Ref` (content-addressed)."""
        return self.put_stream(io.BytesIO(data), content_type)

    def put_file(
        self, path: str | os.PathLike[str], content_type: str = DEFAULT_CONTENT_TYPE
    ) -> Ref:
        """Store a local file, streaming it (never loaded whole)."""
        with open(path, "rb", buffering=0) as source:
            return self.put_stream(source, content_type)

    # -- reading -----------------------------------------------------------------------------

    @abstractmethod
    def check(self, ref: Ref) -> str:
        """Where ``ref`` points in this store (a real path, or an object key), if it may be
        followed at all; `BadReference` if not: another scheme, bucket, prefix or root, an
        unsafe path, a symlink out of the root, or a size over ``max_size``. Costs no I/O for
        S3 and only path resolution for files, so a child can check every ref of a task before
        it downloads any."""

    @abstractmethod
    def open(self, ref: Ref) -> io.BufferedReader:
        """A binary stream of the blob, verified as it is read (`service.store.verify`): a
        size known to differ raises `BlobCorrupt` at once, a sha256 mismatch on the read that
        reaches the end. `BlobMissing` if there is no blob there (yet); `StoreUnavailable` if
        the store fails, now or mid-stream."""

    def get_bytes(self, ref: Ref) -> bytes:
        """The whole blob, verified, in memory."""
        with self.open(ref) as stream:
            # Allocated only once open has confirmed the stored size: a ref's size is a claim.
            buffer = bytearray(ref.size)
            view = memoryview(buffer)
            got = 0
            while got < ref.size:
                n = stream.readinto(view[got : got + CHUNK])
                if not n:
                    break  # unreachable: the verifying stream raises first on a short blob
                got += n
            stream.read(1)  # reaching the end checks that nothing follows
        return bytes(buffer)

    @abstractmethod
    def fetch_to_path(self, ref: Ref, directory: str | os.PathLike[str]) -> Path:
        """A local file holding the blob, verified before this returns, for a task that needs
        a path. Treat it as read-only: the file store returns its own file (no copy)."""

    # -- housekeeping ------------------------------------------------------------------------

    @abstractmethod
    def sweep(
        self, older_than: dt.timedelta, *, dry_run: bool = False, now: dt.datetime | None = None
    ) -> SweepReport:
        """Delete blobs and unfinished uploads last written more than ``older_than`` before
        ``now`` (default: the current time). ``now`` exists so a test, or an operator, can
        sweep as if later, since an S3 object's LastModified cannot be set."""

    def close(self) -> None:  # noqa: B027 - optional: only stores with connections override it
        """Release connections; the store is unusable afterwards."""

    def __enter__(self) -> Store:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- for implementations -------------------------------------------------------------------

    def _check_size(self, ref: Ref) -> None:
        if ref.size > self.max_size:
            raise BadReference(
                f"{ref.url} claims {ref.size} bytes, over this store's maximum of "
                f"{self.max_size} (HUTCH_STORE_MAX_SIZE)"
            )


def cutoff_of(older_than: dt.timedelta, now: dt.datetime | None) -> dt.datetime:
    """The instant before which a sweep deletes; ``now`` must be timezone-aware."""
    if older_than < dt.timedelta(0):
        raise ValueError("older_than must not be negative")
    if now is None:
        now = dt.datetime.now(dt.UTC)
    elif now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now - older_than
