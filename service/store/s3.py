"""The ``s3://bucket/prefix`` blob store, on any S3-compatible service (AWS, MinIO, Ceph RGW,
SeaweedFS), through boto3 (the ``store-s3`` extra).

boto3 is synchronous, which is what a pool child is: it runs one task at a time, so an async
client would only add an event loop to every child. Endpoint, region and credentials come from
boto3's own configuration chain (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``,
profiles, web identity, instance metadata), unless ``HUTCH_S3_ENDPOINT_URL`` /
``HUTCH_S3_REGION`` / ``HUTCH_S3_ADDRESSING_STYLE`` say otherwise (`service.store.config`).

How each put stays in bounded memory (one part, `DEFAULT_PART_SIZE`, at a time) and never
leaves a wrong object under a blob's name:

- at most one part's worth: hashed first, then one ``PutObject`` to its final key;
- a local file (`put_file`): hashed in a first pass, then uploaded to its final key in parts
  and hashed again; if the file changed between the passes the multipart upload is aborted, so
  the key is never written (an upload becomes visible only when completed);
- a longer stream (`put_stream`): its name is known only at its end, so it is uploaded in parts
  to ``incoming/<random>``, copied server-side to its name, and the temporary object deleted.

Objects are always written, even when the blob exists: a fresh LastModified is what keeps the
sweeper and the lifecycle rule from deleting a blob a new message has just pointed at.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import boto3
from boto3.exceptions import Boto3Error
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.errors import ConfigError
from service.store.base import DEFAULT_MAX_SIZE, Store, SweepReport, cutoff_of
from service.store.config import ADDRESSING_STYLES
from service.store.errors import (
    BlobCorrupt,
    BlobMissing,
    BlobTooLarge,
    StoreError,
    StoreUnavailable,
)
from service.store.locations import BLOBS, INCOMING, blob_key, s3_key_of, segment_problem
from service.store.refs import DEFAULT_CONTENT_TYPE, Ref
from service.store.verify import CHUNK, Readable, read_full, verifying_stream

if TYPE_CHECKING:
    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

DEFAULT_PART_SIZE: Final = 8 << 20  # S3's minimum part is 5 MiB; 8 MiB is boto3's own default
MAX_PARTS: Final = 10_000  # S3's limit per multipart upload
# Bucket names as S3 allows them (3 to 63 characters); compared exactly against references.
_BUCKET_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-")
_MISSING_CODES: Final = frozenset({"NoSuchKey", "404", "NotFound"})


def make_client(
    endpoint_url: str | None = None,
    region: str | None = None,
    addressing_style: str | None = None,
) -> S3Client:
    """An S3 client from boto3's configuration chain; arguments given here override it."""
    config = Config(
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=10,
        read_timeout=60,
        # Compute and check checksums only where S3 requires them: stores that predate the
        # CRC default refuse or mangle them, and every blob is checked by its sha256 anyway.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    if addressing_style:
        s3: Any = {"addressing_style": addressing_style}  # checked by the caller
        config = config.merge(Config(s3=s3))
    # A session of its own: boto3's default session is global state the task code may change.
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def _failure(exc: Exception, what: str) -> StoreError:
    """A boto error as hutch's: a missing object is `BlobMissing`, the rest `StoreUnavailable`.

    An S3 principal without s3:ListBucket gets 403, not 404, for a missing key; that reads as
    StoreUnavailable here, and the store's docs say to grant ListBucket.
    """
    if isinstance(exc, ClientError):
        error: dict[str, Any] = dict(exc.response.get("Error", {}))
        code = str(error.get("Code", ""))
        if code in _MISSING_CODES:
            return BlobMissing(f"{what}: no such object (yet?)")
        return StoreUnavailable(f"{what}: {code} {error.get('Message', '')}".strip())
    return StoreUnavailable(f"{what}: {exc}")


class _BodySource:
    """A GetObject body's reads, with transport errors as `StoreUnavailable`."""

    def __init__(self, body: StreamingBody, url: str) -> None:
        self._body = body
        self._url = url

    def read(self, n: int = -1, /) -> bytes:
        try:
            return self._body.read(None if n < 0 else n)
        except (BotoCoreError, ClientError, OSError) as exc:
            raise _failure(exc, f"reading {self._url}") from exc


class S3Store(Store):
    """Blobs in ``bucket`` under ``prefix`` (may be empty: the whole bucket)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        max_size: int = DEFAULT_MAX_SIZE,
        client: S3Client | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
    ) -> None:
        if not (3 <= len(bucket) <= 63 and set(bucket) <= _BUCKET_CHARS) or bucket[0] in ".-":
            raise ConfigError(f"{bucket!r} is not an S3 bucket name (3-63 of a-z 0-9 . -)")
        prefix = prefix.strip("/")
        problem = segment_problem(prefix.split("/") if prefix else [])
        if problem:
            raise ConfigError(f"S3 prefix {prefix!r}: {problem}")
        if addressing_style is not None and addressing_style not in ADDRESSING_STYLES:
            raise ConfigError(
                f"addressing style {addressing_style!r} is not one of "
                + ", ".join(ADDRESSING_STYLES)
            )
        if part_size < 5 << 20:
            raise ConfigError("part_size must be at least 5 MiB, S3's minimum part")
        self.bucket = bucket
        self.prefix = prefix
        self.url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        self.max_size = max_size
        self._part_size = part_size
        self._client = client or make_client(endpoint_url, region, addressing_style)

    def _key(self, relative: str) -> str:
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def _ref(self, sha256: str, size: int, content_type: str) -> Ref:
        return Ref(f"s3://{self.bucket}/{self._key(blob_key(sha256))}", size, sha256, content_type)

    def _over(self, size: int) -> None:
        if size > self.max_size:
            raise BlobTooLarge(f"blob over {self.max_size} bytes (HUTCH_STORE_MAX_SIZE)")

    # -- writing ------------------------------------------------------------------------------

    def put_bytes(self, data: bytes, content_type: str = DEFAULT_CONTENT_TYPE) -> Ref:
        self._over(len(data))
        sha256 = hashlib.sha256(data).hexdigest()
        ref = self._ref(sha256, len(data), content_type)
        self._put_object(ref, data)
        return ref

    def _put_object(self, ref: Ref, data: bytes) -> None:
        key = self._key(blob_key(ref.sha256))
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=ref.content_type
            )
        except (BotoCoreError, ClientError) as exc:
            raise _failure(exc, f"storing {ref.url}") from exc

    def put_file(
        self, path: str | os.PathLike[str], content_type: str = DEFAULT_CONTENT_TYPE
    ) -> Ref:
        size = os.stat(path).st_size
        self._over(size)
        digest = hashlib.sha256()
        with open(path, "rb", buffering=0) as source:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
        ref = self._ref(digest.hexdigest(), size, content_type)
        with open(path, "rb", buffering=0) as source:
            if size < self._part_size:
                data = read_full(source, self._part_size)
                if hashlib.sha256(data).hexdigest() != ref.sha256:
                    raise StoreError(f"{os.fspath(path)} changed while it was being stored")
                self._put_object(ref, data)
            else:
                # Parts large enough that even a file near max_size fits S3's 10,000.
                part = max(self._part_size, -(-size // MAX_PARTS))
                self._multipart(self._key(blob_key(ref.sha256)), source, content_type, part, ref)
        return ref

    def put_stream(self, source: Readable, content_type: str = DEFAULT_CONTENT_TYPE) -> Ref:
        first = read_full(source, self._part_size)
        if len(first) < self._part_size:
            return self.put_bytes(first, content_type)
        temp = self._key(f"{INCOMING}/{uuid.uuid4().hex}")
        size, sha256 = self._multipart(
            temp, source, content_type, self._part_size, None, first=first
        )
        ref = self._ref(sha256, size, content_type)
        try:
            self._client.copy(
                {"Bucket": self.bucket, "Key": temp},
                self.bucket,
                self._key(blob_key(sha256)),
                ExtraArgs={"ContentType": content_type, "MetadataDirective": "REPLACE"},
            )
        except (BotoCoreError, ClientError, Boto3Error) as exc:  # Boto3Error: s3transfer's
            raise _failure(exc, f"storing {ref.url}") from exc
        finally:
            self._delete_quietly(temp)
        return ref

    def _multipart(
        self,
        key: str,
        source: Readable,
        content_type: str,
        part_size: int,
        expected: Ref | None,
        *,
        first: bytes | None = None,
    ) -> tuple[int, str]:
        """Upload ``first`` and the rest of ``source`` to ``key``, one part in memory at a
        time; (size, sha256). With ``expected``, abort unless the bytes match it."""
        what = f"storing s3://{self.bucket}/{key}"
        try:
            upload_id = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=key, ContentType=content_type
            )["UploadId"]
        except (BotoCoreError, ClientError) as exc:
            raise _failure(exc, what) from exc
        try:
            digest = hashlib.sha256()
            size = 0
            parts: list[CompletedPartTypeDef] = []
            chunk = first if first is not None else read_full(source, part_size)
            while chunk:
                size += len(chunk)
                self._over(size)
                if len(parts) == MAX_PARTS:
                    raise BlobTooLarge(f"blob over {MAX_PARTS} parts of {part_size} bytes")
                digest.update(chunk)
                number = len(parts) + 1
                etag = self._client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=chunk
                )["ETag"]
                parts.append({"ETag": etag, "PartNumber": number})
                del chunk  # let the part go before reading the next one
                chunk = read_full(source, part_size)
            sha256 = digest.hexdigest()
            if expected is not None and (size, sha256) != (expected.size, expected.sha256):
                raise StoreError(f"the file for {expected.url} changed while it was being stored")
            self._client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException as exc:
            # If this fails too, the lifecycle rule's AbortIncompleteMultipartUpload or the
            # sweeper cleans up.
            with contextlib.suppress(BotoCoreError, ClientError):
                self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            if isinstance(exc, BotoCoreError | ClientError):
                raise _failure(exc, what) from exc
            raise
        return size, sha256

    def _delete_quietly(self, key: str) -> None:
        # If this fails, an orphan under incoming/, for the sweeper or the lifecycle rule.
        with contextlib.suppress(BotoCoreError, ClientError):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    # -- reading ------------------------------------------------------------------------------

    def check(self, ref: Ref) -> str:
        key = s3_key_of(ref.url, self.bucket, self.prefix)
        self._check_size(ref)
        return key

    def open(self, ref: Ref) -> io.BufferedReader:
        key = self.check(ref)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise _failure(exc, f"opening {ref.url}") from exc
        body = response["Body"]
        if response["ContentLength"] != ref.size:
            body.close()
            raise BlobCorrupt(
                f"{ref.url} has {response['ContentLength']} bytes; its reference says {ref.size}"
            )
        return verifying_stream(_BodySource(body, ref.url), ref, body.close)

    def fetch_to_path(self, ref: Ref, directory: str | os.PathLike[str]) -> Path:
        """Download to ``directory/<sha256>`` (through a temporary name, so a concurrent fetch
        of the same blob is harmless); verified before it gets its name."""
        final = Path(directory) / ref.sha256
        temp = Path(directory) / f".{ref.sha256}.{uuid.uuid4().hex}.part"
        try:
            with self.open(ref) as stream, open(temp, "wb") as out:
                shutil.copyfileobj(stream, out, CHUNK)
            os.replace(temp, final)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return final

    # -- housekeeping -------------------------------------------------------------------------

    def sweep(
        self, older_than: dt.timedelta, *, dry_run: bool = False, now: dt.datetime | None = None
    ) -> SweepReport:
        """Delete every object under ``sha256/`` and ``incoming/`` whose LastModified is before
        the cutoff, and abort multipart uploads under the prefix begun before it."""
        cutoff = cutoff_of(older_than, now)
        scanned = deleted = deleted_bytes = kept = failed = 0
        batch: dict[str, int] = {}  # key: size

        def flush() -> None:
            nonlocal deleted, deleted_bytes, failed
            refused = self._delete_batch(list(batch)) if batch and not dry_run else set()
            failed += len(refused)
            deleted += len(batch) - len(refused)
            deleted_bytes += sum(size for key, size in batch.items() if key not in refused)
            batch.clear()

        try:
            for obj in self._objects(f"{BLOBS}/", f"{INCOMING}/"):
                scanned += 1
                if obj["LastModified"] >= cutoff:
                    kept += 1
                    continue
                batch[obj["Key"]] = int(obj.get("Size", 0))
                if len(batch) == 1000:  # DeleteObjects' limit per request
                    flush()
            flush()
            for upload in self._uploads():
                scanned += 1
                if upload["Initiated"] >= cutoff:
                    kept += 1
                    continue
                deleted += 1
                if not dry_run:
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
        except (BotoCoreError, ClientError) as exc:
            raise _failure(exc, f"sweeping {self.url}") from exc
        return SweepReport(scanned, deleted, deleted_bytes, kept, failed, dry_run)

    def _objects(self, *areas: str) -> Iterator[Any]:
        paginator = self._client.get_paginator("list_objects_v2")
        for area in areas:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(area)):
                yield from page.get("Contents", [])

    def _uploads(self) -> Iterator[Any]:
        paginator = self._client.get_paginator("list_multipart_uploads")
        prefix = self._key("")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Uploads", [])

    def _delete_batch(self, keys: list[str]) -> set[str]:
        """Delete up to 1000 keys; the ones that could not be."""
        response = self._client.delete_objects(
            Bucket=self.bucket,
            Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
        )
        return {error.get("Key", "") for error in response.get("Errors", [])}

    def close(self) -> None:
        self._client.close()
