"""Twilio Programmable Voice connector: calls answered from a call flow, call events.

Provider API: Voice webhooks and TwiML, REST API version 2010-04-01.
Docs: https://www.twilio.com/docs/voice/twiml and
https://www.twilio.com/docs/voice/api/call-resource#statuscallback

Routes (under ``/webhooks/voice/twilio``), one set per configured account;
every request carries a verified ``X-Twilio-Signature`` (the SMS connector's
verifier):

- ``/{account}/incoming``: the number's voice URL. Answered with the TwiML of
  the called number's flow (start step); publishes ``call.<state>``.
- ``/{account}/gather?flow=&step=``: a Gather's action. Publishes
  ``call.input`` (digits/speech) and answers the step the menu routes to.
- ``/{account}/record?flow=&step=``: a Record's action. Publishes
  ``call.recording`` and the voicemail as ``message.received`` (audio
  attachment); answers the record step's ``then`` step (or hangs up).
- ``/{account}/step?flow=&step=``: a Redirect target (``goto``).
- ``/{account}/hold?flow=&step=``: an Enqueue's waitUrl (hold music).
- ``/{account}/status``: call status callbacks -> ``call.<state>``.
- ``/{account}/recording``, ``/{account}/transcription``: recording status and
  transcribe callbacks -> ``call.recording`` / ``call.transcription``.

The answer routes (incoming, gather, record, step, hold) answer the flow even
when the broker is down (see :mod:`connectors.voice.answering`); the callback
routes answer 2xx only once their event is confirmed, like every webhook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Self
from urllib.parse import urlencode

from multidict import MultiMapping
from pydantic import BaseModel, ConfigDict, Field

from connectors.sms.twilio import webhooks
from connectors.voice.answering import AnswerEvents
from connectors.voice.flow import (
    Callback,
    Gather,
    Record,
    VoiceFlows,
    render_hold_twiml,
    render_twiml,
)
from connectors.voice.twilio import mapping
from gateway.api.v1.command_pb2 import SendMessageCommand
from gateway.api.v1.connector_pb2 import ConnectorLimits, ConnectorManifest
from gateway.api.v1.envelope_pb2 import Event, RawPayload
from gateway.contract import (
    AuthError,
    BadRequestError,
    ConnectorContext,
    Inbound,
    PermanentError,
    Secret,
    SendResult,
    WebhookReply,
    WebhookRequest,
    WebhookRoute,
)

FORM = "application/x-www-form-urlencoded"
TWIML = "text/xml"
HANGUP_TWIML = b'<?xml version="1.0" encoding="UTF-8"?><Response><Hangup /></Response>'


class TwilioVoiceAccount(BaseModel):
    """One Twilio account (or sub-account)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    account_sid: str = Field(pattern=r"^AC[0-9a-fA-F]{32}$")
    auth_token: Secret


class TwilioVoiceSettings(BaseModel):
    """``connectors.voice.twilio`` config section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    accounts: dict[str, TwilioVoiceAccount] = Field(min_length=1)
    #: The call flows (see :mod:`connectors.voice.flow`) and which number runs which.
    call_flows: VoiceFlows
    #: Seconds an answer webhook waits for its events' confirm before answering
    #: anyway (the rest is retried in the background).
    answer_publish_wait: float = Field(default=0.05, ge=0, le=2)
    #: Unconfirmed answer-event batches kept for retry before new ones are dropped.
    max_pending_events: int = Field(default=10_000, ge=1)
    #: Seconds ``stop`` waits for unconfirmed answer events.
    drain_timeout: float = Field(default=5.0, ge=0)


MANIFEST = ConnectorManifest(
    channel="voice",
    provider="twilio",
    api_version="2010-04-01",
    docs_url="https://www.twilio.com/docs/voice/twiml",
    outbound_content=[],
    inbound_content=["media"],
    event_types=list(mapping.EVENT_TYPES),
    limits=ConnectorLimits(max_recipients=1),
    idempotent_send=False,
    # CallCommand actions this connector executes (TwilioVoiceConnector.call).
    call_actions=["place", "transfer", "enqueue", "speak", "hang_up"],
)


class TwilioVoiceConnector:
    """Twilio Voice in: call flows answered as TwiML, call events published."""

    manifest = MANIFEST

    def __init__(self, context: ConnectorContext, settings: TwilioVoiceSettings) -> None:
        self._ctx = context
        self._settings = settings
        self._flows = settings.call_flows
        self._answers = AnswerEvents(
            context, wait=settings.answer_publish_wait, max_pending=settings.max_pending_events
        )

    @classmethod
    def create(cls, context: ConnectorContext, settings: TwilioVoiceSettings) -> Self:
        """Factory named by the entry point's spec."""
        return cls(context, settings)

    @property
    def answer_events(self) -> AnswerEvents:
        """The publisher of answer-webhook events (pending count for health checks)."""
        return self._answers

    def webhook_routes(self) -> Sequence[WebhookRoute]:
        answer = ("POST", "GET")
        return (
            WebhookRoute(
                name="incoming",
                path="/{account}/incoming",
                handler=self.on_incoming,
                methods=answer,
            ),
            WebhookRoute(name="gather", path="/{account}/gather", handler=self.on_gather),
            WebhookRoute(name="record", path="/{account}/record", handler=self.on_record),
            WebhookRoute(name="step", path="/{account}/step", handler=self.on_step),
            WebhookRoute(name="hold", path="/{account}/hold", handler=self.on_hold),
            WebhookRoute(name="status", path="/{account}/status", handler=self.on_status),
            WebhookRoute(name="recording", path="/{account}/recording", handler=self.on_recording),
            WebhookRoute(
                name="transcription", path="/{account}/transcription", handler=self.on_transcription
            ),
        )

    async def start(self) -> None:
        # Fail at start-up, not on the first call, when a route cannot be addressed.
        for account in self._settings.accounts:
            for kind in Callback:
                self._ctx.webhook_url(kind.value, account=account)

    async def stop(self) -> None:
        await self._answers.close(self._settings.drain_timeout)

    async def send(self, command: SendMessageCommand) -> SendResult:
        # Outbound calls are call commands (issue 6, not built yet), not messages.
        raise PermanentError(
            "voice.twilio does not send messages: place calls with call commands",
            code="unsupported",
        )

    # -- helpers ---------------------------------------------------------------

    def _authenticate(self, request: WebhookRequest) -> tuple[str, MultiMapping[str], RawPayload]:
        key = request.path_params.get("account", "")
        account = self._settings.accounts.get(key)
        if account is None:
            # Same answer as a bad signature: do not reveal which keys exist.
            raise AuthError("unknown account", status=403)
        webhooks.verify(request, account.auth_token.get_secret_value())
        if request.method == "GET":
            params: MultiMapping[str] = request.query
            raw = RawPayload(content_type="text/uri-list", data=request.url.encode())
        else:
            params, raw = request.form, RawPayload(content_type=FORM, data=request.body)
        if params.get("AccountSid") and params["AccountSid"] != account.account_sid:
            raise AuthError("AccountSid does not match the account of this URL", status=403)
        return key, params, raw

    def _urls(self, account: str) -> _Urls:
        return _Urls(self._ctx, account)

    @staticmethod
    def _flow_step(request: WebhookRequest) -> tuple[str, str]:
        flow, step = request.query.get("flow", ""), request.query.get("step", "")
        if not flow or not step:
            raise BadRequestError("flow and step query parameters are required")
        return flow, step

    async def _answer(self, events: Sequence[Event], twiml: bytes) -> Inbound:
        # The TwiML is rendered before publishing: the call is answered whatever
        # the broker does; the runtime gets no events to wait on.
        await self._answers.submit(events)
        return Inbound(events=(), reply=WebhookReply(body=twiml, content_type=TWIML))

    # -- answer routes ---------------------------------------------------------

    async def on_incoming(self, request: WebhookRequest) -> Inbound:
        """The voice URL: answer the called number's flow."""
        key, params, raw = self._authenticate(request)
        flow = self._flows.flow_for(mapping.required(params, "To"))
        start = self._flows.flows[flow].start
        twiml = render_twiml(self._flows, flow, start, self._urls(key))
        event = mapping.status_event(
            params,
            account=key,
            raw=raw,
            received_at=self._ctx.now(),
            flow_step=f"{flow}/{start}",
        )
        return await self._answer([event], twiml)

    async def on_gather(self, request: WebhookRequest) -> Inbound:
        """A Gather's result: publish the input, answer the routed step."""
        key, params, raw = self._authenticate(request)
        flow, step = self._flow_step(request)
        _, actions = self._flows.step(flow, step)
        gather = actions[-1]
        if not isinstance(gather, Gather):
            raise BadRequestError(f"step {flow!r}/{step!r} has no gather")
        target = gather.gather.route(params.get("Digits", ""), params.get("SpeechResult", ""))
        twiml = render_twiml(self._flows, flow, target, self._urls(key)) if target else HANGUP_TWIML
        event = mapping.input_event(
            params,
            account=key,
            flow_step=f"{flow}/{step}",
            idempotency_token=request.headers.get(mapping.IDEMPOTENCY_HEADER, ""),
            raw=raw,
            received_at=self._ctx.now(),
        )
        if target:
            event.attributes["voice.next_step"] = target
        return await self._answer([event], twiml)

    async def on_record(self, request: WebhookRequest) -> Inbound:
        """A Record's end: publish the recording and voicemail, answer ``then``."""
        key, params, raw = self._authenticate(request)
        flow, step = self._flow_step(request)
        _, actions = self._flows.step(flow, step)
        record = actions[-1]
        if not isinstance(record, Record):
            raise BadRequestError(f"step {flow!r}/{step!r} has no record")
        then = record.record.then
        twiml = render_twiml(self._flows, flow, then, self._urls(key)) if then else HANGUP_TWIML
        now = self._ctx.now()
        events: list[Event] = []
        if params.get("RecordingSid"):
            events.append(
                mapping.recording_event(
                    params, account=key, flow_step=f"{flow}/{step}", raw=raw, received_at=now
                )
            )
            voicemail = mapping.voicemail_message(
                params, account=key, flow_step=f"{flow}/{step}", raw=raw, received_at=now
            )
            if voicemail is not None:
                events.append(voicemail)
        return await self._answer(events, twiml)

    async def on_step(self, request: WebhookRequest) -> Inbound:
        """A Redirect (``goto``): answer the named step."""
        key, _, _ = self._authenticate(request)
        flow, step = self._flow_step(request)
        return await self._answer((), render_twiml(self._flows, flow, step, self._urls(key)))

    async def on_hold(self, request: WebhookRequest) -> Inbound:
        """An Enqueue's waitUrl: the step's hold music."""
        self._authenticate(request)
        flow, step = self._flow_step(request)
        return await self._answer((), render_hold_twiml(self._flows, flow, step))

    # -- callbacks (confirmed before 2xx) -----------------------------------------

    async def on_status(self, request: WebhookRequest) -> Inbound:
        """A call status callback."""
        key, params, raw = self._authenticate(request)
        event = mapping.status_event(params, account=key, raw=raw, received_at=self._ctx.now())
        return Inbound(events=[event], reply=WebhookReply(status=204))

    async def on_recording(self, request: WebhookRequest) -> Inbound:
        """A recordingStatusCallback."""
        key, params, raw = self._authenticate(request)
        step = "/".join(filter(None, (request.query.get("flow"), request.query.get("step"))))
        event = mapping.recording_event(
            params, account=key, flow_step=step, raw=raw, received_at=self._ctx.now()
        )
        return Inbound(events=[event], reply=WebhookReply(status=204))

    async def on_transcription(self, request: WebhookRequest) -> Inbound:
        """A transcribeCallback."""
        key, params, raw = self._authenticate(request)
        step = "/".join(filter(None, (request.query.get("flow"), request.query.get("step"))))
        event = mapping.transcription_event(
            params, account=key, flow_step=step, raw=raw, received_at=self._ctx.now()
        )
        return Inbound(events=[event], reply=WebhookReply(status=204))


class _Urls:
    """Callback URLs of one account's routes, naming the flow step in the query."""

    def __init__(self, context: ConnectorContext, account: str) -> None:
        self._ctx, self._account = context, account

    def __call__(self, kind: Callback, flow: str, step: str) -> str:
        base = self._ctx.webhook_url(kind.value, account=self._account)
        return f"{base}?{urlencode({'flow': flow, 'step': step})}"
