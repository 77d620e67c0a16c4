"""The blob store (service/store): one behavioural suite, run against both backends.

``file`` is a directory under tmp_path standing in for the shared volume; ``s3`` is a real moto
server on 127.0.0.1 (a subprocess, so its memory is not the test process's), reached through
boto3 with static credentials and instance-metadata lookups off: nothing leaves loopback.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime as dt
import gc
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from service.errors import ConfigError, EncodeError, HutchError
from service.store import (
    BadReference,
    BlobCorrupt,
    BlobMissing,
    BlobTooLarge,
    FileStore,
    Ref,
    Store,
    StoreSettings,
    StoreUnavailable,
    embed_refs,
    open_store,
    resolve_refs,
)
from service.store.locations import blob_key

MiB = 1 << 20
REGION = "us-east-1"
# Everything boto3 needs, and nothing that could send it elsewhere: static credentials (no
# credential chain lookups), no instance metadata, no user config files.
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
AWS_UNSET = ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE")


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    for name in AWS_UNSET:
        monkeypatch.delenv(name, raising=False)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1, stopped through its own process handle."""
    log = tmp_path_factory.mktemp("moto") / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in AWS_UNSET} | AWS_ENV
    for _ in range(3):  # the port is free when probed; another process may take it first
        port = _free_port()
        with open(log, "wb") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 30
        while server.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.1)
        if server.poll() is None and time.monotonic() < deadline:
            break
        server.kill()
        server.wait()
    else:
        pytest.fail(f"moto server did not start: {log.read_text()[-2000:]}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture(scope="module")
def s3_admin(moto_endpoint: str) -> Iterator[Any]:
    """A plain boto3 client for setting up and tampering behind the store's back."""
    import boto3

    os.environ.update(AWS_ENV)  # module scope runs before the autouse fixture
    client = boto3.session.Session().client("s3", endpoint_url=moto_endpoint, region_name=REGION)
    yield client
    client.close()


@dataclass
class Backend:
    """One store under test, and what a test needs to do behind its back."""

    kind: str
    store: Store
    another_host: Callable[[], Store]  # a second store over the same place
    overwrite: Callable[[Ref, bytes], None]  # replace the stored bytes of a blob
    foreign_urls: list[str] = field(default_factory=list)  # refs that point outside it


def _s3_backend(endpoint: str, admin: Any) -> Backend:
    bucket = f"hutch-{uuid.uuid4().hex[:12]}"
    admin.create_bucket(Bucket=bucket)
    admin.create_bucket(Bucket=bucket + "-other")

    def make() -> Store:
        return open_store(f"s3://{bucket}/blobs/v1", s3_endpoint_url=endpoint, s3_region=REGION)

    store = make()

    def overwrite(ref: Ref, data: bytes) -> None:
        admin.put_object(Bucket=bucket, Key=store.check(ref), Body=data)

    key = blob_key("a" * 64)
    return Backend(
        "s3",
        store,
        make,
        overwrite,
        [
            f"s3://{bucket}-other/blobs/v1/{key}",  # another bucket
            f"s3://{bucket}/blobs/v2/{key}",  # another prefix
            f"s3://{bucket}/blobs/{key}",  # above the prefix
            f"s3://{bucket}/blobs/v1",  # the prefix itself
            f"s3://{bucket}/blobs/v1x/{key}",  # a prefix of the prefix's name
            f"s3://{bucket}/blobs/v1/../v2/{key}",
            f"s3://{bucket}/blobs/v1/./{key}",
            f"s3://{bucket}/blobs/v1//{key}",
            f"s3://{bucket}/blobs/v1/%2e%2e/v2/{key}",
            f"s3://{bucket}/blobs/v1/{key}?versionId=1",
            f"s3://{bucket.upper()}/blobs/v1/{key}",
            f"S3://{bucket}/blobs/v1/{key}",
            f"file:///blobs/v1/{key}",
        ],
    )


def _file_backend(tmp_path: Path) -> Backend:
    root = tmp_path / "shared"
    root.mkdir()

    def make() -> Store:
        return open_store(f"file://{root}")

    store = make()

    def overwrite(ref: Ref, data: bytes) -> None:
        path = Path(store.check(ref))
        path.chmod(0o644)
        path.write_bytes(data)

    key = blob_key("a" * 64)
    sibling = tmp_path / "shared-other"
    return Backend(
        "file",
        store,
        make,
        overwrite,
        [
            f"file://{sibling}/{key}",  # a sibling whose name starts with the root's
            f"file://{tmp_path}/{key}",  # above the root
            f"file://{root}",  # the root itself
            f"file://{root}/../shared-other/{key}",
            f"file://{root}/sha256/../../shared-other/{key}",
            f"file://{root}/./{key}",
            f"file://{root}//{key}",
            f"file://{root}/%2e%2e/{key}",
            f"file://localhost{root}/{key}",  # a host
            f"file:{root}/{key}",
            f"FILE://{root}/{key}",
            f"file://{root}/{key}#x",
            f"s3://bucket{root}/{key}",
        ],
    )


@pytest.fixture(params=["file", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "file":
        made = _file_backend(tmp_path)
    else:
        made = _s3_backend(
            request.getfixturevalue("moto_endpoint"), request.getfixturevalue("s3_admin")
        )
    yield made
    made.store.close()


def _write_random(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for offset in range(0, size, MiB):
            chunk = os.urandom(min(MiB, size - offset))
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


class ShortReads:
    """A non-seekable source that returns fewer bytes than asked, like a pipe."""

    def __init__(self, data: bytes, most: int = 100_000) -> None:
        self._data = memoryview(data)
        self._most = most

    def read(self, n: int = -1, /) -> bytes:
        n = self._most if n < 0 else min(n, self._most)
        chunk, self._data = self._data[:n], self._data[n:]
        return bytes(chunk)


# -- round trips -------------------------------------------------------------------------------


def test_bytes_round_trip(backend: Backend) -> None:
    store = backend.store
    ref = store.put_bytes(b"hello", "text/plain")
    sha = hashlib.sha256(b"hello").hexdigest()
    assert ref == Ref(f"{store.url}/sha256/{sha[:2]}/{sha}", 5, sha, "text/plain")
    assert store.get_bytes(ref) == b"hello"
    with store.open(ref) as stream:
        assert stream.read() == b"hello"
    # Content-addressed: the same bytes again are the same blob, the same reference.
    assert store.put_bytes(b"hello", "text/plain") == ref


def test_empty_blob(backend: Backend) -> None:
    ref = backend.store.put_bytes(b"")
    assert ref.size == 0 and ref.sha256 == hashlib.sha256(b"").hexdigest()
    assert backend.store.get_bytes(ref) == b""


def test_file_round_trip(backend: Backend, tmp_path: Path) -> None:
    # Over one S3 part (8 MiB): a multipart upload straight to the blob's name.
    source = tmp_path / "input.bin"
    sha = _write_random(source, 9 * MiB + 123)
    ref = backend.store.put_file(source, "application/x-test")
    assert (ref.size, ref.sha256, ref.content_type) == (9 * MiB + 123, sha, "application/x-test")
    assert backend.store.get_bytes(ref) == source.read_bytes()


@pytest.mark.parametrize("size", [300_000, 10 * MiB + 7], ids=["one-part", "multipart"])
def test_stream_round_trip(backend: Backend, size: int) -> None:
    """A non-seekable source with short reads; over a part, S3 goes through incoming/."""
    data = os.urandom(size)
    ref = backend.store.put_stream(ShortReads(data), "application/x-test")
    assert (ref.size, ref.sha256) == (size, hashlib.sha256(data).hexdigest())
    with backend.store.open(ref) as stream:
        assert stream.read() == data
    assert _incoming(backend) == []  # no temporary upload left behind


def _incoming(backend: Backend) -> list[str]:
    store = backend.store
    if isinstance(store, FileStore):
        incoming = Path(store.root, "incoming")
        return sorted(os.listdir(incoming)) if incoming.exists() else []
    from service.store.s3 import S3Store

    assert isinstance(store, S3Store)
    listing = store._client.list_objects_v2(Bucket=store.bucket, Prefix=f"{store.prefix}/incoming/")
    uploads = store._client.list_multipart_uploads(Bucket=store.bucket)
    return [o["Key"] for o in listing.get("Contents", [])] + [
        u["Key"] for u in uploads.get("Uploads", [])
    ]


def test_fetch_to_path(backend: Backend, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    ref = backend.store.put_bytes(data)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    path = backend.store.fetch_to_path(ref, scratch)
    assert path.read_bytes() == data
    if backend.kind == "file":
        # No copy: the blob's own file, read-only, and nothing in the scratch directory.
        assert str(path) == backend.store.check(ref)
        assert path.stat().st_mode & 0o777 == 0o444
        assert list(scratch.iterdir()) == []
    else:
        assert path == scratch / ref.sha256
        assert sorted(p.name for p in scratch.iterdir()) == [ref.sha256]


# -- bounded memory -------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _give_back_free_memory() -> None:
    """Return freed heap pages to the OS (glibc), so earlier tests' garbage cannot hide growth
    by being reused below the baseline."""
    gc.collect()
    # Not glibc: the measurement is only less strict.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _peak_rss_growth(action: Callable[[], None]) -> int:
    """How far resident memory rose above its level before ``action``, at its peak.

    Linux resets the peak (VmHWM) on writing 5 to /proc/self/clear_refs; where that is not
    allowed, a thread samples /proc/self/statm every 2 ms instead.
    """
    _give_back_free_memory()
    baseline = _rss()
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        peak = baseline
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            action()
        finally:
            done.set()
            sampler.join()
        return peak - baseline
    action()
    with open("/proc/self/status") as status:
        line = next(x for x in status if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024 - baseline


def test_50_mb_file_streams_in_bounded_memory(backend: Backend, tmp_path: Path) -> None:
    size = 50 * MiB
    source = tmp_path / "big.bin"
    sha = _write_random(source, size)
    backend.store.put_bytes(b"warm-up")  # imports, connection pools and buffers, not measured
    backend.store.get_bytes(backend.store.put_bytes(b"warm-up"))
    refs: list[Ref] = []
    put_growth = _peak_rss_growth(lambda: refs.append(backend.store.put_file(source)))
    (ref,) = refs
    assert (ref.size, ref.sha256) == (size, sha)

    def read_back() -> None:
        digest = hashlib.sha256()
        with backend.store.open(ref) as stream:
            while chunk := stream.read(MiB):
                digest.update(chunk)
        assert digest.hexdigest() == sha

    get_growth = _peak_rss_growth(read_back)

    # The measurement itself works: reading the file whole shows up at its full size.
    def read_whole() -> None:
        assert hashlib.sha256(source.read_bytes()).hexdigest() == sha

    whole = _peak_rss_growth(read_whole)
    assert whole > 45 * MiB, whole
    print(
        f"\n{backend.kind}: peak RSS growth for a {size >> 20} MiB blob: put_file "
        f"{put_growth / MiB:.1f} MiB, streamed read {get_growth / MiB:.1f} MiB (reading the "
        f"file whole: {whole / MiB:.1f} MiB)"
    )
    # One S3 part (8 MiB) plus HTTP buffers, or one 1 MiB chunk: far below the blob's size.
    assert put_growth < 16 * MiB, put_growth
    assert get_growth < 8 * MiB, get_growth


# -- verification ----------------------------------------------------------------------------


def test_tampered_blob_same_size_fails_at_the_end(backend: Backend, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    ref = backend.store.put_bytes(data)
    backend.overwrite(ref, data[:-1] + bytes([data[-1] ^ 1]))
    with backend.store.open(ref) as stream:
        assert stream.read(MiB) == data[:MiB]  # unverified so far, as documented
        with pytest.raises(BlobCorrupt, match="sha256"):
            stream.read()
        with pytest.raises(BlobCorrupt):  # and it stays failed
            stream.read()
    # Reading exactly size bytes is checked too: the last read raises instead of returning.
    with backend.store.open(ref) as stream, pytest.raises(BlobCorrupt):
        stream.read(ref.size)
    with pytest.raises(BlobCorrupt):
        backend.store.get_bytes(ref)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with pytest.raises(BlobCorrupt):
        backend.store.fetch_to_path(ref, scratch)
    assert list(scratch.iterdir()) == []  # nothing half-written left for the task


def test_size_mismatch_fails_at_once(backend: Backend) -> None:
    ref = backend.store.put_bytes(b"0123456789")
    backend.overwrite(ref, b"01234")
    with pytest.raises(BlobCorrupt, match="5 bytes"):
        backend.store.open(ref)
    longer = Ref(ref.url, ref.size + 1, ref.sha256, ref.content_type)
    with pytest.raises(BlobCorrupt):
        backend.store.open(longer)


def test_verification_errors_are_final(backend: Backend) -> None:
    ref = backend.store.put_bytes(b"x")
    backend.overwrite(ref, b"y")
    with pytest.raises(BlobCorrupt) as info:
        backend.store.get_bytes(ref)
    assert isinstance(info.value, BadReference) and isinstance(info.value, HutchError)
    assert info.value.retriable is False


def test_missing_blob_is_retriable(backend: Backend) -> None:
    sha = hashlib.sha256(b"never stored").hexdigest()
    ref = Ref(f"{backend.store.url}/{blob_key(sha)}", 12, sha)
    with pytest.raises(BlobMissing) as info:
        backend.store.open(ref)
    assert info.value.retriable is True and isinstance(info.value, HutchError)
    with pytest.raises(BlobMissing):
        backend.store.get_bytes(ref)


# -- the allow-list ----------------------------------------------------------------------------


FOREIGN = [
    "http://127.0.0.1:1/sha256/aa/" + "a" * 64,
    "https://example.invalid/blob",
    "ftp://host/blob",
    "gs://bucket/key",
    "data:,hello",
    "/etc/passwd",
    "sha256/aa/" + "a" * 64,
]


@pytest.mark.parametrize("url", FOREIGN)
def test_other_schemes_are_never_followed(backend: Backend, url: str) -> None:
    ref = Ref(url, 1, "a" * 64)
    with pytest.raises(BadReference, match="never followed"):
        backend.store.check(ref)
    with pytest.raises(BadReference):
        backend.store.open(ref)


def test_refs_outside_the_store_are_refused(backend: Backend) -> None:
    for url in backend.foreign_urls:
        ref = Ref(url, 1, "a" * 64)
        with pytest.raises(BadReference):
            backend.store.check(ref)
        with pytest.raises(BadReference):
            backend.store.open(ref)


def test_size_over_the_cap_is_refused(backend: Backend, tmp_path: Path) -> None:
    store = backend.store
    store.max_size = 4 * MiB
    sha = "a" * 64
    with pytest.raises(BadReference, match="maximum"):
        store.open(Ref(f"{store.url}/{blob_key(sha)}", 4 * MiB + 1, sha))
    with pytest.raises(BlobTooLarge):
        store.put_bytes(bytes(4 * MiB + 1))
    with pytest.raises(BlobTooLarge):
        store.put_stream(ShortReads(bytes(4 * MiB + 1), most=MiB))
    source = tmp_path / "big"
    source.write_bytes(bytes(4 * MiB + 1))
    with pytest.raises(BlobTooLarge):
        store.put_file(source)
    assert _incoming(backend) == []


def test_symlink_escaping_the_root_is_refused(tmp_path: Path) -> None:
    store = _file_backend(tmp_path).store
    assert isinstance(store, FileStore)
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = b"not for tasks"
    sha = hashlib.sha256(secret).hexdigest()
    (outside / sha).write_bytes(secret)
    # A fan-out directory that is a symlink out of the root ...
    blobs = Path(store.root, "sha256")
    blobs.mkdir()
    (blobs / sha[:2]).symlink_to(outside)
    ref = Ref(f"{store.url}/{blob_key(sha)}", len(secret), sha)
    with pytest.raises(BadReference, match="outside"):
        store.open(ref)
    # ... or a blob that is a symlink to a file outside.
    other = hashlib.sha256(b"other").hexdigest()
    (blobs / other[:2]).mkdir()
    (blobs / other[:2] / other).symlink_to(outside / sha)
    with pytest.raises(BadReference, match="outside"):
        store.open(Ref(f"{store.url}/{blob_key(other)}", len(secret), sha))
    # A symlink loop is refused too, not reported as missing.
    loop = "b" * 64
    (blobs / "bb").mkdir()
    (blobs / "bb" / loop).symlink_to(blobs / "bb" / loop)
    with pytest.raises(BadReference):
        store.open(Ref(f"{store.url}/{blob_key(loop)}", 1, loop))


def test_symlink_within_the_root_is_followed(tmp_path: Path) -> None:
    store = _file_backend(tmp_path).store
    ref = store.put_bytes(b"inside")
    alias = Path(store.check(ref)).parent / ("c" * 64)
    alias.symlink_to(store.check(ref))
    assert store.get_bytes(Ref(str(ref.url).replace(ref.sha256, "c" * 64, 1), 6, ref.sha256))


# -- two hosts, concurrency -------------------------------------------------------------------


def test_another_host_sees_the_blobs(backend: Backend) -> None:
    other = backend.another_host()
    try:
        ref = backend.store.put_bytes(b"from host A")
        assert other.get_bytes(ref) == b"from host A"
        back = other.put_bytes(b"from host B")
        assert backend.store.get_bytes(back) == b"from host B"
    finally:
        other.close()


def test_concurrent_puts_of_the_same_content(backend: Backend) -> None:
    data = os.urandom(3 * MiB)
    stores = [backend.store, backend.another_host()]
    refs: list[Ref] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def put(i: int) -> None:
        try:
            start.wait()
            store = stores[i % 2]
            ref = store.put_stream(io.BytesIO(data)) if i % 4 < 2 else store.put_bytes(data)
            refs.append(ref)
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=put, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stores[1].close()
    assert errors == []
    assert len(refs) == 8 and len(set(refs)) == 1
    assert backend.store.get_bytes(refs[0]) == data
    assert _incoming(backend) == []


def test_a_second_put_keeps_the_existing_file(tmp_path: Path) -> None:
    """Another host may have the blob open: renaming over it would turn its NFS reads into
    ESTALE, so a re-put leaves the inode alone and only refreshes the mtime."""
    store = _file_backend(tmp_path).store
    ref = store.put_bytes(b"same")
    path = store.check(ref)
    before = os.stat(path)
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert store.put_bytes(b"same") == ref
    after = os.stat(path)
    assert after.st_ino == before.st_ino
    assert after.st_mtime > old + 3000


# -- sweeping ------------------------------------------------------------------------------


def test_file_sweep_deletes_old_keeps_new(tmp_path: Path) -> None:
    store = _file_backend(tmp_path).store
    assert isinstance(store, FileStore)
    old, new, refreshed = (store.put_bytes(d) for d in (b"old", b"new", b"put again"))
    days_ago = time.time() - 8 * 86400
    for ref in (old, refreshed):
        os.utime(store.check(ref), (days_ago, days_ago))
    store.put_bytes(b"put again")  # a new message points at it: it is young again
    stale = Path(store.root, "incoming", "dead.part")  # a writer that crashed mid-put
    stale.write_bytes(b"partial")
    os.utime(stale, (days_ago, days_ago))
    not_ours = Path(store.root, "README")
    not_ours.write_text("the operator's")
    os.utime(not_ours, (days_ago, days_ago))

    dry = store.sweep(dt.timedelta(days=7), dry_run=True)
    assert (dry.deleted, dry.deleted_bytes, dry.kept, dry.dry_run) == (2, 3 + 7, 2, True)
    assert store.get_bytes(old) == b"old"

    report = store.sweep(dt.timedelta(days=7))
    assert (report.scanned, report.deleted, report.kept, report.failed) == (4, 2, 2, 0)
    with pytest.raises(BlobMissing):
        store.get_bytes(old)
    assert store.get_bytes(new) == b"new" and store.get_bytes(refreshed) == b"put again"
    assert not stale.exists() and not_ours.exists()
    # A blob stored again after its sweep is simply back.
    assert store.get_bytes(store.put_bytes(b"old")) == b"old"


def test_s3_sweep_deletes_old_keeps_new(moto_endpoint: str, s3_admin: Any) -> None:
    """LastModified cannot be backdated, so the test sweeps with ``now``: the cutoff falls on
    the first whole second after the old blob (S3 lists LastModified to the second)."""
    from service.store.s3 import S3Store

    backend = _s3_backend(moto_endpoint, s3_admin)
    store = backend.store
    assert isinstance(store, S3Store)
    old = store.put_bytes(b"old")
    cutoff = dt.datetime.fromtimestamp(int(time.time()) + 1, dt.UTC)
    time.sleep(max(0.0, cutoff.timestamp() - time.time()) + 0.05)
    new = store.put_bytes(b"new")
    # An abandoned multipart upload (a producer that died mid-stream) is aborted too. moto
    # lists every upload as initiated in 2010, so it counts as old here.
    s3_admin.create_multipart_upload(Bucket=store.bucket, Key="blobs/v1/incoming/dead")
    week = dt.timedelta(days=7)

    dry = store.sweep(week, dry_run=True, now=cutoff + week)
    assert (dry.scanned, dry.deleted, dry.deleted_bytes, dry.kept) == (3, 2, 3, 1)
    assert store.get_bytes(old) == b"old" and _incoming(backend) != []

    report = store.sweep(week, now=cutoff + week)
    assert (report.deleted, report.kept, report.failed) == (2, 1, 0)
    with pytest.raises(BlobMissing):
        store.get_bytes(old)
    assert store.get_bytes(new) == b"new"
    assert _incoming(backend) == []
    later = store.sweep(week, now=cutoff + week + dt.timedelta(seconds=5))
    assert (later.deleted, later.kept) == (1, 0)
    store.close()


def test_sweep_needs_an_aware_now(tmp_path: Path) -> None:
    store = _file_backend(tmp_path).store
    with pytest.raises(ValueError, match="timezone"):
        store.sweep(dt.timedelta(days=1), now=dt.datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="negative"):
        store.sweep(dt.timedelta(days=-1))


# -- references in bodies ----------------------------------------------------------------------


def test_refs_go_into_and_come_out_of_a_body(backend: Backend) -> None:
    ref = backend.store.put_bytes(b"payload", "text/plain")
    body = embed_refs({"args": [ref, {"nested": (ref, 2)}], "kwargs": {"x": ref}})
    assert body["args"][0] == {"$hutch_ref": ref.to_wire()["$hutch_ref"]}
    assert body["args"][1]["nested"] == [ref.to_wire(), 2]
    seen: list[Ref] = []

    def resolve(found: Ref) -> bytes:
        backend.store.check(found)
        seen.append(found)
        return backend.store.get_bytes(found)

    resolved = resolve_refs(body, resolve)
    assert resolved == {
        "args": [b"payload", {"nested": [b"payload", 2]}],
        "kwargs": {"x": b"payload"},
    }
    assert seen == [ref, ref, ref]


def test_a_users_map_with_the_reserved_key_is_not_sent() -> None:
    with pytest.raises(EncodeError, match="reserved"):
        embed_refs({"args": [{"$hutch_ref": "mine"}]})
    with pytest.raises(BadReference):
        resolve_refs({"kwargs": {"x": {"$hutch_ref": "mine"}}}, lambda r: r)


# -- opening and settings ----------------------------------------------------------------------


def test_settings_defaults_and_sizes() -> None:
    assert StoreSettings.from_env({}) == StoreSettings()
    assert StoreSettings().offload_threshold == MiB and StoreSettings().url is None
    settings = StoreSettings.from_env(
        {
            "HUTCH_STORE_URL": "s3://bucket/prefix/",
            "HUTCH_OFFLOAD_THRESHOLD": "512KiB",
            "HUTCH_STORE_MAX_SIZE": "1GiB",
            "HUTCH_S3_ENDPOINT_URL": "http://127.0.0.1:9000",
            "HUTCH_S3_REGION": "eu-west-1",
            "HUTCH_S3_ADDRESSING_STYLE": "path",
        }
    )
    assert settings == StoreSettings(
        "s3://bucket/prefix/", 512 << 10, 1 << 30, "http://127.0.0.1:9000", "eu-west-1", "path"
    )


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"HUTCH_STORE_URL": "http://host/blobs"}, "HUTCH_STORE_URL"),
        ({"HUTCH_STORE_URL": "file://nas/share"}, "no host"),
        ({"HUTCH_STORE_URL": "file:///"}, "below /"),
        ({"HUTCH_STORE_URL": "s3:///prefix"}, "bucket"),
        ({"HUTCH_OFFLOAD_THRESHOLD": "lots"}, "HUTCH_OFFLOAD_THRESHOLD: 'lots' is not a size"),
        ({"HUTCH_OFFLOAD_THRESHOLD": "0"}, "at least 1 byte"),
        ({"HUTCH_STORE_MAX_SIZE": "1KiB"}, "below HUTCH_OFFLOAD_THRESHOLD"),
        ({"HUTCH_S3_ENDPOINT_URL": "127.0.0.1:9000"}, "HUTCH_S3_ENDPOINT_URL"),
        ({"HUTCH_S3_ADDRESSING_STYLE": "dns"}, "HUTCH_S3_ADDRESSING_STYLE"),
    ],
)
def test_settings_errors_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        StoreSettings.from_env(environ)


def test_open_store_refuses_what_it_cannot_open(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mounted"):
        open_store(f"file://{tmp_path}/not-mounted")
    with pytest.raises(ConfigError, match="allowed"):
        open_store(f"file://{tmp_path}/with space")
    with pytest.raises(ConfigError, match="bucket name"):
        open_store("s3://Not_A_Bucket/prefix")
    with pytest.raises(ConfigError, match="no blob store"):
        StoreSettings().open()
    store = StoreSettings(url=f"file://{tmp_path}/").open()
    assert store.url == f"file://{tmp_path}"
    assert isinstance(store, FileStore)


def test_every_store_error_is_a_hutch_error() -> None:
    for cls in (BadReference, BlobCorrupt, BlobMissing, BlobTooLarge, StoreUnavailable):
        assert issubclass(cls, HutchError)
    assert [c.retriable for c in (BadReference, BlobCorrupt, BlobMissing, StoreUnavailable)] == [
        False,
        False,
        True,
        True,
    ]


def test_an_unreachable_s3_store_is_retriable(tmp_path: Path) -> None:
    # A port nobody listens on, on loopback; no retries, so this is quick.
    store = open_store("s3://bucket/p", s3_endpoint_url=f"http://127.0.0.1:{_free_port()}")
    sha = "a" * 64
    with pytest.raises(StoreUnavailable) as info:
        store.open(Ref(f"s3://bucket/p/{blob_key(sha)}", 1, sha))
    assert info.value.retriable
    store.close()


def test_the_documented_lifecycle_rule_is_accepted(moto_endpoint: str, s3_admin: Any) -> None:
    """The S3 lifecycle rule in docs/operations.md ("The blob store") is valid JSON that an S3
    API takes as it is."""
    doc = (Path(__file__).resolve().parent.parent / "docs/operations.md").read_text()
    section = doc.split("## The blob store", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```json\n(.*?)```", section, re.DOTALL)
    rule = json.loads(block)
    bucket = f"hutch-{uuid.uuid4().hex[:12]}"
    s3_admin.create_bucket(Bucket=bucket)
    s3_admin.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration=rule)
    (stored,) = s3_admin.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert stored["Expiration"] == {"Days": 7}
    assert stored["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert stored["Filter"] == {"Prefix": "prod/"}
