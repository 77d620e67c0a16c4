"""The steps of the upload pipeline (`python examples/pipeline.py`): upload, then virus_scan and
extract_metadata in parallel, then finalize; report_failure is the flow's on_error.

The files are PNG images on a disk every worker can read. Steps pass *references* (path, size,
hash) from one to the next, never the bytes: a flow's results travel through the broker, which
should not carry megabytes. Each step does real work on the bytes:

- ``upload``: reads the file and hashes it (SHA-256), the identity the later steps check;
- ``virus_scan``: re-reads it, checks the hash (the file must not change under the pipeline),
  looks for known signatures anywhere in it and measures the byte entropy per 64 KiB block
  (packed or encrypted payloads sit near 8 bits per byte); a signature fails the step for good;
- ``extract_metadata``: parses the PNG: every chunk's CRC, the IHDR header, the tEXt fields,
  and the decompressed image data (its size must match the header; its mean byte is reported);
- ``finalize``: gets ``[scan, metadata]`` and files the outcome;
- ``report_failure``: gets the flow id, the failed step and the error, and files that outcome.

Outcomes are files ``OUTBOX/<flow id>.finished`` or ``.failed`` (JSON). Every step runs at least
once, so a step may run twice after a crash: writing a file named by the flow id, replacing it
atomically with the same content, makes a second run harmless.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Final

from service import current_task, task

PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
# The "virus" database. Real scanners are tested with the EICAR string; this pattern plays its
# part without making any real scanner flag this repository.
SIGNATURES: Final = {
    "Hutch.Test.Pipeline": b"HUTCH-PIPELINE-TEST-SIGNATURE-4f1c",
    "Hutch.Test.Dropper": b"\x4d\x5a\x90\x00HUTCH-DROPPER",
}
ENTROPY_BLOCK: Final = 64 * 1024


class Infected(Exception):
    """The file carries a known signature: retrying cannot clean it."""


class BadImage(Exception):
    """The file is not a well-formed PNG."""


@task
def upload(path: str) -> dict[str, Any]:
    """Read the file and hash it; what the next steps get is this reference, not the bytes."""
    data = Path(path).read_bytes()
    return {"path": path, "name": Path(path).name, "size": len(data), "sha256": _sha256(data)}


@task(max_attempts=1)  # an infected file stays infected: no retries, fail the flow at once
def virus_scan(file: dict[str, Any]) -> dict[str, Any]:
    data = _read_checked(file)
    for name, signature in SIGNATURES.items():
        offset = data.find(signature)
        if offset >= 0:
            raise Infected(f"{file['name']}: signature {name} at byte {offset}")
    entropies = [
        _entropy(data[start : start + ENTROPY_BLOCK])
        for start in range(0, len(data), ENTROPY_BLOCK)
    ]
    return {
        "name": file["name"],
        "clean": True,
        "signatures": len(SIGNATURES),
        "max_entropy": round(max(entropies, default=0.0), 3),
    }


@task
def extract_metadata(file: dict[str, Any]) -> dict[str, Any]:
    data = _read_checked(file)
    if not data.startswith(PNG_SIGNATURE):
        raise BadImage(f"{file['name']}: not a PNG (no PNG signature)")
    header: dict[str, int] = {}
    text: dict[str, str] = {}
    idat: list[bytes] = []
    chunks = 0
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise BadImage(f"{file['name']}: bad CRC in chunk {kind!r} at byte {pos}")
        chunks += 1
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", body)
            header = {"width": width, "height": height, "bit_depth": depth, "color_type": color}
        elif kind == b"tEXt":
            key, _, value = body.partition(b"\0")
            text[key.decode("latin-1")] = value.decode("latin-1")
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if not header:
        raise BadImage(f"{file['name']}: no IHDR chunk")
    pixels = zlib.decompress(b"".join(idat))
    # 8-bit RGB (colour type 2): each row is a filter byte and 3 bytes per pixel.
    expected = header["height"] * (1 + 3 * header["width"])
    if header["bit_depth"] != 8 or header["color_type"] != 2 or len(pixels) != expected:
        raise BadImage(f"{file['name']}: image data does not match its header {header}")
    return {
        "name": file["name"],
        "sha256": file["sha256"],
        "size": file["size"],
        **header,
        "chunks": chunks,
        "text": text,
        "trailing_bytes": len(data) - pos,
        "mean_byte": round(sum(pixels) / len(pixels), 2),
    }


@task
def finalize(results: list[dict[str, Any]], outbox: str) -> dict[str, Any]:
    scan, meta = results
    outcome = {
        "outcome": "finished",
        "name": meta["name"],
        "sha256": meta["sha256"],
        "size": meta["size"],
        "width": meta["width"],
        "height": meta["height"],
        "title": meta["text"].get("Title", ""),
        "max_entropy": scan["max_entropy"],
    }
    _file_outcome(outbox, "finished", outcome)
    return outcome


@task
def report_failure(
    flow_id: str, failed: dict[str, Any], error: dict[str, Any], outbox: str
) -> None:
    _file_outcome(
        outbox,
        "failed",
        {"outcome": "failed", "flow": flow_id, "failed": failed, "error": error},
    )


def _read_checked(file: dict[str, Any]) -> bytes:
    data = Path(file["path"]).read_bytes()
    if _sha256(data) != file["sha256"]:
        # A changed file is a real problem, not a hiccup: fail with the reason.
        raise ValueError(f"{file['name']} changed after upload (SHA-256 differs); upload it again")
    return data


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entropy(block: bytes) -> float:
    """Shannon entropy in bits per byte."""
    n = len(block)
    counts = collections.Counter(block).values()
    return -sum(c / n * math.log2(c / n) for c in counts)


def _file_outcome(outbox: str, kind: str, outcome: dict[str, Any]) -> None:
    """Write OUTBOX/<flow id>.<kind> atomically (a repeated run rewrites the same content)."""
    flow_id = current_task().flow or "no-flow"
    target = Path(outbox) / f"{flow_id}.{kind}"
    scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    scratch.write_text(json.dumps(outcome, sort_keys=True))
    os.replace(scratch, target)
