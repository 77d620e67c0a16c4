"""The flow test vectors (docs/protocol/vectors/flows.json) against hutch's own code.

Every ``entry`` vector's flow, built with `chain`/`group`/`step` and started with
`continuation.entry`, must give exactly its messages; every ``next`` vector's input, run as a
pool child runs it (admission, then the child's decoding, the task and `continuation`), must give
exactly its messages; every ``fan-in`` vector's records, fed to the fan-in book, must give its
follow-up; every ``invalid-record`` must be refused. So a change of the flow wire format fails
here. The malformed continuations are ``invalid-request`` vectors of vectors.json
(tests/test_vectors.py runs them). No broker needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import examples.tasks  # noqa: F401 - registers add(a, b) as "add", the vectors' task
from service import continuation, protocol, task
from service.admission import admit
from service.continuation import Here, Publish, Transition
from service.fanin import FanIn, FollowUp, Refuse, read_record
from service.flow import Chain, Group, Node, Step, chain, group, step
from service.pool.child import Runner
from service.pool.jobs import Job, OutcomeKind
from service.pool.pipe import JobFrame
from tests.test_vectors import Delivery, same, value

ROOT = Path(__file__).resolve().parent.parent
VECTORS_FILE = ROOT / "docs/protocol/vectors/flows.json"
KINDS = ("entry", "next", "fan-in", "invalid-record")
MEMBERS = {
    "entry": {"flow", "flow_id", "queue", "content_type", "messages"},
    "next": {"input", "messages", "ends"},
    "fan-in": {"records", "messages"},
    "invalid-record": {"headers", "content_type", "body_text"},
}
OPTIONAL = {"next": {"returned"}}

DOC: dict[str, Any] = json.loads(VECTORS_FILE.read_text(encoding="utf-8"))
VECTORS: list[dict[str, Any]] = DOC["vectors"]
NOW: float = DOC["now"]


@task(name="sum_all")
def sum_all(values: list[int]) -> int:
    """The vectors' step after a group: it gets the members' results as one list."""
    return sum(values)


def of_kind(kind: str) -> list[Any]:
    return [pytest.param(v, id=v["name"]) for v in VECTORS if v["kind"] == kind]


def body(message: dict[str, Any]) -> bytes:
    if "body_hex" in message:
        assert "body_text" not in message
        return bytes.fromhex(message["body_hex"])
    return str(message["body_text"]).encode("utf-8")


def node(spec: dict[str, Any]) -> Node:
    """A flow as the vectors write it, built with the public API."""
    if "chain" in spec:
        on_error = spec.get("on_error")
        return chain(
            *(node(child) for child in spec["chain"]),
            on_error=step_of(on_error) if on_error else None,
        )
    if "group" in spec:
        return group(*(node(child) for child in spec["group"]))
    return step_of(spec)


def step_of(spec: dict[str, Any]) -> Step:
    return step(
        spec["task"], *spec.get("args", ()), kwargs=spec.get("kwargs"), queue=spec.get("queue")
    )


def wire(publish: Publish) -> dict[str, Any]:
    """A message to publish, in the vectors' members (body apart)."""
    out: dict[str, Any] = {"routing_key": publish.routing_key}
    if publish.exchange:
        out["exchange"] = publish.exchange
    out["message_id"] = publish.message_id
    if publish.correlation_id is not None:
        out["correlation_id"] = publish.correlation_id
    if publish.reply:
        out["reply"] = True
    out["headers"] = publish.headers
    out["content_type"] = publish.content_type
    return out


def check_messages(
    publishes: list[Publish], expected: list[dict[str, Any]], *, skip: tuple[str, ...] = ()
) -> None:
    assert len(publishes) == len(expected)
    for publish, message in zip(publishes, expected, strict=True):
        want = {k: v for k, v in message.items() if k not in ("body_text", "body_hex", "decoded")}
        want["headers"] = {k: value(v) for k, v in want["headers"].items() if k not in skip}
        got = wire(publish)
        got["headers"] = {k: v for k, v in got["headers"].items() if k not in skip}
        assert same(got, want), (got, want)
        assert publish.body == body(message), publish.body
        decoded = protocol.decode(publish.content_type, publish.body, max_depth=None)
        assert same(decoded, value(message["decoded"])), decoded


def here_of(message: dict[str, Any]) -> Here:
    return Here(
        message["content_type"],
        message["message_id"],
        {k: value(v) for k, v in message["headers"].items()},
        message.get("reply_to"),
        message.get("correlation_id"),
    )


# -- the file itself -------------------------------------------------------------------------


def test_file_is_well_formed() -> None:
    names = [v["name"] for v in VECTORS]
    assert len(set(names)) == len(names), "vector names must be unique"
    for v in VECTORS:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", v["name"]), v["name"]
        assert v["kind"] in KINDS, v["name"]
        assert v.get("description"), v["name"]
        members = set(v) - {"name", "kind", "description"}
        required = MEMBERS[v["kind"]]
        assert required <= members <= required | OPTIONAL.get(v["kind"], set()), v["name"]


def test_every_kind_and_content_type_is_covered() -> None:
    assert {v["kind"] for v in VECTORS} == set(KINDS)
    entries = {v["content_type"] for v in VECTORS if v["kind"] == "entry"}
    assert entries == {protocol.JSON, protocol.MSGPACK}
    flows = [v["flow"] for v in VECTORS if v["kind"] == "entry"]
    assert any("group" in child for f in flows for child in f.get("chain", ()))  # a fan-in
    assert any("on_error" in f for f in flows)


def test_protocol_md_points_to_the_vectors() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    assert "protocol/vectors/flows.json" in text
    # §12.7 spells out this vector's message: it must not drift from the vector.
    shown = text.split("message_id = f1:0\n", 1)[1].split("```", 1)[0]
    headers, rest = shown.split("headers    = ", 1)[1].split("\nbody       = ", 1)
    (vector,) = [v for v in VECTORS if v["name"] == "chain-two-steps-entry"]
    (message,) = vector["messages"]
    assert message["message_id"] == "f1:0"
    assert json.loads(headers) == message["headers"]
    assert "".join(line.strip() for line in rest.splitlines()) == message["body_text"]


# -- producing: a flow's first messages ------------------------------------------------------


@pytest.mark.parametrize("vector", of_kind("entry"))
def test_entry_gives_exactly_these_messages(vector: dict[str, Any]) -> None:
    flow = node(vector["flow"])
    assert isinstance(flow, Chain | Group)
    publishes = continuation.entry(
        flow,
        flow_id=vector["flow_id"],
        queue=vector["queue"],
        content_type=vector["content_type"],
        now=NOW,
    )
    check_messages(publishes, vector["messages"])
    starts = [p for p in publishes if p.headers.get(protocol.FLOW_START_HEADER) is True]
    assert len(starts) == 1  # the flow is counted once


@pytest.mark.parametrize("vector", of_kind("entry"))
def test_entry_messages_are_valid_continuations(vector: dict[str, Any]) -> None:
    for message in vector["messages"]:
        _, _, raw = protocol.decode_flow_request(message["content_type"], body(message))
        state = continuation.read(raw)
        headers = message["headers"]
        assert message["message_id"] == f"{state.id}:{state.step}"
        assert headers[protocol.FLOW_HEADER] == state.id
        assert headers[protocol.FLOW_STEP_HEADER] == state.step


# -- consuming: what follows a step ----------------------------------------------------------


def transition(vector: dict[str, Any]) -> Transition:
    """What `service.continuation` makes of the input, at the file's ``now``."""
    message = vector["input"]
    args, _, raw = protocol.decode_flow_request(message["content_type"], body(message))
    name = message["headers"]["task"]
    if name in continuation.BUILTIN_TASKS:
        return continuation.run_builtin(name, args, here_of(message))
    state = continuation.read(raw)
    return continuation.advance(state, value(vector["returned"]), here_of(message), now=NOW)


@pytest.mark.parametrize("vector", of_kind("next"))
def test_next_gives_exactly_these_messages(vector: dict[str, Any]) -> None:
    done = transition(vector)
    check_messages(list(done.publishes), vector["messages"])
    assert (done.event.value if done.event else None) == vector["ends"]


@pytest.mark.parametrize("vector", of_kind("next"))
def test_next_as_a_worker_runs_it(vector: dict[str, Any]) -> None:
    """Admitted and run by a pool child, the task itself returns ``returned`` and the child
    hands back the same messages (a record's write time is the child's own clock)."""
    message = vector["input"]
    delivery = Delivery(
        body(message),
        message["content_type"],
        headers={k: value(v) for k, v in message["headers"].items()},
        message_id=message["message_id"],
        reply_to=message.get("reply_to"),
        correlation_id=message.get("correlation_id"),
    )
    job = admit(delivery, max_body_size=4 << 20, max_deliveries=5)  # type: ignore[arg-type]
    assert isinstance(job, Job), job
    job.id = 1
    outcome = Runner(max_depth=32, max_result_size=8 << 20).run(JobFrame.from_job(job))
    assert outcome.kind is OutcomeKind.OK, outcome
    check_messages(list(outcome.publishes), vector["messages"], skip=(protocol.JOIN_AT_HEADER,))
    assert (outcome.flow.value if outcome.flow else None) == vector["ends"]


# -- the fan-in ----------------------------------------------------------------------------


@pytest.mark.parametrize("vector", of_kind("fan-in"))
def test_fan_in_gives_its_follow_up(vector: dict[str, Any]) -> None:
    book: FanIn[int] = FanIn(max_age=86_400, compact_after=600)
    follow_ups: list[FollowUp] = []
    for token, record in enumerate(vector["records"]):
        headers = {k: value(v) for k, v in record["headers"].items()}
        read = read_record(headers, record["content_type"])
        assert not isinstance(read, str), read
        effects = book.take(token, read, body(record), 0.0)
        follow_ups += [e for e in effects if isinstance(e, FollowUp)]
    as_publishes = [
        Publish(
            f.queue,
            f.body,
            f.message_id,
            {
                protocol.TASK_HEADER: f.task,
                protocol.FLOW_HEADER: f.flow,
                protocol.FLOW_STEP_HEADER: f.step,
            },
            f.content_type,
        )
        for f in follow_ups
    ]
    check_messages(as_publishes, vector["messages"])
    assert book.open == 0  # done with: its records were acked


def test_fan_in_records_are_what_members_write() -> None:
    """The records a fan-in vector starts from are the member-record vectors' messages."""
    written = {
        m["message_id"]: m
        for v in VECTORS
        if v["kind"] == "next"
        for m in v["messages"]
        if m["routing_key"] == "hutch.joins"
    }
    for vector in (v for v in VECTORS if v["kind"] == "fan-in"):
        for record in vector["records"]:
            source = written[record["message_id"]]
            assert record["headers"] == source["headers"]
            assert body(record) == body(source)


@pytest.mark.parametrize("vector", of_kind("invalid-record"))
def test_invalid_record_is_refused(vector: dict[str, Any]) -> None:
    headers = {k: value(v) for k, v in vector["headers"].items()}
    read = read_record(headers, vector["content_type"])
    assert isinstance(read, str) and read  # what is wrong, for the dead letter
    book: FanIn[int] = FanIn(max_age=86_400, compact_after=600)
    effects = book.take(0, read, body(vector), 0.0)
    assert [type(e) for e in effects] == [Refuse]
