"""The benchmark's task bodies (`bench.bodies`) registered as hutch tasks.

The names stay ``bench.tasks.noop``, ``bench.tasks.spin`` and ``bench.tasks.relay`` (the flows'
no-op step): the functions are the very objects the `multiprocessing.Pool` baseline and the
peers run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import service
from bench import bodies

noop = service.task(name="bench.tasks.noop")(bodies.noop)
spin = service.task(name="bench.tasks.spin")(bodies.spin)
relay = service.task(name="bench.tasks.relay")(bodies.relay)


@service.task(name="bench.tasks.digest_path")
def digest_path(path: Path) -> dict[str, object]:
    """A blob passed by reference, handed over as a local file and read in 1 MiB chunks, so
    neither the child nor the parent ever holds it whole (bench/blobs.py)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}
