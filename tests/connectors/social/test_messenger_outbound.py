"""Messenger / Instagram outbound: reply-to context, reactions and sender actions.

Exact Send API bodies (pure builder), then the same sends through a running
service against the fake Graph API, which enforces the documented shapes.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from connectors.social.messenger.outbound import build_payload
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.content_pb2 import Attachment, Media, MediaKind, Text
from gateway.api.v1.delivery_pb2 import DeliveryState
from gateway.api.v1.message_pb2 import Message
from gateway.api.v1.participant_pb2 import Participant
from gateway.contract import PermanentError
from gateway.testing.conformance import serve
from gateway.testing.fake_meta import FakeMeta
from tests.connectors.social import messenger_payloads as mp

S = DeliveryState
CHANNELS = ("messenger", "instagram")


def command(
    channel: str,
    *,
    text: str = "",
    reply_to: str = "",
    metadata: dict[str, str] | None = None,
    message_id: str = "gw-1",
) -> SendMessageCommand:
    message = Message(recipients=[Participant(channel=channel, address=mp.PSID)])
    if text:
        message.text.CopyFrom(Text(body=text))
    if reply_to:
        message.reply_to = reply_to
    return SendMessageCommand(
        message_id=message_id,
        channel=channel,
        provider="meta",
        account="main",
        message=message,
        metadata=metadata or {},
    )


@pytest.mark.parametrize("channel", CHANNELS)
def test_reply_to_becomes_reply_to_mid(channel: str) -> None:
    target = mp.mid()
    assert build_payload(command(channel, text="yes", reply_to=target), channel) == {
        "recipient": {"id": mp.PSID},
        "messaging_type": "RESPONSE",
        "message": {"text": "yes"},
        "reply_to": {"mid": target},
    }
    # Media replies carry the context too; no reply_to, no key.
    media = command(channel, reply_to=target)
    media.message.media.CopyFrom(Media(kind=MediaKind.MEDIA_KIND_IMAGE))
    media.message.attachments.append(Attachment(url="https://cdn.example/a.jpg"))
    assert build_payload(media, channel)["reply_to"] == {"mid": target}
    assert "reply_to" not in build_payload(command(channel, text="plain"), channel)


@pytest.mark.parametrize("channel", CHANNELS)
def test_reaction_and_unreaction(channel: str) -> None:
    target = mp.mid()
    react = command(
        channel,
        reply_to=target,
        metadata={f"{channel}.action": "reaction", f"{channel}.emoji": "\U0001f389"},
    )
    assert build_payload(react, channel) == {
        "recipient": {"id": mp.PSID},
        "sender_action": "react",
        "payload": {"message_id": target, "reaction": "\U0001f389"},
    }
    unreact = command(channel, reply_to=target, metadata={f"{channel}.action": "reaction"})
    assert build_payload(unreact, channel) == {
        "recipient": {"id": mp.PSID},
        "sender_action": "unreact",
        "payload": {"message_id": target},
    }
    with pytest.raises(PermanentError, match="needs reply_to") as exc:
        build_payload(command(channel, metadata={f"{channel}.action": "reaction"}), channel)
    assert exc.value.code == "invalid_reaction"


@pytest.mark.parametrize("channel", CHANNELS)
def test_mark_seen_and_unknown_action(channel: str) -> None:
    seen = command(channel, metadata={f"{channel}.action": "mark_seen"})
    assert build_payload(seen, channel) == {
        "recipient": {"id": mp.PSID},
        "sender_action": "mark_seen",
    }
    with pytest.raises(PermanentError, match="unknown") as exc:
        build_payload(command(channel, metadata={f"{channel}.action": "react"}), channel)
    assert exc.value.code == "unsupported_content"


APP_SECRET = secrets.token_hex(16)
TOKEN = "EAAP" + secrets.token_hex(16)


@pytest.mark.parametrize(
    ("connector", "business"),
    [("messenger.meta", mp.PAGE_ID), ("instagram.meta", mp.IG_ID)],
)
async def test_sends_against_the_fake_graph_api(connector: str, business: str) -> None:
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
    target = mp.mid()
    async with serve(connector, fake, settings, environ=environ) as h:
        sends = [
            command(channel, text="on it", reply_to=target, message_id="gw-reply"),
            command(
                channel,
                reply_to=target,
                metadata={f"{channel}.action": "reaction", f"{channel}.emoji": "\u2764"},
                message_id="gw-react",
            ),
            command(
                channel,
                reply_to=target,
                metadata={f"{channel}.action": "reaction"},
                message_id="gw-unreact",
            ),
            command(channel, metadata={f"{channel}.action": "mark_seen"}, message_id="gw-seen"),
        ]
        for send in sends:
            await h.send(send)
            (status,) = await h.statuses_of(send.message_id, 1)
            assert status.status.state == S.DELIVERY_STATE_SENT, status
        assert [c.path for c in fake.calls] == [f"/v21.0/{business}/messages"] * 4
        assert {c.token for c in fake.calls} == {TOKEN}
        bodies = [c.body for c in fake.calls]
        assert bodies == [
            {
                "recipient": {"id": mp.PSID},
                "messaging_type": "RESPONSE",
                "message": {"text": "on it"},
                "reply_to": {"mid": target},
            },
            {
                "recipient": {"id": mp.PSID},
                "sender_action": "react",
                "payload": {"message_id": target, "reaction": "\u2764"},
            },
            {
                "recipient": {"id": mp.PSID},
                "sender_action": "unreact",
                "payload": {"message_id": target},
            },
            {"recipient": {"id": mp.PSID}, "sender_action": "mark_seen"},
        ]
