"""``channel-gateway run social``: one service hosts WhatsApp, Messenger, Instagram and Telegram."""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

import aiohttp

from gateway.api.v1.envelope_pb2 import Event
from gateway.runtime.bus import Delivery
from gateway.runtime.codec import decode_event
from gateway.runtime.config import RuntimeSettings
from gateway.runtime.memory_bus import InMemoryBus
from gateway.runtime.service import Service, enabled_connectors
from gateway.runtime.topology import EVENTS_EXCHANGE
from gateway.testing.fake_meta import FakeMeta
from gateway.testing.fake_telegram import FakeTelegram, update_headers
from tests.connectors.social import messenger_payloads as mp
from tests.connectors.social import telegram_payloads as tg
from tests.connectors.social import whatsapp_payloads as wa
from tests.connectors.social.test_meta_signature import hub_header

APP_SECRET = secrets.token_hex(16)
META_TOKEN = "EAAG" + secrets.token_hex(16)
TG_TOKEN = "7000000009:" + secrets.token_urlsafe(20)
TG_SECRET = "tg_" + secrets.token_hex(8)
ENVIRON = {
    "APP_SECRET": APP_SECRET,
    "VERIFY": "verify-me",
    "META": META_TOKEN,
    "TG_TOKEN": TG_TOKEN,
    "TG_SECRET": TG_SECRET,
}


def config(graph: str, telegram: str) -> dict[str, Any]:
    app = {
        "app_secret": {"env": "APP_SECRET"},
        "verify_token": {"env": "VERIFY"},
        "graph_base_url": graph,
    }
    page = {"access_token": {"env": "META"}}
    return {
        "http": {"host": "127.0.0.1", "port": 0},
        "broker": {"url": "memory://"},
        "connectors": {
            "whatsapp.meta": {
                **app,
                "accounts": {"main": {"phone_number_id": wa.PHONE_NUMBER_ID, **page}},
            },
            "messenger.meta": {**app, "accounts": {"page": {"page_id": mp.PAGE_ID, **page}}},
            "instagram.meta": {**app, "accounts": {"ig": {"page_id": mp.IG_ID, **page}}},
            "telegram.bot": {
                "api_base_url": telegram,
                "bots": {
                    "support": {"token": {"env": "TG_TOKEN"}, "secret_token": {"env": "TG_SECRET"}}
                },
            },
            "sms.twilio": {"enabled": False},
        },
    }


async def test_run_social_hosts_every_social_connector() -> None:
    async with FakeMeta(tokens=(META_TOKEN,)) as graph, FakeTelegram(tokens=(TG_TOKEN,)) as bot:
        settings = RuntimeSettings.model_validate(config(graph.url, bot.url))
        names = enabled_connectors(settings, ["social"])
        assert sorted(names) == [
            "instagram.meta",
            "messenger.meta",
            "telegram.bot",
            "whatsapp.meta",
        ]
        bus = InMemoryBus()
        service = Service(settings, names, bus=bus, environ=ENVIRON)
        await service.start()
        events: list[Event] = []
        arrived = asyncio.Event()

        async def collect(delivery: Delivery) -> None:
            events.append(decode_event(delivery))
            if len(events) >= 4:
                arrived.set()

        queue = await bus.declare_temporary_queue(EVENTS_EXCHANGE, ["#"])
        sub = await bus.consume(queue, collect, prefetch=10)
        base = service.base_url + "/webhooks"
        try:
            async with aiohttp.ClientSession() as http:
                meta_calls = [
                    ("whatsapp", wa.webhook(wa.change([wa.text_message("wa")]))),
                    (
                        "messenger",
                        mp.webhook(
                            "page",
                            mp.PAGE_ID,
                            [mp.item("message", {"mid": mp.mid(), "text": "fb"})],
                        ),
                    ),
                    (
                        "instagram",
                        mp.webhook(
                            "instagram",
                            mp.IG_ID,
                            [
                                mp.item(
                                    "message", {"mid": mp.mid(), "text": "ig"}, business=mp.IG_ID
                                )
                            ],
                        ),
                    ),
                ]
                for channel, payload in meta_calls:
                    body = wa.body(payload)
                    async with http.post(
                        f"{base}/{channel}/meta",
                        data=body,
                        headers={
                            "Content-Type": "application/json",
                            "X-Hub-Signature-256": hub_header(body, APP_SECRET),
                        },
                    ) as resp:
                        assert resp.status == 200, channel
                update = json.dumps(tg.update("message", tg.message(text="tg"))).encode()
                async with http.post(
                    f"{base}/telegram/bot/support", data=update, headers=update_headers(TG_SECRET)
                ) as resp:
                    assert resp.status == 200
            await asyncio.wait_for(arrived.wait(), 5)
        finally:
            await sub.cancel()
            await service.stop()
        assert sorted((e.channel, e.provider) for e in events) == [
            ("instagram", "meta"),
            ("messenger", "meta"),
            ("telegram", "bot"),
            ("whatsapp", "meta"),
        ]
