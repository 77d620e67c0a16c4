"""The errors of the blob store, in two families: retry later, or never.

A pool child resolving a reference needs one decision from an error: is it worth trying again?
`BlobMissing` and `StoreUnavailable` say yes (an NFS client's attribute cache, an object not
yet visible, a store briefly down); `BadReference` and its `BlobCorrupt` say no (the reference
itself is wrong, or the bytes are not the ones it names), so retrying would only delay the
dead letter. ``retriable`` carries that decision as data, so the caller needs no isinstance
ladder.

``failure`` names the family as a fixed label value (`RefFailure`), for the worker's
``hutch_blob_ref_failures_total``. All are `HutchError`s, kept beside the store that raises
them (``service.errors`` holds the rest).
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

from service.errors import HutchError


class RefFailure(StrEnum):
    """Why a pool child could not resolve a reference; the ``kind`` label of
    hutch_blob_ref_failures_total."""

    REFUSED = "refused"  # BadReference: not to be followed (shape, allow-list, path, size)
    CORRUPT = "corrupt"  # BlobCorrupt: the bytes are not the ones the reference names
    MISSING = "missing"  # BlobMissing: no blob there (yet)
    UNAVAILABLE = "unavailable"  # StoreUnavailable: the store failed
    TOO_LARGE = "too_large"  # BlobTooLarge: a result too large even for the store


class StoreError(HutchError):
    """Something went wrong with a blob; ``detail`` says what, for people."""

    retriable: ClassVar[bool] = False
    failure: ClassVar[RefFailure] = RefFailure.REFUSED

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class BadReference(StoreError):
    """A reference that must not be followed: malformed, outside the configured store (another
    scheme, bucket, prefix or root; ``..``; a symlink out of the root), or over the size cap.

    Never retried: the same reference fails the same way every time.
    """


class BlobCorrupt(BadReference):
    """The blob's bytes do not match its reference (size or sha256). Never retried: a blob
    is written once under its content's name, so it does not get better by waiting."""

    failure = RefFailure.CORRUPT


class BlobMissing(StoreError):
    """No blob at the reference's location, yet. It may not be visible on this host so far (NFS
    attribute cache, S3 replication) or may have been swept; retry with backoff, then give up."""

    retriable = True
    failure = RefFailure.MISSING


class StoreUnavailable(StoreError):
    """The store did not answer properly (I/O error, timeout, 5xx, access denied); retry later."""

    retriable = True
    failure = RefFailure.UNAVAILABLE


class BlobTooLarge(StoreError):
    """A put would store more than the configured maximum blob size (``HUTCH_STORE_MAX_SIZE``)."""

    failure = RefFailure.TOO_LARGE
