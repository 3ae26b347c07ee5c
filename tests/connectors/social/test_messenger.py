"""Messenger and Instagram: mapping of every documented item kind, and the connectors
in a running service (signature, batches, sends against the fake Graph API)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import pytest

from connectors.social.messenger import mapping
from connectors.social.meta.envelope import envelope
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Choice, ChoiceOption, ChoiceStyle, MediaKind, Text
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.envelope_pb2 import Event
from gateway.api.v1.message_pb2 import Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.contract import registry
from gateway.testing.conformance import WebhookCall, serve
from gateway.testing.fake_meta import FakeMeta
from tests.connectors.social import messenger_payloads as mp
from tests.connectors.social.test_meta_signature import hub_header, request
from tests.connectors.social.whatsapp_payloads import body as meta_body

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
S = DeliveryState


def map_items(channel: str, *items: dict[str, Any]) -> mapping.Batch:
    obj, business = ("page", mp.PAGE_ID) if channel == "messenger" else ("instagram", mp.IG_ID)
    payload = mp.webhook(obj, business, list(items))
    return mapping.map_webhook(
        envelope(request(meta_body(payload)), obj),
        channel=channel,
        account_of=lambda _: "main",
        received_at=NOW,
    )


def one(channel: str, item: dict[str, Any]) -> Event:
    (event,) = map_items(channel, item).events
    return event


def test_text_and_quick_reply() -> None:
    m = mp.mid()
    event = one("messenger", mp.item("message", {"mid": m, "text": "hello"}))
    assert event.type == "message.received"
    assert (event.channel, event.provider, event.account) == ("messenger", "meta", "main")
    assert event.message.text.body == "hello"
    assert event.message.provider_message_id == m
    assert event.message.sender.address == mp.PSID
    quick = one(
        "messenger",
        mp.item("message", {"mid": mp.mid(), "text": "Red", "quick_reply": {"payload": "RED"}}),
    )
    assert quick.message.choice_response.option_id == "RED"
    assert quick.message.choice_response.title == "Red"


def test_every_attachment_is_kept() -> None:
    event = one(
        "messenger",
        mp.item(
            "message",
            {
                "mid": mp.mid(),
                "attachments": [
                    {"type": "image", "payload": {"url": "https://scontent.example/1.jpg"}},
                    {"type": "image", "payload": {"url": "https://scontent.example/2.jpg"}},
                    {"type": "file", "payload": {"url": "https://cdn.example/a.pdf"}},
                ],
            },
        ),
    )
    assert event.message.media.kind == MediaKind.MEDIA_KIND_IMAGE
    assert [a.url for a in event.message.attachments] == [
        "https://scontent.example/1.jpg",
        "https://scontent.example/2.jpg",
        "https://cdn.example/a.pdf",
    ]


def test_postback_reaction_and_reply() -> None:
    postback = one(
        "messenger",
        mp.item("postback", {"title": "Get Started", "payload": "GET_STARTED", "mid": mp.mid()}),
    )
    assert postback.type == "message.received"
    assert postback.message.choice_response.option_id == "GET_STARTED"
    assert postback.attributes["messenger.interactive_type"] == "postback"
    target = mp.mid()
    reaction = one(
        "messenger",
        mp.item(
            "reaction", {"mid": target, "action": "react", "reaction": "love", "emoji": "\u2764"}
        ),
    )
    assert reaction.type == "message.reaction"
    assert (reaction.reaction.provider_message_id, reaction.reaction.emoji) == (target, "\u2764")
    unreact = one(
        "messenger", mp.item("reaction", {"mid": target, "action": "unreact", "reaction": "love"})
    )
    assert unreact.reaction.emoji == ""
    reply = one(
        "messenger",
        mp.item("message", {"mid": mp.mid(), "text": "yes", "reply_to": {"mid": target}}),
    )
    assert reply.message.reply_to == target


def test_messenger_delivery_and_read() -> None:
    mids = [mp.mid(), mp.mid()]
    batch = map_items("messenger", mp.item("delivery", {"mids": mids, "watermark": 1458668856253}))
    assert [e.status.provider_message_id for e in batch.events] == mids
    assert {e.status.state for e in batch.events} == {S.DELIVERY_STATE_DELIVERED}
    read = one("messenger", mp.item("read", {"watermark": 1458668856253}))
    assert read.type == "message.read"
    assert read.read.reader.address == mp.PSID
    assert read.attributes["messenger.watermark"] == "1458668856253"


def test_instagram_story_reply_mention_read_and_delete() -> None:
    story = one(
        "instagram",
        mp.item(
            "message",
            {
                "mid": mp.mid(),
                "text": "Nice story!",
                "reply_to": {"story": {"url": "https://lookaside.example/s", "id": "1798"}},
            },
            business=mp.IG_ID,
        ),
    )
    assert story.message.text.body == "Nice story!"
    assert story.attributes["instagram.story_reply.id"] == "1798"
    mention = one(
        "instagram",
        mp.item(
            "message",
            {
                "mid": mp.mid(),
                "attachments": [
                    {"type": "story_mention", "payload": {"url": "https://lookaside.example/m"}}
                ],
            },
            business=mp.IG_ID,
        ),
    )
    assert mention.attributes["instagram.story_mention"] == "true"
    assert mention.message.attachments[0].url == "https://lookaside.example/m"
    m = mp.mid()
    read = one("instagram", mp.item("read", {"mid": m}, business=mp.IG_ID))
    assert read.type == "message.status"
    assert (read.status.state, read.status.provider_message_id) == (S.DELIVERY_STATE_READ, m)
    deleted = one(
        "instagram", mp.item("message", {"mid": m, "is_deleted": True}, business=mp.IG_ID)
    )
    assert deleted.type == "message.deleted"
    assert deleted.delete.provider_message_id == m


def test_edits_echoes_and_unknown_items() -> None:
    m = mp.mid()
    edit = one("messenger", mp.item("message_edit", {"mid": m, "text": "fixed", "num_edit": 1}))
    assert edit.type == "message.edited"
    assert edit.edit.message.text.body == "fixed"
    batch = map_items(
        "messenger",
        mp.item("message", {"mid": mp.mid(), "text": "ours", "is_echo": True}),
        mp.item("optin", {"ref": "x"}),
    )
    assert batch.events == []
    assert len(batch.skipped) == 2


def test_every_item_of_every_entry() -> None:
    entries = [
        [mp.item("message", {"mid": mp.mid(), "text": str(n)}) for n in range(4)] for _ in range(3)
    ]
    payload = mp.webhook("page", mp.PAGE_ID, *entries)
    batch = mapping.map_webhook(
        envelope(request(meta_body(payload)), "page"),
        channel="messenger",
        account_of=lambda _: "main",
        received_at=NOW,
    )
    assert len(batch.events) == 12
    assert len({e.id for e in batch.events}) == 12


def test_manifests_say_instagram_reports_read_not_delivered() -> None:
    instagram = registry.load("instagram.meta").manifest
    messenger = registry.load("messenger.meta").manifest
    assert S.DELIVERY_STATE_READ in instagram.delivery_states
    assert S.DELIVERY_STATE_DELIVERED not in instagram.delivery_states
    assert S.DELIVERY_STATE_DELIVERED in messenger.delivery_states


APP_SECRET = secrets.token_hex(16)
TOKEN = "EAAP" + secrets.token_hex(16)


@pytest.mark.parametrize(
    ("connector", "obj", "business"),
    [("messenger.meta", "page", mp.PAGE_ID), ("instagram.meta", "instagram", mp.IG_ID)],
)
async def test_in_a_running_service(connector: str, obj: str, business: str) -> None:
    channel = connector.split(".")[0]

    def settings(url: str) -> dict[str, Any]:
        return {
            "app_secret": {"env": "APP_SECRET"},
            "verify_token": {"env": "VERIFY"},
            "graph_base_url": url,
            "accounts": {"main": {"page_id": business, "access_token": {"env": "TOKEN"}}},
        }

    environ = {"APP_SECRET": APP_SECRET, "VERIFY": "verify-1", "TOKEN": TOKEN}
    fake = FakeMeta(tokens=(TOKEN,))
    async with serve(connector, fake, settings, environ=environ) as h:
        url = f"{h.base_url}/webhooks/{channel}/meta"
        items = [
            [
                mp.item("message", {"mid": mp.mid(), "text": f"{e}.{n}"}, business=business)
                for n in range(3)
            ]
            for e in range(2)
        ]
        body = meta_body(mp.webhook(obj, business, *items))
        headers = {
            "Content-Type": "application/json",
            "X-Hub-Signature-256": hub_header(body, APP_SECRET),
        }
        status, _ = await h.post(WebhookCall(url=url, headers=headers, body=body))
        assert status == 200
        events = await h.wait_for(lambda e: True, 6)
        assert len(events) == 6
        assert {e.account for e in events} == {"main"}
        forged = WebhookCall(url=url, headers=headers, body=body.replace(b"0.0", b"9.9"))
        assert (await h.post(forged))[0] == 401
        await h.send(
            SendMessageCommand(
                message_id="gw-1",
                channel=channel,
                provider="meta",
                account="main",
                message=Message(
                    recipients=[Participant(channel=channel, address=mp.PSID)],
                    choice=Choice(
                        body="Pick",
                        style=ChoiceStyle.CHOICE_STYLE_QUICK_REPLIES,
                        options=[ChoiceOption(id="a", title="A"), ChoiceOption(id="b", title="B")],
                    ),
                ),
            )
        )
        (sent,) = await h.statuses_of("gw-1", 1)
        assert sent.status.state == S.DELIVERY_STATE_SENT
        (call,) = fake.calls
        assert call.path == f"/v21.0/{business}/messages"
        assert call.body["message"]["quick_replies"][1] == {
            "content_type": "text",
            "title": "B",
            "payload": "b",
        }
        assert call.body["messaging_type"] == "RESPONSE"
        await h.send(
            SendMessageCommand(
                message_id="gw-2",
                channel=channel,
                provider="meta",
                account="main",
                message=Message(
                    recipients=[Participant(channel=channel, address=mp.PSID)],
                    text=Text(body="agent here"),
                ),
                metadata={f"{channel}.tag": "HUMAN_AGENT"},
            )
        )
        await h.statuses_of("gw-2", 1)
        assert fake.calls[1].body["tag"] == "HUMAN_AGENT"
