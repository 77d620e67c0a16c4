// Call a hutch task from Node.js and read its result, following docs/protocol.md (v1) only.
//
//   HUTCH_BROKER_URL=amqp://guest:guest@localhost:5672/ HUTCH_QUEUE=default node call.mjs
//
// 1. calls add(2, b=3.5) and waits for the result, matched on correlation_id, on an exclusive
//    server-named reply queue;
// 2. makes a bad call, add(1, 2, 3), reads its error result, and finds the request in Q.dlq
//    with the header x-hutch-reason: bad_args.
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

// §4: the body is {"args": [...], "kwargs": {...}} in one of the two content types.
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

// §9.1: the work queue and its dead-letter queue, declared exactly as hutch declares them (a
// worker declares them too; a publisher that runs first must use the same arguments).
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

class Caller {
  constructor(ch) {
    this.ch = ch;
    this.waiting = new Map(); // correlation_id -> {resolve, reject, timer}
    this.returned = new Set(); // message ids the broker could not route
    ch.on("return", (msg) => this.returned.add(msg.properties.messageId));
  }

  // §6: a server-named, exclusive, auto-delete reply queue, consumed in no-ack mode.
  async start() {
    const { queue } = await this.ch.assertQueue("", { exclusive: true, autoDelete: true });
    this.replyQueue = queue;
    await this.ch.consume(queue, (msg) => this.onResult(msg), { noAck: true });
  }

  onResult(msg) {
    if (msg === null) return; // the broker cancelled the consumer
    const pending = this.waiting.get(msg.properties.correlationId);
    if (!pending) return; // a late or duplicate result: tasks run at least once (§5.2)
    this.waiting.delete(msg.properties.correlationId);
    clearTimeout(pending.timer);
    try {
      pending.resolve(decodeBody(msg.properties.contentType, msg.content));
    } catch (err) {
      pending.reject(err);
    }
  }

  // §2, §3: publish with a confirm, persistent and mandatory; resolves to the result body.
  async call(task, args, kwargs, contentType) {
    const id = randomUUID().replaceAll("-", "");
    const body = encodeBody(contentType, { args, kwargs });
    const result = new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        reject(new Error(`no result for ${id} within ${TIMEOUT_MS / 1000} s: is a worker running?`));
      }, TIMEOUT_MS);
      this.waiting.set(id, { resolve, reject, timer });
    });
    result.catch(() => {}); // handled by the caller's await below
    try {
      await new Promise((resolve, reject) => {
        this.ch.publish("", QUEUE, body, {
          contentType,
          headers: { task },
          messageId: id,
          correlationId: id,
          replyTo: this.replyQueue,
          persistent: true,
          mandatory: true,
          timestamp: Math.floor(Date.now() / 1000),
        }, (err) => (err ? reject(new Error(`publish of ${id} not confirmed`)) : resolve()));
      });
      if (this.returned.has(id)) throw new Error(`queue ${QUEUE} does not exist: ${id} came back`);
    } catch (err) {
      clearTimeout(this.waiting.get(id)?.timer);
      this.waiting.delete(id);
      throw err;
    }
    return { id, body, result: await result };
  }
}

// §8: look at the dead letters without taking them: get with manual acks, then hand back.
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
    const caller = new Caller(ch);
    await caller.start();
    console.log(`reply queue ${caller.replyQueue}`);

    // 1. A good call.
    const good = await caller.call("add", [2], { b: 3.5 }, CONTENT_TYPE);
    const shown = CONTENT_TYPE === MSGPACK ? good.body.toString("hex") : good.body.toString("utf8");
    console.log(`published add(2, b=3.5) as ${good.id}, body ${shown}`);
    console.log(`result of ${good.id}: ${JSON.stringify(good.result)}`);
    check(good.result.ok === true && good.result.result === 5.5, "add(2, b=3.5) = 5.5");

    // 2. A bad call: add takes two arguments.
    const bad = await caller.call("add", [1, 2, 3], {}, CONTENT_TYPE);
    console.log(`published add(1, 2, 3) as ${bad.id}`);
    console.log(`result of ${bad.id}: ${JSON.stringify(bad.result)}`);
    check(bad.result.ok === false && bad.result.error?.type === "bad_args",
      "error result of type bad_args");

    // §5.2: the dead letter is confirmed in Q.dlq before the error result is sent.
    const dead = await findDeadLetter(ch, `${QUEUE}.dlq`, bad.id);
    if (dead === null) {
      check(false, `dead letter ${bad.id} in ${QUEUE}.dlq`);
    } else {
      const headers = dead.properties.headers || {};
      const reason = String(headers["x-hutch-reason"]);
      console.log(`dead letter ${bad.id} in ${QUEUE}.dlq: x-hutch-reason=${reason}` +
        ` x-hutch-error-message=${JSON.stringify(String(headers["x-hutch-error-message"]))}`);
      check(reason === "bad_args" && dead.content.equals(bad.body),
        "dead letter with x-hutch-reason bad_args and the original body");
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
