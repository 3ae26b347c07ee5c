"""A voicemail as a ``message.received`` Message: provider-neutral.

A record step of a call flow takes a voicemail; besides its ``call.recording``
event, a voice connector publishes it as an inbound Message with the audio
attached, so consumers that only read messages (an inbox, a CRM) see it like
any other channel's message. Each provider's mapping extracts the recording
and the two parties; this builds the same event for all of them.
"""

from __future__ import annotations

from datetime import datetime

from gateway.api.v1.content_pb2 import Attachment, Media, MediaKind
from gateway.api.v1.envelope_pb2 import Event, RawPayload
from gateway.api.v1.message_pb2 import Direction, Message
from gateway.api.v1.participant_pb2 import Participant, ParticipantRole
from gateway.contract import inbound_event_id
from gateway.contract.ids import conversation_id
from gateway.contract.times import timestamp

CHANNEL = "voice"


def voicemail_message(
    *,
    provider: str,
    account: str,
    recording_id: str,
    call_id: str,
    caller: str,
    called: str,
    recording: Attachment,
    flow_step: str,
    raw: RawPayload,
    received_at: datetime,
    occurred_at: datetime | None = None,
    duration_seconds: int | None = None,
) -> Event:
    """``message.received``: the voicemail ``recording_id`` that ``caller`` left
    on the call ``call_id`` to our ``called`` number, with its audio attached.

    The event id derives from the provider's recording id, so a retried
    webhook gives the same id.
    """
    message = Message(
        direction=Direction.DIRECTION_INBOUND,
        sender=Participant(
            channel=CHANNEL, address=caller, role=ParticipantRole.PARTICIPANT_ROLE_CUSTOMER
        ),
        recipients=[
            Participant(
                channel=CHANNEL, address=called, role=ParticipantRole.PARTICIPANT_ROLE_BUSINESS
            )
        ],
        provider_message_id=recording_id,
        media=Media(kind=MediaKind.MEDIA_KIND_AUDIO),
        attachments=[recording],
    )
    event = Event(
        id=inbound_event_id(provider, account, "voicemail", recording_id),
        type="message.received",
        channel=CHANNEL,
        provider=provider,
        account=account,
        received_at=timestamp(received_at),
        occurred_at=timestamp(occurred_at or received_at),
        correlation_id=call_id,
        conversation_id=conversation_id(CHANNEL, called, caller),
        raw=raw,
        message=message,
    )
    event.attributes["voice.call_id"] = call_id
    event.attributes["voice.flow_step"] = flow_step
    if duration_seconds is not None:
        event.attributes["voice.recording_duration_seconds"] = str(duration_seconds)
    return event
