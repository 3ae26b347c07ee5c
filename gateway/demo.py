"""``channel-gateway demo``: real traffic through the SMS service, end to end.

1. Starts fake Twilio and Vonage APIs on loopback and the SMS service (Twilio
   and Vonage connectors) on RabbitMQ — or, when no broker answers and none was
   named, on the in-memory bus, saying so loudly.
2. Fires signed Twilio webhooks at the service over real HTTP: an SMS, an MMS
   with two media, a provider retry of the SMS (deduplicated) and a forged one
   (rejected with 401, never published). Then Vonage's: an SMS API inbound SMS
   signed with ``sig`` (md5hash), a Messages API inbound SMS with its HS256 JWT,
   and a forged one (401).
3. Consumes the normalized events from the broker and prints them.
4. Publishes a send command per provider; each connector calls its fake API,
   which plays the delivery back as signed status callbacks; prints the
   status events.

Exit code 0 when every expected event arrived, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
import uuid
from collections.abc import Mapping
from urllib.parse import urlencode

import aiohttp

from connectors.sms.twilio.webhooks import SIGNATURE_HEADER, compute_signature
from connectors.sms.vonage import webhooks as vonage_webhooks
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Text, TextFormat
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Direction, Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.contract import new_id
from gateway.display import render
from gateway.runtime.bus import BrokerUnavailableError, Bus, Delivery
from gateway.runtime.codec import decode_event, encode_command
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.service import Service, open_bus
from gateway.runtime.telemetry import configure_logging
from gateway.runtime.topology import COMMANDS_EXCHANGE, EVENTS_EXCHANGE
from gateway.testing.fake_twilio import FakeTwilio
from gateway.testing.fake_vonage import FakeVonage, signed_webhook_headers

DEFAULT_BROKER = "amqp://guest:guest@localhost:5672/"
ACCOUNT_SID = "AC" + "d3" * 16
OUR_NUMBER = "+14155550100"
CUSTOMER = "+447700900123"
VONAGE_API_KEY = "d3d3d3d3"
VONAGE_NUMBER = "+447700900000"
VONAGE_CUSTOMER = "+447700900456"
#: Inbound: Twilio SMS + MMS, Vonage SMS API SMS + Messages API SMS.
EXPECTED_RECEIVED = 4
#: Then Twilio's QUEUED, SENT, DELIVERED and Vonage's ACCEPTED, SENT, DELIVERED.
EXPECTED_EVENTS = EXPECTED_RECEIVED + 6


def _say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


async def _pick_bus(broker_url: str | None) -> tuple[str, Bus]:
    url = broker_url or DEFAULT_BROKER
    bus = open_bus(url, connect_timeout=3.0)
    try:
        await bus.connect()
    except BrokerUnavailableError:
        if broker_url:  # a named broker is never silently replaced
            raise
        print(
            "\n!!! No RabbitMQ answers at localhost:5672: running the demo on the IN-MEMORY bus.\n"
            "!!! Events live in this process only. Start RabbitMQ for the real thing.\n",
            flush=True,
        )
        return "memory://", InMemoryBus()
    await bus.close()
    return url, open_bus(url)


def _signed(url: str, params: Mapping[str, str], token: str) -> dict[str, str]:
    return {SIGNATURE_HEADER: compute_signature(token, url, {k: [v] for k, v in params.items()})}


def _vonage_sms(signature_secret: str) -> dict[str, str]:
    """A Vonage SMS API inbound SMS, signed (md5hash) as Vonage signs it."""
    params = {
        "msisdn": VONAGE_CUSTOMER.removeprefix("+"),  # Vonage sends numbers without "+"
        "to": VONAGE_NUMBER.removeprefix("+"),
        "messageId": uuid.uuid4().hex[:16].upper(),
        "text": "Bonjour ! Ma commande #5678 ?",
        "type": "text",
        "keyword": "BONJOUR",
        "api-key": VONAGE_API_KEY,
        "message-timestamp": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "timestamp": str(int(time.time())),
        "nonce": str(uuid.uuid4()),
    }
    params["sig"] = vonage_webhooks.compute_signature(params, signature_secret, "md5hash")
    return params


def _vonage_messages_inbound() -> bytes:
    """A Messages API inbound SMS webhook body."""
    return json.dumps(
        {
            "channel": "sms",
            "message_type": "text",
            "message_uuid": str(uuid.uuid4()),
            "to": VONAGE_NUMBER.removeprefix("+"),
            "from": VONAGE_CUSTOMER.removeprefix("+"),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "text": "Und auf Deutsch: wo ist mein Paket? 📦",
            "sms": {"num_messages": "1"},
        }
    ).encode()


async def run_demo(broker_url: str | None) -> int:
    """Run the demo; returns the process exit code."""
    configure_logging("WARNING", "console")
    token = secrets.token_hex(16)
    url, bus = await _pick_bus(broker_url)
    fake = FakeTwilio(auth_token=token, callback_statuses=("sent", "delivered"), callback_delay=0.2)
    await fake.start()
    vonage_secret, vonage_signature_secret = secrets.token_hex(16), secrets.token_hex(24)
    fake_vonage = FakeVonage(
        api_key=VONAGE_API_KEY,
        api_secret=vonage_secret,
        signature_secret=vonage_signature_secret,
        callback_delay=0.2,
    )
    await fake_vonage.start()
    settings = RuntimeSettings.model_validate(
        {
            "http": {"host": "127.0.0.1", "port": 0},
            "broker": {"url": url},
            "connectors": {
                "sms.twilio": {
                    "api_base_url": fake.url,
                    "accounts": {
                        "main": {
                            "account_sid": ACCOUNT_SID,
                            "auth_token": {"env": "DEMO_TWILIO_TOKEN"},
                            "numbers": [OUR_NUMBER],
                        },
                    },
                },
                "sms.vonage": {
                    "api_base_url": fake_vonage.url,
                    "accounts": {
                        "main": {
                            "api_key": VONAGE_API_KEY,
                            "api_secret": {"env": "DEMO_VONAGE_API_SECRET"},
                            "signature_secret": {"env": "DEMO_VONAGE_SIGNATURE_SECRET"},
                            "signature_method": "md5hash",
                            "numbers": [VONAGE_NUMBER],
                        },
                    },
                },
            },
        }
    )
    service = Service(
        settings,
        ["sms.twilio", "sms.vonage"],
        bus=bus,
        environ={
            "DEMO_TWILIO_TOKEN": token,
            "DEMO_VONAGE_API_SECRET": vonage_secret,
            "DEMO_VONAGE_SIGNATURE_SECRET": vonage_signature_secret,
        },
    )
    events: asyncio.Queue[tuple[Event, str]] = asyncio.Queue()

    async def collect(delivery: Delivery) -> None:
        await events.put((decode_event(delivery), delivery.routing_key))

    where = "the in-memory bus" if url == "memory://" else "RabbitMQ " + url.split("@")[-1]
    _say(f"starting the SMS service on {where}")
    received = 0
    subscription = None
    try:
        await service.start()
        queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["message.#"])
        subscription = await bus.consume(queue, collect, prefetch=32)
        inbound_url = f"{service.base_url}/webhooks/sms/twilio/main/inbound"
        sms = {
            "MessageSid": "SM" + secrets.token_hex(16),
            "AccountSid": ACCOUNT_SID,
            "From": CUSTOMER,
            "To": OUR_NUMBER,
            "Body": "Hi! Where is my order #1234? 📦",
            "NumMedia": "0",
            "NumSegments": "1",
        }
        mms = {
            "MessageSid": "MM" + secrets.token_hex(16),
            "AccountSid": ACCOUNT_SID,
            "From": CUSTOMER,
            "To": OUR_NUMBER,
            "Body": "",
            "NumMedia": "2",
            "MediaUrl0": "https://api.twilio.com/2010-04-01/Accounts/x/Messages/y/Media/ME1",
            "MediaContentType0": "image/jpeg",
            "MediaUrl1": "https://api.twilio.com/2010-04-01/Accounts/x/Messages/y/Media/ME2",
            "MediaContentType1": "application/pdf",
        }
        async with aiohttp.ClientSession() as http:
            for label, params, headers in (
                ("signed SMS webhook", sms, _signed(inbound_url, sms, token)),
                ("signed MMS webhook with 2 media", mms, _signed(inbound_url, mms, token)),
                (
                    "Twilio retrying the SMS webhook (same MessageSid)",
                    sms,
                    _signed(inbound_url, sms, token),
                ),
                ("forged webhook (wrong signature)", sms, {SIGNATURE_HEADER: "Zm9yZ2Vk"}),
            ):
                started = time.perf_counter()
                async with http.post(inbound_url, data=params, headers=headers) as resp:
                    ms = (time.perf_counter() - started) * 1000
                    _say(f"POST {label}: HTTP {resp.status} in {ms:.1f} ms")
            vonage_base = f"{service.base_url}/webhooks/sms/vonage/main"
            vonage_sms = _vonage_sms(vonage_signature_secret)
            messages_body = _vonage_messages_inbound()
            form = {"Content-Type": "application/x-www-form-urlencoded"}
            for label, url, body, headers in (
                (
                    "Vonage SMS API inbound SMS (signed sig, md5hash)",
                    f"{vonage_base}/inbound",
                    urlencode(vonage_sms).encode(),
                    form,
                ),
                (
                    "Vonage Messages API inbound SMS (signed JWT + payload_hash)",
                    f"{vonage_base}/messages/inbound",
                    messages_body,
                    signed_webhook_headers(
                        messages_body, vonage_signature_secret, api_key=VONAGE_API_KEY
                    ),
                ),
                (
                    "forged Vonage webhook (text changed after signing)",
                    f"{vonage_base}/inbound",
                    urlencode({**vonage_sms, "text": "Refund me"}).encode(),
                    form,
                ),
            ):
                started = time.perf_counter()
                async with http.post(url, data=body, headers=headers) as resp:
                    ms = (time.perf_counter() - started) * 1000
                    _say(f"POST {label}: HTTP {resp.status} in {ms:.1f} ms")
        _say("events on channels.events (a consumer bound to message.#):")
        while received < EXPECTED_RECEIVED:
            event, key = await asyncio.wait_for(events.get(), 10)
            print("   ", render(event, key), flush=True)
            received += 1
        command = SendMessageCommand(
            message_id=new_id(),
            channel="sms",
            provider="twilio",
            account="main",
            correlation_id="demo-order-1234",
            message=Message(
                direction=Direction.DIRECTION_OUTBOUND,
                recipients=[Participant(channel="sms", address=CUSTOMER)],
                text=Text(
                    body="Your order #1234 ships today.", format=TextFormat.TEXT_FORMAT_PLAIN
                ),
            ),
        )
        vonage_command = SendMessageCommand(
            message_id=new_id(),
            channel="sms",
            provider="vonage",
            account="main",
            correlation_id="demo-order-5678",
            message=Message(
                direction=Direction.DIRECTION_OUTBOUND,
                recipients=[Participant(channel="sms", address=VONAGE_CUSTOMER)],
                text=Text(
                    body="Votre commande #5678 part demain.", format=TextFormat.TEXT_FORMAT_PLAIN
                ),
            ),
        )
        for cmd in (command, vonage_command):
            routing_key, message = encode_command(cmd)
            await bus.publish(COMMANDS_EXCHANGE, routing_key, message, timeout=5)
            _say(f"published send command {cmd.message_id[:8]} ({routing_key})")
        while received < EXPECTED_EVENTS:
            event, key = await asyncio.wait_for(events.get(), 10)
            print("   ", render(event, key), flush=True)
            received += 1
        await asyncio.sleep(0.3)  # let stray duplicates, if any, arrive
        calls, callbacks = len(fake.calls), len(fake.callbacks_sent)
        _say(f"fake Twilio got {calls} create-message call(s), sent {callbacks} status callbacks")
        calls, callbacks = len(fake_vonage.calls), len(fake_vonage.callbacks_sent)
        _say(f"fake Vonage got {calls} send call(s), sent {callbacks} signed status webhooks")
        extra = events.qsize()
        if extra:
            _say(f"unexpected extra events: {extra}")
            return 1
        _say("done: every webhook became exactly one confirmed event; the forged ones none")
        return 0
    except TimeoutError:
        _say(f"only {received} of {EXPECTED_EVENTS} expected events arrived")
        return 1
    finally:
        if subscription is not None:
            await subscription.cancel()
        await service.stop()
        await fake.stop()
        await fake_vonage.stop()
