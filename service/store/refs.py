"""References to blobs (claim checks), and how they appear inside a message body.

A reference is a plain map, so any language can write and read one, in msgpack as in JSON::

    {"$hutch_ref": {"url": "s3://bucket/prefix/sha256/2c/2cf2...", "size": 5,
                    "sha256": "2cf2...", "content_type": "text/plain"}}

The rule that keeps it apart from a user's dict is one of exact shape, with a reserved key: any
map that has a member named ``$hutch_ref`` *is* a reference and must have that member only, and
the member must be a map of exactly the four fields. A user's map with that key is not passed
through as data: the client refuses to send it (`embed_refs`), and a worker refuses it as a bad
reference (`resolve_refs`), so a lookalike never reaches a task as either a dict or a blob.

A `Ref` says what the bytes are; whether it may be followed is the store's decision
(`Store.check`), because only the store knows its own scheme, bucket, prefix or root.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from service import protocol
from service.errors import EncodeError
from service.store.errors import BadReference

MARKER: Final = "$hutch_ref"
FIELDS: Final = ("url", "size", "sha256", "content_type")
DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"

# Caps on what an untrusted reference may carry, so one cannot bloat logs or error headers.
MAX_URL_LENGTH: Final = 2048
MAX_CONTENT_TYPE_LENGTH: Final = 255
MAX_SIZE_FIELD: Final = 2**53 - 1  # the largest integer every JSON reader holds exactly (JS)

_MARKER_BYTES: Final = MARKER.encode()
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
# Printable ASCII: the content type may end up in a log line or an HTTP header.
_PRINTABLE: Final = re.compile(r"[\x20-\x7e]+")


@dataclass(frozen=True, slots=True)
class Ref:
    """A blob: where it is (``url``), how many bytes (``size``), their SHA-256 in lower-case hex
    (``sha256``), and what they are (``content_type``, for the task; hutch does not read it).

    Construction validates the fields (`BadReference`), so a `Ref` is always well formed; it
    is not necessarily allowed, which `Store.check` decides.
    """

    url: str
    size: int
    sha256: str
    content_type: str = DEFAULT_CONTENT_TYPE

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not 0 < len(self.url) <= MAX_URL_LENGTH:
            raise BadReference(f"url must be a string of 1 to {MAX_URL_LENGTH} characters")
        if (
            not isinstance(self.size, int)
            or isinstance(self.size, bool)
            or not 0 <= self.size <= MAX_SIZE_FIELD
        ):
            raise BadReference(f"size must be an integer from 0 to 2^53-1, got {self.size!r:.40}")
        if not isinstance(self.sha256, str) or not _SHA256.fullmatch(self.sha256):
            raise BadReference("sha256 must be 64 lower-case hex digits")
        if (
            not isinstance(self.content_type, str)
            or len(self.content_type) > MAX_CONTENT_TYPE_LENGTH
            or not _PRINTABLE.fullmatch(self.content_type)
        ):
            raise BadReference(
                f"content_type must be 1 to {MAX_CONTENT_TYPE_LENGTH} printable ASCII characters"
            )

    # -- reading, through this process's store (`service.store.active`) ------------------------

    def open(self) -> io.BufferedReader:
        """The blob as a binary stream, verified as it is read (`Store.open`)."""
        from service.store.active import active_store

        return active_store().open(self)

    def read_bytes(self) -> bytes:
        """The whole blob, verified, in memory (`Store.get_bytes`)."""
        from service.store.active import active_store

        return active_store().get_bytes(self)

    def fetch(self, directory: str | os.PathLike[str] | None = None) -> Path:
        """A local file holding the blob, verified (`Store.fetch_to_path`): the blob's own file
        on a file store (read-only: do not modify or delete it), a download into
        ``directory`` (default: the temporary directory) on S3."""
        from service.store.active import active_store

        return active_store().fetch_to_path(self, directory or tempfile.gettempdir())

    def to_wire(self) -> dict[str, Any]:
        """The reference as it goes into a message body: ``{"$hutch_ref": {...}}``."""
        return {
            MARKER: {
                "url": self.url,
                "size": self.size,
                "sha256": self.sha256,
                "content_type": self.content_type,
            }
        }

    @classmethod
    def from_wire(cls, value: Any) -> Ref:
        """Read a reference from a decoded body; `BadReference` unless the shape is exact."""
        if not is_marker(value):
            raise BadReference(f"a reference is a map with the single key {MARKER!r}")
        if len(value) != 1:
            others = sorted(str(k) for k in value if k != MARKER)
            raise BadReference(
                f"a map with the key {MARKER!r} is a reference and may have no other keys "
                f"(found {', '.join(others)[:200]})"
            )
        fields = value[MARKER]
        if not isinstance(fields, dict):
            raise BadReference(f"{MARKER} must be a map of {', '.join(FIELDS)}")
        keys = set(fields)
        if keys != set(FIELDS):
            missing = sorted(set(FIELDS) - keys)
            unknown = sorted(str(k) for k in keys - set(FIELDS))
            raise BadReference(
                f"{MARKER} must have exactly the fields {', '.join(FIELDS)}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; unknown {', '.join(unknown)[:200]}" if unknown else "")
            )
        return cls(fields["url"], fields["size"], fields["sha256"], fields["content_type"])


def may_hold_refs(content_type: str, body: bytes) -> bool:
    """False when ``body`` certainly has no reference, so the common job skips a traversal.

    msgpack strings are raw UTF-8, so the key's bytes must appear; JSON may spell a key with
    ``\\u`` escapes, so a JSON body with any escape is looked at too."""
    if _MARKER_BYTES in body:
        return True
    return protocol.media_type(content_type) == protocol.JSON and b"\\u" in body


def is_marker(value: Any) -> bool:
    """True for any map with the reserved key: a reference, or an attempt to look like one."""
    return isinstance(value, dict) and MARKER in value


def embed_refs(value: Any) -> Any:
    """``value`` with every `Ref` in it turned into its wire form, ready to encode.

    Raises `EncodeError` for a user's map that has the reserved key ``$hutch_ref``: a worker
    would take it for a reference, so it cannot be sent as data.
    """
    if isinstance(value, Ref):
        return value.to_wire()
    if isinstance(value, dict):
        if MARKER in value:
            raise EncodeError(
                f"the map key {MARKER!r} is reserved for blob references; pass a Ref instead"
            )
        return {k: embed_refs(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [embed_refs(v) for v in value]
    return value


def resolve_refs(value: Any, resolve: Callable[[Ref], Any]) -> Any:
    """``value`` (a decoded body, arguments or result) with every reference replaced by
    ``resolve(ref)``: bytes, a path, or the `Ref` itself for a task that opens it lazily.

    Raises `BadReference` for a map that has the reserved key but not the exact shape. Values
    come from a decoder with a nesting cap (`service.protocol.decode`), so recursion is bounded.
    """
    if isinstance(value, dict):
        if MARKER in value:
            return resolve(Ref.from_wire(value))
        return {k: resolve_refs(v, resolve) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_refs(v, resolve) for v in value]
    return value
