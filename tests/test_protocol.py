"""Wire protocol v1: decoding (defensive), encoding, result envelopes. No broker needed."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import msgpack
import pytest

from service import protocol
from service.protocol import (
    DEFAULT_MAX_DEPTH,
    JSON,
    MAX_HEADER_TEXT,
    MSGPACK,
    EncodeError,
    ProtocolError,
    Reason,
)

CONTENT_TYPES = [MSGPACK, JSON]


def nested(depth: int, leaf: Any = 1) -> Any:
    """``depth`` lists inside each other around ``leaf``: ``nested(2) == [[1]]``."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def reason_of(content_type: str, body: bytes, **kwargs: Any) -> Reason:
    with pytest.raises(ProtocolError) as info:
        protocol.decode(content_type, body, **kwargs)
    assert str(info.value).startswith(f"{info.value.reason}: ")
    assert info.value.detail
    return info.value.reason


# -- decoding: good input --------------------------------------------------------------------

VALUES = [
    None,
    True,
    0,
    -1,
    2**63 - 1,
    1.5,
    "",
    "héllo ✓",
    [],
    {},
    [1, "two", None, [3.0, {"four": [5]}]],
    {"args": [1, 2], "kwargs": {"x": {"y": [True, False]}}},
]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_encode_decode_round_trip(content_type: str, value: Any) -> None:
    body = protocol.encode(content_type, value)
    assert isinstance(body, bytes)
    assert protocol.decode(content_type, body) == value


def test_msgpack_bytes_round_trip() -> None:
    body = protocol.encode(MSGPACK, {"blob": b"\x00\xff"})
    assert protocol.decode(MSGPACK, body) == {"blob": b"\x00\xff"}


def test_json_is_compact_utf8() -> None:
    assert protocol.encode(JSON, {"a": [1, 2]}) == b'{"a":[1,2]}'
    assert json.loads(protocol.encode(JSON, "é")) == "é"


def test_decode_accepts_bodies_from_other_publishers() -> None:
    # Written by hand / by another library, not by `encode`.
    assert protocol.decode(JSON, b' {"args": [1, 2] , "kwargs": {}} ') == {
        "args": [1, 2],
        "kwargs": {},
    }
    assert protocol.decode(MSGPACK, msgpack.packb([1, "x"], use_bin_type=False)) == [1, "x"]


def test_msgpack_timestamp_decodes_to_aware_utc_datetime() -> None:
    moment = dt.datetime(2024, 2, 29, 12, 30, 15, 123456, tzinfo=dt.UTC)
    body = msgpack.packb({"when": moment}, datetime=True)
    value = protocol.decode(MSGPACK, body)["when"]
    assert isinstance(value, dt.datetime)
    assert value.tzinfo is not None
    assert value.utcoffset() == dt.timedelta(0)
    assert value == moment


def test_msgpack_timestamp32_from_raw_bytes() -> None:
    # fixext4, type -1, 32-bit seconds: what any msgpack library writes for whole seconds.
    value = protocol.decode(MSGPACK, b"\xd6\xff\x00\x00\x00\x05")
    assert value == dt.datetime(1970, 1, 1, 0, 0, 5, tzinfo=dt.UTC)
    assert value.utcoffset() == dt.timedelta(0)


def test_encode_aware_datetime() -> None:
    moment = dt.datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    # msgpack: a timestamp, read back as the same instant in UTC.
    back = protocol.decode(MSGPACK, protocol.encode(MSGPACK, moment))
    assert back == moment
    assert back.utcoffset() == dt.timedelta(0)
    # JSON: ISO 8601 with the offset.
    assert protocol.encode(JSON, moment) == b'"2024-01-02T03:04:05.123456+02:00"'


# -- decoding: every way to be malformed ----------------------------------------------------

GOOD_MSGPACK = msgpack.packb({"args": [1, 2, 3], "kwargs": {"k": "v"}})

MALFORMED = [
    pytest.param(MSGPACK, GOOD_MSGPACK[:-1], id="msgpack-truncated"),
    pytest.param(MSGPACK, b"", id="msgpack-empty"),
    pytest.param(MSGPACK, b"\xdb\xff\xff\xff\xff", id="msgpack-str32-claims-4GiB"),
    pytest.param(MSGPACK, GOOD_MSGPACK + b"\x01", id="msgpack-trailing-bytes"),
    pytest.param(MSGPACK, b"\xc1", id="msgpack-never-used-byte"),
    pytest.param(MSGPACK, b"\x91\xc1", id="msgpack-never-used-byte-nested"),
    pytest.param(MSGPACK, b"\xa2\xff\xfe", id="msgpack-invalid-utf8-str"),
    pytest.param(MSGPACK, msgpack.packb({1: "int key"}), id="msgpack-int-map-key"),
    pytest.param(MSGPACK, b"\x81\xc0\x01", id="msgpack-nil-map-key"),
    pytest.param(MSGPACK, b"\x81\x91\x01\x01", id="msgpack-array-map-key"),
    pytest.param(MSGPACK, msgpack.packb(msgpack.ExtType(5, b"x")), id="msgpack-ext-5"),
    pytest.param(MSGPACK, msgpack.packb([msgpack.ExtType(0, b"")]), id="msgpack-ext-0-nested"),
    pytest.param(MSGPACK, b"\xd5\xfeab", id="msgpack-ext-minus-2"),  # reserved negative type
    pytest.param(MSGPACK, b"\xd4\xff\x00", id="msgpack-timestamp-bad-length"),
    pytest.param(MSGPACK, b"\xd7\xff" + b"\xff" * 8, id="msgpack-timestamp-bad-nanos"),
    pytest.param(JSON, b'{"args": [1, 2', id="json-truncated"),
    pytest.param(JSON, b"", id="json-empty"),
    pytest.param(JSON, b'{"a": 1} x', id="json-trailing-bytes"),
    pytest.param(JSON, b'"\xff"', id="json-invalid-utf8"),
    pytest.param(JSON, b"{'a': 1}", id="json-single-quotes"),
    pytest.param(JSON, b"1" * 5000, id="json-int-too-many-digits"),
]


@pytest.mark.parametrize(("content_type", "body"), MALFORMED)
def test_malformed(content_type: str, body: bytes) -> None:
    assert reason_of(content_type, body) is Reason.MALFORMED


def test_refused_ext_names_its_type() -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode(MSGPACK, msgpack.packb(msgpack.ExtType(42, b"payload")))
    assert info.value.reason is Reason.MALFORMED
    assert "42" in info.value.detail


@pytest.mark.parametrize(
    "timestamp",
    [
        pytest.param(msgpack.Timestamp(253402300800, 0), id="year-10000"),
        pytest.param(msgpack.Timestamp(2**62, 0), id="2**62-seconds"),
        pytest.param(msgpack.Timestamp(-(2**62), 0), id="minus-2**62-seconds"),
    ],
)
def test_msgpack_timestamp_out_of_datetime_range_is_malformed(
    timestamp: msgpack.Timestamp,
) -> None:
    # A valid msgpack timestamp that no `datetime` can hold. The OverflowError escapes
    # `decode`, so a pool child running `decode_request` dies on such a message (see
    # test_pool) instead of rejecting it as malformed.
    body = msgpack.packb({"args": [timestamp], "kwargs": {}})
    assert reason_of(MSGPACK, body) is Reason.MALFORMED


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-pickle", "", "MSGPACK"])
def test_bad_content_type(content_type: str) -> None:
    assert reason_of(content_type, b"{}") is Reason.BAD_CONTENT_TYPE


# -- decoding: nesting ------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_depth_at_default_cap_is_accepted(content_type: str) -> None:
    assert DEFAULT_MAX_DEPTH == 32
    value = nested(32)
    assert protocol.decode(content_type, protocol.encode(content_type, value)) == value


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_depth_one_over_default_cap_is_too_deep(content_type: str) -> None:
    body = protocol.encode(content_type, nested(33))
    assert reason_of(content_type, body) is Reason.TOO_DEEP


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_maps_count_towards_depth(content_type: str) -> None:
    value: Any = 1
    for _ in range(33):
        value = {"k": value}
    assert reason_of(content_type, protocol.encode(content_type, value)) is Reason.TOO_DEEP
    assert protocol.decode(content_type, protocol.encode(content_type, value["k"])) is not None


def test_scalars_do_not_count_towards_depth() -> None:
    # 32 containers around a leaf is depth 32, not 33.
    assert protocol.decode(MSGPACK, protocol.encode(MSGPACK, nested(32, leaf="leaf")))


def test_custom_and_disabled_depth_cap() -> None:
    body = protocol.encode(MSGPACK, nested(5))
    assert protocol.decode(MSGPACK, body, max_depth=5) == nested(5)
    assert reason_of(MSGPACK, body, max_depth=4) is Reason.TOO_DEEP
    deep = protocol.encode(MSGPACK, nested(200))
    assert protocol.decode(MSGPACK, deep, max_depth=None) == nested(200)


def test_json_nested_100000_deep_is_too_deep() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    assert reason_of(JSON, body) is Reason.TOO_DEEP
    assert reason_of(JSON, body, max_depth=None) is Reason.TOO_DEEP


def test_json_unclosed_100000_deep_is_too_deep() -> None:
    assert reason_of(JSON, b'{"a":' * 100_000) is Reason.TOO_DEEP


def test_msgpack_nested_2000_deep_is_too_deep() -> None:
    body = b"\x91" * 2000 + b"\x01"  # fixarray of 1, 2000 times
    assert reason_of(MSGPACK, body) is Reason.TOO_DEEP
    assert reason_of(MSGPACK, body, max_depth=None) is Reason.TOO_DEEP


def test_msgpack_nested_1000_deep_decodes_then_hits_the_cap() -> None:
    # Within msgpack's own limit, so the iterative check is what refuses it.
    body = b"\x91" * 1000 + b"\x01"
    assert reason_of(MSGPACK, body) is Reason.TOO_DEEP
    value = protocol.decode(MSGPACK, body, max_depth=None)
    depth = 0
    while isinstance(value, list):  # iterative: `==` on it would exhaust the recursion limit
        assert len(value) == 1
        value = value[0]
        depth += 1
    assert (depth, value) == (1000, 1)


# -- requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_request_round_trip(content_type: str) -> None:
    body = protocol.encode_request(content_type, (1, "two"), {"three": [3]})
    assert protocol.decode(content_type, body) == {"args": [1, "two"], "kwargs": {"three": [3]}}
    assert protocol.decode_request(content_type, body) == ([1, "two"], {"three": [3]})


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_request_defaults_and_unknown_keys(content_type: str) -> None:
    assert protocol.decode_request(content_type, protocol.encode(content_type, {})) == ([], {})
    body = protocol.encode(content_type, {"args": [1], "future": "ignored"})
    assert protocol.decode_request(content_type, body) == ([1], {})


BAD_REQUESTS = [
    pytest.param([1, 2], "map", id="body-list"),
    pytest.param("args", "map", id="body-string"),
    pytest.param(None, "map", id="body-null"),
    pytest.param({"args": {"a": 1}}, "'args'", id="args-map"),
    pytest.param({"args": "abc"}, "'args'", id="args-string"),
    pytest.param({"args": None}, "'args'", id="args-null"),
    pytest.param({"kwargs": [1]}, "'kwargs'", id="kwargs-list"),
    pytest.param({"args": [], "kwargs": 5}, "'kwargs'", id="kwargs-int"),
]


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.parametrize(("value", "named"), BAD_REQUESTS)
def test_bad_request_shape_is_malformed(content_type: str, value: Any, named: str) -> None:
    body = protocol.encode(content_type, value)
    with pytest.raises(ProtocolError) as info:
        protocol.decode_request(content_type, body)
    assert info.value.reason is Reason.MALFORMED
    assert named in info.value.detail


def test_decode_request_applies_its_depth_cap() -> None:
    body = protocol.encode_request(MSGPACK, [nested(10)], {})
    assert protocol.decode_request(MSGPACK, body) == ([nested(10)], {})
    with pytest.raises(ProtocolError) as info:
        protocol.decode_request(MSGPACK, body, max_depth=5)
    assert info.value.reason is Reason.TOO_DEEP


def test_decode_request_passes_on_decode_errors() -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode_request("text/plain", b"{}")
    assert info.value.reason is Reason.BAD_CONTENT_TYPE
    with pytest.raises(ProtocolError) as info:
        protocol.decode_request(JSON, b"{")
    assert info.value.reason is Reason.MALFORMED


# -- encoding failures ---------------------------------------------------------------------------

UNENCODABLE = [
    pytest.param(MSGPACK, object(), id="msgpack-object"),
    pytest.param(JSON, object(), id="json-object"),
    pytest.param(MSGPACK, {1, 2}, id="msgpack-set"),
    pytest.param(JSON, {1, 2}, id="json-set"),
    pytest.param(MSGPACK, 2**64, id="msgpack-2**64"),
    pytest.param(MSGPACK, -(2**63) - 1, id="msgpack-below-int64"),
    pytest.param(JSON, b"bytes", id="json-bytes"),
    pytest.param(JSON, {"nested": [b"bytes"]}, id="json-nested-bytes"),
    pytest.param(MSGPACK, dt.datetime(2020, 1, 1), id="msgpack-naive-datetime"),
    pytest.param(JSON, dt.datetime(2020, 1, 1), id="json-naive-datetime"),
    pytest.param(JSON, {(1, 2): "tuple key"}, id="json-tuple-key"),
    pytest.param(MSGPACK, "\ud800", id="msgpack-lone-surrogate"),
    pytest.param(MSGPACK, nested(2000), id="msgpack-too-deep-to-pack"),
    pytest.param(JSON, nested(100_000), id="json-too-deep-to-dump"),
]


@pytest.mark.parametrize(("content_type", "value"), UNENCODABLE)
def test_unencodable_values_raise_encode_error(content_type: str, value: Any) -> None:
    with pytest.raises(EncodeError, match=f"cannot encode as {content_type}"):
        protocol.encode(content_type, value)


def test_encode_unknown_content_type() -> None:
    with pytest.raises(EncodeError, match="unsupported content type"):
        protocol.encode("text/plain", {"a": 1})


def test_encode_request_unencodable_argument() -> None:
    with pytest.raises(EncodeError):
        protocol.encode_request(JSON, [b"raw"], {})
    with pytest.raises(EncodeError):
        protocol.encode_request(MSGPACK, [], {"n": 2**64})


@pytest.mark.parametrize(
    ("value", "token"),
    [(float("nan"), b"NaN"), (float("inf"), b"Infinity"), (float("-inf"), b"-Infinity")],
)
def test_json_non_finite_floats_are_refused_both_ways(value: float, token: bytes) -> None:
    # docs/protocol.md §4.1 and §5.4: strict JSON, which every publisher's parser accepts.
    with pytest.raises(EncodeError):
        protocol.encode(JSON, {"r": value})
    with pytest.raises(ProtocolError) as info:
        protocol.decode(JSON, b'{"args": [' + token + b"]}")
    assert info.value.reason is Reason.MALFORMED


def test_json_must_be_utf8() -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode(JSON, '{"args": [1]}'.encode("utf-16"))
    assert info.value.reason is Reason.MALFORMED


def test_results_may_have_non_string_keys() -> None:
    body = protocol.ok_result(MSGPACK, {1: "a"})
    assert protocol.decode(MSGPACK, body, string_keys=False) == {"ok": True, "result": {1: "a"}}
    with pytest.raises(ProtocolError):
        protocol.decode(MSGPACK, body)


# -- result envelopes ------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
@pytest.mark.parametrize("value", [None, 42, "text", [1, [2]], {"k": {"v": None}}], ids=repr)
def test_ok_result_shape(content_type: str, value: Any) -> None:
    body = protocol.ok_result(content_type, value)
    assert protocol.decode(content_type, body) == {"ok": True, "result": value}


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_error_result_shape(content_type: str) -> None:
    body = protocol.error_result(content_type, "ValueError", "bad value: ✗")
    assert protocol.decode(content_type, body) == {
        "ok": False,
        "error": {"type": "ValueError", "message": "bad value: ✗"},
    }


@pytest.mark.parametrize("content_type", CONTENT_TYPES)
def test_ok_result_of_unencodable_value_raises(content_type: str) -> None:
    with pytest.raises(EncodeError):
        protocol.ok_result(content_type, object())


def test_ok_result_json_is_readable_by_any_json_parser() -> None:
    assert json.loads(protocol.ok_result(JSON, [1, "a"])) == {"ok": True, "result": [1, "a"]}


# -- truncate ------------------------------------------------------------------------------------


def test_truncate() -> None:
    assert protocol.truncate("short") == "short"
    exact = "x" * MAX_HEADER_TEXT
    assert protocol.truncate(exact) == exact
    long = "y" * (MAX_HEADER_TEXT + 1)
    cut = protocol.truncate(long)
    assert len(cut) == MAX_HEADER_TEXT
    assert cut == "y" * (MAX_HEADER_TEXT - 3) + "..."
    assert protocol.truncate("abcdefghij", 8) == "abcde..."
    assert protocol.truncate("abcdefgh", 8) == "abcdefgh"
    assert protocol.truncate("", 3) == ""


# -- the error type ------------------------------------------------------------------------------


def test_protocol_error_carries_reason_and_detail() -> None:
    exc = ProtocolError(Reason.TOO_LARGE, "5 bytes")
    assert exc.reason is Reason.TOO_LARGE
    assert exc.detail == "5 bytes"
    assert str(exc) == "too_large: 5 bytes"


def test_reasons_are_stable_strings() -> None:
    # They are metric labels and header values: renaming one breaks dashboards.
    assert {r.value for r in Reason} == {
        "malformed",
        "bad_content_type",
        "bad_encoding",
        "unknown_task",
        "bad_args",
        "too_large",
        "too_deep",
        "bad_eta",
        "bad_flow",
        "failed",
        "timeout",
        "delivery_limit",
        "bad_ref",
    }


# -- the test vectors of docs/protocol.md §11 -------------------------------------------------


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def test_vector_request() -> None:
    body = hexbytes(
        "82 a4 61 72 67 73 91 02 a6 6b 77 61 72 67 73 81 a1 62 cb 40 0c 00 00 00 00 00 00"
    )
    assert len(body) == 27
    assert protocol.encode_request(MSGPACK, [2], {"b": 3.5}) == body
    assert protocol.decode_request(MSGPACK, body) == ([2], {"b": 3.5})
    json_body = b'{"args":[2],"kwargs":{"b":3.5}}'
    assert protocol.encode_request(JSON, [2], {"b": 3.5}) == json_body
    assert protocol.decode_request(JSON, json_body) == ([2], {"b": 3.5})


def test_vector_results() -> None:
    ok = hexbytes("82 a2 6f 6b c3 a6 72 65 73 75 6c 74 cb 40 16 00 00 00 00 00 00")
    assert protocol.ok_result(MSGPACK, 5.5) == ok
    assert protocol.ok_result(JSON, 5.5) == b'{"ok":true,"result":5.5}'
    error = hexbytes(
        "82 a2 6f 6b c2 a5 65 72 72 6f 72 82 a4 74 79 70 65 ac 75 6e 6b 6e 6f 77 6e 5f 74 61 73 6b"
        "a7 6d 65 73 73 61 67 65 b4 6e 6f 20 74 61 73 6b 20 6e 61 6d 65 64 20 27 6e 6f 70 65 27"
    )
    assert len(error) == 59
    assert protocol.error_result(MSGPACK, "unknown_task", "no task named 'nope'") == error
    assert (
        protocol.error_result(JSON, "unknown_task", "no task named 'nope'")
        == b'{"ok":false,"error":{"type":"unknown_task","message":"no task named \'nope\'"}}'
    )


DECODING_VECTORS = [
    ("empty map", "80", ([], {})),
    ("args only", "81 a4 61 72 67 73 92 01 a1 78", ([1, "x"], {})),
    ("unknown key ignored", "82 a4 61 72 67 73 90 a1 76 02", ([], {})),
    (
        "bin, nil, bool, int64 min, uint64 max",
        "81 a4 61 72 67 73 95 c4 02 00 ff c0 c3 d3 80 00 00 00 00 00 00 00"
        " cf ff ff ff ff ff ff ff ff",
        ([b"\x00\xff", None, True, -(2**63), 2**64 - 1], {}),
    ),
    (
        "timestamp ext -1",
        "81 a4 61 72 67 73 91 d6 ff 65 93 7d 25",
        ([dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)], {}),
    ),
    ("ext type 5", "81 a4 61 72 67 73 91 c7 00 05", Reason.MALFORMED),
    ("top level is an array", "92 01 02", Reason.MALFORMED),
    ("args is a map", "81 a4 61 72 67 73 81 a1 61 01", Reason.MALFORMED),
    ("kwargs is an array", "81 a6 6b 77 61 72 67 73 91 01", Reason.MALFORMED),
    ("int map key", "81 a4 61 72 67 73 91 81 01 02", Reason.MALFORMED),
    ("truncated", "81 a4 61 72 67 73 92", Reason.MALFORMED),
    ("str not UTF-8", "81 a4 61 72 67 73 91 a1 ff", Reason.MALFORMED),
    ("depth 32", "81 a4 61 72 67 73" + " 91" * 31 + " 00", ([nested(30, 0)], {})),
    ("depth 33", "81 a4 61 72 67 73" + " 91" * 32 + " 00", Reason.TOO_DEEP),
]


@pytest.mark.parametrize(
    ("body", "expected"), [pytest.param(b, e, id=name) for name, b, e in DECODING_VECTORS]
)
def test_decoding_vector(body: str, expected: Any) -> None:
    data = hexbytes(body)
    if isinstance(expected, Reason):
        with pytest.raises(ProtocolError) as info:
            protocol.decode_request(MSGPACK, data)
        assert info.value.reason is expected
    else:
        assert protocol.decode_request(MSGPACK, data) == expected
