"""Bare aio-pika baselines on uvloop, run as subprocesses like a hutch worker.

- ``consume``: ack every delivery and do nothing else (the no-op drain baseline).
- ``serve``: answer every request on its ``reply_to`` with its ``correlation_id``, then ack
  (the round-trip baseline); ``--confirm`` waits for a publisher confirm of the reply first,
  as hutch does.

Both consume a queue that already exists (declared by the benchmark exactly as hutch declares
it) and run until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aio_pika
import uvloop
from aio_pika.abc import AbstractIncomingMessage

from service import protocol

REPLY = protocol.ok_result(protocol.MSGPACK, None)


async def main(opts: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connection = await aio_pika.connect(opts.url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=opts.prefetch)
        queue = await channel.declare_queue(opts.queue, passive=True)

        if opts.mode == "consume":

            async def on_message(message: AbstractIncomingMessage) -> None:
                await message.ack()

        else:
            replies = channel
            if opts.confirm:
                replies = await connection.channel(publisher_confirms=True)
            exchange = replies.default_exchange

            async def on_message(message: AbstractIncomingMessage) -> None:
                assert message.reply_to is not None
                await exchange.publish(
                    aio_pika.Message(
                        REPLY,
                        content_type=message.content_type,
                        correlation_id=message.correlation_id,
                        delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                    ),
                    message.reply_to,
                    mandatory=False,
                )
                await message.ack()

        await queue.consume(on_message, no_ack=False)
        print(f"consuming from {opts.queue!r} (prefetch {opts.prefetch})", flush=True)
        await stop.wait()
    finally:
        await connection.close()


def cli() -> None:
    parser = argparse.ArgumentParser(prog="bench.bare")
    parser.add_argument("mode", choices=("consume", "serve"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--prefetch", type=int, default=1000)
    parser.add_argument("--confirm", action="store_true", help="serve: confirm replies")
    uvloop.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
