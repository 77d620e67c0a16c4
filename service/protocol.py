"""Wire protocol v1: what a task message and a result look like on the wire.

`docs/protocol.md` is the normative text; this module is its one implementation, shared by the
worker (parent and child), the client and the tests. Nothing here talks to the broker.

Decoding is defensive because the body comes from any publisher in any language: content types
are an allow-list, msgpack extension types other than the timestamp are refused, and nesting is
capped (msgpack itself accepts depth 1024, but pickling and ``repr`` fail near 500).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Final

import msgpack

from service.errors import EncodeError, ProtocolError

MSGPACK: Final = "application/msgpack"
JSON: Final = "application/json"
CONTENT_TYPES: Final = frozenset({MSGPACK, JSON})
# The one parameter accepted, on JSON only: HTTP-minded clients add it, and it says what JSON
# must be anyway (RFC 8259). Any other parameter or charset is refused, never guessed at.
_JSON_CHARSETS: Final = frozenset({"utf-8", '"utf-8"'})

# Message headers. `task` is set by publishers; the `x-hutch-*` ones are set by hutch.
TASK_HEADER: Final = "task"
ATTEMPT_HEADER: Final = "x-hutch-attempt"
DUE_HEADER: Final = "x-hutch-due"  # on a retry copy: Unix ms when its delay ends
ETA_HEADER: Final = "x-hutch-eta"  # set by publishers: Unix ms before which the task must not run
SLOT_HEADER: Final = "x-hutch-slot"  # on a schedule's fire: the slot it fires, Unix ms
REASON_HEADER: Final = "x-hutch-reason"
ERROR_TYPE_HEADER: Final = "x-hutch-error-type"
ERROR_MESSAGE_HEADER: Final = "x-hutch-error-message"
QUEUE_HEADER: Final = "x-hutch-queue"
DEAD_AT_HEADER: Final = "x-hutch-dead-lettered-at"
# Set on copies re-published from Q.dlq by `hutch dlq replay`; they survive later dead-lettering.
REPLAY_OF_HEADER: Final = "x-hutch-replay-of"
REPLAYED_AT_HEADER: Final = "x-hutch-replayed-at"
REPLAYS_HEADER: Final = "x-hutch-replays"
# On every message of a flow (`service.continuation`): the flow's id and the step's path.
FLOW_HEADER: Final = "x-hutch-flow"
FLOW_STEP_HEADER: Final = "x-hutch-flow-step"
# On one message of a flow, its entry step: counts the flow as started.
FLOW_START_HEADER: Final = "x-hutch-flow-start"
# On a failed flow step's copy sent to the internal `hutch.flow.failed` task: the task that failed.
FAILED_TASK_HEADER: Final = "x-hutch-failed-task"
# On a flow's fan-in record in `hutch.joins` (`service.joins` reads only these, never the body).
JOIN_HEADER: Final = "x-hutch-join"  # "{flow id}:{group path}"
JOIN_INDEX_HEADER: Final = "x-hutch-join-index"  # the member, 0..n-1
JOIN_SIZE_HEADER: Final = "x-hutch-join-size"  # n
JOIN_OK_HEADER: Final = "x-hutch-join-ok"  # the member succeeded (true) or failed for good
JOIN_QUEUE_HEADER: Final = "x-hutch-join-queue"  # where the fan-in's follow-up task goes
JOIN_AT_HEADER: Final = "x-hutch-join-at"  # Unix ms the record was first written
JOIN_HANDLED_HEADER: Final = "x-hutch-join-handled"  # a failed record whose flow was ended

# Headers a pool child needs to tell a task about its delivery (`service.context`); only these
# cross the pipe.
CHILD_HEADERS: Final = (
    ETA_HEADER,
    SLOT_HEADER,
    FLOW_HEADER,
    FLOW_STEP_HEADER,
    FAILED_TASK_HEADER,
    REASON_HEADER,
    ERROR_TYPE_HEADER,
    ERROR_MESSAGE_HEADER,
)
# The furthest ahead an ETA may be: anything later is taken for a unit mistake (seconds for
# milliseconds, or microseconds) and dead-lettered as bad_eta rather than held for decades.
MAX_ETA_AHEAD_MS: Final = 365 * 24 * 3600 * 1000

DEFAULT_MAX_DEPTH: Final = 32
# A flow's message nests its continuation (the steps still to run, with their arguments)
# around the arguments: it may be this much deeper than ``max_depth``.
FLOW_DEPTH_ALLOWANCE: Final = 24
# Header values are truncated so one enormous error message cannot bloat every dead letter.
MAX_HEADER_TEXT: Final = 1024


class Reason(StrEnum):
    """Why a message went to the dead-letter queue: a fixed set, safe as a metric label."""

    MALFORMED = "malformed"
    BAD_CONTENT_TYPE = "bad_content_type"
    BAD_ENCODING = "bad_encoding"
    UNKNOWN_TASK = "unknown_task"
    BAD_ARGS = "bad_args"
    TOO_LARGE = "too_large"
    TOO_DEEP = "too_deep"
    BAD_ETA = "bad_eta"
    BAD_FLOW = "bad_flow"
    BAD_REF = "bad_ref"  # a blob reference that must not be followed, or whose blob never came
    FAILED = "failed"
    TIMEOUT = "timeout"
    DELIVERY_LIMIT = "delivery_limit"


def media_type(content_type: str | None) -> str | None:
    """The allowed content type a ``content_type`` property names, or None.

    ``application/msgpack`` and ``application/json`` match exactly; JSON may also carry
    ``; charset=utf-8`` (any case, optional spaces). Everything else is None (bad_content_type).
    """
    if content_type in CONTENT_TYPES:
        return content_type
    if content_type is None:
        return None
    media, sep, parameter = content_type.partition(";")
    if not sep or media.strip().lower() != JSON:
        return None
    name, equals, value = parameter.partition("=")
    if equals and name.strip().lower() == "charset" and value.strip().lower() in _JSON_CHARSETS:
        return JSON
    return None


def eta_of(headers: Mapping[str, Any] | None, now_ms: int) -> int | None:
    """The ``x-hutch-eta`` of a message (Unix ms), None when it has none.

    Raises `ProtocolError` (bad_eta) for a value that is not an integer, is negative, or lies
    more than `MAX_ETA_AHEAD_MS` after ``now_ms``.
    """
    if not headers or ETA_HEADER not in headers:
        return None
    value = headers[ETA_HEADER]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(
            Reason.BAD_ETA,
            f"{ETA_HEADER} must be an integer of Unix milliseconds, got {type(value).__name__} "
            f"{truncate(repr(value), 80)}",
        )
    if value < 0:
        raise ProtocolError(Reason.BAD_ETA, f"{ETA_HEADER} is negative: {value}")
    if value - now_ms > MAX_ETA_AHEAD_MS:
        raise ProtocolError(
            Reason.BAD_ETA,
            f"{ETA_HEADER} {value} is more than 365 days ahead (milliseconds expected: "
            "was it microseconds?)",
        )
    return value


def int_header(headers: Mapping[str, Any] | None, name: str) -> int | None:
    """A header that must be an integer; None when absent or of another type (bools too)."""
    value = (headers or {}).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(Reason.MALFORMED, f"msgpack extension type {code} is not allowed")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _check_depth(value: Any, max_depth: int) -> None:
    # Iterative, so a hostile depth cannot exhaust the C stack here either.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            raise ProtocolError(Reason.TOO_DEEP, f"nesting deeper than {max_depth}")
        stack.extend((child, depth + 1) for child in children)


def decode(
    content_type: str,
    body: bytes,
    *,
    max_depth: int | None = DEFAULT_MAX_DEPTH,
    string_keys: bool = True,
) -> Any:
    """Decode a body of an allowed content type (`media_type` says which are allowed).

    ``max_depth`` caps nesting (None: no cap). ``string_keys=False`` lets msgpack maps keep
    other key types, for results: a task may return ``{1: "a"}``, a request may not.
    """
    media = content_type if content_type in CONTENT_TYPES else media_type(content_type)
    try:
        if media == MSGPACK:
            value = msgpack.unpackb(
                body, raw=False, strict_map_key=string_keys, ext_hook=_refuse_ext, timestamp=3
            )
        elif media == JSON:
            # Strict RFC 8259: UTF-8 only, and no NaN/Infinity, which JSON.parse and most other
            # parsers reject; what hutch accepts, every publisher can produce.
            value = json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
        else:
            raise ProtocolError(Reason.BAD_CONTENT_TYPE, f"content type {content_type!r}")
    except ProtocolError:
        raise
    except (msgpack.StackError, RecursionError) as exc:
        raise ProtocolError(Reason.TOO_DEEP, "nesting too deep to decode") from exc
    except (ValueError, TypeError, OverflowError) as exc:  # also bad UTF-8, huge timestamps
        what = str(exc) or type(exc).__name__
        raise ProtocolError(Reason.MALFORMED, f"cannot decode {content_type}: {what}") from exc
    if max_depth is not None:
        _check_depth(value, max_depth)
    return value


def decode_request(
    content_type: str, body: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> tuple[list[Any], dict[str, Any]]:
    """Decode a task body into ``(args, kwargs)``; unknown top-level keys are ignored."""
    args, kwargs, _ = decode_flow_request(content_type, body, max_depth=max_depth)
    return args, kwargs


def decode_flow_request(
    content_type: str, body: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> tuple[list[Any], dict[str, Any], Any]:
    """Decode a task body into ``(args, kwargs, flow)``: ``flow`` is the raw value of its
    ``flow`` key (None without one), checked by `service.continuation`.

    A body with a flow may nest `FLOW_DEPTH_ALLOWANCE` levels deeper than ``max_depth``.
    """
    return request_parts(decode(content_type, body, max_depth=None), max_depth=max_depth)


def request_parts(
    value: Any, *, max_depth: int = DEFAULT_MAX_DEPTH
) -> tuple[list[Any], dict[str, Any], Any]:
    """`decode_flow_request` of a body already decoded without a depth cap (a pool child
    decodes first to see whether the body is a blob reference, `service.pool.blobs`)."""
    if isinstance(value, dict) and value.get("flow") is not None:
        _check_depth(value, max_depth + FLOW_DEPTH_ALLOWANCE)
    else:
        _check_depth(value, max_depth)
    if not isinstance(value, dict):
        raise ProtocolError(Reason.MALFORMED, "body must be a map with 'args' and 'kwargs'")
    args = value.get("args", [])
    kwargs = value.get("kwargs", {})
    if not isinstance(args, list):
        raise ProtocolError(Reason.MALFORMED, "'args' must be an array")
    if not isinstance(kwargs, dict):
        raise ProtocolError(Reason.MALFORMED, "'kwargs' must be a map")
    return args, kwargs, value.get("flow")


def _wire_form(value: Any) -> Any:
    """What an object with a ``to_wire`` method (a blob reference, `service.store.Ref`) is
    encoded as; TypeError for anything else. A hook rather than an import: the codec stays
    free of the store, and results with no reference pay for no traversal."""
    to_wire = getattr(type(value), "to_wire", None)
    if to_wire is None:
        raise TypeError(f"{type(value).__name__} is not serializable")
    return to_wire(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.isoformat()
    if getattr(type(value), "to_wire", None) is not None:
        return _wire_form(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode(content_type: str, value: Any) -> bytes:
    """Encode a value; raises `EncodeError` for values the content type cannot carry."""
    try:
        if content_type == MSGPACK:
            return msgpack.packb(value, datetime=True, default=_wire_form)  # type: ignore[no-any-return]
        if content_type == JSON:
            return json.dumps(
                value, separators=(",", ":"), default=_json_default, allow_nan=False
            ).encode()
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        raise EncodeError(f"cannot encode as {content_type}: {exc}") from exc
    raise EncodeError(f"unsupported content type {content_type!r}")


def encode_request(content_type: str, args: Any, kwargs: Any) -> bytes:
    return encode(content_type, {"args": list(args), "kwargs": dict(kwargs)})


def request_of_bodies(content_type: str, bodies: list[bytes], *extra: Any) -> bytes:
    """A task body whose first argument is the array of the already encoded ``bodies``, then
    ``extra`` arguments: built from the bytes, without decoding them (the fan-in of a flow
    hands its records to a pool child this way; the parent only moves bytes). Every body must
    be of ``content_type``."""
    if content_type == JSON:
        rest = b"".join(b"," + encode(JSON, value) for value in extra)
        return b'{"args":[[' + b",".join(bodies) + b"]" + rest + b'],"kwargs":{}}'
    if content_type == MSGPACK:
        packer = msgpack.Packer(datetime=True)
        return b"".join(
            [
                packer.pack_map_header(2),
                packer.pack("args"),
                packer.pack_array_header(1 + len(extra)),
                packer.pack_array_header(len(bodies)),
                *bodies,
                *(packer.pack(value) for value in extra),
                packer.pack("kwargs"),
                packer.pack_map_header(0),
            ]
        )
    raise EncodeError(f"unsupported content type {content_type!r}")


def ok_result(content_type: str, value: Any) -> bytes:
    return encode(content_type, {"ok": True, "result": value})


def error_result(content_type: str, error_type: str, message: str) -> bytes:
    # Only strings go in, so this cannot fail for an allowed content type.
    return encode(content_type, {"ok": False, "error": {"type": error_type, "message": message}})


def truncate(text: str, limit: int = MAX_HEADER_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
