"""Values as the commands print them: JSON-safe headers and bodies, aligned tables."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import math
from collections.abc import Sequence
from typing import Any

from service.ops.deadletters import iso
from service.ops.dlq import Detail


def raw_text(body: bytes) -> Any:
    """A body that did not decode: as text if it is UTF-8, else as base64."""
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return {"$base64": base64.b64encode(body).decode()}


def jsonable(value: Any) -> Any:
    """Header, property and body values as plain JSON (bytes as ``{"$base64": ...}``)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$base64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, dt.datetime):
        return iso(value if value.tzinfo else value.replace(tzinfo=dt.UTC))
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def table(
    rows: Sequence[Sequence[str]], *, right: Sequence[int] = (), ragged_last: bool = False
) -> str:
    """Rows as aligned columns, two spaces apart; columns in ``right`` are right-aligned, and
    with ``ragged_last`` the last column is not padded (long free text)."""
    columns = len(rows[0])
    sized = columns - 1 if ragged_last else columns
    widths = [max(len(row[i]) for row in rows) for i in range(sized)]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=False))
        ]
        if ragged_last:
            cells.append(row[-1])
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def detail_json(detail: Detail) -> dict[str, Any]:
    """One dead letter in full, as ``hutch dlq show --json`` prints it."""
    body, error = detail.decoded()
    out: dict[str, Any] = {
        **detail.letter.to_json(),
        "properties": jsonable(detail.properties),
        "headers": jsonable(detail.headers),
        "body": jsonable(body),
    }
    if error is not None:
        out["body_error"] = error
        out["raw_body"] = raw_text(detail.body)
    return out
