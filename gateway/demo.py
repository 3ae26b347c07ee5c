"""``channel-gateway demo``: real traffic through the whole product, end to end.

1. Starts fake Twilio, Vonage, Meta Graph and Telegram Bot APIs on loopback,
   then, in this one process like ``channel-gateway up``, the connectors
   (sms.twilio, sms.vonage, whatsapp.meta, telegram.bot, voice.twilio) and the gateway's gRPC
   service (SQLite ledger in a temporary directory) on RabbitMQ — or, when no
   broker answers and none was named, on the in-memory bus, saying so loudly.
2. Fires signed webhooks at the connectors over real HTTP: Twilio's (an SMS,
   an MMS with two media, a provider retry of the SMS (deduplicated), a forged
   one (401, never published)); Vonage's (an SMS API inbound SMS signed with
   ``sig``, a Messages API inbound SMS with its HS256 JWT, a forged one); a
   WhatsApp Cloud API batch of two messages and a status signed with
   ``X-Hub-Signature-256`` and a forged copy; a Telegram update carrying the
   bot's secret token and one with a wrong token (403).
3. Consumes the normalized events from the broker and prints them.
   Then a phone call: a signed Twilio incoming-call webhook answered with the
   TwiML of the demo's call flow (a menu), the caller's key press posted to
   the Gather's action URL from that TwiML (answered with the next step), and
   the status callback that ends the call; prints the three CallEvents.
4. Sends one message per SMS provider like a downstream service would: gRPC
   SendMessage with an idempotency key (the Twilio one twice with the same
   key: same message id, one provider call). Each connector calls its fake
   API, which plays the delivery back as signed status callbacks; prints the
   status events, then each message's GetMessage timeline as
   ``channel-gateway trace`` shows it.

Exit code 0 when every expected event arrived and every check held, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode
from xml.etree import ElementTree

import aiohttp

from connectors.sms.twilio.webhooks import SIGNATURE_HEADER, compute_signature
from connectors.sms.vonage import webhooks as vonage_webhooks
from connectors.social.telegram.mapping import message_key
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.gateway_service_pb2 import OutboundMessage
from gateway.display import render
from gateway.runtime.bus import BrokerUnavailableError, Bus, Delivery
from gateway.runtime.codec import decode_event
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.service import Service, open_bus
from gateway.runtime.telemetry import configure_logging
from gateway.runtime.topology import EVENTS_EXCHANGE
from gateway.server import client
from gateway.server.app import GatewayServer
from gateway.testing.fake_meta import FakeMeta, signed_headers
from gateway.testing.fake_telegram import FakeTelegram, update_headers
from gateway.testing.fake_twilio import FakeTwilio
from gateway.testing.fake_vonage import FakeVonage, signed_webhook_headers

Events = asyncio.Queue[tuple[Event, str]]
DEFAULT_BROKER = "amqp://guest:guest@localhost:5672/"
CONNECTORS = ["sms.twilio", "sms.vonage", "whatsapp.meta", "telegram.bot", "voice.twilio"]
ACCOUNT_SID = "AC" + "d3" * 16
OUR_NUMBER = "+14155550100"
CUSTOMER = "+447700900123"
VONAGE_API_KEY = "d3d3d3d3"
VONAGE_NUMBER = "+447700900000"
VONAGE_CUSTOMER = "+447700900456"
WABA_ID = "102290129340398"
WA_PHONE_NUMBER_ID = "106540352242922"
WA_DISPLAY_NUMBER = "15550783881"
WA_CUSTOMER = "16505551234"
TELEGRAM_BOT = "support"
TELEGRAM_USER_ID = 123456789
TELEGRAM_USER = {"id": TELEGRAM_USER_ID, "is_bot": False, "first_name": "Ada", "username": "ada"}
#: Inbound: Twilio SMS + MMS, Vonage SMS API SMS + Messages API SMS,
#: WhatsApp's two messages and one status, one Telegram message.
EXPECTED_INBOUND = 8
#: Why sends go astray on a real broker: the send.* command queues and the
#: gateway's status queue are shared by every service on the vhost.
SHARED_HINT = (
    " (is another connector service or gateway using this broker? They share the command "
    "and status queues: stop it, or pass --broker-url with a vhost of the demo's own)"
)
#: Outbound: Twilio's QUEUED, SENT, DELIVERED and Vonage's ACCEPTED, SENT, DELIVERED.
EXPECTED_STATUSES = 6
#: The call flow answering OUR_NUMBER (docs/voice.md): a greeting and a one-key menu.
CALL_FLOWS: dict[str, Any] = {
    "numbers": {OUR_NUMBER: "support"},
    "flows": {
        "support": {
            "start": "welcome",
            "steps": {
                "welcome": [
                    {"say": "Thanks for calling Acme."},
                    {
                        "gather": {
                            "num_digits": 1,
                            "prompt": [{"say": "Press 1 for an agent, 2 to leave a message."}],
                            "routes": {"1": "agents", "2": "voicemail"},
                            "default": "goodbye",
                        }
                    },
                ],
                "agents": [
                    {"say": "Connecting you to an agent."},
                    {"enqueue": {"queue": "agents"}},
                ],
                "voicemail": [
                    {"say": "Leave a message after the beep."},
                    {"record": {"max_length": 60, "then": "goodbye"}},
                ],
                "goodbye": [{"say": "Goodbye."}, "hangup"],
            },
        }
    },
}
#: Call events of the demo call: call.ringing (answer), call.input (menu), call.completed.
EXPECTED_CALL_EVENTS = ("call.ringing", "call.input", "call.completed")


def _say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m" if sys.stdout.isatty() else f"==> {text}", flush=True)


def _in_memory_notice(why: str) -> None:
    print(
        f"\n!!! {why}: running the demo on the IN-MEMORY bus.\n"
        "!!! Events live in this process only. Start RabbitMQ for the real thing.\n",
        flush=True,
    )


async def _pick_bus(broker_url: str | None) -> tuple[str, Bus]:
    url = broker_url or DEFAULT_BROKER
    if url == "memory://":
        _in_memory_notice("--broker-url memory://")
        return url, InMemoryBus()
    bus = open_bus(url, connect_timeout=3.0)
    try:
        await bus.connect()
    except BrokerUnavailableError:
        if broker_url:  # a named broker is never silently replaced
            raise
        _in_memory_notice("No RabbitMQ answers at localhost:5672")
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


def _vonage_messages_inbound(ids: set[str]) -> bytes:
    """A Messages API inbound SMS webhook body; its message id goes into ``ids``."""
    message_uuid = str(uuid.uuid4())
    ids.add(message_uuid)
    return json.dumps(
        {
            "channel": "sms",
            "message_type": "text",
            "message_uuid": message_uuid,
            "to": VONAGE_NUMBER.removeprefix("+"),
            "from": VONAGE_CUSTOMER.removeprefix("+"),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
            "text": "Und auf Deutsch: wo ist mein Paket? 📦",
            "sms": {"num_messages": "1"},
        }
    ).encode()


def _whatsapp_batch(ids: set[str]) -> bytes:
    """A WhatsApp Cloud API notification as Meta documents it: one change with two
    customer messages and the status of an earlier business message (read);
    their message ids go into ``ids``.

    https://developers.facebook.com/docs/whatsapp/cloud-api/webhooks/payload-examples
    """
    now = str(int(time.time()))

    def text(body: str) -> dict[str, Any]:
        wamid = "wamid.HBgL" + uuid.uuid4().hex.upper()
        ids.add(wamid)
        return {
            "from": WA_CUSTOMER,
            "id": wamid,
            "timestamp": now,
            "type": "text",
            "text": {"body": body},
        }

    read_wamid = "wamid.HBgL" + uuid.uuid4().hex.upper()
    ids.add(read_wamid)
    value = {
        "messaging_product": "whatsapp",
        "metadata": {
            "display_phone_number": WA_DISPLAY_NUMBER,
            "phone_number_id": WA_PHONE_NUMBER_ID,
        },
        "contacts": [{"profile": {"name": "Sheena Nelson"}, "wa_id": WA_CUSTOMER}],
        "messages": [text("Hi, my parcel #9012 hasn't arrived"), text("Can you check? 🙏")],
        "statuses": [
            {
                "id": read_wamid,
                "status": "read",
                "timestamp": now,
                "recipient_id": WA_CUSTOMER,
            }
        ],
    }
    payload = {
        "object": "whatsapp_business_account",
        "entry": [{"id": WABA_ID, "changes": [{"value": value, "field": "messages"}]}],
    }
    # Meta serializes compactly with non-ASCII escaped; the signature covers these bytes.
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode()


def _telegram_update(ids: set[str]) -> bytes:
    """A Telegram Bot API ``message`` update (https://core.telegram.org/bots/api#update);
    its message id goes into ``ids``."""
    message_id = secrets.randbelow(10**9) + 1
    ids.add(message_key(TELEGRAM_USER_ID, message_id))
    chat = {"id": TELEGRAM_USER_ID, "type": "private", "first_name": "Ada", "username": "ada"}
    return json.dumps(
        {
            "update_id": secrets.randbelow(10**9),
            "message": {
                "message_id": message_id,
                "from": TELEGRAM_USER,
                "chat": chat,
                "date": int(time.time()),
                "text": "/start order 3456",
            },
        }
    ).encode()


async def _post(
    http: aiohttp.ClientSession,
    label: str,
    url: str,
    body: bytes | Mapping[str, str],
    headers: Mapping[str, str],
) -> tuple[int, str]:
    """POST, say how it went; (HTTP status, body)."""
    started = time.perf_counter()
    async with http.post(url, data=body, headers=headers) as resp:
        text = await resp.text()
        ms = (time.perf_counter() - started) * 1000
        _say(f"POST {label}: HTTP {resp.status} in {ms:.1f} ms")
        return resp.status, text


async def _timeline(address: str, message_id: str, seen: set[str]) -> OutboundMessage:
    """GetMessage until the ledger shows the delivery and every provider status
    ``seen`` on the bus (the gateway's ingestor consumes them next to our
    consumer, so it may lag a little; bounded like the rest)."""
    deadline = time.monotonic() + 10
    while True:
        message = await client.get_message(address, message_id, timeout=5)
        recorded = {entry.provider_status for entry in message.timeline}
        done = message.state == DeliveryState.DELIVERY_STATE_DELIVERED and seen <= recorded
        if done or time.monotonic() > deadline:
            return message
        await asyncio.sleep(0.1)


async def _inbound(
    base_url: str,
    ids: set[str],
    *,
    twilio_token: str,
    vonage_secret: str,
    meta_secret: str,
    tg_secret: str,
) -> list[int]:
    """POST every inbound webhook over real HTTP; the HTTP statuses in order.
    The provider message ids of the genuine ones go into ``ids``."""
    inbound_url = f"{base_url}/webhooks/sms/twilio/main/inbound"
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
    vonage_base = f"{base_url}/webhooks/sms/vonage/main"
    vonage_sms = _vonage_sms(vonage_secret)
    messages_body = _vonage_messages_inbound(ids)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    whatsapp_url = f"{base_url}/webhooks/whatsapp/meta"
    whatsapp = _whatsapp_batch(ids)
    update = _telegram_update(ids)
    ids.update((sms["MessageSid"], mms["MessageSid"], vonage_sms["messageId"]))
    calls: list[tuple[str, str, bytes | Mapping[str, str], Mapping[str, str]]] = [
        ("signed SMS webhook", inbound_url, sms, _signed(inbound_url, sms, twilio_token)),
        (
            "signed MMS webhook with 2 media",
            inbound_url,
            mms,
            _signed(inbound_url, mms, twilio_token),
        ),
        (
            "Twilio retrying the SMS webhook (same MessageSid)",
            inbound_url,
            sms,
            _signed(inbound_url, sms, twilio_token),
        ),
        ("forged webhook (wrong signature)", inbound_url, sms, {SIGNATURE_HEADER: "Zm9yZ2Vk"}),
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
            signed_webhook_headers(messages_body, vonage_secret, api_key=VONAGE_API_KEY),
        ),
        (
            "forged Vonage webhook (text changed after signing)",
            f"{vonage_base}/inbound",
            urlencode({**vonage_sms, "text": "Refund me"}).encode(),
            form,
        ),
        (
            "WhatsApp Cloud API batch: 2 messages + 1 status (X-Hub-Signature-256)",
            whatsapp_url,
            whatsapp,
            signed_headers(whatsapp, meta_secret),
        ),
        (
            "forged WhatsApp webhook (signed with another app secret)",
            whatsapp_url,
            whatsapp,
            signed_headers(whatsapp, secrets.token_hex(16)),
        ),
        (
            "Telegram update (bot secret token)",
            f"{base_url}/webhooks/telegram/bot/{TELEGRAM_BOT}",
            update,
            update_headers(tg_secret),
        ),
        (
            "forged Telegram update (wrong secret token)",
            f"{base_url}/webhooks/telegram/bot/{TELEGRAM_BOT}",
            _telegram_update(set()),
            update_headers("tg_" + secrets.token_hex(12)),
        ),
    ]
    async with aiohttp.ClientSession() as http:
        return [(await _post(http, *call))[0] for call in calls]


def _is_ours(event: Event, ids: set[str]) -> bool:
    """True for an event about this run's traffic. The broker may be shared (a
    developer's RabbitMQ, tests running next to the demo): other publishers'
    events on ``message.#`` are not the demo's to count."""
    case = event.WhichOneof("payload")
    if case == "message":
        return event.message.provider_message_id in ids
    if case == "status":
        return event.status.message_id in ids or event.status.provider_message_id in ids
    if case == "call":
        return event.call.call_id in ids
    return False


async def _next_events(events: Events, ids: set[str], count: int) -> list[Event]:
    """Print this run's next ``count`` events as they arrive (TimeoutError after
    10 s without one)."""
    got: list[Event] = []
    while len(got) < count:
        event, key = await asyncio.wait_for(events.get(), 10)
        if _is_ours(event, ids):
            print("   ", render(event, key), flush=True)
            got.append(event)
    return got


def _show_twiml(twiml: str) -> ElementTree.Element:
    """Print an answer's TwiML, indented; its parsed ``<Response>``."""
    response = ElementTree.fromstring(twiml)
    ElementTree.indent(response, space="  ")
    print(_indent(ElementTree.tostring(response, encoding="unicode")), flush=True)
    return response


async def _voice_call(base_url: str, events: Events, ids: set[str], *, token: str) -> bool:
    """One phone call through voice.twilio, as Twilio drives it; True when every answer
    and CallEvent is the expected one."""
    sid = "CA" + secrets.token_hex(16)
    ids.add(sid)
    call = {
        "AccountSid": ACCOUNT_SID,
        "ApiVersion": "2010-04-01",
        "CallSid": sid,
        "CallStatus": "ringing",
        "Direction": "inbound",
        "From": CUSTOMER,
        "Caller": CUSTOMER,
        "To": OUR_NUMBER,
        "Called": OUR_NUMBER,
    }
    incoming = f"{base_url}/webhooks/voice/twilio/main/incoming"
    async with aiohttp.ClientSession() as http:
        status, twiml = await _post(
            http,
            "Twilio incoming call (signed voice URL request), answered with TwiML",
            incoming,
            call,
            _signed(incoming, call, token),
        )
        if status != 200:
            return False
        gather = _show_twiml(twiml).find("Gather")
        if gather is None:
            _say("the answer has no <Gather> menu")
            return False
        # The caller presses 1: Twilio posts the digits to the action URL the TwiML named.
        action = gather.attrib["action"]
        pressed = {**call, "CallStatus": "in-progress", "Digits": "1"}
        status, twiml = await _post(
            http,
            "the caller pressed 1 (Gather action from that TwiML)",
            action,
            pressed,
            _signed(action, pressed, token),
        )
        if status != 200:
            return False
        _show_twiml(twiml)
        status_url = f"{base_url}/webhooks/voice/twilio/main/status"
        ended = {**call, "CallStatus": "completed", "CallDuration": "42"}
        status, _ = await _post(
            http,
            "Twilio call status callback (completed, 42 s)",
            status_url,
            ended,
            _signed(status_url, ended, token),
        )
        if status != 204:
            return False
    _say("call events on channels.events (the same consumer, also bound to call.#):")
    try:
        got = await _next_events(events, ids, len(EXPECTED_CALL_EVENTS))
    except TimeoutError:
        _say(f"the {len(EXPECTED_CALL_EVENTS)} expected call events did not all arrive")
        return False
    # Answer events may be confirmed after their answer: compare without order.
    if sorted(e.type for e in got) != sorted(EXPECTED_CALL_EVENTS):
        _say(f"unexpected call events {[e.type for e in got]}")
        return False
    return True


async def _outbound(address: str, events: Events, ids: set[str], *, hint: str) -> bool:
    """Send through the gateway's gRPC API like a downstream service; True when
    every check held. ``hint`` follows a failure (what may have gone wrong)."""
    sends = [
        ("twilio", CUSTOMER, "Your order #1234 ships today.", "demo-order-1234"),
        ("vonage", VONAGE_CUSTOMER, "Votre commande #5678 part demain.", "demo-order-5678"),
    ]
    # Unique per run: the key is the caller's, and a rerun is a new order.
    run = secrets.token_hex(3)
    message_ids = []
    for provider, to, text, order in sends:
        request = client.build_send_request(
            to=[to],
            channel="sms",
            provider=provider,
            account="main",
            text=text,
            idempotency_key=f"{order}-{run}",
            correlation_id=order,
        )
        reply = await client.send(address, request, timeout=10)
        _say(
            f"gRPC SendMessage via sms.{provider} (idempotency key {request.idempotency_key}): "
            f"{'accepted' if reply.created else 'REPLAYED'} {reply.message_id}, "
            f"state {client.state_name(reply.state)}"
        )
        if not reply.created:
            return False
        message_ids.append(reply.message_id)
        ids.add(reply.message_id)
        if provider == "twilio":
            # A downstream service retrying after a timeout: the same key gives
            # back the same message and sends nothing.
            again = await client.send(address, request, timeout=10)
            same = again.message_id == reply.message_id and not again.created
            _say(
                f"gRPC SendMessage again with the same key: "
                f"{'same' if same else 'DIFFERENT'} message id {again.message_id}, "
                f"created={again.created}" + (" (nothing sent twice)" if same else "")
            )
            if not same:
                return False
    _say("status events on channels.events:")
    try:
        statuses = await _next_events(events, ids, EXPECTED_STATUSES)
    except TimeoutError:
        _say(f"the {EXPECTED_STATUSES} expected status events did not all arrive{hint}")
        return False
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    ok = True
    for message_id in message_ids:
        # The gateway records ACCEPTED itself when it takes the send; a
        # connector's ACCEPTED adds nothing to the timeline.
        seen = {
            e.status.provider_status
            for e in statuses
            if e.status.message_id == message_id
            and e.status.state != DeliveryState.DELIVERY_STATE_ACCEPTED
        }
        message = await _timeline(address, message_id, seen)
        _say(f"channel-gateway trace {message_id}  (GetMessage from the ledger)")
        print(_indent(client.trace_table(message, color=color)), flush=True)
        recorded = {entry.provider_status for entry in message.timeline}
        if message.state != DeliveryState.DELIVERY_STATE_DELIVERED or not seen <= recorded:
            _say(f"the ledger's timeline of {message_id} lacks statuses seen on the bus{hint}")
            ok = False
    return ok


def _indent(text: str) -> str:
    return "\n".join("    " + line if line else "" for line in text.splitlines())


async def run_demo(broker_url: str | None) -> int:
    """Run the demo; returns the process exit code."""
    configure_logging("WARNING", "console")
    with tempfile.TemporaryDirectory(prefix="channel-gateway-demo-") as tmp:
        return await _run(broker_url, Path(tmp))


async def _run(broker_url: str | None, tmp: Path) -> int:
    token = secrets.token_hex(16)
    url, bus = await _pick_bus(broker_url)
    fake = FakeTwilio(auth_token=token, callback_statuses=("sent", "delivered"), callback_delay=0.2)
    vonage_secret, vonage_signature_secret = secrets.token_hex(16), secrets.token_hex(24)
    fake_vonage = FakeVonage(
        api_key=VONAGE_API_KEY,
        api_secret=vonage_secret,
        signature_secret=vonage_signature_secret,
        callback_delay=0.2,
    )
    meta_app_secret, meta_token = secrets.token_hex(16), "EAAG" + secrets.token_hex(16)
    fake_meta = FakeMeta(tokens=(meta_token,))
    tg_token, tg_secret = "7000000001:" + secrets.token_urlsafe(27), "tg_" + secrets.token_hex(12)
    fake_telegram = FakeTelegram(tokens=(tg_token,))
    async with contextlib.AsyncExitStack() as fakes:  # stopped however the demo ends
        for server in (fake, fake_vonage, fake_meta, fake_telegram):
            await fakes.enter_async_context(server)
        settings = RuntimeSettings.model_validate(
            {
                "http": {"host": "127.0.0.1", "port": 0},
                "broker": {"url": url},
                "gateway": {
                    "host": "127.0.0.1",
                    "port": 0,
                    "ledger_url": f"sqlite+aiosqlite:///{tmp / 'ledger.db'}",
                },
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
                    "whatsapp.meta": {
                        "app_secret": {"env": "DEMO_META_APP_SECRET"},
                        "verify_token": {"env": "DEMO_META_VERIFY_TOKEN"},
                        "graph_base_url": fake_meta.url,
                        "accounts": {
                            "main": {
                                "phone_number_id": WA_PHONE_NUMBER_ID,
                                "access_token": {"env": "DEMO_META_TOKEN"},
                                "waba_id": WABA_ID,
                            },
                        },
                    },
                    "voice.twilio": {
                        "accounts": {
                            "main": {
                                "account_sid": ACCOUNT_SID,
                                "auth_token": {"env": "DEMO_TWILIO_TOKEN"},
                            },
                        },
                        "call_flows": CALL_FLOWS,
                    },
                    "telegram.bot": {
                        "api_base_url": fake_telegram.url,
                        "bots": {
                            TELEGRAM_BOT: {
                                "token": {"env": "DEMO_TELEGRAM_TOKEN"},
                                "secret_token": {"env": "DEMO_TELEGRAM_SECRET"},
                            },
                        },
                    },
                },
            }
        )
        # One process, one bus, like ``channel-gateway up``: on memory:// the gateway
        # and the connectors must share the bus to reach each other.
        service = Service(
            settings,
            CONNECTORS,
            bus=bus,
            environ={
                "DEMO_TWILIO_TOKEN": token,
                "DEMO_VONAGE_API_SECRET": vonage_secret,
                "DEMO_VONAGE_SIGNATURE_SECRET": vonage_signature_secret,
                "DEMO_META_APP_SECRET": meta_app_secret,
                "DEMO_META_VERIFY_TOKEN": secrets.token_hex(8),
                "DEMO_META_TOKEN": meta_token,
                "DEMO_TELEGRAM_TOKEN": tg_token,
                "DEMO_TELEGRAM_SECRET": tg_secret,
            },
        )
        gateway = GatewayServer(
            settings, bus=bus, hosted=lambda: [hosted.spec.name for hosted in service.hosted]
        )
        events: Events = asyncio.Queue()
        ids: set[str] = set()  # provider and gateway message ids of this run's traffic

        async def collect(delivery: Delivery) -> None:
            await events.put((decode_event(delivery), delivery.routing_key))

        where = "the in-memory bus" if url == "memory://" else "RabbitMQ " + url.split("@")[-1]
        subscription = None
        try:
            _say(
                f"starting the SMS, social and voice connectors on {where}: "
                + ", ".join(CONNECTORS)
            )
            await service.start()
            await gateway.start()
            _say(f"starting the gateway: gRPC on {gateway.address}, SQLite ledger in {tmp}")
            queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["message.#", "call.#"])
            subscription = await bus.consume(queue, collect, prefetch=32)
            statuses = await _inbound(
                service.base_url,
                ids,
                twilio_token=token,
                vonage_secret=vonage_signature_secret,
                meta_secret=meta_app_secret,
                tg_secret=tg_secret,
            )
            expected = [200, 200, 200, 401, 204, 200, 401, 200, 401, 200, 403]
            if statuses != expected:
                _say(f"unexpected HTTP statuses {statuses}, expected {expected}")
                return 1
            _say("events on channels.events (a consumer bound to message.#):")
            await _next_events(events, ids, EXPECTED_INBOUND)
            if not await _voice_call(service.base_url, events, ids, token=token):
                return 1
            if not await _outbound(
                gateway.address, events, ids, hint="" if url == "memory://" else SHARED_HINT
            ):
                return 1
            await asyncio.sleep(0.3)  # let stray duplicates, if any, arrive
            calls, callbacks = len(fake.calls), len(fake.callbacks_sent)
            _say(
                f"fake Twilio got {calls} create-message call(s), sent {callbacks} status callbacks"
            )
            twilio_calls = calls
            calls, callbacks = len(fake_vonage.calls), len(fake_vonage.callbacks_sent)
            _say(f"fake Vonage got {calls} send call(s), sent {callbacks} signed status webhooks")
            if twilio_calls != 1 or calls != 1:
                _say("each provider should have been called exactly once")
                return 1
            extra = []
            while not events.empty():
                event, key = events.get_nowait()
                if _is_ours(event, ids):
                    extra.append(render(event, key))
            if extra:
                _say(f"unexpected extra events: {len(extra)}")
                print("\n".join("    " + line for line in extra), flush=True)
                return 1
            _say(
                "done: every webhook became exactly one confirmed event, the forged ones none; "
                "a repeated idempotency key sent nothing twice"
            )
            return 0
        except TimeoutError:
            _say(f"the {EXPECTED_INBOUND} expected inbound events did not all arrive")
            return 1
        except client.ClientError as exc:
            _say(f"gateway call failed: {exc}")
            return 1
        finally:
            if subscription is not None:
                await subscription.cancel()
            await gateway.stop()
            await service.stop()  # closes the shared bus
