"""The ``file://`` blob store: a directory shared at the same path on every host (NFS, SMB, a
CSI volume), so a reference written on one host can be opened on any other.

Writes are crash-safe and atomic: the bytes go to ``incoming/<random>.part`` (same file
system), are fsynced, and the file is renamed to its content's name, then the directory is
fsynced; a reader never sees a partial blob under a blob's name. When the blob is already there
with the right size (a retry, a replay, a second producer) the new copy is dropped and the old
file's mtime refreshed instead of renaming over it, because replacing a file that another NFS
client has open turns that client's reads into ``ESTALE``; the refreshed mtime keeps the sweeper
from deleting a blob that a new message has just pointed at. Blobs are written read-only (0444).

`fetch_to_path` returns the blob's own file after reading it through once to verify it, without
copying: the blob may be large and the share slow. The task must not modify or delete it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import io
import os
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from service.errors import ConfigError
from service.store.base import DEFAULT_MAX_SIZE, Store, SweepReport, cutoff_of
from service.store.errors import (
    BadReference,
    BlobCorrupt,
    BlobMissing,
    BlobTooLarge,
    StoreUnavailable,
)
from service.store.locations import BLOBS, INCOMING, blob_key, file_path_of, segment_problem
from service.store.refs import DEFAULT_CONTENT_TYPE, Ref
from service.store.verify import CHUNK, Readable, verifying_stream

BLOB_MODE: Final = 0o444
# Errors that mean "this path leads somewhere it must not", not "the store is unwell".
_BAD_PATH_ERRNOS: Final = frozenset({errno.ELOOP, errno.ENOTDIR, errno.EISDIR})


class _FileSource:
    """A blob file's reads, with I/O errors (EIO, ESTALE on NFS) as `StoreUnavailable`."""

    def __init__(self, file: io.FileIO, url: str) -> None:
        self._file = file
        self._url = url

    def read(self, n: int = -1, /) -> bytes:
        try:
            return self._file.read(n)
        except OSError as exc:
            raise StoreUnavailable(f"reading {self._url}: {exc.strerror or exc}") from exc


def _fsync_dir(path: str) -> None:
    # Makes a rename or a new directory entry durable. Some network file systems refuse fsync
    # on a directory (EINVAL); their server commits metadata synchronously anyway.
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


class FileStore(Store):
    """Blobs under ``root``, an absolute path that must already exist: a missing mount is an
    error, never a fresh local directory that only this host can see."""

    def __init__(self, root: str, *, max_size: int = DEFAULT_MAX_SIZE) -> None:
        parts = root[1:].split("/")
        if not root.startswith("/") or root == "/":
            raise ConfigError(f"store root {root!r} must be an absolute path other than /")
        problem = segment_problem(parts)
        if problem:
            raise ConfigError(f"store root {root!r}: {problem}")
        if not os.path.isdir(root):
            raise ConfigError(
                f"store root {root} is not a directory: is the shared volume mounted here?"
            )
        self.root = root
        self.url = f"file://{root}"
        self.max_size = max_size
        self._real_root = os.path.realpath(root)

    # -- writing ------------------------------------------------------------------------------

    def put_stream(self, source: Readable, content_type: str = DEFAULT_CONTENT_TYPE) -> Ref:
        incoming = os.path.join(self.root, INCOMING)
        try:
            os.makedirs(incoming, exist_ok=True)
            temp = os.path.join(incoming, f"{uuid.uuid4().hex}.part")
            # O_EXCL: a name nobody else has; created read-only, written through this fd.
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, BLOB_MODE)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write under {self.root}: {exc.strerror}") from exc
        try:
            digest = hashlib.sha256()
            size = 0
            with open(fd, "wb") as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if size > self.max_size:
                        raise BlobTooLarge(
                            f"blob over {self.max_size} bytes (HUTCH_STORE_MAX_SIZE)"
                        )
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha256 = digest.hexdigest()
            self._place(temp, sha256, size)
        except BaseException as exc:
            # Already renamed into place, or the share is gone (then the sweeper cleans up).
            with contextlib.suppress(OSError):
                os.unlink(temp)
            if isinstance(exc, OSError):
                # Mostly the share (ENOSPC, EIO, ESTALE); a failing source reads the same way,
                # and the chained cause tells them apart.
                raise StoreUnavailable(f"storing a blob in {self.url}: {exc}") from exc
            raise
        return Ref(f"{self.url}/{blob_key(sha256)}", size, sha256, content_type)

    def _place(self, temp: str, sha256: str, size: int) -> None:
        """Give the written, fsynced file ``temp`` its content's name."""
        blobs = os.path.join(self.root, BLOBS)
        fanout = os.path.join(blobs, sha256[:2])
        final = os.path.join(fanout, sha256)
        created = not os.path.isdir(fanout)
        if created:
            os.makedirs(fanout, exist_ok=True)
            _fsync_dir(blobs)
            _fsync_dir(self.root)
        try:
            existing = os.stat(final, follow_symlinks=False)
        except FileNotFoundError:
            existing = None
        if existing and stat.S_ISREG(existing.st_mode) and existing.st_size == size:
            try:
                os.utime(final)  # now: a new message points at it, so it must outlive the TTL
            except PermissionError:
                pass  # written by another uid: replace it instead, which needs no ownership
            else:
                os.unlink(temp)
                return
        os.rename(temp, final)
        _fsync_dir(fanout)

    # -- reading ------------------------------------------------------------------------------

    def check(self, ref: Ref) -> str:
        real = os.path.realpath(file_path_of(ref.url, self.root))
        if not real.startswith(self._real_root + os.sep):
            raise BadReference(f"{ref.url[:200]!r} resolves outside {self.root} (a symlink)")
        self._check_size(ref)
        return real

    def open(self, ref: Ref) -> io.BufferedReader:
        real = self.check(ref)
        try:
            # realpath resolved every symlink; O_NOFOLLOW refuses one swapped in since.
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobMissing(f"no blob at {ref.url} (yet?)") from None
        except OSError as exc:
            if exc.errno in _BAD_PATH_ERRNOS:
                raise BadReference(f"{ref.url}: {exc.strerror}") from None
            raise StoreUnavailable(f"opening {ref.url}: {exc.strerror}") from exc
        file = io.FileIO(fd, "rb", closefd=True)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise BadReference(f"{ref.url} is not a regular file")
            if info.st_size != ref.size:
                raise BlobCorrupt(
                    f"{ref.url} has {info.st_size} bytes; its reference says {ref.size}"
                )
        except BaseException:
            file.close()
            raise
        return verifying_stream(_FileSource(file, ref.url), ref, file.close)

    def fetch_to_path(self, ref: Ref, directory: str | os.PathLike[str]) -> Path:
        """The blob's own file, after reading it through to verify it; ``directory`` is not
        used (nothing is copied)."""
        real = self.check(ref)
        with self.open(ref) as stream:
            while stream.read(CHUNK):
                pass
        return Path(real)

    # -- housekeeping -------------------------------------------------------------------------

    def sweep(
        self, older_than: dt.timedelta, *, dry_run: bool = False, now: dt.datetime | None = None
    ) -> SweepReport:
        """Delete every file under ``sha256/`` and ``incoming/`` whose mtime is before the
        cutoff. Directories stay (a put may be about to rename into one); anything else under
        the root is not hutch's and is left alone."""
        cutoff = cutoff_of(older_than, now).timestamp()
        scanned = deleted = deleted_bytes = kept = failed = 0
        for path in self._swept_files():
            try:
                info = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed meanwhile (another host's sweeper)
            scanned += 1
            if info.st_mtime >= cutoff:
                kept += 1
                continue
            if not dry_run:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                except OSError:
                    failed += 1
                    continue
            deleted += 1
            deleted_bytes += info.st_size
        return SweepReport(scanned, deleted, deleted_bytes, kept, failed, dry_run)

    def _swept_files(self) -> Iterator[str]:
        # One directory listed at a time: a store may hold millions of blobs.
        incoming = os.path.join(self.root, INCOMING)
        blobs = os.path.join(self.root, BLOBS)
        for directory in [incoming, *self._subdirectories(blobs)]:
            try:
                with os.scandir(directory) as entries:
                    files = [e.path for e in entries if not e.is_dir(follow_symlinks=False)]
            except FileNotFoundError:
                continue
            yield from files

    @staticmethod
    def _subdirectories(path: str) -> list[str]:
        try:
            with os.scandir(path) as entries:
                return [e.path for e in entries if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
