"""Tasks the claim-check tests run in real workers: each takes a blob in one of the shapes a
parameter annotation asks for, and says what it saw (size, sha256, worker pid)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO

from service import task
from service.store import Ref


def _seen(data: bytes) -> dict[str, object]:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pid": os.getpid()}


@task
def digest(data: bytes, label: str = "") -> dict[str, object]:
    """Ordinary values: ``data`` may have come inline or in an offloaded body."""
    return {**_seen(data), "label": label}


@task
def make(size: int) -> bytes:
    """A result of ``size`` bytes (offloaded by the child when over the threshold)."""
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


@task
def from_path(path: Path) -> dict[str, object]:
    """A reference as a local file, read in chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest(), "path": str(path)}


@task
def from_stream(stream: BinaryIO) -> dict[str, object]:
    """A reference as a verifying stream."""
    h = hashlib.sha256()
    size = 0
    while chunk := stream.read(1 << 20):
        h.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


@task
def from_ref(ref: Ref) -> dict[str, object]:
    """The reference itself, opened by the task."""
    with ref.open() as stream:
        data = stream.read()
    return {**_seen(data), "url": ref.url}
