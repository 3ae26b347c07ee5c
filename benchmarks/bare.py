"""The bare bound: the least a Twilio webhook endpoint can do and still be correct.

One aiohttp handler that parses the form, checks ``X-Twilio-Signature``
(HMAC-SHA1 over URL + sorted parameters, Twilio's scheme) and publishes the
raw body persistent and ``mandatory`` on a confirm channel, answering 200 only
after the broker's confirm. No dedup, no normalization, no tracing, no
metrics: what the SMS service does on top of this is what the benchmark
compares.

``python -m benchmarks.bare --port P --amqp URL --exchange X --token-env VAR``
(the benchmark starts it as a subprocess). A second mode, ``--trivial``,
answers 200 at once: the ceiling of the load generator plus aiohttp.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import os
import signal
import sys

import aio_pika
from aiohttp import web

ROUTE = "/webhooks/sms/twilio/{account}/inbound"
EMPTY_TWIML = b'<?xml version="1.0" encoding="UTF-8"?><Response></Response>'


def _signature(token: bytes, url: str, form: dict[str, list[str]]) -> bytes:
    data = url + "".join(name + value for name in sorted(form) for value in sorted(form[name]))
    return base64.b64encode(hmac.new(token, data.encode(), hashlib.sha1).digest())


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = web.Application()
    connection = None
    if args.trivial:

        async def trivial(_: web.Request) -> web.Response:
            return web.Response(body=EMPTY_TWIML, content_type="text/xml")

        app.router.add_post(ROUTE, trivial)
    else:
        token = os.environ[args.token_env].encode()
        connection = await aio_pika.connect(args.amqp)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(args.exchange, ensure=False)

        async def inbound(request: web.Request) -> web.Response:
            form = await request.post()
            params: dict[str, list[str]] = {}
            for name, value in form.items():
                params.setdefault(name, []).append(str(value))
            url = f"{request.scheme}://{request.host}{request.raw_path}"
            given = request.headers.get("X-Twilio-Signature", "").encode()
            if not hmac.compare_digest(_signature(token, url, params), given):
                return web.Response(status=403, text="unauthorized\n")
            body = await request.read()
            await exchange.publish(
                aio_pika.Message(
                    body,
                    content_type="application/x-www-form-urlencoded",
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=str(params.get("MessageSid", [""])[0]),
                ),
                routing_key="message.received.sms.twilio",
                mandatory=True,
                timeout=5.0,
            )
            return web.Response(body=EMPTY_TWIML, content_type="text/xml")

        app.router.add_post(ROUTE, inbound)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", args.port)
    await site.start()
    print("ready", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        if connection is not None:
            await connection.close()


def main() -> int:
    """Entry point of the bare-bound (or trivial) server process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--exchange", help="exchange to publish to (bound to a queue)")
    parser.add_argument("--token-env", default="BENCH_TWILIO_TOKEN")
    parser.add_argument("--trivial", action="store_true", help="answer 200 without any work")
    args = parser.parse_args()
    if not args.trivial and not args.exchange:
        parser.error("--exchange is required unless --trivial")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
