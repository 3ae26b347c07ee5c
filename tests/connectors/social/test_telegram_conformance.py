"""The Telegram connector passes the connector conformance suite.

Two checks are restated for what Telegram is:

- Telegram sends one update per webhook, never a batch. The nearest thing is
  an album (a media group): one update per item, sharing ``media_group_id``.
  The batch checks become: every update of an album is emitted, and after one
  update's publish fails, Telegram's retry emits only that update.
- Telegram reports no delivery or read receipts, so there are no status
  callbacks to reorder. What it does send out of order is a message's edits
  (``edited_message``): each edit is published exactly once in any order,
  carries its ``edit_date``, and retries publish nothing new.
"""

from __future__ import annotations

import itertools
import json
import random
import secrets
from collections.abc import Sequence
from typing import Any

from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Text
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Direction, Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.contract import registry
from gateway.testing.conformance import (
    BatchCase,
    ConnectorConformance,
    FakeProvider,
    FlakyBus,
    StatusCase,
    WebhookCall,
)
from gateway.testing.fake_telegram import FakeTelegram, update_headers
from tests.connectors.social import telegram_payloads as tg

TOKEN = "7000000001:" + secrets.token_urlsafe(26)
OTHER_TOKEN = "7000000002:" + secrets.token_urlsafe(26)
SECRET = "wh_" + secrets.token_hex(12)
OTHER_SECRET = "wh_" + secrets.token_hex(12)
CHAT = tg.PRIVATE_CHAT["id"]
_ids = itertools.count(random.Random().randrange(10**6, 10**8))


def update_call(
    url: str, update: dict[str, Any], secret: str = SECRET, description: str = ""
) -> WebhookCall:
    return WebhookCall(
        url=url,
        headers=update_headers(secret),
        body=json.dumps(update).encode(),
        description=description,
    )


class TestTelegramConformance(ConnectorConformance):
    connector = "telegram.bot"

    def connector_settings(self, api_base_url: str) -> dict[str, Any]:
        return {
            "api_base_url": api_base_url,
            "bots": {
                "support": {
                    "token": {"env": "TEST_TG_TOKEN"},
                    "secret_token": {"env": "TEST_TG_SECRET"},
                },
                "sales": {
                    "token": {"env": "TEST_TG_OTHER_TOKEN"},
                    "secret_token": {"env": "TEST_TG_OTHER_SECRET"},
                },
            },
        }

    def environ(self) -> dict[str, str]:
        return {
            "TEST_TG_TOKEN": TOKEN,
            "TEST_TG_SECRET": SECRET,
            "TEST_TG_OTHER_TOKEN": OTHER_TOKEN,
            "TEST_TG_OTHER_SECRET": OTHER_SECRET,
        }

    def fake_provider(self) -> FakeProvider:
        return FakeTelegram(tokens=(TOKEN, OTHER_TOKEN))

    def new_provider_message_id(self) -> str:
        return f"{CHAT}:{next(_ids)}"

    def _url(self, base_url: str, bot: str = "support") -> str:
        return f"{base_url}/webhooks/telegram/bot/{bot}"

    def inbound_webhook(self, base_url: str, provider_message_id: str) -> WebhookCall:
        message_id = int(provider_message_id.rsplit(":", 1)[1])
        update = tg.update(
            "message", tg.message(text="hello bot", message_id=message_id), uid=message_id
        )
        return update_call(self._url(base_url), update, description="text message")

    def forgeries(self, base_url: str, provider_message_id: str) -> Sequence[WebhookCall]:
        good = self.inbound_webhook(base_url, provider_message_id)
        url = self._url(base_url)
        plain = {"Content-Type": "application/json"}
        return [
            WebhookCall(url=url, headers=plain, body=good.body, description="no secret token"),
            update_call(
                url, json.loads(good.body), secret="wrong_" + SECRET, description="wrong secret"
            ),
            update_call(
                url, json.loads(good.body), secret=SECRET[:-1], description="truncated secret"
            ),
            update_call(
                url, json.loads(good.body), secret=SECRET.upper(), description="case changed"
            ),
            update_call(
                url,
                json.loads(good.body),
                secret=OTHER_SECRET,
                description="the secret of another bot",
            ),
            update_call(
                self._url(base_url, "nobody"),
                json.loads(good.body),
                description="unknown bot in the URL",
            ),
            WebhookCall(
                url=url,
                headers={**plain, "X-Telegram-Bot-Api-Secret-Token": ""},
                body=good.body,
                description="empty secret token",
            ),
        ]

    def _edits(self, base_url: str, provider_message_id: str) -> list[WebhookCall]:
        message_id = int(provider_message_id.rsplit(":", 1)[1])
        return [
            update_call(
                self._url(base_url),
                tg.update(
                    "edited_message",
                    tg.message(
                        text=f"edit {n}", message_id=message_id, edit_date=1_700_000_000 + n
                    ),
                ),
                description=f"edit {n}",
            )
            for n in range(3)
        ]

    def status_case(self, base_url: str, provider_message_id: str, message_id: str) -> StatusCase:
        # No status callbacks exist; the manifest check posts these edits instead.
        return StatusCase(
            calls=self._edits(base_url, provider_message_id),
            final_state=DeliveryState.DELIVERY_STATE_SENT,
        )

    async def test_statuses_in_any_order_never_move_a_message_backwards(self) -> None:
        manifest = registry.load(self.connector).manifest
        # Nothing but send outcomes: Telegram has no delivery receipts.
        assert set(manifest.delivery_states) <= {
            DeliveryState.DELIVERY_STATE_SENT,
            DeliveryState.DELIVERY_STATE_FAILED,
            DeliveryState.DELIVERY_STATE_EXPIRED,
        }
        async with self.running() as h:
            pmid = self.new_provider_message_id()
            calls = self._edits(h.base_url, pmid)
            for call in reversed(calls):
                status, _ = await h.post(call)
                assert status == 200
            for call in calls:  # Telegram's retries
                assert (await h.post(call))[0] == 200
            events = await h.wait_for(lambda e: e.type == "message.edited", 3)
            assert len(events) == 3
            assert {e.edit.provider_message_id for e in events} == {pmid}
            latest = max(events, key=lambda e: e.occurred_at.seconds)
            assert latest.edit.message.text.body == "edit 2"

    def _album(self, base_url: str, group: str) -> list[WebhookCall]:
        calls = []
        for n in range(3):
            message_id = next(_ids)
            sizes = [dict(s, file_id=f"{s['file_id']}-{group}-{n}") for s in tg.photo_sizes()]
            calls.append(
                update_call(
                    self._url(base_url),
                    tg.update(
                        "message",
                        tg.message(photo=sizes, media_group_id=group, message_id=message_id),
                        uid=message_id,
                    ),
                    description=f"album item {n}",
                )
            )
        return calls

    def batch_case(self, base_url: str) -> BatchCase:
        (first, *_) = self._album(base_url, "g0")

        def items_of(events: Sequence[Event]) -> list[str]:
            return [e.attributes.get("telegram.media_group_id", "") for e in events]

        return BatchCase(call=first, expected_items=frozenset({"g0"}), items_of=items_of)

    async def test_batch_webhook_yields_every_item(self) -> None:
        async with self.running() as h:
            for call in self._album(h.base_url, "g1"):
                assert (await h.post(call))[0] == 200
            events = await h.wait_for(lambda e: True, 3)
            assert len(events) == 3
            assert {e.attributes["telegram.media_group_id"] for e in events} == {"g1"}
            assert len({e.message.attachments[0].provider_media_id for e in events}) == 3

    async def test_batch_retry_after_partial_failure_emits_only_what_is_missing(self) -> None:
        async with self.running(bus=FlakyBus(failures=1)) as h:
            first, *rest = self._album(h.base_url, "g2")
            assert (await h.post(first))[0] == 503
            for call in rest:
                assert (await h.post(call))[0] == 200
            assert (await h.post(first))[0] == 200  # Telegram's retry
            for call in rest:
                assert (await h.post(call))[0] == 200
            events = await h.wait_for(lambda e: True, 3)
            assert len(events) == 3
            assert len({e.id for e in events}) == 3

    def send_command(self, message_id: str) -> SendMessageCommand:
        return SendMessageCommand(
            message_id=message_id,
            channel="telegram",
            provider="bot",
            account="support",
            message=Message(
                direction=Direction.DIRECTION_OUTBOUND,
                recipients=[Participant(channel="telegram", address=str(CHAT))],
                text=Text(body="Your ticket was updated."),
            ),
        )
