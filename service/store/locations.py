"""Where blobs live, and what a location in a reference may look like.

Layout, the same under a file root and an S3 prefix::

    <root or prefix>/sha256/<first 2 hex digits>/<64 hex digits>    a blob, named by its content
    <root or prefix>/incoming/<random>                               an upload in progress

Content addressing makes a retry, a replay or a second producer of the same bytes land on the
same name (stored once, and an overwrite is harmless: same bytes), and makes the name itself a
check on the content. The two-digit fan-out keeps directories on a shared file system small.

Locations are compared as plain strings, never percent-decoded or normalised, so every
language gets the same answer. That is safe only because they are restricted: segments of
``A-Z a-z 0-9 . _ ~ + = , @ -``, never empty, never ``.`` or ``..``. A configured root or
prefix must obey the same rule; a reference that does not is refused.
"""

from __future__ import annotations

import re
from typing import Final

from service.store.errors import BadReference

BLOBS: Final = "sha256"
INCOMING: Final = "incoming"
SCHEMES: Final = ("file", "s3")
MAX_KEY_BYTES: Final = 1024  # S3's limit on a key's length, in UTF-8 bytes

_SEGMENT: Final = re.compile(r"[A-Za-z0-9._~+=,@-]+")
_HEX64: Final = re.compile(r"[0-9a-f]{64}")
# Scheme names are matched exactly, in lower case; "://" must follow.
_URL: Final = re.compile(r"([a-z][a-z0-9+.-]*)://(.*)", re.DOTALL)


def blob_key(sha256: str) -> str:
    """A blob's key relative to the root or prefix: ``sha256/ab/ab...``."""
    return f"{BLOBS}/{sha256[:2]}/{sha256}"


def is_blob_key(parts: list[str]) -> bool:
    """True for the segments ``["sha256", "ab", "ab..."]`` of a blob's relative key."""
    return (
        len(parts) == 3
        and parts[0] == BLOBS
        and _HEX64.fullmatch(parts[2]) is not None
        and parts[1] == parts[2][:2]
    )


def segment_problem(parts: list[str]) -> str | None:
    """Why these path segments are not a safe location, or None if they are."""
    for part in parts:
        if part in ("", ".", ".."):
            return "empty, '.' and '..' segments are not allowed"
        if not _SEGMENT.fullmatch(part):
            return "only A-Z a-z 0-9 . _ ~ + = , @ - and '/' are allowed"
    return None


def split_url(url: str) -> tuple[str, str, list[str]]:
    """A reference's URL as (scheme, authority, path segments); `BadReference` for anything
    hutch never follows (http, https and every other scheme) or whose path is not safe.

    The authority is the bucket for ``s3://``, and must be empty for ``file://``.
    """
    match = _URL.fullmatch(url)
    scheme = match.group(1) if match else url.partition(":")[0][:20]
    if match is None or scheme not in SCHEMES:
        raise BadReference(
            f"scheme {scheme!r} is never followed: references are {' or '.join(SCHEMES)} URLs "
            "into the configured store"
        )
    authority, slash, path = match.group(2).partition("/")
    parts = path.split("/") if slash else []
    problem = segment_problem(parts)
    if problem:
        raise BadReference(f"unsafe path in {url[:200]!r}: {problem}")
    return scheme, authority, parts


def file_path_of(url: str, root: str) -> str:
    """The absolute path a ``file://`` reference names, if it lies under ``root`` (compared
    as text; `FileStore.check` then resolves symlinks). `BadReference` otherwise."""
    scheme, authority, parts = split_url(url)
    if scheme != "file":
        raise BadReference(f"{url[:200]!r} is not in the store file://{root}")
    if authority:
        raise BadReference(f"{url[:200]!r}: a file URL has no host (file:///path)")
    root_parts = root[1:].split("/")
    if len(parts) <= len(root_parts) or parts[: len(root_parts)] != root_parts:
        raise BadReference(f"{url[:200]!r} is not under the store's root {root}")
    return "/" + "/".join(parts)


def s3_key_of(url: str, bucket: str, prefix: str) -> str:
    """The object key an ``s3://`` reference names, if it is in ``bucket`` under ``prefix``
    (may be empty). `BadReference` otherwise."""
    scheme, authority, parts = split_url(url)
    store = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    if scheme != "s3":
        raise BadReference(f"{url[:200]!r} is not in the store {store}")
    if authority != bucket:
        raise BadReference(f"{url[:200]!r}: bucket {authority[:80]!r} is not {bucket!r}")
    prefix_parts = prefix.split("/") if prefix else []
    if len(parts) <= len(prefix_parts) or parts[: len(prefix_parts)] != prefix_parts:
        raise BadReference(f"{url[:200]!r} is not under the store's prefix {store}")
    key = "/".join(parts)
    if len(key.encode()) > MAX_KEY_BYTES:
        raise BadReference(f"{url[:200]!r}: key longer than {MAX_KEY_BYTES} bytes")
    return key
