// Start a hutch flow (a two-step chain) from Node.js and wait for its result, following the
// wire protocol (docs/protocol.md: flows) only: no hutch code, no coordinator.
//
//   HUTCH_BROKER_URL=amqp://guest:guest@localhost:5672/ HUTCH_QUEUE=default node flow.mjs
//
// 1. runs chain(add(2, b=3), add(10)): publishes the first step with the continuation in its
//    body, and waits for the flow's result, 15, on an exclusive reply queue, matched on the
//    correlation_id (the flow id);
// 2. runs chain(add(2, b=3), add(1, 2)), whose second step gets three arguments and fails for
//    good: the error result names the flow and the step, and the failed step's dead letter in
//    Q.dlq carries x-hutch-flow and x-hutch-flow-step.
// Exits 0 if all of it went as the protocol says, 1 otherwise.

import { randomUUID } from "node:crypto";
import { decode, encode } from "@msgpack/msgpack";
import amqp from "amqplib";

const URL = process.env.HUTCH_BROKER_URL || "amqp://guest:guest@localhost:5672/";
const QUEUE = process.env.HUTCH_QUEUE || "default";
const CONTENT_TYPE = process.env.HUTCH_CONTENT_TYPE || "application/msgpack";
const TIMEOUT_MS = 1000 * Number(process.env.HUTCH_TIMEOUT || 30);

const MSGPACK = "application/msgpack";
const JSON_TYPE = "application/json";
const FLOW_VERSION = 1;

function encodeBody(contentType, value) {
  if (contentType === MSGPACK) return Buffer.from(encode(value));
  if (contentType === JSON_TYPE) return Buffer.from(JSON.stringify(value), "utf8");
  throw new Error(`unsupported content type ${contentType}`);
}

function decodeBody(contentType, body) {
  if (contentType === MSGPACK) return decode(body);
  if (contentType === JSON_TYPE) return JSON.parse(body.toString("utf8"));
  throw new Error(`result with unexpected content type ${contentType}`);
}

// The work queue and its dead-letter queue, declared exactly as hutch declares them.
async function declareQueue(ch, queue) {
  await ch.assertQueue(`${queue}.dlq`, { durable: true, arguments: { "x-queue-type": "quorum", "x-delivery-limit": 1000000 } });
  await ch.assertQueue(queue, {
    durable: true,
    arguments: {
      "x-queue-type": "quorum",
      "x-delivery-limit": 20,
      "x-dead-letter-exchange": "",
      "x-dead-letter-routing-key": `${queue}.dlq`,
      "x-dead-letter-strategy": "at-least-once",
      "x-overflow": "reject-publish",
    },
  });
  await ch.assertExchange("hutch.deliver", "topic", { durable: true });
  await ch.bindQueue(queue, "hutch.deliver", `${"*.".repeat(28)}${queue}`);
}

// A step as the continuation carries it: its path in the flow, task, arguments and queue.
function stepNode(id, task, args, kwargs = {}) {
  return { id, task, args, kwargs, queue: QUEUE };
}

// The entry message of chain(first, ...rest): the first step's request, with the rest of the
// chain as one "next" frame. Every later message is built by the workers from this.
function chainEntry(flowId, first, rest) {
  const flow = {
    v: FLOW_VERSION,
    id: flowId,
    step: first.id,
    queue: first.queue,
    k: rest.length ? [{ next: rest }] : [],
    on_error: null,
    // null: the caller's address travels as reply_to / correlation_id of this first message.
    reply: null,
  };
  return {
    body: { args: first.args, kwargs: first.kwargs, flow },
    headers: {
      task: first.task,
      "x-hutch-flow": flowId,
      "x-hutch-flow-step": first.id,
      "x-hutch-flow-start": true,
    },
    messageId: `${flowId}:${first.id}`, // a repeated step carries the same id
  };
}

class FlowCaller {
  constructor(ch) {
    this.ch = ch;
    this.waiting = new Map(); // correlation_id (the flow id) -> {resolve, reject, timer}
    this.returned = new Set();
    ch.on("return", (msg) => this.returned.add(msg.properties.messageId));
  }

  async start() {
    const { queue } = await this.ch.assertQueue("", { exclusive: true, autoDelete: true });
    this.replyQueue = queue;
    await this.ch.consume(queue, (msg) => this.onResult(msg), { noAck: true });
  }

  onResult(msg) {
    if (msg === null) return;
    const pending = this.waiting.get(msg.properties.correlationId);
    if (!pending) return; // a late or duplicate result: steps run at least once
    this.waiting.delete(msg.properties.correlationId);
    clearTimeout(pending.timer);
    try {
      pending.resolve(decodeBody(msg.properties.contentType, msg.content));
    } catch (err) {
      pending.reject(err);
    }
  }

  // Publish the entry step (confirmed, persistent, mandatory); resolves to the flow's result.
  async run(steps, contentType) {
    const flowId = randomUUID().replaceAll("-", "");
    const [first, ...rest] = steps;
    const message = chainEntry(flowId, first, rest);
    const result = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(flowId);
        reject(new Error(`flow ${flowId} did not end within ${TIMEOUT_MS / 1000} s: is a worker running?`));
      }, TIMEOUT_MS);
      this.waiting.set(flowId, { resolve, reject, timer });
    });
    result.catch(() => {});
    try {
      await new Promise((resolve, reject) => {
        this.ch.publish("", first.queue, encodeBody(contentType, message.body), {
          contentType,
          headers: message.headers,
          messageId: message.messageId,
          correlationId: flowId,
          replyTo: this.replyQueue,
          persistent: true,
          mandatory: true,
          timestamp: Math.floor(Date.now() / 1000),
        }, (err) => (err ? reject(new Error(`publish of flow ${flowId} not confirmed`)) : resolve()));
      });
      if (this.returned.has(message.messageId)) {
        throw new Error(`queue ${first.queue} does not exist: flow ${flowId} came back`);
      }
    } catch (err) {
      clearTimeout(this.waiting.get(flowId)?.timer);
      this.waiting.delete(flowId);
      throw err;
    }
    return { flowId, message, result: await result };
  }
}

// Look at the dead letters without taking them: get with manual acks, then hand them back.
async function findDeadLetter(ch, dlq, id) {
  const held = [];
  try {
    for (;;) {
      const msg = await ch.get(dlq, { noAck: false });
      if (msg === false) return null;
      held.push(msg);
      if (msg.properties.messageId === id) return msg;
    }
  } finally {
    for (const msg of held) ch.nack(msg, false, true);
  }
}

function safeUrl(url) {
  const parsed = new globalThis.URL(url);
  if (parsed.password) parsed.password = "***";
  return parsed.toString();
}

async function main() {
  console.log(`broker ${safeUrl(URL)}, queue ${QUEUE}, content type ${CONTENT_TYPE}`);
  const conn = await amqp.connect(URL);
  let ok = true;
  const check = (cond, what) => {
    console.log(`${cond ? "ok" : "FAILED"}: ${what}`);
    ok &&= cond;
  };
  try {
    const ch = await conn.createConfirmChannel();
    await declareQueue(ch, QUEUE);
    const caller = new FlowCaller(ch);
    await caller.start();

    // 1. chain(add(2, b=3), add(10)): add's result, 5, becomes the next step's first argument.
    const good = await caller.run(
      [stepNode("0", "add", [2], { b: 3 }), stepNode("1", "add", [10])], CONTENT_TYPE);
    console.log(`started flow ${good.flowId}: ${JSON.stringify(good.message.body.flow)}`);
    console.log(`result of flow ${good.flowId}: ${JSON.stringify(good.result)}`);
    check(good.result.ok === true && good.result.result === 15, "chain(add(2, b=3), add(10)) = 15");

    // 2. chain(add(2, b=3), add(1, 2)): the second step gets (5, 1, 2) and fails for good.
    const bad = await caller.run(
      [stepNode("0", "add", [2], { b: 3 }), stepNode("1", "add", [1, 2])], CONTENT_TYPE);
    console.log(`result of flow ${bad.flowId}: ${JSON.stringify(bad.result)}`);
    const message = String(bad.result.error?.message || "");
    check(bad.result.ok === false && message.includes(`flow ${bad.flowId} failed at step 1`),
      "the failed flow's error result names its step 1");
    const dead = await findDeadLetter(ch, `${QUEUE}.dlq`, `${bad.flowId}:1`);
    if (dead === null) {
      check(false, `dead letter ${bad.flowId}:1 in ${QUEUE}.dlq`);
    } else {
      const headers = dead.properties.headers || {};
      console.log(`dead letter ${bad.flowId}:1 in ${QUEUE}.dlq: x-hutch-reason=${headers["x-hutch-reason"]}` +
        ` x-hutch-flow=${headers["x-hutch-flow"]} x-hutch-flow-step=${headers["x-hutch-flow-step"]}`);
      check(String(headers["x-hutch-flow"]) === bad.flowId && String(headers["x-hutch-flow-step"]) === "1",
        "the dead letter names the flow and step 1");
    }
    await ch.close();
  } finally {
    await conn.close();
  }
  console.log(ok ? "all checks passed" : "some checks FAILED");
  return ok ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (err) => {
    console.error(`error: ${err.message}`);
    process.exit(1);
  },
);
