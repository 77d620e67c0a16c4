"""Blob store for large task arguments and results, passed by reference (claim check).

A producer puts the bytes in a store shared by every host and sends a small `Ref` instead; the
pool child that runs the task checks the ref against its own store and reads the bytes back,
verified. The parent never downloads. See docs/protocol.md §13 for the wire format.

    store = open_store("file:///shared/hutch")       # or "s3://bucket/prefix"
    ref = store.put_file("/tmp/video.mp4", "video/mp4")
    ...                                               # ref.to_wire() goes into the message
    with store.open(ref) as stream:                   # in the child: verified as it is read
        ...

Importing this package loads neither boto3 nor the S3 store; `open_store` does, for ``s3://``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from service.store.base import DEFAULT_MAX_SIZE, Store, SweepReport
    from service.store.config import StoreSettings
    from service.store.errors import (
        BadReference,
        BlobCorrupt,
        BlobMissing,
        BlobTooLarge,
        StoreError,
        StoreUnavailable,
    )
    from service.store.files import FileStore
    from service.store.refs import MARKER, Ref, embed_refs, is_marker, resolve_refs

# Loaded on first use, so a pool child that only checks for references (`service.pool.blobs`)
# does not pay for the stores, their settings and hashlib at start-up.
_LAZY = {
    "DEFAULT_MAX_SIZE": "base",
    "Store": "base",
    "SweepReport": "base",
    "StoreSettings": "config",
    "BadReference": "errors",
    "BlobCorrupt": "errors",
    "BlobMissing": "errors",
    "BlobTooLarge": "errors",
    "StoreError": "errors",
    "StoreUnavailable": "errors",
    "FileStore": "files",
    "MARKER": "refs",
    "Ref": "refs",
    "embed_refs": "refs",
    "is_marker": "refs",
    "resolve_refs": "refs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'service.store' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"service.store.{module}"), name)


__all__ = [
    "DEFAULT_MAX_SIZE",
    "MARKER",
    "BadReference",
    "BlobCorrupt",
    "BlobMissing",
    "BlobTooLarge",
    "FileStore",
    "Ref",
    "Store",
    "StoreError",
    "StoreSettings",
    "StoreUnavailable",
    "SweepReport",
    "embed_refs",
    "is_marker",
    "open_store",
    "resolve_refs",
]


def open_store(
    url: str,
    *,
    max_size: int | None = None,
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
    s3_addressing_style: str | None = None,
) -> Store:
    """The store at ``url``: ``file:///path`` (an existing directory, the same on every host)
    or ``s3://bucket[/prefix]``; ``max_size`` defaults to `DEFAULT_MAX_SIZE`. The ``s3_*``
    arguments override boto3's own configuration.
    Raises `ConfigError` for a bad URL, a missing root, or boto3 not installed."""
    from service.errors import ConfigError
    from service.store.base import DEFAULT_MAX_SIZE
    from service.store.config import store_url_parts
    from service.store.files import FileStore

    if max_size is None:
        max_size = DEFAULT_MAX_SIZE
    scheme, bucket, path = store_url_parts(url)
    if scheme == "file":
        return FileStore(path, max_size=max_size)
    try:
        from service.store.s3 import S3Store
    except ImportError as exc:
        raise ConfigError(
            f"HUTCH_STORE_URL {url!r} needs boto3: pip install 'hutch[store-s3]' ({exc})"
        ) from None
    return S3Store(
        bucket,
        path,
        max_size=max_size,
        endpoint_url=s3_endpoint_url,
        region=s3_region,
        addressing_style=s3_addressing_style,
    )
