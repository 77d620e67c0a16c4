"""The protocol's test vectors (docs/protocol/vectors/vectors.json) against hutch's own codec.

Every request vector must decode to its ``decoded`` value, every invalid-request vector must be
refused with its ``reason`` by the same steps a worker takes (admission on arrival, then the
pool child's decoding and signature check), and every result vector must be exactly what hutch
encodes and must decode to its ``decoded`` value. No broker needed.

Values in the vectors use the notation of docs/protocol.md §11.4: plain JSON, plus
``{"$bytes": hex}``, ``{"$int": decimal}``, ``{"$timestamp": RFC 3339}`` and
``{"$map": [[key, value], ...]}``; a JSON number with a fraction or exponent is a float.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import examples.tasks  # noqa: F401 - registers add(a, b) as "add", the vectors' task
from service import protocol
from service.admission import Refusal, admit
from service.pool.child import Runner
from service.pool.jobs import OutcomeKind
from service.pool.pipe import JobFrame
from service.protocol import ProtocolError, Reason
from service.settings import load

VECTORS_FILE = Path(__file__).resolve().parent.parent / "docs/protocol/vectors/vectors.json"
KINDS = ("request", "invalid-request", "result")
DEFAULTS = {"max_body_size": 4 << 20, "max_deliveries": 5, "max_depth": 32}


def _load() -> dict[str, Any]:
    # json keeps the file's distinction between 2 (int) and 2.0 (float), as the notation needs.
    data: dict[str, Any] = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
    return data


DOC = _load()
VECTORS: list[dict[str, Any]] = DOC["vectors"]
BY_NAME = {v["name"]: v for v in VECTORS}


def of_kind(kind: str) -> list[Any]:
    return [pytest.param(v, id=v["name"]) for v in VECTORS if v["kind"] == kind]


# -- the value notation -----------------------------------------------------------------------

_TIMESTAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z$")


def timestamp(text: str) -> dt.datetime:
    """An RFC 3339 UTC time as a hutch task receives it: microseconds, truncated."""
    match = _TIMESTAMP.match(text)
    assert match, f"bad $timestamp {text!r}"
    moment = dt.datetime.fromisoformat(match.group(1)).replace(tzinfo=dt.UTC)
    nanos = int((match.group(2) or "0").ljust(9, "0"))
    return moment + dt.timedelta(microseconds=nanos // 1000)


def value(node: Any) -> Any:
    """A value in the vectors' notation as the Python value hutch decodes it to."""
    if isinstance(node, list):
        return [value(item) for item in node]
    if isinstance(node, dict):
        if len(node) == 1 and next(iter(node)).startswith("$"):
            ((tag, arg),) = node.items()
            if tag == "$bytes":
                return bytes.fromhex(arg)
            if tag == "$int":
                return int(arg)
            if tag == "$timestamp":
                return timestamp(arg)
            if tag == "$map":
                return {value(k): value(v) for k, v in arg}
            raise AssertionError(f"unknown tag {tag}")
        return {k: value(v) for k, v in node.items()}
    return node


def same(actual: Any, expected: Any) -> bool:
    """Equality that also tells 1 from 1.0 from True, and a naive datetime from an aware one."""
    if type(actual) is not type(expected):
        return False
    if isinstance(expected, list):
        return len(actual) == len(expected) and all(map(same, actual, expected))
    if isinstance(expected, dict):
        return bool(actual.keys() == expected.keys()) and all(
            same(actual[k], expected[k]) for k in expected
        )
    if isinstance(expected, dt.datetime):
        return bool(actual == expected) and actual.utcoffset() == dt.timedelta(0)
    return bool(actual == expected)


def body(vector: dict[str, Any]) -> bytes:
    if "body_hex" in vector:
        assert "body_text" not in vector, vector["name"]
        return bytes.fromhex(vector["body_hex"])
    return str(vector["body_text"]).encode("utf-8")


# -- a worker's steps, without a broker ----------------------------------------------------


@dataclass
class Delivery:
    """The parts of an incoming message that `admit` reads."""

    body: bytes
    content_type: str | None
    content_encoding: str | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = "vector"
    reply_to: str | None = "replies"
    redelivered: bool = False
    correlation_id: str | None = None


@dataclass
class Verdict:
    reason: Reason | None  # None: accepted and run
    error_type: str = ""
    error_message: str = ""
    payload: bytes | None = None


def run_like_a_worker(vector: dict[str, Any]) -> Verdict:
    """Admit the vector's message on arrival, then decode, check and run it as a child does."""
    settings = {**DEFAULTS, **vector.get("settings", {})}
    delivery = Delivery(
        body(vector),
        vector["content_type"],
        vector.get("content_encoding"),
        {k: value(v) for k, v in vector.get("headers", {}).items()},
    )
    verdict = admit(
        delivery,  # type: ignore[arg-type]
        max_body_size=settings["max_body_size"],
        max_deliveries=settings["max_deliveries"],
    )
    if isinstance(verdict, Refusal):
        # What the worker's settler sends: error.type is the reason itself.
        return Verdict(verdict.reason, str(verdict.reason), verdict.detail)
    runner = Runner(max_depth=settings["max_depth"], max_result_size=8 << 20)
    verdict.id = 1
    outcome = runner.run(JobFrame.from_job(verdict))
    if outcome.kind is OutcomeKind.REJECTED:
        return Verdict(Reason(outcome.error_type), outcome.error_type, outcome.error_message)
    assert outcome.kind is OutcomeKind.OK, outcome
    return Verdict(None, payload=outcome.payload)


# -- the file itself -------------------------------------------------------------------------


def test_file_is_well_formed() -> None:
    assert len(BY_NAME) == len(VECTORS), "vector names must be unique"
    reasons = {str(r) for r in Reason}
    for v in VECTORS:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", v["name"]), v["name"]
        assert v["kind"] in KINDS, v["name"]
        assert v.get("description"), v["name"]
        assert ("body_hex" in v) != ("body_text" in v), v["name"]
        if "body_hex" in v:
            assert re.fullmatch(r"(?:[0-9a-f]{2})*", v["body_hex"]), v["name"]
        if v["kind"] == "invalid-request":
            assert v["reason"] in reasons, v["name"]
            assert "decoded" not in v, v["name"]
        else:
            assert "decoded" in v and "reason" not in v, v["name"]
        if "answers" in v:
            assert v["kind"] == "result" and v["answers"] in BY_NAME, v["name"]
        assert set(v.get("settings", {})) <= set(DEFAULTS), v["name"]


def test_every_kind_and_content_type_is_covered() -> None:
    seen = {(v["kind"], v["content_type"]) for v in VECTORS}
    for kind in KINDS:
        for content_type in (protocol.MSGPACK, protocol.JSON):
            assert (kind, content_type) in seen


def test_every_reason_found_before_running_has_a_vector() -> None:
    # failed and timeout need a task that runs; the fault and worker suites cover them. bad_ref
    # needs a store: the refused references are vectors of store.json (test_store_vectors.py).
    covered = {v["reason"] for v in VECTORS if v["kind"] == "invalid-request"}
    assert covered == {str(r) for r in Reason} - {"failed", "timeout", "bad_ref"}


def test_defaults_match_the_workers() -> None:
    settings = load({"tasks": "examples.tasks"}, environ={})
    assert settings.max_body_size == DEFAULTS["max_body_size"]
    assert settings.max_deliveries == DEFAULTS["max_deliveries"]
    assert settings.max_depth == DEFAULTS["max_depth"] == protocol.DEFAULT_MAX_DEPTH


def test_protocol_md_points_to_the_vectors() -> None:
    text = (VECTORS_FILE.parents[2] / "protocol.md").read_text(encoding="utf-8")
    assert "protocol/vectors/vectors.json" in text


# -- requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", of_kind("request"))
def test_request_decodes(vector: dict[str, Any]) -> None:
    args, kwargs = protocol.decode_request(vector["content_type"], body(vector))
    expected = value(vector["decoded"])
    assert same(args, expected["args"]), (args, expected["args"])
    assert same(kwargs, expected["kwargs"]), (kwargs, expected["kwargs"])


@pytest.mark.parametrize("vector", [p for p in of_kind("request") if "headers" in p.values[0]])
def test_full_request_runs(vector: dict[str, Any]) -> None:
    """A vector with headers is a whole message: a worker with examples.tasks runs it."""
    verdict = run_like_a_worker(vector)
    assert verdict.reason is None, verdict
    assert verdict.payload is not None
    # Every full request vector is add(2, b=3.5).
    assert same(
        protocol.decode(vector["content_type"], verdict.payload), {"ok": True, "result": 5.5}
    )


# -- invalid requests -------------------------------------------------------------------------


@pytest.mark.parametrize("vector", of_kind("invalid-request"))
def test_invalid_request_is_refused_with_its_reason(vector: dict[str, Any]) -> None:
    verdict = run_like_a_worker(vector)
    assert verdict.reason == vector["reason"], verdict
    assert verdict.error_type == vector["reason"]
    assert verdict.error_message  # human-readable, never empty


@pytest.mark.parametrize(
    "vector",
    [
        p
        for p in of_kind("invalid-request")
        if p.values[0]["content_type"] in protocol.CONTENT_TYPES
        and p.values[0]["reason"] in ("malformed", "too_deep")
    ],
)
def test_invalid_body_is_refused_by_decode_request(vector: dict[str, Any]) -> None:
    """Body-level reasons come from the codec alone, whatever the task."""
    with pytest.raises(ProtocolError) as info:
        protocol.decode_request(vector["content_type"], body(vector))
    assert info.value.reason == vector["reason"]


# -- results -----------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", of_kind("result"))
def test_result_decodes(vector: dict[str, Any]) -> None:
    decoded = protocol.decode(
        vector["content_type"], body(vector), max_depth=None, string_keys=False
    )
    assert same(decoded, value(vector["decoded"])), decoded


@pytest.mark.parametrize("vector", of_kind("result"))
def test_result_is_what_hutch_encodes(vector: dict[str, Any]) -> None:
    decoded = vector["decoded"]
    content_type = vector["content_type"]
    if decoded["ok"]:
        returned = value(vector.get("returned", decoded["result"]))
        encoded = protocol.ok_result(content_type, returned)
    else:
        error = decoded["error"]
        encoded = protocol.error_result(content_type, error["type"], error["message"])
    assert encoded == body(vector)


@pytest.mark.parametrize("vector", [p for p in of_kind("result") if "answers" in p.values[0]])
def test_result_answers_its_request(vector: dict[str, Any]) -> None:
    """Running the request a result vector answers gives exactly that result's bytes."""
    request = BY_NAME[vector["answers"]]
    assert request["content_type"] == vector["content_type"]
    verdict = run_like_a_worker(request)
    if verdict.reason is None:
        assert verdict.payload == body(vector)
    else:
        sent = protocol.error_result(
            vector["content_type"], verdict.error_type, verdict.error_message
        )
        assert sent == body(vector)


# -- the byte layouts spelled out in protocol.md ----------------------------------------------


def test_worked_example_hex_in_protocol_md_matches_the_vectors() -> None:
    """§11.1 and §11.2 show some vectors byte by byte; those listings must not drift."""
    text = (VECTORS_FILE.parents[2] / "protocol.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```\n((?:[0-9a-f]{2}(?: [0-9a-f]{2})*\n)+)```", text)
    shown = {bytes.fromhex(block.replace("\n", " ")) for block in blocks}
    assert shown, "no hex listings found in protocol.md"
    vector_bodies = {body(v) for v in VECTORS}
    assert shown <= vector_bodies
