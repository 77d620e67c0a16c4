#!/bin/sh
# Call a hutch task from the shell with amqp-tools and read its result, following
# docs/protocol.md (v1) only.
#
#   HUTCH_BROKER_URL=amqp://guest:guest@localhost:5672/ HUTCH_QUEUE=default sh call.sh
#
# First it calls add(2, b=3.5) with a JSON body and waits for the result on a server-named
# exclusive reply queue of its own (amqp-publish cannot set correlation_id, so each call gets
# its own reply queue: protocol section 6). Then it calls a task the worker does not have,
# nope(), reads its error result, and finds the request in Q.dlq. amqp-tools cannot show
# headers, so the reason comes from the error result, whose error.type is the dead letter's
# x-hutch-reason (section 5.3). It exits 0 if all of it went as the protocol says, 1 otherwise.
#
# Needs amqp-consume and amqp-publish (Debian/Ubuntu: apt-get install amqp-tools), and a worker
# that has declared the queue: amqp-tools can neither declare a quorum queue nor publish with
# mandatory or confirms.
set -eu

URL=${HUTCH_BROKER_URL:-amqp://guest:guest@localhost:5672/}
QUEUE=${HUTCH_QUEUE:-default}
TIMEOUT=${HUTCH_TIMEOUT:-30}
CONTENT_TYPE=application/json

for tool in amqp-consume amqp-publish timeout; do
    command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool not found (apt-get install amqp-tools)" >&2; exit 1; }
done

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FAILED=0

ok() { echo "ok: $*"; }
failed() { echo "FAILED: $*"; FAILED=1; }

# call TASK BODY: publish one task with reply_to set; its result body lands in $WORK/result.
call() {
    err=$WORK/consume.err
    : >"$err"
    # amqp-consume declares a server-named exclusive queue, prints its name on stderr, then
    # consumes one message (-c 1) in no-ack mode (-A) and hands its body to cat.
    amqp-consume -u "$URL" -x -A -c 1 cat >"$WORK/result" 2>"$err" &
    consumer=$!
    reply=
    waited=0
    while [ -z "$reply" ]; do
        reply=$(sed -n 's/^Server provided queue name: //p' "$err")
        [ -n "$reply" ] && break
        if ! kill -0 "$consumer" 2>/dev/null || [ "$waited" -ge 100 ]; then
            echo "error: could not declare a reply queue: $(cat "$err")" >&2
            kill "$consumer" 2>/dev/null || true
            return 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    echo "reply queue $reply"
    # Persistent (-p), content type (-C), the task header (-H) and reply_to (-t).
    amqp-publish -u "$URL" -r "$QUEUE" -p -C "$CONTENT_TYPE" -H "task: $1" -t "$reply" -b "$2"
    echo "published $1 $2"
    waited=0
    while kill -0 "$consumer" 2>/dev/null; do
        if [ "$waited" -ge $((TIMEOUT * 10)) ]; then
            kill "$consumer" 2>/dev/null || true
            echo "error: no result within $TIMEOUT s: is a worker running on queue $QUEUE?" >&2
            return 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
    wait "$consumer" || { echo "error: amqp-consume failed: $(cat "$err")" >&2; return 1; }
}

# peek_dlq MARKER: find a dead letter whose body contains MARKER, without taking it. Messages
# are consumed with manual acks by a command that fails, so none is acked, and amqp-consume is
# stopped as soon as the marker is seen: the broker puts back everything it had handed out.
peek_dlq() {
    : >"$WORK/peeked"
    PEEK_FILE=$WORK/peeked PEEK_MARKER=$1 timeout 10 amqp-consume -u "$URL" -q "$QUEUE.dlq" -p 100 -- \
        sh -c 'body=$(cat); printf "%s\n" "$body" >>"$PEEK_FILE"
               case $body in *"$PEEK_MARKER"*) kill "$PPID";; esac
               exit 1' 2>/dev/null || true
    grep -F -- "$1" "$WORK/peeked"
}

echo "broker $(echo "$URL" | sed 's#//\([^:/@]*\):[^@]*@#//\1:***@#'), queue $QUEUE, content type $CONTENT_TYPE"

# 1. A good call.
call add '{"args":[2],"kwargs":{"b":3.5}}' || exit 1
result=$(cat "$WORK/result")
echo "result: $result"
if echo "$result" | grep -q '"ok": *true' && echo "$result" | grep -q '"result": *5\.5[,}]'; then
    ok "add(2, b=3.5) = 5.5"
else
    failed "add(2, b=3.5) = 5.5"
fi

# 2. A bad call: the worker has no task named nope. The marker finds its dead letter again.
marker=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
body='{"args":[],"kwargs":{"probe":"'$marker'"}}'
call nope "$body" || exit 1
result=$(cat "$WORK/result")
echo "result: $result"
if echo "$result" | grep -q '"ok": *false' && echo "$result" | grep -q '"type": *"unknown_task"'; then
    ok "error result of type unknown_task"
else
    failed "error result of type unknown_task"
fi

# Section 5.2: the dead letter is confirmed in Q.dlq before the error result is sent.
if dead=$(peek_dlq "$marker") && [ "$dead" = "$body" ]; then
    echo "dead letter in $QUEUE.dlq: $dead"
    ok "dead letter with the original body (reason unknown_task, from the error result)"
else
    failed "dead letter with marker $marker in $QUEUE.dlq"
fi

if [ "$FAILED" -eq 0 ]; then
    echo "all checks passed"
else
    echo "some checks FAILED"
fi
exit "$FAILED"
