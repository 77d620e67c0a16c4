"""A flow in flight: the continuation each of its messages carries, and what follows a step.

A flow (`service.flow`: steps in chains and groups) travels as ordinary task messages. Each
carries, in the ``flow`` key of its body, everything still to do after it: there is no result
store and no coordinator. When a step succeeds, its pool child works out the messages that come
next and hands them to the parent, which publishes them (confirmed) *before* it acks the step::

    client ── entry step(s) ──▶ Q ──▶ child runs step ──▶ parent publishes what follows, then acks
                                          │
             next in the chain ◀──────────┤  {"next": [...]} frame: the next node, given the result
             a fan-in record ──▶ hutch.joins  {"join": ...} frame: one member of a group is done
             the caller's reply ◀─────────┘  nothing left: the flow's result to ``reply_to``

    hutch.joins ──▶ `service.joins` (one active consumer per vhost) holds the records unacked;
                    all n in ──▶ ``hutch.flow.join`` task ──▶ a child continues with the list

A step that fails for good (dead-lettered after its attempts) is copied by the parent to the
internal task ``hutch.flow.failed``; its child ends the flow: ``on_error`` and an error reply,
or, inside a group, a failed record, so that the fan-in ends the flow once (``hutch.flow.abort``)
however many members fail. Every message of a flow has a ``message_id`` made of the flow id and
the step's path, so a step repeated by a crash carries the same id as its first run.

The continuation (normative text: docs/protocol.md §12)::

    flow  = {"v": 1, "id": str, "step": path, "queue": str, "k": [frame, ...],
             "on_error": step node | null, "reply": {"to": str, "id": str} | null}
    frame = {"next": [node, ...]}                  # the rest of a chain
          | {"join": path, "i": int, "n": int}     # member i of the n-way group at path
    node  = {"id": path, "task": str, "args": [...], "kwargs": {...}, "queue": str,
             "countdown": seconds?, "eta": Unix ms?}
          | {"id": path, "chain": [node, ...]} | {"id": path, "group": [node, ...]}

Everything here is pure (decoded values in, `Publish` records out) and imports no AMQP client:
it runs in pool children, and the client uses `entry` to publish a flow's first steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, NoReturn, TypeGuard

from service import protocol, routing
from service.errors import ProtocolError
from service.flow import MAX_GROUP_WIDTH, Chain, Node, Step
from service.protocol import Reason
from service.registry import register_builtin

FLOW_VERSION: Final = 1
JOIN_TASK: Final = "hutch.flow.join"  # a fan-in is complete: continue with its results
FAILED_TASK: Final = "hutch.flow.failed"  # a step failed for good: end the flow, or tell the join
ABORT_TASK: Final = "hutch.flow.abort"  # the fan-in ends a failed flow, once
BUILTIN_TASKS: Final = frozenset({JOIN_TASK, FAILED_TASK, ABORT_TASK})
# The step path of a flow's on_error message: it is a plain task, never continued or reported.
ON_ERROR_STEP: Final = "on_error"
_MAX_ID: Final = 200  # flow ids and paths end up in message ids and headers


class FlowEvent(StrEnum):
    """How a flow ended; also the ``outcome`` label of hutch_flows_ended_total."""

    FINISHED = "finished"  # its last step succeeded
    FAILED = "failed"  # a step failed for good: on_error and the error reply were sent


@dataclass(frozen=True, slots=True)
class Publish:
    """A message for the parent to publish (confirmed) before it acks the step.

    ``reply`` marks a result for a waiting caller: transient, and not an error if nobody is
    there to receive it.
    """

    routing_key: str
    body: bytes
    message_id: str
    headers: dict[str, Any]
    content_type: str
    exchange: str = ""
    reply: bool = False
    correlation_id: str | None = None

    def to_tuple(self) -> tuple[Any, ...]:
        return (
            self.routing_key,
            self.body,
            self.message_id,
            self.headers,
            self.content_type,
            self.exchange,
            self.reply,
            self.correlation_id,
        )

    @classmethod
    def from_tuple(cls, fields: list[Any] | tuple[Any, ...]) -> Publish:
        return cls(*fields)


@dataclass(frozen=True, slots=True)
class Transition:
    """What follows one step: the messages to publish, and whether the flow ended with it."""

    publishes: tuple[Publish, ...] = ()
    event: FlowEvent | None = None


@dataclass(frozen=True, slots=True)
class Here:
    """What a child knows of the message it ran, besides its body."""

    content_type: str
    message_id: str
    headers: Mapping[str, Any]
    reply_to: str | None = None
    correlation_id: str | None = None


@dataclass(frozen=True, slots=True)
class FlowState:
    """A checked continuation (see the module docstring for the fields)."""

    id: str
    step: str
    queue: str
    k: tuple[dict[str, Any], ...]
    on_error: dict[str, Any] | None
    reply: dict[str, str] | None

    def carried(self, reply: dict[str, str] | None = None) -> dict[str, Any]:
        """The fields every later message of the flow carries unchanged."""
        return {
            "v": FLOW_VERSION,
            "id": self.id,
            "on_error": self.on_error,
            "reply": reply if reply is not None else self.reply,
        }


# -- building a flow's first messages (the client) ---------------------------------------------


def entry(
    node: Node,
    *,
    flow_id: str,
    queue: str,
    content_type: str,
    reply: dict[str, str] | None = None,
    now: float | None = None,
) -> list[Publish]:
    """The messages that start ``node`` as flow ``flow_id``; ``queue`` is where steps without
    a queue of their own go. The first carries `protocol.FLOW_START_HEADER`."""
    now = time.time() if now is None else now
    on_error = node.on_error if isinstance(node, Chain) else None
    carried = {
        "v": FLOW_VERSION,
        "id": flow_id,
        "on_error": _encode(on_error, ON_ERROR_STEP, queue) if on_error else None,
        "reply": reply,
    }
    publishes = _start(_encode(node, "", queue), _NO_INPUT, [], carried, content_type, now)
    first = publishes[0]
    first.headers[protocol.FLOW_START_HEADER] = True
    return publishes


def _encode(node: Node, path: str, queue: str) -> dict[str, Any]:
    """A node as the continuation carries it, every step with its queue decided."""
    if isinstance(node, Step):
        encoded: dict[str, Any] = {
            "id": path,
            "task": node.task,
            "args": list(node.args),
            "kwargs": dict(node.kwargs),
            "queue": node.queue or queue,
        }
        if node.countdown is not None:
            encoded["countdown"] = node.countdown
        elif node.eta is not None:
            encoded["eta"] = node.eta_ms()
        return encoded
    key, children = ("chain", node.nodes) if isinstance(node, Chain) else ("group", node.members)
    return {
        "id": path,
        key: [_encode(child, _child_path(path, i), queue) for i, child in enumerate(children)],
    }


def _child_path(path: str, index: int) -> str:
    return f"{path}.{index}" if path else str(index)


def join_key(flow_id: str, group_path: str) -> str:
    """The id of one fan-in: the flow and the group's path (``group`` for a flow that is one)."""
    return f"{flow_id}:{group_path or 'group'}"


# -- what follows a step (a pool child) --------------------------------------------------------


class _NoInput:
    """The input of a flow's first steps: none, so nothing is put before their arguments."""


_NO_INPUT: Final = _NoInput()


def advance(state: FlowState, value: Any, here: Here, *, now: float | None = None) -> Transition:
    """What follows a step of ``state`` that returned ``value``."""
    now = time.time() if now is None else now
    reply = state.reply or _reply_of(here)
    carried = state.carried(reply)
    ct = here.content_type
    if not state.k:
        if reply is None:
            return Transition(event=FlowEvent.FINISHED)
        body = protocol.ok_result(ct, value)
        return Transition((_reply(reply, body, ct),), FlowEvent.FINISHED)
    frame, rest = state.k[0], list(state.k[1:])
    if "next" in frame:
        following: list[dict[str, Any]] = frame["next"]
        k = ([{"next": following[1:]}] if len(following) > 1 else []) + rest
        return Transition(tuple(_start(following[0], value, k, carried, ct, now)))
    body = protocol.encode(
        ct,
        {
            "i": frame["i"],
            "ok": True,
            "result": value,
            "flow": {
                **carried,
                "step": state.step,
                "queue": state.queue,
                "join": frame["join"],
                "k": rest,
            },
        },
    )
    return Transition((_record(state, frame, body, ok=True, ct=ct, now=now),))


def failed(state: FlowState, here: Here, *, now: float | None = None) -> Transition:
    """A step of ``state`` failed for good (its copy reached `FAILED_TASK`): end the flow, or,
    inside a group, tell the fan-in, which ends it once."""
    now = time.time() if now is None else now
    headers = here.headers
    reply = state.reply or _reply_of(here)
    failure = {
        "id": state.step,
        "task": str(headers.get(protocol.FAILED_TASK_HEADER, "")),
        "message_id": f"{state.id}:{state.step}",
    }
    error = {
        "type": str(headers.get(protocol.ERROR_TYPE_HEADER, "")),
        "message": str(headers.get(protocol.ERROR_MESSAGE_HEADER, "")),
        "reason": str(headers.get(protocol.REASON_HEADER, Reason.FAILED)),
    }
    ct = here.content_type
    for index, frame in enumerate(state.k):
        if "join" in frame:
            rest = list(state.k[index + 1 :])
            body = protocol.encode(
                ct,
                {
                    "i": frame["i"],
                    "ok": False,
                    "failed": failure,
                    "error": error,
                    "flow": {
                        **state.carried(reply),
                        "step": state.step,
                        "queue": state.queue,
                        "join": frame["join"],
                        "k": rest,
                    },
                },
            )
            return Transition((_record(state, frame, body, ok=False, ct=ct, now=now),))
    return _end_failed(state.carried(reply), failure, error, ct, now)


def joined(records: list[Any], here: Here, *, now: float | None = None) -> Transition:
    """A fan-in is complete (`JOIN_TASK`): continue with the members' results, in order."""
    if not records or not all(isinstance(r, dict) for r in records):
        raise ProtocolError(Reason.BAD_FLOW, "a join needs a non-empty list of records")
    ordered = sorted(records, key=lambda r: r.get("i") if isinstance(r.get("i"), int) else -1)
    if [r.get("i") for r in ordered] != list(range(len(ordered))):
        raise ProtocolError(Reason.BAD_FLOW, "join records must be members 0..n-1, each once")
    if not all(r.get("ok") is True for r in ordered):
        raise ProtocolError(Reason.BAD_FLOW, "a join continues only when every member succeeded")
    raw = ordered[0].get("flow")
    state = read(raw)
    group = _group_of(raw)
    return advance(
        FlowState(state.id, group, state.queue, state.k, state.on_error, state.reply),
        [r.get("result") for r in ordered],
        here,
        now=now,
    )


def aborted(record: Any, error: Any, here: Here, *, now: float | None = None) -> Transition:
    """End a flow from one of its fan-in records (`ABORT_TASK`): a failed member's record, or
    any member's with the ``error`` that ended it (a fan-in past its maximum age)."""
    now = time.time() if now is None else now
    if not isinstance(record, dict):
        raise ProtocolError(Reason.BAD_FLOW, "abort needs a fan-in record")
    raw = record.get("flow")
    state = read(raw)
    failure = record.get("failed")
    if isinstance(error, dict):
        group = _group_of(raw)
        failure = {
            "id": group or "group",
            "task": JOIN_TASK,
            "message_id": join_key(state.id, group),
        }
    else:
        error = record.get("error")
    if not isinstance(failure, dict) or not isinstance(error, dict):
        raise ProtocolError(Reason.BAD_FLOW, "abort needs a failed record or an error")
    return _end_failed(state.carried(), failure, error, here.content_type, now)


def _group_of(raw: Any) -> str:
    """The path of the group a fan-in record belongs to (``raw`` was checked by `read`)."""
    group = raw.get("join")
    if not isinstance(group, str):
        _bad("a fan-in record's 'flow.join' must be the group's path")
    return str(group)


def _end_failed(
    carried: dict[str, Any],
    failure: dict[str, Any],
    error: dict[str, Any],
    ct: str,
    now: float,
) -> Transition:
    flow_id = carried["id"]
    publishes: list[Publish] = []
    on_error = carried.get("on_error")
    if on_error:
        # A plain task (no continuation): what it returns or raises ends nothing further.
        publishes.append(
            _step_message(
                on_error, [flow_id, failure, error, *on_error["args"]], None, carried, ct, now
            )
        )
    reply = carried.get("reply")
    if reply:
        text = (
            f"flow {flow_id} failed at step {failure.get('id')} ({failure.get('task')}): "
            f"{error.get('type')}: {error.get('message')}"
        )
        body = protocol.error_result(ct, str(error.get("type") or "TaskError"), text)
        publishes.append(_reply(reply, body, ct))
    return Transition(tuple(publishes), FlowEvent.FAILED)


def _start(
    node: dict[str, Any],
    value: Any,
    k: list[dict[str, Any]],
    carried: dict[str, Any],
    ct: str,
    now: float,
) -> list[Publish]:
    """The messages that run ``node`` with input ``value`` and then continue with ``k``."""
    if "task" in node:
        args = node["args"] if value is _NO_INPUT else [value, *node["args"]]
        return [_step_message(node, args, k, carried, ct, now)]
    if "chain" in node:
        first, *following = node["chain"]
        return _start(
            first, value, ([{"next": following}] if following else []) + k, carried, ct, now
        )
    members = node["group"]
    n = len(members)
    return [
        publish
        for i, member in enumerate(members)
        for publish in _start(
            member, value, [{"join": node["id"], "i": i, "n": n}, *k], carried, ct, now
        )
    ]


def _step_message(
    node: dict[str, Any],
    args: list[Any],
    k: list[dict[str, Any]] | None,
    carried: dict[str, Any],
    ct: str,
    now: float,
) -> Publish:
    """One step's message; ``k`` None makes it a plain task (a flow's on_error)."""
    flow_id, path, queue = carried["id"], node["id"], node["queue"]
    request: dict[str, Any] = {"args": args, "kwargs": node["kwargs"]}
    if k is not None:
        request["flow"] = {**carried, "step": path, "queue": queue, "k": k}
    headers: dict[str, Any] = {
        protocol.TASK_HEADER: node["task"],
        protocol.FLOW_HEADER: flow_id,
        protocol.FLOW_STEP_HEADER: path,
    }
    exchange, routing_key = "", queue
    eta: int | None = None
    if "countdown" in node:
        eta = math.ceil((now + node["countdown"]) * 1000)
    elif "eta" in node:
        eta = node["eta"]
    if eta is not None:
        headers[protocol.ETA_HEADER] = eta
        now_ms = math.ceil(now * 1000)
        if eta > now_ms:  # straight into the broker-held delay
            exchange, routing_key = routing.delay_routing_key(queue, (eta - now_ms) / 1000)
    return Publish(
        routing_key,
        protocol.encode(ct, request),
        f"{flow_id}:{path}",
        headers,
        ct,
        exchange=exchange,
    )


def _record(
    state: FlowState, frame: dict[str, Any], body: bytes, *, ok: bool, ct: str, now: float
) -> Publish:
    member = _child_path(frame["join"], frame["i"])
    return Publish(
        routing.JOINS_QUEUE,
        body,
        f"{state.id}:{member}:{'done' if ok else 'failed'}",
        {
            protocol.FLOW_HEADER: state.id,
            protocol.FLOW_STEP_HEADER: state.step,
            protocol.JOIN_HEADER: join_key(state.id, frame["join"]),
            protocol.JOIN_INDEX_HEADER: frame["i"],
            protocol.JOIN_SIZE_HEADER: frame["n"],
            protocol.JOIN_OK_HEADER: ok,
            protocol.JOIN_QUEUE_HEADER: state.queue,
            protocol.JOIN_AT_HEADER: int(now * 1000),
        },
        ct,
    )


def _reply(reply: dict[str, str], body: bytes, ct: str) -> Publish:
    return Publish(reply["to"], body, reply["id"], {}, ct, reply=True, correlation_id=reply["id"])


def _reply_of(here: Here) -> dict[str, str] | None:
    """A flow's entry step carries the caller's address as AMQP properties (the broker
    rewrites a direct reply-to there); later steps carry it in the continuation."""
    if here.reply_to:
        return {"to": here.reply_to, "id": here.correlation_id or here.message_id}
    return None


# -- checking a continuation --------------------------------------------------------------------


def read(
    raw: Any,
    *,
    known: Callable[[str], bool] | None = None,
) -> FlowState:
    """Check a message's ``flow`` value and return it as a `FlowState`.

    ``known`` says whether a task is registered here: a later step for this same queue whose
    task is not is refused now, before the first step runs, rather than when the flow gets
    there. Raises `ProtocolError` (bad_flow) saying what is wrong.
    """
    if not isinstance(raw, dict):
        _bad("'flow' must be a map")
    if raw.get("v") != FLOW_VERSION:
        _bad(f"unsupported flow version {raw.get('v')!r} (this worker reads {FLOW_VERSION})")
    flow_id = _text(raw, "id", "flow")
    step = raw.get("step")
    if not isinstance(step, str) or len(step) > _MAX_ID:
        _bad("'flow.step' must be a step path")
    queue = _text(raw, "queue", "flow")
    k = raw.get("k")
    if not isinstance(k, list):
        _bad("'flow.k' must be an array of frames")
    for frame in k:
        _check_frame(frame)
    on_error = raw.get("on_error")
    if on_error is not None:
        _check_node(on_error)
        if "task" not in on_error:
            _bad("'flow.on_error' must be a step")
    reply = raw.get("reply")
    if reply is not None:
        if not isinstance(reply, dict):
            _bad("'flow.reply' must be a map or null")
        _text(reply, "to", "flow.reply")
        _text(reply, "id", "flow.reply")
    if known is not None:
        nodes = [node for frame in k for node in frame.get("next", ())]
        if on_error is not None:
            nodes.append(on_error)
        for node in _steps(nodes):
            if node["queue"] == queue and not known(node["task"]):
                _bad(
                    f"step {node['id']} runs task {node['task']!r}, which is not registered on "
                    f"queue {queue!r}"
                )
    return FlowState(flow_id, step, queue, tuple(k), on_error, reply)


def _steps(nodes: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if "task" in node:
            yield node
        else:
            stack.extend(node.get("chain") or node.get("group") or ())


def _check_frame(frame: Any) -> None:
    if not isinstance(frame, dict):
        _bad("a flow frame must be a map")
    if "next" in frame:
        following = frame["next"]
        if not isinstance(following, list) or not following:
            _bad("'next' must be a non-empty array of nodes")
        for node in following:
            _check_node(node)
        return
    if "join" in frame:
        if not isinstance(frame["join"], str):
            _bad("'join' must be a group path")
        n, i = frame.get("n"), frame.get("i")
        if not (_is_int(n) and 1 <= n <= MAX_GROUP_WIDTH):
            _bad(f"a join's 'n' must be 1 to {MAX_GROUP_WIDTH} (the maximum group width)")
        if not (_is_int(i) and 0 <= i < n):
            _bad("a join's 'i' must be 0 to n-1")
        return
    _bad("a flow frame must have 'next' or 'join'")


def _check_node(node: Any) -> None:
    stack = [node]
    while stack:
        item = stack.pop()
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            _bad("a flow node must be a map with an 'id'")
        if "task" in item:
            _text(item, "task", f"step {item['id']}")
            _text(item, "queue", f"step {item['id']}")
            if not isinstance(item.get("args"), list):
                _bad(f"step {item['id']}: 'args' must be an array")
            kwargs = item.get("kwargs")
            if not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
                _bad(f"step {item['id']}: 'kwargs' must be a map with string keys")
            countdown = item.get("countdown")
            if countdown is not None and not (
                isinstance(countdown, int | float)
                and not isinstance(countdown, bool)
                and math.isfinite(countdown)
                and 0 <= countdown <= protocol.MAX_ETA_AHEAD_MS / 1000
            ):
                _bad(f"step {item['id']}: 'countdown' must be 0 to 365 days in seconds")
            eta = item.get("eta")
            if eta is not None and not (_is_int(eta) and eta >= 0):
                _bad(f"step {item['id']}: 'eta' must be Unix milliseconds")
            continue
        children = item.get("chain", item.get("group"))
        if not isinstance(children, list) or not children:
            _bad(f"node {item['id']} must be a step, or a chain or group of nodes")
        if "group" in item and len(children) > MAX_GROUP_WIDTH:
            _bad(
                f"group {item['id']} has {len(children)} members, over the maximum width "
                f"{MAX_GROUP_WIDTH}"
            )
        stack.extend(children)


def _text(value: dict[str, Any], key: str, where: str) -> str:
    text = value.get(key)
    if not isinstance(text, str) or not text or len(text) > _MAX_ID * 2:
        _bad(f"'{where}.{key}' must be a non-empty string")
    return str(text)


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _bad(detail: str) -> NoReturn:
    raise ProtocolError(Reason.BAD_FLOW, detail)


def run_builtin(task: str, args: list[Any], here: Here, *, now: float | None = None) -> Transition:
    """Run one of the `BUILTIN_TASKS` (their messages are built by hutch, see above)."""
    if task == JOIN_TASK and len(args) == 1 and isinstance(args[0], list):
        return joined(args[0], here, now=now)
    if task == ABORT_TASK and len(args) in (1, 2) and isinstance(args[0], list) and args[0]:
        # Built like a join's: the records (here one) first, then the error, if any.
        return aborted(args[0][0], args[1] if len(args) == 2 else None, here, now=now)
    if task == FAILED_TASK:
        raise ProtocolError(Reason.BAD_FLOW, f"{FAILED_TASK} needs the failed step's flow")
    raise ProtocolError(Reason.BAD_ARGS, f"{task}: unexpected arguments")


def _internal(*args: Any, **kwargs: Any) -> Any:
    raise TypeError("an internal hutch task: run by the pool child's flow handling only")


for _name in sorted(BUILTIN_TASKS):
    # Internal work of a flow is bookkeeping: one retry covers a brief hiccup (say a fan-in
    # record too large to encode is not one), more would only delay the flow's end.
    register_builtin(_name, _internal, max_attempts=2)
